"""Benchmarks that print figures (never timed tests): ``python -m sppbench bench ...``."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def _embedded_model(img_size: int):
    from .embedded import dinov2_vits14

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
    from . import attach_masks, search
    from .experiments import search_defaults

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
def _settings(**kw) -> dict:
    import platform

    from .results import environment

    env = environment()
    return {**kw, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": env["cpu"],
            "cpu_count": env["cpu_count"], "python": platform.python_version()}


def family_cost(fractions=(0.9, 0.7, 0.5, 0.4, 0.3), steps: int = 30, batch_size: int = 32,
                lasso_trials: int = 1) -> dict:
    """Wall time of a budget family: SPP's one search (read at every budget) / Lasso's per-budget searches of
    the same steps and batches, on the embedded ViT. ``lasso_trials`` Lasso runs per budget (1 = one run at its
    calibrated lambda; more = the bisection that finds each budget's lambda)."""
    from .studies import _attach, _dense_macs, _spp, _task, family_cost_of

    task = _task("embedded-vit", 10, 10, 10)
    m = _attach(task.dense, task)
    try:
        dense = _dense_macs(m)
        _, fam = family_cost_of(m, task.train_batches(batch_size, steps, 0), [{"macs": int(f * dense)} for f in fractions],
                                steps=steps, batch_size=batch_size, spp=_spp("embedded-vit"), lasso_trials=lasso_trials)
    finally:
        m.detach_masks()
    fam.pop("note")
    return {"figure": f"{len(fractions)}-budget family: SPP one search / Lasso per-budget searches (same steps)",
            "ratio": fam.pop("ratio_with_bisection"), **fam,
            "settings": _settings(model=task.label, budgets=list(fractions), steps=steps, batch_size=batch_size,
                                  lasso_runs_per_budget=lasso_trials)}


def _interleaved_latency(models: dict, x: torch.Tensor, repeats: int, warmup: int = 3) -> dict:
    """Median forward time of each model, measured in rounds that visit every model once (rotating the order),
    so slow drifts of the machine hit every model alike."""
    names = list(models)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            for _ in range(warmup):
                models[n](x)
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                models[n](x)
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def latency(fractions=(0.75, 0.5, 0.25), batch_sizes=(1, 8, 32), round_to=(1, 8), repeats: int = 20,
            steps: int = 30, peers=("tp-magnitude",)) -> dict:
    """Compressed-model CPU latency vs MACs on the embedded ViT: speedup / MACs reduction of SPP read-outs (as read
    off and with widths rounded to multiples of ``round_to``) and of the peers at the same MACs, one run,
    interleaved timing (the same models and rows as notebook 70's part (c))."""
    import copy

    from . import methods
    from .studies import _attach, _dense_macs, _latency_rows, _spp, _task, latency_models

    task = _task("embedded-vit", 10, 10, 10)
    spp = _spp("embedded-vit")
    s = task.img_size
    dense_model = copy.deepcopy(task.dense).eval()  # attach_masks wraps task.dense in place
    m = _attach(task.dense, task)
    try:
        dense = _dense_macs(m)
        batches = task.train_batches(32, steps, 0)
        path = methods.ranking("spp", m, batches, F.cross_entropy, steps=steps, seed=0, spp=spp)
        models = latency_models(m, path, dense_model, torch.zeros(2, 3, s, s), fractions, round_to, peers,
                                batches=batches, steps=steps, spp=spp, log=lambda msg: None)
    finally:
        m.detach_masks()
    rows = _latency_rows(task.name, models, torch.zeros(1, 3, s, s), dense, batch_sizes, repeats, "cpu")
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
    from .llm import SPP_RIA_DEFAULTS, spp_path

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

    from . import llm, llm_data

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
