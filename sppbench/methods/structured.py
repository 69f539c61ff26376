"""Every way of choosing what to prune, behind one interface, on the same masks.

A method turns a MaskedModel, training batches and a list of budgets into one pruned model per
budget. Most methods produce a *ranking* of the mask entries (a ``SolutionPath``), from which every
budget is read off exactly as for SPP; Lasso instead runs once per budget; the Torch-Pruning peers
prune their own (slightly different) units.

=================  ===========  ==============================================================
name               kind         what ranks the entries
=================  ===========  ==============================================================
spp                one search   entry step on the SLBI path (paper form, docs/method.md section 3)
spp-official       one search   the support count of the released update (counted every 10th step)
lasso              per budget   the support of an L1-penalised mask search (ISTA), lambda by a
                                recorded bisection per budget (or tries shared by all budgets,
                                ``lasso_family``; the tables use it), trimmed to the budget by |M|
lasso-rank         one search   |M| after one Lasso search (ablation: Lasso used as a ranking)
dessilbi           one search   entry step of SLBI on the WEIGHTS with group shrinkage over the
                                same structural units (docs/method.md section 7)
magnitude          no search    RMS of the weights each entry controls
random             no search    a random order; read per layer (the same share of every group)
tp-magnitude       peer         Torch-Pruning, L2 magnitude, one shot per budget
tp-taylor          peer         Torch-Pruning, first-order Taylor, one shot per budget
=================  ===========  ==============================================================

Budgets are dicts with exactly one of ``fraction``, ``params`` or ``macs`` (per sample). In a
dual encoder (CLIP) a budget is joint (both towers, MACs of one image plus one caption), or for one
tower (``{"macs": 2e9, "tower": "image"}``; the other tower stays dense), or one per tower
(``{"towers": {"image": {"macs": 2e9}, "text": {"fraction": 0.5}}}``, ranking methods only).
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..core.batches import BatchCycle, forward_loss, to_device
from ..core.compress import compress
from ..core.dynamics import DessiLBI, ProximalL1, official_held_v, official_lr_for_entry
from ..core.masks import MaskedModel
from ..core.path import KeepSet, SolutionPath
from ..core.search import search
from ..errors import BudgetError, SearchDivergedError, SppBenchError
from . import peers
from .registry import Method, get, names, register

# The method lists (RANKING_METHODS, PER_BUDGET_METHODS, PEER_METHODS, METHODS, DETERMINISTIC_METHODS, TUNING_KNOBS)
# are read off the registry at the end of this module (sppbench.methods.registry): one entry per method.

# Defaults that are not the tuned SPP constants (those come from sppbench/configs/search_<profile>.json).
DEFAULTS = {
    # the released code hard-codes kappa = 1 and lambda = 3; on the stand-ins its Adam lr is chosen here so that a
    # mask held at 1 enters the support half-way through the search on the released cosine schedule
    # (dynamics.official_lr_for_entry: 1.73 * lam / steps at 160 steps, 2.21 at 640)
    "spp-official": {"kappa": 1.0, "lam": 3.0, "alpha": "held mask enters half-way"},
    # ISTA step on the loss = SPP's loss step (kappa*alpha); lambda in units of u = lr*lam*steps
    # (u = 1: a mask the loss does not hold up reaches 0 exactly at the end of the search)
    "lasso": {"lr": "kappa*alpha of spp", "u_start": 2.0, "trials": 5},
    "lasso-rank": {"lr": "kappa*alpha of spp", "u": 2.0},
    # SGD lr on the weights, coupling nu, kappa; lam 'auto' = a unit that keeps its initial RMS
    # enters at mid-search: lam = (alpha/nu) * (steps/2) * median unit RMS
    "dessilbi": {"alpha": 1e-3, "nu": 100.0, "kappa": 1.0, "lam": "auto"},
    "random": {"readout": "per-layer"},
}
# The released DeiT-S scripts' constants of the official form (kappa 1, lambda 3, mask Adam lr 1e-3): spp-official's
# default on real models (paper profiles, timm:<name>). A mask held at 1 gains sum_t s_t in V (s_t = lr_t / (1 -
# beta1^t), lr_t on the cosine schedule), so at lr 1e-3 it enters only after about 3,000 steps: the released search
# ran 300 ImageNet epochs (over a million steps). The embedded stand-ins' few hundred steps use the lr at which a held
# mask enters half-way instead (DEFAULTS above).
RELEASED_OFFICIAL = {"kappa": 1.0, "lam": 3.0, "alpha": 1e-3}


def official_constants(model: str, steps: int) -> dict:
    """spp-official's constants for ``model`` at ``steps``: the released ones on real models, the step-scaled rule
    on the embedded stand-ins; with ``note`` saying when a mask held at 1 cannot enter within the search."""
    if model.startswith("embedded"):
        lam = DEFAULTS["spp-official"]["lam"]
        return {"kappa": DEFAULTS["spp-official"]["kappa"], "lam": lam, "alpha": official_lr_for_entry(lam, steps),
                "source": "released kappa and lambda; lr such that a mask held at 1 enters half-way on the released "
                          "cosine schedule"}
    out = {**RELEASED_OFFICIAL, "source": "the released DeiT-S scripts (kappa 1, lambda 3, mask Adam lr 1e-3)"}
    held = official_held_v(out["alpha"], steps)
    if held < out["lam"]:
        out["note"] = (f"in {steps} steps at lr {out['alpha']:g} (cosine schedule) a mask held at 1 reaches V = "
                       f"{held:.3g} < lambda {out['lam']:g}: only masks the loss pushes above 1 can enter, so "
                       f"spp-official's path is nearly empty (the released search ran over a million steps)")
    return out


# The forms of the SPP search behind a table's 'spp' rows (docs/path_health.md). "paper": the paper's update with
# the profile's constants. "adam": a labelled research variant, the paper form's coupling, V and Gamma with an Adam
# M step (sppbench.core.dynamics), the only form found whose path passes the health limits on the embedded stand-ins
# within a CPU budget. Its constants are written free of the step count N:
#   travel      lr * N: how far (in mask units) Adam's step can move a mask over the search;
#   held_entry  the share of the search after which a mask the loss holds at 1 enters: kappa*alpha/nu = theta /
#               (held_entry * N), theta = kappa*lam;
#   nu, kappa, lam as in the paper form; steps: the search length the setting was chosen at (and is used at).
# They were chosen per stand-in by the path-health limits of the search on its own training batches
# (tools/path_probes.py adam; never validation or test images): "default" on the embedded ViT (160 steps; also
# used, unchanged, for the CLIP stand-in), "embedded-swin" on the Swin, where the ViT's travel leaves a third of the
# masks at zero before they enter (docs/path_health.md). Any other model gets "default".
ADAM_FORMS = {
    "default": {"travel": 4.8, "held_entry": 0.375, "nu": 2000.0, "kappa": 10.0, "lam": 0.09, "steps": 160},
    "embedded-swin": {"travel": 1.6, "held_entry": 0.375, "nu": 2000.0, "kappa": 10.0, "lam": 0.09, "steps": 640},
}
SPP_FORMS = ("paper", "adam")


def adam_setting(model: str) -> dict:
    """The adam form's step-free setting for ``model`` (``ADAM_FORMS``; "default" for models without one)."""
    return dict(ADAM_FORMS.get(model, ADAM_FORMS["default"]))


