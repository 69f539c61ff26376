"""Benchmarks that print figures (never timed tests): ``python -m sppbench bench ...``."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .. import methods
from ..methods import llm
from ..methods.llm import SPP_RIA_DEFAULTS, spp_path
from ..tasks import llm_data
from .cost_latency import (
    family_cost_of,
    latency_models,
    latency_rows,
    search_step,  # noqa: F401  (the search-step benchmark lives with study 70; `bench.search_step` is its CLI name)
)
from .records import environment
from .vision_table import spp_for, study_task


def _settings(**kw) -> dict:
    import platform


    env = environment()
    return {**kw, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": env["cpu"],
            "cpu_count": env["cpu_count"], "python": platform.python_version()}


def family_cost(fractions=(0.9, 0.7, 0.5, 0.4, 0.3), steps: int = 30, batch_size: int = 32,
                lasso_trials: int = 1) -> dict:
    """Wall time of a budget family: SPP's one search (read at every budget) / Lasso's per-budget searches of
    the same steps and batches, on the embedded ViT. ``lasso_trials`` Lasso runs per budget (1 = one run at its
    calibrated lambda; more = the bisection that finds each budget's lambda)."""

    task = study_task("embedded-vit", 10, 10, 10)
    m = task.attach()
    try:
        dense = m.dense_cost()[1]
        _, fam = family_cost_of(m, task.train_batches(batch_size, steps, 0), [{"macs": int(f * dense)} for f in fractions],
                                steps=steps, batch_size=batch_size, spp=spp_for("embedded-vit"), lasso_trials=lasso_trials)
    finally:
        m.detach_masks()
    fam.pop("note")
    return {"figure": f"{len(fractions)}-budget family: SPP one search / Lasso per-budget searches (same steps)",
            "ratio": fam.pop("ratio_with_bisection"), **fam,
            "settings": _settings(model=task.label, budgets=list(fractions), steps=steps, batch_size=batch_size,
                                  lasso_runs_per_budget=lasso_trials)}


def latency(fractions=(0.75, 0.5, 0.25), batch_sizes=(1, 8, 32), round_to=(1, 8), repeats: int = 20,
            steps: int = 30, peers=("tp-magnitude",)) -> dict:
    """Compressed-model CPU latency vs MACs on the embedded ViT: speedup / MACs reduction of SPP read-outs (as read
    off and with widths rounded to multiples of ``round_to``) and of the peers at the same MACs, one run,
    interleaved timing (the same models and rows as notebook 70's part (c))."""
    import copy


    task = study_task("embedded-vit", 10, 10, 10)
    spp = spp_for("embedded-vit")
    s = task.img_size
    dense_model = copy.deepcopy(task.dense).eval()  # attach_masks wraps task.dense in place
    m = task.attach()
    try:
        dense = m.dense_cost()[1]
        batches = task.train_batches(32, steps, 0)
        path = methods.ranking("spp", m, batches, F.cross_entropy, steps=steps, seed=0, spp=spp)
        models = latency_models(m, path, dense_model, torch.zeros(2, 3, s, s), fractions, round_to, peers,
                                batches=batches, steps=steps, spp=spp, log=lambda msg: None)
    finally:
        m.detach_masks()
    rows = latency_rows(task.name, models, torch.zeros(1, 3, s, s), dense, batch_sizes, repeats, "cpu")
    keep = ("method", "macs_fraction_target", "macs_fraction", "batch_size", "latency_ms", "speedup", "macs_reduction",
            "speedup_over_macs_reduction")
    return {"figure": "compressed latency: speedup / MACs reduction (1.0 = speed follows MACs exactly)",
            "rows": [{k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keep} for r in rows],
            "settings": _settings(model=task.label, img_size=s, search_steps=steps, repeats=repeats,
                                  timing="median of interleaved single forwards after 2 warm-ups, inference mode",
                                  device="cpu")}


def llm_step(tokens=(256, 2048, 16384), in_features: int = 1536, out_features: int = 576, steps: int = 10) -> dict:
    """SPP-RIA's per-Linear cost vs the number of calibration tokens: building G = X X^T grows with the tokens, the
    SLBI steps on G do not (shape of SmolLM2's down_proj by default; random activations)."""

    g = torch.Generator().manual_seed(0)
    W = torch.randn(out_features, in_features, generator=g) * 0.02
    cfg = {k: SPP_RIA_DEFAULTS[k] for k in SPP_RIA_DEFAULTS}
    cfg["steps"] = steps
    rows = []
    for n in tokens:
        X = torch.randn(n, in_features, generator=g)
        t0 = time.perf_counter()
        G = X.T @ X
        t_gram = time.perf_counter() - t0
        spp_path(W, G, **{**cfg, "steps": 1})  # warm-up
        t0 = time.perf_counter()
        spp_path(W, G, **cfg)
        step_ms = 1000 * (time.perf_counter() - t0) / steps
        rows.append({"tokens": n, "gram_s": round(t_gram, 4), "slbi_step_ms": round(step_ms, 3)})
    return {"figure": "SPP-RIA: SLBI step cost per Linear vs calibration tokens (Gram form)", "rows": rows,
            "settings": _settings(shape=[out_features, in_features], steps=steps)}


def llm_time(n_samples: int = 32, seqlen: int = 256, sparsity: float = 0.5) -> dict:
    """Whole-model wall time of spp-ria vs ria on the embedded SmolLM2-135M at ``sparsity``, same calibration."""
    import copy


    model, tok = llm_data.smollm2()
    calib = llm_data.calibration_tokens(tok, n_samples=n_samples, seqlen=seqlen, seed=0)
    secs = {}
    for method in ("ria", "spp-ria"):
        mod = copy.deepcopy(model)
        secs[method] = llm.prune_llm(mod, method, sparsity, calib.ids).seconds
        del mod
    return {"figure": f"SmolLM2 at {sparsity:.0%}: spp-ria time / ria time", "ratio": secs["spp-ria"] / secs["ria"],
            "ria_s": secs["ria"], "spp_ria_s": secs["spp-ria"],
            "settings": _settings(model="SmolLM2-135M-Instruct (stand-in)", n_samples=n_samples, seqlen=seqlen,
                                  spp=llm.SPP_RIA_DEFAULTS)}
