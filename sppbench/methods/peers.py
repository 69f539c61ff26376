"""Peer methods run side by side with sppbench: Torch-Pruning (``torch_pruning``, "TP") one-shot.

``tp_prune`` prunes a timm ``VisionTransformer`` (ViT / DeiT / DINOv2-style, LayerScale included) with
TP's ``BasePruner`` to a MAC budget or a pruning ratio, on the units closest to sppbench's masks that TP
allows:

- attention head dimensions: the same within-head dimension index ``d`` in every head of a block (TP's
  ``num_heads`` + ``prune_head_dims``; whole heads are never removed). TP couples q, k and v: removing
  ``d`` removes qkv rows ``s*H*d_h + h*d_h + d`` for q, k and v (s = 0, 1, 2) and proj columns
  ``h*d_h + d``. sppbench prunes q/k dims (``qk`` mask) and v dims (``v`` mask) separately.
- MLP hidden neurons: fc1 output rows and fc2 input columns (the same unit as sppbench's ``mlp`` mask).

The residual width (embed_dim) is never pruned: patch_embed, every attn.proj and mlp.fc2 and the
head(s) are TP ``ignored_layers``, which makes TP skip the residual group (norms, tokens, pos_embed and
LayerScale gammas included).

Softmax scale: timm's fused attention uses ``1/sqrt(q.shape[-1])``, i.e. the PRUNED head width once
q is narrower. By default (``scale="original"``) the pruned model keeps the ORIGINAL scale, as
sppbench's compressed models do: ``sqrt(d_h'/d_h)`` is folded into the q rows of qkv (weight and
bias) and ``attn.scale`` is set to ``d_h'**-0.5``, so both timm paths (fused and not) compute
``softmax(q.k / sqrt(d_h))`` with the original ``d_h``: the pruned model is then exactly the dense
model with the pruned qkv rows / fc1 rows zeroed. ``scale="pruned"`` leaves the weights alone and
uses ``d_h'**-0.5`` (what a plain TP prune of a timm ViT gives with the fused kernel).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Iterable

import torch
from torch import nn

from ..core import measure
from ..errors import BudgetError, UnsupportedModelError

PEERS = ("tp-magnitude", "tp-taylor")
IMPORTANCES = ("magnitude", "taylor")
SCALES = ("original", "pruned")
INSTALL_HINT = "torch-pruning is not installed: pip install torch-pruning"

UNITS = {
    "attn": ("head dimensions: TP removes the same within-head index d from q, k AND v of every head of a block "
             "together (qkv rows s*H*d_h + h*d_h + d for s = q, k, v; attn.proj input columns h*d_h + d), so q/k and v "
             "keep one common width d_h' per block; num_heads is never changed (no whole-head pruning)"),
    "mlp": "hidden neurons: fc1 output rows + fc2 input columns (same unit as sppbench's mlp mask)",
    "not_pruned": ("the residual width embed_dim: patch_embed, attn.proj and mlp.fc2 outputs, head(s), norms, "
                   "cls/reg/dist tokens, pos_embed and LayerScale gammas keep their size"),
    "vs_sppbench": ("sppbench's qk mask (q and k dims) and v mask (v dims) are separate, so a sppbench block may keep "
                    "different q/k and v widths (or drop all q/k dims: uniform attention); TP's unit is one q+k+v "
                    "dimension, and every block keeps >= 1 head dim and >= 1 MLP neuron. MLP units are identical."),
}


def _import_tp():
    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return tp


def _tp_version(tp) -> str:
    try:
        from importlib.metadata import version

        dist = version("torch-pruning")
    except Exception:  # pragma: no cover
        dist = None
    mod = getattr(tp, "__version__", None)
    if dist and mod and dist != mod:
        return f"{dist} (module __version__ {mod})"
    return str(dist or mod)


def available() -> dict[str, str | None]:
    """Peer name -> None if it can run here, else the reason it cannot."""
    reason = None
    try:
        import torch_pruning  # noqa: F401
    except ImportError as exc:
        reason = f"{INSTALL_HINT} ({exc})"
    else:
        try:
            from timm.models.vision_transformer import VisionTransformer  # noqa: F401
        except ImportError as exc:  # pragma: no cover
            reason = f"timm is not installed: pip install timm ({exc})"
    return {p: reason for p in PEERS}


# ---------------------------------------------------------------------------------------------
# Model checks and bookkeeping
# ---------------------------------------------------------------------------------------------
def _check_model(model: nn.Module) -> None:
    try:
        from timm.layers import Attention, Mlp
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:  # pragma: no cover
        raise UnsupportedModelError(f"timm is needed for the Torch-Pruning peer ({exc})") from exc
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"the Torch-Pruning peer supports timm VisionTransformer models (ViT, DeiT, DINOv2-style), "
            f"got {type(model).__name__}; pass the plain timm model (not a MaskedModel or a compressed sppbench model)")
    D = model.embed_dim
    for i, blk in enumerate(model.blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if type(attn) is not Attention or type(mlp) is not Mlp:
            raise UnsupportedModelError(
                f"block {i}: the Torch-Pruning peer needs timm's Attention and Mlp modules, got "
                f"{type(attn).__name__} / {type(mlp).__name__} (masked, compressed or SwiGLU blocks are not supported)")
        extras = [n for n in ("q_norm", "k_norm", "norm") if not isinstance(getattr(attn, n, nn.Identity()), nn.Identity)]
        if getattr(attn, "gate", None) is not None:
            extras.append("gate")
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            extras.append("mlp.norm")
        if extras:
            raise UnsupportedModelError(f"block {i}: attention/MLP options {extras} are not supported by the "
                                        "Torch-Pruning peer")
        H, hd = attn.num_heads, attn.head_dim
        if (attn.qkv.in_features != D or attn.qkv.out_features != 3 * H * hd or attn.proj.in_features != H * hd
                or attn.proj.out_features != D or mlp.fc1.in_features != D or mlp.fc2.out_features != D
                or mlp.fc2.in_features != mlp.fc1.out_features):
            raise UnsupportedModelError(f"block {i}: qkv/proj/fc1/fc2 shapes do not match embed_dim {D}, "
                                        f"{H} heads of width {hd}")


def _effective_scale(attn: nn.Module) -> float:
    """The softmax scale the dense attention actually uses (the fused kernel ignores ``attn.scale``)."""
    return attn.head_dim ** -0.5 if getattr(attn, "fused_attn", False) else float(attn.scale)


def _ignored_layers(model: nn.Module) -> list[nn.Module]:
    layers = [model.patch_embed]
    for name in ("head", "head_dist"):
        if isinstance(getattr(model, name, None), nn.Module):
            layers.append(getattr(model, name))
    for blk in model.blocks:
        layers += [blk.attn.proj, blk.mlp.fc2]
    return layers


def _unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Parameters outside Linear/Conv/LayerNorm (tokens, pos_embed, LayerScale gammas), all on the residual
    width, given to TP explicitly with its own default dim (the last non-singleton one)."""
    out = []
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            continue
        for p in mod.parameters(recurse=False):
            dims = [i for i, s in enumerate(p.shape) if s > 1]
            if dims:
                out.append((p, dims[-1]))
    return out


