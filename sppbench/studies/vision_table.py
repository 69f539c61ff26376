"""The vision table: every method prunes the same model, with the same masks, data, budgets and read-outs.

Notebook 10 and ``python -m sppbench vision-table`` run it; its record format is in docs/records.md.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import methods
from ..core import measure
from ..core.compress import compress
from ..core.path import READOUTS
from ..core.search import FINETUNE_DEFAULTS, finetune
from ..errors import SppBenchError, UnsupportedModelError
from ..tasks.data import preprocess
from ..tasks.evaluate import fit_linear_head, loader_features, own_head_top1
from ..tasks.vision import VisionTask, get_task
from . import stats
from .common import check_types, derive_constants, flat_keep, flat_ranking, path_health, search_defaults, write_record


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def evaluate(model: nn.Module, task: VisionTask, splits: tuple[str, ...] = ("val",), cache: dict | None = None) -> dict:
    """Top-1 with the model's own head ('{split}_no_retrain') and with a linear head re-fit on the
    'refit' split's features ('{split}_head_refit'), for each split asked."""
    cache = {} if cache is None else cache
    if "head" not in cache:
        f, y = loader_features(model, task.loader("refit"))
        cache["head"] = fit_linear_head(f, y, task.num_classes, weight_decay=task.head_weight_decay)
    out = {}
    for s in splits:
        f, y = loader_features(model, task.loader(s))
        out[f"{s}_no_retrain"] = own_head_top1(model, f, y)
        out[f"{s}_head_refit"] = cache["head"].accuracy(f, y)
    return out


# The read-outs of the table, each scored per test image (docs/records.md):
#   no_retrain      the model's own (dense) head on the pruned features;
#   restandardised  the own head after only the feature mean and scale are re-estimated: pruned features z-scored
#                   with their own per-dimension mean / sd on the refit split, then mapped to the dense model's
#                   mean / sd there (no weight is trained; for the dense model it is the identity);
#   head_refit      a linear head re-fit (L-BFGS, the dense head's weight decay) on the refit split's features;
#   finetuned       the own head after the shared fine-tune (only when the table fine-tunes).
STAGES = ("no_retrain", "restandardised", "head_refit")


def fit_readouts(model: nn.Module, task: VisionTask) -> dict:
    """What the read-outs need from the refit split: the re-fit head and the features' mean and scale."""
    f, y = loader_features(model, task.loader("refit"))
    return {"head": fit_linear_head(f, y, task.num_classes, weight_decay=task.head_weight_decay),
            "mu": f.mean(0), "sd": f.std(0).clamp_min(1e-6)}


@torch.no_grad()
def stage_correct(model: nn.Module, task: VisionTask, split: str, fitted: dict, dense_fitted: dict) -> dict:
    """Per-image 0/1 correctness of every read-out in ``STAGES`` on ``split``, from ONE pass of features."""
    f, y = loader_features(model, task.loader(split))
    head = model.get_classifier()
    dev = next(model.parameters()).device

    def own(z: torch.Tensor) -> torch.Tensor:
        return (head(z.to(dev)).argmax(-1).cpu() == y)

    restd = (f - fitted["mu"]) / fitted["sd"] * dense_fitted["sd"] + dense_fitted["mu"]
    return {"no_retrain": own(f), "restandardised": own(restd),
            "head_refit": fitted["head"](f).argmax(-1) == y, "labels": y}


def correct_key(model: str, method: str, budget: float, seed: int, stage: str) -> str:
    """The key of one per-image 0/1 array in a table's ``correct.npz``: "model|method|budget|seed|stage"."""
    return f"{model}|{method}|{float(budget)!r}|{int(seed)}|{stage}"


def keep_key(model: str, method: str, budget: float, seed: int) -> str:
    """The key of one keep-set in a table's ``keepsets.npz``: "model|method|budget|seed" (docs/records.md)."""
    return f"{model}|{method}|{float(budget)!r}|{int(seed)}"


def rank_key(model: str, method: str, seed: int) -> str:
    """The key of one ranking method's order in a table's ``rankings.npz``: "model|method|seed"."""
    return f"{model}|{method}|{int(seed)}"


# The order arms (issue 36): SPP's own search of the same seed, read other ways at the same budgets, so that their rows
# compare orders, not searches (does the entry order carry information its final state or its widths do not?). They
# are rows of the table (these method names), not pruning methods: each reads the 'spp' search of its seed, so 'spp'
# must come before them in the table's method list. No search of their own (search_s 0).
ORDER_ARMS = {
    "spp-final-m": "SPP's search ranked by its own final |M| (read-out chosen as for every ranking method)",
    "spp-final-v": "SPP's search ranked by its own final |V| (read-out chosen as for every ranking method)",
    "random-spp-widths": "the 'random' method's order of the same seed, kept at the per-layer widths of SPP's row of "
                         "the same seed and budget (the same widths, so the same MACs, as that row)",
}


def parse_key(key: str) -> dict:
    model, method, budget, seed, stage = key.split("|")
    return {"model": model, "method": method, "budget": float(budget), "seed": int(seed), "stage": stage}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
