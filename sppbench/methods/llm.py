"""Zero-shot pruning of causal LMs, layer by layer: magnitude, Wanda, RIA and SPP-RIA ("Algorithm 2").

The paper's LLM algorithm was never published; ``spp-ria`` is sppbench's reconstruction of it
(docs/method.md section 6), labelled as such in every record:

1. Calibration token windows go through the model one decoder layer at a time; each layer's inputs
   are the outputs of the already-pruned earlier layers, and only one layer's activations are held.
2. For every Linear W (out x in) of the layer, the calibration inputs X (in x tokens) give the Gram
   matrix G = X X^T. An element-wise mask M runs K steps of the paper-form SLBI (section 3, the same
   ``sppbench.core.dynamics.SLBI`` class as every search) on the layer-wise reconstruction loss

       L(M) = ||W X - (W o M) X||_F^2 / (||W X||_F^2 / numel(W)) = numel * tr(D G D^T) / tr(W G W^T),
       D = W o (1 - M),   grad_M L = -2 numel (D G) o W / tr(W G W^T),

   so a step costs O(out x in^2) whatever the number of calibration tokens. The normalisation (the
   loss relative to the layer's output energy per weight) is sppbench's choice: it makes the mean
   restoring force on a uniformly shrunk mask the same in every layer, so one set of constants serves
   all layers. LLM activations have outlier channels whose curvature is orders of magnitude above the
   rest, and the explicit iteration diverges on them. Two guards, both on by default: the loss gradient
   is clipped element-wise at +-clip (default 1), and the M step is made semi-implicit in the loss's
   diagonal curvature h_ij = 2 numel W_ij^2 G_jj / tr(W G W^T) (``precondition``: the whole M step is
   divided by 1 + kappa alpha h_ij, so a stiff entry relaxes to its restored value instead of
   oscillating). Clipping alone keeps the iteration finite but orders saturated entries by the clip,
   not by the loss; on SmolLM2 at 50% that roughly doubled the perplexity (tools/tune_llm.py).
3. Rank entries by entry step (never-entered last), ties by the RIA score; keep the top (1 - sparsity)
   of each layer (unstructured) or the top N of every M consecutive inputs of a row (N:M).

Baselines on the same calibration data: ``magnitude`` (|W|, per layer), ``wanda`` (|W_ij| ||X_j||,
compared within each output row, as Wanda does) and ``ria`` (docs/method.md: (|W_ij| / sum_r |W_rj| +
|W_ij| / sum_c |W_ic|) * ||X_j||^0.5, per layer).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..core.dynamics import SLBI
from ..errors import BudgetError, UnsupportedModelError
from .registry import Method, all_methods, get, names, register
from .sparsegpt import sparsegpt

# The method lists (LLM_METHODS, CONTROL_METHODS, COMPARE, GRAM_METHODS) are read off the registry entries at the
# end of this module (sppbench.methods.registry, domain "llm"): adding a pruner is one entry with its select function.
# SparseGPT (sppbench.methods.sparsegpt): the paper's lazy-batch / mask-selection block and Hessian damping (1% of the mean diagonal)
SPARSEGPT_DEFAULTS = {"blocksize": 128, "damp": 0.01}
# lam and precondition chosen on validation windows (tools/tune_llm.py, results/runs/tune_llm_embedded/)
SPP_RIA_DEFAULTS = {"steps": 20, "kappa": 1.0, "alpha": 0.3, "nu": 2.0, "lam": 2.5, "clip": 1.0,
                    "precondition": True}
RECONSTRUCTION = ("spp-ria is sppbench's reconstruction of the paper's unpublished 'Algorithm 2' (docs/method.md section 6): "
                  "SLBI on element-wise masks with the layer-wise reconstruction loss (Gram form), ranked by entry "
                  "step, ties by RIA")


# ---------------------------------------------------------------------------------------------
# Patterns
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pattern:
    """'unstructured' at a sparsity, or N:M (keep N of every M consecutive inputs of a row)."""

    kind: str
    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"unstructured {self.sparsity:.0%}"


def parse_pattern(pattern: str | float) -> Pattern:
    """``0.5`` / ``"50%"`` / ``"unstructured:0.5"`` -> unstructured; ``"2:4"`` -> N:M."""
    if isinstance(pattern, (int, float)) and not isinstance(pattern, bool):
        s = float(pattern)
    else:
        text = str(pattern).strip().lower()
        nm = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if not 0 < n < m:
                raise BudgetError(f"N:M pattern needs 0 < N < M, got {pattern!r} (e.g. '2:4')")
            return Pattern("nm", 1 - n / m, n, m)
        text = text.removeprefix("unstructured").strip(" :")
        try:
            s = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise BudgetError(f"unknown sparsity pattern {pattern!r}; use a sparsity such as 0.5 or '50%', or N:M "
                              "such as '2:4'") from None
    if not 0 < s < 1:
        raise BudgetError(f"sparsity must be in (0, 1), got {s}")
    return Pattern("unstructured", s)


# ---------------------------------------------------------------------------------------------
# Scores and read-outs
# ---------------------------------------------------------------------------------------------
def wanda_score(W: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Wanda)."""
    return W.abs() * col_norm.view(1, -1)


