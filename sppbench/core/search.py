"""The search loop: SLBI on the masks of a MaskedModel, W frozen, producing a SolutionPath."""
from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import SearchDivergedError, SpecError
from ..fileio import atomic_write_bytes
from . import auto as A
from . import distributed as D
from .batches import BatchCycle, forward_loss, precision_context, resolve_precision, to_device
from .dynamics import SLBI, official_settings
from .masks import POOLS, MaskedModel
from .path import HealthWatch, SolutionPath

# ---------------------------------------------------------------------------------------------
# Search checkpoints (resume)
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "sppbench.search-state/1"
# what must agree between a checkpoint and the search resuming from it (steps may grow)
_MUST_MATCH = ("method", "variant", "kappa", "alpha", "nu", "lam", "lr", "seed", "record_every", "slbi",
               "precision", "official")
# settings checkpoints written before they existed hold implicitly: their value then
_MUST_MATCH_BEFORE = {"precision": "fp32"}


class _Prepend:
    """Batches already read (for the auto-constant measurement) first, then the rest of the cycle:
    the search sees exactly the sequence it would have seen without the measurement."""

    def __init__(self, head: list, rest: "BatchCycle"):
        self.head, self.rest = list(head), rest

    def __next__(self):
        return self.head.pop(0) if self.head else next(self.rest)


def _rng_state() -> dict:
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def _set_rng_state(st: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in st["python"]))
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_search_state(file, m: MaskedModel, opt: SLBI, step: int, history: list, config: dict, seconds: float) -> None:
    """Everything a search needs to continue exactly: masks, SLBI state (V, Gamma, entry and support steps),
    the loss history, RNG states and the data position (= batches consumed = ``step``); written atomically."""
    import io


    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "step": step, "data_position": step, "config": config,
                "groups": {g.name: g.size for g in m.groups},
                "masks": {n: p.detach().cpu() for n, p in m.mask_parameters().items()},
                "optimizer": opt.state_dict(), "history": history, "rng": _rng_state(), "seconds": seconds}, buf)
    atomic_write_bytes(file, buf.getvalue())


def load_search_state(file) -> dict:
    """A checkpoint written by ``save_search_state``, or a SpecError saying what is wrong with it."""
    from pathlib import Path


    file = Path(file)
    if not file.is_file():
        raise SpecError(f"no search checkpoint at {file}; run without --resume to start the search")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / not a torch file / unpickling refused
        raise SpecError(f"{file} is not a readable search checkpoint ({type(exc).__name__}: {exc}); it may be "
                        "truncated or from another program: move it away and rerun without --resume") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SpecError(f"{file} is not a sppbench search checkpoint (format "
                        f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, expected "
                        f"{CHECKPOINT_FORMAT!r}); move it away and rerun without --resume")
    return state


def _check_resumable(state: dict, file, m: MaskedModel, config: dict) -> None:

    theirs = state["config"]
    diff = {k: (theirs.get(k, _MUST_MATCH_BEFORE.get(k)), config.get(k)) for k in (*_MUST_MATCH, "run")
            if theirs.get(k, _MUST_MATCH_BEFORE.get(k)) != config.get(k)}
    if diff:
        what = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise SpecError(f"{file} was written by a different search ({what}); resume with the same settings, or "
                        "move the checkpoint away to start a new search")
    mine = {g.name: g.size for g in m.groups}
    if state["groups"] != mine:
        raise SpecError(f"{file} belongs to a model with other mask groups ({len(state['groups'])} groups vs "
                        f"{len(mine)} here); resume with the model it was written for")
    if state["step"] > config["steps"]:
        raise SpecError(f"{file} is at step {state['step']}, beyond the {config['steps']} steps asked; ask for at "
                        f"least {state['step']} steps")