@dataclass
class VisionTableConfig:
    """Parameters of one vision table (defaults: the embedded profile at full size)."""

    model: str = "embedded-vit"
    methods: tuple[str, ...] = ("spp", "spp-final-m", "spp-final-v", "random-spp-widths", "spp-official", "lasso",
                                "lasso-rank", "dessilbi", "magnitude", "random", "tp-magnitude", "tp-taylor")
                                     # (the order arms, ORDER_ARMS, read spp's own search: after spp)
    macs_fractions: tuple[float, ...] = (0.7, 0.5, 0.35)   # budgets: fractions of the dense model's MACs
    steps: int = 160                 # search steps (every searching method: the same count)
    batch_size: int = 32
    seed: int = 0
    seeds: int = 3                   # every method with randomness (search batch order, random order, Taylor batches)
                                     # runs with seeds seed, seed+1, ...; magnitude and tp-magnitude once
    readout: str = "val"             # 'val' = global / per-layer chosen per method and budget on val (first seed)
    lasso_trials: int = 6            # Lasso searches per seed, shared by every budget (methods.lasso_family)
    n_head: int = 3000
    n_val: int = 1000
    n_test: int = 10000              # Fashion-MNIST's whole test split
    n_refit: int = 3000              # the head re-fit's images (embedded ViT: = n_head, the dense head's own fit set)
    split_seed: int = 0
    resamples: int = 2000            # paired bootstrap resamples (over test images) of the table's comparisons
    finetune_steps: int = 0          # 0 = no fine-tune column (the short CPU fine-tune recovered nothing; issue 18)
    finetune_batch: int = 32
    finetune_lr: float = FINETUNE_DEFAULTS["lr"]
    kappa: float = 0.0               # SPP constants (paper form); 0 = the embedded profile's tuned defaults on the
    alpha: float = 0.0               # embedded models, and on every other model the automatic constants derived from
    nu: float = 0.0                  # the model at the table's step count (sppbench.core.auto); given ones (all four)
    lam: float = 0.0                 # are used as they are
    spp_form: str = ""               # the 'spp' rows' search: "adam" (the labelled variant whose path is healthy on the
                                     # stand-ins; methods.adam_constants) or "paper" (the constants above);
                                     # "" = adam for the embedded stand-ins, paper for the paper models
    data_root: str = ""              # paper profile / timm:<name>: the ImageNet-layout folder (else $SPPBENCH_IMAGENET)
    weights: str = ""                # paper models / timm:<name>: a local weights file (else the hub's weights)
    method_settings: dict = field(default_factory=dict)  # method -> its knob's value, e.g. {"lasso-rank": {"lr": 0.02}}
                                     # (chosen on validation by sppbench.studies.tuning; methods.TUNING_KNOBS)
    eval_split: str = "test"         # "val" only for tuning: every row is scored on the validation split
    study: str = "vision_table"

    def resolved(self) -> "VisionTableConfig":
        check_types(self)
        for i, m in enumerate(self.methods):
            if m not in ORDER_ARMS:
                methods.check_method(m)
            elif "spp" not in self.methods[:i]:
                raise ValueError(f"{m} reads SPP's own search: put 'spp' before it in methods (got {self.methods})")
        if self.readout not in ("val", *READOUTS):
            raise ValueError(f"readout must be 'val', 'global' or 'per-layer', got {self.readout!r}")
        if not self.macs_fractions or not all(0 < f <= 1 for f in self.macs_fractions):
            raise ValueError(f"macs_fractions must be fractions in (0, 1], got {self.macs_fractions!r}")
        if self.seeds < 1 or self.lasso_trials < 2 or self.resamples < 100:
            raise ValueError(f"seeds must be >= 1, lasso_trials >= 2 (a budget needs a try on each side) and resamples "
                             f">= 100, got {self.seeds}, {self.lasso_trials}, {self.resamples}")
        if self.finetune_steps < 0 or self.n_test < 1 or self.n_refit < 1 or self.n_val < 1:
            raise ValueError("finetune_steps must be >= 0 and n_test, n_refit, n_val >= 1")
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be 'test' or 'val' (tuning), got {self.eval_split!r}")
        if not isinstance(self.method_settings, dict):
            raise TypeError(f"method_settings must be a dict method -> settings, got {self.method_settings!r}")
        for meth, st in self.method_settings.items():
            knob = methods.TUNING_KNOBS.get(meth)
            if knob is None or not isinstance(st, dict) or set(st) - {knob}:
                raise ValueError(f"method_settings[{meth!r}] = {st!r}: only the searching methods' knobs can be set: "
                                 f"{methods.TUNING_KNOBS}")
            v = st.get(knob)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 < v < float("inf")):
                raise ValueError(f"method_settings[{meth!r}][{knob!r}] must be a positive finite number, got {v!r}")
        if "spp" in self.method_settings and self.form != "adam":
            raise ValueError("method_settings['spp'] sets the adam form's lr; the paper form has no such knob")
        if self.spp_form not in ("", *methods.SPP_FORMS):
            raise ValueError(f"spp_form must be one of {methods.SPP_FORMS} (or '' for the model's default), "
                             f"got {self.spp_form!r}")
        return self

    @property
    def form(self) -> str:
        """The 'spp' search's form: spp_form, or its default for the model (adam for embedded stand-ins)."""
        return self.spp_form or ("adam" if self.model.startswith("embedded") else "paper")


