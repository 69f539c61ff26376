"""Hugging Face BERT encoders (``transformers.BertModel``: BERT, MiniLM, sentence-transformers BERTs).

Masks live in explicit wrapper modules: ``MaskedBertSelfAttention`` replaces each layer's
``attention.self`` and ``MaskedBertIntermediate`` its ``intermediate``; both reuse the original Linear
layers. Compression puts a ``PrunedBertSelfAttention`` (q/k and v of different widths, original softmax
scale) and narrow ``attention.output.dense`` / ``intermediate.dense`` / ``output.dense`` Linears into a
copy of the model; the post-attention and post-MLP LayerNorms stay, so an empty branch leaves a
zero-width Linear that outputs exactly its bias.
"""
from __future__ import annotations

import copy
import sys
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.costs import Branch, CostModel
from ..core.family import Family, UnitSlice, register
from ..core.masks import MaskedModel, MaskGroup
from ..errors import SpecError, UnsupportedModelError
from .blocks import numel

SPEC_FORMAT = "sppbench.pruned/1"
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
# activations that map 0 to 0 (the MLP mask multiplies the pre-activation)
ACTIVATIONS = ("gelu", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "relu", "silu", "swish")


def _bert():
    """transformers' BERT classes, imported on first use (sppbench imports without transformers)."""
    try:
        from transformers.models.bert import modeling_bert
    except ImportError:  # pragma: no cover
        return None
    return modeling_bert


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class MaskedBertSelfAttention(nn.Module):
    """``BertSelfAttention`` with pair-wise masks: q, k scaled by ``mask_qk``; v by ``mask_v``.

    Same call signature and return value as the original (``BertAttention`` calls
    ``self(hidden_states, encoder_hidden_states=..., attention_mask=..., cache=..., **kwargs)`` and
    unpacks ``(attn_output, attn_weights)``); the attention itself is the model's configured
    implementation (eager / sdpa), called with the original module, so all-ones masks are exact.
    ``(q * m) . (k * m) = q . (m * m * k)``: the q/k mask is applied once, as m^2, to k.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn
        w = attn.query.weight
        self.mask_qk = nn.Parameter(torch.ones(attn.attention_head_size, dtype=w.dtype, device=w.device))
        self.mask_v = nn.Parameter(torch.ones(attn.attention_head_size, dtype=w.dtype, device=w.device))
        self.train(attn.training)  # the dropout rate passed to the attention follows this module's mode

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
        if cache is not None:
            raise ValueError("sppbench's BERT adapter supports encoders only: no key/value cache")
        a = self.attn
        shape = (*hidden_states.shape[:-1], -1, a.attention_head_size)
        q = a.query(hidden_states).view(shape).transpose(1, 2)
        k = a.key(hidden_states).view(shape).transpose(1, 2)
        k = k * (self.mask_qk * self.mask_qk).to(k.dtype)  # bf16 autocast: stay in the activation dtype
        v = a.value(hidden_states).view(shape).transpose(1, 2)
        v = v * self.mask_v.to(v.dtype)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(a.config._attn_implementation,
                                                          _bert().eager_attention_forward)
        out, weights = interface(a, q, k, v, attention_mask, dropout=a.dropout.p if self.training else 0.0,
                                 scaling=a.scaling, **kwargs)
        return out.reshape(*hidden_states.shape[:-1], -1).contiguous(), weights


class MaskedBertIntermediate(nn.Module):
    """``BertIntermediate`` with a mask on ``dense``'s output, before the activation (act(0) = 0)."""

    def __init__(self, intermediate: nn.Module):
        super().__init__()
        self.intermediate = intermediate
        w = intermediate.dense.weight
        self.mask = nn.Parameter(torch.ones(intermediate.dense.out_features, dtype=w.dtype, device=w.device))
        self.train(intermediate.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        m = self.intermediate
        h = m.dense(hidden_states)
        return m.intermediate_act_fn(h * self.mask.to(h.dtype))


def _mask_logits(mask: torch.Tensor | None, n_q: int, n_k: int, like: torch.Tensor) -> torch.Tensor:
    """All-zero attention logits plus the mask, as an additive float tensor (B|1, 1|h, n_q, n_k)."""
    if mask is None:
        return like.new_zeros(1, 1, n_q, n_k)
    if mask.dtype == torch.bool:
        return like.new_zeros(mask.shape).masked_fill(~mask, torch.finfo(like.dtype).min)
    return mask.to(like.dtype)


class PrunedBertSelfAttention(nn.Module):
    """Self-attention whose q/k head width (``qk_dim``) and v head width (``v_dim``) differ.

    Drop-in for ``BertSelfAttention`` (same call signature, returns ``(attn_output, None)``), with the
    same parameter names (``query``, ``key``, ``value``). The softmax scale is the ORIGINAL head width's.
    ``qk_dim == 0``: every logit is 0, so each token averages the values the attention mask lets it see
    (computed in full, per token). ``v_dim == 0``: the output has width 0 (the following
    ``attention.output.dense`` is then a zero-width Linear that gives its bias) and q/k are dropped too.
    Accepts the attention masks of both the eager (additive float) and sdpa (bool or None) settings.
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float, bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if v_dim == 0:
            qk_dim = 0  # nothing flows out of the heads: q and k are not needed
        self.num_heads, self.qk_dim, self.v_dim, self.scale = num_heads, qk_dim, v_dim, scale
        self.attention_head_size = v_dim
        self.all_head_size = num_heads * v_dim
        self.is_causal = False
        self.query = _linear(dim, num_heads * qk_dim, bias)
        self.key = _linear(dim, num_heads * qk_dim, bias)
        self.value = _linear(dim, num_heads * v_dim, bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
        if cache is not None:
            raise ValueError("sppbench's BERT adapter supports encoders only: no key/value cache")
        *lead, N, _ = hidden_states.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        if dv == 0:
            return hidden_states.new_zeros(*lead, N, 0), None
        v = self.value(hidden_states).view(*lead, N, h, dv).transpose(-3, -2)
        p = self.dropout.p if self.training else 0.0
        if dq == 0:
            w = torch.softmax(_mask_logits(attention_mask, N, N, v), dim=-1)
            out = torch.matmul(F.dropout(w, p=p, training=self.training), v)
        else:
            q = self.query(hidden_states).view(*lead, N, h, dq).transpose(-3, -2)
            k = self.key(hidden_states).view(*lead, N, h, dq).transpose(-3, -2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=p, scale=self.scale,
                                                 is_causal=False)
        return out.transpose(-3, -2).reshape(*lead, N, h * dv), None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, scale={self.scale:.6g}"


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _narrow_linear(src: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A Linear holding the kept output rows / input columns of ``src``."""
    out_f = src.out_features if rows is None else len(rows)
    in_f = src.in_features if cols is None else len(cols)
    new = _linear(in_f, out_f, src.bias is not None, src.weight)
    w = src.weight if rows is None else src.weight[rows]
    new.weight.copy_(w if cols is None else w[:, cols])
    if src.bias is not None:
        new.bias.copy_(src.bias if rows is None else src.bias[rows])
    return new


def _linear(in_f: int, out_f: int, bias: bool, like: torch.Tensor | None = None) -> nn.Linear:
    kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
    with warnings.catch_warnings():  # a zero-width Linear (an emptied branch) is intended
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_f, out_f, bias=bias, **kw)


