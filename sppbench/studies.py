"""The studies behind notebooks 40-70: the solution path, seed stability, the kappa/lambda grid, cost and latency.

Each ``run_*`` takes a config dataclass (literals only, so papermill can set every field), runs on an
embedded vision model (a stand-in: labelled so in every record), writes one record per run under
``results/runs/<study>/`` and returns pandas tables plus the objects a notebook plots.
"""
from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import measure, methods
from .compress import compress
from .experiments import check_types, path_health, write_record
from .path import READOUTS, KeepSet, SolutionPath
from .vision import _attach, evaluate, flat_keep, flat_ranking, get_task, spp_constants, VisionTableConfig


# ---------------------------------------------------------------------------------------------
# Agreement measures
# ---------------------------------------------------------------------------------------------
def jaccard(a: KeepSet, b: KeepSet) -> float:
    """|A & B| / |A | B| over every (group, entry) pair; 1.0 for two empty sets."""
    x, y = flat_keep(a), flat_keep(b)
    union = int((x | y).sum())
    return 1.0 if union == 0 else int((x & y).sum()) / union


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's tau between two rankings of the same items without ties (tau-a = tau-b then), in O(n log n):
    1 - 2 * discordant pairs / all pairs, discordant pairs counted as inversions by a Fenwick tree."""
    a, b = torch.as_tensor(a).flatten(), torch.as_tensor(b).flatten()
    n = a.numel()
    if n != b.numel():
        raise ValueError(f"rankings of different lengths: {n} vs {b.numel()}")
    if n < 2:
        return 1.0
    if torch.unique(a).numel() != n or torch.unique(b).numel() != n:
        raise ValueError("kendall_tau takes rankings without ties")
    seq = torch.argsort(torch.argsort(b[torch.argsort(a)])).tolist()  # b's ranks in a's order, as 0..n-1
    tree = [0] * (n + 1)
    inversions = 0
    for seen, v in enumerate(seq):
        i, smaller = v + 1, 0  # count earlier values below v
        while i > 0:
            smaller += tree[i]
            i -= i & -i
        inversions += seen - smaller
        i = v + 1
        while i <= n:
            tree[i] += 1
            i += i & -i
    return 1.0 - 4.0 * inversions / (n * (n - 1))


def path_length(path: SolutionPath, macs: int) -> int | None:
    """First recorded step at which the support of Gamma (entered entries) costs at least ``macs`` MACs, i.e. the
    budget can be read off entered entries alone; None if the search ended before."""
    for rec in path.history:
        widths = {g.name: int(rec["support_group"].get(g.name, 0)) for g in path.groups}
        if path.cost_model.cost(widths)[1] >= macs:
            return int(rec["step"])
    return None


def check_model_steps(model_steps) -> None:
    """A per-model steps override must map model names to positive integers."""
    if not isinstance(model_steps, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for k, v in model_steps.items()):
        raise ValueError(f"model_steps maps model names to positive integer step counts, e.g. "
                         f"{{'embedded-swin': 640}}; got {model_steps!r}")


def _check_fractions(name: str, fractions) -> None:
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"{name} must be fractions in (0, 1], got {fractions!r}")


def _dense_macs(m) -> int:
    return m.cost_model.cost({g.name: g.size for g in m.groups})[1]


def _task(model: str, n_val: int, n_test: int, n_refit: int):
    return get_task(model, n_val=n_val, n_test=n_test, n_refit=n_refit)


def _spp(model: str) -> dict:
    return spp_constants(VisionTableConfig(model=model))


# ---------------------------------------------------------------------------------------------
# 40: the solution path
# ---------------------------------------------------------------------------------------------
# The adam form's constants live with the methods (sppbench.methods.ADAM_FORM, docs/path_health.md).
ADAM_FORM = methods.ADAM_FORM
FORMS = methods.SPP_FORMS


@dataclass
class PathStudyConfig:
    """One SPP search per model; support vs step, entry order, and nestedness of the read-outs.

    form: "paper" (the profile's paper-form constants) or "adam" (``methods.adam_constants`` of the model at its
    steps: the labelled variant whose path passes the health limits on the embedded stand-ins).
    model_steps: per-model search steps overriding ``steps`` (e.g. {"embedded-swin": 640}, the steps the Swin's
    adam setting was chosen at)."""

    models: tuple[str, ...] = ("embedded-vit", "embedded-swin")
    steps: int = 60
    batch_size: int = 32
    macs_fractions: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    seed: int = 0
    form: str = "paper"
    model_steps: dict = dataclasses.field(default_factory=dict)
    ablation_fractions: tuple[float, ...] = ()  # MAC budgets of the order ablation (none: not run)
    n_test: int = 1000               # test / refit images of the order ablation
    n_refit: int = 1000
    study: str = "solution_path"

    def resolved(self) -> "PathStudyConfig":
        check_types(self)
        _check_fractions("macs_fractions", self.macs_fractions)
        if self.ablation_fractions:
            _check_fractions("ablation_fractions", self.ablation_fractions)
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        check_model_steps(self.model_steps)
        return self


def run_path_study(cfg: PathStudyConfig | None = None, *, record: bool = True, progress: bool = True,
                   tasks: dict | None = None) -> dict:
    """Returns {"paths": {model: SolutionPath}, "nested": DataFrame, "labels": {model: label}, "records": [...]}."""
    import pandas as pd

    cfg = (cfg or PathStudyConfig()).resolved()
    out = {"paths": {}, "labels": {}, "records": [], "nested": None, "health": {}, "ablation": None}
    rows, ablation = [], []
    for model in cfg.models:
        task = (tasks or {}).get(model) or (_task(model, 10, cfg.n_test, cfg.n_refit) if cfg.ablation_fractions
                                            else _task(model, 10, 10, 10))
        abl_rows, abl_correct = [], {}
        m = _attach(task.dense, task)
        try:
            steps = cfg.model_steps.get(model, cfg.steps)
            spp = _spp(model) if cfg.form == "paper" else methods.adam_constants(model, steps)
            path = methods.ranking("spp", m, task.train_batches(cfg.batch_size, steps, cfg.seed), F.cross_entropy,
                                   steps=steps, seed=cfg.seed, spp=spp)
            dense = _dense_macs(m)
            fr = sorted(set(cfg.macs_fractions), reverse=True)
            mine = []
            health = path_health(path, [path.keep(macs=int(f * dense)) for f in fr], f"{cfg.study} {model}")
            for ro in READOUTS:
                keeps = [path.keep(macs=int(f * dense), readout=ro) for f in fr]
                for i, (f, k) in enumerate(zip(fr, keeps)):
                    nxt = keeps[i + 1] if i + 1 < len(keeps) else None
                    mine.append({"model": model, "readout": ro, "macs_fraction": f, "kept_entries": int(flat_keep(k).sum()),
                                 "macs": k.macs, "achieved_fraction": k.macs / dense,
                                 "nested_in_next": None if nxt is None else nxt.issubset(k)})
            if cfg.ablation_fractions:
                abl_rows, abl_correct = order_ablation(m, path, task, cfg.ablation_fractions, seed=cfg.seed)
                abl_rows = [{"model": model, **r} for r in abl_rows]
        finally:
            m.detach_masks()
        sizes = {}
        for g in path.groups:
            sizes[g.pool] = sizes.get(g.pool, 0) + g.size
        info = {"label": task.label, "model": model, "pool_sizes": sizes, "spp_constants": spp,
                "dense_macs": dense, "search_seconds": path.config.get("seconds"),
                "nested_rule": "nested_in_next: the next smaller budget's keep-set is a subset of this one",
                **({"order_ablation": abl_rows,
                    "order_ablation_rule": "one search read four ways at the same MAC budgets, head re-fit on "
                                           f"{cfg.n_refit} refit images, top-1 on {cfg.n_test} test images; each arm "
                                           "paired against the entry order (docs/statistics.md); per-image "
                                           "correctness in order_ablation_correct.json"} if abl_rows else {})}
        table = pd.DataFrame(mine)
        if record:
            out["records"].append(write_record(cfg.study, {**dataclasses.asdict(cfg), "model": model, "steps": steps},
                                               path, table, info,
                                               health={"search": health},
                                               files={"order_ablation_correct.json": abl_correct} if abl_rows else None))
        if progress:
            print(f"[path] {model}: {steps} steps in {path.config.get('seconds', 0):.1f}s; nested at every budget: "
                  f"{bool(table['nested_in_next'].dropna().all())}", flush=True)
        out["paths"][model] = path
        out["health"][model] = health
        out["labels"][model] = task.label
        rows += mine
        ablation += abl_rows
    out["nested"] = pd.DataFrame(rows)
    out["ablation"] = pd.DataFrame(ablation) if ablation else None
    return out


def entry_rows(rows) -> torch.Tensor:
    """Entry steps of several layers as one matrix: each row sorted by entry step with never-entered (-1) last,
    padded with -2 where a layer has fewer entries."""
    rows = [torch.as_tensor(r, dtype=torch.long).flatten() for r in rows]
    mat = torch.full((len(rows), max(r.numel() for r in rows)), -2, dtype=torch.long)
    for i, e in enumerate(rows):
        key = torch.where(e < 0, torch.full_like(e, 1 << 30), e)
        mat[i, :e.numel()] = e[torch.argsort(key, stable=True)]
    return mat


def entry_matrix(path: SolutionPath, pool: str) -> tuple[torch.Tensor, list[int]]:
    """(layers x entries) entry steps of one pool (see ``entry_rows``), and the layer ids of the rows."""
    groups = sorted((g for g in path.groups if g.pool == pool), key=lambda g: (g.tower or "", g.layer))
    return entry_rows([path.entry_step[g.name] for g in groups]), [g.layer for g in groups]


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
        _check_fractions("macs_fractions", self.macs_fractions)
        bad = [m for m in self.methods if m not in ("spp", "lasso")]
        if bad:
            raise ValueError(f"the seed study compares 'spp' and 'lasso', got {bad}")
        if len(set(self.seeds)) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seed stability needs at least 2 distinct seeds (no repeats), got {self.seeds!r}")
        return self


def _pairs(values: dict, fn) -> list[float]:
    return [fn(values[a], values[b]) for a, b in itertools.combinations(sorted(values), 2)]


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
    task = task or _task(cfg.model, cfg.n_val, cfg.n_test, cfg.n_refit)
    spp = _spp(cfg.model)
    m = _attach(task.dense, task)
    dense = _dense_macs(m)
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
            vals = _pairs({s: keeps[(method, s, f)] for s in cfg.seeds}, jaccard)
            jac.append({"method": method, "budget_macs_fraction": f, "mean": statistics.fmean(vals), "min": min(vals),
                        "pairs": len(vals)})
        vals = _pairs({s: ranks[(method, s)] for s in cfg.seeds}, kendall_tau)
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

    from .errors import DataError
    from .results import list_records, load_record
    from .vision import keep_key, rank_key

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
            vals = _pairs(rs, kendall_tau)
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


# ---------------------------------------------------------------------------------------------
# 60: kappa x lambda (x nu)
# ---------------------------------------------------------------------------------------------
@dataclass
class KappaLambdaConfig:
    """A grid of SPP searches; per cell: top-1 at one budget, path length, stability over two seeds.

    span="auto" (default): every cell's alpha and nu follow the automatic rule (docs/auto_constants.md)
    for that cell's kappa and theta = kappa*lam, from one measurement of the dense model, so every cell's
    path is scaled to span the search and the grid stays inside the region where entries can enter
    (a cell with kappa*lam >= 1, where an entry the loss does not hold can never enter, is marked and not
    searched). span="profile": the profile's alpha and nu (or ``alpha`` / ``nus``) in every cell, as the
    first build did; most of that grid had (almost) no entries."""

    model: str = "embedded-vit"
    kappas: tuple[float, ...] = (5.0, 10.0, 20.0)
    lams: tuple[float, ...] = (0.01, 0.03, 0.045)  # kappa*lam from 0.05 to 0.9
    nus: tuple[float, ...] = (0.0,)  # span="profile" only: 0 = the profile's nu
    alpha: float = 0.0               # span="profile" only: 0 = the profile's alpha
    span: str = "auto"
    budget_macs_fraction: float = 0.5
    steps: int = 40
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1)  # stability: Jaccard of the budget's keep-sets across these seeds
    n_val: int = 500
    n_test: int = 200
    n_refit: int = 1000
    # "grid": every kappa x lam; "cross": each kappa at the middle lam and each lam at the middle kappa (one
    # axis at a time through the centre: len(kappas) + len(lams) - 1 cells instead of their product)
    design: str = "grid"
    study: str = "kappa_lambda"

    def cells(self) -> list[tuple[float, float]]:
        """The (kappa, lam) cells searched, in order."""
        if self.design == "grid":
            return list(itertools.product(self.kappas, self.lams))
        kc, lc = self.kappas[len(self.kappas) // 2], self.lams[len(self.lams) // 2]
        return [(k, lc) for k in self.kappas] + [(kc, lam) for lam in self.lams if lam != lc]

    def resolved(self) -> "KappaLambdaConfig":
        check_types(self)
        _check_fractions("budget_macs_fraction", (self.budget_macs_fraction,))
        if not self.kappas or not self.lams or not self.nus:
            raise ValueError("kappas, lams and nus must each hold at least one value")
        if any(v <= 0 for v in (*self.kappas, *self.lams)) or any(v < 0 for v in self.nus):
            raise ValueError("kappas and lams must be > 0 and nus >= 0 (0 = the profile's nu)")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        if self.span not in ("auto", "profile"):
            raise ValueError(f"span must be 'auto' or 'profile', got {self.span!r}")
        if self.design not in ("grid", "cross"):
            raise ValueError(f"design must be 'grid' (every kappa x lam) or 'cross' (one axis at a time through the "
                             f"middle values), got {self.design!r}")
        if self.span == "auto" and (tuple(self.nus) != (0.0,) or self.alpha):
            raise ValueError("span='auto' derives alpha and nu per cell from the model; drop nus= / alpha= or "
                             "pass span='profile' to hold them fixed")
        return self


def run_kappa_lambda(cfg: KappaLambdaConfig | None = None, *, record: bool = True, progress: bool = True,
                     task=None) -> dict:
    """Returns {"table": one row per (kappa, lam) cell (``cfg.cells()``) x nu, "record", "info"}. Top-1 is measured on the VALIDATION split
    (this grid chooses constants; the test split is not used), with the first seed's search."""
    import pandas as pd

    cfg = cfg or KappaLambdaConfig()
    cfg.resolved()
    t0 = time.perf_counter()
    task = task or _task(cfg.model, cfg.n_val, cfg.n_test, cfg.n_refit)
    base = _spp(cfg.model)
    m = _attach(task.dense, task)
    dense = _dense_macs(m)
    budget = int(cfg.budget_macs_fraction * dense)
    rows = []
    health: dict[str, dict] = {}
    meas = None
    if cfg.span == "auto":  # one measurement of the dense model, on the first seed's first batches
        from . import auto as A
        from .train import measure_dense, to_device

        it = iter(task.train_batches(cfg.batch_size, A.MEASURE_BATCHES, cfg.seeds[0]))
        dev = next(iter(m.mask_parameters().values())).device
        meas = measure_dense(m, [to_device(next(it), dev) for _ in range(A.MEASURE_BATCHES)], F.cross_entropy,
                             seed=cfg.seeds[0])
    try:
        for nu, (kappa, lam) in itertools.product(cfg.nus, cfg.cells()):
            implied = None
            if meas is not None:
                if kappa * lam >= 1:
                    rows.append({"kappa": kappa, "lam": lam, "nu": None, "alpha": None, "theta": kappa * lam,
                                 "budget_macs_fraction": cfg.budget_macs_fraction, "top1_head_refit": None,
                                 "top1_no_retrain": None, "path_length": None, "entered_fraction": 0.0,
                                 "stability_jaccard": None, "path_healthy": False, "max_step_share": None,
                                 "tie_share": None, "degenerate_because": "kappa*lam >= 1: an entry the loss does "
                                 "not hold never enters (not searched)"})
                    continue
                consts, implied = A.derive(meas, cfg.steps, kappa=kappa, theta=kappa * lam)
            else:
                consts = {"kappa": kappa, "alpha": cfg.alpha or base["alpha"], "nu": nu or base["nu"], "lam": lam}
            keeps, first = {}, None
            for seed in cfg.seeds:
                path = methods.ranking("spp", m, task.train_batches(cfg.batch_size, cfg.steps, seed), F.cross_entropy,
                                       steps=cfg.steps, seed=seed, spp=consts)
                keeps[seed] = path.keep(macs=budget)
                if first is None:
                    first = path
            ev = evaluate(compress(m, keeps[cfg.seeds[0]]), task, ("val",))
            pl = path_length(first, budget)
            entered = sum(int((e >= 0).sum()) for e in first.entry_step.values()) / sum(g.size for g in first.groups)
            stab = statistics.fmean(_pairs(keeps, jaccard)) if len(keeps) > 1 else None
            with warnings.catch_warnings():  # a degenerate cell is marked in its row, not warned about 9 times
                warnings.simplefilter("ignore", RuntimeWarning)
                h = first.diagnostics([keeps[cfg.seeds[0]]])
            health[f"kappa={kappa} lam={lam} nu={consts['nu']}"] = h
            rows.append({"kappa": kappa, "lam": lam, "nu": consts["nu"], "alpha": consts["alpha"],
                         "theta": kappa * lam, "budget_macs_fraction": cfg.budget_macs_fraction, "top1_head_refit": ev["val_head_refit"],
                         "top1_no_retrain": ev["val_no_retrain"], "path_length": pl, "entered_fraction": entered,
                         "stability_jaccard": stab, "loss_last": first.history[-1]["loss"] if first.history else None,
                         "search_s": first.config.get("seconds"),
                         "path_healthy": h["healthy"], "max_step_share": h["max_step_share"],
                         "loss_ratio_half": h["loss_ratio_half"], "budget_by_order": h["budgets"][0]["by_order"],
                         "tie_share": h["budgets"][0]["by_tie_break"],
                         **({} if implied is None else {"decay_rate": implied["decay_rate"],
                                                        "predicted_uniform_shrink": implied["predicted_uniform_shrink"]}),
                         "degenerate_because": "; ".join(h["problems"]) or None})
            if progress:
                print(f"[kappa-lambda {time.perf_counter() - t0:6.1f}s] kappa {kappa} lam {lam} nu {consts['nu']}: val "
                      f"top-1 {ev['val_head_refit']:.3f}, path length {pl}, stability {stab}", flush=True)
    finally:
        m.detach_masks()
    table = pd.DataFrame(rows)
    info = {"label": task.label, "task": task.info, "budget_macs_fraction": cfg.budget_macs_fraction,
            "dense_macs": dense, "profile_constants": base, "span": cfg.span, "design": cfg.design,
            "cells": [list(c) for c in cfg.cells()],
            **({"auto": {"measured": meas, "rule": A.RULE + " (kappa and theta = kappa*lam from each cell)"}}
               if meas is not None else {}),
            "tie_share": "share of the budget's keep-set decided by the |V| / |M| tie-break, not by entry order",
            "path_length": f"first step whose entered entries alone cost >= the budget's MACs (None: not within "
                           f"{cfg.steps} steps)",
            "stability": "mean Jaccard of the budget's keep-sets over pairs of data-order seeds",
            "top1": "validation split (the grid chooses constants; the test split is not touched), head re-fit",
            "path_health": "per cell, the first seed's path diagnostics (docs/path_health.md); a cell with "
                           "path_healthy False has a degenerate path: its top-1 is not a result of the order",
            "seconds": round(time.perf_counter() - t0, 1)}
    folder = write_record(cfg.study, cfg, None, table, info, health=health) if record else None
    return {"table": table, "record": folder, "info": info}


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
        _check_fractions("family_fractions", self.family_fractions)
        _check_fractions("latency_fractions", self.latency_fractions)
        if not self.round_to or not all(isinstance(r, int) and r > 0 for r in self.round_to):
            raise ValueError(f"round_to must be positive integers (1 = no rounding), got {self.round_to!r}")
        if not self.latency_batches or not all(isinstance(b, int) and b > 0 for b in self.latency_batches):
            raise ValueError(f"latency_batches must be positive integers, got {self.latency_batches!r}")
        for p in self.peers:
            if p not in methods.PEER_METHODS:
                raise ValueError(f"unknown peer {p!r}; use {methods.PEER_METHODS}")
        return self


