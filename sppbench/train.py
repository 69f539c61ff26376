"""The search loop: SLBI on the masks of a MaskedModel, W frozen, producing a SolutionPath."""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Iterable

import torch

from .dynamics import SLBI
from .errors import SearchDivergedError
from .masks import POOLS, MaskedModel
from .path import SolutionPath


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def forward_loss(model: torch.nn.Module, batch: Any, loss_fn: Callable) -> torch.Tensor:
    """``loss_fn(model(inputs), target)`` for a batch ``(inputs, target)``; a tuple of inputs is splatted."""
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise TypeError("each batch must be a pair (inputs, target); inputs may be a tuple of tensors")
    inputs, target = batch
    out = model(*inputs) if isinstance(inputs, (list, tuple)) else model(inputs)
    return loss_fn(out, target)


class _Cycle:
    """Iterate batches for as many steps as asked, re-iterating a re-iterable when it runs out."""

    def __init__(self, batches: Iterable):
        self.batches = batches
        self.it = iter(batches)
        self.reiterable = not hasattr(batches, "__next__")  # a list / DataLoader, not a one-shot iterator

    def __next__(self):
        try:
            return next(self.it)
        except StopIteration:
            if not self.reiterable:
                raise ValueError("the batch iterator ran out before the requested number of steps; pass a "
                                 "re-iterable (a list or DataLoader) or an iterator that yields enough batches") from None
            self.it = iter(self.batches)
            try:
                return next(self.it)
            except StopIteration:
                raise ValueError("batches is empty: pass at least one (inputs, target) batch") from None


def _snapshot(m: MaskedModel, opt: SLBI, history: list[dict], config: dict) -> SolutionPath:
    masks = m.mask_parameters()
    entry, V, M, sup = {}, {}, {}, {}
    for name, p in masks.items():
        st = opt._state(p)
        entry[name] = st["entry_step"].cpu()
        sup[name] = st["support_steps"].cpu()
        V[name] = st["V"].detach().float().cpu()
        M[name] = p.detach().float().cpu()
    return SolutionPath(m.groups, entry, V, M, m.cost_model, config, [dict(h) for h in history], sup, m.info)


def _record(m: MaskedModel, opt: SLBI, step: int, loss: float) -> dict:
    per_group = {}
    for g, p in m.mask_parameters().items():
        per_group[g] = int((opt._state(p)["gamma"] != 0).sum())
    per_pool = {pool: sum(per_group[g.name] for g in m.groups if g.pool == pool) for pool in POOLS}
    return {"step": step, "loss": loss, "support_pool": per_pool, "support_group": per_group}