def adam_constants(model: str, steps: int | None = None) -> dict:
    """The adam form's search constants (variant, kappa, alpha, nu, lam, lr) for ``model`` at ``steps`` (default:
    the steps its setting was chosen at): lr = travel / steps, kappa*alpha/nu = kappa*lam / (held_entry * steps)."""
    s = adam_setting(model)
    n = s["steps"] if steps is None else steps
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"steps must be a positive integer, got {n!r}")

    def clean(x: float) -> float:  # 12 significant digits: 3.0, not 2.9999999999999996
        return float(f"{x:.12g}")

    alpha = s["lam"] * s["nu"] / (s["held_entry"] * n)  # kappa*alpha/nu = kappa*lam / (held_entry * n)
    return {"variant": "adam", "kappa": s["kappa"], "alpha": clean(alpha), "nu": s["nu"], "lam": s["lam"],
            "lr": clean(s["travel"] / n)}


ADAM_FORM = adam_constants("embedded-vit")  # the ViT's, at 160 steps: kappa 10, alpha 3, nu 2000, lam 0.09, lr 0.03


def spp_search_constants(form: str, paper: dict, model: str = "", steps: int | None = None) -> dict:
    """The constants of the 'spp' search in ``form``: the paper form's ``paper`` (kappa, alpha, nu, lam) as
    given, or the adam form's for ``model`` at ``steps`` (``adam_constants``, with ``variant`` and ``lr``). The
    baselines whose step follows SPP's (Lasso's lr = kappa*alpha) always take the paper-form constants."""
    if form not in SPP_FORMS:
        raise SppBenchError(f"unknown SPP form {form!r}; use one of {SPP_FORMS} (docs/path_health.md)")
    return adam_constants(model, steps) if form == "adam" else {k: paper[k] for k in ("kappa", "alpha", "nu", "lam")}


