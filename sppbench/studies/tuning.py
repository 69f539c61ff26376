"""The same tuning budget for every searching method of the vision table, chosen on the validation split.

Rule (recorded in every tuning record): each searching method (``methods.TUNING_KNOBS``: spp, spp-official,
lasso, lasso-rank, dessilbi) is tuned by ONE knob, its step size, over the same grid of factors around its
default (``FACTORS``: x1/4, x1, x4). Each setting runs the method as the table runs it (its steps, batch,
budgets, read-out rule, Lasso's shared tries) with the first seed, and is scored by the head-refit top-1 on the
VALIDATION split averaged over the table's budgets (the test split is never read). The default is kept unless
a setting beats it beyond noise: each image's head-refit correctness averaged over the budgets, paired with the
default's on the same image, gives a 95% paired bootstrap interval of the score difference; only settings whose
interval lies above zero can win, and of those the highest score does. The table then runs with the chosen
settings (``VisionTableConfig.method_settings``) on the test split with all its seeds.

Methods with no knob searched here (magnitude, random, the Torch-Pruning peers) take no tuning budget; SPP's
adam-form setting itself (travel, held_entry, nu, lam) was chosen by the path-health limits on training batches
(docs/path_health.md), and is tuned here only by the same step-size factor as every other method.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from .. import methods
from ..errors import SppBenchError
from ..tasks.vision import get_task
from . import stats
from .common import write_record
from .vision_table import VisionTableConfig, run_vision_table, spp_constants

FACTORS = (0.25, 1.0, 4.0)
RULE_RESAMPLES = 2000  # paired bootstrap resamples behind each setting's interval against its default


def default_knobs(cfg: VisionTableConfig) -> dict:
    """Each searching method's knob and its default value for this table (``methods.TUNING_KNOBS``)."""
    cfg = cfg.resolved()
    spp = spp_constants(cfg)
    if spp is None:
        raise SppBenchError(f"tuning {cfg.model} needs its SPP constants (Lasso's step follows SPP's): pass all four "
                            "of kappa, alpha, nu, lam (e.g. the automatic ones a vision-table record holds under "
                            "info.spp_constants)")
    out = {"spp-official": methods.official_constants(cfg.model, cfg.steps)["alpha"],
           "lasso": spp["kappa"] * spp["alpha"], "lasso-rank": spp["kappa"] * spp["alpha"],
           "dessilbi": methods.DEFAULTS["dessilbi"]["alpha"]}
    if cfg.form == "adam":
        out["spp"] = methods.spp_search_constants("adam", spp, cfg.model, cfg.steps)["lr"]
    return {m: {methods.TUNING_KNOBS[m]: v} for m, v in out.items()}


