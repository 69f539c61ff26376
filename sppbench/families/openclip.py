"""open_clip dual encoders: masks on BOTH towers of a CLIP / CustomTextCLIP.

Two adapters live here:

- ``OpenClipBlocks`` ("open-clip-transformer"): open_clip's native ``Transformer`` (a stack of
  ``ResidualAttentionBlock`` with ``nn.MultiheadAttention``), as used by the visual ViT and the text
  transformer of every native open_clip model. ``MaskedMHA`` splits ``in_proj`` into q, k, v and
  computes the attention explicitly (the causal / padding mask passed by the tower is honoured);
  ``MaskedSeqMlp`` masks ``c_fc``'s output. Compression builds ``PrunedMHA`` (``nn.MultiheadAttention``
  cannot hold q/k and v of different widths), a narrow ``c_fc -> act -> c_proj``, or constant
  branches.
- ``OpenClip`` ("open-clip"): the whole dual encoder. It finds each tower's transformer and hands
  it to the adapter of its kind: ``OpenClipBlocks`` for native towers, the timm ViT adapter for a
  ``TimmModel`` trunk, the Hugging Face BERT adapter for an ``HFTextEncoder``. Group names get the
  tower as prefix (``image.blocks.3.attn.qk``, ``text.blocks.0.mlp``), every group and cost branch
  records its tower, and the cost model prices each tower alone (MACs per image / per caption) or
  both together (see ``SolutionPath.keep(tower=...)`` and ``keep_towers``).

Rebuilding a pruned CLIP from its spec needs the open_clip model config (``embed_dim``,
``vision_cfg``, ``text_cfg``, ...), which open_clip does not keep on the model: create models with
``sppbench.tasks.clip.create_model`` (it records the config as ``model.sppbench_model_cfg``) or set that
attribute yourself before ``attach_masks``.
"""
from __future__ import annotations

import copy
import functools
import json
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.costs import Branch, CostModel
from ..core.family import FAMILIES, Family, UnitSlice, get, register
from ..core.masks import MaskedModel, MaskGroup
from ..core.path import KeepSet
from ..errors import SpecError, UnsupportedModelError
from .blocks import ACTIVATIONS, activation_name, copy_linear, numel
from .vit import ConstantBranch, PrunedAttention

try:  # open_clip is the optional extra "clip"
    from open_clip.hf_model import HFTextEncoder
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import LayerNorm as OCLayerNorm
    from open_clip.transformer import LayerNormFp32, QuickGELU, ResidualAttentionBlock, TextTransformer
    from open_clip.transformer import LayerScale as OCLayerScale
    from open_clip.transformer import Transformer as OCTransformer
    from open_clip.transformer import VisionTransformer as OCVisionTransformer
except ImportError:  # pragma: no cover
    CLIP = None  # type: ignore[assignment]

SPEC_FORMAT = "sppbench.pruned/1"
TOWERS = ("image", "text")


