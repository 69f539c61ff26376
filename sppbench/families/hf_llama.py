"""Hugging Face LLaMA-style causal LMs: ``LlamaForCausalLM`` / ``LlamaModel`` and the same-structured Mistral and
Qwen2 models (grouped-query attention, RoPE, gated MLP, RMSNorm pre-norms).

Masks (docs/method.md section 2, LLM row), per decoder layer:

- ``blocks.{i}.attn.qk`` (head_dim / 2,): entry j scales dimensions j and j + head_dim/2 of every query head and
  every key head -- the pair RoPE's rotate-half rotates together, so the rotation stays exact -- applied once, as
  m^2, to the rotated keys;
- ``blocks.{i}.attn.v`` (head_dim,): entry j scales dimension j of every key/value head's value, so it removes
  v_proj row j of every kv head and the o_proj input column j of every query head;
- ``blocks.{i}.mlp`` (intermediate_size,): scales ``act(gate(x)) * up(x)``: entry j removes gate row j, up row j
  and down column j.

``MaskedLlamaAttention`` / ``MaskedLlamaMLP`` replace each layer's ``self_attn`` / ``mlp`` and reuse the original
Linears; the attention is computed here with SDPA (grouped-query heads repeated, the causal / padding mask the
layer receives, the original softmax scale). Compression deep-copies the model and puts ``PrunedLlamaAttention``
(q/k of 2 x kept pairs per head with RoPE's cos / sin restricted to the kept frequencies, v of the kept dims) and
narrow gate / up / down Linears in place, so ``generate`` still works. A branch with nothing left outputs its
constant (o_proj / down_proj bias, or 0) and its now unused pre-norm becomes ``nn.Identity``.
"""
from __future__ import annotations

import copy
import sys
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.costs import Branch, CostModel, register_branch
from ..core.family import Family, UnitSlice, register
from ..core.masks import MaskedModel, MaskGroup
from ..errors import SpecError, UnsupportedModelError
from .blocks import numel

SPEC_FORMAT = "sppbench.pruned/1"
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
ROPE_TYPES = ("default", "linear", "llama3")  # all keep RoPE's rotate-half pairing over the full head
DEFAULT_TOKENS = 128
EXAMPLE_TOKENS_MAX = 256
# transformers module -> (model classes this family accepts, its attention class, its MLP class)
_MODULES = {
    "llama": ("transformers.models.llama.modeling_llama", ("LlamaForCausalLM", "LlamaModel"), "LlamaAttention",
              "LlamaMLP"),
    "mistral": ("transformers.models.mistral.modeling_mistral", ("MistralForCausalLM", "MistralModel"),
                "MistralAttention", "MistralMLP"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", ("Qwen2ForCausalLM", "Qwen2Model"), "Qwen2Attention",
              "Qwen2MLP"),
}
MODEL_CLASSES = tuple(c for _, classes, _, _ in _MODULES.values() for c in classes)
MODEL_TYPES = tuple(_MODULES)  # the config.json model_type of each architecture


def _module(key: str, load: bool = False):
    """transformers' modeling module of one architecture (imported only if ``load``)."""
    name = _MODULES[key][0]
    if name in sys.modules or not load:
        return sys.modules.get(name)
    try:
        import importlib

        return importlib.import_module(name)
    except ImportError:  # pragma: no cover
        return None


def _arch_key(model: nn.Module) -> str | None:
    for key, (_, classes, _, _) in _MODULES.items():
        mod = _module(key)
        if mod is not None and isinstance(model, tuple(getattr(mod, c) for c in classes)):
            return key
    return None


# ---------------------------------------------------------------------------------------------
# Attention helpers (shared by the masked and the pruned modules)
# ---------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' ``apply_rotary_pos_emb`` (heads on dim 1)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, h_kv, L, d) -> (B, h_kv * n_rep, L, d), kv head i serving query heads i*n_rep .. (i+1)*n_rep - 1."""
    if n_rep == 1:
        return x
    B, hkv, L, d = x.shape
    return x[:, :, None].expand(B, hkv, n_rep, L, d).reshape(B, hkv * n_rep, L, d)