def _widths(model: nn.Module) -> tuple[list[int], list[int]]:
    return [b.attn.head_dim for b in model.blocks], [b.mlp.fc1.out_features for b in model.blocks]


def _gradients(model: nn.Module, batches, loss_fn: Callable) -> dict[str, torch.Tensor]:
    """Summed gradients of ``loss_fn(model(x), y)`` over ``batches``, on the dense model (eval mode)."""
    model.eval()
    for p in model.parameters():  # ``model`` is the caller's private copy: frozen weights get gradients too
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    n = 0
    with torch.enable_grad():
        for x, y in batches:
            loss = loss_fn(model(x), y)
            loss.backward()
            n += 1
    if n == 0:
        raise ValueError("importance='taylor' needs at least one labelled batch (x, y) in batches")
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    for i, blk in enumerate(model.blocks):
        for lin, nm in ((blk.attn.qkv, "attn.qkv"), (blk.attn.proj, "attn.proj"), (blk.mlp.fc1, "mlp.fc1"),
                        (blk.mlp.fc2, "mlp.fc2")):
            if lin.weight.grad is None:
                raise ValueError(f"loss_fn gave no gradient to blocks.{i}.{nm}.weight: the loss must depend on every block")
    model.zero_grad(set_to_none=True)
    return grads