# ---------------------------------------------------------------------------------------------
# Attention masks: nn.MultiheadAttention conventions -> scaled_dot_product_attention's
# ---------------------------------------------------------------------------------------------
def sdpa_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, B: int, h: int, L: int,
              dtype: torch.dtype) -> torch.Tensor | None:
    """An additive float mask for SDPA from MHA's masks (bool True = NOT allowed; 3-D = (B*h, L, S))."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:
            mask = mask.view(B, h, L, mask.shape[-1])
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(B, 1, 1, -1)
        mask = kp if mask is None else mask + kp
    return mask


def _self_attention_only(query, key, value) -> None:
    if (key is not None and key is not query) or (value is not None and value is not query):
        raise UnsupportedModelError("sppbench masks self-attention blocks only (key and value must be the query); "
                                    "cross-attention blocks (CoCa decoders) are not supported")


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class MaskedMHA(nn.Module):
    """``nn.MultiheadAttention`` (self-attention) with pair-wise masks on q/k and v.

    Called exactly like the module it wraps (``attn(q, k, v, need_weights=False, attn_mask=...)``,
    returning ``(output, None)``); with both masks 1 it computes the same attention (same scale).
    """

    def __init__(self, mha: nn.MultiheadAttention, batch_first: bool):
        super().__init__()
        self.attn = mha
        self.batch_first = batch_first
        self.train(mha.training)  # dropout follows the wrapped module's mode, not a fresh module's (train)
        w = mha.in_proj_weight
        self.mask_qk = nn.Parameter(torch.ones(mha.head_dim, dtype=w.dtype, device=w.device))
        self.mask_v = nn.Parameter(torch.ones(mha.head_dim, dtype=w.dtype, device=w.device))

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None, key_padding_mask=None,
                **_):
        _self_attention_only(query, key, value)
        a = self.attn
        x = query if self.batch_first else query.transpose(0, 1)
        B, N, _ = x.shape
        h, d = a.num_heads, a.head_dim
        q, k, v = F.linear(x, a.in_proj_weight, a.in_proj_bias).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        k = k * (self.mask_qk * self.mask_qk).to(k.dtype)  # bf16 autocast: stay in the activation dtype
        v = v * self.mask_v.to(v.dtype)
        mask = sdpa_mask(attn_mask, key_padding_mask, B, h, N, x.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5,
                                           dropout_p=a.dropout if self.training else 0.0)
        o = a.out_proj(o.transpose(1, 2).reshape(B, N, h * d))
        return (o if self.batch_first else o.transpose(0, 1)), None


class MaskedSeqMlp(nn.Module):
    """open_clip's ``c_fc -> act -> c_proj`` MLP with a mask on ``c_fc``'s output (before the activation)."""

    def __init__(self, mlp: nn.Sequential):
        super().__init__()
        self.mlp = mlp
        self.train(mlp.training)
        w = mlp.c_fc.weight
        self.mask = nn.Parameter(torch.ones(mlp.c_fc.out_features, dtype=w.dtype, device=w.device))

    @property
    def c_fc(self) -> nn.Linear:  # open_clip reads the tower's dtype from resblocks[0].mlp.c_fc
        return self.mlp.c_fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        h = m.c_fc(x)
        return m.c_proj(m.gelu(h * self.mask.to(h.dtype)))


class PrunedMHA(PrunedAttention):
    """Narrow self-attention (q/k and v widths differ, original scale) with ``nn.MultiheadAttention``'s call."""

    def __init__(self, *args, batch_first: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_first = batch_first

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None, key_padding_mask=None,
                **_):
        _self_attention_only(query, key, value)
        x = query if self.batch_first else query.transpose(0, 1)
        B, N, _ = x.shape
        mask = sdpa_mask(attn_mask, key_padding_mask, B, self.num_heads, N, x.dtype)
        o = super().forward(x, attn_mask=mask)
        return (o if self.batch_first else o.transpose(0, 1)), None


class ConstantMHA(ConstantBranch):
    """An attention branch with no v dimension left: its constant output, in ``nn.MultiheadAttention``'s call."""

    def forward(self, query, *args, **kwargs):
        return super().forward(query), None


def _narrow_seq_mlp(dim: int, hidden: int, out: int, b1: bool, b2: bool, act: nn.Module) -> nn.Sequential:
    with warnings.catch_warnings():  # a zero-width Linear (no hidden unit kept) warns that it has nothing to init
        warnings.simplefilter("ignore", UserWarning)
        return nn.Sequential(OrderedDict([("c_fc", nn.Linear(dim, hidden, bias=b1)), ("gelu", copy.deepcopy(act)),
                                          ("c_proj", nn.Linear(hidden, out, bias=b2))]))


# ---------------------------------------------------------------------------------------------
# Native open_clip transformer
# ---------------------------------------------------------------------------------------------
def _act_name(act: nn.Module) -> str:
    return activation_name(act, extra={"quick_gelu": QuickGELU}, where="the open_clip adapter")