@dataclass
class Pruned:
    """One method's pruned model for one budget."""

    method: str
    budget: dict
    model: nn.Module
    keep: KeepSet | None
    seconds: float              # wall time spent choosing THIS budget's model (a shared search counts once
                                # in ``search_seconds``; this is then the read-out + compression only)
    search_seconds: float       # the search that served this budget (shared by every budget of a path)
    readout: str | None
    info: dict = field(default_factory=dict)


def check_budget(budget: dict) -> tuple[str, float]:
    """(kind, value) of a budget dict; a per-tower budget ``{"towers": {...}}`` gives ('towers', nan) after
    checking each tower's own budget."""
    if isinstance(budget, dict) and set(budget) == {"towers"}:
        towers = budget["towers"]
        if not isinstance(towers, dict) or not towers:
            raise BudgetError(f"'towers' maps tower names to budgets, e.g. {{'image': {{'fraction': 0.5}}}}; "
                              f"got {towers!r}")
        for t, b in towers.items():
            if not isinstance(b, dict) or "tower" in b:
                raise BudgetError(f"tower {t!r}: give a budget dict like {{'macs': 2e9}}, got {b!r}")
            check_budget(b)
        return "towers", math.nan
    if isinstance(budget, dict) and "tower" in budget:
        if not isinstance(budget["tower"], str):
            raise BudgetError(f"tower must be a tower name such as 'image' or 'text', got {budget['tower']!r}")
        budget = {k: v for k, v in budget.items() if k != "tower"}
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in ("fraction", "params", "macs"):
        raise BudgetError(f"a budget is a dict with exactly one of fraction / params / macs (and optionally "
                          f"a tower), got {budget!r}")
    (kind, value), = budget.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BudgetError(f"budget {kind} must be a finite number, got {value!r}")
    if kind == "fraction" and not 0 < value <= 1:
        raise BudgetError(f"fraction must be in (0, 1], got {value}")
    return kind, value


def peer_reason(method: str) -> str | None:
    """Why a peer method cannot run here (None if it can; always None for sppbench's own methods)."""
    if method not in PEER_METHODS:
        return None

    return peers.available().get(method, f"unknown peer {method!r}")


def check_method(name: str) -> str:
    """``name`` if it is a registered structured method, else an SppBenchError listing them."""
    get(name, "structured")
    return name


