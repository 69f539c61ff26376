"""The CLIP table: methods x budgets on a dual encoder, with params and MACs per tower and retrieval
recall@1/5/10 both ways, before and after retraining.

Three numbers per model, as for the vision table:
- ``no_retrain``: the pruned towers with the dense model's projections;
- ``refit``: the two projections (and the logit scale) re-fit on the pruned towers' pooled features
  (towers untouched) -- the counterpart of a classifier's head re-fit -- by the task's recipe on the dense
  projections' fit set, the same for every row (the stand-in: its dense projections' own recipe from scratch,
  which on the dense model re-makes them, see :func:`refit_recipe`);
- ``finetuned``: from the re-fit, the shared AdamW fine-tune of every weight with the contrastive loss.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import methods
from ..configs import load_config
from ..core import measure
from ..core.path import READOUTS
from ..core.search import FINETUNE_DEFAULTS, finetune
from ..errors import SppBenchError
from ..families import attach_masks
from ..tasks.clip import (
    ClipTask,
    ImageTower,
    TextTower,
    contrastive_loss,
    create_model,
    karpathy_task,
    refit_projections,
    rsum_per_query,
)
from ..tasks.embedded_clip import embedded_clip_task
from ..tasks.models import is_spec, open_clip_model, split_spec
from ..tasks.profiles import CLIP_PAPER_MODELS, clip_paper_config
from . import stats
from .common import check_types, derive_constants, path_health, write_record

PAPER_CLIP_MODELS = CLIP_PAPER_MODELS
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
BUDGET_TOWERS = ("joint", "image", "text", "each")


@dataclass
class ClipTableConfig:
    """Parameters of one CLIP table (defaults: the embedded stand-in at reproduce size)."""

    model: str = "embedded-clip"     # or a paper model: ViT-B-32 / ViT-L-14 (open_clip, hub tag below), or any
                                     # open_clip:<name>
    pretrained: str = "openai"       # paper models / open_clip:<name>: an open_clip pretrained tag or a checkpoint file
    dataset: str = "coco"            # paper models: coco / flickr30k (Karpathy splits under data_root)
    data_root: str = ""              # paper models: the dataset folder (else $SPPBENCH_COCO / $SPPBENCH_FLICKR30K)
    methods: tuple[str, ...] = ("spp", "lasso", "dessilbi", "magnitude", "random")
    macs_fractions: tuple[float, ...] = (0.7, 0.5, 0.35)
    budget_towers: str = "joint"     # joint: MACs of one image + one caption; image / text: that tower only (the
                                     # other stays dense); each: every tower to the fraction of its own MACs
    steps: int = 160
    batch_size: int = 32
    seed: int = 0
    seeds: int = 3                   # every method with randomness runs seeds seed, seed+1, ...; magnitude once
    readout: str = "val"             # 'val' = global / per-layer chosen per budget by re-fit rsum on the val split
    lasso_trials: int = 3
    resamples: int = 2000            # paired bootstrap resamples (over queries, and seeds) of the comparisons
    n_fit: int = 3000
    n_val: int = 500
    n_test: int = 1000
    split_seed: int = 0
    refit_steps: int = 0             # projection re-fit steps; 0 = the task's recipe (the stand-in: its dense
                                     # projections' own 600 steps), else that many (and Adam lr 1e-3 by default)
    finetune_steps: int = 40
    finetune_batch: int = 32
    finetune_lr: float = 1e-5
    kappa: float = 0.0               # SPP constants; 0 = the stand-in's defaults (configs/search_embedded_clip.json),
                                     # on other models derived from the model (sppbench.core.auto)
    alpha: float = 0.0
    nu: float = 0.0
    lam: float = 0.0
    spp_form: str = ""               # the 'spp' rows' search: "adam" (the labelled variant, methods.adam_constants) or
                                     # "paper" (the constants above); "" = adam for the stand-in, paper for paper models
    study: str = "clip_table"

    def resolved(self) -> "ClipTableConfig":
        check_types(self)
        for m in self.methods:
            methods.check_method(m)
            if m in methods.PEER_METHODS:
                raise SppBenchError(f"{m} does not prune open_clip models (no peer does); drop it from methods")
        if self.model != "embedded-clip" and self.model not in PAPER_CLIP_MODELS and not is_spec(self.model,
                                                                                                  "open_clip"):
            raise SppBenchError(f"unknown CLIP model {self.model!r}; use embedded-clip, one of {PAPER_CLIP_MODELS} or "
                                "open_clip:<name> with pretrained=<tag or checkpoint file>")
        if self.readout not in ("val", *READOUTS):
            raise ValueError(f"readout must be 'val', 'global' or 'per-layer', got {self.readout!r}")
        if self.spp_form not in ("", *methods.SPP_FORMS):
            raise ValueError(f"spp_form must be one of {methods.SPP_FORMS} (or '' for the model's default), "
                             f"got {self.spp_form!r}")
        if self.budget_towers not in BUDGET_TOWERS:
            raise ValueError(f"budget_towers must be one of {BUDGET_TOWERS}, got {self.budget_towers!r}")
        if self.budget_towers == "each" and "lasso" in self.methods:
            raise SppBenchError("Lasso runs once per budget and cannot meet two tower budgets with one lambda; use "
                                "budget_towers='joint', 'image' or 'text', or drop lasso")
        if not self.macs_fractions or not all(0 < f <= 1 for f in self.macs_fractions):
            raise ValueError(f"macs_fractions must be fractions in (0, 1], got {self.macs_fractions!r}")
        if self.refit_steps < 0:
            raise ValueError(f"refit_steps must be >= 0 (0 = the task's re-fit recipe), got {self.refit_steps}")
        if self.seeds < 1 or self.resamples < 100:
            raise ValueError(f"seeds must be >= 1 and resamples >= 100, got {self.seeds}, {self.resamples}")
        return self

    @property
    def form(self) -> str:
        """The 'spp' search's form: spp_form, or its default (adam for the embedded stand-in)."""
        return self.spp_form or ("adam" if self.model == "embedded-clip" else "paper")