def _act(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else ACTIVATIONS[name]()


_NORMS = {"open_clip.LayerNorm": "OCLayerNorm", "open_clip.LayerNormFp32": "LayerNormFp32", "torch.LayerNorm": None}


def _norm_name(norm: nn.Module) -> str:
    if type(norm) is OCLayerNorm:
        return "open_clip.LayerNorm"
    if type(norm) is LayerNormFp32:
        return "open_clip.LayerNormFp32"
    if type(norm) is nn.LayerNorm:
        return "torch.LayerNorm"
    raise UnsupportedModelError(f"norm layer {type(norm).__name__} is not supported in open_clip blocks")


def _norm_cls(name: str):
    return {"open_clip.LayerNorm": OCLayerNorm, "open_clip.LayerNormFp32": LayerNormFp32,
            "torch.LayerNorm": nn.LayerNorm}[name]


def _block_names(i: int) -> tuple[str, str, str]:
    return f"blocks.{i}.attn.qk", f"blocks.{i}.attn.v", f"blocks.{i}.mlp"


class OpenClipBlocks(Family):
    """open_clip's native ``Transformer`` (``resblocks`` of ``ResidualAttentionBlock``)."""

    name = "open-clip-transformer"

    def matches(self, model: nn.Module) -> bool:
        return CLIP is not None and type(model) is OCTransformer

    def _check(self, model) -> None:
        for i, b in enumerate(model.resblocks):
            if isinstance(b.attn, (MaskedMHA, PrunedMHA, ConstantMHA)):
                raise UnsupportedModelError("this transformer already carries sppbench masks or was compressed; attach "
                                            "masks to the original dense model (or call detach_masks() first)")
            if type(b) is not ResidualAttentionBlock or hasattr(b, "ln_1_kv"):
                raise UnsupportedModelError(
                    f"block {i} is a {type(b).__name__}; sppbench supports open_clip's default ResidualAttentionBlock "
                    "(self-attention). Custom blocks (qk_norm, scaled cosine attention, head scales, inner norms) mix "
                    "the dimensions a mask removes and cannot be sliced exactly")
            a = b.attn
            if (type(a) is not nn.MultiheadAttention or not a._qkv_same_embed_dim or a.bias_k is not None
                    or a.add_zero_attn):
                raise UnsupportedModelError(f"block {i}: attention must be a plain nn.MultiheadAttention (fused "
                                            "in_proj, no bias_k/bias_v, no zero attention)")
            if list(b.mlp._modules) != ["c_fc", "gelu", "c_proj"]:
                raise UnsupportedModelError(f"block {i}: MLP must be open_clip's c_fc -> act -> c_proj")
            _act_name(b.mlp.gelu)
            _norm_name(b.ln_1)

    @staticmethod
    def _architecture(model) -> dict:
        b0 = model.resblocks[0]
        attn = b0.attn.attn if isinstance(b0.attn, MaskedMHA) else b0.attn
        mlp = b0.mlp.mlp if isinstance(b0.mlp, MaskedSeqMlp) else b0.mlp
        return {"width": model.width, "layers": len(model.resblocks), "heads": attn.num_heads,
                "mlp_ratio": mlp.c_fc.out_features / model.width,
                "ls_init_value": 1e-5 if isinstance(b0.ls_1, OCLayerScale) else None,
                "act": _act_name(mlp.gelu), "norm": _norm_name(b0.ln_1), "norm_eps": b0.ln_1.eps,
                "batch_first": bool(model.batch_first)}

    def attach(self, model: nn.Module, input_size=None, *, masked_attention: bool = False) -> MaskedModel:
        """``input_size``: tokens per sample (for MACs); ``masked_attention``: the tower passes a causal or
        padding mask (the text tower), which changes the cost of a block left with no q/k dimension."""
        self._check(model)
        if not isinstance(input_size, int) or input_size < 1:
            raise ValueError("attach() on an open_clip Transformer needs input_size = tokens per sample (an int); "
                             "attach the whole CLIP model instead, which knows its towers' token counts")
        N, D = input_size, model.width
        arch = self._architecture(model)
        groups, sites, branches = [], {}, []
        branch_params = 0
        for i, blk in enumerate(model.resblocks):
            gqk, gv, gm = _block_names(i)
            attn, mlp = blk.attn, blk.mlp
            h, d = attn.num_heads, attn.head_dim
            branches.append(Branch("attention", {"qk": gqk, "v": gv}, dict(
                D=D, h=h, N=N, out=attn.out_proj.out_features, qkv_bias=int(attn.in_proj_bias is not None),
                proj_bias=int(attn.out_proj.bias is not None), norm=numel(blk.ln_1),
                ls=int(isinstance(blk.ls_1, OCLayerScale)), masked=int(masked_attention))))
            branches.append(Branch("mlp", {"hidden": gm}, dict(
                D=D, N=N, out=mlp.c_proj.out_features, fc1_bias=int(mlp.c_fc.bias is not None),
                fc2_bias=int(mlp.c_proj.bias is not None), norm=numel(blk.ln_2),
                ls=int(isinstance(blk.ls_2, OCLayerScale)))))
            branch_params += numel(blk.ln_1, attn, blk.ls_1, blk.ln_2, mlp, blk.ls_2)
            blk.attn = MaskedMHA(attn, model.batch_first)
            blk.mlp = MaskedSeqMlp(mlp)
            sites[gqk] = (blk.attn, "mask_qk")
            sites[gv] = (blk.attn, "mask_v")
            sites[gm] = (blk.mlp, "mask")
            groups += [MaskGroup(gqk, "qk", "attn", d, i), MaskGroup(gv, "v", "attn", d, i),
                       MaskGroup(gm, "mlp", "mlp", mlp.c_fc.out_features, i)]
        base_params = numel(model) - branch_params - sum(g.size for g in groups)
        info = {"family": self.name, "model_class": type(model).__name__, "tokens": N, "input_size": N,
                "masked_attention": bool(masked_attention), "architecture": arch}
        return MaskedModel(model, self, sites, groups, CostModel(base_params, 0, branches), info)

    def detach(self, masked: MaskedModel) -> None:
        for blk in masked.model.resblocks:
            if isinstance(blk.attn, MaskedMHA):
                blk.attn = blk.attn.attn
            if isinstance(blk.mlp, MaskedSeqMlp):
                blk.mlp = blk.mlp.mlp

    def unit_slices(self, masked: MaskedModel) -> dict[str, list[UnitSlice]]:
        out: dict[str, list[UnitSlice]] = {}
        for g in masked.groups:
            site, _ = masked.site(g.name)
            if g.kind in ("qk", "v"):
                a = site.attn
                h, d, D = a.num_heads, g.size, a.embed_dim
                heads = torch.arange(h).unsqueeze(0) * d + torch.arange(d).unsqueeze(1)  # (d, h)
                rows = torch.cat([heads, heads + D], dim=1) if g.kind == "qk" else heads + 2 * D
                sl = [UnitSlice(a.in_proj_weight, 0, rows)]
                if a.in_proj_bias is not None:
                    sl.append(UnitSlice(a.in_proj_bias, 0, rows))
                if g.kind == "v":
                    sl.append(UnitSlice(a.out_proj.weight, 1, heads))
                out[g.name] = sl
            else:
                mlp = site.mlp
                idx = torch.arange(g.size).unsqueeze(1)
                sl = [UnitSlice(mlp.c_fc.weight, 0, idx)]
                if mlp.c_fc.bias is not None:
                    sl.append(UnitSlice(mlp.c_fc.bias, 0, idx))
                out[g.name] = sl + [UnitSlice(mlp.c_proj.weight, 1, idx)]
        return out

    # -- compression -----------------------------------------------------------------------
    @staticmethod
    def _fold_constant(blk, which: int, bias: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        """The constant a branch with nothing kept adds (bias x LayerScale); its norm and LayerScale go."""
        ls = getattr(blk, f"ls_{which}")
        val = None
        if bias is not None:
            val = bias.detach().clone()
            if isinstance(ls, OCLayerScale):
                val = val * ls.gamma.detach()
        setattr(blk, f"ls_{which}", nn.Identity())
        setattr(blk, f"ln_{which}", nn.Identity())
        return val

    def _narrow_block(self, blk, qk_width: int, v_width: int, hidden: int, batch_first: bool, scale: float) -> None:
        """Give a dense block narrow modules of the given widths (weights not copied)."""
        attn, mlp = blk.attn, blk.mlp
        D, h = attn.embed_dim, attn.num_heads
        has_b = attn.out_proj.bias is not None
        if v_width == 0:
            self._fold_constant(blk, 1, None, D)
            blk.attn = ConstantMHA(attn.out_proj.out_features, has_b)
        else:
            blk.attn = PrunedMHA(D, h, qk_width, v_width, scale, attn.in_proj_bias is not None, has_b,
                                 attn.out_proj.out_features, batch_first=batch_first)
        b1, b2 = mlp.c_fc.bias is not None, mlp.c_proj.bias is not None
        if hidden == 0:
            self._fold_constant(blk, 2, None, D)
        blk.mlp = _narrow_seq_mlp(mlp.c_fc.in_features, hidden, mlp.c_proj.out_features, b1, b2, mlp.gelu)

    @torch.no_grad()
    def compress(self, masked: MaskedModel, keep) -> nn.Module:
        small = copy.deepcopy(masked.model)
        kept_blocks = []
        bf = bool(small.batch_first)
        for i, blk in enumerate(small.resblocks):
            gqk, gv, gm = _block_names(i)
            qk, v, hid = (keep.indices(g) for g in (gqk, gv, gm))
            attn, mlp = blk.attn.attn, blk.mlp.mlp
            ls1 = blk.ls_1.gamma.detach().clone() if isinstance(blk.ls_1, OCLayerScale) else None
            ls2 = blk.ls_2.gamma.detach().clone() if isinstance(blk.ls_2, OCLayerScale) else None
            blk.attn, blk.mlp = attn, mlp
            h, d, D = attn.num_heads, attn.head_dim, attn.embed_dim
            self._narrow_block(blk, len(qk), len(v), len(hid), bf, d ** -0.5)
            dt, dev = attn.in_proj_weight.dtype, attn.in_proj_weight.device
            blk.attn.to(dtype=dt, device=dev)
            blk.mlp.to(dtype=dt, device=dev)
            if len(v) == 0:
                if attn.out_proj.bias is not None:
                    blk.attn.value.copy_(attn.out_proj.bias * (ls1 if ls1 is not None else 1.0))
            else:
                heads = torch.arange(h).unsqueeze(1) * d
                q_rows, v_cols = (heads + qk).flatten(), (heads + v).flatten()
                rows = torch.cat([q_rows, q_rows + D, v_cols + 2 * D])
                blk.attn.qkv.weight.copy_(attn.in_proj_weight[rows])
                if attn.in_proj_bias is not None:
                    blk.attn.qkv.bias.copy_(attn.in_proj_bias[rows])
                copy_linear(blk.attn.proj, attn.out_proj, cols=v_cols)
            copy_linear(blk.mlp.c_fc, mlp.c_fc, rows=hid)
            blk.mlp.c_proj.weight.copy_(mlp.c_proj.weight[:, hid])
            if mlp.c_proj.bias is not None:
                bias = mlp.c_proj.bias
                blk.mlp.c_proj.bias.copy_(bias * ls2 if (len(hid) == 0 and ls2 is not None) else bias)
            kept_blocks.append({"qk": qk.tolist(), "v": v.tolist(), "mlp": hid.tolist()})
        small.sppbench_spec = {"format": SPEC_FORMAT, "family": self.name, "architecture": masked.info["architecture"],
                               "input_size": masked.info["input_size"],
                               "masked_attention": masked.info["masked_attention"], "blocks": kept_blocks}
        return small

    def build(self, spec: dict) -> nn.Module:
        a = spec["architecture"]
        model = OCTransformer(a["width"], a["layers"], a["heads"], a["mlp_ratio"], ls_init_value=a["ls_init_value"],
                              act_layer=functools.partial(_act, a["act"]),
                              norm_layer=functools.partial(_norm_cls(a["norm"]), eps=a["norm_eps"]),
                              batch_first=a["batch_first"])
        blocks = spec["blocks"]
        if len(blocks) != len(model.resblocks):
            raise SpecError(f"spec lists {len(blocks)} blocks but the architecture has {len(model.resblocks)}")
        scale = (a["width"] // a["heads"]) ** -0.5
        for blk, kept in zip(model.resblocks, blocks):
            self._narrow_block(blk, len(kept["qk"]), len(kept["v"]), len(kept["mlp"]), a["batch_first"], scale)
        model.sppbench_spec = spec
        return model


register(OpenClipBlocks())


# ---------------------------------------------------------------------------------------------
# The dual encoder
# ---------------------------------------------------------------------------------------------
def _resolve(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _numel_of(model: nn.Module, paths: list[str]) -> int:
    total = 0
    for p in paths:
        obj = _resolve(model, p)
        if obj is None:
            continue
        total += obj.numel() if isinstance(obj, torch.Tensor) else numel(obj)
    return total


def _linear_macs(mod: nn.Module | None) -> int:
    return 0 if mod is None else sum(m.in_features * m.out_features for m in mod.modules() if isinstance(m, nn.Linear))


def _projection_macs(proj) -> int:
    if proj is None:
        return 0
    if isinstance(proj, nn.Module):
        return _linear_macs(proj)
    return int(proj.shape[0] * proj.shape[1])


class OpenClip(Family):
    """An open_clip ``CLIP`` or ``CustomTextCLIP``: each tower's transformer is masked by the adapter of its kind."""

    name = "open-clip"

    def matches(self, model: nn.Module) -> bool:
        return CLIP is not None and isinstance(model, (CLIP, CustomTextCLIP))

    # -- where the towers are -----------------------------------------------------------------
    def towers(self, model: nn.Module, input_size=None) -> dict[str, dict]:
        """Per tower: the masked sub-module's path, its adapter, attach arguments, the parameters that belong
        to the tower and the MACs per sample outside the masked sub-module."""
        sizes = dict(input_size) if isinstance(input_size, dict) else {}
        unknown = set(sizes) - set(TOWERS)
        if unknown:
            raise ValueError(f"input_size keys must be tower names {TOWERS}, got {sorted(unknown)}")
        cfg = getattr(model, "sppbench_model_cfg", None) or {}
        out: dict[str, dict] = {}
        v = model.visual
        if isinstance(v, OCVisionTransformer):
            if v.attn_pool is not None:
                raise UnsupportedModelError("open_clip vision towers with an attentional pooler (CoCa) are not supported")
            if "image" in sizes and sizes["image"] not in (v.image_size[0], tuple(v.image_size), list(v.image_size)):
                raise ValueError(f"the native open_clip vision tower runs at {tuple(v.image_size)} only")
            gh, gw = v.grid_size
            D = v.conv1.out_channels
            p = v.patch_size
            macs = gh * gw * D * v.conv1.in_channels * p[0] * p[1] + _projection_macs(v.proj)
            out["image"] = dict(sub="visual.transformer", family=get("open-clip-transformer"),
                                kwargs=dict(input_size=gh * gw + 1, masked_attention=False), members=["visual"],
                                extra_macs=macs)
        elif isinstance(v, TimmModel):
            trunk_family = get("timm-vit")
            if not trunk_family.matches(v.trunk):
                raise UnsupportedModelError(f"open_clip TimmModel tower with a {type(v.trunk).__name__} trunk: only timm "
                                            "VisionTransformer trunks are supported")
            if "pool" in v.head._modules:
                raise UnsupportedModelError("TimmModel towers with an attention-pool head are not supported")
            img = sizes.get("image", tuple(v.trunk.patch_embed.img_size))
            out["image"] = dict(sub="visual.trunk", family=trunk_family, kwargs=dict(input_size=img), members=["visual"],
                                extra_macs=_linear_macs(v.head))
        else:
            raise UnsupportedModelError(f"open_clip vision tower {type(v).__name__} is not supported (native "
                                        "VisionTransformer or a TimmModel with a timm ViT trunk)")
        if isinstance(model, CLIP):  # native text tower, flattened into the CLIP module
            ctx = sizes.get("text", model.context_length)
            out["text"] = dict(sub="transformer", family=get("open-clip-transformer"),
                               kwargs=dict(input_size=ctx, masked_attention=model.attn_mask is not None),
                               members=["transformer", "token_embedding", "positional_embedding", "ln_final",
                                        "text_projection"],
                               extra_macs=_projection_macs(model.text_projection))
        else:
            t = model.text
            if isinstance(t, TextTransformer):
                if t.cls_emb is not None:
                    raise UnsupportedModelError("text towers with an appended class token (CoCa) are not supported")
                masked = t.attn_mask is not None or bool(getattr(t, "use_pad_mask", False))
                out["text"] = dict(sub="text.transformer", family=get("open-clip-transformer"),
                                   kwargs=dict(input_size=sizes.get("text", t.context_length), masked_attention=masked),
                                   members=["text"], extra_macs=_projection_macs(t.text_projection))
            elif isinstance(t, HFTextEncoder):
                fam = next((f for f in _hf_families() if f.matches(t.transformer)), None)
                if fam is None:
                    raise UnsupportedModelError(f"Hugging Face text tower {type(t.transformer).__name__}: only BERT "
                                                "encoders (BertModel) have an adapter")
                ctx = sizes.get("text", (cfg.get("text_cfg") or {}).get("context_length", 77))
                out["text"] = dict(sub="text.transformer", family=fam, kwargs=dict(input_size=ctx), members=["text"],
                                   extra_macs=_linear_macs(t.proj))
            else:
                raise UnsupportedModelError(f"open_clip text tower {type(t).__name__} is not supported")
        return out

    # -- attach / detach -------------------------------------------------------------------
    def attach(self, model: nn.Module, input_size=None) -> MaskedModel:
        """``input_size``: optional ``{"image": size, "text": tokens per caption}`` used for MAC counts
        (defaults: the vision tower's image size; the text context length)."""
        plan = self.towers(model, input_size)
        total = numel(model)
        subs: dict[str, MaskedModel] = {}
        groups, sites, branches, parts, info = [], {}, [], {}, {}
        tower_params = 0
        for t, spec in plan.items():
            sub_module = _resolve(model, spec["sub"])
            own = _numel_of(model, spec["members"])
            outside = own - numel(sub_module)
            tower_params += own
            sub = spec["family"].attach(sub_module, **spec["kwargs"])
            subs[t] = sub
            for g in sub.groups:
                groups.append(MaskGroup(f"{t}.{g.name}", g.kind, g.pool, g.size, g.layer, t))
                sites[f"{t}.{g.name}"] = sub.site(g.name)
            for b in sub.cost_model.branches:
                branches.append(Branch(b.kind, {r: f"{t}.{g}" for r, g in b.groups.items()}, dict(b.dims), t))
            parts[t] = (sub.cost_model.base_params + outside, sub.cost_model.base_macs + spec["extra_macs"])
            info[t] = {"module": spec["sub"], "family": spec["family"].name, "tokens": sub.info["tokens"],
                       "input_size": sub.info["input_size"], "sub_info": sub.info}
        cfg = getattr(model, "sppbench_model_cfg", None)
        m = MaskedModel(model, self, sites, groups, CostModel(total - tower_params, 0, branches, parts),
                        {"family": self.name, "model_class": type(model).__name__, "towers": info,
                         "input_size": {t: i["input_size"] for t, i in info.items()}, "model_cfg": cfg})
        m.towers = subs
        return m

    def detach(self, masked: MaskedModel) -> None:
        for sub in masked.towers.values():
            sub.family.detach(sub)

    def unit_slices(self, masked: MaskedModel) -> dict[str, list[UnitSlice]]:
        return {f"{t}.{n}": sl for t, sub in masked.towers.items() for n, sl in sub.family.unit_slices(sub).items()}

    # -- compression -----------------------------------------------------------------------
    def compress(self, masked: MaskedModel, keep) -> nn.Module:
        # copy everything but the towers' masked transformers (each tower's adapter builds its narrow copy)
        small = copy.deepcopy(masked.model, memo={id(sub.model): nn.Identity() for sub in masked.towers.values()})
        towers = {}
        for t, sub in masked.towers.items():
            sub_keep = KeepSet({g.name: keep.masks[f"{t}.{g.name}"] for g in sub.groups}, 0.0, {}, 0, 0)
            narrow = sub.family.compress(sub, sub_keep)
            path = masked.info["towers"][t]["module"]
            small.set_submodule(path, narrow)
            towers[t] = {"module": path, "spec": narrow.sppbench_spec}
        cfg = masked.info.get("model_cfg")
        small.sppbench_spec = {
            "format": SPEC_FORMAT, "family": self.name, "class": type(masked.model).__name__, "model_cfg": cfg,
            "towers": towers,
            **({} if cfg else {"unsavable": "this CLIP was not created through sppbench.tasks.clip.create_model, so its open_clip "
                                            "model config is unknown and the pruned model could not be rebuilt on "
                                            "load; create the dense model with sppbench.tasks.clip.create_model(name, ...) "
                                            "or set model.sppbench_model_cfg = open_clip.get_model_config(name) "
                                            "before attach_masks"}),
        }
        return small

    def build(self, spec: dict) -> nn.Module:
        cfg = copy.deepcopy(spec.get("model_cfg"))
        if not cfg:
            raise SpecError("this pruned CLIP's spec has no open_clip model config, so it cannot be rebuilt; prune a "
                            "model created with sppbench.tasks.clip.create_model")
        cls = {"CLIP": CLIP, "CustomTextCLIP": CustomTextCLIP}.get(spec.get("class"))
        if cls is None:
            raise SpecError(f"unknown open_clip model class {spec.get('class')!r} in the spec")
        cfg.pop("custom_text", None)
        text_cfg = dict(cfg.get("text_cfg") or {})
        with tempfile.TemporaryDirectory() as tmp:
            if text_cfg.get("hf_model_name"):  # the HF tower is rebuilt from the config stored in its own spec
                arch = spec["towers"]["text"]["spec"]["architecture"]
                Path(tmp, "config.json").write_text(json.dumps(arch))
                text_cfg.update(hf_model_name=tmp, hf_model_pretrained=False)
            vision_cfg = dict(cfg.get("vision_cfg") or {})
            if vision_cfg.get("timm_model_name"):
                vision_cfg["timm_model_pretrained"] = False
            cfg.update(text_cfg=text_cfg, vision_cfg=vision_cfg)
            model = cls(**cfg)
        for t, tspec in spec["towers"].items():
            sub_spec = tspec["spec"]
            model.set_submodule(tspec["module"], get(sub_spec["family"]).build(sub_spec))
        model.sppbench_spec = spec
        return model

    def example_inputs(self, spec: dict, generator: torch.Generator) -> tuple | None:
        towers = spec["towers"]
        image = get(towers["image"]["spec"]["family"]).example_inputs(towers["image"]["spec"], generator)
        if image is None:  # native vision tower: its spec is the transformer's
            vc = (spec.get("model_cfg") or {}).get("vision_cfg", {})
            size = vc.get("image_size", 224)
            size = (size, size) if isinstance(size, int) else tuple(size)
            image = (torch.randn(2, 3, *size, generator=generator),)
        tspec = towers["text"]["spec"]
        tc = (spec.get("model_cfg") or {}).get("text_cfg", {})
        if tspec["family"] == "open-clip-transformer":
            n_ctx, vocab, pad = tspec["input_size"], tc.get("vocab_size", 49408), tc.get("pad_id", 0)
        else:
            arch = tspec["architecture"]
            n_ctx, vocab, pad = int(tspec["input_size"]), int(arch["vocab_size"]), int(arch.get("pad_token_id") or 0)
        return image[0], _example_tokens(n_ctx, vocab, generator, pad)


def _example_tokens(n_ctx: int, vocab: int, generator: torch.Generator, pad_id: int = 0) -> torch.Tensor:
    """Two token sequences of different lengths (the second padded), ids avoiding the pad id."""
    ids = torch.randint(1, max(2, vocab), (2, n_ctx), generator=generator)
    ids[ids == pad_id] = 1
    ids[1, max(1, n_ctx // 2):] = pad_id
    return ids


def _hf_families() -> list[Family]:

    return [f for n, f in FAMILIES.items() if n.startswith("hf-")]


register(OpenClip())