def _group_names(i: int) -> tuple[str, str, str]:
    return f"blocks.{i}.attn.qk", f"blocks.{i}.attn.v", f"blocks.{i}.mlp"


def _head_rows(h: int, d: int, kept: torch.Tensor) -> torch.Tensor:
    """Rows (head-major, as BERT lays out q / k / v) of the kept per-head dimensions."""
    return (torch.arange(h).unsqueeze(1) * d + kept.to(torch.long).unsqueeze(0)).flatten()


class HFBert(Family):
    name = "hf-bert"

    def matches(self, model: nn.Module) -> bool:
        # a BertModel instance implies its module is loaded: never import transformers just to say no
        mb = sys.modules.get("transformers.models.bert.modeling_bert")
        return mb is not None and isinstance(model, mb.BertModel)

    # -- checks ----------------------------------------------------------------------------
    def _check(self, model: nn.Module) -> None:
        mb = _bert()
        cfg = model.config
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModelError(
                "this BertModel is a decoder (is_decoder / add_cross_attention); the hf-bert adapter supports "
                "bidirectional encoders only: load it with is_decoder=False and add_cross_attention=False"
            )
        pet = getattr(cfg, "position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise UnsupportedModelError(
                f"position_embedding_type={pet!r} is not supported by the hf-bert adapter (only 'absolute' "
                "position embeddings)"
            )
        impl = cfg._attn_implementation
        if impl not in ATTN_IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"attn_implementation={impl!r} is not supported by the hf-bert adapter; load the model with "
                "attn_implementation='sdpa' or 'eager'"
            )
        act = cfg.hidden_act
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"hidden_act={act!r} is not supported by the hf-bert adapter (supported: {', '.join(ACTIVATIONS)}: "
                "each maps 0 to 0, which the MLP mask relies on)"
            )
        for i, layer in enumerate(model.encoder.layer):
            sa, inter = layer.attention.self, layer.intermediate
            if (isinstance(sa, (MaskedBertSelfAttention, PrunedBertSelfAttention))
                    or isinstance(inter, MaskedBertIntermediate)
                    or inter.dense.out_features != cfg.intermediate_size
                    or layer.attention.output.dense.in_features != cfg.hidden_size):
                raise UnsupportedModelError(
                    "this BertModel already carries sppbench masks or was compressed; attach masks to the original "
                    "dense model (or call detach_masks() first)"
                )
            if type(sa) is not mb.BertSelfAttention or layer.attention.is_cross_attention:
                raise UnsupportedModelError(f"layer {i}: attention {type(sa).__name__} is not supported "
                                            "(only BertSelfAttention)")
            if type(inter) is not mb.BertIntermediate:
                raise UnsupportedModelError(f"layer {i}: {type(inter).__name__} is not supported "
                                            "(only BertIntermediate)")

    @staticmethod
    def tokens(model: nn.Module, input_size: Sequence[int] | int | None) -> int:
        """Sequence length N the MAC budgets are computed for (default: max_position_embeddings)."""
        max_n = model.config.max_position_embeddings
        if input_size is None:
            return int(max_n)
        n = int(input_size) if isinstance(input_size, int) else int(list(input_size)[-1])
        if not 1 <= n <= max_n:
            raise ValueError(f"sequence length {n} is outside 1..{max_n} (max_position_embeddings)")
        return n

    # -- attach / detach -------------------------------------------------------------------
    def attach(self, model: nn.Module, input_size=None) -> MaskedModel:
        self._check(model)
        N = self.tokens(model, input_size)
        cfg = model.config
        D, h = cfg.hidden_size, cfg.num_attention_heads
        total = numel(model)
        groups, sites, branches = [], {}, []
        branch_params = 0
        for i, layer in enumerate(model.encoder.layer):
            gqk, gv, gm = _group_names(i)
            sa, proj = layer.attention.self, layer.attention.output.dense
            inter, out = layer.intermediate, layer.output.dense
            branches.append(Branch("attention", {"qk": gqk, "v": gv}, dict(
                D=D, h=h, N=N, out=proj.out_features, qkv_bias=int(sa.query.bias is not None),
                proj_bias=int(proj.bias is not None), norm=0, ls=0, masked=1)))
            branches.append(Branch("mlp", {"hidden": gm}, dict(
                D=D, N=N, out=out.out_features, fc1_bias=int(inter.dense.bias is not None),
                fc2_bias=int(out.bias is not None), norm=0, ls=0)))
            branch_params += numel(sa.query, sa.key, sa.value, proj, inter.dense, out)
            layer.attention.self = MaskedBertSelfAttention(sa)
            layer.intermediate = MaskedBertIntermediate(inter)
            sites[gqk] = (layer.attention.self, "mask_qk")
            sites[gv] = (layer.attention.self, "mask_v")
            sites[gm] = (layer.intermediate, "mask")
            d = sa.attention_head_size
            groups += [MaskGroup(gqk, "qk", "attn", d, i), MaskGroup(gv, "v", "attn", d, i),
                       MaskGroup(gm, "mlp", "mlp", inter.dense.out_features, i)]
        # base = embeddings, LayerNorms, pooler; its MACs are the pooler's Linear (embeddings are lookups)
        base_params = total - branch_params
        pooler = getattr(model, "pooler", None)
        base_macs = pooler.dense.in_features * pooler.dense.out_features if pooler is not None else 0
        info = {"family": self.name, "model_class": type(model).__name__, "tokens": N, "input_size": N,
                "architecture": cfg.to_dict(), "attn_implementation": cfg._attn_implementation,
                "pooler": pooler is not None}
        return MaskedModel(model, self, sites, groups, CostModel(base_params, base_macs, branches), info)

    def detach(self, masked: MaskedModel) -> None:
        for layer in masked.model.encoder.layer:
            if isinstance(layer.attention.self, MaskedBertSelfAttention):
                layer.attention.self = layer.attention.self.attn
            if isinstance(layer.intermediate, MaskedBertIntermediate):
                layer.intermediate = layer.intermediate.intermediate

    # -- structural units ------------------------------------------------------------------
    def unit_slices(self, masked: MaskedModel) -> dict[str, list[UnitSlice]]:
        """qk entry j: query and key rows of dim j in every head (+ biases); v entry j: value rows of dim j
        in every head (+ bias) and the matching ``attention.output.dense`` columns; mlp entry j:
        ``intermediate.dense`` row j (+ bias) and ``output.dense`` column j."""
        out: dict[str, list[UnitSlice]] = {}
        for g in masked.groups:
            site, _ = masked.site(g.name)
            layer = masked.model.encoder.layer[g.layer]
            if g.kind in ("qk", "v"):
                a = site.attn
                h, d = a.num_attention_heads, g.size
                heads = torch.arange(h).unsqueeze(0) * d + torch.arange(d).unsqueeze(1)  # (d, h)
                lins = (a.query, a.key) if g.kind == "qk" else (a.value,)
                sl = [UnitSlice(p, 0, heads) for lin in lins for p in (lin.weight, lin.bias) if p is not None]
                if g.kind == "v":
                    sl.append(UnitSlice(layer.attention.output.dense.weight, 1, heads))
                out[g.name] = sl
            else:
                dense = site.intermediate.dense
                idx = torch.arange(g.size).unsqueeze(1)
                sl = [UnitSlice(p, 0, idx) for p in (dense.weight, dense.bias) if p is not None]
                out[g.name] = sl + [UnitSlice(layer.output.dense.weight, 1, idx)]
        return out

    # -- compression -----------------------------------------------------------------------
    def compress(self, masked: MaskedModel, keep) -> nn.Module:
        small = copy.deepcopy(masked.model)
        kept_blocks = []
        scale = None
        for i, layer in enumerate(small.encoder.layer):
            gqk, gv, gm = _group_names(i)
            qk, v, hid = (keep.indices(g).to(torch.long).cpu() for g in (gqk, gv, gm))
            sa = layer.attention.self.attn
            layer.intermediate = layer.intermediate.intermediate
            scale = sa.scaling
            h, d = sa.num_attention_heads, sa.attention_head_size
            new = PrunedBertSelfAttention(sa.query.in_features, h, len(qk), len(v), sa.scaling,
                                          sa.query.bias is not None, sa.dropout.p)
            new.to(dtype=sa.query.weight.dtype, device=sa.query.weight.device)
            q_rows, v_rows = _head_rows(h, d, qk[:new.qk_dim]), _head_rows(h, d, v)
            new.query = _narrow_linear(sa.query, rows=q_rows)
            new.key = _narrow_linear(sa.key, rows=q_rows)
            new.value = _narrow_linear(sa.value, rows=v_rows)
            new.train(sa.training)
            layer.attention.self = new
            layer.attention.output.dense = _narrow_linear(layer.attention.output.dense, cols=v_rows)
            layer.intermediate.dense = _narrow_linear(layer.intermediate.dense, rows=hid)
            layer.output.dense = _narrow_linear(layer.output.dense, cols=hid)
            kept_blocks.append({"qk": qk.tolist(), "v": v.tolist(), "mlp": hid.tolist()})
        small.sppbench_spec = {
            "format": SPEC_FORMAT, "family": self.name, "architecture": masked.info["architecture"],
            "attn_implementation": masked.info["attn_implementation"], "pooler": masked.info["pooler"],
            "input_size": masked.info["input_size"], "tokens": masked.info["tokens"],
            "attention_scale": scale, "blocks": kept_blocks,
        }
        return small

    def example_inputs(self, spec: dict, generator: torch.Generator) -> tuple:
        """(input_ids, attention_mask) for ``save_pruned``'s check: two sequences of up to 64 tokens, the second
        one padded."""
        n = max(2, min(int(spec.get("input_size") or 64), 64))
        ids = torch.randint(0, int(spec["architecture"]["vocab_size"]), (2, n), generator=generator)
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, n // 2:] = 0
        return ids, mask

    # -- rebuild from a spec ---------------------------------------------------------------
    def build(self, spec: dict) -> nn.Module:
        mb = _bert()
        if mb is None:  # pragma: no cover
            raise UnsupportedModelError("rebuilding an hf-bert model needs transformers: pip install transformers")
        arch = dict(spec["architecture"])
        impl = spec.get("attn_implementation", "sdpa")
        cfg = mb.BertConfig.from_dict(arch, attn_implementation=impl)
        blocks = spec["blocks"]
        if len(blocks) != cfg.num_hidden_layers:
            raise SpecError(f"spec lists {len(blocks)} blocks but the architecture has {cfg.num_hidden_layers} layers")
        model = mb.BertModel(cfg, add_pooling_layer=bool(spec.get("pooler", True)))
        scale = float(spec["attention_scale"])
        for layer, kept in zip(model.encoder.layer, blocks):
            sa = layer.attention.self
            nq, nv, nh = len(kept["qk"]), len(kept["v"]), len(kept["mlp"])
            new = PrunedBertSelfAttention(sa.query.in_features, sa.num_attention_heads, nq, nv, scale,
                                          sa.query.bias is not None, sa.dropout.p)
            layer.attention.self = new
            dense = layer.attention.output.dense
            layer.attention.output.dense = _linear(new.all_head_size, dense.out_features, dense.bias is not None)
            inter, out = layer.intermediate.dense, layer.output.dense
            layer.intermediate.dense = _linear(inter.in_features, nh, inter.bias is not None)
            layer.output.dense = _linear(nh, out.out_features, out.bias is not None)
        model.eval()
        model.sppbench_spec = spec
        return model


register(HFBert())