def _snapshot(m: MaskedModel, opt: SLBI, history: list[dict], config: dict) -> SolutionPath:
    masks = m.mask_parameters()
    entry, etime, V, M, sup = {}, {}, {}, {}, {}
    for name, p in masks.items():
        st = opt.state_of(p)
        entry[name] = st["entry_step"].cpu()
        etime[name] = st.get("entry_time", st["entry_step"].double()).cpu()
        sup[name] = st["support_steps"].cpu()
        V[name] = st["V"].detach().float().cpu()
        M[name] = p.detach().float().cpu()
    return SolutionPath(m.groups, entry, V, M, m.cost_model, config, [dict(h) for h in history], sup, m.info,
                        entry_time=etime)


def _record(m: MaskedModel, opt: SLBI, step: int, loss: float) -> dict:
    per_group = {}
    for g, p in m.mask_parameters().items():
        per_group[g] = int((opt.state_of(p)["gamma"] != 0).sum())
    per_pool = {pool: sum(per_group[g.name] for g in m.groups if g.pool == pool) for pool in POOLS}
    return {"step": step, "loss": loss, "support_pool": per_pool, "support_group": per_group}


def measure_dense(m: MaskedModel, batches: list, loss_fn: Callable, *, seed: int = 0,
                  distributed: bool = False) -> dict:
    """``sppbench.core.auto.measure`` at the dense model (every mask 1, weights frozen, eval mode) on ``batches``
    (already on the model's device); every flag it touches is restored. Under DDP the measurement is
    averaged over ranks and rank 0's copy is broadcast, so derived constants are bit-equal everywhere."""

    masks = m.mask_parameters()
    weights = list(m.weight_parameters())
    m.reset_masks()
    was_rg = [p.requires_grad for p in masks.values()]
    wrg = [p.requires_grad for p in weights]
    was_tr = m.training
    for p in masks.values():
        p.requires_grad_(True)
    for p in weights:
        p.requires_grad_(False)
    m.eval()
    try:
        meas = A.measure(m, batches, loss_fn, seed=seed)
    finally:
        for p, rg in zip(masks.values(), was_rg):
            p.requires_grad_(rg)
        for p, rg in zip(weights, wrg):
            p.requires_grad_(rg)
        m.train(was_tr)
    return D.broadcast_object(meas) if distributed else meas