# ---------------------------------------------------------------------------------------------
# Mask searches other than SPP
# ---------------------------------------------------------------------------------------------
def _frozen_loop(m: MaskedModel, batches: Iterable, loss_fn: Callable, opt, trained: list, steps: int, seed: int,
                 what: str) -> list[float]:
    """Train only ``trained`` (masks for Lasso, unit weights for DessiLBI) with ``opt``, everything else frozen,
    in eval mode from masks at 1; requires_grad flags, grads and the train/eval mode are restored after."""
    torch.manual_seed(seed)
    everything = list(m.parameters())
    saved = [p.requires_grad for p in everything]
    ids = {id(p) for p in trained}
    was = m.training
    device = trained[0].device
    data = BatchCycle(batches)
    losses = []
    m.reset_masks()
    try:
        for p in everything:
            p.requires_grad_(id(p) in ids)
        m.eval()
        for step in range(1, steps + 1):
            loss = forward_loss(m, to_device(next(data), device), loss_fn)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SearchDivergedError(f"{what}: the loss is {value} at step {step}; lower its step size", step=step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(value)
    finally:
        for p, rg in zip(everything, saved):
            p.requires_grad_(rg)
            p.grad = None
        m.train(was)
    return losses


def lasso_search(m: MaskedModel, batches: Iterable, loss_fn: Callable, *, steps: int, lr: float, lam: float,
                 seed: int = 0) -> SolutionPath:
    """One Lasso (ISTA) search on the masks; the path ranks entries by score.

    score = |M| for entries left non-zero; for entries at zero, last_nonzero/steps - 1 in [-1, 0)
    (zeroed later ranks higher). ``path.info['support']`` = the non-zero widths per group.
    """
    masks = m.mask_parameters()
    opt = ProximalL1(list(masks.values()), lr=lr, lam=lam)
    t0 = time.perf_counter()
    try:
        losses = _frozen_loop(m, batches, loss_fn, opt, list(masks.values()), steps, seed, "Lasso search")
        final = {n: p.detach().float().cpu().clone() for n, p in masks.items()}
        last = {n: opt.state_of(p)["last_nonzero"].cpu() for n, p in masks.items()}
    finally:
        m.reset_masks()
    score = {n: torch.where(final[n] != 0, final[n].abs().double(), last[n].double() / steps - 1) for n in masks}
    widths = {n: int((final[n] != 0).sum()) for n in masks}
    zeros = {n: torch.zeros(final[n].shape) for n in masks}
    cfg = {"method": "lasso", "lr": lr, "lam": lam, "u": lr * lam * steps, "steps": steps, "seed": seed,
           "seconds": round(time.perf_counter() - t0, 3), "loss_first": losses[0], "loss_last": losses[-1]}
    neg = {n: torch.full(final[n].shape, -1, dtype=torch.long) for n in masks}
    info = {**m.info, "support": widths, "support_cost": list(m.cost_model.cost(widths))}
    return SolutionPath(m.groups, neg, zeros, final, m.cost_model, cfg, [], None, info, score=score)


def dessilbi_search(m: MaskedModel, batches: Iterable, loss_fn: Callable, *, steps: int, alpha: float, nu: float,
                    kappa: float, lam: float | str = "auto", seed: int = 0) -> SolutionPath:
    """DessiLBI on the weights of every structural unit; the weights are restored afterwards.

    The ranking is the unit's entry step (ties: larger ||V||/sqrt(n), then larger final RMS weight).
    Only the unit weights (qkv, proj, fc1, fc2) are trained; norms, embeddings and head stay frozen.
    """
    units = m.family.unit_slices(m)
    params = list({id(s.param): s.param for sl in units.values() for s in sl}.values())
    backup = [p.detach().clone() for p in params]
    rms0 = torch.cat([torch.cat([s.gather().detach() for s in sl], 1).pow(2).mean(1).sqrt() for sl in units.values()])
    if lam == "auto":
        lam = float((alpha / nu) * (steps / 2) * rms0.median())
    opt = DessiLBI(units, kappa=kappa, alpha=alpha, nu=nu, lam=float(lam))
    t0 = time.perf_counter()
    try:
        losses = _frozen_loop(m, batches, loss_fn, opt, params, steps, seed, "DessiLBI")
        drift = float(sum((p.detach() - b).pow(2).sum() for p, b in zip(params, backup)).sqrt()
                      / sum(b.pow(2).sum() for b in backup).sqrt())
        V = {n: (opt.V[n].norm(dim=1) / math.sqrt(opt.width[n])).float().cpu() for n in units}
        M = {n: torch.cat([s.gather().detach() for s in sl], 1).pow(2).mean(1).sqrt().float().cpu()
             for n, sl in units.items()}
        entry = {n: opt.entry_step[n].clone() for n in units}
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
    cfg = {"method": "dessilbi", "kappa": kappa, "alpha": alpha, "nu": nu, "lam": lam, "steps": steps, "seed": seed,
           "seconds": round(time.perf_counter() - t0, 3), "loss_first": losses[0], "loss_last": losses[-1],
           "weights": "trained during the search, restored afterwards: only the ranking is used, so every method "
                      "prunes the same dense weights",
           "relative_weight_drift": drift, "shrink_threshold": "lam * sqrt(unit size)"}
    sup = {n: torch.where(e > 0, steps - e + 1, torch.zeros_like(e)) for n, e in entry.items()}
    history = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]  # the loss per step, for its path health
    return SolutionPath(m.groups, entry, V, M, m.cost_model, cfg, history, sup, m.info)


def magnitude_path(m: MaskedModel) -> SolutionPath:
    """Rank entries by the RMS of the weights they control (``Family.unit_slices``)."""
    units = m.family.unit_slices(m)
    with torch.no_grad():
        score = {n: torch.cat([s.gather() for s in sl], 1).pow(2).mean(1).sqrt().double().cpu()
                 for n, sl in units.items()}
    return _score_path(m, score, {"method": "magnitude", "score": "RMS of the unit's weights"})


def random_path(m: MaskedModel, seed: int) -> SolutionPath:
    g = torch.Generator().manual_seed(seed)
    score = {grp.name: torch.rand(grp.size, generator=g, dtype=torch.float64) for grp in m.groups}
    return _score_path(m, score, {"method": "random", "seed": seed})