def search(m: MaskedModel, batches: Iterable, loss_fn: Callable, *, steps: int, kappa: float, alpha: float,
           nu: float, lam: float, variant: str = "paper", seed: int = 0, record_every: int = 1,
           log_every: int = 0, callback: Callable[[int, float, SLBI], None] | None = None) -> SolutionPath:
    """Run one SLBI search on the masks of ``m`` (weights frozen) and return its solution path.

    batches: re-iterable (or long enough iterator) of ``(inputs, target)``; ``loss_fn(output, target)``
    returns the scalar task loss. The model runs in eval mode (no dropout / drop-path) so the path
    depends only on the data order and the constants. Masks start at 1 and are reset to 1 at the end
    (the final M is in ``path.M``). A NaN / inf loss raises SearchDivergedError whose ``.path`` is
    the path at the last finite step.
    """
    if not isinstance(m, MaskedModel):
        raise TypeError("search() takes the MaskedModel returned by sppbench.attach_masks(model)")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    torch.manual_seed(seed)
    masks = m.mask_parameters()
    weights = list(m.weight_parameters())
    saved_grad = [p.requires_grad for p in weights]
    was_training = m.training
    device = next(iter(masks.values())).device
    config = {"method": "spp", "variant": variant, "kappa": kappa, "alpha": alpha, "nu": nu, "lam": lam,
              "steps": steps, "seed": seed, "record_every": record_every}
    m.reset_masks()
    opt = SLBI(list(masks.values()), kappa=kappa, alpha=alpha, nu=nu, lam=lam, variant=variant)
    history: list[dict] = []
    data = _Cycle(batches)
    t0 = time.perf_counter()
    try:
        for p in weights:
            p.requires_grad_(False)
        for p in masks.values():
            p.requires_grad_(True)
        m.eval()
        for step in range(1, steps + 1):
            batch = to_device(next(data), device)
            loss = forward_loss(m, batch, loss_fn)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SearchDivergedError(
                    f"the loss is {value} at step {step} (kappa={kappa}, alpha={alpha}, nu={nu}, lam={lam}): "
                    "the search diverged; lower kappa*alpha or check the data. The error's .path holds the "
                    f"path after step {step - 1}.", path=_snapshot(m, opt, history, {**config, "steps": step - 1}),
                    step=step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            try:
                opt.step()
            except SearchDivergedError as exc:
                exc.path = _snapshot(m, opt, history, {**config, "steps": step - 1})
                exc.step = step
                raise
            if step % record_every == 0 or step == steps:
                history.append(_record(m, opt, step, value))
            if callback is not None:
                callback(step, value, opt)
            if log_every and (step % log_every == 0 or step == steps):
                sup = history[-1]["support_pool"] if history else {}
                print(f"[search] step {step}/{steps} loss {value:.4f} support {sup} "
                      f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
        config["seconds"] = round(time.perf_counter() - t0, 3)
        return _snapshot(m, opt, history, config)
    finally:
        for p, rg in zip(weights, saved_grad):
            p.requires_grad_(rg)
        opt.zero_grad(set_to_none=True)
        m.reset_masks()
        m.train(was_training)


# Chosen on the embedded validation split (500 training images held out; 40 steps of batch 32, starting from
# the re-fit head = LP-FT), mean val top-1 of the dense model and SPP at 50% MACs: lr 3e-6 / no smoothing 0.818;
# 3e-6 / 0.1 0.802; 1e-5 / 0.1 0.796; 1e-5 / 0 0.794; 5e-5 / 0.1 0.708; 2e-4 / 0.1 0.338; plain fine-tune from
# the original head (smoothing 0.1): 5e-5 0.697,
# 1e-5 0.709, 2e-4 0.370. (At this scale fine-tuning barely moves past the head re-fit; see README.)
FINETUNE_DEFAULTS = {"optimizer": "AdamW", "lr": 3e-6, "weight_decay": 0.05, "warmup_steps": 5,
                     "schedule": "linear warmup, cosine to 0", "label_smoothing": 0.0, "grad_clip": 1.0,
                     "betas": (0.9, 0.999)}


def finetune(model: torch.nn.Module, batches: Iterable, *, steps: int, lr: float = FINETUNE_DEFAULTS["lr"],
             weight_decay: float = FINETUNE_DEFAULTS["weight_decay"],
             warmup_steps: int = FINETUNE_DEFAULTS["warmup_steps"],
             label_smoothing: float = FINETUNE_DEFAULTS["label_smoothing"],
             grad_clip: float = FINETUNE_DEFAULTS["grad_clip"], seed: int = 0, log_every: int = 0,
             loss_fn: Callable | None = None) -> dict:
    """The one fine-tuning recipe every compared method gets: AdamW, linear warmup then cosine to 0,
    cross-entropy with label smoothing, gradient-norm clipping; every parameter trained, in place.

    ``batches``: re-iterable of ``(inputs, target)``; ``loss_fn(outputs, target)`` replaces the
    cross-entropy (e.g. ``sppbench.clip.contrastive_loss``). Returns the settings and the loss history (a
    record of exactly what was done). A NaN / inf loss stops with SearchDivergedError and leaves
    the model at its last finite step.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    settings = {"optimizer": "AdamW", "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                "schedule": FINETUNE_DEFAULTS["schedule"], "label_smoothing": label_smoothing, "grad_clip": grad_clip,
                "betas": list(FINETUNE_DEFAULTS["betas"]), "steps": steps, "seed": seed,
                "loss": "cross-entropy" if loss_fn is None else getattr(loss_fn, "__name__", type(loss_fn).__name__)}
    if steps == 0:
        return {"settings": settings, "losses": [], "seconds": 0.0}
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases, norms, LayerScale: no weight decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=FINETUNE_DEFAULTS["betas"])

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        prog = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    device = next(model.parameters()).device
    data = _Cycle(batches)
    was = model.training
    model.train()
    losses = []
    t0 = time.perf_counter()
    if loss_fn is None:
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    try:
        for step in range(steps):
            batch = to_device(next(data), device)
            loss = forward_loss(model, batch, loss_fn)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SearchDivergedError(f"fine-tuning loss is {value} at step {step + 1}; lower lr (was {lr})",
                                          step=step + 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            losses.append(value)
            if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
                print(f"[finetune] step {step + 1}/{steps} loss {value:.4f}", file=sys.stderr, flush=True)
    finally:
        model.train(was)
    return {"settings": settings, "losses": losses, "seconds": round(time.perf_counter() - t0, 3)}
