"""The LLM table: zero-shot pruning of a causal LM by magnitude, Wanda, RIA and SPP-RIA at 50% unstructured
and 2:4 sparsity (perplexity and measured sparsity), plus a structured variant (SPP's pair-wise masks
searched with SLBI, physically sliced) with params, MACs, CPU latency and perplexity.

Embedded profile: SmolLM2-135M-Instruct (its Q4_1 GGUF checkpoint de-quantized to fp32) with calibration
windows from the first 90 Wikipedia articles of the gensim wheel and perplexity on the last 16. It is a
stand-in for the paper's LLaMA-2-7B / OPT-6.7B and never claims to reproduce their rows.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core import measure
from ..core.compress import compress
from ..core.search import search
from ..errors import SppBenchError
from ..families import attach_masks
from ..methods.llm import LLM_METHODS, RECONSTRUCTION, SPP_RIA_DEFAULTS, parse_pattern, prune_llm
from ..methods.structured import magnitude_path
from ..tasks import llm_data, zeroshot
from ..tasks.models import hf_causal_lm, hf_model_type, is_spec, split_spec
from ..tasks.zeroshot import CONSTANT_SHARE, correct_key, samples_log_bytes
from ..tasks.zeroshot import TASKS as ZS_TASKS
from .common import check_types, path_health, write_record
from .stats import compare, mean_sd, paired_bootstrap_parts

STRUCTURED_METHODS = ("spp", "magnitude")
CALIBRATION_FREE = ("magnitude",)    # methods that read no calibration data: one run, not one per seed
# zero-shot rows with no randomness (no calibration draw, no search seed): one evaluation is the whole story
SEEDLESS = ("dense", *CALIBRATION_FREE, "structured-magnitude")
MIN_SEEDS_FOR_A_CLAIM = 3  # a verdict other than 'tie' needs this many seeds on every side with randomness
REFERENCES = ("ria", "wanda")        # the paired perplexity ratios are taken against these peers


@dataclass
class LLMTableConfig:
    """Parameters of one LLM table (defaults: the embedded SmolLM2 profile at reproduce size)."""

    model: str = "smollm2"           # the embedded SmolLM2, or hf:<folder> (a local LLaMA / Mistral / Qwen2 causal LM)
    methods: tuple[str, ...] = LLM_METHODS
    patterns: tuple[str, ...] = ("0.5", "2:4")
    n_samples: int = 32              # calibration windows (first 90 articles), one draw per seed below
    seqlen: int = 256
    eval_seqlen: int = 256           # perplexity windows (last 16 articles), spread over all of them
    eval_windows: int = 128
    eval_sampling: str = "stratified"  # every held-out article first, the rest by length; "spread": even stride; "first"
    batch_size: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)  # calibration draws (and the control's random moves); magnitude runs once
    resamples: int = 2000            # paired bootstrap resamples (over windows and seeds)
    spp_steps: int = SPP_RIA_DEFAULTS["steps"]
    spp_kappa: float = SPP_RIA_DEFAULTS["kappa"]
    spp_alpha: float = SPP_RIA_DEFAULTS["alpha"]
    spp_nu: float = SPP_RIA_DEFAULTS["nu"]
    spp_lam: float = SPP_RIA_DEFAULTS["lam"]
    spp_clip: float = SPP_RIA_DEFAULTS["clip"]
    spp_precondition: bool = SPP_RIA_DEFAULTS["precondition"]
    structured_methods: tuple[str, ...] = STRUCTURED_METHODS
    structured_fractions: tuple[float, ...] = (0.8, 0.6)  # of the dense model's MACs per sequence
    structured_steps: int = 20
    structured_batch: int = 2
    structured_seqlen: int = 128
    kappa: float = 10.0              # structured SPP constants (the vision defaults; not tuned for LLMs)
    alpha: float = 0.02
    nu: float = 10.0
    lam: float = 0.05
    latency_batch: int = 1
    # zero-shot tasks through lm-eval on the local data (sppbench.tasks.zeroshot, docs/zero_shot.md); () = none
    zero_shot_tasks: tuple[str, ...] = ()
    zero_shot_docs: int = 50         # documents per task: a seeded random subset, the same for every model (0 = all)
    zero_shot_seed: int = 0          # the subset draw
    zero_shot_batch: int = 16
    zero_shot_all_seeds: bool = False  # False: the dense model and the first calibration seed's models only
    ria_control: bool = True         # with spp-ria: also RIA with the same share of its cut moved at random
    study: str = "llm_table"

    def resolved(self) -> "LLMTableConfig":
        check_types(self)
        for m in self.methods:
            if m not in LLM_METHODS:
                raise SppBenchError(f"unknown LLM method {m!r}; use {LLM_METHODS}")
        for p in self.patterns:
            parse_pattern(p)
        for m in self.structured_methods:
            if m not in STRUCTURED_METHODS:
                raise SppBenchError(f"unknown structured method {m!r}; use {STRUCTURED_METHODS}")
        if not all(0 < f <= 1 for f in self.structured_fractions):
            raise ValueError(f"structured_fractions must be in (0, 1], got {self.structured_fractions!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(int(x) < 0 for x in self.seeds):
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds!r}")
        if self.eval_windows < 1 or self.n_samples < 1 or self.resamples < 1:
            raise ValueError(f"eval_windows, n_samples and resamples must be >= 1, got {self.eval_windows}, "
                             f"{self.n_samples}, {self.resamples}")
        if self.eval_sampling not in ("stratified", "spread", "first"):
            raise ValueError(f"eval_sampling must be 'stratified', 'spread' or 'first', got {self.eval_sampling!r}")

        bad = [t for t in self.zero_shot_tasks if t not in ZS_TASKS]
        if bad:
            raise SppBenchError(f"unknown zero-shot task(s) {bad}; the local tasks are {list(ZS_TASKS)}")
        if self.zero_shot_docs < 0 or self.zero_shot_batch < 1:
            raise ValueError(f"zero_shot_docs must be >= 0 (0 = the whole splits) and zero_shot_batch >= 1, got "
                             f"{self.zero_shot_docs}, {self.zero_shot_batch}")
        if self.model != "smollm2" and not is_spec(self.model, "hf"):
            raise SppBenchError(f"unknown LLM {self.model!r}: the embedded profile is 'smollm2', a local Hugging Face "
                                "causal LM is hf:<folder>; other LLMs run "
                                "from Python with sppbench.methods.llm.prune_llm on a model you load")
        if is_spec(self.model, "hf"):
            hf_model_type(split_spec(self.model)[1])  # a missing folder or an unsupported architecture stops here
        return self


def next_token_loss(out, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM output (logits) against its input ids."""
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