def _width_spread(head_dims, mlp_hidden) -> dict:
    """Layer spread of a peer's pruned widths (per-block kept widths; no keep-set over sppbench's masks)."""
    if not head_dims or not mlp_hidden:
        return {}
    out = {}
    for key, widths in (("spread_attn_cv", head_dims), ("spread_mlp_cv", mlp_hidden)):
        w = torch.tensor(widths, dtype=torch.float64)
        out[key] = float(w.std(unbiased=False) / w.mean()) if float(w.mean()) > 0 else 0.0
    out["empty_blocks"] = 0  # Torch-Pruning keeps at least one unit of every group
    return out


def spp_constants(cfg: VisionTableConfig) -> dict | None:
    """The SPP constants of a run: given (all four), the embedded profile's tuned defaults for the embedded models
    (missing ones filled), or None = derive them from the model (``derive_constants``: every other model)."""
    given = {k: getattr(cfg, k) for k in ("kappa", "alpha", "nu", "lam")}
    if all(given.values()):
        return given
    if not cfg.model.startswith("embedded"):
        if any(given.values()):
            raise SppBenchError(f"{cfg.model}: give all four SPP constants (kappa, alpha, nu, lam) or none (then they "
                                f"are derived from the model, sppbench.core.auto); given only "
                                f"{[k for k, v in given.items() if v]}")
        return None
    d = search_defaults("embedded")["constants"]
    return {k: (v or d[k]) for k, v in given.items()}


def constants_source(cfg: VisionTableConfig) -> str:
    """Where a table's SPP constants come from: "given", "tuned" (the embedded profile's) or "auto"."""
    given = [getattr(cfg, k) for k in ("kappa", "alpha", "nu", "lam")]
    return "given" if all(given) else ("tuned" if cfg.model.startswith("embedded") else "auto")


def study_task(model: str, n_val: int, n_test: int, n_refit: int):
    """The vision task the studies run on (embedded model name; split sizes)."""
    return get_task(model, n_val=n_val, n_test=n_test, n_refit=n_refit)


def spp_for(model: str) -> dict:
    """The vision table's SPP constants for the embedded ``model`` (the studies search with the table's settings)."""
    spp = spp_constants(VisionTableConfig(model=model))
    if spp is None:
        raise SppBenchError(f"{model}: the studies run on the embedded models (their tuned constants); on other models "
                            "the vision table derives the constants from the model (info.spp_constants of its record)")
    return spp


def _spread_cols(keep, groups) -> dict:
    if keep is None:
        return {}
    s = methods.spread(keep, groups)
    return {"spread_attn_cv": s["attn"]["cv"], "spread_mlp_cv": s["mlp"]["cv"],
            "empty_blocks": s["attn"]["empty_blocks"] + s["mlp"]["empty_blocks"]}