def _score_path(m: MaskedModel, score: dict, cfg: dict) -> SolutionPath:
    neg = {g.name: torch.full((g.size,), -1, dtype=torch.long) for g in m.groups}
    zeros = {g.name: torch.zeros(g.size) for g in m.groups}
    return SolutionPath(m.groups, neg, zeros, zeros, m.cost_model, {**cfg, "seconds": 0.0}, [], None, m.info,
                        score=score)


# ---------------------------------------------------------------------------------------------
# Lasso to a budget: bisection on lambda
# ---------------------------------------------------------------------------------------------
def _budget_value(keep_or_cost: tuple[int, int], kind: str) -> int:
    return keep_or_cost[0] if kind == "params" else keep_or_cost[1]


def _support_cost(path: SolutionPath, kind: str, tower: str | None) -> float:
    """What a Lasso search's support costs in the budget's unit (kept fraction, params or MACs; one tower or all)."""
    widths = path.info["support"]
    if kind == "fraction":
        groups = [g for g in path.groups if tower is None or g.tower == tower]
        return sum(widths[g.name] for g in groups) / sum(g.size for g in groups)
    return _budget_value(path.cost_model.cost(widths, part=tower), kind)


def lasso_to_budget(m: MaskedModel, batches: Iterable, loss_fn: Callable, budget: dict, *, steps: int, lr: float,
                    u_start: float = 2.0, trials: int = 5, seed: int = 0) -> tuple[KeepSet, dict]:
    """Lasso searches with lambda = u / (lr * steps), u bracketed (x2 / /2) then bisected geometrically,
    until the support's cost brackets the budget; the run whose support is the smallest one still at or
    above the budget is trimmed to it by its |M| ranking (or, if every run is below, the largest is filled
    by the order in which its entries were zeroed). Every try is recorded."""
    kind, value = check_budget(budget)
    if kind == "towers":
        raise BudgetError("Lasso searches once per budget: give it a joint budget or one tower's "
                          "({'macs': ..., 'tower': 'image'}), not a 'towers' budget")
    tower = budget.get("tower")

    tries, paths = [], []

    def run(u: float) -> float:
        p = lasso_search(m, batches, loss_fn, steps=steps, lr=lr, lam=u / (lr * steps), seed=seed)
        c = _support_cost(p, kind, tower)
        tries.append({"u": u, "lam": p.config["lam"], "support_cost": c, "seconds": p.config["seconds"]})
        paths.append(p)
        return c

    lo = hi = None  # u giving cost >= budget (lo) and < budget (hi)
    u = u_start
    for _ in range(trials):
        if lo is not None and hi is not None:
            u = math.sqrt(lo * hi)
        c = run(u)
        if c >= value:
            lo = u
            if hi is None:
                u *= 2
        else:
            hi = u
            if lo is None:
                u /= 2
    above = [(c["support_cost"], i) for i, c in enumerate(tries) if c["support_cost"] >= value]
    i = min(above)[1] if above else max((c["support_cost"], i) for i, c in enumerate(tries))[1]
    keep = paths[i].keep(**{kind: value}, readout="global", tower=tower)
    info = {"tries": tries, "chosen_try": i, "steps": steps, "lr": lr,
            "search_seconds": round(sum(t["seconds"] for t in tries), 3),
            "trimmed": "support trimmed to the budget by |M|" if above else
                       "every try was below the budget: support filled by the order entries were zeroed"}
    return keep, info


