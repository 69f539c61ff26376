"""The quickstart study (notebook 00, ``python -m sppbench quickstart``) and its constant tuning on the embedded ViT."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import measure
from ..core.compress import compress
from ..core.masks import MaskedModel
from ..core.path import KeepSet, SolutionPath
from ..core.search import search
from ..families import attach_masks
from ..tasks.data import Batches, ImageSet
from ..tasks.embedded import HEAD_WEIGHT_DECAY, IMG_SIZE, STAND_IN, embedded_classifier
from ..tasks.evaluate import features, fit_linear_head
from .common import check_types, search_defaults, write_record


@dataclass
class QuickstartConfig:
    """One SPP search on the embedded classifier, several budgets read off its one path."""

    img_size: int = IMG_SIZE
    n_head: int = 3000          # training images the classifier's linear head was fit on
    n_val: int = 1000           # validation images (training split) for choosing constants
    n_test: int = 1000          # test images for reporting
    n_refit: int = 1000         # training images for the head re-fit read-out
    split_seed: int = 0
    head_weight_decay: float = HEAD_WEIGHT_DECAY
    steps: int = 100
    batch_size: int = 32
    kappa: float = 0.0          # 0 = the profile's tuned default (sppbench/configs/search_embedded.json)
    alpha: float = 0.0
    nu: float = 0.0
    lam: float = 0.0
    variant: str = "paper"
    seed: int = 0
    fractions: tuple[float, ...] = (0.9, 0.7, 0.5, 0.4, 0.3)
    readout: str = "global"
    latency_batch: int = 32
    latency_repeats: int = 10
    study: str = "quickstart"

    def resolved(self) -> "QuickstartConfig":
        check_types(self)
        d = search_defaults("embedded")["constants"]
        return dataclasses.replace(self, **{k: (getattr(self, k) or d[k]) for k in ("kappa", "alpha", "nu", "lam")})


@dataclass
class BudgetResult:
    row: dict
    keep: KeepSet | None = None


def evaluate_model(model: torch.nn.Module, orig_head: torch.nn.Linear, refit: ImageSet, evalset: ImageSet,
                   img_size: int, weight_decay: float) -> dict:
    """Top-1 with no retraining (the original head) and with the linear head re-fit on the model's features."""
    f_eval = features(model, evalset, img_size)
    with torch.no_grad():
        plain = float((orig_head(f_eval).argmax(-1) == evalset.labels).float().mean())
    head = fit_linear_head(features(model, refit, img_size), refit.labels, orig_head.out_features,
                           weight_decay=weight_decay)
    return {"top1_no_retrain": plain, "top1_head_refit": head.accuracy(f_eval, evalset.labels)}


def cost_row(model: torch.nn.Module, img_size: int, latency_batch: int, repeats: int) -> dict:
    x = torch.randn(2, 3, img_size, img_size)
    xl = torch.randn(latency_batch, 3, img_size, img_size)
    lat = measure.latency(model, xl, warmup=2, repeats=repeats)
    return {"params": measure.params(model), "macs": measure.macs(model, x), "latency_ms": 1e3 * lat["median_s"],
            "latency_batch": latency_batch, "threads": lat["threads"]}


def search_embedded(m: MaskedModel, fit: ImageSet, cfg) -> SolutionPath:
    batches = Batches(fit, cfg.img_size, cfg.batch_size, cfg.steps, seed=cfg.seed)
    return search(m, batches, F.cross_entropy, steps=cfg.steps, kappa=cfg.kappa, alpha=cfg.alpha, nu=cfg.nu,
                  lam=cfg.lam, variant=cfg.variant, seed=cfg.seed, record_every=1)