def _latency_rows(name: str, models: list, x_one, dense_macs: int, batches, repeats, device: str) -> list[dict]:
    """Per batch size, every model timed in interleaved rounds (bench._interleaved_latency), so drifts of a
    shared machine hit every model alike; speedup and MACs reduction against the dense model of the list."""
    from .bench import _interleaved_latency

    rows = []
    for b in batches:
        x = x_one.repeat(b, 1, 1, 1).to(device)
        lat = _interleaved_latency({i: mod for i, (_, _, _, mod, _, _) in enumerate(models)}, x, repeats, warmup=2)
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
    dense = _dense_macs(m)
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

    from .bench import search_step
    from .data import preprocess

    cfg = cfg or CostLatencyConfig()
    cfg.resolved()
    t0 = time.perf_counter()

    def log(msg):
        if progress:
            print(f"[cost {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    task = task or _task(cfg.model, 10, 10, 10)
    spp = _spp(cfg.model)
    dense_model = copy.deepcopy(task.dense)  # attach_masks wraps task.dense in place: time a clean copy
    m = _attach(task.dense, task)
    dense = _dense_macs(m)
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
            rows += _latency_rows(task.name, on, x_one, dense, cfg.latency_batches, cfg.latency_repeats, device)
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


# ---------------------------------------------------------------------------------------------
# Does the order carry information? (issue 17, point 4)
# ---------------------------------------------------------------------------------------------
ORDER_ARMS = ("entry-order", "final-abs-V", "final-abs-M", "random-per-layer")


def order_variants(path: SolutionPath, seed: int = 0) -> dict[str, tuple[SolutionPath, str]]:
    """The same search read four ways: by entry order (the path itself), by final |V| only, by final |M|
    only (score-ranked copies of the path) and random per layer; (path, read-out) per arm."""
    g = torch.Generator().manual_seed(seed)

    def scored(score: dict) -> SolutionPath:
        return SolutionPath(path.groups, path.entry_step, path.V, path.M, path.cost_model,
                            dict(path.config), path.history, path.support_steps, path.info,
                            score=score)

    return {"entry-order": (path, "global"),
            "final-abs-V": (scored({n: v.abs().double() for n, v in path.V.items()}), "global"),
            "final-abs-M": (scored({n: v.abs().double() for n, v in path.M.items()}), "global"),
            "random-per-layer": (scored({gr.name: torch.rand(gr.size, generator=g, dtype=torch.float64)
                                         for gr in path.groups}), "per-layer")}


def order_ablation(m, path: SolutionPath, task, macs_fractions, *, seed: int = 0) -> tuple[list[dict], dict]:
    """At each MAC budget: the keep-set of every arm of ``order_variants``, compressed and evaluated on the
    same test images (head re-fit on the refit split). Returns (rows, per-example correctness per
    arm and budget: lists of 0/1 over the test images, in the split's order, for paired statistics).
    Each row carries its paired comparison with the entry order at the same budget (``sppbench.stats``:
    delta, 95% paired-bootstrap interval over test images, McNemar p, verdict better / worse / tie)."""
    from .evaluate import fit_linear_head
    from .vision import _features

    dense = _dense_macs(m)
    rows, per_example = [], {}
    arms = order_variants(path, seed)
    for f in macs_fractions:
        for arm, (p, ro) in arms.items():
            keep = p.keep(macs=int(f * dense), readout=ro)
            small = compress(m, keep)
            fr, yr = _features(small, task.loader("refit"))
            head = fit_linear_head(fr, yr, task.num_classes, weight_decay=task.head_weight_decay)
            ft, yt = _features(small, task.loader("test"))
            correct = (head(ft).argmax(-1) == yt).long()
            per_example[f"{arm}@{f}"] = correct.tolist()
            rows.append({"arm": arm, "readout": ro, "budget_macs_fraction": f, "macs": keep.macs,
                         "achieved_fraction": keep.macs / dense, "top1_head_refit": float(correct.float().mean()),
                         "n_test": int(correct.numel()),
                         "jaccard_with_entry_order": jaccard(keep, arms["entry-order"][0].keep(macs=int(f * dense)))})
    from .stats import compare

    for r in rows:  # paired against the entry order at the same budget, over the same test images
        ref = per_example[f"entry-order@{r['budget_macs_fraction']}"]
        if r["arm"] == "entry-order":
            r.update(delta_vs_entry_order=0.0, delta_lo=None, delta_hi=None, mcnemar_p=None, verdict="reference")
            continue
        c = compare(per_example[f"{r['arm']}@{r['budget_macs_fraction']}"], ref, seed=seed)
        r.update(delta_vs_entry_order=c["delta"], delta_lo=c["lo"], delta_hi=c["hi"], mcnemar_p=c["mcnemar_p"],
                 verdict=c["verdict"])
    return rows, per_example
