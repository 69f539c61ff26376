"""Study 50 (notebook 50): how stable the keep-sets and orders are across seeds."""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import methods
from ..core.compress import compress
from ..errors import DataError
from .common import check_fractions, check_types, jaccard, kendall_tau, pairwise, write_record
from .records import list_records, load_record
from .vision_table import evaluate, flat_ranking, keep_key, rank_key, spp_for, study_task


# ---------------------------------------------------------------------------------------------
# 50: seed stability
# ---------------------------------------------------------------------------------------------
@dataclass
class SeedStudyConfig:
    """SPP (one search per seed) and Lasso (per-budget searches per seed) over data-order seeds."""

    model: str = "embedded-vit"
    methods: tuple[str, ...] = ("spp", "lasso")
    seeds: tuple[int, ...] = (0, 1, 2)
    macs_fractions: tuple[float, ...] = (0.7, 0.5, 0.35)
    steps: int = 40
    batch_size: int = 32
    lasso_trials: int = 3
    n_val: int = 200
    n_test: int = 1000
    n_refit: int = 1000
    study: str = "seed_stability"

    def resolved(self) -> "SeedStudyConfig":
        check_types(self)
        check_fractions("macs_fractions", self.macs_fractions)
        bad = [m for m in self.methods if m not in ("spp", "lasso")]
        if bad:
            raise ValueError(f"the seed study compares 'spp' and 'lasso', got {bad}")
        if len(set(self.seeds)) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seed stability needs at least 2 distinct seeds (no repeats), got {self.seeds!r}")
        return self


def run_seed_study(cfg: SeedStudyConfig | None = None, *, record: bool = True, progress: bool = True,
                   task=None) -> dict:
    """Returns {"table" (one row per method x seed x budget), "jaccard", "kendall" (DataFrames), "record"}.

    The seed sets the order of the training batches (and the search's torch seed). Kendall's tau compares the
    global rankings: SPP's path order; for Lasso, which has no ranking of its own, Lasso-rank (|M| of one
    Lasso run per seed at its default lambda), said so in the rows."""
    import pandas as pd

    cfg = cfg or SeedStudyConfig()
    cfg.resolved()
    t0 = time.perf_counter()
    task = task or study_task(cfg.model, cfg.n_val, cfg.n_test, cfg.n_refit)
    spp = spp_for(cfg.model)
    m = task.attach()
    dense = m.dense_cost()[1]
    budgets = [{"macs": int(f * dense)} for f in cfg.macs_fractions]
    rows, keeps, ranks, seconds = [], {}, {}, {}
    try:
        for method in cfg.methods:
            for seed in cfg.seeds:
                batches = task.train_batches(cfg.batch_size, cfg.steps, seed)
                t = time.perf_counter()
                if method == "spp":
                    path = methods.ranking("spp", m, batches, F.cross_entropy, steps=cfg.steps, seed=seed, spp=spp)
                    ranks[(method, seed)] = flat_ranking(path)
                    pruned = [(path.keep(**b), None) for b in budgets]
                else:
                    got = methods.prune("lasso", m, budgets, batches=batches, loss_fn=F.cross_entropy, steps=cfg.steps,
                                        spp=spp, seed=seed, settings={"trials": cfg.lasso_trials})
                    pruned = [(p.keep, p.model) for p in got]
                    lr = methods.ranking("lasso-rank", m, batches, F.cross_entropy, steps=cfg.steps, seed=seed, spp=spp)
                    ranks[(method, seed)] = flat_ranking(lr)
                seconds[(method, seed)] = time.perf_counter() - t
                for (keep, small), f in zip(pruned, cfg.macs_fractions):
                    keeps[(method, seed, f)] = keep
                    small = small if small is not None else compress(m, keep)
                    ev = evaluate(small, task, ("test",))
                    rows.append({"model": cfg.model, "method": method, "seed": seed, "budget_macs_fraction": f,
                                 "macs_fraction": keep.macs / dense, "top1_no_retrain": ev["test_no_retrain"],
                                 "top1_head_refit": ev["test_head_refit"]})
                if progress:
                    print(f"[seeds {time.perf_counter() - t0:6.1f}s] {method} seed {seed}: "
                          f"{seconds[(method, seed)]:.1f}s search", flush=True)
    finally:
        m.detach_masks()
    jac, ken = [], []
    for method in cfg.methods:
        for f in cfg.macs_fractions:
            vals = pairwise({s: keeps[(method, s, f)] for s in cfg.seeds}, jaccard)
            jac.append({"method": method, "budget_macs_fraction": f, "mean": statistics.fmean(vals), "min": min(vals),
                        "pairs": len(vals)})
        vals = pairwise({s: ranks[(method, s)] for s in cfg.seeds}, kendall_tau)
        ken.append({"method": method, "ranking": "path order" if method == "spp" else "lasso-rank (|M| of one run)",
                    "mean": statistics.fmean(vals), "min": min(vals), "pairs": len(vals)})
    table = pd.DataFrame(rows)
    info = {"label": task.label, "task": task.info, "spp_constants": spp, "dense_macs": dense, "jaccard": jac,
            "kendall": ken, "search_seconds": {f"{k[0]}@seed{k[1]}": round(v, 2) for k, v in seconds.items()},
            "seed_controls": "order of the training batches and the search's torch seed",
            "top1": "test split; head re-fit on the pruned features (L-BFGS) and the dense head (no retraining)",
            "seconds": round(time.perf_counter() - t0, 1)}
    folder = write_record(cfg.study, cfg, None, table, info) if record else None
    return {"table": table, "jaccard": pd.DataFrame(jac), "kendall": pd.DataFrame(ken), "record": folder,
            "info": info}