def search(m: MaskedModel, batches: Iterable, loss_fn: Callable, *, steps: int, kappa: float | None = None,
           alpha: float | None = None, nu: float | None = None, lam: float | None = None,
           constants: str | None = None, variant: str = "paper", seed: int = 0, record_every: int = 1,
           log_every: int = 0, callback: Callable[[int, float, SLBI], None] | None = None,
           checkpoint: str | Path | None = None, checkpoint_every: int = 0, resume: bool = False,
           run: dict | None = None, distributed: bool | None = None, slbi: type[SLBI] = SLBI,
           lr: float | None = None, precision: str = "fp32") -> SolutionPath:
    """Run one SLBI search on the masks of ``m`` (weights frozen) and return its solution path.

    batches: re-iterable (or long enough iterator) of ``(inputs, target)``; ``loss_fn(output, target)``
    returns the scalar task loss. The model runs in eval mode (no dropout / drop-path) so the path
    depends only on the data order and the constants. Masks start at 1 and are reset to 1 at the end
    (the final M is in ``path.M``). A NaN / inf loss raises SearchDivergedError whose ``.path`` is
    the path at the last finite step.

    constants: "auto" (the default when none of kappa, alpha, nu, lam is given) derives the four from
    gradient and curvature scales measured at the dense model on the search's first batches
    (``sppbench.core.auto``; the measurements and what they imply go into ``path.config["auto"]``, and a
    RuntimeWarning says when the paper form cannot hold the model within ``steps``); "given" (the
    default when all four are given) uses them as they are.

    checkpoint / checkpoint_every: write the full search state to ``checkpoint`` every N steps (atomically;
    rank 0 only). resume: continue from that file (same constants, seed and ``run``; the path equals an
    uninterrupted run's). run: what else identifies the search (model, global batch, data), checked on
    resume and stored in the path's config. distributed: wrap in DistributedDataParallel (default: when
    a process group of more than one process is active); ``batches`` then yields this rank's slice of
    every global batch, and the SLBI state is checked to be identical on every rank at the end.

    variant / lr: the SLBI form (``sppbench.core.dynamics``): "paper" (default), "official" (the released code's),
    or "adam" (the paper form's coupling with an Adam M step of size ``lr``; constants by hand).

    slbi: the optimizer class, ``SLBI`` or a subclass (a research variant of the mask step, e.g. those
    probed by tools/path_probes.py); a subclass's name is stored in the path's config as ``slbi``.

    precision: "fp32" (default), "bf16" (the forward + loss under bf16 autocast on the model's device;
    masks, SLBI state and gradients stay float32) or "auto" (bf16 on a CUDA device that supports it, else
    fp32). The precision used goes into ``path.config["precision"]`` and must match on resume. The
    auto-constant measurement always runs in fp32.
    """

    if not isinstance(m, MaskedModel):
        raise TypeError("search() takes the MaskedModel returned by sppbench.attach_masks(model)")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an integer >= 0, got {checkpoint_every!r}")
    if (resume or checkpoint_every) and checkpoint is None:
        raise ValueError("resume / checkpoint_every need checkpoint=<file>")
    given = {k: v for k, v in (("kappa", kappa), ("alpha", alpha), ("nu", nu), ("lam", lam)) if v is not None}
    if constants is None:
        constants = "given" if given else "auto"
    if constants not in ("auto", "given"):
        raise ValueError(f"constants must be 'auto' or 'given', got {constants!r}")
    if constants == "given" and len(given) != 4:
        missing = sorted({"kappa", "alpha", "nu", "lam"} - set(given))
        raise ValueError(f"hand-given constants need all four of kappa, alpha, nu, lam (missing {missing}); "
                         "or pass none of them (constants='auto') to derive them from the model")
    if constants == "auto" and given:
        raise ValueError(f"constants='auto' derives kappa, alpha, nu, lam itself; drop {sorted(given)} or pass "
                         "constants='given' with all four")
    if constants == "auto" and variant != "paper":
        raise ValueError(f"constants='auto' is derived for the paper form; give the {variant!r} form's constants "
                         "by hand (kappa=, alpha=, nu=, lam=)")
    if not (isinstance(slbi, type) and issubclass(slbi, SLBI)):
        raise TypeError(f"slbi must be sppbench.core.dynamics.SLBI or a subclass of it, got {slbi!r}")
    use_ddp = D.active() if distributed is None else bool(distributed)
    masks = m.mask_parameters()
    device = next(iter(masks.values())).device
    precision = resolve_precision(precision, device)
    torch.manual_seed(seed)
    weights = list(m.weight_parameters())
    saved_grad = [p.requires_grad for p in weights]
    was_training = m.training
    auto_info = None
    data = BatchCycle(batches)
    if constants == "auto":
        if resume:
            prior = load_search_state(checkpoint)["config"]
            if "auto" not in prior:
                raise SpecError(f"{checkpoint} was written by a search with hand-given constants; resume with "
                                "the same kappa=, alpha=, nu=, lam=")
            kappa, alpha, nu, lam = (prior[k] for k in ("kappa", "alpha", "nu", "lam"))
            auto_info = prior["auto"]
        else:

            head = [to_device(next(data), device) for _ in range(A.MEASURE_BATCHES)]
            data = _Prepend(head, data)
            meas = measure_dense(m, head, loss_fn, seed=seed, distributed=use_ddp)
            consts, implied = A.derive(meas, steps)
            kappa, alpha, nu, lam = (consts[k] for k in ("kappa", "alpha", "nu", "lam"))
            auto_info = {"measured": meas, "implied": implied, "rule": A.RULE}
            if not implied["can_hold"]:
                warnings.warn(
                    f"auto constants: the paper form needs about {implied['steps_to_hold']:,} steps to keep this "
                    f"model's uniform shrink under 5% while the path forms (condition number "
                    f"{implied['condition_number']:.3g}); with {steps} steps the coupling shrinks it by about "
                    f"{implied['predicted_uniform_shrink']:.0%} and the path may be degenerate: read "
                    "path.diagnostics()", RuntimeWarning, stacklevel=2)
    if (variant == "adam") != (lr is not None):
        raise ValueError("lr is the adam form's M step: give it with variant='adam' and only then"
                         if lr is not None else "variant='adam' needs lr= (its Adam step for M), e.g. 0.03")
    config = {"method": "spp", "variant": variant, "kappa": kappa, "alpha": alpha, "nu": nu, "lam": lam,
              **({"lr": lr} if lr is not None else {}),
              **({"official": official_settings(steps)} if variant == "official" else {}),
              "constants": constants, **({"auto": auto_info} if auto_info is not None else {}),
              "steps": steps, "seed": seed, "record_every": record_every, "precision": precision,
              **({"run": dict(run)} if run is not None else {}),
              **({"processes": D.world()[1]} if use_ddp else {}),
              **({"slbi": f"{slbi.__module__}.{slbi.__qualname__}"} if slbi is not SLBI else {})}
    m.reset_masks()
    opt = slbi(list(masks.values()), kappa=kappa, alpha=alpha, nu=nu, lam=lam, variant=variant, lr=lr,
               steps=steps if variant == "official" else None)
    history: list[dict] = []
    start, before = 0, 0.0
    if resume:
        state = load_search_state(checkpoint)
        _check_resumable(state, checkpoint, m, config)
        with torch.no_grad():
            for n, p in masks.items():
                p.copy_(state["masks"][n].to(p.device, p.dtype))
        opt.load_state_dict(state["optimizer"])
        history = list(state["history"])
        _set_rng_state(state["rng"])
        start, before = int(state["step"]), float(state["seconds"])
        config["resumed_at"] = [*state["config"].get("resumed_at", []), start]
        config["health_watch"] = copy.deepcopy(state["config"].get("health_watch", {}))
        data = BatchCycle(batches, start=start)
    # the health limits watched as the search runs (events kept in the config: a resumed search keeps its own)
    watch = HealthWatch(sum(g.size for g in m.groups), config.setdefault("health_watch", {}))
    t0 = time.perf_counter()

    def snapshot(done: int) -> SolutionPath:
        return _snapshot(m, opt, history, {**config, "steps": done})

    try:
        for p in weights:
            p.requires_grad_(False)
        for p in masks.values():
            p.requires_grad_(True)
        m.eval()
        net = D.wrap(m, device) if use_ddp else m
        for step in range(start + 1, steps + 1):
            batch = to_device(next(data), device)
            with precision_context(precision, device):  # fp32: no context at all
                loss = forward_loss(net, batch, loss_fn)
            value = D.mean_scalar(loss) if use_ddp else float(loss.detach())  # every rank stops together
            if not math.isfinite(value):
                raise SearchDivergedError(
                    f"the loss is {value} at step {step} (kappa={kappa}, alpha={alpha}, nu={nu}, lam={lam}): "
                    "the search diverged; lower kappa*alpha or check the data. The error's .path holds the "
                    f"path after step {step - 1}.", path=snapshot(step - 1), step=step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            try:
                opt.step()
            except SearchDivergedError as exc:
                exc.path = snapshot(step - 1)
                exc.step = step
                raise
            watch.check(step, value, int(sum((opt.state_of(p)["entry_step"] == step).sum() for p in masks.values())))
            if step % record_every == 0 or step == steps:
                history.append(_record(m, opt, step, value))
            if callback is not None:
                callback(step, value, opt)
            if checkpoint_every and step % checkpoint_every == 0 and step < steps and D.is_main():
                save_search_state(checkpoint, m, opt, step, history, config,
                                  before + time.perf_counter() - t0)
            if log_every and (step % log_every == 0 or step == steps):
                sup = history[-1]["support_pool"] if history else {}
                print(f"[search] step {step}/{steps} loss {value:.4f} support {sup} "
                      f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
        if use_ddp:
            st = [opt.state_of(p) for p in masks.values()]
            D.check_replicas([*masks.values(), *(s["V"] for s in st), *(s["entry_step"] for s in st)])
        config["seconds"] = round(before + time.perf_counter() - t0, 3)
        return snapshot(steps)
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
# 1e-5 0.709, 2e-4 0.370. (At this scale fine-tuning barely moves past the head re-fit; see docs/results.md.)
FINETUNE_DEFAULTS = {"optimizer": "AdamW", "lr": 3e-6, "weight_decay": 0.05, "warmup_steps": 5,
                     "schedule": "linear warmup, cosine to 0", "label_smoothing": 0.0, "grad_clip": 1.0,
                     "betas": (0.9, 0.999)}


def finetune(model: torch.nn.Module, batches: Iterable, *, steps: int, lr: float = FINETUNE_DEFAULTS["lr"],
             weight_decay: float = FINETUNE_DEFAULTS["weight_decay"],
             warmup_steps: int = FINETUNE_DEFAULTS["warmup_steps"],
             label_smoothing: float = FINETUNE_DEFAULTS["label_smoothing"],
             grad_clip: float = FINETUNE_DEFAULTS["grad_clip"], seed: int = 0, log_every: int = 0,
             loss_fn: Callable | None = None, distributed: bool | None = None, precision: str = "fp32") -> dict:
    """The one fine-tuning recipe every compared method gets: AdamW, linear warmup then cosine to 0,
    cross-entropy with label smoothing, gradient-norm clipping; every parameter trained, in place.

    ``batches``: re-iterable of ``(inputs, target)``; ``loss_fn(outputs, target)`` replaces the
    cross-entropy (e.g. ``sppbench.tasks.clip.contrastive_loss``). Returns the settings and the loss history (a
    record of exactly what was done). A NaN / inf loss stops with SearchDivergedError and leaves
    the model at its last finite step.

    distributed: train through DistributedDataParallel (default: inside a process group of more than one
    process); pass the already compressed model, and batches that yield this rank's slice of each global
    batch. Every rank ends with the same weights.

    precision: "fp32" (default), "bf16" (the forward + loss under bf16 autocast; weights, gradients and AdamW
    state stay float32) or "auto" (bf16 on a CUDA device that supports it, else fp32); recorded in the
    settings.
    """

    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    precision = resolve_precision(precision, device)
    settings = {"optimizer": "AdamW", "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                "schedule": FINETUNE_DEFAULTS["schedule"], "label_smoothing": label_smoothing, "grad_clip": grad_clip,
                "betas": list(FINETUNE_DEFAULTS["betas"]), "steps": steps, "seed": seed,
                "loss": "cross-entropy" if loss_fn is None else getattr(loss_fn, "__name__", type(loss_fn).__name__),
                "precision": precision}
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
    data = BatchCycle(batches)
    was = model.training
    model.train()
    losses = []
    t0 = time.perf_counter()
    if loss_fn is None:
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    use_ddp = D.active() if distributed is None else bool(distributed)
    if use_ddp:
        settings["processes"] = D.world()[1]
    net = D.wrap(model, device) if use_ddp else model
    try:
        for step in range(steps):
            batch = to_device(next(data), device)
            with precision_context(precision, device):  # fp32: no context at all
                loss = forward_loss(net, batch, loss_fn)
            value = D.mean_scalar(loss) if use_ddp else float(loss.detach())
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