def run_quickstart(cfg: QuickstartConfig | None = None, *, record: bool = True, progress: bool = True) -> dict:
    """Search once, read every budget off the one path, compress and evaluate each; write a record.

    Returns {"table": DataFrame, "path": SolutionPath, "record": folder or None, "config": dict, "info": dict}.
    """
    import pandas as pd

    cfg = (cfg or QuickstartConfig()).resolved()
    t0 = time.perf_counter()
    ec = embedded_classifier(cfg.img_size, n_fit=cfg.n_head, n_val=cfg.n_val, n_test=cfg.n_test,
                             seed=cfg.split_seed, weight_decay=cfg.head_weight_decay)
    refit = ec.splits.fit.subset(range(min(cfg.n_refit, len(ec.splits.fit))))
    dense = ec.model
    head = dense.head
    rows = []

    def log(msg):
        if progress:
            print(f"[quickstart {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    log(f"dense model ready ({STAND_IN})")
    rows.append({"budget": "dense", "fraction": 1.0, **cost_row(dense, cfg.img_size, cfg.latency_batch,
                                                                  cfg.latency_repeats),
                 **evaluate_model(dense, head, refit, ec.splits.test, cfg.img_size, cfg.head_weight_decay)})
    m = attach_masks(dense, input_size=(3, cfg.img_size, cfg.img_size))
    path = search_embedded(m, ec.splits.fit, cfg)
    log(f"search done: {cfg.steps} steps in {path.config['seconds']:.1f}s")
    keeps = []
    for f in cfg.fractions:
        keep = path.keep(fraction=f, readout=cfg.readout)
        keeps.append(keep)
        small = compress(m, keep)
        row = {"budget": f"fraction={f}", "fraction": keep.fraction, "fraction_attn": keep.fractions["attn"],
               "fraction_mlp": keep.fractions["mlp"], "analytic_params": keep.params, "analytic_macs": keep.macs,
               **cost_row(small, cfg.img_size, cfg.latency_batch, cfg.latency_repeats),
               **evaluate_model(small, small.head, refit, ec.splits.test, cfg.img_size, cfg.head_weight_decay)}
        rows.append(row)
        log(f"{row['budget']}: params {row['params']:,} MACs {row['macs']:,} top-1 {row['top1_no_retrain']:.3f} / "
            f"refit {row['top1_head_refit']:.3f}")
    m.detach_masks()
    table = pd.DataFrame(rows)
    nested = all(a.issubset(b) for a, b in zip(keeps[1:], keeps[:-1])) if len(keeps) > 1 else True
    info = {**ec.info, "stand_in": STAND_IN, "nested": nested, "seconds": round(time.perf_counter() - t0, 1),
            "eval_split": "test", "refit_images": len(refit), "top1_settings": {
                "no_retrain": "the dense classifier's head applied to the pruned features",
                "head_refit": f"L-BFGS logistic regression, weight decay {cfg.head_weight_decay}, on {len(refit)} "
                              "training images' pruned features"}}
    folder = None
    if record:
        folder = write_record(cfg.study, cfg, path, table, info)
        log(f"record written: {folder}")
    return {"table": table, "path": path, "record": folder, "config": dataclasses.asdict(cfg), "info": info,
            "keeps": keeps}


@dataclass
class TuneConfig:
    """A grid over the SLBI constants, scored on the validation split (never the test split)."""

    img_size: int = IMG_SIZE
    n_head: int = 3000
    n_val: int = 1000
    n_refit: int = 1000
    split_seed: int = 0
    head_weight_decay: float = HEAD_WEIGHT_DECAY
    steps: int = 100
    batch_size: int = 32
    grid: tuple = ()            # tuple of dicts {kappa, alpha, nu, lam}
    variant: str = "paper"
    seed: int = 0
    score_fractions: tuple[float, ...] = (0.5, 0.3)
    readout: str = "global"
    study: str = "tune_embedded"


SELECTION_RULE = (
    "score = mean head-refit top-1 on the validation split (training data, never the test set); among the "
    "points scoring within one standard error of the best (se = sqrt(p(1-p)/n_val)), the one whose search "
    "loss peaked lowest (the most stable dynamics)"
)


def select_constants(table, n_val: int) -> dict | None:
    """Apply SELECTION_RULE to a tuning table; returns the chosen row as a dict."""
    if "score" not in table:
        return None
    ok = table.dropna(subset=["score"])
    if ok.empty:
        return None
    top = float(ok["score"].max())
    se = (top * (1 - top) / n_val) ** 0.5
    near = ok[ok["score"] >= top - se]
    key = "loss_max" if "loss_max" in near else "score"
    return near.sort_values(key, ascending=key != "score").iloc[0].to_dict()


def run_tune(cfg: TuneConfig, progress: bool = True) -> dict:
    """Search once per grid point; score = mean head-refit top-1 on val over ``score_fractions``."""
    import pandas as pd

    ec = embedded_classifier(cfg.img_size, n_fit=cfg.n_head, n_val=cfg.n_val, n_test=10, seed=cfg.split_seed,
                             weight_decay=cfg.head_weight_decay)
    refit = ec.splits.fit.subset(range(min(cfg.n_refit, len(ec.splits.fit))))
    rows = []
    for point in cfg.grid:
        c = dataclasses.replace(QuickstartConfig(img_size=cfg.img_size, steps=cfg.steps, batch_size=cfg.batch_size,
                                                 variant=cfg.variant, seed=cfg.seed), **point)
        m = attach_masks(ec.model, input_size=(3, cfg.img_size, cfg.img_size))
        t = time.perf_counter()
        try:
            path = search_embedded(m, ec.splits.fit, c)
        except Exception as exc:  # a diverged point is a result, not a crash of the study
            m.detach_masks()
            rows.append({**point, "error": repr(exc)})
            continue
        losses = [h["loss"] for h in path.history]
        row = {**point, "search_s": round(time.perf_counter() - t, 1), "loss_first": losses[0],
               "loss_max": max(losses), "loss_last_10": sum(losses[-10:]) / len(losses[-10:])}
        entered = sum(int((s >= 0).sum()) for s in path.entry_step.values())
        row["entered_fraction"] = entered / sum(g.size for g in path.groups)
        scores = []
        for f in cfg.score_fractions:
            keep = path.keep(fraction=f, readout=cfg.readout)
            small = compress(m, keep)
            r = evaluate_model(small, small.head, refit, ec.splits.val, cfg.img_size, cfg.head_weight_decay)
            row[f"val_refit@{f}"] = r["top1_head_refit"]
            row[f"val_plain@{f}"] = r["top1_no_retrain"]
            scores.append(r["top1_head_refit"])
        row["score"] = sum(scores) / len(scores)
        m.detach_masks()
        rows.append(row)
        if progress:
            print(f"[tune] {row}", flush=True)
    table = pd.DataFrame(rows)
    best = select_constants(table, len(ec.splits.val))
    info = {"stand_in": STAND_IN, "selection": SELECTION_RULE, "best": best, "splits": ec.splits.sizes()}
    folder = write_record(cfg.study, cfg, None, table, info)
    return {"table": table, "best": best, "record": folder}