def ria_score(W: torch.Tensor, col_norm: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """Relative importance times activations: (|W_ij| / sum_r |W_rj| + |W_ij| / sum_c |W_ic|) * ||X_j||^a."""
    A = W.abs()
    col = A.sum(0, keepdim=True).clamp_min(1e-12)  # over output rows r, per input column j
    row = A.sum(1, keepdim=True).clamp_min(1e-12)  # over input columns c, per output row i
    return (A / col + A / row) * col_norm.view(1, -1).pow(a)


def order_rank(primary: torch.Tensor, secondary: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of every entry (0 = most important) when sorting by ``primary`` descending, ties by ``secondary``
    descending, remaining ties by flat index (a total, deterministic order)."""
    flat = primary.reshape(-1)
    idx = torch.arange(flat.numel())
    if secondary is not None:
        idx = torch.sort(-secondary.reshape(-1).double(), stable=True).indices
    idx = idx[torch.sort(-flat[idx].double(), stable=True).indices]
    rank = torch.empty_like(idx)
    rank[idx] = torch.arange(idx.numel())
    return rank.view(primary.shape)


def keep_mask(rank: torch.Tensor, pattern: Pattern, compare: str = "layer") -> torch.Tensor:
    """Boolean keep mask from a rank matrix (out x in) for a pattern; exact counts per layer / row / group."""
    out_f, in_f = rank.shape
    if pattern.kind == "nm":
        if in_f % pattern.m:
            raise BudgetError(f"{pattern.name}: the input width {in_f} is not a multiple of {pattern.m}")
        g = rank.view(out_f, in_f // pattern.m, pattern.m)
        top = g.topk(pattern.n, dim=-1, largest=False).indices
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True)
        return keep.view(out_f, in_f)
    if compare == "row":
        k = int(round((1 - pattern.sparsity) * in_f))
        top = rank.topk(k, dim=1, largest=False).indices
        return torch.zeros_like(rank, dtype=torch.bool).scatter_(1, top, True)
    k = int(round((1 - pattern.sparsity) * rank.numel()))
    return rank.reshape(-1).lt(k).view(out_f, in_f)


def keep_by_order(primary: torch.Tensor, secondary: torch.Tensor | None, pattern: Pattern,
                  compare: str = "layer") -> torch.Tensor:
    """``keep_mask(order_rank(primary, secondary), pattern, compare)``, computed without the full sort where the
    pattern only compares inside groups: for N:M each entry's place in its group of M is the number of group members
    that precede it in ``order_rank``'s total order (primary descending, then secondary descending, then index),
    M x M element-wise comparisons instead of sorting the whole matrix (the same keep-set, bit for bit)."""
    if pattern.kind != "nm":
        return keep_mask(order_rank(primary, secondary), pattern, compare)
    out_f, in_f = primary.shape
    m = pattern.m
    if in_f % m:
        raise BudgetError(f"{pattern.name}: the input width {in_f} is not a multiple of {m}")
    p = primary.double().reshape(out_f, in_f // m, m)
    s = None if secondary is None else secondary.double().reshape(out_f, in_f // m, m)
    ahead = torch.zeros(p.shape, dtype=torch.long, device=p.device)
    for j in range(m):
        for k in range(m):
            if k == j:
                continue
            tie = p[..., k] == p[..., j]
            before = p[..., k] > p[..., j]
            if s is not None:
                before |= tie & (s[..., k] > s[..., j])
                tie = tie & (s[..., k] == s[..., j])
            if k < j:  # the remaining ties go by index
                before |= tie
            ahead[..., j] += before
    return (ahead < pattern.n).view(out_f, in_f)


def pruned_by_path(entry_step: torch.Tensor, keep: torch.Tensor, pattern: Pattern, compare: str = "layer") -> float:
    """Share of the pruned entries that SPP-RIA's path decided: pruned entries whose entry step is strictly
    later than every kept entry's in the same comparison group (layer, row or N:M group; never entered =
    latest). The rest tie with a kept entry on the path and were decided by the RIA tie-break."""
    key = torch.where(entry_step < 0, torch.full_like(entry_step, torch.iinfo(torch.long).max), entry_step).long()
    out_f, in_f = key.shape
    if pattern.kind == "nm":
        key, keep = key.view(out_f, -1, pattern.m), keep.view(out_f, -1, pattern.m)
    elif compare == "row":
        pass
    else:
        key, keep = key.reshape(1, -1), keep.reshape(1, -1)
    low = torch.iinfo(torch.long).min
    cut = torch.where(keep, key, torch.full_like(key, low)).amax(dim=-1, keepdim=True)
    pruned = ~keep
    n = int(pruned.sum())
    return float((pruned & (key > cut)).sum()) / n if n else 1.0


def perturb_keep(keep: torch.Tensor, share: float, pattern: Pattern, compare: str = "layer", *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``keep`` with round(share * pruned) of its pruned entries swapped at random for as many kept ones, inside
    the pattern's comparison groups, so every count the pattern fixes (per layer, per row, per N:M group) holds.

    N:M: the swaps go to that many random groups, one pair per group (at most min(n, m - n) per group)."""
    if not (0.0 <= share <= 1.0):
        raise ValueError(f"share must lie in [0, 1], got {share!r}")
    out_f, in_f = keep.shape
    if pattern.kind == "nm":
        g = keep.reshape(-1, pattern.m)
    elif compare == "row":
        g = keep
    else:
        g = keep.reshape(1, -1)
    g = g.clone()
    rows, width = g.shape
    pruned_per = (~g).sum(1)
    if pattern.kind == "nm":
        total = int(round(share * int(pruned_per.sum())))
        per_group = max(1, min(pattern.n, pattern.m - pattern.n))
        k = torch.zeros(rows, dtype=torch.long)
        if total:
            order = torch.randperm(rows, generator=generator)
            full, rest = divmod(min(total, rows * per_group), rows)
            k += full
            k[order[:rest]] += 1
    else:
        k = torch.round(share * pruned_per.double()).long()
        k = torch.minimum(k, g.sum(1))
    if int(k.sum()) == 0:
        return keep.clone()
    # per group: the k lowest random keys among its pruned entries and among its kept entries trade places
    r = torch.rand(g.shape, generator=generator, dtype=torch.float64)
    rank_p = torch.where(~g, r, torch.full_like(r, 2.0)).argsort(1).argsort(1)
    rank_k = torch.where(g, r, torch.full_like(r, 2.0)).argsort(1).argsort(1)
    grow = (~g) & (rank_p < k.view(-1, 1))
    drop = g & (rank_k < k.view(-1, 1))
    g[grow] = True
    g[drop] = False
    return g.reshape(out_f, in_f)


# ---------------------------------------------------------------------------------------------
# SPP on the Gram form of the reconstruction loss
# ---------------------------------------------------------------------------------------------
def reconstruction_loss(W: torch.Tensor, M: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """numel * ||W X - (W o M) X||^2 / ||W X||^2 from the Gram matrix G = X X^T."""
    D = W * (1 - M)
    return W.numel() * ((D @ G) * D).sum() / ((W @ G) * W).sum().clamp_min(1e-30)


def reconstruction_grad(W: torch.Tensor, M: torch.Tensor, G: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Gradient of ``reconstruction_loss`` w.r.t. M, given energy = tr(W G W^T)."""
    D = W * (1 - M)
    return (-2.0 * W.numel() / energy.clamp_min(1e-30)) * (D @ G) * W


def spp_path(W: torch.Tensor, G: torch.Tensor, *, steps: int, kappa: float, alpha: float, nu: float, lam: float,
             clip: float | None = 1.0, precondition: bool = False) -> dict:
    """K paper-form SLBI steps on an element-wise mask of W with the Gram-form reconstruction loss.

    Returns entry_step (-1: never entered), the final M and V, and the loss after each step."""
    W = W.detach().float()
    G = G.float()
    energy = ((W @ G) * W).sum()
    M = nn.Parameter(torch.ones_like(W))
    opt = SLBI([M], kappa=kappa, alpha=alpha, nu=nu, lam=lam, variant="paper")
    st = opt.state_of(M)
    # the loss's diagonal curvature per entry: 2 numel W_ij^2 G_jj / energy
    h = (2.0 * W.numel() / energy.clamp_min(1e-30)) * W.pow(2) * torch.diagonal(G).view(1, -1)
    losses = []
    # one (out x in) @ (in x in) product per step: D G gives both this step's gradient and the loss of the
    # previous step's result (reconstruction_grad / reconstruction_loss, without computing D G twice)
    for k in range(steps + 1):
        with torch.no_grad():
            D = W * (1 - M)
            DG = D @ G
            if k:
                losses.append(float(W.numel() * (DG * D).sum() / energy.clamp_min(1e-30)))
            if k == steps:
                break
            M.grad = (-2.0 * W.numel() / energy.clamp_min(1e-30)) * DG * W  # = reconstruction_grad
            if clip:
                M.grad.clamp_(-clip, clip)
            if precondition:  # semi-implicit in the diagonal: the whole M step divided by (1 + kappa alpha h)
                diff = (M - st["gamma"]) / nu
                M.grad = (M.grad + diff) / (1 + kappa * alpha * h) - diff
        opt.step()
    st = opt.state_of(M)  # initialised even after 0 steps (nothing entered)
    return {"entry_step": st["entry_step"].clone(), "M": M.detach().clone(), "V": st["V"].clone(), "losses": losses}


# ---------------------------------------------------------------------------------------------
# The layer-wise driver
# ---------------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder layers of a LLaMA-style (LLaMA, Mistral, Qwen2, SmolLM2) or OPT causal LM."""
    inner = getattr(model, "model", model)
    if hasattr(inner, "layers") and isinstance(inner.layers, nn.ModuleList):
        return inner.layers, "llama"
    dec = getattr(inner, "decoder", None)
    if dec is not None and isinstance(getattr(dec, "layers", None), nn.ModuleList):
        return dec.layers, "opt"
    raise UnsupportedModelError(f"{type(model).__name__}: sppbench prunes LLaMA-style (model.layers) and OPT "
                                "(model.decoder.layers) causal LMs from Hugging Face transformers")


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear of a decoder layer, by its name inside the layer."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


class _Stop(Exception):
    pass


def _layers_parent(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    for mod in model.modules():
        if any(child is layers for child in mod.children()):
            return mod
    raise UnsupportedModelError(f"{type(model).__name__}: cannot find the module holding the decoder layers")


@torch.no_grad()
def _first_layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int,
                        device: torch.device | None = None) -> list:
    """(hidden_states, kwargs) entering layer 0 for each calibration batch (a pre-hook records them and stops
    the forward there). With ``device``, the modules before the layers (embeddings, rotary tables) are moved
    there for this and moved back; the layers stay where they are."""
    got = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        got.append((hidden.detach(), kw))
        raise _Stop

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    parts = [c for c in _layers_parent(model, layers).children() if c is not layers] if device != home else []
    try:
        for part in parts:
            _place(part, device)
        for i in range(0, len(ids), batch_size):
            try:
                model(ids[i:i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
        for part in parts:
            _place(part, home)
    return got


def _place(module: nn.Module, device: torch.device) -> None:
    """Move a module (one decoder layer, or the embeddings) to ``device``: the one place layers travel."""
    module.to(device)


def _run_layer(layer: nn.Module, inputs: list) -> list:
    outs = []
    for hidden, kw in inputs:
        out = layer(hidden, **kw)
        outs.append((out[0] if isinstance(out, (tuple, list)) else out, kw))
    return outs


@dataclass
class LLMPruneResult:
    """What a layer-wise pruning run did: per-Linear target and measured sparsity, timings, settings."""

    method: str
    pattern: str
    layers: list = field(default_factory=list)  # one dict per Linear: layer, name, shape, sparsity, (spp) entered
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def sparsity(self) -> float:
        """Measured sparsity over every pruned Linear (zeros / weights)."""
        zeros = sum(r["zeros"] for r in self.layers)
        return zeros / max(1, sum(r["numel"] for r in self.layers))


@torch.no_grad()
def prune_llm(model: nn.Module, method: str, pattern: str | float, calib_ids: torch.Tensor | None = None, *,
              batch_size: int = 8, spp: dict | None = None, progress: Callable[[str], None] | None = None,
              device: str | torch.device | None = None, perturb: dict | None = None) -> LLMPruneResult:
    """Prune every Linear of every decoder layer of ``model`` in place (weights zeroed), layer by layer.

    ``calib_ids`` (n, seqlen) are the calibration windows (not needed by ``magnitude``). Each layer's
    statistics come from the outputs of the already-pruned layers before it; one layer's activations
    are held at a time. Returns per-Linear target and measured sparsity.

    perturb: for the control ``ria-perturbed`` only: ``{"shares": {"<layer>.<name>": share} or one share,
    "seed": int}``, the share of each Linear's pruned weights that RIA's keep-set trades at random for kept ones
    (``perturb_keep``); the LLM table passes SPP-RIA's own ``differs_from_ria`` per Linear.

    device: where the work happens when the model is kept elsewhere (e.g. the model in CPU memory, ``"cuda"``):
    the embeddings visit it once, then each decoder layer is moved there, pruned, and moved back, so the
    device holds one layer, its Gram / SLBI state and the calibration activations (``llm_memory``).
    """
    if method not in LLM_METHODS + CONTROL_METHODS:
        raise UnsupportedModelError(f"unknown LLM pruning method {method!r}; use one of {LLM_METHODS} (or the "
                                    f"control {CONTROL_METHODS[0]!r} with perturb=)")
    if (method == "ria-perturbed") != (perturb is not None):
        raise ValueError("perturb= is given with method 'ria-perturbed' and only then: "
                         "{'shares': {'<layer>.<name>': share} or a share, 'seed': int}")
    gen = None
    if perturb is not None:
        bad = set(perturb) - {"shares", "seed"}
        if bad or "shares" not in perturb:
            raise ValueError(f"perturb takes 'shares' (required) and 'seed', got {sorted(perturb)}")
        gen = torch.Generator().manual_seed(int(perturb.get("seed", 0)))
    pat = parse_pattern(pattern)
    unknown = set(spp or {}) - set(SPP_RIA_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown spp-ria setting(s) {sorted(unknown)}; the settings are {list(SPP_RIA_DEFAULTS)}")
    cfg = {**SPP_RIA_DEFAULTS, **(spp or {})}
    meth = get(method, "llm")
    gram = meth.statistic == "gram"
    layers, family = decoder_layers(model)
    log = progress or (lambda msg: None)
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    res = LLMPruneResult(method, pat.name, settings={
        "family": family, "pattern": pat.name, "sparsity": pat.sparsity, "compare": COMPARE[method],
        "calibration": None if calib_ids is None else {"n_samples": int(calib_ids.shape[0]),
                                                       "seqlen": int(calib_ids.shape[1])},
        **({"spp": {k: cfg[k] for k in SPP_RIA_DEFAULTS}, "note": RECONSTRUCTION} if method == "spp-ria" else {}),
        **({"sparsegpt": dict(SPARSEGPT_DEFAULTS), "note": "SparseGPT (Frantar and Alistarh 2023), written here from "
            "its Algorithm 1 (sppbench.methods.sparsegpt): the kept weights are updated"} if method == "sparsegpt" else {}),
        **({"perturb": {"seed": int(perturb.get("seed", 0)),
                        "shares": "per Linear" if isinstance(perturb["shares"], dict) else float(perturb["shares"])}}
           if perturb is not None else {})})
    try:
        inputs = None
        if meth.statistic != "none":
            if calib_ids is None:
                raise ValueError(f"{method} needs calibration token windows (calib_ids)")
            inputs = _first_layer_inputs(model, layers, calib_ids, batch_size, device)
        home = next(model.parameters()).device
        dev = home if device is None else torch.device(device)
        for li, layer in enumerate(layers):
            if dev != home:
                _place(layer, dev)
            lins = layer_linears(layer)
            stats: dict[str, dict] = {n: {"tokens": 0} for n in lins}
            hooks = []
            if inputs is not None:
                memo: dict = {}  # Linears fed the same tensor (q/k/v, gate/up) share one statistic per batch

                def make_hook(name):
                    def hook(mod, args, out):
                        x = args[0]
                        key = (x.data_ptr(), tuple(x.shape))
                        if key not in memo:  # the entry holds x, so its memory cannot be reused within the batch
                            x2 = x.detach().reshape(-1, x.shape[-1]).float()
                            memo[key] = (x, x2.shape[0], x2.T @ x2 if gram else x2.pow(2).sum(0))
                        _, n, stat = memo[key]
                        s = stats[name]
                        s["tokens"] += n
                        s["G" if gram else "sq"] = s.get("G" if gram else "sq", 0) + stat
                    return hook

                hooks = [m.register_forward_hook(make_hook(n)) for n, m in lins.items()]
                try:
                    for hidden, kw in inputs:
                        layer(hidden, **kw)
                        memo.clear()
                finally:
                    for h in hooks:
                        h.remove()
            for name, lin in lins.items():
                W = lin.weight.data
                s = stats[name]
                compare = COMPARE[method] if pat.kind == "unstructured" else "layer"
                keep, extra = meth.select(W, s, pat, compare, {"layer": li, "name": name, "spp": cfg,
                                                               "perturb": perturb, "generator": gen})
                W.mul_(keep.to(W.dtype))
                zeros = int((W == 0).sum())
                res.layers.append({"layer": li, "name": name, "shape": list(W.shape), "numel": W.numel(),
                                   "zeros": zeros, "target": pat.sparsity, "sparsity": zeros / W.numel(), **extra})
            if inputs is not None and li + 1 < len(layers):
                inputs = _run_layer(layer, inputs)  # the next layer sees this layer's pruned outputs
            if dev != home:
                _place(layer, home)
            log(f"{method} {pat.name}: layer {li + 1}/{len(layers)} done ({time.perf_counter() - t0:.1f}s)")
    finally:
        model.train(was)
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def llm_memory(hidden: int, intermediate: int, layers: int, *, heads: int, kv_heads: int | None = None,
               vocab: int = 32000, n_samples: int = 128, seqlen: int = 2048, weight_bytes: int = 2,
               act_bytes: int = 2, method: str = "spp-ria") -> dict:
    """Estimated memory (GiB) of ``prune_llm(..., device=...)`` on a LLaMA-style model: the whole model in host
    memory; on the device one decoder layer, the calibration activations entering and leaving it, and the
    per-Linear statistics (Wanda / RIA: a column norm; SPP-RIA: a float32 Gram matrix per distinct input and
    the float32 SLBI state of the largest Linear: M, V, Gamma, gradient)."""
    kv = kv_heads or heads
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv * head_dim * 2  # q, o + k, v
    mlp = 3 * hidden * intermediate
    layer_params = attn + mlp
    total = layers * layer_params + 2 * vocab * hidden
    gib = 1024 ** 3
    acts = 2 * n_samples * seqlen * hidden * act_bytes  # inputs and outputs of one layer
    if method == "spp-ria":
        stats = 4 * (3 * hidden * hidden + intermediate * intermediate)  # q/k/v, o, gate/up, down inputs
        stats += 4 * 4 * hidden * intermediate  # SLBI state of the largest Linear (one at a time)
    elif method in ("wanda", "ria"):
        stats = 4 * (3 * hidden + intermediate)
    else:
        stats = 0
    return {"host_gib": round(total * weight_bytes / gib, 2), "layer_gib": round(layer_params * weight_bytes / gib, 2),
            "activations_gib": round(acts / gib, 2), "statistics_gib": round(stats / gib, 2),
            "device_gib": round((layer_params * weight_bytes + acts + stats) / gib, 2)}


# ---------------------------------------------------------------------------------------------
# The registry entries: each method's choice of the weights to keep in one Linear
# ---------------------------------------------------------------------------------------------
# select(W, stats, pattern, compare, ctx) -> (keep mask, extras): W the Linear's weight (updated in place by
# SparseGPT only), stats its calibration statistics ("sq": squared input norms per column; "G": the input Gram),
# ctx: {"layer", "name", "spp" (SPP-RIA's settings), "perturb", "generator"}.
def _norm(s: dict, gram: bool) -> torch.Tensor:
    sq = torch.diagonal(s["G"]) if gram else s["sq"]
    return sq.clamp_min(0).sqrt()


def _select_magnitude(W, s, pat, compare, ctx):
    return keep_by_order(W.abs(), None, pat, compare), {}


def _select_wanda(W, s, pat, compare, ctx):
    return keep_by_order(wanda_score(W.float(), _norm(s, False)), None, pat, compare), {}


def _select_ria(W, s, pat, compare, ctx):
    return keep_by_order(ria_score(W.float(), _norm(s, False)), None, pat, compare), {}


def _select_ria_perturbed(W, s, pat, compare, ctx):
    keep, _ = _select_ria(W, s, pat, compare, ctx)
    sh = ctx["perturb"]["shares"]
    share = float(sh.get(f"{ctx['layer']}.{ctx['name']}", 0.0) if isinstance(sh, dict) else sh)
    return perturb_keep(keep, share, pat, COMPARE["ria-perturbed"], generator=ctx["generator"]), {"perturbed_share": share}


def _select_spp_ria(W, s, pat, compare, ctx):
    cfg = ctx["spp"]
    ria = ria_score(W.float(), _norm(s, True))
    p = spp_path(W, s["G"], **{k: cfg[k] for k in SPP_RIA_DEFAULTS})
    e = p["entry_step"].double()
    primary = -torch.where(e < 0, torch.full_like(e, math.inf), e)  # earlier entry first
    keep = keep_by_order(primary, ria, pat, compare)
    extra = {"entered": float((p["entry_step"] >= 0).float().mean()),
             "loss_last": p["losses"][-1] if p["losses"] else 0.0}
    # how much of this layer's pruning did the path decide (vs the RIA tie-break)?
    ria_keep = keep_by_order(ria, None, pat, compare)
    n_pruned = int((~keep).sum())
    # share of SPP-RIA's pruned weights that RIA would have kept: how far the path moved RIA's cut
    extra["differs_from_ria"] = float((ria_keep & ~keep).sum()) / n_pruned if n_pruned else 0.0
    es = p["entry_step"]
    _, counts = torch.unique(es[es >= 0], return_counts=True)
    extra["pruned_by_path"] = pruned_by_path(es, keep, pat, compare)
    extra["max_step_share"] = float(counts.max()) / int((es >= 0).sum()) if counts.numel() else None
    return keep, extra


def _select_sparsegpt(W, s, pat, compare, ctx):

    # OBS updates of the kept weights (they change, not only the mask)
    new, keep = sparsegpt(W, s["G"], sparsity=pat.sparsity, n=pat.n if pat.kind == "nm" else None,
                          m=pat.m if pat.kind == "nm" else None, **SPARSEGPT_DEFAULTS)
    W.copy_(new)
    return keep, {"weights_updated": True}


for _m in (
    Method("magnitude", "llm", "layer-wise", "|W|, no calibration", seeded=False, select=_select_magnitude),
    Method("wanda", "llm", "layer-wise", "Wanda: |W| x input norm, per output row (Sun et al. 2024)",
           statistic="sq", compare="row", select=_select_wanda),
    Method("ria", "llm", "layer-wise", "RIA: relative importance x input norm^0.5 (Zhang et al. 2024)",
           statistic="sq", select=_select_ria),
    Method("spp-ria", "llm", "layer-wise", "SPP-RIA: SLBI entry order on the reconstruction loss, RIA tie-break "
           "(sppbench's reconstruction of the paper's Algorithm 2)", defaults=SPP_RIA_DEFAULTS, statistic="gram",
           select=_select_spp_ria),
    # compare "block": the lowest OBS scores of each block of SPARSEGPT_DEFAULTS["blocksize"] inputs
    Method("sparsegpt", "llm", "layer-wise", "SparseGPT: OBS mask choice and weight updates (Frantar and Alistarh "
           "2023)", defaults=SPARSEGPT_DEFAULTS, statistic="gram", compare="block", select=_select_sparsegpt),
    # a control, not a method of its own: RIA's keep-set with a given share of its pruned weights per Linear swapped
    # at random for kept ones (what a change of SPP-RIA's size, without the path, does)
    Method("ria-perturbed", "llm", "layer-wise", "control: RIA's keep-set, a share of it swapped at random",
           statistic="sq", control=True, select=_select_ria_perturbed),
):
    register(_m)

LLM_METHODS = names("llm")
CONTROL_METHODS = tuple(m.name for m in all_methods("llm") if m.control)
# comparison group of each method's unstructured read-out
COMPARE = {m.name: m.compare for m in all_methods("llm")}
GRAM_METHODS = tuple(m.name for m in all_methods("llm") if m.statistic == "gram")  # need each Linear's input Gram
