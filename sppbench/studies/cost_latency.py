"""Study 70 (notebook 70): the cost of a budget family (one SPP search vs per-budget Lasso) and compressed latency."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import methods
from ..core import measure
from ..core.compress import compress
from ..core.search import search
from ..families import attach_masks
from ..tasks.data import preprocess
from ..tasks.embedded import dinov2_vits14
from .common import check_fractions, check_types, search_defaults, write_record
from .vision_table import spp_for, study_task


# ---------------------------------------------------------------------------------------------
# 70: cost and latency
# ---------------------------------------------------------------------------------------------
@dataclass
class CostLatencyConfig:
    """(a) a 5-budget family: SPP's one search vs Lasso's per-budget searches, same steps; (b) one search step vs
    one plain step; (c) latency of compressed models vs their MACs at several batch sizes (CPU, and GPU if any)."""

    model: str = "embedded-vit"
    family_fractions: tuple[float, ...] = (0.9, 0.7, 0.5, 0.35, 0.25)
    steps: int = 20
    batch_size: int = 32
    lasso_trials: int = 3
    step_repeats: int = 5
    latency_fractions: tuple[float, ...] = (0.75, 0.5, 0.25)
    latency_batches: tuple[int, ...] = (1, 8, 32)
    latency_repeats: int = 10
    round_to: tuple[int, ...] = (1, 8)  # SPP read-outs with widths rounded to these multiples (1 = as read off)
    peers: tuple[str, ...] = ("tp-magnitude",)
    gpu: bool = True                 # also measure on the GPU when one is present
    study: str = "cost_latency"

    def resolved(self) -> "CostLatencyConfig":
        check_types(self)
        check_fractions("family_fractions", self.family_fractions)
        check_fractions("latency_fractions", self.latency_fractions)
        if not self.round_to or not all(isinstance(r, int) and r > 0 for r in self.round_to):
            raise ValueError(f"round_to must be positive integers (1 = no rounding), got {self.round_to!r}")
        if not self.latency_batches or not all(isinstance(b, int) and b > 0 for b in self.latency_batches):
            raise ValueError(f"latency_batches must be positive integers, got {self.latency_batches!r}")
        for p in self.peers:
            if p not in methods.PEER_METHODS:
                raise ValueError(f"unknown peer {p!r}; use {methods.PEER_METHODS}")
        return self


def latency_rows(name: str, models: list, x_one, dense_macs: int, batches, repeats, device: str) -> list[dict]:
    """Per batch size, every model timed in interleaved rounds (measure.interleaved_latency), so drifts of a
    shared machine hit every model alike; speedup and MACs reduction against the dense model of the list."""
    rows = []
    for b in batches:
        x = x_one.repeat(b, 1, 1, 1).to(device)
        lat = measure.interleaved_latency({i: mod for i, (_, _, _, mod, _, _) in enumerate(models)}, x, repeats, warmup=2)
        d = lat[0]  # the dense model comes first
        for i, (method, frac, round_to, _, macs, params) in enumerate(models):
            red = dense_macs / macs
            rows.append({"model": name, "method": method, "macs_fraction_target": frac, "round_to": round_to,
                         "macs": macs, "macs_fraction": macs / dense_macs, "params": params, "batch_size": b,
                         "device": device, "latency_ms": 1000 * lat[i], "dense_latency_ms": 1000 * d,
                         "speedup": d / lat[i], "macs_reduction": red, "speedup_over_macs_reduction": (d / lat[i]) / red})
    return rows


def family_cost_of(m, batches, family: list, *, steps: int, batch_size: int, spp: dict, lasso_trials: int):
    """One SPP search for the whole budget ``family`` vs Lasso's per-budget searches (``lasso_trials`` runs per
    budget), same steps and batches. Returns (SPP's path, the timings and ratios)."""
    path = methods.ranking("spp", m, batches, F.cross_entropy, steps=steps, seed=0, spp=spp)
    t_spp = path.config["seconds"]
    lasso = methods.prune("lasso", m, family, batches=batches, loss_fn=F.cross_entropy, steps=steps, spp=spp,
                          seed=0, settings={"trials": lasso_trials})
    tries = [t["seconds"] for p in lasso for t in p.info["search"]["tries"]]
    per_run, t_lasso = statistics.fmean(tries), sum(tries)
    return path, {
        "budgets": len(family), "steps": steps, "batch_size": batch_size, "spp_search_s": t_spp,
        "lasso_runs": len(tries), "lasso_search_s_per_run": per_run, "lasso_search_s_total": t_lasso,
        "ratio_final_runs_only": t_spp / (len(family) * per_run), "ratio_with_bisection": t_spp / t_lasso,
        "note": f"SPP: one {steps}-step search read at {len(family)} budgets; Lasso: one {steps}-step search per "
                f"lambda try, {lasso_trials} tries per budget (the bisection finding each budget's lambda); "
                "ratio_final_runs_only counts one Lasso run per budget"}


def latency_models(m, path, dense_model, x2, fractions, round_to, peers, *, batches, steps: int, spp: dict,
                   log=print) -> list:
    """(method, MACs target, round_to, model, measured MACs, params) for the dense model, SPP's read-outs at
    each fraction (as read off, and rounded to each ``round_to``) and each peer at the same MACs."""
    dense = m.dense_cost()[1]
    built = [("dense", 1.0, 1, dense_model)]
    for f in fractions:
        for r in round_to:
            keep = path.keep(macs=int(f * dense), round_to=r)
            built.append(("spp" if r == 1 else f"spp round_to={r}", f, r, compress(m, keep)))
    for peer in peers:
        if methods.peer_reason(peer):
            log(f"{peer} skipped: {methods.peer_reason(peer)}")
            continue
        got = methods.prune(peer, m, [{"macs": int(f * dense)} for f in fractions], batches=batches,
                            loss_fn=F.cross_entropy, steps=steps, spp=spp, example_inputs=x2)
        built += [(peer, f, 1, p.model) for f, p in zip(fractions, got)]
    # MACs measured on every model with the same counter (SPP's equal its cost model's exactly)
    return [(meth, f, r, mod.eval(), measure.macs(mod, x2), measure.params(mod)) for meth, f, r, mod in built]


def run_cost_latency(cfg: CostLatencyConfig | None = None, *, record: bool = True, progress: bool = True,
                     task=None) -> dict:
    """Returns {"latency": DataFrame, "family_cost": dict, "search_step": dict, "record", "info"}."""
    import copy

    import pandas as pd


    cfg = cfg or CostLatencyConfig()
    cfg.resolved()
    t0 = time.perf_counter()

    def log(msg):
        if progress:
            print(f"[cost {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    task = task or study_task(cfg.model, 10, 10, 10)
    spp = spp_for(cfg.model)
    dense_model = copy.deepcopy(task.dense)  # attach_masks wraps task.dense in place: time a clean copy
    m = task.attach()
    dense = m.dense_cost()[1]
    x_one = preprocess(torch.zeros(1, 28, 28, dtype=torch.uint8), task.img_size)
    family = [{"macs": int(f * dense)} for f in cfg.family_fractions]
    rows = []
    try:
        # (a) one SPP search for the whole family vs Lasso's per-budget searches, same steps and batches
        batches = task.train_batches(cfg.batch_size, cfg.steps, 0)
        path, fam = family_cost_of(m, batches, family, steps=cfg.steps, batch_size=cfg.batch_size, spp=spp,
                                   lasso_trials=cfg.lasso_trials)
        log(f"family cost: SPP {fam['spp_search_s']:.1f}s vs Lasso {fam['lasso_search_s_per_run']:.1f}s per run -> "
            f"ratio {fam['ratio_final_runs_only']:.3f} ({fam['ratio_with_bisection']:.3f} with the bisection)")
        # (c) latency vs MACs
        devices = ["cpu"] + (["cuda"] if cfg.gpu and torch.cuda.is_available() else [])
        models = latency_models(m, path, dense_model, x_one.repeat(2, 1, 1, 1), cfg.latency_fractions, cfg.round_to,
                                cfg.peers, batches=batches, steps=cfg.steps, spp=spp, log=log)
        for device in devices:
            on = [(meth, f, r, copy.deepcopy(mod).to(device), macs, params) for meth, f, r, mod, macs, params in models]
            rows += latency_rows(task.name, on, x_one, dense, cfg.latency_batches, cfg.latency_repeats, device)
            del on
            log(f"latency measured on {device}")
    finally:
        m.detach_masks()
    # (b) one search step vs one plain forward+backward step of the same frozen model
    step = search_step(batch_size=cfg.batch_size, repeats=cfg.step_repeats, img_size=task.img_size,
                       model=copy.deepcopy(task.dense))
    step["settings"]["model"] = task.label
    log(f"search step / plain step: {step['ratio']:.3f}")
    table = pd.DataFrame(rows)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {"label": task.label, "dense_macs": dense, "family_cost": fam, "search_step": step, "gpu": gpu,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "latency": f"median of {cfg.latency_repeats} interleaved forwards per model after 2 warm-ups, inference mode",
            "seconds": round(time.perf_counter() - t0, 1)}
    folder = write_record(cfg.study, cfg, path, table, info) if record else None
    return {"latency": table, "family_cost": fam, "search_step": step, "record": folder, "info": info}


def _embedded_model(img_size: int):

    return dinov2_vits14(img_size, num_classes=10)


def search_step(batch_size: int = 32, steps: int = 5, repeats: int = 5, img_size: int = 56,
                threads: int | None = None, model=None) -> dict:
    """One SPP search step vs one plain forward+backward step of the same frozen model.

    plain: the unmasked model, weights frozen, gradient taken w.r.t. the input (so backward runs
    through every block, as the search's does); spp: ``sppbench.search`` itself (masked forward,
    backward to the masks, SLBI update, support bookkeeping). Blocks of ``steps`` steps of each are
    interleaved ``repeats`` times on the same batches; the ratio is of the median per-step times.
    A third figure, a step with trainable weights (weight gradients), is printed for context.
    """

    consts = search_defaults("embedded")["constants"]  # the cost of a step does not depend on them

    if threads:
        torch.set_num_threads(threads)
    label = "DINOv2 ViT-S/14 (embedded default)" if model is None else type(model).__name__
    model = model if model is not None else _embedded_model(img_size)
    model.eval()
    g = torch.Generator().manual_seed(0)
    classes = int(getattr(model, "num_classes", 10) or 10)
    data = [(torch.randn(batch_size, 3, img_size, img_size, generator=g),
             torch.randint(0, classes, (batch_size,), generator=g))
            for _ in range(steps)]

    def plain(train_weights: bool) -> float:
        for p in model.parameters():
            p.requires_grad_(train_weights)
        t0 = time.perf_counter()
        for x, y in data:
            x = x.clone().requires_grad_(not train_weights)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / steps

    m = None

    def spp() -> float:
        nonlocal m
        m = attach_masks(model, input_size=(3, img_size, img_size))
        t0 = time.perf_counter()
        search(m, data, F.cross_entropy, steps=steps, **consts)
        dt = (time.perf_counter() - t0) / steps
        m.detach_masks()
        return dt

    plain(False), spp()  # warm-up
    t_plain, t_spp, t_train = [], [], []
    for _ in range(repeats):
        t_plain.append(plain(False))
        t_spp.append(spp())
        t_train.append(plain(True))
    for p in model.parameters():
        p.requires_grad_(True)
    med = statistics.median
    return {
        "figure": "SPP search step / plain forward+backward step (frozen weights, grad w.r.t. input)",
        "ratio": med(t_spp) / med(t_plain),
        "spp_step_s": med(t_spp), "plain_step_s": med(t_plain), "trainable_weights_step_s": med(t_train),
        "ratio_vs_trainable_weights": med(t_spp) / med(t_train),
        "spread_spp_s": [min(t_spp), max(t_spp)], "spread_plain_s": [min(t_plain), max(t_plain)],
        "settings": {"model": label, "img_size": img_size,
                     "batch_size": batch_size, "steps_per_block": steps, "repeats": repeats,
                     "threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu"},
    }


# ---------------------------------------------------------------------------------------------
# Issue-8 figures: family cost, compressed latency vs MACs, LLM step cost
# ---------------------------------------------------------------------------------------------
