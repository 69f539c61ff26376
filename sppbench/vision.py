"""The vision table: every method prunes the same model, with the same masks, data, budgets and fine-tune.

Per model x method x budget (budgets by MACs, as fractions of the dense model's): params and MACs
measured on the compressed model, top-1 with no retraining, with the linear head re-fit on the pruned
features, and after the one shared fine-tuning recipe; the search wall time; how unevenly the keep-set
spreads over layers. Read-outs (global / per-layer) of ranking methods are chosen per budget on the
validation split (head-refit top-1), never on the test split; the rows say which was used.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import measure, methods
from .data import Batches, ImageSet, preprocess
from .errors import UnsupportedModelError
from .evaluate import fit_linear_head
from .experiments import check_types, path_health, search_defaults, write_record
from .path import READOUTS
from .train import FINETUNE_DEFAULTS, finetune


# ---------------------------------------------------------------------------------------------
# A task: a dense classifier and its data, whatever the profile
# ---------------------------------------------------------------------------------------------
@dataclass
class VisionTask:
    """A dense timm classifier plus its data splits.

    ``train_batches(batch_size, steps, seed, shard=(rank, world))``: re-iterable (x, y) batches of the training
    split (``batch_size`` is the global batch; a shard is this process's slice of it in data-parallel runs)
    (search, Lasso, DessiLBI, Taylor scores and fine-tuning all draw from it);
    ``loader(split)``: (x, y) batches of 'refit' (training images for the head re-fit), 'val'
    (training images held out: read-out choice) or 'test' (reporting only).
    """

    name: str
    label: str
    dense: nn.Module
    img_size: int
    num_classes: int
    train_batches: Callable[[int, int, int], Iterable]
    loader: Callable[[str], Iterable]
    head_weight_decay: float
    info: dict


def _imageset_loader(data: ImageSet, size: int, batch_size: int = 250):
    class _L:
        def __iter__(self):
            for i in range(0, len(data), batch_size):
                yield preprocess(data.images[i:i + batch_size], size), data.labels[i:i + batch_size]

    return _L()


def embedded_vit_task(n_head: int = 3000, n_val: int = 1000, n_test: int = 2000, n_refit: int = 1000,
                      split_seed: int = 0) -> VisionTask:
    """The embedded DINOv2 ViT-S/14 classifier (stand-in), Fashion-MNIST splits."""
    from .embedded import HEAD_WEIGHT_DECAY, IMG_SIZE, STAND_IN, embedded_classifier

    ec = embedded_classifier(IMG_SIZE, n_fit=n_head, n_val=n_val, n_test=n_test, seed=split_seed)
    refit = ec.splits.fit.subset(range(min(n_refit, len(ec.splits.fit))))
    sets = {"refit": refit, "val": ec.splits.val, "test": ec.splits.test}
    return VisionTask(
        "embedded-vit", STAND_IN, ec.model, IMG_SIZE, 10,
        lambda bs, steps, seed, shard=(0, 1): Batches(ec.splits.fit, IMG_SIZE, bs, steps, seed=seed, shard=shard),
        lambda split: _imageset_loader(sets[split], IMG_SIZE), HEAD_WEIGHT_DECAY,
        {**ec.info, "refit_images": len(refit), "train_split": "fit (the head's training images)"})


def embedded_swin_task(n_val: int = 1000, n_test: int = 2000, n_refit: int = 1000, split_seed: int = 0,
                       **_) -> VisionTask:
    """The embedded compact Swin, trained here on Fashion-MNIST (stand-in, not a public checkpoint; trained
    once, ~3 min on 2 cores, then cached). Its own training images are the search / fine-tune / refit data;
    val and test are subsets of its held-out splits."""
    from .embedded_swin import SWIN_STAND_IN, embedded_swin

    es = embedded_swin(seed=split_seed)
    sp = es.splits
    if n_val > len(sp.val) or n_test > len(sp.test):
        raise ValueError(f"embedded-swin holds {len(sp.val)} val and {len(sp.test)} test images; asked for {n_val} / "
                         f"{n_test}")
    sets = {"refit": sp.fit.subset(range(min(n_refit, len(sp.fit)))), "val": sp.val.subset(range(n_val)),
            "test": sp.test.subset(range(n_test))}
    size = es.img_size
    return VisionTask(
        "embedded-swin", SWIN_STAND_IN, es.model, size, 10,
        lambda bs, steps, seed, shard=(0, 1): Batches(sp.fit, size, bs, steps, seed=seed, shard=shard),
        lambda split: _imageset_loader(sets[split], size), 1e-2,
        {**es.info, "refit_images": len(sets["refit"]), "val_images": n_val, "test_images": n_test,
         "train_split": "fit (the Swin's own training images)",
         "search_constants": "the embedded ViT's tuned SPP constants (not re-tuned for this Swin)"})


TASKS: dict[str, Callable[..., VisionTask]] = {"embedded-vit": embedded_vit_task, "embedded-swin": embedded_swin_task}


def get_task(name: str, data_root: str = "", **kw) -> VisionTask:
    """An embedded task by name, or a paper-profile model (timm name) on the ImageNet folder ``data_root``."""
    from .profiles import PAPER_MODELS, imagenet_task, paper_config

    if name in PAPER_MODELS:
        return imagenet_task(paper_config(name), data_root or None)
    if name not in TASKS:
        raise UnsupportedModelError(f"unknown vision model {name!r}; embedded: {', '.join(TASKS)}; paper profiles: "
                                    f"{', '.join(PAPER_MODELS)} (sppbench/configs/paper_*.json)")
    return TASKS[name](**kw)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _features(model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    feats, labels = [], []
    try:
        for x, y in loader:
            feats.append(model.forward_head(model.forward_features(x.to(dev)), pre_logits=True).float().cpu())
            labels.append(y)
    finally:
        model.train(was)
    return torch.cat(feats), torch.cat(labels)


def _own_head_top1(model: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> float:
    head = model.get_classifier()
    dev = next(model.parameters()).device
    with torch.no_grad():
        pred = head(feats.to(dev)).argmax(-1).cpu()
    return float((pred == labels).float().mean())


def evaluate(model: nn.Module, task: VisionTask, splits: tuple[str, ...] = ("val",), cache: dict | None = None) -> dict:
    """Top-1 with the model's own head ('{split}_no_retrain') and with a linear head re-fit on the
    'refit' split's features ('{split}_head_refit'), for each split asked."""
    cache = {} if cache is None else cache
    if "head" not in cache:
        f, y = _features(model, task.loader("refit"))
        cache["head"] = fit_linear_head(f, y, task.num_classes, weight_decay=task.head_weight_decay)
    out = {}
    for s in splits:
        f, y = _features(model, task.loader(s))
        out[f"{s}_no_retrain"] = _own_head_top1(model, f, y)
        out[f"{s}_head_refit"] = cache["head"].accuracy(f, y)
    return out


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
@dataclass
class VisionTableConfig:
    """Parameters of one vision table (defaults: the embedded profile at full size)."""

    model: str = "embedded-vit"
    methods: tuple[str, ...] = ("spp", "spp-official", "lasso", "lasso-rank", "dessilbi", "magnitude", "random",
                                "tp-magnitude", "tp-taylor")
    macs_fractions: tuple[float, ...] = (0.7, 0.5, 0.35)   # budgets: fractions of the dense model's MACs
    steps: int = 160                 # search steps (every searching method: the same count)
    batch_size: int = 32
    seed: int = 0
    random_seeds: int = 3            # 'random' is run with seeds seed, seed+1, ...
    readout: str = "val"             # 'val' = choose global / per-layer per budget on the val split
    lasso_trials: int = 5
    n_head: int = 3000
    n_val: int = 1000
    n_test: int = 2000
    n_refit: int = 1000
    split_seed: int = 0
    finetune_steps: int = 100
    finetune_batch: int = 32
    finetune_lr: float = FINETUNE_DEFAULTS["lr"]
    kappa: float = 0.0               # SPP constants; 0 = the embedded profile's tuned defaults (embedded models
    alpha: float = 0.0               # only: the paper profile's constants are not published and must be given,
    nu: float = 0.0                  # chosen by the kappa/lambda study on a validation split)
    lam: float = 0.0
    spp_form: str = ""               # the 'spp' rows' search: "adam" (the labelled variant whose path is healthy on the
                                     # stand-ins; methods.adam_constants) or "paper" (the constants above);
                                     # "" = adam for the embedded stand-ins, paper for the paper models
    data_root: str = ""              # paper profile: the ImageNet folder (else $SPPBENCH_IMAGENET)
    study: str = "vision_table"

    def resolved(self) -> "VisionTableConfig":
        check_types(self)
        for m in self.methods:
            methods.check_method(m)
        if self.readout not in ("val", *READOUTS):
            raise ValueError(f"readout must be 'val', 'global' or 'per-layer', got {self.readout!r}")
        if not self.macs_fractions or not all(0 < f <= 1 for f in self.macs_fractions):
            raise ValueError(f"macs_fractions must be fractions in (0, 1], got {self.macs_fractions!r}")
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


def spp_constants(cfg: VisionTableConfig) -> dict:
    """The SPP constants of a run: given, or the embedded profile's tuned defaults for embedded models."""
    given = {k: getattr(cfg, k) for k in ("kappa", "alpha", "nu", "lam")}
    if all(given.values()):
        return given
    if not cfg.model.startswith("embedded"):
        from .errors import SppBenchError

        raise SppBenchError(f"{cfg.model}: give all four SPP constants (kappa, alpha, nu, lam); the paper does not publish "
                         "them for its paper form; choose them with the kappa/lambda study on a validation split")
    d = search_defaults("embedded")["constants"]
    return {k: (v or d[k]) for k, v in given.items()}


def _spread_cols(keep, groups) -> dict:
    if keep is None:
        return {}
    s = methods.spread(keep, groups)
    return {"spread_attn_cv": s["attn"]["cv"], "spread_mlp_cv": s["mlp"]["cv"],
            "empty_blocks": s["attn"]["empty_blocks"] + s["mlp"]["empty_blocks"]}


def run_vision_table(cfg: VisionTableConfig | None = None, *, record: bool = True, progress: bool = True,
                     task: VisionTask | None = None) -> dict:
    """Run every method at every budget; returns {"table", "record", "info", "config"}."""
    import pandas as pd

    cfg = (cfg or VisionTableConfig()).resolved()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[vision {time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    spp = spp_constants(cfg)
    # the 'spp' rows' own search (docs/path_health.md); the baselines keep the paper-form constants above
    spp_search = methods.spp_search_constants(cfg.form, spp, cfg.model, cfg.steps)
    if task is None:
        task = get_task(cfg.model, cfg.data_root, **({"n_head": cfg.n_head, "n_val": cfg.n_val, "n_test": cfg.n_test,
                                                      "n_refit": cfg.n_refit, "split_seed": cfg.split_seed}
                                                     if cfg.model.startswith("embedded") else {}))
    x_macs = preprocess(torch.zeros(2, 28, 28, dtype=torch.uint8), task.img_size) if task.name.startswith("embedded") \
        else torch.randn(2, 3, task.img_size, task.img_size)
    dense = task.dense
    dense_macs, dense_params = measure.macs(dense, x_macs), measure.params(dense)
    rows = []

    def finetuned_top1(model: nn.Module, seed: int, head) -> tuple[float, dict]:
        """LP-FT: start from the head re-fit on the pruned features, then the shared AdamW fine-tune."""
        tuned = copy.deepcopy(model)
        lin = tuned.get_classifier()
        with torch.no_grad():
            lin.weight.copy_(head.weight.to(lin.weight))
            lin.bias.copy_(head.bias.to(lin.bias))
        rec = finetune(tuned, task.train_batches(cfg.finetune_batch, cfg.finetune_steps, seed + 1000),
                       steps=cfg.finetune_steps, lr=cfg.finetune_lr, seed=seed)
        f, y = _features(tuned, task.loader("test"))
        return _own_head_top1(tuned, f, y), rec

    # the dense reference, with the same evaluations and the same fine-tune
    dense_cache: dict = {}
    ev = evaluate(dense, task, ("test",), dense_cache)
    ft, ft_rec = finetuned_top1(dense, cfg.seed, dense_cache["head"])
    rows.append({"model": task.name, "method": "dense", "seed": cfg.seed, "budget_macs_fraction": 1.0,
                 "target_macs": dense_macs, "macs": dense_macs, "params": dense_params, "macs_fraction": 1.0,
                 "readout": None, "top1_no_retrain": ev["test_no_retrain"], "top1_head_refit": ev["test_head_refit"],
                 "top1_finetuned": ft, "search_s": 0.0, "finetune_s": ft_rec["seconds"]})
    log(f"dense: {dense_macs / 1e6:.1f} MMACs, top-1 {ev['test_no_retrain']:.3f} / refit "
        f"{ev['test_head_refit']:.3f} / fine-tuned {ft:.3f}")
    budgets = [{"macs": int(f * dense_macs)} for f in cfg.macs_fractions]
    m = _attach(dense, task)
    searches = {}
    skipped: dict[str, str] = {}
    configs: dict[str, object] = {}  # every search's settings (Lasso: each lambda try; peers: each ratio try)
    paths: dict[str, object] = {}     # the solution paths of the path methods, saved with their health
    health: dict[str, dict] = {}
    try:
        for method in cfg.methods:
            if method in methods.PEER_METHODS and methods.peer_reason(method):
                skipped[method] = methods.peer_reason(method)
                continue
            seeds = [cfg.seed + i for i in range(cfg.random_seeds)] if method == "random" else [cfg.seed]
            for seed in seeds:
                batches = task.train_batches(cfg.batch_size, cfg.steps, seed)
                spp_m = spp_search if method == "spp" else spp  # baselines keep the paper-form step (Lasso's lr)
                common = dict(batches=batches, loss_fn=F.cross_entropy, steps=cfg.steps, spp=spp_m, seed=seed,
                              settings={"trials": cfg.lasso_trials}, example_inputs=x_macs)
                t0 = time.perf_counter()
                path = None
                if method in methods.RANKING_METHODS:
                    path = methods.ranking(method, m, batches, F.cross_entropy, steps=cfg.steps, seed=seed, spp=spp_m)
                    searches[(method, seed)] = path.config.get("seconds", time.perf_counter() - t0)
                    configs[f"{method}@seed{seed}"] = path.config
                    candidates = [cfg.readout] if cfg.readout != "val" else list(READOUTS)
                    if method == "random":
                        candidates = ["per-layer"]
                    chosen = []
                    for b in budgets:
                        best = None
                        for ro in candidates:
                            p = methods.prune(method, m, [b], readout=ro, path=path, **common)[0]
                            cache: dict = {}  # the head re-fit on this model's features, reused for the test split
                            score = evaluate(p.model, task, ("val",), cache)["val_head_refit"] \
                                if len(candidates) > 1 else None
                            if best is None or (score is not None and score > best[0]):
                                best = (score, p, cache)
                        chosen.append(best)
                    if path.rank_by != "score":
                        paths[f"{method}@seed{seed}"] = path
                        health[f"{method}@seed{seed}"] = path_health(
                            path, [c[1].keep for c in chosen if c[1].keep is not None], f"{task.name} {method}")
                else:
                    try:
                        chosen = [(None, p, {}) for p in methods.prune(method, m, budgets, **common)]
                    except UnsupportedModelError as exc:
                        if method not in methods.PEER_METHODS:
                            raise
                        skipped[method] = str(exc)  # a peer that cannot prune this family: said, not hidden
                        log(f"{method} skipped: {exc}")
                        break
                    searches[(method, seed)] = sum(p.search_seconds for _, p, _ in chosen)
                    # peers' kept indices per block are bulky (the keep-set of a mask method is not stored either)
                    configs[f"{method}@seed{seed}"] = [{k: ({kk: vv for kk, vv in v.items() if kk != "kept"}
                                                            if isinstance(v, dict) else v) for k, v in p.info.items()}
                                                       for _, p, _ in chosen]
                h = health.get(f"{method}@seed{seed}")
                for bi, ((val_score, p, cache), frac) in enumerate(zip(chosen, cfg.macs_fractions)):
                    ev = evaluate(p.model, task, ("test",), cache)
                    ft, ft_rec = finetuned_top1(p.model, seed, cache["head"])
                    macs = measure.macs(p.model, x_macs)
                    row = {"model": task.name, "method": method, "seed": seed, "budget_macs_fraction": frac,
                           "target_macs": p.budget["macs"], "macs": macs, "params": measure.params(p.model),
                           "macs_fraction": macs / dense_macs, "readout": p.readout, "val_head_refit": val_score,
                           "top1_no_retrain": ev["test_no_retrain"], "top1_head_refit": ev["test_head_refit"],
                           "top1_finetuned": ft, "search_s": round(p.search_seconds, 2),
                           "shared_search": method in methods.RANKING_METHODS, "finetune_s": ft_rec["seconds"],
                           **_spread_cols(p.keep, m.groups)}
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
                        row["lasso_tries"] = len(p.info["search"]["tries"])
                    rows.append(row)
                    log(f"{method} seed {seed} @ {frac:.2f} MACs: {macs / 1e6:.1f} MMACs ({row['readout']}) top-1 "
                        f"{row['top1_no_retrain']:.3f} / refit {row['top1_head_refit']:.3f} / fine-tuned {ft:.3f}")
    finally:
        m.detach_masks()
    table = pd.DataFrame(rows)
    info = {"label": task.label, "task": task.info, "dense_macs": dense_macs, "dense_params": dense_params,
            "spp_constants": spp, "spp_form": cfg.form, "spp_search_constants": spp_search,
            "spp_form_note": ("the 'spp' rows come from the adam form, a labelled research variant of the paper's "
                              "update (docs/path_health.md); the paper form's path is degenerate at these step "
                              "counts" if cfg.form == "adam" else "the paper's update"),
            "skipped": skipped, "search_configs": configs,
            "search_seconds": {f"{k[0]}@seed{k[1]}": v for k, v in searches.items()},
            "finetune": {**FINETUNE_DEFAULTS, "lr": cfg.finetune_lr, "steps": cfg.finetune_steps,
                         "start": "LP-FT: the classifier starts from the head re-fit on the pruned features",
                         "batch_size": cfg.finetune_batch, "data": "training split ('fit')",
                         "evaluated": "own head on the test split"},
            "readout_rule": "per budget, the read-out with the higher head-refit top-1 on the validation split"
                            if cfg.readout == "val" else f"fixed: {cfg.readout}",
            "top1_settings": {"no_retrain": "the dense model's head on the pruned features (test split)",
                              "head_refit": "L-BFGS logistic regression on the refit split's pruned features, weight "
                                            f"decay {task.head_weight_decay} (test split)",
                              "finetuned": "after the shared LP-FT: re-fit head, then AdamW + cosine (test split)"},
            "family_cost": family_cost(searches, len(budgets), cfg),
            "seconds": round(time.perf_counter() - t_start, 1)}
    folder = None
    if record:
        folder = write_record(cfg.study, cfg, None, table, info, paths=paths, health=health)
        log(f"record written: {folder}")
    return {"table": table, "record": folder, "info": info, "config": dataclasses.asdict(cfg), "paths": paths,
            "path_health": health}


def family_cost(searches: dict, n_budgets: int, cfg: VisionTableConfig, family_size: int = 5) -> dict:
    """SPP's one search vs Lasso's per-budget searches, same step count, for a family of ``family_size``
    budgets: Lasso needs one final search per budget (plus its lambda bisection)."""
    spp = searches.get(("spp", cfg.seed))
    lasso = searches.get(("lasso", cfg.seed))
    if spp is None or lasso is None:
        return {}
    per_search = lasso / (n_budgets * cfg.lasso_trials)
    return {"spp_search_s": spp, "lasso_search_s_per_run": round(per_search, 3), "family_size": family_size,
            "ratio_final_runs_only": round(spp / (family_size * per_search), 4),
            "ratio_with_bisection": round(spp / (family_size * cfg.lasso_trials * per_search), 4),
            "note": f"{cfg.steps} steps of batch {cfg.batch_size} per search; Lasso: one final run per budget, "
                    f"{cfg.lasso_trials} runs per budget including its lambda bisection"}


def _attach(model: nn.Module, task: VisionTask):
    from . import attach_masks

    return attach_masks(model, input_size=(3, task.img_size, task.img_size))


def summarize(table, by=("model", "method", "budget_macs_fraction")):
    """Mean and spread (std over seeds; 0 for single-seed methods) of the top-1 columns."""
    cols = [c for c in ("top1_no_retrain", "top1_head_refit", "top1_finetuned", "macs_fraction", "params", "search_s")
            if c in table]
    g = table.groupby(list(by), sort=False)[cols]
    out = g.mean()
    std = g.std(ddof=0).fillna(0.0)
    for c in ("top1_no_retrain", "top1_head_refit", "top1_finetuned"):
        if c in out:
            out[c + "_sd"] = std[c]
    out["seeds"] = g.size()
    if "form" in table:  # the 'spp' rows' search form (adam = a labelled variant)
        out["form"] = table.groupby(list(by), sort=False)["form"].agg(lambda f: ", ".join(dict.fromkeys(str(v) for v in f if isinstance(v, str))))
    return out.reset_index()