def lasso_family(m: MaskedModel, batches: Iterable, loss_fn: Callable, budgets: Sequence[dict], *, steps: int,
                 lr: float, u_start: float = 2.0, trials: int = 6, seed: int = 0) -> list[tuple[KeepSet | None, dict]]:
    """Lasso searches shared by several budgets of one kind (and tower): ``trials`` searches in all, each
    informing every budget (Lasso's support shrinks as lambda grows, so one try brackets several budgets).

    Lambda = u / (lr * steps). The tries first double / halve u until every budget has a try at or above it and
    one below it, then bisect (geometric mean of u) the bracket of the budget whose best try overshoots it most.
    Each budget takes the try with the smallest support still at or above it, trimmed to the budget by |M|.
    A budget no try brackets gets ``(None, info)`` with ``info["refused"]`` saying why and what to change (it
    is not silently filled from another method's order). Every try is recorded."""
    if trials < 2:
        raise ValueError(f"a shared Lasso search needs at least 2 tries to bracket a budget, got {trials}")
    kinds = {(check_budget(b)[0], b.get("tower")) for b in budgets}
    if len(kinds) != 1 or next(iter(kinds))[0] == "towers":
        raise BudgetError("shared Lasso tries need budgets of one kind and tower (not 'towers' budgets); "
                          f"got {list(budgets)!r}")
    kind, tower = next(iter(kinds))
    values = [check_budget(b)[1] for b in budgets]
    tries, paths = [], []

    def run(u: float) -> None:
        p = lasso_search(m, batches, loss_fn, steps=steps, lr=lr, lam=u / (lr * steps), seed=seed)
        tries.append({"u": u, "lam": p.config["lam"], "support_cost": _support_cost(p, kind, tower),
                      "seconds": p.config["seconds"]})
        paths.append(p)

    def bracket(v: float):
        above = [t for t in tries if t["support_cost"] >= v]
        below = [t for t in tries if t["support_cost"] < v]
        return (min(above, key=lambda t: t["support_cost"]) if above else None,
                max(below, key=lambda t: t["support_cost"]) if below else None)

    def u_bracket(v: float) -> tuple[float, float]:  # the largest u still at or above v, the smallest u below it
        return (max(t["u"] for t in tries if t["support_cost"] >= v),
                min(t["u"] for t in tries if t["support_cost"] < v))

    run(u_start)
    while len(tries) < trials:
        us = [t["u"] for t in tries]
        pairs = [bracket(v) for v in values]
        if any(b is None for _, b in pairs):      # a budget every try stays above: shrink harder
            u = max(us) * 2
        elif any(a is None for a, _ in pairs):    # a budget every try is below: shrink less
            u = min(us) / 2
        else:                                     # bisect where the chosen try overshoots its budget most
            order = sorted(range(len(values)), key=lambda k: -pairs[k][0]["support_cost"] / values[k])
            cands = [math.sqrt(a * b) for a, b in (u_bracket(values[k]) for k in order)]
            fresh = [c for c in cands if all(abs(c - x) > 1e-9 * x for x in us)]
            if not fresh:  # every bracket is as tight as lambda can resolve
                break
            u = fresh[0]
        run(u)
    out = []
    for b, v in zip(budgets, values):
        above, below = bracket(v)
        info = {"tries": tries, "shared_by_budgets": len(budgets), "steps": steps, "lr": lr,
                "search_seconds": round(sum(t["seconds"] for t in tries), 3)}
        if above is None or below is None:
            side = "above" if above is None else "below"
            info["refused"] = (f"Lasso: none of the {len(tries)} tries (u {min(t['u'] for t in tries):.3g} .. "
                               f"{max(t['u'] for t in tries):.3g}) left a support {side} the budget {kind}={v:g}, "
                               f"so it cannot be bracketed; raise the tries or change u_start")
            out.append((None, info))
            continue
        i = tries.index(above)
        info.update({"chosen_try": i, "bracket_u": [above["u"], below["u"]],
                     "bracket_cost": [above["support_cost"], below["support_cost"]],
                     "overshoot": above["support_cost"] / v - 1,
                     "trimmed": "support trimmed to the budget by |M|"})
        out.append((paths[i].keep(**{kind: v}, readout="global", tower=tower), info))
    return out


def _rank_spp(m, batches, loss_fn, *, steps, seed, spp, settings):
    # spp may name another form: {"variant": "adam", "lr": ...} (docs/path_health.md)
    return search(m, batches, loss_fn, steps=steps, seed=seed, variant=spp.get("variant", "paper"),
                  lr=spp.get("lr"), **{k: spp[k] for k in ("kappa", "alpha", "nu", "lam")})


def _rank_official(m, batches, loss_fn, *, steps, seed, spp, settings):
    kappa, lam = settings.get("kappa", 1.0), settings.get("lam", 3.0)
    alpha = settings.get("alpha", official_lr_for_entry(lam, steps))
    return search(m, batches, loss_fn, steps=steps, seed=seed, variant="official", kappa=kappa, alpha=alpha,
                  nu=1.0, lam=lam)


def _rank_lasso(m, batches, loss_fn, *, steps, seed, spp, settings):
    lr = settings.get("lr", spp["kappa"] * spp["alpha"])
    return lasso_search(m, batches, loss_fn, steps=steps, lr=lr, lam=settings.get("u", 2.0) / (lr * steps), seed=seed)