def seed_study_from_table(model: str = "embedded-swin", methods_: tuple[str, ...] = ("spp", "lasso"),
                          record_dir=None, *, record: bool = True, study: str = "seed_stability") -> dict:
    """Seed stability read from a vision-table record instead of searching again: the table's own searches
    (its settings, steps, tuned step sizes and read-out choice) at every seed and budget.

    ``record_dir``: a ``vision_table`` record folder (default: the newest one holding ``model`` and a
    ``keepsets.npz``). Per method and budget: the Jaccard of the keep-sets over seed pairs (``keepsets.npz``),
    top-1 per seed (the table's rows); per method the Kendall tau of the global orders over seed pairs
    (``rankings.npz``: SPP's path order; Lasso, which has no order of its own, is represented by lasso-rank
    when the table ran it). Returns what :func:`run_seed_study` returns."""
    import numpy as np
    import pandas as pd


    t0 = time.perf_counter()
    if record_dir is None:
        cands = [f for f in reversed(list_records("vision_table")) if (f / "keepsets.npz").is_file()
                 and any(r.get("model") == model for r in (load_record(f)["metrics"] or {}).get("rows", []))]
        if not cands:
            raise DataError(f"no vision_table record with {model!r} rows and keepsets.npz under the results folder; "
                            "run notebook 10 (or `nox -s reproduce`) first, or set source='search'")
        record_dir = cands[0]
    from pathlib import Path

    folder = Path(record_dir)
    for f in ("metrics.json", "keepsets.npz", "rankings.npz"):
        if not (folder / f).is_file():
            raise DataError(f"{folder} holds no {f}: not a vision_table record written with keep-sets; run notebook "
                            "10 again or set source='search'")
    rec = load_record(folder)
    rows_all = [r for r in rec["metrics"]["rows"] if r.get("model") == model]
    with np.load(folder / "keepsets.npz") as z:
        keepsets = {k: z[k].astype(bool) for k in z.files}
    with np.load(folder / "rankings.npz") as z:
        rankings = {k: z[k] for k in z.files}
    rows, jac, ken = [], [], []
    for method in methods_:
        mine = [r for r in rows_all if r["method"] == method]
        if not mine:
            raise DataError(f"the record {folder.name} has no {method!r} rows for {model!r}; its methods: "
                            f"{sorted({r['method'] for r in rows_all})}")
        seeds = sorted({int(r["seed"]) for r in mine})
        fractions = sorted({float(r["budget_macs_fraction"]) for r in mine}, reverse=True)
        if len(seeds) < 2:
            raise DataError(f"{method!r} ran one seed in {folder.name}: seed stability needs at least 2")
        for r in mine:
            rows.append({"model": model, "method": method, "seed": int(r["seed"]),
                         "budget_macs_fraction": float(r["budget_macs_fraction"]),
                         "macs_fraction": r["macs_fraction"], "top1_no_retrain": r["top1_no_retrain"],
                         "top1_head_refit": r["top1_head_refit"], "readout": r.get("readout")})
        for f in fractions:
            ks = {s: keepsets.get(keep_key(model, method, f, s)) for s in seeds}
            ks = {s: k for s, k in ks.items() if k is not None}
            if len(ks) < 2:
                continue
            # the read-out each seed's row used (chosen per budget on validation): two seeds that chose different
            # read-outs differ by the read-out as well as by the search, so the pairs of the same read-out are
            # reported apart
            ro = {int(r["seed"]): r.get("readout") for r in mine if float(r["budget_macs_fraction"]) == f}
            pairs = list(itertools.combinations(sorted(ks), 2))
            vals = [(int((ks[a] & ks[b]).sum()) / max(1, int((ks[a] | ks[b]).sum()))) for a, b in pairs]
            same = [v for (a, b), v in zip(pairs, vals) if ro.get(a) == ro.get(b)]
            jac.append({"method": method, "budget_macs_fraction": f, "mean": statistics.fmean(vals),
                        "min": min(vals), "pairs": len(vals),
                        "readouts": ", ".join(f"seed {k}: {ro.get(k)}" for k in sorted(ks)),
                        "same_readout_pairs": len(same),
                        "mean_same_readout": statistics.fmean(same) if same else None})
        ranker = method if method != "lasso" else "lasso-rank"
        rs = {s: rankings.get(rank_key(model, ranker, s)) for s in seeds}
        rs = {s: torch.as_tensor(r) for s, r in rs.items() if r is not None}
        if len(rs) >= 2:
            vals = pairwise(rs, kendall_tau)
            ken.append({"method": method, "ranking": "path order" if method != "lasso" else
                        "lasso-rank (|M| of one run)", "mean": statistics.fmean(vals), "min": min(vals),
                        "pairs": len(vals)})
    table = pd.DataFrame(rows)
    info = {"label": rec["metrics"]["info"].get("label"), "task": rec["metrics"]["info"].get("task"),
            "source": "vision_table", "source_run": folder.name,
            "source_note": "the vision table's own searches and read-outs (its steps, tuned step sizes, seeds and "
                           "budgets); nothing searched again here",
            "dense_macs": rec["metrics"]["info"].get("dense_macs"), "jaccard": jac, "kendall": ken,
            "search_seconds": {k: v for k, v in (rec["metrics"]["info"].get("search_seconds") or {}).items()
                               if k.split("@")[0] in methods_},
            "seed_controls": "order of the training batches and the search's torch seed",
            "readouts": "each row keeps the read-out the table chose for it on validation (per seed and budget); "
                        "jaccard.mean_same_readout averages only the seed pairs that chose the same read-out",
            "top1": "test split (the vision table's); head re-fit on the pruned features (L-BFGS) and the dense head "
                    "(no retraining)",
            "seconds": round(time.perf_counter() - t0, 1)}
    cfg = {"model": model, "methods": list(methods_), "source": "vision_table", "source_run": folder.name,
           "study": study}
    folder_out = write_record(study, cfg, None, table, info) if record else None
    return {"table": table, "jaccard": pd.DataFrame(jac), "kendall": pd.DataFrame(ken), "record": folder_out,
            "info": info}
