"""Study 40 (notebook 40): the solution path of one search, its health, and the ablation of its order."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import methods
from ..core.compress import compress
from ..core.path import READOUTS, SolutionPath
from ..tasks.evaluate import fit_linear_head, loader_features
from .common import check_fractions, check_model_steps, check_types, jaccard, path_health, write_record
from .stats import compare
from .vision_table import flat_keep, spp_for, study_task

# ---------------------------------------------------------------------------------------------
# 40: the solution path
# ---------------------------------------------------------------------------------------------
# The adam form's constants live with the methods (sppbench.methods.structured.ADAM_FORM, docs/path_health.md).
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
        check_fractions("macs_fractions", self.macs_fractions)
        if self.ablation_fractions:
            check_fractions("ablation_fractions", self.ablation_fractions)
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
        task = (tasks or {}).get(model) or (study_task(model, 10, cfg.n_test, cfg.n_refit) if cfg.ablation_fractions
                                            else study_task(model, 10, 10, 10))
        abl_rows, abl_correct = [], {}
        m = task.attach()
        try:
            steps = cfg.model_steps.get(model, cfg.steps)
            spp = spp_for(model) if cfg.form == "paper" else methods.adam_constants(model, steps)
            path = methods.ranking("spp", m, task.train_batches(cfg.batch_size, steps, cfg.seed), F.cross_entropy,
                                   steps=steps, seed=cfg.seed, spp=spp)
            dense = m.dense_cost()[1]
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
# Does the order carry information? (issue 17, point 4)
# ---------------------------------------------------------------------------------------------
ORDER_ARMS = ("entry-order", "final-abs-V", "final-abs-M", "random-per-layer")


def order_variants(path: SolutionPath, seed: int = 0) -> dict[str, tuple[SolutionPath, str]]:
    """The same search read four ways: by entry order (the path itself), by final |V| only, by final |M|
    only (score-ranked copies of the path) and random per layer; (path, read-out) per arm."""
    g = torch.Generator().manual_seed(seed)
    return {"entry-order": (path, "global"),
            "final-abs-V": (path.rescored({n: v.abs().double() for n, v in path.V.items()}), "global"),
            "final-abs-M": (path.rescored({n: v.abs().double() for n, v in path.M.items()}), "global"),
            "random-per-layer": (path.rescored({gr.name: torch.rand(gr.size, generator=g, dtype=torch.float64)
                                                for gr in path.groups}), "per-layer")}


def order_ablation(m, path: SolutionPath, task, macs_fractions, *, seed: int = 0) -> tuple[list[dict], dict]:
    """At each MAC budget: the keep-set of every arm of ``order_variants``, compressed and evaluated on the
    same test images (head re-fit on the refit split). Returns (rows, per-example correctness per
    arm and budget: lists of 0/1 over the test images, in the split's order, for paired statistics).
    Each row carries its paired comparison with the entry order at the same budget (``sppbench.studies.stats``:
    delta, 95% paired-bootstrap interval over test images, McNemar p, verdict better / worse / tie)."""

    dense = m.dense_cost()[1]
    rows, per_example = [], {}
    arms = order_variants(path, seed)
    for f in macs_fractions:
        for arm, (p, ro) in arms.items():
            keep = p.keep(macs=int(f * dense), readout=ro)
            small = compress(m, keep)
            fr, yr = loader_features(small, task.loader("refit"))
            head = fit_linear_head(fr, yr, task.num_classes, weight_decay=task.head_weight_decay)
            ft, yt = loader_features(small, task.loader("test"))
            correct = (head(ft).argmax(-1) == yt).long()
            per_example[f"{arm}@{f}"] = correct.tolist()
            rows.append({"arm": arm, "readout": ro, "budget_macs_fraction": f, "macs": keep.macs,
                         "achieved_fraction": keep.macs / dense, "top1_head_refit": float(correct.float().mean()),
                         "n_test": int(correct.numel()),
                         "jaccard_with_entry_order": jaccard(keep, arms["entry-order"][0].keep(macs=int(f * dense)))})

    for r in rows:  # paired against the entry order at the same budget, over the same test images
        ref = per_example[f"entry-order@{r['budget_macs_fraction']}"]
        if r["arm"] == "entry-order":
            r.update(delta_vs_entry_order=0.0, delta_lo=None, delta_hi=None, mcnemar_p=None, verdict="reference")
            continue
        c = compare(per_example[f"{r['arm']}@{r['budget_macs_fraction']}"], ref, seed=seed)
        r.update(delta_vs_entry_order=c["delta"], delta_lo=c["lo"], delta_hi=c["hi"], mcnemar_p=c["mcnemar_p"],
                 verdict=c["verdict"])
    return rows, per_example