class _Overpruned(Exception):
    """TP's ratio would remove every unit of a group (TP then skips that group silently)."""


# ---------------------------------------------------------------------------------------------
# One TP prune
# ---------------------------------------------------------------------------------------------
def _prune_once(tp, base: nn.Module, grads: dict | None, ratio: float, *, importance: str, example_inputs,
                round_to: int | None, global_pruning: bool, scale: str):
    """Prune a fresh copy of ``base`` at TP ``ratio``; returns (model, kept indices), or raises _Overpruned."""
    model = copy.deepcopy(base).eval()
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)  # TP traces the graph through autograd
    if grads is not None:
        for name, p in model.named_parameters():
            if name in grads:
                p.grad = grads[name].clone()
    blocks = list(model.blocks)
    before = [(b.attn.num_heads, b.attn.head_dim, b.mlp.fc1.out_features, _effective_scale(b.attn)) for b in blocks]
    roots = {}
    for i, b in enumerate(blocks):
        roots[b.attn.proj] = ("attn", i)
        roots[b.mlp.fc1] = ("mlp", i)
    qkv_of = {b.attn.proj: b.attn.qkv for b in blocks}

    imp = tp.importance.MagnitudeImportance(p=2) if importance == "magnitude" else tp.importance.TaylorImportance()
    Pruner = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
    with torch.enable_grad():  # also when called under torch.no_grad()
        pruner = Pruner(
            model, example_inputs, importance=imp, pruning_ratio=ratio, global_pruning=global_pruning,
            ignored_layers=_ignored_layers(model), round_to=round_to,
            num_heads={b.attn.qkv: b.attn.num_heads for b in blocks}, prune_num_heads=False, prune_head_dims=True,
            head_pruning_ratio=0.0, unwrapped_parameters=_unwrapped_parameters(model),
        )
    removed = {}
    for group in pruner.step(interactive=True):
        dep, idxs = group[0]
        root = dep.target.module
        if root not in roots:
            raise RuntimeError(f"Torch-Pruning proposed a group rooted at {pruner.DG._module2name.get(root, root)}, "
                               "which is not an attention proj input or an MLP fc1 output; refusing to prune it")
        kind, i = roots[root]
        idxs = sorted(set(int(j) for j in idxs))
        if not idxs:  # global ranking yields groups with nothing below the threshold
            continue
        if kind == "attn":
            H, hd = before[i][0], before[i][1]
            dims = [sorted(j - h * hd for j in idxs if h * hd <= j < (h + 1) * hd) for h in range(H)]
            if any(d != dims[0] for d in dims) or len(dims[0]) * H != len(idxs):
                raise RuntimeError(f"block {i}: Torch-Pruning removed different head dims in different heads: {dims}")
            want = sorted(s * H * hd + h * hd + d for s in range(3) for h in range(H) for d in dims[0])
            got = [sorted(set(int(j) for j in ix)) for dp, ix in group
                   if dp.target.module is qkv_of[root] and pruner.DG.is_out_channel_pruning_fn(dp.handler)]
            if got != [want]:
                raise RuntimeError(f"block {i}: Torch-Pruning's qkv rows do not match the head dims {dims[0]} in q, k and v")
            removed[("attn", i)] = dims[0]
        else:
            removed[("mlp", i)] = idxs
        group.prune()

    D = model.embed_dim
    kept = {"head_dims": [], "mlp": []}
    for i, b in enumerate(blocks):
        a, H, hd0, hidden0, s0 = b.attn, *before[i]
        hd = a.qkv.out_features // (3 * H)
        if (a.qkv.out_features != 3 * H * hd or a.proj.in_features != H * hd or a.qkv.in_features != D
                or a.proj.out_features != D or b.mlp.fc1.in_features != D or b.mlp.fc2.out_features != D
                or b.mlp.fc2.in_features != b.mlp.fc1.out_features or a.num_heads != H):
            raise RuntimeError(f"block {i}: unexpected shapes after Torch-Pruning (qkv {tuple(a.qkv.weight.shape)}, "
                               f"proj {tuple(a.proj.weight.shape)}, fc1 {tuple(b.mlp.fc1.weight.shape)})")
        a.head_dim = hd
        if hasattr(a, "attn_dim"):
            a.attn_dim = H * hd
        if hd != hd0 and scale == "original":
            c = s0 * math.sqrt(hd)  # fused kernel uses 1/sqrt(hd); c/sqrt(hd) = original scale
            with torch.no_grad():
                a.qkv.weight[: H * hd].mul_(c)
                if a.qkv.bias is not None:
                    a.qkv.bias[: H * hd].mul_(c)
        if hd != hd0:
            a.scale = hd ** -0.5
        gone_d = set(removed.get(("attn", i), []))
        gone_m = set(removed.get(("mlp", i), []))
        kept["head_dims"].append([d for d in range(hd0) if d not in gone_d])
        kept["mlp"].append([j for j in range(hidden0) if j not in gone_m])
        if len(kept["head_dims"][-1]) != hd or len(kept["mlp"][-1]) != b.mlp.fc1.out_features:
            raise RuntimeError(f"block {i}: kept indices do not match the pruned widths")
    _check_targets(model, before, ratio, global_pruning)
    model.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable.get(name, True))
    return model, kept