def run_vision_table(cfg: VisionTableConfig | None = None, *, record: bool = True, progress: bool = True,
                     task: VisionTask | None = None) -> dict:
    """Run every method at every budget and seed; returns {"table" (one row per model x method x budget x seed),
    "summary" (one row per model x method x budget: mean, sd over seeds and the paired statistics against SPP),
    "correct" (per-image 0/1 arrays, keys ``correct_key``), "sanity", "record", "info", "config", "paths",
    "path_health"}."""
    import numpy as np
    import pandas as pd

    cfg = (cfg or VisionTableConfig()).resolved()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[vision {time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    spp = spp_constants(cfg)  # None: derived from the model below, once the masks are on (automatic constants)
    spp_auto = None
    if task is None:
        task = get_task(cfg.model, cfg.data_root, weights=cfg.weights or None, n_val=cfg.n_val, n_test=cfg.n_test,
                        n_refit=cfg.n_refit, **({"n_head": cfg.n_head, "split_seed": cfg.split_seed}
                                                if cfg.model.startswith("embedded") else {}))
    x_macs = preprocess(torch.zeros(2, 28, 28, dtype=torch.uint8), task.img_size) if task.name.startswith("embedded") \
        else torch.randn(2, 3, task.img_size, task.img_size)
    dense = task.dense
    dense_macs, dense_params = measure.macs(dense, x_macs), measure.params(dense)
    rows: list[dict] = []
    correct: dict[str, np.ndarray] = {}
    stages = STAGES + (("finetuned",) if cfg.finetune_steps else ())
    timing = {"search_s": 0.0, "readout_choice_s": 0.0, "test_eval_s": 0.0, "finetune_s": 0.0}

    def score(model: nn.Module, fitted: dict, method: str, budget: float, seed: int) -> dict:
        """Every read-out on the test split from one pass; the per-image arrays go to ``correct``."""
        t0 = time.perf_counter()
        res = stage_correct(model, task, cfg.eval_split, fitted, dense_fitted)
        labels = res.pop("labels")
        if cfg.finetune_steps:
            t1 = time.perf_counter()
            res["finetuned"] = finetuned_correct(model, seed, fitted["head"], labels)
            timing["finetune_s"] += time.perf_counter() - t1
        for st, arr in res.items():
            correct[correct_key(task.name, method, budget, seed, st)] = arr.numpy().astype(np.uint8)
        timing["test_eval_s"] += time.perf_counter() - t0
        return {f"top1_{st}": float(arr.float().mean()) for st, arr in res.items()}

    def finetuned_correct(model: nn.Module, seed: int, head, labels) -> torch.Tensor:
        """LP-FT: start from the head re-fit on the pruned features, then the shared AdamW fine-tune."""
        tuned = copy.deepcopy(model)
        lin = tuned.get_classifier()
        if lin.out_features != head.weight.shape[0]:  # a head for another label set (e.g. 1000 classes, a 4-class
            dev = lin.weight.device                   # folder): the fine-tune trains a head of the task's classes
            tuned.reset_classifier(head.weight.shape[0])
            lin = tuned.get_classifier().to(dev)
        with torch.no_grad():
            lin.weight.copy_(head.weight.to(lin.weight))
            lin.bias.copy_(head.bias.to(lin.bias))
        finetune(tuned, task.train_batches(cfg.finetune_batch, cfg.finetune_steps, seed + 1000),
                 steps=cfg.finetune_steps, lr=cfg.finetune_lr, seed=seed)
        f, y = loader_features(tuned, task.loader("test"))
        with torch.no_grad():
            pred = tuned.get_classifier()(f.to(next(tuned.parameters()).device)).argmax(-1).cpu()
        return pred == labels

    # the dense reference: the same read-outs (its re-standardised read-out is the identity; its re-fit head is
    # fit on the same refit images as every pruned model's)
    dense_fitted = fit_readouts(dense, task)
    ev = score(dense, dense_fitted, "dense", 1.0, cfg.seed)
    rows.append({"model": task.name, "method": "dense", "seed": cfg.seed, "budget_macs_fraction": 1.0,
                 "target_macs": dense_macs, "macs": dense_macs, "params": dense_params, "macs_fraction": 1.0,
                 "readout": None, **ev, "search_s": 0.0})
    log("dense: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    test_images = len(correct[correct_key(task.name, "dense", 1.0, cfg.seed, "no_retrain")])
    budgets = [{"macs": int(f * dense_macs)} for f in cfg.macs_fractions]
    m = task.attach(dense)
    if spp is None:
        try:
            spp, spp_auto = derive_constants(m, task.train_batches(cfg.batch_size, cfg.steps, cfg.seed),
                                             F.cross_entropy, cfg.steps, seed=cfg.seed)
        except BaseException:
            m.detach_masks()
            raise
        log("automatic SPP constants (sppbench.core.auto): " + ", ".join(f"{k} {v:.4g}" for k, v in spp.items())
            + ("" if spp_auto["implied"]["can_hold"] else
               f"; the paper form needs about {spp_auto['implied']['steps_to_hold']:,} steps to hold the model"))
    # the 'spp' rows' own search (docs/path_health.md); the baselines keep the paper-form constants above
    spp_search = methods.spp_search_constants(cfg.form, spp, cfg.model, cfg.steps)
    official = methods.official_constants(cfg.model, cfg.steps)
    if "spp-official" in cfg.methods and official.get("note"):
        log(f"spp-official: {official['note']}")
    searches, skipped, refused = {}, {}, {}
    configs: dict[str, object] = {}  # every search's settings (Lasso: each lambda try; peers: each ratio try)
    paths: dict[str, object] = {}     # the solution paths of the path methods, saved with their health
    health: dict[str, dict] = {}
    keep_digest: dict[tuple, str] = {}  # (method, seed, budget) -> digest of the keep-set: identical rows are flagged
    keepsets: dict[str, np.ndarray] = {}  # keep_key -> every kept entry as one bool vector (keepsets.npz)
    rankings: dict[str, np.ndarray] = {}  # rank_key -> a ranking method's global order of every entry (rankings.npz)
    spp_runs: dict[int, tuple] = {}   # seed -> (spp's path, its chosen rows): what the order arms read
    readout_of: dict[tuple, str] = {}  # (method, budget) -> the read-out chosen on validation at the first seed

    def choose(method: str, path, common: dict) -> list:
        """(val top-1 or None, Pruned, fitted read-outs) per budget: the read-out chosen per method and budget on the
        validation split's head re-fit at the method's first seed, and used as it is at its later seeds."""
        fixed = ["per-layer"] if method == "random" else [cfg.readout] if cfg.readout != "val" else None
        chosen = []
        for b, frac in zip(budgets, cfg.macs_fractions):
            candidates = fixed or ([readout_of[(method, frac)]] if (method, frac) in readout_of else list(READOUTS))
            best = None
            for ro in candidates:
                p = methods.prune("spp" if method in ORDER_ARMS else method, m, [b], readout=ro, path=path,
                                  **common)[0]
                fitted = fit_readouts(p.model, task)
                val = None
                if len(candidates) > 1:
                    val = float(stage_correct(p.model, task, "val", fitted, dense_fitted)["head_refit"].float().mean())
                if best is None or (val is not None and val > best[0]):
                    best = (val, p, fitted)
            readout_of.setdefault((method, frac), best[1].readout)
            chosen.append(best)
        return chosen

    def at_spp_widths(seed: int) -> list:
        """random-spp-widths: the random order of ``seed`` at the widths of SPP's rows of the same seed."""
        order = methods.random_path(m, seed)
        chosen = []
        for _, sp, _ in spp_runs[seed][1]:
            t = time.perf_counter()
            keep = order.keep_widths(sp.keep.widths(), request=sp.budget)
            small = compress(m, keep)
            p = methods.Pruned("random-spp-widths", dict(sp.budget), small, keep, time.perf_counter() - t, 0.0,
                               "widths", {"search": {"method": "random", "seed": seed, "widths": f"spp@seed{seed}"}})
            chosen.append((None, p, fit_readouts(small, task)))
        return chosen

    try:
        for method in cfg.methods:
            if method in methods.PEER_METHODS and methods.peer_reason(method):
                skipped[method] = methods.peer_reason(method)
                continue
            seeds = [cfg.seed] if method in methods.DETERMINISTIC_METHODS else \
                [cfg.seed + i for i in range(cfg.seeds)]
            for seed in seeds:
                batches = task.train_batches(cfg.batch_size, cfg.steps, seed)
                own = dict(cfg.method_settings.get(method, {}))  # the method's tuned knob (methods.TUNING_KNOBS)
                if method == "spp-official" and not cfg.model.startswith("embedded"):
                    # real models: the released constants (the stand-ins keep the step-scaled default)
                    own = {**{k: official[k] for k in ("kappa", "lam", "alpha")}, **own}
                spp_m = {**spp_search, **own} if method == "spp" else spp  # baselines keep the paper-form step
                common = dict(batches=batches, loss_fn=F.cross_entropy, steps=cfg.steps, spp=spp_m, seed=seed,
                              settings={"trials": cfg.lasso_trials, "shared_tries": True,
                                        **(own if method != "spp" else {})}, example_inputs=x_macs)
                t0 = time.perf_counter()
                if method in ORDER_ARMS:
                    t1 = time.perf_counter()
                    searches[(method, seed)] = 0.0  # SPP's search of this seed, read again
                    spp_path = spp_runs[seed][0]
                    if method == "random-spp-widths":
                        chosen = at_spp_widths(seed)
                    else:
                        arm = spp_path.rescored({n: v.abs().double() for n, v in
                                                 (spp_path.M if method == "spp-final-m" else spp_path.V).items()},
                                                arm=method)
                        chosen = choose(method, arm, common)
                        rankings[rank_key(task.name, method, seed)] = flat_ranking(arm).numpy().astype(np.int32)
                    timing["readout_choice_s"] += time.perf_counter() - t1
                elif method in methods.RANKING_METHODS:
                    path = methods.ranking(method, m, batches, F.cross_entropy, steps=cfg.steps, seed=seed, spp=spp_m,
                                           settings=own if method != "spp" else None)
                    searches[(method, seed)] = path.config.get("seconds", time.perf_counter() - t0)
                    timing["search_s"] += time.perf_counter() - t0
                    configs[f"{method}@seed{seed}"] = path.config
                    t1 = time.perf_counter()
                    chosen = choose(method, path, common)
                    timing["readout_choice_s"] += time.perf_counter() - t1
                    if method == "spp":
                        spp_runs[seed] = (path, chosen)
                    rankings[rank_key(task.name, method, seed)] = flat_ranking(path).numpy().astype(np.int32)
                    if path.rank_by != "score":
                        paths[f"{method}@seed{seed}"] = path
                        health[f"{method}@seed{seed}"] = path_health(
                            path, [c[1].keep for c in chosen if c[1].keep is not None], f"{task.name} {method}")
                else:
                    try:
                        pruned = methods.prune(method, m, budgets, **common)
                    except UnsupportedModelError as exc:
                        if method not in methods.PEER_METHODS:
                            raise
                        skipped[method] = str(exc)  # a peer that cannot prune this family: said, not hidden
                        log(f"{method} skipped: {exc}")
                        break
                    timing["search_s"] += time.perf_counter() - t0
                    chosen = []
                    for p in pruned:
                        if p.model is None:  # Lasso could not bracket this budget: refused, said, no row
                            refused[f"{method}@seed{seed}@{p.budget['macs']}"] = p.info["search"]["refused"]
                            log(p.info["search"]["refused"])
                        chosen.append((None, p, fit_readouts(p.model, task) if p.model is not None else None))
                    searches[(method, seed)] = max(p.search_seconds for p in pruned) if method == "lasso" else \
                        sum(p.search_seconds for p in pruned)  # Lasso's tries are shared by its budgets
                    # peers' kept indices per block are bulky (the keep-set of a mask method is not stored either)
                    configs[f"{method}@seed{seed}"] = [{k: ({kk: vv for kk, vv in v.items() if kk != "kept"}
                                                            if isinstance(v, dict) else v) for k, v in p.info.items()}
                                                       for p in pruned]
                h = health.get(f"{method}@seed{seed}")
                for bi, ((val_score, p, fitted), frac) in enumerate(zip(chosen, cfg.macs_fractions)):
                    if p.model is None:
                        continue
                    ev = score(p.model, fitted, method, frac, seed)
                    macs = measure.macs(p.model, x_macs)
                    row = {"model": task.name, "method": method, "seed": seed, "budget_macs_fraction": frac,
                           "target_macs": p.budget["macs"], "macs": macs, "params": measure.params(p.model),
                           "macs_fraction": macs / dense_macs, "readout": p.readout, "val_head_refit": val_score,
                           **ev, "search_s": round(p.search_seconds, 2),
                           "shared_search": method in methods.RANKING_METHODS or method == "lasso",
                           **_spread_cols(p.keep, m.groups)}
                    if p.keep is not None:
                        keep_digest[(method, seed, frac)] = _digest(p.keep)
                        keepsets[keep_key(task.name, method, frac, seed)] = flat_keep(p.keep).numpy()
                    if method == "spp":
                        row["form"] = cfg.form  # "adam": the labelled variant, not the paper's update
                    if h is not None:  # a path method: is the order behind this row real? (docs/path_health.md)
                        row["path_healthy"] = h["healthy"]
                        row["path_by_order"] = h["budgets"][bi]["by_order"] if bi < len(h["budgets"]) else None
                    if "peer" in p.info:
                        peer = p.info["peer"]
                        row["units"] = "torch-pruning: q+k+v dims together (see the record), MLP neurons"
                        row.update(_width_spread(peer.get("head_dim"), peer.get("mlp_hidden")))
                    if method == "lasso":
                        srch = p.info["search"]
                        row["lasso_tries"] = len(srch["tries"])
                        row["lasso_overshoot"] = srch.get("overshoot")
                    rows.append(row)
                    log(f"{method} seed {seed} @ {frac:.2f} MACs: {macs / 1e6:.1f} MMACs ({row['readout']}) "
                        + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    finally:
        m.detach_masks()
    table = pd.DataFrame(rows)
    identical = _identical_rows(keep_digest)
    if identical:
        table["identical_to"] = [identical.get((r["method"], r["seed"], r["budget_macs_fraction"])) for r in rows]
    t0 = time.perf_counter()
    summary = summarize(table, correct, resamples=cfg.resamples)
    sanity = sanity_checks(table, correct, resamples=cfg.resamples)
    timing["statistics_s"] = time.perf_counter() - t0
    for c in sanity:
        log(f"SANITY: {c['message']}")
    info = {"label": task.label, "task": task.info, "dense_macs": dense_macs, "dense_params": dense_params,
            "test_images": test_images, "stages": list(stages), "eval_split": cfg.eval_split,
            "method_settings": {k: dict(v) for k, v in cfg.method_settings.items()},
            "spp_constants": spp, "spp_constants_source": constants_source(cfg),
            **({"spp_auto": spp_auto} if spp_auto is not None else {}),
            "spp_official_constants": official if "spp-official" in cfg.methods else None,
            "spp_form": cfg.form, "spp_search_constants": spp_search,
            "spp_form_note": ("the 'spp' rows come from the adam form, a labelled research variant of the paper's "
                              "update (docs/path_health.md); the paper form's path is degenerate at these step "
                              "counts" if cfg.form == "adam" else "the paper's update"),
            "seeds": {"seeded_methods": cfg.seeds, "deterministic": [x for x in cfg.methods
                                                                       if x in methods.DETERMINISTIC_METHODS],
                      "what_varies": "search batch order (spp, spp-official, lasso, lasso-rank, dessilbi; the order "
                                     "arms read spp's search of the same seed), the random order (random, "
                                     "random-spp-widths), the Taylor batches (tp-taylor)"},
            "skipped": skipped, "refused": refused, "search_configs": configs,
            "search_seconds": {f"{k[0]}@seed{k[1]}": v for k, v in searches.items()},
            "identical_keep_sets": {f"{k[0]}@seed{k[1]}@{k[2]}": v for k, v in identical.items()},
            "finetune": ({**FINETUNE_DEFAULTS, "lr": cfg.finetune_lr, "steps": cfg.finetune_steps,
                          "start": "LP-FT: the classifier starts from the head re-fit on the pruned features",
                          "batch_size": cfg.finetune_batch, "data": "training split ('fit')",
                          "evaluated": "own head on the test split",
                          "lr_choice": "given (not chosen on validation)"} if cfg.finetune_steps else
                         {"steps": 0, "note": "no fine-tune column: the short CPU fine-tune (20 steps, lr 3e-6) of "
                                              "earlier tables changed little or lowered accuracy"}),
            "readout_rule": "per method and budget, the read-out with the higher head-refit top-1 on the validation "
                            "split at the method's first seed, used as it is at its later seeds (random: per layer; "
                            "random-spp-widths: SPP's widths)" if cfg.readout == "val" else f"fixed: {cfg.readout}",
            "order_arms": {a: ORDER_ARMS[a] for a in cfg.methods if a in ORDER_ARMS},
            "top1_settings": {"no_retrain": "the dense model's head on the pruned features (test split)",
                              "restandardised": "the dense head after the pruned features' mean and scale are mapped "
                                                "to the dense features' on the refit split (no training)",
                              "head_refit": "L-BFGS logistic regression on the refit split's pruned features, weight "
                                            f"decay {task.head_weight_decay} (test split); the dense row's head is fit "
                                            "on the same images",
                              **({"finetuned": "after the shared LP-FT: re-fit head, then AdamW + cosine (test split)"}
                                 if cfg.finetune_steps else {})},
            "statistics": {"reference": "spp at the same model and budget", "resamples": cfg.resamples,
                           "interval": "95% two-level paired bootstrap: each resample draws each side's seeds with "
                                       "replacement, averages them per test image, then draws test images with "
                                       "replacement (covers search-seed and test-sample variation)",
                           "test": "exact McNemar on seed-averaged correctness rounded at 0.5",
                           "claim": f"a verdict other than 'tie' holds under each of {stats.BOOTSTRAP_SEEDS} bootstrap "
                                    f"seeds and every side with randomness has >= {stats.MIN_SEEDS_FOR_A_CLAIM} seeds",
                           "bootstrap_seeds": stats.BOOTSTRAP_SEEDS, "min_seeds_for_a_claim": stats.MIN_SEEDS_FOR_A_CLAIM,
                           "sd": "sample standard deviation over seeds (ddof = 1)"},
            "summary": summary.to_dict(orient="records"), "sanity": sanity,
            "timing_s": {k: round(v, 1) for k, v in timing.items()},
            "family_cost": family_cost(searches, len(budgets), cfg, configs),
            "seconds": round(time.perf_counter() - t_start, 1)}
    folder = None
    if record:
        folder = write_record(cfg.study, cfg, None, table, info, paths=paths, health=health,
                              arrays={"correct.npz": correct, "keepsets.npz": keepsets, "rankings.npz": rankings})
        log(f"record written: {folder}")
    return {"table": table, "summary": summary, "correct": correct, "sanity": sanity, "record": folder, "info": info,
            "config": dataclasses.asdict(cfg), "paths": paths, "path_health": health}


def _digest(keep) -> str:
    import hashlib

    h = hashlib.sha1()
    for name in sorted(keep.masks):
        h.update(name.encode())
        h.update(keep.masks[name].to(torch.bool).numpy().tobytes())
    return h.hexdigest()[:12]


def _identical_rows(digest: dict) -> dict:
    """(method, seed, budget) -> the other methods whose keep-set at the same seed and budget is identical."""
    out = {}
    for (m1, s1, b1), d1 in digest.items():
        same = sorted(m2 for (m2, s2, b2), d2 in digest.items() if m2 != m1 and s2 == s1 and b2 == b1 and d2 == d1)
        if same:
            out[(m1, s1, b1)] = ", ".join(same)
    return out


def _arrays(correct: dict, model: str, method: str, budget: float, stage: str) -> list:
    """The per-seed arrays of one row and stage (seed order)."""
    keys = sorted((k for k in correct if k.startswith(f"{model}|{method}|{float(budget)!r}|") and k.endswith(f"|{stage}")),
                  key=lambda k: parse_key(k)["seed"])
    return [correct[k] for k in keys]


def summarize(table, correct: dict | None = None, *, ref: str = "spp", resamples: int = 2000,
              by=("model", "method", "budget_macs_fraction")):
    """One row per model x method x budget: the mean and sample sd (ddof = 1; NaN for one seed) over seeds of every
    top-1 column, the number of seeds, and with ``correct`` (per-image arrays, ``correct_key``) for each stage S
    the paired statistics against ``ref`` at the same model and budget: ``delta_S`` (seed-averaged top-1 of the row
    minus the reference's), ``delta_S_lo`` / ``delta_S_hi`` (95% two-level paired bootstrap: seeds, then test
    images; ``stats.paired_bootstrap(resample_seeds=True)``),
    ``mcnemar_p_S`` and ``verdict_S`` (better / worse / tie; 'reference' on the reference's own rows): a claim only
    when it holds under every bootstrap seed (``stats.compare``) and every side with randomness has
    ``stats.MIN_SEEDS_FOR_A_CLAIM`` seeds (``stats.claim``), else 'tie'."""

    top1 = [c for c in table.columns if c.startswith("top1_")]
    cols = [c for c in (*top1, "macs_fraction", "params", "search_s") if c in table]
    g = table.groupby(list(by), sort=False)[cols]
    out = g.mean()
    std = g.std(ddof=1)
    for c in top1:
        out[c + "_sd"] = std[c]
    out["seeds"] = g.size()
    if "form" in table:  # the 'spp' rows' search form (adam = a labelled variant)
        out["form"] = table.groupby(list(by), sort=False)["form"].agg(
            lambda f: ", ".join(dict.fromkeys(str(v) for v in f if isinstance(v, str))))
    for c in ("path_healthy", "identical_to"):
        if c in table:
            out[c] = table.groupby(list(by), sort=False)[c].agg(lambda v: _one_or_all(v))
    out = out.reset_index()
    if not correct:
        return out
    stages = [c[len("top1_"):] for c in top1]
    extra: dict[str, list] = {}
    for _, r in out.iterrows():
        for st in stages:
            a = _arrays(correct, r["model"], r["method"], r["budget_macs_fraction"], st)
            b = _arrays(correct, r["model"], ref, r["budget_macs_fraction"], st)
            if r["method"] == ref:
                vals = {"delta": 0.0, "lo": 0.0, "hi": 0.0, "mcnemar_p": 1.0, "verdict": "reference"}
            elif not a or not b:
                vals = {"delta": None, "lo": None, "hi": None, "mcnemar_p": None, "verdict": None}
            else:
                vals = stats.compare(a, b, resamples=resamples, resample_seeds=True)
                vals["verdict"] = stats.claim(vals["verdict"], (len(a), len(b)), (_seeded(r["method"]), _seeded(ref)))
            for k, n in (("delta", f"delta_{st}"), ("lo", f"delta_{st}_lo"), ("hi", f"delta_{st}_hi"),
                         ("mcnemar_p", f"mcnemar_p_{st}"), ("verdict", f"verdict_{st}")):
                extra.setdefault(n, []).append(vals[k])
    for n, v in extra.items():
        out[n] = v
    return out


# The central question's comparisons (issue 36): each against spp's entry order at the same model and budget.
QUESTION = (("spp-final-m", "its own final |M|"), ("spp-final-v", "its own final |V|"),
            ("random-spp-widths", "a random order at its widths"), ("lasso", "Lasso"), ("lasso-rank", "Lasso-rank"),
            ("magnitude", "magnitude"), ("spp-official", "spp-official"))


def central_question(summary, stage: str = "head_refit") -> list[str]:
    """In words, per model and budget: does SPP's entry order beat its own final |M| / |V|, random at its widths,
    Lasso, Lasso-rank, magnitude, spp-official (``QUESTION``; those in the table), on the ``stage`` read-out; then per
    model, how many budgets each comparison was won, lost and tied. A verdict is the summary's (a claim or 'tie')."""
    lines, tally = [], {}
    for (model, budget), part in summary.groupby(["model", "budget_macs_fraction"], sort=False):
        rows = {r["method"]: r for _, r in part.iterrows()}
        if "spp" not in rows:
            continue
        said = []
        for method, what in QUESTION:
            r = rows.get(method)
            v = r.get(f"verdict_{stage}") if r is not None else None
            if not isinstance(v, str):
                continue
            d, lo, hi = (-r[f"delta_{stage}"], -r[f"delta_{stage}_hi"], -r[f"delta_{stage}_lo"])
            word = {"worse": "beats", "better": "loses to", "tie": "is within noise of"}[v]
            said.append(f"{word} {what} ({d * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}] points)")
            tally.setdefault((model, what), []).append(word)
        if said:
            lines.append(f"- {model} at {budget:g} of the dense MACs: the entry order " + "; ".join(said) + ".")
    for model in dict.fromkeys(m for m, _ in tally):
        counts = [f"{what}: beats at {w.count('beats')}, loses at {w.count('loses to')}, within noise at "
                  f"{w.count('is within noise of')} of {len(w)}" for (mm, what), w in tally.items() if mm == model]
        lines.append(f"- {model}, over its budgets: " + "; ".join(counts) + ".")
    return lines


def _seeded(method: str) -> bool:
    """Whether a row's method has randomness (its seeds differ); the dense model and deterministic methods do not."""
    return method != "dense" and method not in methods.DETERMINISTIC_METHODS


def _one_or_all(values):
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return None
    uniq = list(dict.fromkeys(vals))
    return uniq[0] if len(uniq) == 1 else ", ".join(str(u) for u in uniq)


def sanity_checks(table, correct: dict, *, resamples: int = 2000) -> list[dict]:
    """The protocol's own checks, each a paired interval over test images (seeds averaged):
    a pruned row must not beat the dense model beyond its interval, and a method's accuracy must not rise beyond
    noise as its budget shrinks. Returns the failures (an empty list = every check passed)."""

    fails = []
    for model, part in table.groupby("model", sort=False):
        dense = part[part["method"] == "dense"]
        if dense.empty:
            continue
        stages = [c[len("top1_"):] for c in part.columns if c.startswith("top1_")]
        for method, rows in part[part["method"] != "dense"].groupby("method", sort=False):
            budgets = sorted(set(rows["budget_macs_fraction"]), reverse=True)
            for st in stages:
                d = _arrays(correct, model, "dense", 1.0, st)
                prev = None
                for b in budgets:
                    a = _arrays(correct, model, method, b, st)
                    if not a:
                        continue
                    c = stats.compare(a, d, resamples=resamples, resample_seeds=True)
                    if c["lo"] > 0:
                        fails.append({"check": "pruned beats dense", "model": model, "method": method, "budget": b,
                                      "stage": st, **{k: c[k] for k in ("delta", "lo", "hi")},
                                      "message": f"{model} {method} at {b:g} MACs beats the dense model on {st} by "
                                                 f"{c['delta']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"})
                    if prev is not None:
                        c = stats.compare(a, prev[1], resamples=resamples, resample_seeds=True)
                        if c["lo"] > 0:
                            fails.append({"check": "accuracy rises as the budget shrinks", "model": model,
                                          "method": method, "budget": b, "stage": st,
                                          **{k: c[k] for k in ("delta", "lo", "hi")},
                                          "message": f"{model} {method} {st}: {b:g} MACs beats {prev[0]:g} MACs by "
                                                     f"{c['delta']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"})
                    prev = (b, a)
    return fails


def family_cost(searches: dict, n_budgets: int, cfg: VisionTableConfig, configs: dict | None = None,
                family_size: int = 5) -> dict:
    """SPP's one search vs Lasso's searches, same step count, for a family of ``family_size`` budgets: per
    budget Lasso needs at least one final search, and its lambda bracketing costs the tries recorded."""
    spp = searches.get(("spp", cfg.seed))
    lasso = searches.get(("lasso", cfg.seed))
    if spp is None or lasso is None:
        return {}
    tries = len(((configs or {}).get(f"lasso@seed{cfg.seed}") or [{}])[0].get("search", {}).get("tries", [])) \
        or cfg.lasso_trials
    per_search = lasso / tries
    return {"spp_search_s": spp, "lasso_search_s_per_run": round(per_search, 3), "family_size": family_size,
            "lasso_tries_recorded": tries,
            "ratio_final_runs_only": round(spp / (family_size * per_search), 4),
            "ratio_with_tries": round(spp / lasso, 4),
            "note": f"{cfg.steps} steps of batch {cfg.batch_size} per search; Lasso here: {tries} tries shared by "
                    f"{n_budgets} budgets (ratio_with_tries = SPP's one search / all of them); a family of "
                    f"{family_size} budgets needs at least one final Lasso run per budget (ratio_final_runs_only)"}