def tune_vision(cfg: VisionTableConfig | None = None, *, factors=FACTORS, record: bool = True, progress: bool = True,
                task=None) -> dict:
    """Tune every searching method of ``cfg.methods`` by the rule above; returns {"table" (one row per method x
    setting), "chosen" (method -> settings, for ``VisionTableConfig.method_settings``), "record", "info"}."""
    import pandas as pd

    cfg = (cfg or VisionTableConfig()).resolved()
    if not factors or any(not (0 < f < float("inf")) for f in factors) or 1.0 not in factors:
        raise ValueError(f"factors must be positive, finite and include 1.0 (the default), got {factors!r}")
    t_start = time.perf_counter()
    defaults = default_knobs(cfg)
    tuned = [m for m in cfg.methods if m in defaults]
    if not tuned:
        raise ValueError(f"none of {cfg.methods} has a tuning knob; tunable: {sorted(defaults)}")
    if task is None:
        task = get_task(cfg.model, cfg.data_root, weights=cfg.weights or None, n_val=cfg.n_val, n_test=cfg.n_test,
                        n_refit=cfg.n_refit, **({"n_head": cfg.n_head, "split_seed": cfg.split_seed}
                                                if cfg.model.startswith("embedded") else {}))
    rows, health, n_val = [], {}, None
    per_image: dict = {}  # (method, factor) -> each validation image's head-refit correctness, mean over budgets
    arrays: dict = {}     # the per-image 0/1 arrays behind every score, kept in the record (val_correct.npz)
    for method in tuned:
        (knob, default), = defaults[method].items()
        for f in factors:
            value = float(f"{default * f:.12g}")
            sub = dataclasses.replace(cfg, methods=(method,), seeds=1, eval_split="val", resamples=100,
                                      method_settings={method: {knob: value}})
            res = run_vision_table(sub, record=False, progress=False, task=task)
            n_val = res["info"]["test_images"]  # the images the rows were scored on: the validation split here
            part = res["table"][res["table"]["method"] == method]
            per_budget = {float(b): float(v) for b, v in zip(part["budget_macs_fraction"], part["top1_head_refit"])}
            mine = {k: v for k, v in res["correct"].items() if k.split("|")[1] == method and k.endswith("|head_refit")}
            arrays.update({f"x{f:g}|{k}": v for k, v in mine.items()})
            if len(mine) == len(cfg.macs_fractions):
                per_image[(method, f)] = np.mean([v.astype(np.float64) for v in mine.values()], axis=0)
            row = {"model": task.name, "method": method, "knob": knob, "factor": f, "value": value,
                   "default": f == 1.0, "val_head_refit_mean": (sum(per_budget.values()) / len(per_budget)
                                                                if per_budget else float("nan")),
                   "budgets_scored": len(per_budget), "budgets_refused": len(res["info"]["refused"]),
                   **{f"val_head_refit@{b:g}": v for b, v in per_budget.items()},
                   "search_s": round(sum(res["info"]["search_seconds"].values()), 1)}
            h = res["path_health"] if "path_health" in res else {}
            hh = [v for k, v in (h or {}).items() if k.startswith(method)]
            if hh:
                row["path_healthy"] = all(x.get("healthy") is True for x in hh)
                row["path_max_step_share"] = max(x.get("max_step_share") or 0 for x in hh)
                health[f"{method}x{f:g}"] = hh[0]
            rows.append(row)
            if progress:
                print(f"[tune {time.perf_counter() - t_start:7.1f}s] {method} {knob}={value:.4g} (x{f:g}): val top-1 "
                      f"{row['val_head_refit_mean']:.4f} over {len(per_budget)} budgets", flush=True)
    for r in rows:  # each setting against its method's default, paired over validation images
        a, b = per_image.get((r["method"], r["factor"])), per_image.get((r["method"], 1.0))
        if a is not None and b is not None and r["factor"] != 1.0:
            c = stats.paired_bootstrap(a, b, resamples=RULE_RESAMPLES)
            r.update(vs_default_delta=c["delta"], vs_default_lo=c["lo"], vs_default_hi=c["hi"],
                     vs_default_verdict=stats.verdict(c["lo"], c["hi"]))
    table = pd.DataFrame(rows)
    chosen = choose(table, len(cfg.macs_fractions))
    table["chosen"] = [chosen.get(r["method"], {}).get(r["knob"]) == r["value"] for _, r in table.iterrows()]
    info = {"label": task.label, "rule": __doc__.split("\n\n")[1].replace("\n", " "), "factors": list(factors),
            "defaults": defaults, "chosen": chosen, "validation_images": n_val, "rule_resamples": RULE_RESAMPLES,
            "path_health": health, "seconds": round(time.perf_counter() - t_start, 1)}
    folder = write_record("vision_tuning", cfg, None, table, info, arrays={"val_correct.npz": arrays}) if record else None
    return {"table": table, "chosen": chosen, "record": folder, "info": info}


def choose(table, n_budgets: int) -> dict:
    """The rule's choice per method from a tuning table: the default unless a setting that scored every budget
    beats it beyond noise (``vs_default_verdict == "better"``); of several such, the highest score. A method whose
    default left a budget unscored takes the best setting that scored them all (there is nothing to keep)."""
    chosen = {}
    for method, part in table.groupby("method", sort=False):
        scored = part[part["budgets_scored"] == n_budgets]  # a setting that refuses a budget cannot win
        if not len(scored):
            continue
        base = scored[scored["default"]]
        if not len(base):
            best = scored.loc[scored["val_head_refit_mean"].idxmax()]
        else:
            verdicts = scored["vs_default_verdict"] if "vs_default_verdict" in scored else None
            better = scored[verdicts == "better"] if verdicts is not None else scored.iloc[:0]
            best = better.loc[better["val_head_refit_mean"].idxmax()] if len(better) else base.iloc[0]
        chosen[method] = {best["knob"]: float(best["value"])}
    return chosen