def _check_targets(model: nn.Module, before: list, ratio: float, global_pruning: bool) -> None:
    """Raise _Overpruned where TP kept more than its own target: TP silently skips a group whose pruning
    would remove every unit (``DependencyGraph.check_pruning_group``), leaving that block dense."""
    hds, hiddens = _widths(model)
    if global_pruning:
        total = sum(hd0 + n0 for _, hd0, n0, _ in before)
        cap = int(total * (1 - ratio))  # TP's own expression for the number of units kept
        if sum(hds) + sum(hiddens) > cap:
            raise _Overpruned(f"TP kept {sum(hds) + sum(hiddens)} units for a target of {cap}: a group that would "
                              "have lost every unit was left unpruned")
        return
    for i, (_, hd0, n0, _) in enumerate(before):
        for what, kept, n in (("head dims", hds[i], hd0), ("MLP neurons", hiddens[i], n0)):
            if kept > int(n * (1 - ratio)):
                raise _Overpruned(f"block {i} keeps {kept} of {n} {what}, over TP's target {int(n * (1 - ratio))}: "
                                  "TP left the group unpruned because the ratio would remove every unit")


def _ratio_grid(base: nn.Module, global_pruning: bool) -> list[float]:
    """TP ratios, one inside each interval where TP's integer kept counts are constant, ascending.

    TP keeps ``int(n * (1 - r))`` of a scope of ``n`` units (n = d_h or the MLP width per block when
    local; the sum of all when global), so its result only changes at ``r = 1 - k / n``; bisecting
    over midpoints between those breakpoints finds the exact boundary with few tries.
    """
    hds, hiddens = _widths(base)
    sizes = {sum(hds) + sum(hiddens)} if global_pruning else set(hds) | set(hiddens)
    top = 1.0 - 1.0 / min(sizes)  # beyond it a scope keeps nothing
    brk = sorted({1.0 - k / n for n in sizes for k in range(n + 1)} | {0.0})
    grid = [0.0] + [(a + b) / 2 for a, b in zip(brk, brk[1:]) if b <= top + 1e-12 and b - a > 1e-12]
    return grid