class _LogitsOnly(nn.Module):
    """A causal LM as ``ids -> logits`` (for MAC counts and latency)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits


def run_llm_table(cfg: LLMTableConfig | None = None, *, record: bool = True, progress: bool = True,
                  model: nn.Module | None = None, tokenizer=None, calib_text: str | None = None,
                  test_text: str | None = None) -> dict:
    """Run every method x pattern x calibration seed and the structured variant.

    ``model`` / ``tokenizer``: your own causal LM (default: the embedded SmolLM2); ``calib_text`` /
    ``test_text``: your own calibration and held-out text (default: the wiki articles), e.g.
    :func:`sppbench.tasks.llm_data.c4_calibration_text` and :func:`sppbench.tasks.llm_data.wikitext2_test_text`.
    Returns {"table" (one row per run), "summary" (per method and pattern, paired statistics), "structured",
    "layers", "record", "info", "nll" (per-window NLL arrays, also the record's ``nll.npz``)}."""
    import pandas as pd


    cfg = (cfg or LLMTableConfig()).resolved()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[llm {time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    if model is None:
        model, tokenizer = llm_data.smollm2() if cfg.model == "smollm2" else hf_causal_lm(split_spec(cfg.model)[1])
    calibs = {seed: llm_data.calibration_tokens(tokenizer, n_samples=cfg.n_samples, seqlen=cfg.seqlen, seed=seed,
                                                text=calib_text) for seed in cfg.seeds}
    calib = calibs[cfg.seeds[0]]
    test = llm_data.perplexity_tokens(tokenizer, seqlen=cfg.eval_seqlen, max_windows=cfg.eval_windows,
                                      text=test_text, sampling=cfg.eval_sampling)
    nll: dict[str, "torch.Tensor"] = {}

    def ppl(m: nn.Module, key: str | None = None) -> float:
        v = llm_data.window_nll(m, test.ids, batch_size=cfg.batch_size)
        if key is not None:
            nll[key] = v.numpy()
        return llm_data.perplexity_from_nll(v)

    zs = _ZeroShot(cfg, tokenizer, log)
    runs = [*cfg.methods, *(["ria-perturbed"] if cfg.ria_control and "spp-ria" in cfg.methods else [])]
    zs.total = 1 + len(cfg.structured_methods) * len(cfg.structured_fractions) + len(cfg.patterns) * sum(
        1 for seed in cfg.seeds for m in runs
        if not (m in CALIBRATION_FREE and seed != cfg.seeds[0]) and (cfg.zero_shot_all_seeds or seed == cfg.seeds[0]))
    dense_ppl = ppl(model, nll_key(cfg.model, "dense", "dense", cfg.seeds[0]))
    zs.run(model, "dense", "dense", cfg.seeds[0])
    n_linear = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n)
    rows = [{"model": cfg.model, "method": "dense", "pattern": "dense", "seed": cfg.seeds[0], "target_sparsity": 0.0,
             "sparsity": 0.0, "perplexity": dense_ppl, "seconds": 0.0}]
    log(f"dense perplexity {dense_ppl:.2f} ({test.ids.shape[0]} x {test.ids.shape[1]} tokens, "
        f"{test.info.get('articles_scored', '?')} articles)")
    layers = []
    spp = {"steps": cfg.spp_steps, "kappa": cfg.spp_kappa, "alpha": cfg.spp_alpha, "nu": cfg.spp_nu, "lam": cfg.spp_lam,
           "clip": cfg.spp_clip, "precondition": cfg.spp_precondition}
    for pattern in cfg.patterns:
        for seed in cfg.seeds:
            shares = None  # SPP-RIA's per-Linear distance from RIA's cut, for the control that follows it
            for method in runs:
                if method in CALIBRATION_FREE and seed != cfg.seeds[0]:
                    continue
                pruned = copy.deepcopy(model)
                res = prune_llm(pruned, method, pattern, calibs[seed].ids, batch_size=cfg.batch_size,
                                spp=spp if method == "spp-ria" else None,
                                perturb={"shares": shares, "seed": seed} if method == "ria-perturbed" else None)
                if method == "spp-ria":
                    shares = {f"{r['layer']}.{r['name']}": r["differs_from_ria"] for r in res.layers}
                p = ppl(pruned, nll_key(cfg.model, method, res.pattern, seed))
                per = [r["sparsity"] for r in res.layers]
                rows.append({"model": cfg.model, "method": method, "pattern": res.pattern, "seed": seed,
                             "target_sparsity": parse_pattern(pattern).sparsity, "sparsity": res.sparsity(),
                             "layer_sparsity_min": min(per), "layer_sparsity_max": max(per), "perplexity": p,
                             "seconds": res.seconds, **_spp_ria_columns(method, res.layers)})
                layers += [{"method": method, "pattern": res.pattern, "seed": seed, **r} for r in res.layers]
                log(f"{method} {res.pattern} seed {seed}: sparsity {res.sparsity():.4f}, perplexity {p:.2f}, "
                    f"{res.seconds:.1f}s")
                if cfg.zero_shot_all_seeds or seed == cfg.seeds[0]:
                    zs.run(pruned, method, res.pattern, seed)
                del pruned
    structured = run_structured(model, tokenizer, cfg, calib, ppl, log, dense_ppl=dense_ppl, zero_shot=zs) \
        if cfg.structured_methods else []
    table = pd.DataFrame(rows)
    summary = summarize(table, nll, model=cfg.model, resamples=cfg.resamples)
    info = {"label": llm_data.SMOLLM2_LABEL if cfg.model == "smollm2" else cfg.model,
            "calibration": {**calib.info, "seeds": list(cfg.seeds)}, "perplexity_data": test.info,
            "dense_perplexity": dense_ppl, "linear_params": n_linear, "spp_ria": {**spp, "note": RECONSTRUCTION},
            "seeds": {"seeds": list(cfg.seeds), "calibration_free": [m for m in cfg.methods if m in CALIBRATION_FREE]},
            "summary": summary.to_dict(orient="records"),
            "statistics": {"what": "per method and pattern: perplexity mean and sample sd (ddof=1) over the "
                                   "calibration seeds; ratio_vs_R = exp(mean per-window NLL of the row minus R's), "
                                   "i.e. the ratio of perplexities of the seed-averaged NLLs, with a 95% paired "
                                   "two-level bootstrap interval (seeds, then windows) and a verdict (lower is "
                                   "better; tie when the interval contains 1)",
                           "resamples": cfg.resamples, "references": list(REFERENCES),
                           "windows": int(test.ids.shape[0]), "level": 0.95},
            "sanity": sanity_checks(summary),
            "zero_shot": zs.info(resamples=cfg.resamples),
            "seconds": round(time.perf_counter() - t_start, 1)}
    ratio = {}
    for pat in summary["pattern"].unique():
        part = summary[summary["pattern"] == pat].set_index("method")
        if "spp-ria" in part.index and "ratio_vs_ria" in part:
            ratio[pat] = float(part.loc["spp-ria", "ratio_vs_ria"])
    info["ppl_ratio_spp_ria_over_ria"] = ratio
    control = {}
    for pat in summary["pattern"].unique():
        part = summary[summary["pattern"] == pat].set_index("method")
        if {"spp-ria", "ria-perturbed", "ria"} <= set(part.index):
            a, b = (_stack(nll, cfg.model, m, pat) for m in ("spp-ria", "ria-perturbed"))
            st = compare(a, b, binary=False, higher_is_better=False, resamples=cfg.resamples, resample_seeds=True)
            control[pat] = {"spp_ria_over_ria_perturbed": math.exp(st["delta"]),
                            "spp_ria_over_ria_perturbed_ci": [math.exp(st["lo"]), math.exp(st["hi"])],
                            "verdict": st["verdict"],
                            "ria_perturbed_over_ria": float(part.loc["ria-perturbed", "ratio_vs_ria"])}
    if control:
        info["ria_control"] = {
            "what": "ria-perturbed: RIA's keep-set with, per Linear, the share of its pruned weights that SPP-RIA "
                    "moved (differs_from_ria) traded at random for kept ones (per seed: that seed's SPP-RIA shares "
                    "and the seed as the random draw). SPP-RIA below it (verdict 'better') means the path's changes "
                    "to RIA's cut are better than random changes of the same size",
            "ratios": control}
    if "spp-ria" in cfg.methods:
        red = table[table["method"] == "spp-ria"]
        info["spp_ria_path_share"] = {
            pat: {"pruned_by_path_min": float(r["pruned_by_path_min"].min()),
                  "pruned_by_path_median": float(r["pruned_by_path_median"].median()),
                  "reduces_to_ria": bool(r["reduces_to_ria"].any()),
                  "why": ("in at least one layer (of at least one seed) fewer than half of the pruned weights entered "
                          "the path later than every kept weight: the cut falls inside a tie of the path (mostly the "
                          "never-entered weights) and the RIA score decides it" if r["reduces_to_ria"].any() else
                          "in every layer the path decided at least half of the pruned weights")}
            for pat, r in red.groupby("pattern", sort=False)}
    stab = pd.DataFrame(structured)
    folder = None
    if record:
        folder = write_record(cfg.study, cfg, None, table, {**info, "structured": structured, "layers": layers},
                              arrays={"nll.npz": nll, **({"zero_shot.npz": zs.correct} if zs.correct else {})},
                              blobs={"zero_shot_samples.jsonl.gz": zs.samples_log()} if zs.logs else None)
        log(f"record written: {folder}")
    return {"table": table, "summary": summary, "structured": stab, "layers": pd.DataFrame(layers), "record": folder,
            "info": info, "nll": nll, "config": dataclasses.asdict(cfg), "zero_shot": pd.DataFrame(zs.rows),
            "zero_shot_summary": pd.DataFrame(info["zero_shot"].get("summary", []))}


def nll_key(model: str, method: str, pattern: str, seed: int) -> str:
    """Key of one run's per-window NLL array in the record's ``nll.npz`` (docs/records.md)."""
    return f"{model}|{method}|{pattern}|{int(seed)}"


def parse_nll_key(key: str) -> dict:
    model, method, pattern, seed = key.split("|")
    return {"model": model, "method": method, "pattern": pattern, "seed": int(seed)}


def _stack(nll: dict, model: str, method: str, pattern: str):
    """The per-seed NLL arrays of one method and pattern, (seeds, windows), seeds in increasing order."""
    import numpy as np

    keys = sorted((parse_nll_key(k)["seed"], k) for k in nll
                  if parse_nll_key(k)["model"] == model and parse_nll_key(k)["method"] == method
                  and parse_nll_key(k)["pattern"] == pattern)
    return np.stack([np.asarray(nll[k], dtype=np.float64) for _, k in keys]) if keys else None


def summarize(table, nll: dict, *, model: str, resamples: int = 2000):
    """One row per method and pattern: perplexity mean / sd (ddof=1) over seeds, and per reference R in
    :data:`REFERENCES` (same pattern) ``ratio_vs_R`` with its paired 95% interval ``ratio_vs_R_lo/hi`` and
    ``verdict_vs_R`` (lower perplexity is better), from the per-window NLLs (two-level bootstrap: seeds, then
    windows). Pruned rows also get ``ratio_vs_dense`` (a pruned model below dense is a bug until explained)."""
    import numpy as np
    import pandas as pd

    out = []
    dense = _stack(nll, model, "dense", "dense")
    for (method, pattern), part in table.groupby(["method", "pattern"], sort=False):
        m, sd = mean_sd(part["perplexity"].to_list())
        row = {"model": model, "method": method, "pattern": pattern, "seeds": int(len(part)), "perplexity": m,
               "perplexity_sd": sd, "target_sparsity": float(part["target_sparsity"].iloc[0]),
               "sparsity": float(part["sparsity"].mean()), "seconds": float(part["seconds"].mean())}
        a = _stack(nll, model, method, pattern)
        refs = [(r, _stack(nll, model, r, pattern)) for r in REFERENCES] + (
            [("dense", dense)] if method != "dense" and dense is not None else [])
        for ref, b in refs:
            if a is None or b is None or ref == method or method == "dense":
                continue
            st = compare(a, b, binary=False, higher_is_better=False, resamples=resamples, resample_seeds=True)
            row.update({f"ratio_vs_{ref}": float(np.exp(st["delta"])), f"ratio_vs_{ref}_lo": float(np.exp(st["lo"])),
                        f"ratio_vs_{ref}_hi": float(np.exp(st["hi"])), f"verdict_vs_{ref}": st["verdict"]})
        out.append(row)
    return pd.DataFrame(out)


def sanity_checks(summary) -> list[dict]:
    """Failures of the healthy behaviour: a pruned model with a lower perplexity than dense beyond its paired
    interval (a bug until explained)."""
    bad = []
    if "verdict_vs_dense" in summary:
        for _, r in summary[summary["verdict_vs_dense"] == "better"].iterrows():
            bad.append({"check": "pruned_beats_dense", "method": r["method"], "pattern": r["pattern"],
                        "message": f"{r['method']} {r['pattern']} has a lower perplexity than dense beyond noise "
                                   f"(ratio {r['ratio_vs_dense']:.3f} [{r['ratio_vs_dense_lo']:.3f}, "
                                   f"{r['ratio_vs_dense_hi']:.3f}])"})
    return bad


def _spp_ria_columns(method: str, layers: list[dict]) -> dict:
    """Diagnostics of one pruning run's table row: the path's share of the cut (spp-ria) or the control's moves."""
    if method == "spp-ria":
        return {"entered": sum(r["entered"] * r["numel"] for r in layers) / sum(r["numel"] for r in layers),
                # the path's share of each layer's pruning (the rest: the RIA tie-break); below 0.5 in a layer,
                # SPP-RIA reduces to RIA there (docs/path_health.md)
                "pruned_by_path_min": min(r["pruned_by_path"] for r in layers),
                "pruned_by_path_median": statistics.median(r["pruned_by_path"] for r in layers),
                "reduces_to_ria": any(r["pruned_by_path"] < 0.5 for r in layers),
                "differs_from_ria_median": statistics.median(r["differs_from_ria"] for r in layers)}
    if method == "ria-perturbed":
        return {"perturbed_share_median": statistics.median(r["perturbed_share"] for r in layers)}
    return {}


class _ZeroShot:
    """The zero-shot part of the LLM table: lm-eval on the local task data (sppbench.tasks.zeroshot) for each model
    asked, the per-document correctness (``zero_shot.npz``), the harness's per-sample logs and the summary with
    the paired comparisons against RIA and Wanda."""

    def __init__(self, cfg: LLMTableConfig, tokenizer, log):
        self.cfg, self.tokenizer, self.log = cfg, tokenizer, log
        self.rows: list[dict] = []
        self.correct: dict = {}
        self.logs: dict = {}
        self.harness: dict = {}
        self.total, self.done = 0, 0  # models to evaluate (set by the caller, for the progress lines)

    def run(self, model: nn.Module, method: str, pattern: str, seed: int) -> None:
        cfg = self.cfg
        if not cfg.zero_shot_tasks:
            return

        self.done += 1
        of = f"model {self.done}/{self.total}, " if self.total else ""
        self.log(f"zero-shot ({of}{method} {pattern} seed {seed}): {len(cfg.zero_shot_tasks)} tasks")
        out = zeroshot.evaluate(model, self.tokenizer, cfg.zero_shot_tasks, n=cfg.zero_shot_docs or None,
                                seed=cfg.zero_shot_seed, batch_size=cfg.zero_shot_batch, progress=self.log,
                                label=f"{of}{method} {pattern}")
        self.harness.update(out["harness"])
        for task, r in out["tasks"].items():
            self.rows.append({"model": cfg.model, "method": method, "pattern": pattern, "seed": seed, "task": task,
                              **r})
        for task, cor in out["correct"].items():
            self.correct.setdefault(f"doc_id|{task}", cor["doc_id"])
            for metric in ("acc", "acc_norm", "pred"):
                if metric in cor:
                    self.correct[zeroshot.correct_key(cfg.model, method, pattern, seed, task, metric)] = cor[metric]
        self.logs[nll_key(cfg.model, method, pattern, seed)] = out["samples"]

    def samples_log(self) -> bytes:

        return samples_log_bytes(self.logs)

    def info(self, resamples: int) -> dict:
        cfg = self.cfg
        if not cfg.zero_shot_tasks:
            return {"skipped": "no zero-shot tasks requested (zero_shot_tasks=())"}
        summary, paired = zero_shot_summary(self.rows, self.correct, model=cfg.model, resamples=resamples)
        errors = {r["task"]: r["error"] for r in self.rows if "error" in r}
        return {"tasks": list(cfg.zero_shot_tasks), "docs_per_task": cfg.zero_shot_docs or "all",
                "subset_seed": cfg.zero_shot_seed, "harness": self.harness,
                "models": "the dense model and every pruned model of " + (
                    "every calibration seed" if cfg.zero_shot_all_seeds else f"calibration seed {cfg.seeds[0]}"),
                "metric": "acc per task (acc_norm also recorded); the mean is over the tasks that ran",
                "paired": "per task and for the task mean: a paired bootstrap over documents (each task resampled "
                          "on its own), per-document correctness averaged over the seeds evaluated; interval_verdict "
                          "is what the interval says, verdict the claim ('tie' unless every side with randomness "
                          f"was scored on at least {MIN_SEEDS_FOR_A_CLAIM} calibration seeds)",
                "diagnostics": "per task and model: pred_top / pred_top_share (the answer index given most, and to "
                               "which share of the documents), constant (share >= "
                               f"{CONSTANT_SHARE}), majority_acc / gold_top (always giving the most "
                               "frequent gold index, and that index), chance (1 / choices); per-document answers in "
                               "zero_shot.npz (metric 'pred')",
                "errors": errors, "rows": self.rows, "summary": summary, "comparisons": paired,
                "sanity": zero_shot_sanity(self.rows, summary, paired)}


def zero_shot_summary(rows: list[dict], correct: dict, *, model: str, resamples: int = 2000,
                      metric: str = "acc") -> tuple[list[dict], list[dict]]:
    """Per method and pattern: ``metric`` per task (mean over the seeds evaluated) and its mean over the tasks
    every model ran; per reference R in :data:`REFERENCES` (same pattern) the paired difference of the task mean
    and against the dense model (R = ``dense``) (``zs_delta_vs_R``, ``_lo``, ``_hi``, ``zs_verdict_vs_R``; higher is
    better) from the per-document correctness; ``zs_interval_verdict_vs_R`` is what the interval says and
    ``zs_verdict_vs_R`` the claim: 'tie' unless every side with randomness (not in :data:`SEEDLESS`) was scored
    on at least :data:`MIN_SEEDS_FOR_A_CLAIM` calibration seeds (``zero_shot_all_seeds``),
    each task's documents resampled on their own (``stats.paired_bootstrap_parts``, divided by the number of
    tasks). The second list: the same comparison per task (delta, interval, McNemar p, verdict)."""
    import numpy as np


    ok = [r for r in rows if "error" not in r]
    runs = sorted({(r["method"], r["pattern"]) for r in ok}, key=lambda k: [x["method"] for x in ok].index(k[0]))
    tasks_by_run = {k: {r["task"] for r in ok if (r["method"], r["pattern"]) == k} for k in runs}
    common = sorted(set.intersection(*tasks_by_run.values())) if tasks_by_run else []

    def arrays(method, pattern, task):
        seeds = sorted({r["seed"] for r in ok if (r["method"], r["pattern"], r["task"]) == (method, pattern, task)})
        return [np.asarray(correct[correct_key(model, method, pattern, s, task, metric)], dtype=np.float64)
                for s in seeds]

    summary, paired = [], []
    for method, pattern in runs:
        mine = [r for r in ok if (r["method"], r["pattern"]) == (method, pattern)]
        row = {"model": model, "method": method, "pattern": pattern,
               "seeds": len({r["seed"] for r in mine})}
        for task in sorted({r["task"] for r in mine}):
            vals = [r[metric] for r in mine if r["task"] == task and metric in r]
            row[f"{metric}_{task}"] = float(np.mean(vals)) if vals else None
            row[f"n_{task}"] = mine[[r["task"] for r in mine].index(task)]["n"]
        row[f"{metric}_mean"] = float(np.mean([row[f"{metric}_{t}"] for t in common])) if common else None
        for ref in (*REFERENCES, "dense"):
            ref_pattern = "dense" if ref == "dense" else pattern
            if ref == method or method == "dense" or (ref, ref_pattern) not in tasks_by_run or not common:
                continue
            parts = [(arrays(method, pattern, t), arrays(ref, ref_pattern, t)) for t in common]
            st = paired_bootstrap_parts(parts, resamples=resamples)
            k = len(common)
            seeds = (len(parts[0][0]), len(parts[0][1]))
            enough = all(m in SEEDLESS or n >= MIN_SEEDS_FOR_A_CLAIM for m, n in zip((method, ref), seeds))
            row.update({f"zs_delta_vs_{ref}": st["delta"] / k, f"zs_delta_vs_{ref}_lo": st["lo"] / k,
                        f"zs_delta_vs_{ref}_hi": st["hi"] / k, f"zs_interval_verdict_vs_{ref}": st["verdict"],
                        f"zs_verdict_vs_{ref}": st["verdict"] if enough else "tie",
                        f"zs_seeds_vs_{ref}": list(seeds)})
            for t, (a, b) in zip(common, parts):
                c = compare(a, b, binary=True, resamples=resamples)
                paired.append({"method": method, "pattern": pattern, "task": t, "reference": ref,
                               "delta": c["delta"], "lo": c["lo"], "hi": c["hi"], "mcnemar_p": c.get("mcnemar_p"),
                               "interval_verdict": c["verdict"], "verdict": c["verdict"] if enough else "tie",
                               "seeds": list(seeds), "n": int(len(a[0]))})
        summary.append(row)
    return summary, paired


def zero_shot_sanity(rows: list[dict], summary: list[dict], paired: list[dict]) -> list[dict]:
    """What must be explained before a zero-shot number is read: a pruned model above the dense one beyond noise
    (on the task mean or on one task; with the answer diagnostics of both, since a model that flips from always
    "no" to always "yes" on BoolQ gains the majority rate without reading anything), and every model that gives
    one answer index to at least ``CONSTANT_SHARE`` of a task's documents."""
    out = []
    diag = {(r["method"], r["pattern"], r["task"]): r for r in rows if "error" not in r}
    for row in summary:
        if row.get("zs_interval_verdict_vs_dense", row.get("zs_verdict_vs_dense")) == "better":
            out.append({"check": "pruned above dense (task mean)", "method": row["method"], "pattern": row["pattern"],
                        "delta": row["zs_delta_vs_dense"],
                        "ci": [row["zs_delta_vs_dense_lo"], row["zs_delta_vs_dense_hi"]]})
    for p in paired:
        if p["reference"] == "dense" and p.get("interval_verdict", p["verdict"]) == "better":
            mine, dense = diag.get((p["method"], p["pattern"], p["task"]), {}), diag.get(("dense", "dense", p["task"]), {})
            out.append({"check": "pruned above dense (one task)", "method": p["method"], "pattern": p["pattern"],
                        "task": p["task"], "delta": p["delta"], "ci": [p["lo"], p["hi"]],
                        "pred_top_share": mine.get("pred_top_share"), "pred_top": mine.get("pred_top"),
                        "dense_pred_top_share": dense.get("pred_top_share"), "dense_pred_top": dense.get("pred_top"),
                        "majority_acc": mine.get("majority_acc"), "why": _why_above_dense(mine, dense)})
    for r in rows:
        if r.get("constant"):
            out.append({"check": "one answer for (almost) every document", "method": r["method"],
                        "pattern": r["pattern"], "seed": r["seed"], "task": r["task"], "pred_top": r["pred_top"],
                        "pred_top_share": r["pred_top_share"], "acc": r.get("acc"),
                        "majority_acc": r.get("majority_acc")})
    return out


def _why_above_dense(mine: dict, dense: dict) -> str:
    """The explanation of a pruned model above dense on one task, when the answer diagnostics give one: the dense
    model gives one answer to (almost) every document and the pruned one mostly (>= 2/3) gives the majority answer
    instead, i.e. its answer bias moved toward the majority class (BoolQ's "yes"); otherwise "unexplained"."""
    gold = mine.get("gold_top")
    if (dense.get("constant") and gold is not None and mine.get("pred_top") == gold != dense.get("pred_top")
            and (mine.get("pred_top_share") or 0) >= 2 / 3):
        return (f"answer bias, not better reading: dense gives answer {dense['pred_top']} to "
                f"{100 * dense['pred_top_share']:.0f}% of the documents, the pruned model the majority answer {gold} "
                f"to {100 * mine['pred_top_share']:.0f}% (always answering {gold} scores {mine['majority_acc']:.2f})")
    return "unexplained"


def run_structured(model: nn.Module, tokenizer, cfg: LLMTableConfig, calib, ppl, log,
                   dense_ppl: float | None = None, zero_shot: "_ZeroShot | None" = None) -> list[dict]:
    """SPP's pair-wise masks (q/k RoPE pairs, v/o, MLP) searched with SLBI on the next-token loss over the
    calibration windows, read off at MAC budgets, physically sliced; magnitude on the same masks for contrast.
    One search (the first seed's calibration draw); the per-window NLLs go into ``nll.npz`` under the methods
    ``structured-spp`` / ``structured-magnitude`` and the pattern ``"<fraction> MACs"``; with ``zero_shot`` each
    sliced model is also scored on the zero-shot tasks under the same names."""

    work = copy.deepcopy(model)
    m = attach_masks(work, input_size=cfg.eval_seqlen)
    ids = calib.ids[:, :cfg.structured_seqlen]
    batches = [((ids[i:i + cfg.structured_batch],), ids[i:i + cfg.structured_batch])
               for i in range(0, len(ids) - cfg.structured_batch + 1, cfg.structured_batch)]
    x = calib.ids[:cfg.latency_batch, :cfg.eval_seqlen]
    dense_macs = m.dense_cost()[1]
    dense_lat = measure.latency(_LogitsOnly(model), x, warmup=1, repeats=3)
    rows = [{"method": "dense", "macs_fraction_target": 1.0, "params": measure.params(model), "macs": dense_macs,
             "latency_ms": 1000 * dense_lat["median_s"], "perplexity": ppl(model) if dense_ppl is None else dense_ppl,
             "search_s": 0.0}]
    try:
        for method in cfg.structured_methods:
            t0 = time.perf_counter()
            if method == "spp":
                path = search(m, batches, next_token_loss, steps=cfg.structured_steps, kappa=cfg.kappa,
                              alpha=cfg.alpha, nu=cfg.nu, lam=cfg.lam, seed=cfg.seeds[0])
            else:
                path = magnitude_path(m)
            secs = time.perf_counter() - t0
            h = None
            if method == "spp":  # is the order real? (docs/path_health.md)

                h = path_health(path, [path.keep(macs=int(f * dense_macs)) for f in cfg.structured_fractions],
                                "structured spp")
            for bi, frac in enumerate(cfg.structured_fractions):
                keep = path.keep(macs=int(frac * dense_macs))
                small = compress(m, keep)
                lat = measure.latency(_LogitsOnly(small), x, warmup=1, repeats=3)
                row = {"method": method, "macs_fraction_target": frac, "params": measure.params(small),
                       "macs": measure.macs(_LogitsOnly(small), calib.ids[:1, :cfg.eval_seqlen]),
                       "macs_analytic": keep.macs, "latency_ms": 1000 * lat["median_s"],
                       "perplexity": ppl(small, nll_key(cfg.model, f"structured-{method}", f"{frac:g} MACs",
                                                        cfg.seeds[0])),
                       "search_s": round(secs, 2)}
                if h is not None:
                    row.update(path_healthy=h["healthy"], path_by_order=h["budgets"][bi]["by_order"],
                               path_entered=h["entered"], path_max_step_share=h["max_step_share"],
                               path_loss_ratio_half=h["loss_ratio_half"], path_problems=h["problems"])
                rows.append(row)
                log(f"structured {method} @ {frac:.2f} MACs: {row['params'] / 1e6:.1f} M params, perplexity "
                    f"{row['perplexity']:.2f}, {row['latency_ms']:.0f} ms")
                if zero_shot is not None:  # the same tasks and documents as the element-wise rows
                    zero_shot.run(small, f"structured-{method}", f"{frac:g} MACs", cfg.seeds[0])
                del small
    finally:
        m.detach_masks()
    return rows