def _rank_dessilbi(m, batches, loss_fn, *, steps, seed, spp, settings):
    d = {**DEFAULTS["dessilbi"], **settings}
    return dessilbi_search(m, batches, loss_fn, steps=steps, alpha=d["alpha"], nu=d["nu"], kappa=d["kappa"],
                           lam=d["lam"], seed=seed)


def _rank_magnitude(m, batches, loss_fn, *, steps, seed, spp, settings):
    return magnitude_path(m)


def _rank_random(m, batches, loss_fn, *, steps, seed, spp, settings):
    return random_path(m, seed)


def _prune_lasso(m, budgets, *, batches, loss_fn, steps, spp, seed, settings, example_inputs=None) -> list[Pruned]:
    s, out = settings, []
    lr = s.get("lr", spp["kappa"] * spp["alpha"])
    if s.get("shared_tries"):  # one set of tries for every budget (lasso_family); refused budgets are skipped
        for b, (keep, info) in zip(budgets, lasso_family(m, batches, loss_fn, budgets, steps=steps, lr=lr,
                                                        u_start=s.get("u_start", 2.0), trials=s.get("trials", 6),
                                                        seed=seed)):
            t = time.perf_counter()
            small = compress(m, keep) if keep is not None else None
            out.append(Pruned("lasso", dict(b), small, keep, time.perf_counter() - t, info["search_seconds"],
                              "support", {"search": info}))
        return out
    for b in budgets:
        t = time.perf_counter()
        keep, info = lasso_to_budget(m, batches, loss_fn, b, steps=steps, lr=lr, u_start=s.get("u_start", 2.0),
                                     trials=s.get("trials", 5), seed=seed)
        small = compress(m, keep)
        out.append(Pruned("lasso", dict(b), small, keep, time.perf_counter() - t, info["search_seconds"],
                          "support", {"search": info}))
    return out


def _prune_peer(method: str, m, budgets, *, batches, loss_fn, steps, spp, seed, settings,
                example_inputs=None) -> list[Pruned]:
    """Torch-Pruning one shot per budget, on a dense copy."""

    s, out = settings, []
    reason = peer_reason(method)
    if reason:
        raise SppBenchError(f"{method} is not available: {reason}")
    if example_inputs is None:
        raise ValueError(f"{method} needs example_inputs to measure MACs")
    dense = copy.deepcopy(m).detach_masks()
    calib = None
    if method == "tp-taylor":
        calib = [b for _, b in zip(range(int(s.get("taylor_batches", 4))), iter(batches))]
    for b in budgets:
        kind, value = check_budget(b)
        if kind == "towers" or "tower" in b:
            raise BudgetError(f"{method} prunes single-tower timm ViTs only; it takes no tower budgets")
        if kind == "params":
            raise BudgetError("the Torch-Pruning peers take a macs or fraction budget, not params")
        t = time.perf_counter()
        model, info = peers.tp_prune(dense, importance=method.split("-", 1)[1], example_inputs=example_inputs,
                                     **{kind: value}, batches=calib, loss_fn=loss_fn,
                                     round_to=s.get("round_to"), global_pruning=s.get("global_pruning", False))
        secs = time.perf_counter() - t
        out.append(Pruned(method, dict(b), model, None, secs, secs, None, {"peer": info}))
    return out


# ---------------------------------------------------------------------------------------------
# The one interface
# ---------------------------------------------------------------------------------------------
def ranking(method: str, m: MaskedModel, batches: Iterable, loss_fn: Callable, *, steps: int, seed: int = 0,
            spp: dict, settings: dict | None = None) -> SolutionPath:
    """The solution path / ranking of a ranking method. ``spp``: the SPP constants (kappa, alpha, nu, lam)."""
    meth = get(method, "structured")
    if meth.kind != "ranking":
        raise SppBenchError(f"{method} is not a ranking method; use prune()")
    return meth.rank(m, batches, loss_fn, steps=steps, seed=seed, spp=spp, settings=dict(settings or {}))