def _importance_detail(importance: str, n_batches: int) -> str:
    common = ("over every layer of the coupled group (qkv rows of q, k and v + proj columns; fc1 rows + fc2 columns), "
              "mean over the layers, averaged over the heads for a head dim, divided by the mean over the group")
    if importance == "magnitude":
        return f"TP MagnitudeImportance(p=2): sum of squared weights {common}"
    return (f"TP TaylorImportance: sum of |w * dL/dw| {common}; gradients summed over {n_batches} batches on the "
            "dense model in eval mode")


# ---------------------------------------------------------------------------------------------
# The peer
# ---------------------------------------------------------------------------------------------
def tp_prune(model: nn.Module, *, importance: str, example_inputs: torch.Tensor, macs: int | None = None,
             fraction: float | None = None, batches: Iterable | None = None, loss_fn: Callable | None = None,
             round_to: int | None = None, global_pruning: bool = False, scale: str = "original") -> tuple[nn.Module, dict]:
    """Prune a copy of a timm ViT one-shot with Torch-Pruning; returns (pruned plain timm model, info).

    Budget: exactly one of ``macs`` (target MACs per sample, as ``sppbench.core.measure.macs(model,
    example_inputs)`` counts them: the largest pruned model at or under it, found by bisection over TP's
    pruning ratio, each try a one-shot prune of a fresh copy) or ``fraction`` (kept fraction of the
    prunable units: TP's pruning ratio is ``1 - fraction``).

    ``importance``: "magnitude" (TP MagnitudeImportance: squared L2 over the whole coupled group, mean
    over its layers, mean-normalised) or "taylor" (TP TaylorImportance |w * dL/dw|; needs ``batches``,
    a list of (x, y), and ``loss_fn(model(x), y)``; gradients are summed over the batches on the dense
    model in eval mode, once, and reused by every try). ``round_to``, ``global_pruning``: TP's options.
    ``scale``: "original" (default; see the module docstring) or "pruned".

    info: peer, version, importance (+ importance_detail), units (how TP's units differ from sppbench's),
    pruning_ratio, target_macs / fraction, macs / params (measured on the returned model), dense_macs /
    dense_params, head_dim / mlp_hidden / num_heads per block, kept (per block: the kept within-head dims,
    the same in q, k and v of every head, and the kept MLP neurons, as indices into the dense model),
    tries (every prune tried: ratio, valid, macs, params, widths, seconds), seconds (wall time of the
    whole call, bisection and gradients included), round_to, global_pruning, ranking, scale, scale_note.
    """
    t0 = time.perf_counter()
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose one of {IMPORTANCES}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    if (macs is None) == (fraction is None):
        raise BudgetError("give exactly one budget: macs (target MACs per sample) or fraction (kept fraction of units)")
    if fraction is not None and not (0.0 < float(fraction) <= 1.0):
        raise BudgetError(f"fraction must be in (0, 1], got {fraction}")
    if macs is not None and (isinstance(macs, bool) or int(macs) != macs or macs <= 0):
        raise BudgetError(f"macs must be a positive integer (MACs per sample), got {macs!r}")
    if round_to is not None and (int(round_to) != round_to or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
    if not isinstance(example_inputs, torch.Tensor):
        raise TypeError("example_inputs must be a tensor batch of images (B, C, H, W)")
    batches = list(batches) if batches is not None else None
    if importance == "taylor" and (not batches or loss_fn is None):
        raise ValueError("importance='taylor' needs batches (a list of labelled (x, y) batches) and loss_fn(logits, y) "
                         "to accumulate gradients on the dense model")
    tp = _import_tp()
    _check_model(model)

    was_training = model.training
    base = copy.deepcopy(model).eval()
    grads = _gradients(base, batches, loss_fn) if importance == "taylor" else None
    dense_macs = measure.macs(base, example_inputs)
    opts = dict(importance=importance, example_inputs=example_inputs, round_to=round_to,
                global_pruning=global_pruning, scale=scale)
    tries: list[dict] = []
    best: dict = {}

    def attempt(ratio: float) -> dict:
        s = time.perf_counter()
        rec = {"ratio": ratio}
        try:
            pruned, kept = _prune_once(tp, base, grads, ratio, **opts)
        except _Overpruned as exc:
            rec.update(valid=False, why=f"over-pruned ({exc})", seconds=time.perf_counter() - s)
            tries.append(rec)
            return rec
        hds, hiddens = _widths(pruned)
        rec.update(valid=True, macs=measure.macs(pruned, example_inputs), params=measure.params(pruned),
                   head_dim=hds, mlp_hidden=hiddens, seconds=time.perf_counter() - s)
        tries.append(rec)
        feasible = macs is None or rec["macs"] <= macs
        if feasible and (not best or rec["macs"] > best["rec"]["macs"]):
            best.update(rec=rec, model=pruned, kept=kept)
        return rec

    if fraction is not None:
        rec = attempt(1.0 - float(fraction))
        if not rec["valid"]:
            raise BudgetError(f"fraction={fraction} makes Torch-Pruning remove every unit of a group ({rec['why']}); "
                              "use a larger fraction")
    elif dense_macs <= macs:
        attempt(0.0)
    else:
        grid = _ratio_grid(base, global_pruning)
        top = len(grid) - 1
        rec = attempt(grid[top])
        if not rec["valid"]:  # global ranking / round_to: find the most pruned valid ratio
            lo, hi = 0, top
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if attempt(grid[mid])["valid"]:
                    lo = mid
                else:
                    hi = mid
            top = lo
            rec = next(t for t in reversed(tries) if t["ratio"] == grid[top]) if top else {"macs": dense_macs}
        if rec["macs"] > macs:
            raise BudgetError(f"target {macs} MACs is below what Torch-Pruning reaches with these units: the smallest "
                              f"reachable is {rec['macs']} MACs per sample (dense {dense_macs}) at pruning ratio "
                              f"{grid[top]:.4f}; raise the target")
        lo, hi = 0, top  # grid[lo]: over the target (dense); grid[hi]: at or under it
        while hi - lo > 1:
            mid = (lo + hi) // 2
            r = attempt(grid[mid])
            if r["valid"] and r["macs"] > macs:
                lo = mid
            else:
                hi = mid
    if not best:  # pragma: no cover - defensive
        raise BudgetError("no Torch-Pruning try met the budget")

    rec, pruned = best["rec"], best["model"]
    pruned.train(was_training)
    info = {
        "peer": "torch-pruning",
        "version": _tp_version(tp),
        "importance": importance,
        "importance_detail": _importance_detail(importance, len(batches or ())),
        "units": dict(UNITS),
        "pruning_ratio": rec["ratio"],
        "target_macs": int(macs) if macs is not None else None,
        "fraction": float(fraction) if fraction is not None else None,
        "macs": rec["macs"],
        "params": rec["params"],
        "dense_macs": dense_macs,
        "dense_params": measure.params(base),
        "head_dim": rec["head_dim"],
        "mlp_hidden": rec["mlp_hidden"],
        "num_heads": [b.attn.num_heads for b in pruned.blocks],
        "kept": best["kept"],
        "tries": tries,
        "seconds": time.perf_counter() - t0,
        "round_to": round_to,
        "global_pruning": global_pruning,
        "ranking": "global (one threshold over every group)" if global_pruning else
                   "local (each block keeps int(n * (1 - ratio)) of its n head dims and of its n MLP neurons)",
        "scale": scale,
        "scale_note": ("original softmax scale head_dim**-0.5 of the dense model: sqrt(d_h'/d_h) folded into the q rows "
                       "of qkv, attn.scale = d_h'**-0.5, so timm's fused and plain paths both match the dense model "
                       "with the pruned rows zeroed" if scale == "original" else
                       "pruned width's scale d_h'**-0.5 (timm's fused kernel default after pruning); weights untouched"),
    }
    return pruned, info