def refit_recipe(task: ClipTask, cfg: ClipTableConfig) -> dict:
    """The projection re-fit's settings: the task's recipe (``ClipTask.refit_recipe``; the stand-in's is its dense
    projections' own), else from the current projections with Adam lr 1e-3 and 300 steps; ``cfg.refit_steps`` > 0
    overrides the steps."""
    recipe = dict(task.refit_recipe or {"init": "current", "lr": 1e-3, "steps": 300, "seed": cfg.seed})
    if cfg.refit_steps:
        recipe["steps"] = int(cfg.refit_steps)
    return recipe


def clip_constants(cfg: ClipTableConfig) -> dict | None:
    """Given (all four), the stand-in's defaults, or None = derived from the model (every other model)."""
    given = {k: getattr(cfg, k) for k in ("kappa", "alpha", "nu", "lam")}
    if all(given.values()):
        return given
    if cfg.model != "embedded-clip":
        if any(given.values()):
            raise SppBenchError(f"{cfg.model}: give all four SPP constants (kappa, alpha, nu, lam) or none (then they "
                                "are derived from the model, sppbench.core.auto)")
        return None
    d = load_config("search_embedded_clip")["constants"]
    return {k: (v or d[k]) for k, v in given.items()}


def get_clip_task(cfg: ClipTableConfig, progress=None) -> ClipTask:
    if cfg.model == "embedded-clip":

        return embedded_clip_task(cfg.n_fit, cfg.n_val, cfg.n_test, cfg.split_seed, progress=progress)
    import open_clip

    scheme, name = split_spec(cfg.model)
    if scheme == "open_clip":
        model = open_clip_model(name, cfg.pretrained)
    else:
        pcfg = clip_paper_config(cfg.model)
        model = create_model(cfg.model, pretrained=cfg.pretrained or pcfg["pretrained"])
    tok = open_clip.get_tokenizer(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return karpathy_task(model.to(device), tok, cfg.dataset, cfg.data_root or None, n_val=cfg.n_val or None,
                         n_test=cfg.n_test or None)


def _budgets(cfg: ClipTableConfig, dense: dict) -> list[dict]:
    out = []
    for f in cfg.macs_fractions:
        if cfg.budget_towers == "joint":
            out.append({"macs": int(f * (dense["image"][1] + dense["text"][1]))})
        elif cfg.budget_towers == "each":
            out.append({"towers": {t: {"macs": int(f * dense[t][1])} for t in ("image", "text")}})
        else:
            out.append({"macs": int(f * dense[cfg.budget_towers][1]), "tower": cfg.budget_towers})
    return out


def _example(task: ClipTask, model: nn.Module):
    images = next(iter(task.sets["test"].images))[:2]
    tokens = task.tokenizer(task.sets["test"].captions[:2])
    device = next(model.parameters()).device
    return images.to(device), tokens.to(device)


def tower_costs(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Measured params and MACs per tower (MACs per image / per caption)."""
    out = {}
    for t, mod, x in (("image", ImageTower(model), images), ("text", TextTower(model), tokens)):
        out[f"macs_{t}"] = measure.macs(mod, x)
    out["params_image"] = measure.params(model.visual)
    out["params"] = measure.params(model)
    out["params_text"] = out["params"] - out["params_image"] - model.logit_scale.numel() - (
        model.logit_bias.numel() if getattr(model, "logit_bias", None) is not None else 0)
    return out


def run_clip_table(cfg: ClipTableConfig | None = None, *, record: bool = True, progress: bool = True,
                   task: ClipTask | None = None) -> dict:
    """Run every method at every budget; returns {"table", "record", "info", "config"}."""
    import pandas as pd

    cfg = (cfg or ClipTableConfig()).resolved()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[clip {time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    spp = clip_constants(cfg)  # None: derived from the model once the masks are on
    spp_auto = None
    if task is None:
        task = get_clip_task(cfg, progress=log)
    dense = task.model
    images, tokens = _example(task, dense)
    dense_cost = tower_costs(dense, images, tokens)
    refit_images, refit_texts, refit_keys, refit_text_image = (tuple(task.refit_pairs) + (None,))[:4]

    recipe = refit_recipe(task, cfg)

    def refit_in_place(model: nn.Module) -> dict:
        """The projection re-fit: the task's recipe (same fit set, settings and seed for every row: on the
        stand-in it re-makes the dense projections on the dense model)."""
        return refit_projections(model, refit_images, refit_texts, refit_keys, task.tokenizer,
                                 text_image=refit_text_image, **recipe)

    rows = []
    ranks: dict = {}  # per-query ranks of every row and stage (ranks_key), saved as ranks.npz

    def scores(model: nn.Module, split: str, prefix: str, key: tuple | None = None, pooled=None) -> dict:
        """Recall / rsum on ``split``; on the test split (``key`` = (method, budget, seed)) the per-query ranks are
        kept under that row and stage. ``pooled``: the split's pooled features under the same towers (the no-retrain
        and re-fit read-outs of one model share one pass over the test set)."""
        res = task.evaluate(model, split, ranks=key is not None, pooled=pooled)
        for d, arr in res.pop("ranks", {}).items():
            ranks[ranks_key(task.name, *key, prefix, d)] = arr
        return {f"{prefix}_{k}": v for k, v in res.items()}

    def retrained(model: nn.Module, seed: int, key: tuple, refit: nn.Module | None = None, pooled=None
                  ) -> tuple[nn.Module, dict, dict]:
        """(re-fit copy, its test scores, fine-tuned test scores + records). ``refit``: the re-fit copy already made
        when the read-out was chosen (the recipe is deterministic, so it is the same model); ``pooled``: the test
        split's pooled features under ``model``'s towers (the re-fit changes only the projections)."""
        if refit is None:
            refit = copy.deepcopy(model)
            rinfo = refit_in_place(refit)
        else:
            refit, rinfo = refit
        out = scores(refit, "test", "refit", key, pooled)
        tuned = copy.deepcopy(refit)
        rec = finetune(tuned, task.train_batches(cfg.finetune_batch, cfg.finetune_steps, seed + 1000),
                       steps=cfg.finetune_steps, lr=cfg.finetune_lr, seed=seed, loss_fn=contrastive_loss)
        if cfg.finetune_steps:
            out.update(scores(tuned, "test", "finetuned", key))
        return refit, out, {"refit": rinfo, "finetune_s": rec["seconds"],
                            "refit_fit_loss": rinfo.get("loss_tail")}

    def row_of(model: nn.Module, method: str, seed: int, frac: float, keep, groups, extra: dict) -> dict:
        cost = tower_costs(model, images, tokens)
        row = {"model": task.name, "method": method, "seed": seed, "budget_towers": cfg.budget_towers,
               "budget_macs_fraction": frac, **cost,
               "macs_fraction": (cost["macs_image"] + cost["macs_text"])
               / (dense_cost["macs_image"] + dense_cost["macs_text"]),
               "macs_image_fraction": cost["macs_image"] / dense_cost["macs_image"],
               "macs_text_fraction": cost["macs_text"] / dense_cost["macs_text"], **extra}
        if keep is not None:
            s = methods.spread(keep, groups)
            row.update(empty_blocks=s["attn"]["empty_blocks"] + s["mlp"]["empty_blocks"])
        return row

    pooled = task.pool(dense, "test")
    ev = scores(dense, "test", "no_retrain", ("dense", 1.0, cfg.seed), pooled)
    _, rt, rinfo = retrained(dense, cfg.seed, ("dense", 1.0, cfg.seed), pooled=pooled)
    rows.append(row_of(dense, "dense", cfg.seed, 1.0, None, None, {**ev, **rt, "readout": None, "search_s": 0.0,
                                                              "finetune_s": rinfo["finetune_s"],
                                                              "refit_fit_loss": rinfo["refit_fit_loss"]}))
    log(f"dense: image {dense_cost['macs_image'] / 1e6:.1f} + text {dense_cost['macs_text'] / 1e6:.1f} MMACs, "
        f"i2t R@1 {ev['no_retrain_i2t_r1']:.1f} / t2i R@1 {ev['no_retrain_t2i_r1']:.1f}")

    m = attach_masks(dense, input_size=task.input_size)
    if spp is None:
        try:
            spp, spp_auto = derive_constants(m, task.train_batches(cfg.batch_size, cfg.steps, cfg.seed),
                                             contrastive_loss, cfg.steps, seed=cfg.seed)
        except BaseException:
            m.detach_masks()
            raise
        log("automatic SPP constants (sppbench.core.auto): " + ", ".join(f"{k} {v:.4g}" for k, v in spp.items()))
    # the 'spp' rows' own search (docs/path_health.md); the baselines keep the paper-form constants above
    spp_search = methods.spp_search_constants(cfg.form, spp, cfg.model, cfg.steps)
    path0 = methods.magnitude_path(m)
    budgets = _budgets(cfg, {t: path0.dense(t) for t in ("image", "text")})
    searches, configs = {}, {}
    paths, health = {}, {}  # the path methods' solution paths and their health (docs/path_health.md)
    try:
        for method in cfg.methods:
            seeds = [cfg.seed] if method in methods.DETERMINISTIC_METHODS else [cfg.seed + i for i in range(cfg.seeds)]
            for seed in seeds:
                batches = task.train_batches(cfg.batch_size, cfg.steps, seed)
                spp_m = spp_search if method == "spp" else spp  # baselines keep the paper-form step (Lasso's lr)
                common = dict(batches=batches, loss_fn=contrastive_loss, steps=cfg.steps, spp=spp_m, seed=seed,
                              settings={"trials": cfg.lasso_trials})
                if method in methods.RANKING_METHODS:
                    path = methods.ranking(method, m, batches, contrastive_loss, steps=cfg.steps, seed=seed,
                                           spp=spp_m)
                    searches[f"{method}@seed{seed}"] = path.config.get("seconds", 0.0)
                    configs[f"{method}@seed{seed}"] = path.config
                    candidates = ["per-layer"] if method == "random" else (
                        list(READOUTS) if cfg.readout == "val" else [cfg.readout])
                    chosen, refits = [], {}  # refits: budget index -> the chosen read-out's re-fit copy
                    for b in budgets:
                        best = None
                        for ro in candidates:
                            p = methods.prune(method, m, [b], readout=ro, path=path, **common)[0]
                            val, r = None, None
                            if len(candidates) > 1:
                                r = copy.deepcopy(p.model)
                                r = (r, refit_in_place(r))
                                val = task.evaluate(r[0], "val")["rsum"]
                            if best is None or (val is not None and val > best[0]):
                                best = (val, p)
                                refits[len(chosen)] = r
                        chosen.append(best)
                    if path.rank_by != "score":
                        paths[f"{method}@seed{seed}"] = path
                        health[f"{method}@seed{seed}"] = path_health(
                            path, [p.keep for _, p in chosen if p.keep is not None], f"{task.label} {method}")
                else:
                    refits = {}
                    chosen = [(None, p) for p in methods.prune(method, m, budgets, **common)]
                    searches[f"{method}@seed{seed}"] = sum(p.search_seconds for _, p in chosen)
                    configs[f"{method}@seed{seed}"] = [p.info for _, p in chosen]
                h = health.get(f"{method}@seed{seed}") if method in methods.RANKING_METHODS else None
                for bi, ((val, p), frac) in enumerate(zip(chosen, cfg.macs_fractions)):
                    pooled = task.pool(p.model, "test")
                    ev = scores(p.model, "test", "no_retrain", (method, frac, seed), pooled)
                    _, rt, rinfo = retrained(p.model, seed, (method, frac, seed), refits.get(bi), pooled)
                    row = row_of(p.model, method, seed, frac, p.keep, m.groups,
                                 {"budget": json.dumps(p.budget), "readout": p.readout, "val_refit_rsum": val, **ev, **rt,
                                  "search_s": round(p.search_seconds, 2),
                                  "shared_search": method in methods.RANKING_METHODS,
                                  "finetune_s": rinfo["finetune_s"], "refit_fit_loss": rinfo["refit_fit_loss"]})
                    if method == "spp":
                        row["form"] = cfg.form  # "adam": the labelled variant, not the paper's update
                    if h is not None:  # is the order behind this row real? (docs/path_health.md)
                        row["path_healthy"] = h["healthy"]
                        row["path_by_order"] = h["budgets"][bi]["by_order"] if bi < len(h["budgets"]) else None
                    rows.append(row)
                    log(f"{method} seed {seed} @ {frac:.2f}: image {row['macs_image_fraction']:.2f} / text "
                        f"{row['macs_text_fraction']:.2f} of dense MACs ({p.readout}); R@1 i2t/t2i "
                        f"{ev['no_retrain_i2t_r1']:.1f}/{ev['no_retrain_t2i_r1']:.1f}, re-fit "
                        f"{rt['refit_i2t_r1']:.1f}/{rt['refit_t2i_r1']:.1f}"
                        + (f", fine-tuned {rt['finetuned_i2t_r1']:.1f}/{rt['finetuned_t2i_r1']:.1f}"
                           if "finetuned_i2t_r1" in rt else ""))
    finally:
        m.detach_masks()
    table = pd.DataFrame(rows)
    summary = summarize_clip(table, ranks, resamples=cfg.resamples)
    sanity = sanity_checks_clip(table, ranks, resamples=cfg.resamples)
    for c in sanity:
        log(f"SANITY: {c['message']}")
    info = {"label": task.label, "task": task.info, "dense": dense_cost, "spp_constants": spp,
            "spp_constants_source": ("given" if all(getattr(cfg, k) for k in ("kappa", "alpha", "nu", "lam")) else
                                     "tuned" if cfg.model == "embedded-clip" else "auto"),
            **({"spp_auto": spp_auto} if spp_auto is not None else {}), "spp_form": cfg.form,
            "summary": summary.to_dict(orient="records"), "sanity": sanity,
            "queries": {d: int(len(next(v for k, v in ranks.items() if k.endswith(f"|{d}")))) for d in ("i2t", "t2i")},
            "statistics": {"reference": "spp at the same model and budget", "resamples": cfg.resamples,
                           "statistic": "rsum = mean over image queries + mean over caption queries of 100 x the "
                                        "number of k in (1, 5, 10) with the first relevant result at rank <= k",
                           "interval": "95% two-level paired bootstrap: each side's seeds drawn with replacement, "
                                       "then image queries and caption queries each drawn with replacement",
                           "sd": "sample standard deviation over seeds (ddof = 1)"},
            "seeds": {"seeded_methods": cfg.seeds,
                      "deterministic": [x for x in cfg.methods if x in methods.DETERMINISTIC_METHODS]},
            "spp_search_constants": spp_search,
            "search_configs": configs, "search_seconds": searches, "budgets": budgets,
            "budget_rule": {"joint": "MACs of one image plus one caption", "image": "image tower MACs; text dense",
                            "text": "text tower MACs; image dense",
                            "each": "each tower to the fraction of its own MACs"}[cfg.budget_towers],
            "refit": {"what": "both projections and the logit scale, towers frozen, contrastive loss (Adam)",
                      **recipe, "pairs": len(refit_keys),
                      "rule": "the same recipe, fit set and seed for every row, the dense one included"
                              + ("; from scratch: the dense projections' own recipe, which re-makes them on the "
                                 "dense model" if recipe.get("init") == "scratch" else
                                 "; from each model's current projections")},
            "finetune": {**FINETUNE_DEFAULTS, "lr": cfg.finetune_lr, "steps": cfg.finetune_steps,
                         "label_smoothing": None, "loss": "symmetric InfoNCE (contrastive_loss)",
                         "start": "from the projection re-fit", "batch_size": cfg.finetune_batch},
            "metrics": "recall@k in % (image->text, text->image), rsum = their sum; relevance: "
                       + task.info.get("relevance", "a caption is relevant to its own image"),
            "readout_rule": "per budget, the read-out with the higher re-fit rsum on the validation split"
                            if cfg.readout == "val" else f"fixed: {cfg.readout}",
            "seconds": round(time.perf_counter() - t_start, 1)}
    folder = write_record(cfg.study, cfg, None, table, info, paths=paths, health=health,
                          arrays={"ranks.npz": ranks}) if record else None
    if folder:
        log(f"record written: {folder}")
    return {"table": table, "summary": summary, "sanity": sanity, "ranks": ranks, "record": folder, "info": info,
            "config": dataclasses.asdict(cfg), "paths": paths, "path_health": health}


def ranks_key(model: str, method: str, budget: float, seed: int, stage: str, direction: str) -> str:
    """The key of one per-query rank array in a CLIP table's ``ranks.npz``:
    "model|method|budget|seed|stage|direction" (stage no_retrain / refit / finetuned; direction i2t / t2i)."""
    return f"{model}|{method}|{float(budget)!r}|{int(seed)}|{stage}|{direction}"


def summarize_clip(table, ranks: dict | None = None, *, ref: str = "spp", resamples: int = 2000):
    """One row per model x method x budget: mean and sample sd (ddof = 1) over seeds of every rsum column, seeds, and
    with ``ranks`` for each stage S the paired comparison of rsum with ``ref`` at the same budget: ``delta_S_rsum``,
    ``delta_S_rsum_lo`` / ``_hi`` (95% two-level bootstrap: seeds, then image and caption queries) and
    ``verdict_S_rsum`` (better / worse / tie; 'reference' on the reference's rows)."""

    by = ["model", "method", "budget_macs_fraction"]
    cols = [c for c in table.columns if c.endswith("_rsum") or c in ("macs_fraction", "search_s")]
    g = table.groupby(by, sort=False)[cols]
    out = g.mean()
    sd = g.std(ddof=1)
    for c in cols:
        if c.endswith("_rsum"):
            out[c + "_sd"] = sd[c]
    out["seeds"] = g.size()
    out = out.reset_index()
    if not ranks:
        return out

    def per_seed(model, method, budget, stage):
        return _per_seed_rsum(ranks, model, method, budget, stage)

    stages = [c[:-len("_rsum")] for c in cols if c.endswith("_rsum")]
    extra: dict = {}
    for _, r in out.iterrows():
        for st in stages:
            a = per_seed(r["model"], r["method"], r["budget_macs_fraction"], st)
            b = per_seed(r["model"], ref, r["budget_macs_fraction"], st)
            if r["method"] == ref:
                v = {"delta": 0.0, "lo": 0.0, "hi": 0.0, "verdict": "reference"}
            elif not a or not b:
                v = {"delta": None, "lo": None, "hi": None, "verdict": None}
            else:
                v = stats.paired_bootstrap_parts([([x[d] for x in a], [y[d] for y in b]) for d in ("i2t", "t2i")],
                                                 resamples=resamples, resample_seeds=True)
            for k, n in (("delta", f"delta_{st}_rsum"), ("lo", f"delta_{st}_rsum_lo"), ("hi", f"delta_{st}_rsum_hi"),
                         ("verdict", f"verdict_{st}_rsum")):
                extra.setdefault(n, []).append(v[k])
    for n, v in extra.items():
        out[n] = v
    return out


def _per_seed_rsum(ranks: dict, model: str, method: str, budget: float, stage: str) -> list[dict]:

    prefix = f"{model}|{method}|{float(budget)!r}|"
    seeds = sorted({int(k.split("|")[3]) for k in ranks if k.startswith(prefix) and f"|{stage}|" in k})
    return [rsum_per_query({d: ranks[f"{prefix}{s}|{stage}|{d}"] for d in ("i2t", "t2i")}) for s in seeds]


def _fit_losses(part, method: str, budget: float) -> dict | None:
    """The diagnostic behind a pruned row above dense: the re-fit's loss on the fit pairs (mean over seeds) of the
    row and of the dense model (None where the table does not carry ``refit_fit_loss``)."""
    if "refit_fit_loss" not in part:
        return None
    row = part[(part["method"] == method) & (part["budget_macs_fraction"] == budget)]["refit_fit_loss"].dropna()
    dense = part[part["method"] == "dense"]["refit_fit_loss"].dropna()
    if row.empty or dense.empty:
        return None
    return {"fit_loss": float(row.mean()), "fit_loss_dense": float(dense.mean())}


def sanity_checks_clip(table, ranks: dict, *, resamples: int = 2000) -> list[dict]:
    """The CLIP protocol's own checks on rsum, each a paired interval (seeds, then image and caption queries):
    a pruned row must not beat the dense model beyond its interval, and a method's rsum must not rise beyond noise
    as its budget shrinks. Returns the failures (an empty list = every check passed). A re-fit row above dense
    carries both re-fit losses on the fit pairs (``fit_loss``, ``fit_loss_dense``): whether the pruned features fit
    the task's own pairs better, or only do better on held-out images."""

    def compare(a, b):
        return stats.paired_bootstrap_parts([([x[d] for x in a], [y[d] for y in b]) for d in ("i2t", "t2i")],
                                            resamples=resamples, resample_seeds=True)

    fails = []
    if not ranks:
        return fails
    for model, part in table.groupby("model", sort=False):
        if not (part["method"] == "dense").any():
            continue
        stages = [c[:-len("_rsum")] for c in part.columns if c.endswith("_rsum") and part[c].notna().any()]
        for method, rows in part[part["method"] != "dense"].groupby("method", sort=False):
            budgets = sorted(set(rows["budget_macs_fraction"]), reverse=True)
            for st in stages:
                d = _per_seed_rsum(ranks, model, "dense", 1.0, st)
                if not d:
                    continue
                prev = None
                for b in budgets:
                    a = _per_seed_rsum(ranks, model, method, b, st)
                    if not a:
                        continue
                    c = compare(a, d)
                    if c["lo"] > 0:
                        fit = _fit_losses(part, method, b) if st == "refit" else None
                        fails.append({"check": "pruned beats dense", "model": model, "method": method, "budget": b,
                                      "stage": st, **{k: c[k] for k in ("delta", "lo", "hi")}, **(fit or {}),
                                      "message": f"{model} {method} at {b:g} MACs beats the dense model on {st} rsum "
                                                 f"by {c['delta']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]"
                                                 + (f"; re-fit loss on the fit pairs {fit['fit_loss']:.3f} vs dense "
                                                    f"{fit['fit_loss_dense']:.3f} ("
                                                    + ("the dense model fits the fit set better: the gain is on "
                                                       "held-out images, not a better fit"
                                                       if fit["fit_loss"] > fit["fit_loss_dense"] else
                                                       "the pruned features also fit the fit set better") + ")"
                                                    if fit else "")})
                    if prev is not None:
                        c = compare(a, prev[1])
                        if c["lo"] > 0:
                            fails.append({"check": "rsum rises as the budget shrinks", "model": model,
                                          "method": method, "budget": b, "stage": st,
                                          **{k: c[k] for k in ("delta", "lo", "hi")},
                                          "message": f"{model} {method} {st} rsum: {b:g} MACs beats {prev[0]:g} MACs "
                                                     f"by {c['delta']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]"})
                    prev = (b, a)
    return fails