def prune(method: str, m: MaskedModel, budgets: Sequence[dict], *, batches: Iterable, loss_fn: Callable, steps: int,
          spp: dict, seed: int = 0, readout: str = "global", settings: dict | None = None,
          example_inputs: torch.Tensor | None = None, path: SolutionPath | None = None) -> list[Pruned]:
    """One pruned (compressed) model per budget, chosen by ``method`` on the masks of ``m``.

    Ranking methods search once (or reuse ``path``) and read every budget off it with ``readout``
    ('random' always reads per layer); Lasso searches per budget; peers prune a copy of the dense
    model (``example_inputs`` needed to measure MACs). ``m`` keeps its masks at 1.
    """
    meth = get(method, "structured")
    for b in budgets:
        check_budget(b)
    s = dict(settings or {})
    if meth.kind != "ranking":
        return meth.prune(m, budgets, batches=batches, loss_fn=loss_fn, steps=steps, spp=spp, seed=seed, settings=s,
                          example_inputs=example_inputs)
    out: list[Pruned] = []
    if path is None:
        path = ranking(method, m, batches, loss_fn, steps=steps, seed=seed, spp=spp, settings=s)
    ro = meth.readout or readout
    for b in budgets:
        t = time.perf_counter()
        keep = path.keep_towers(b["towers"], readout=ro) if "towers" in b else path.keep(**b, readout=ro)
        small = compress(m, keep)
        out.append(Pruned(method, dict(b), small, keep, time.perf_counter() - t, path.config.get("seconds", 0.0),
                          ro, {"search": path.config}))
    return out


def spread(keep: KeepSet, groups) -> dict:
    """How unevenly a keep-set spreads over layers: per pool, the coefficient of variation of the
    kept share across blocks, the min / max share, and the number of blocks left with nothing."""
    out = {}
    for pool in ("attn", "mlp"):
        layers: dict[tuple[str, int], list[int]] = {}
        for g in groups:
            if g.pool != pool:
                continue
            k = int(keep.masks[g.name].sum())
            acc = layers.setdefault((g.tower, g.layer), [0, 0])
            acc[0] += k
            acc[1] += g.size
        shares = torch.tensor([k / n for k, n in layers.values()], dtype=torch.float64)
        if len(shares) == 0:
            continue
        mean = float(shares.mean())
        out[pool] = {"cv": float(shares.std(unbiased=False) / mean) if mean > 0 else 0.0,
                     "min": float(shares.min()), "max": float(shares.max()),
                     "empty_blocks": int((shares == 0).sum())}
    return out


# ---------------------------------------------------------------------------------------------
# The registry entries (the order is the tables' column order within each kind)
# ---------------------------------------------------------------------------------------------
for _m in (
    Method("spp", "structured", "ranking", "SPP: the SLBI solution path of the masks (paper or adam form)",
           tuning_knob="lr", rank=_rank_spp),
    Method("spp-official", "structured", "ranking", "SPP as in the released DeiT code (its 'official' update)",
           tuning_knob="alpha", defaults=DEFAULTS["spp-official"], rank=_rank_official),
    Method("lasso", "structured", "per-budget", "Lasso on the masks, lambda bisected to each budget",
           tuning_knob="lr", defaults=DEFAULTS["lasso"], prune=_prune_lasso),
    Method("lasso-rank", "structured", "ranking", "one Lasso run, entries ordered by |mask| then by when they hit 0",
           tuning_knob="lr", defaults=DEFAULTS["lasso-rank"], rank=_rank_lasso),
    Method("dessilbi", "structured", "ranking", "DessiLBI (Fu et al. 2020) on unit weights, ordered by entry step",
           tuning_knob="alpha", defaults=DEFAULTS["dessilbi"], rank=_rank_dessilbi),
    Method("magnitude", "structured", "ranking", "RMS of each unit's weights", seeded=False, rank=_rank_magnitude),
    Method("random", "structured", "ranking", "a seeded random order, read per layer", defaults=DEFAULTS["random"],
           readout="per-layer", rank=_rank_random),
    Method("tp-magnitude", "structured", "peer", "Torch-Pruning, magnitude importance, one shot", seeded=False,
           prune=functools.partial(_prune_peer, "tp-magnitude")),
    Method("tp-taylor", "structured", "peer", "Torch-Pruning, Taylor importance, one shot",
           prune=functools.partial(_prune_peer, "tp-taylor")),
):
    register(_m)

RANKING_METHODS = names("structured", "ranking")
PER_BUDGET_METHODS = names("structured", "per-budget")
PEER_METHODS = names("structured", "peer")
METHODS = RANKING_METHODS + PER_BUDGET_METHODS + PEER_METHODS
# methods whose result does not depend on a seed (no batches drawn, no random order): run once per table
DETERMINISTIC_METHODS = tuple(n for n in METHODS if not get(n).seeded)
# The one knob each searching method is tuned by (sppbench.studies.tuning): its step size. Every method gets the same
# grid of factors around its default, scored by the same rule on the validation split.
TUNING_KNOBS = {n: get(n).tuning_knob for n in names("structured") if get(n).tuning_knob}