def _cache_of(cache, kwargs: dict):
    old = kwargs.pop("past_key_values", None)  # the pre-5.x name of ``cache``
    return cache if cache is not None else old


def _attend(q, k, v, mask, scale: float, dropout: float, n_rep: int) -> torch.Tensor:
    """SDPA over grouped-query heads, with transformers' conventions for the mask the layer receives: a float
    (additive) or bool (True = may attend) tensor, or None = causal when more than one query (upper-left aligned,
    the keys cropped to the queries as transformers' sdpa path does), none for a single query."""
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    n_q = q.shape[-2]
    causal = mask is None and n_q > 1
    if causal and k.shape[-2] > n_q:
        k, v = k[..., :n_q, :], v[..., :n_q, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, is_causal=causal)


def _uniform_attend(v, mask, n_q: int, dropout: float, training: bool, n_rep: int) -> torch.Tensor:
    """What ``_attend`` gives when every logit is 0: each query averages the values the mask lets it see (softmax
    of the mask alone); a query that may see nothing gets 0 with a bool mask (as SDPA) and the plain mean with a
    float mask (as SDPA, whose masked logits are the dtype's minimum)."""
    v = _repeat_kv(v, n_rep)
    n_k = v.shape[-2]
    if mask is None:
        if n_q > 1:
            n_k = min(n_k, n_q)
            v = v[..., :n_k, :]
            allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=v.device).tril()
            w = torch.softmax(torch.zeros(n_q, n_k, device=v.device).masked_fill(~allowed, float("-inf")), dim=-1)
        else:
            w = torch.full((n_q, n_k), 1.0 / n_k, device=v.device)
    elif mask.dtype == torch.bool:
        logits = torch.zeros(mask.shape, device=v.device).masked_fill(~mask, float("-inf"))
        w = torch.softmax(logits, dim=-1)
        w = torch.where(mask.any(dim=-1, keepdim=True), w, torch.zeros((), device=v.device))
    else:
        w = torch.softmax(mask.float(), dim=-1)
    w = F.dropout(w.to(v.dtype), p=dropout, training=training)
    return torch.matmul(w, v)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class MaskedLlamaAttention(nn.Module):
    """``LlamaAttention`` (or Mistral's / Qwen2's) with pair-wise masks ``mask_qk`` (head_dim/2,) and ``mask_v``
    (head_dim,).

    Same call signature and return value as transformers 5.24's module:
    ``forward(hidden_states, position_embeddings, attention_mask, cache=None, **kwargs) -> (attn_output, None)``.
    Keys are scaled by ``cat(m, m)^2`` after RoPE (q . k over the pair (j, j + d/2) scales by m_j^2, whichever of
    q or k carries it, and rotation commutes with scaling the pair), values by ``mask_v``; the scaled keys and
    values go into the cache. The attention is SDPA with the original scale ``head_dim ** -0.5``.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn
        w = attn.q_proj.weight
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.num_key_value_groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        self.is_causal = True
        self.mask_qk = nn.Parameter(torch.ones(attn.head_dim // 2, dtype=w.dtype, device=w.device))
        self.mask_v = nn.Parameter(torch.ones(attn.head_dim, dtype=w.dtype, device=w.device))
        self.train(attn.training)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
        cache = _cache_of(cache, kwargs)
        a = self.attn
        lead = hidden_states.shape[:-1]
        shape = (*lead, -1, a.head_dim)
        q = a.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = a.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = a.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = _rope(q, k, cos, sin)
        m = torch.cat([self.mask_qk, self.mask_qk])
        k = k * (m * m)
        v = v * self.mask_v
        if cache is not None:
            k, v = cache.update(k, v, a.layer_idx, kwargs=kwargs)
        dropout = a.attention_dropout if self.training else 0.0
        out = _attend(q, k, v, attention_mask, a.scaling, dropout, a.num_key_value_groups)
        out = out.transpose(1, 2).reshape(*lead, -1).contiguous()
        return a.o_proj(out), None


class MaskedLlamaMLP(nn.Module):
    """The gated MLP ``down(act(gate(x)) * up(x))`` with a mask on the product (the intermediate activation)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp
        w = mlp.gate_proj.weight
        self.mask = nn.Parameter(torch.ones(mlp.gate_proj.out_features, dtype=w.dtype, device=w.device))
        self.train(mlp.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        return m.down_proj(m.act_fn(m.gate_proj(x)) * m.up_proj(x) * self.mask)


class PrunedLlamaAttention(nn.Module):
    """Grouped-query self-attention keeping ``qk`` RoPE pairs and ``v_dim`` value dims per head.

    Same call signature and return value as ``LlamaAttention`` and the same parameter names (``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj``). Query / key heads have width 2 * len(qk): the kept dims j, then the kept
    dims j + head_dim/2, so rotate-half still pairs them; RoPE uses the layer's (cos, sin) restricted to those
    dims (``rope_index``). The softmax scale is the ORIGINAL head width's. ``qk`` empty: uniform (causal) attention
    over the values (softmax of the mask alone); ``v_dim == 0``: the branch outputs o_proj's bias (or 0). With a
    cache, an emptied key / value is cached as a width-1 zero placeholder so the cache still counts the tokens.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, qk: Sequence[int],
                 v_dim: int, scale: float, qkv_bias: bool, o_bias: bool, out_size: int | None = None,
                 dropout: float = 0.0, layer_idx: int = 0):
        super().__init__()
        qk = [int(j) for j in qk] if v_dim > 0 else []  # nothing flows out of the heads: q and k are not needed
        half = head_dim // 2
        if any(not 0 <= j < half for j in qk) or len(set(qk)) != len(qk):
            raise ValueError(f"kept q/k pairs must be distinct indices in 0..{half - 1}, got {qk}")
        self.num_heads, self.num_kv_heads, self.orig_head_dim = num_heads, num_kv_heads, head_dim
        self.num_key_value_groups = num_heads // num_kv_heads
        self.qk_dim, self.v_dim = 2 * len(qk), v_dim
        self.scaling = scale
        self.attention_dropout = dropout
        self.layer_idx = layer_idx
        self.is_causal = True
        kept = torch.tensor(qk, dtype=torch.long)
        self.register_buffer("rope_index", torch.cat([kept, kept + half]), persistent=False)
        self.q_proj = _linear(hidden_size, num_heads * self.qk_dim, qkv_bias)
        self.k_proj = _linear(hidden_size, num_kv_heads * self.qk_dim, qkv_bias)
        self.v_proj = _linear(hidden_size, num_kv_heads * v_dim, qkv_bias)
        self.o_proj = _linear(num_heads * v_dim, out_size or hidden_size, o_bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
        cache = _cache_of(cache, kwargs)
        lead = hidden_states.shape[:-1]
        B, N = hidden_states.shape[0], hidden_states.shape[-2]
        h, hkv, dq, dv = self.num_heads, self.num_kv_heads, self.qk_dim, self.v_dim
        if dv == 0:
            if cache is not None:
                z = hidden_states.new_zeros(B, hkv, N, 1)
                cache.update(z, z, self.layer_idx, kwargs=kwargs)
            return self.o_proj(hidden_states.new_zeros(*lead, 0)), None
        dropout = self.attention_dropout if self.training else 0.0
        v = self.v_proj(hidden_states).view(*lead, hkv, dv).transpose(1, 2)
        if dq == 0:
            if cache is not None:
                _, v = cache.update(hidden_states.new_zeros(B, hkv, N, 1), v, self.layer_idx, kwargs=kwargs)
            out = _uniform_attend(v, attention_mask, N, dropout, self.training, self.num_key_value_groups)
        else:
            q = self.q_proj(hidden_states).view(*lead, h, dq).transpose(1, 2)
            k = self.k_proj(hidden_states).view(*lead, hkv, dq).transpose(1, 2)
            cos, sin = position_embeddings
            if cos.shape[-1] != self.orig_head_dim:
                raise ValueError(f"RoPE tables of width {cos.shape[-1]}, expected head_dim {self.orig_head_dim}")
            idx = self.rope_index.to(cos.device)
            q, k = _rope(q, k, cos.index_select(-1, idx), sin.index_select(-1, idx))
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
            out = _attend(q, k, v, attention_mask, self.scaling, dropout, self.num_key_value_groups)
        out = out.transpose(1, 2).reshape(*lead, h * dv)
        return self.o_proj(out), None

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, "
                f"scale={self.scaling:.6g}")


# ---------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------
@register_branch("gqa_attention")
def gqa_attention_cost(d, w) -> tuple[int, int]:
    """Grouped-query attention with RoPE-pair q/k masks.

    dims: D (width), h (query heads), h_kv (key/value heads), N (tokens per sequence), qkv_bias, o_bias, out
    (o_proj output width), norm (params of the pre-norm owned by the branch).
    widths: qk (kept RoPE pairs: q/k heads of width 2*qk), v (kept value dims per kv head).
    MACs per sequence: q/k/v/o projections, and the full N x N score and value matmuls over the query heads, as
    SDPA computes them. No v: the branch is its constant o_proj bias (no norm, no MACs).
    """
    D, h, hkv, N, out = d["D"], d["h"], d["h_kv"], d["N"], d.get("out", d["D"])
    kq, kv = w["qk"], w["v"]
    if kv == 0:
        return (out if d["o_bias"] else 0), 0
    qkv_out = h * 2 * kq + hkv * 2 * kq + hkv * kv
    params = d["norm"] + (D + d["qkv_bias"]) * qkv_out + h * kv * out + out * d["o_bias"]
    macs = N * D * qkv_out + N * N * h * (2 * kq + kv) + N * h * kv * out
    return params, macs


@register_branch("gated_mlp")
def gated_mlp_cost(d, w) -> tuple[int, int]:
    """``down(act(gate(x)) * up(x))`` with a mask on the intermediate units.

    dims: D, N, bias (gate / up biases), down_bias, out, norm. widths: hidden.
    No hidden unit: the branch is its constant down_proj bias (no norm, no MACs).
    """
    D, N, out = d["D"], d["N"], d.get("out", d["D"])
    k = w["hidden"]
    if k == 0:
        return (out if d["down_bias"] else 0), 0
    params = d["norm"] + 2 * (D + d["bias"]) * k + k * out + out * d["down_bias"]
    return params, 2 * N * D * k + N * k * out


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------
def _linear(in_f: int, out_f: int, bias: bool, like: torch.Tensor | None = None) -> nn.Linear:
    kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
    with warnings.catch_warnings():  # a zero-width Linear (an emptied branch) is intended
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_f, out_f, bias=bias, **kw)


@torch.no_grad()
def _narrow(src: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A Linear holding the kept output rows / input columns of ``src``."""
    out_f = src.out_features if rows is None else len(rows)
    in_f = src.in_features if cols is None else len(cols)
    new = _linear(in_f, out_f, src.bias is not None, src.weight)
    w = src.weight if rows is None else src.weight[rows]
    new.weight.copy_(w if cols is None else w[:, cols])
    if src.bias is not None:
        new.bias.copy_(src.bias if rows is None else src.bias[rows])
    return new


def _group_names(i: int) -> tuple[str, str, str]:
    return f"blocks.{i}.attn.qk", f"blocks.{i}.attn.v", f"blocks.{i}.mlp"


def _rows(heads: int, d: int, dims: torch.Tensor) -> torch.Tensor:
    """Rows (head-major) of the given per-head dims in every head: (len(dims), heads)."""
    return torch.arange(heads).unsqueeze(0) * d + dims.to(torch.long).unsqueeze(1)


def _qk_rows(heads: int, d: int, pairs: torch.Tensor) -> torch.Tensor:
    """Rows of the kept RoPE pairs, laid out as the pruned heads use them: per head, dims j then dims j + d/2."""
    dims = torch.cat([pairs, pairs + d // 2]).to(torch.long)
    return (torch.arange(heads).unsqueeze(1) * d + dims.unsqueeze(0)).flatten()


def _layers(model: nn.Module):
    return model.base_model.layers


def _rope_problem(cfg) -> str | None:
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict) and params and "rope_type" not in params and all(isinstance(v, dict)
                                                                               for v in params.values()):
        variants = list(params.values())  # per layer type
    else:
        variants = [params]
    for p in variants:
        rt = p.get("rope_type", p.get("type", "default")) if isinstance(p, dict) else "default"
        if rt not in ROPE_TYPES:
            return (f"rope_type={rt!r} is not supported by the hf-llama adapter (supported: {', '.join(ROPE_TYPES)}: "
                    "plain, linear and llama3 RoPE keep cos/sin unchanged along the sequence and rotate dims j and "
                    "j + head_dim/2 together, which the q/k pair masks rely on)")
        prf = p.get("partial_rotary_factor", 1.0) if isinstance(p, dict) else 1.0
        if prf not in (None, 1, 1.0):
            return (f"partial_rotary_factor={prf} is not supported by the hf-llama adapter (RoPE must rotate the "
                    "whole head)")
    return None


class HFLlama(Family):
    name = "hf-llama"

    def matches(self, model: nn.Module) -> bool:
        # a model of one of these classes implies its module is loaded: never import transformers just to say no
        return _arch_key(model) is not None

    # -- checks ----------------------------------------------------------------------------
    def _check(self, model: nn.Module) -> str:
        key = _arch_key(model)
        if key is None:
            raise UnsupportedModelError(f"{type(model).__name__} is not one of {', '.join(MODEL_CLASSES)}")
        mod = _module(key)
        _, _, attn_cls, mlp_cls = _MODULES[key]
        cfg = model.config
        impl = cfg._attn_implementation
        if impl not in ATTN_IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"attn_implementation={impl!r} is not supported by the hf-llama adapter; load the model with "
                "attn_implementation='sdpa' or 'eager'")
        problem = _rope_problem(cfg)
        if problem:
            raise UnsupportedModelError(problem)
        window = getattr(cfg, "sliding_window", None)
        layer_types = list(getattr(cfg, "layer_types", None) or [])
        windowed = (key == "mistral" and window is not None) or any(t == "sliding_attention" for t in layer_types)
        if windowed and window is not None and window < cfg.max_position_embeddings:
            raise UnsupportedModelError(
                f"sliding-window attention (sliding_window={window} < max_position_embeddings="
                f"{cfg.max_position_embeddings}) is not supported by the hf-llama adapter: its costs assume full "
                "causal attention; load the model with sliding_window=None (use_sliding_window=False for Qwen2)")
        other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if other:
            raise UnsupportedModelError(f"layer types {other} are not supported by the hf-llama adapter "
                                        "(only full causal attention)")
        if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
            raise UnsupportedModelError("quantized models are not supported by the hf-llama adapter; load it in "
                                        "float32 / bfloat16 / float16")
        counts: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
        for i, layer in enumerate(_layers(model)):
            sa, mlp = layer.self_attn, layer.mlp
            if (isinstance(sa, (MaskedLlamaAttention, PrunedLlamaAttention)) or isinstance(mlp, MaskedLlamaMLP)
                    or isinstance(layer.input_layernorm, nn.Identity)
                    or isinstance(layer.post_attention_layernorm, nn.Identity)
                    or getattr(mlp, "gate_proj", None) is None
                    or mlp.gate_proj.out_features != cfg.intermediate_size
                    or sa.o_proj.in_features != cfg.num_attention_heads * sa.head_dim):
                raise UnsupportedModelError(
                    f"this {type(model).__name__} already carries sppbench masks or was compressed; attach masks to "
                    "the original dense model (or call detach_masks() first)")
            if type(sa) is not getattr(mod, attn_cls):
                raise UnsupportedModelError(f"layer {i}: attention {type(sa).__name__} is not supported "
                                            f"(only {attn_cls})")
            if type(mlp) is not getattr(mod, mlp_cls):
                raise UnsupportedModelError(f"layer {i}: MLP {type(mlp).__name__} is not supported (only {mlp_cls})")
            if sa.head_dim % 2:
                raise UnsupportedModelError(f"head_dim={sa.head_dim} is odd: RoPE pairs need an even head width")
            lins = (sa.q_proj, sa.k_proj, sa.v_proj)
            if len({lin.bias is None for lin in lins}) > 1 or len({lin.bias is None for lin in
                                                                   (mlp.gate_proj, mlp.up_proj)}) > 1:
                raise UnsupportedModelError(f"layer {i}: q/k/v (or gate/up) projections with and without bias mixed")
            shared = [n for lin in (*lins, sa.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
                      for n, p in lin.named_parameters() if counts.get(id(p), 0) > 1]
            if shared:
                raise UnsupportedModelError(
                    f"layer {i}: parameters {shared[:3]} are tied to other modules; the hf-llama adapter cannot slice "
                    "shared projection weights (only the tied embedding / lm_head is supported)")
        return key

    @staticmethod
    def tokens(model: nn.Module, input_size: Sequence[int] | int | None) -> int:
        """Sequence length N the MAC budgets are computed for (default: 128, at most max_position_embeddings)."""
        max_n = int(model.config.max_position_embeddings)
        if input_size is None:
            return min(DEFAULT_TOKENS, max_n)
        n = int(input_size) if isinstance(input_size, int) else int(list(input_size)[-1])
        if not 1 <= n <= max_n:
            raise ValueError(f"sequence length {n} is outside 1..{max_n} (max_position_embeddings)")
        return n

    # -- attach / detach -------------------------------------------------------------------
    def attach(self, model: nn.Module, input_size=None) -> MaskedModel:
        self._check(model)
        N = self.tokens(model, input_size)
        cfg = model.config
        seen, total = set(), 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        groups, sites, branches = [], {}, []
        branch_params = 0
        for i, layer in enumerate(_layers(model)):
            gqk, gv, gm = _group_names(i)
            sa, mlp = layer.self_attn, layer.mlp
            D = sa.q_proj.in_features
            h, hkv = sa.q_proj.out_features // sa.head_dim, sa.k_proj.out_features // sa.head_dim
            n_attn, n_mlp = numel(layer.input_layernorm), numel(layer.post_attention_layernorm)
            branches.append(Branch("gqa_attention", {"qk": gqk, "v": gv}, dict(
                D=D, h=h, h_kv=hkv, N=N, out=sa.o_proj.out_features, qkv_bias=int(sa.q_proj.bias is not None),
                o_bias=int(sa.o_proj.bias is not None), norm=n_attn)))
            branches.append(Branch("gated_mlp", {"hidden": gm}, dict(
                D=D, N=N, out=mlp.down_proj.out_features, bias=int(mlp.gate_proj.bias is not None),
                down_bias=int(mlp.down_proj.bias is not None), norm=n_mlp)))
            branch_params += n_attn + n_mlp + numel(sa.q_proj, sa.k_proj, sa.v_proj, sa.o_proj, mlp.gate_proj,
                                                     mlp.up_proj, mlp.down_proj)
            layer.self_attn = MaskedLlamaAttention(sa)
            layer.mlp = MaskedLlamaMLP(mlp)
            sites[gqk] = (layer.self_attn, "mask_qk")
            sites[gv] = (layer.self_attn, "mask_v")
            sites[gm] = (layer.mlp, "mask")
            groups += [MaskGroup(gqk, "qk", "attn", sa.head_dim // 2, i), MaskGroup(gv, "v", "attn", sa.head_dim, i),
                       MaskGroup(gm, "mlp", "mlp", mlp.gate_proj.out_features, i)]
        # base = embeddings (lookups), final norm and lm_head (tied embeddings counted once)
        head = getattr(model, "lm_head", None)
        base_macs = N * head.in_features * head.out_features if isinstance(head, nn.Linear) else 0
        info = {"family": self.name, "model_class": type(model).__name__, "tokens": N, "input_size": N,
                "architecture": {"class": type(model).__name__, "config": cfg.to_dict()},
                "attn_implementation": cfg._attn_implementation}
        return MaskedModel(model, self, sites, groups, CostModel(total - branch_params, base_macs, branches), info)

    def detach(self, masked: MaskedModel) -> None:
        for layer in _layers(masked.model):
            if isinstance(layer.self_attn, MaskedLlamaAttention):
                layer.self_attn = layer.self_attn.attn
            if isinstance(layer.mlp, MaskedLlamaMLP):
                layer.mlp = layer.mlp.mlp

    # -- structural units ------------------------------------------------------------------
    def unit_slices(self, masked: MaskedModel) -> dict[str, list[UnitSlice]]:
        """qk entry j: q_proj rows j and j + d/2 of every query head and k_proj rows j and j + d/2 of every kv head
        (+ biases); v entry j: v_proj row j of every kv head (+ bias) and o_proj column j of every query head; mlp
        entry j: gate_proj and up_proj row j (+ biases) and down_proj column j."""
        out: dict[str, list[UnitSlice]] = {}
        for g in masked.groups:
            site, _ = masked.site(g.name)
            if g.kind in ("qk", "v"):
                a = site.attn
                d = a.head_dim
                h, hkv = a.q_proj.out_features // d, a.k_proj.out_features // d
                if g.kind == "qk":
                    j = torch.arange(d // 2)
                    sl = []
                    for lin, heads in ((a.q_proj, h), (a.k_proj, hkv)):
                        rows = torch.cat([_rows(heads, d, j), _rows(heads, d, j + d // 2)], dim=1)
                        sl += [UnitSlice(p, 0, rows) for p in (lin.weight, lin.bias) if p is not None]
                else:
                    j = torch.arange(d)
                    rows = _rows(hkv, d, j)
                    sl = [UnitSlice(p, 0, rows) for p in (a.v_proj.weight, a.v_proj.bias) if p is not None]
                    sl.append(UnitSlice(a.o_proj.weight, 1, _rows(h, d, j)))
                out[g.name] = sl
            else:
                mlp = site.mlp
                idx = torch.arange(g.size).unsqueeze(1)
                sl = [UnitSlice(p, 0, idx) for lin in (mlp.gate_proj, mlp.up_proj) for p in (lin.weight, lin.bias)
                      if p is not None]
                out[g.name] = sl + [UnitSlice(mlp.down_proj.weight, 1, idx)]
        return out

    # -- compression -----------------------------------------------------------------------
    def compress(self, masked: MaskedModel, keep) -> nn.Module:
        small = copy.deepcopy(masked.model)
        blocks = []
        for i, layer in enumerate(_layers(small)):
            gqk, gv, gm = _group_names(i)
            qk, v, hid = (keep.indices(g).to(torch.long).cpu() for g in (gqk, gv, gm))
            if len(v) == 0:
                qk = qk[:0]
            sa, mlp = layer.self_attn.attn, layer.mlp.mlp
            d = sa.head_dim
            h, hkv = sa.q_proj.out_features // d, sa.k_proj.out_features // d
            new = PrunedLlamaAttention(sa.q_proj.in_features, h, hkv, d, qk.tolist(), len(v), sa.scaling,
                                       sa.q_proj.bias is not None, sa.o_proj.bias is not None,
                                       sa.o_proj.out_features, sa.attention_dropout, sa.layer_idx)
            new.to(device=sa.q_proj.weight.device)
            new.q_proj = _narrow(sa.q_proj, rows=_qk_rows(h, d, qk))
            new.k_proj = _narrow(sa.k_proj, rows=_qk_rows(hkv, d, qk))
            new.v_proj = _narrow(sa.v_proj, rows=_rows(hkv, d, v).T.flatten())
            new.o_proj = _narrow(sa.o_proj, cols=_rows(h, d, v).T.flatten())
            new.train(sa.training)
            layer.self_attn = new
            mlp.gate_proj = _narrow(mlp.gate_proj, rows=hid)
            mlp.up_proj = _narrow(mlp.up_proj, rows=hid)
            mlp.down_proj = _narrow(mlp.down_proj, cols=hid)
            mlp.intermediate_size = len(hid)
            layer.mlp = mlp
            if len(v) == 0:
                layer.input_layernorm = nn.Identity()
            if len(hid) == 0:
                layer.post_attention_layernorm = nn.Identity()
            blocks.append({"qk": qk.tolist(), "v": v.tolist(), "mlp": hid.tolist()})
        small.sppbench_spec = {
            "format": SPEC_FORMAT, "family": self.name, "architecture": masked.info["architecture"],
            "attn_implementation": masked.info["attn_implementation"], "input_size": masked.info["input_size"],
            "tokens": masked.info["tokens"], "blocks": blocks,
        }
        return small

    def example_inputs(self, spec: dict, generator: torch.Generator) -> tuple:
        """(input_ids,): two random sequences of the spec's token count (at most 256) for ``save_pruned``'s check."""
        n = max(2, min(int(spec.get("input_size") or DEFAULT_TOKENS), EXAMPLE_TOKENS_MAX))
        vocab = int(spec["architecture"]["config"]["vocab_size"])
        return (torch.randint(0, vocab, (2, n), generator=generator),)

    # -- rebuild from a spec ---------------------------------------------------------------
    def build(self, spec: dict) -> nn.Module:
        arch = spec["architecture"]
        cls_name = arch["class"]
        key = next((k for k, (_, classes, _, _) in _MODULES.items() if cls_name in classes), None)
        if key is None:
            raise SpecError(f"model class {cls_name!r} is not one of the hf-llama family's ({', '.join(MODEL_CLASSES)})")
        mod = _module(key, load=True)
        if mod is None:  # pragma: no cover
            raise UnsupportedModelError("rebuilding an hf-llama model needs transformers: pip install transformers")
        model_cls = getattr(mod, cls_name)
        impl = spec.get("attn_implementation", "sdpa")
        cfg = model_cls.config_class.from_dict(dict(arch["config"]), attn_implementation=impl)
        blocks = spec["blocks"]
        if len(blocks) != cfg.num_hidden_layers:
            raise SpecError(f"spec lists {len(blocks)} blocks but the architecture has {cfg.num_hidden_layers} layers")
        model = model_cls(cfg)
        for layer, kept in zip(_layers(model), blocks):
            sa, mlp = layer.self_attn, layer.mlp
            d = sa.head_dim
            h, hkv = sa.q_proj.out_features // d, sa.k_proj.out_features // d
            qk, nv, nh = list(kept["qk"]), len(kept["v"]), len(kept["mlp"])
            if any(not 0 <= int(j) < d for j in kept["v"]) or any(not 0 <= int(j) < cfg.intermediate_size
                                                                   for j in kept["mlp"]):
                raise SpecError("a kept v / mlp index is out of range for this architecture")
            layer.self_attn = PrunedLlamaAttention(sa.q_proj.in_features, h, hkv, d, qk, nv, sa.scaling,
                                                   sa.q_proj.bias is not None, sa.o_proj.bias is not None,
                                                   sa.o_proj.out_features, sa.attention_dropout, sa.layer_idx)
            mlp.gate_proj = _linear(mlp.gate_proj.in_features, nh, mlp.gate_proj.bias is not None)
            mlp.up_proj = _linear(mlp.up_proj.in_features, nh, mlp.up_proj.bias is not None)
            mlp.down_proj = _linear(nh, mlp.down_proj.out_features, mlp.down_proj.bias is not None)
            mlp.intermediate_size = nh
            if nv == 0:
                layer.input_layernorm = nn.Identity()
            if nh == 0:
                layer.post_attention_layernorm = nn.Identity()
        model.eval()
        model.sppbench_spec = spec
        return model


register(HFLlama())
