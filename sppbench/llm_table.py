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
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import measure
from .errors import SppBenchError
from .experiments import check_types, write_record
from .llm import LLM_METHODS, RECONSTRUCTION, SPP_RIA_DEFAULTS, parse_pattern, prune_llm

STRUCTURED_METHODS = ("spp", "magnitude")


@dataclass
class LLMTableConfig:
    """Parameters of one LLM table (defaults: the embedded SmolLM2 profile at reproduce size)."""

    model: str = "smollm2"
    methods: tuple[str, ...] = LLM_METHODS
    patterns: tuple[str, ...] = ("0.5", "2:4")
    n_samples: int = 32              # calibration windows (first 90 articles), seed below
    seqlen: int = 256
    eval_seqlen: int = 256           # perplexity windows (last 16 articles)
    eval_windows: int = 32
    batch_size: int = 8
    seed: int = 0
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
    zero_shot: str = ""              # comma-separated lm-eval tasks ('' = none); skipped with a reason offline
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
        if self.model != "smollm2":
            raise SppBenchError(f"unknown LLM {self.model!r}: the embedded profile is 'smollm2'; LLaMA-2 / OPT run "
                                "from Python with sppbench.llm.prune_llm on a model you load")
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
                  model: nn.Module | None = None, tokenizer=None) -> dict:
    """Run every method x pattern and the structured variant; returns {"table", "layers", "record", "info"}."""
    import pandas as pd

    from . import llm_data

    cfg = (cfg or LLMTableConfig()).resolved()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[llm {time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    if model is None:
        model, tokenizer = llm_data.smollm2()
    calib = llm_data.calibration_tokens(tokenizer, n_samples=cfg.n_samples, seqlen=cfg.seqlen, seed=cfg.seed)
    test = llm_data.perplexity_tokens(tokenizer, seqlen=cfg.eval_seqlen, max_windows=cfg.eval_windows)

    def ppl(m: nn.Module) -> float:
        return llm_data.perplexity(m, test.ids, batch_size=cfg.batch_size)

    dense_ppl = ppl(model)
    n_linear = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n)
    rows = [{"model": cfg.model, "method": "dense", "pattern": "dense", "target_sparsity": 0.0, "sparsity": 0.0,
             "perplexity": dense_ppl, "seconds": 0.0}]
    log(f"dense perplexity {dense_ppl:.2f} ({test.ids.shape[0]} x {test.ids.shape[1]} tokens)")
    layers = []
    spp = {"steps": cfg.spp_steps, "kappa": cfg.spp_kappa, "alpha": cfg.spp_alpha, "nu": cfg.spp_nu, "lam": cfg.spp_lam,
           "clip": cfg.spp_clip, "precondition": cfg.spp_precondition}
    for pattern in cfg.patterns:
        shares = None  # SPP-RIA's per-Linear distance from RIA's cut, for the control that follows it
        runs = [*cfg.methods, *(["ria-perturbed"] if cfg.ria_control and "spp-ria" in cfg.methods else [])]
        for method in runs:
            pruned = copy.deepcopy(model)
            res = prune_llm(pruned, method, pattern, calib.ids, batch_size=cfg.batch_size,
                            spp=spp if method == "spp-ria" else None,
                            perturb={"shares": shares, "seed": cfg.seed} if method == "ria-perturbed" else None)
            if method == "spp-ria":
                shares = {f"{r['layer']}.{r['name']}": r["differs_from_ria"] for r in res.layers}
            p = ppl(pruned)
            per = [r["sparsity"] for r in res.layers]
            rows.append({"model": cfg.model, "method": method, "pattern": res.pattern,
                         "target_sparsity": parse_pattern(pattern).sparsity, "sparsity": res.sparsity(),
                         "layer_sparsity_min": min(per), "layer_sparsity_max": max(per), "perplexity": p,
                         "seconds": res.seconds,
                         **({"entered": sum(r["entered"] * r["numel"] for r in res.layers) / sum(r["numel"]
                                                                                               for r in res.layers),
                             # the path's share of each layer's pruning (the rest: the RIA tie-break); below 0.5 in a
                             # layer, SPP-RIA reduces to RIA there (docs/path_health.md)
                             "pruned_by_path_min": min(r["pruned_by_path"] for r in res.layers),
                             "pruned_by_path_median": statistics.median(r["pruned_by_path"] for r in res.layers),
                             "reduces_to_ria": any(r["pruned_by_path"] < 0.5 for r in res.layers),
                             "differs_from_ria_median": statistics.median(r["differs_from_ria"] for r in res.layers)}
                            if method == "spp-ria" else {}),
                         **({"perturbed_share_median": statistics.median(r["perturbed_share"] for r in res.layers)}
                            if method == "ria-perturbed" else {})})
            layers += [{"method": method, "pattern": res.pattern, **r} for r in res.layers]
            log(f"{method} {res.pattern}: sparsity {res.sparsity():.4f}, perplexity {p:.2f}, {res.seconds:.1f}s")
            del pruned
    structured = run_structured(model, tokenizer, cfg, calib, ppl, log) if cfg.structured_methods else []
    table = pd.DataFrame(rows)
    info = {"label": llm_data.SMOLLM2_LABEL if cfg.model == "smollm2" else cfg.model,
            "calibration": calib.info, "perplexity_data": test.info, "dense_perplexity": dense_ppl,
            "linear_params": n_linear, "spp_ria": {**spp, "note": RECONSTRUCTION},
            "zero_shot": zero_shot(model, tokenizer, cfg),
            "seconds": round(time.perf_counter() - t_start, 1)}
    ratio = {}
    for pat in table["pattern"].unique():
        part = table[table["pattern"] == pat].set_index("method")
        if "spp-ria" in part.index and "ria" in part.index:
            ratio[pat] = float(part.loc["spp-ria", "perplexity"] / part.loc["ria", "perplexity"])
    info["ppl_ratio_spp_ria_over_ria"] = ratio
    control = {}
    for pat in table["pattern"].unique():
        part = table[table["pattern"] == pat].set_index("method")
        if {"spp-ria", "ria-perturbed", "ria"} <= set(part.index):
            control[pat] = {"spp_ria_over_ria_perturbed": float(part.loc["spp-ria", "perplexity"]
                                                               / part.loc["ria-perturbed", "perplexity"]),
                            "ria_perturbed_over_ria": float(part.loc["ria-perturbed", "perplexity"]
                                                           / part.loc["ria", "perplexity"])}
    if control:
        info["ria_control"] = {
            "what": "ria-perturbed: RIA's keep-set with, per Linear, the share of its pruned weights that SPP-RIA "
                    "moved (differs_from_ria) traded at random for kept ones (same seed as the calibration draw). "
                    "SPP-RIA below it means the path's changes to RIA's cut are better than random changes of the "
                    "same size; one draw, so a gap inside a few percent is not a result",
            "ratios": control}
    if "spp-ria" in cfg.methods:
        red = {r["pattern"]: r for r in rows if r["method"] == "spp-ria"}
        info["spp_ria_path_share"] = {
            pat: {"pruned_by_path_min": r["pruned_by_path_min"], "pruned_by_path_median": r["pruned_by_path_median"],
                  "reduces_to_ria": r["reduces_to_ria"],
                  "why": ("in at least one layer fewer than half of the pruned weights entered the path later than "
                          "every kept weight: the cut falls inside a tie of the path (mostly the never-entered "
                          "weights) and the RIA score decides it" if r["reduces_to_ria"] else
                          "in every layer the path decided at least half of the pruned weights")}
            for pat, r in red.items()}
    stab = pd.DataFrame(structured)
    folder = None
    if record:
        folder = write_record(cfg.study, cfg, None, table, {**info, "structured": structured, "layers": layers})
        log(f"record written: {folder}")
    return {"table": table, "structured": stab, "layers": pd.DataFrame(layers), "record": folder, "info": info,
            "config": dataclasses.asdict(cfg)}


def zero_shot(model, tokenizer, cfg: LLMTableConfig) -> dict:
    if not cfg.zero_shot:
        return {"skipped": "no zero-shot tasks requested (zero_shot='')"}
    from . import llm_data

    return llm_data.zero_shot_tasks(model, tokenizer, tasks=tuple(t.strip() for t in cfg.zero_shot.split(",")))


def run_structured(model: nn.Module, tokenizer, cfg: LLMTableConfig, calib, ppl, log) -> list[dict]:
    """SPP's pair-wise masks (q/k RoPE pairs, v/o, MLP) searched with SLBI on the next-token loss over the
    calibration windows, read off at MAC budgets, physically sliced; magnitude on the same masks for contrast."""
    from . import attach_masks, compress, search
    from .methods import magnitude_path

    work = copy.deepcopy(model)
    m = attach_masks(work, input_size=cfg.eval_seqlen)
    ids = calib.ids[:, :cfg.structured_seqlen]
    batches = [((ids[i:i + cfg.structured_batch],), ids[i:i + cfg.structured_batch])
               for i in range(0, len(ids) - cfg.structured_batch + 1, cfg.structured_batch)]
    x = calib.ids[:cfg.latency_batch, :cfg.eval_seqlen]
    dense_macs = m.cost_model.cost({g.name: g.size for g in m.groups})[1]
    dense_lat = measure.latency(_LogitsOnly(model), x, warmup=1, repeats=3)
    rows = [{"method": "dense", "macs_fraction_target": 1.0, "params": measure.params(model), "macs": dense_macs,
             "latency_ms": 1000 * dense_lat["median_s"], "perplexity": ppl(model),
             "search_s": 0.0}]
    try:
        for method in cfg.structured_methods:
            t0 = time.perf_counter()
            if method == "spp":
                path = search(m, batches, next_token_loss, steps=cfg.structured_steps, kappa=cfg.kappa,
                              alpha=cfg.alpha, nu=cfg.nu, lam=cfg.lam, seed=cfg.seed)
            else:
                path = magnitude_path(m)
            secs = time.perf_counter() - t0
            h = None
            if method == "spp":  # is the order real? (docs/path_health.md)
                from .experiments import path_health

                h = path_health(path, [path.keep(macs=int(f * dense_macs)) for f in cfg.structured_fractions],
                                "structured spp")
            for bi, frac in enumerate(cfg.structured_fractions):
                keep = path.keep(macs=int(frac * dense_macs))
                small = compress(m, keep)
                lat = measure.latency(_LogitsOnly(small), x, warmup=1, repeats=3)
                row = {"method": method, "macs_fraction_target": frac, "params": measure.params(small),
                       "macs": measure.macs(_LogitsOnly(small), calib.ids[:1, :cfg.eval_seqlen]),
                       "macs_analytic": keep.macs, "latency_ms": 1000 * lat["median_s"],
                       "perplexity": ppl(small), "search_s": round(secs, 2)}
                if h is not None:
                    row.update(path_healthy=h["healthy"], path_by_order=h["budgets"][bi]["by_order"],
                               path_entered=h["entered"], path_max_step_share=h["max_step_share"],
                               path_loss_ratio_half=h["loss_ratio_half"], path_problems=h["problems"])
                rows.append(row)
                log(f"structured {method} @ {frac:.2f} MACs: {row['params'] / 1e6:.1f} M params, perplexity "
                    f"{row['perplexity']:.2f}, {row['latency_ms']:.0f} ms")
                del small
    finally:
        m.detach_masks()
    return rows
