"""timm SwinTransformer family (Swin v1): shifted-window attention with a relative position bias.

The masks are those of the ViT family (``sppbench.families.vit``), per Swin block: ``qk`` (head_dim,)
shared by all heads, applied as m^2 on k; ``v`` (head_dim,) on v; ``mlp`` on fc1's output. They live
in ``MaskedWindowAttention`` (wrapping timm's ``WindowAttention``: fused qkv Linear, relative position
bias table and index left intact, the shifted-window mask passed through) and ``MaskedMlp`` (from the
ViT family), which replace each ``SwinTransformerBlock``'s ``attn`` / ``mlp``. Everything else (norms,
cyclic shift, window partition / padding, patch merging) stays timm's own code.

Compression builds ``PrunedWindowAttention`` (q/k of ``qk_dim`` and v of ``v_dim`` per head, the
ORIGINAL softmax scale, the relative position bias table kept whole), a narrow timm ``Mlp``, or a
``ConstantBranch`` for a branch with nothing left:

- no kept v entry: the window attention outputs proj.bias for every token of every window, so after
  timm's window reverse / crop / roll the branch is a constant; ``attn`` becomes a ``ConstantBranch``
  (which returns a tensor of the input's shape, as timm's block reshapes it) and ``norm1`` an Identity.
  The bias table goes with it.
- no kept q/k entry: the logits are NOT uniform (they are the relative position bias, plus the
  shifted-window mask), so the attention is still computed, as softmax(bias [+ mask]) @ v; only the
  q/k projections and the q.k matmul disappear.
- no kept MLP hidden unit: the MLP is the constant fc2.bias; ``mlp`` becomes a ``ConstantBranch``
  and ``norm2`` an Identity.

A compressed model is for inference and fine-tuning at its input size: it does not support timm's
``set_input_size`` (the narrow modules have no window-resizing logic, and a block whose ``norm1`` is an
Identity cannot rebuild its attention mask buffer).
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, LayerScale, Mlp, PatchEmbed, use_fused_attn
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    get_relative_position_index,
)
from torch import nn

from ..core.costs import Branch, CostModel, register_branch
from ..core.family import Family, register
from ..core.masks import MaskedModel, MaskGroup
from ..errors import SpecError, UnsupportedModelError
from .blocks import ACTIVATIONS, activation_name, copy_linear, numel
from .vit import SPEC_FORMAT, ConstantBranch, MaskedMlp, TimmViT, rebuild_block

FAMILY = "timm-swin"


# ---------------------------------------------------------------------------------------------
# Cost formula of one window-attention branch
# ---------------------------------------------------------------------------------------------
@register_branch("window_attention")
def window_attention_cost(d, w) -> tuple[int, int]:
    """Shifted-window multi-head attention with a relative position bias and pair-wise masks.

    dims: D (input width), h (heads), Np (tokens per image after padding to whole windows: the qkv /
    proj linears run on every one of them), nW (windows per image), A (tokens per window), out (output
    width), qkv_bias, proj_bias, table (relative position bias table entries, all heads), norm (params of
    the pre-norm owned by the branch), ls (1 if a LayerScale follows).
    widths: qk (kept q/k dims per head), v (kept v dims per head).

    params = norm + table + (D + qkv_bias) h (2 qk + v) + h v out + out proj_bias [+ out LayerScale]
    MACs   = Np D h (2 qk + v) + nW h A^2 (qk + v) + Np h v out
    (q k^T costs nW h A^2 qk, attn @ v costs nW h A^2 v). With qk = 0 the same formula holds: the
    attention probabilities softmax(bias [+ mask]) need no multiply-add, attn @ v still runs.
    With v = 0 the branch is the constant proj.bias (x LayerScale): ``out`` params (none without a
    proj bias), 0 MACs; its norm and bias table are dropped.
    """
    D, h, Np, nW, A, out = d["D"], d["h"], d["Np"], d["nW"], d["A"], d.get("out", d["D"])
    kq, kv = w["qk"], w["v"]
    if kv == 0:
        return (out if d["proj_bias"] else 0), 0
    params = d["norm"] + d["table"] + out * d.get("ls", 0)
    params += (D + d["qkv_bias"]) * h * (2 * kq + kv) + h * kv * out + out * d["proj_bias"]
    macs = Np * D * h * (2 * kq + kv) + nW * h * A * A * (kq + kv) + Np * h * kv * out
    return params, macs


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
def _rel_pos_bias(table: torch.Tensor, index: torch.Tensor, area: int) -> torch.Tensor:
    """(1, heads, A, A) relative position bias, gathered exactly as timm's WindowAttention does."""
    bias = table[index.view(-1)].view(area, area, -1)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


def _head_dim(attn: WindowAttention) -> int:
    return attn.qkv.out_features // (3 * attn.num_heads)


class MaskedWindowAttention(nn.Module):
    """timm ``WindowAttention`` with pair-wise masks: q, k scaled by ``mask_qk``; v by ``mask_v``.

    Reproduces timm 1.0's computation step by step (the fused SDPA path or the explicit one, as the
    wrapped module's ``fused_attn`` says), so all-ones masks give timm's outputs. The mask is applied
    once, as m^2, to k: (q * m) . (k * m) = q . (m^2 k).
    """

    def __init__(self, attn: WindowAttention):
        super().__init__()
        self.attn = attn
        self.train(attn.training)  # attention dropout follows the wrapped module's mode
        w = attn.qkv.weight
        d = _head_dim(attn)
        self.mask_qk = nn.Parameter(torch.ones(d, dtype=w.dtype, device=w.device))
        self.mask_v = nn.Parameter(torch.ones(d, dtype=w.dtype, device=w.device))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn
        B_, N, _ = x.shape
        h = a.num_heads
        q, k, v = a.qkv(x).reshape(B_, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        k = k * (self.mask_qk * self.mask_qk).to(k.dtype)  # bf16 autocast: stay in the activation dtype
        v = v * self.mask_v.to(v.dtype)
        bias = _rel_pos_bias(a.relative_position_bias_table, a.relative_position_index, a.window_area)
        if a.fused_attn:
            attn_mask = bias
            if mask is not None:
                nw = mask.shape[0]
                mask = mask.view(1, nw, 1, N, N).expand(B_ // nw, -1, h, -1, -1)
                attn_mask = attn_mask + mask.reshape(-1, h, N, N)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=a.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * a.scale) @ k.transpose(-2, -1)
            attn = attn + bias
            if mask is not None:
                nw = mask.shape[0]
                attn = attn.view(-1, nw, h, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, h, N, N)
            x = a.attn_drop(a.softmax(attn)) @ v
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return a.proj_drop(a.proj(x))


class PrunedWindowAttention(nn.Module):
    """Window attention whose q/k head width (``qk_dim``) and v head width (``v_dim``) differ.

    Keeps timm's parameter names (``qkv``, ``proj``, ``relative_position_bias_table``), the relative
    position bias of every head unchanged, the shifted-window mask argument and the ORIGINAL head
    width's softmax scale, so it equals the binary-masked model. With ``qk_dim == 0`` the logits are
    the bias (+ mask) alone: the probabilities do not depend on the input and only attn @ v runs.
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, window_size: Sequence[int], scale: float,
                 qkv_bias: bool = True, proj_bias: bool = True, out_dim: int | None = None,
                 fused_attn: bool | None = None):
        super().__init__()
        if v_dim < 1:
            raise ValueError("PrunedWindowAttention needs v_dim >= 1; a branch with no v is a ConstantBranch")
        self.num_heads, self.qk_dim, self.v_dim, self.scale = num_heads, qk_dim, v_dim, float(scale)
        self.window_size = (int(window_size[0]), int(window_size[1]))
        wh, ww = self.window_size
        self.window_area = wh * ww
        self.fused_attn = use_fused_attn(experimental=True) if fused_attn is None else bool(fused_attn)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", get_relative_position_index(wh, ww), persistent=False)
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.proj = nn.Linear(num_heads * v_dim, out_dim or dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        bias = _rel_pos_bias(self.relative_position_bias_table, self.relative_position_index, self.window_area)
        qkv = self.qkv(x)
        v = qkv[..., 2 * h * dq:].reshape(B_, N, h, dv).transpose(1, 2)
        if dq == 0:
            logits = bias  # (1, h, N, N): q . k is 0 for every pair
            if mask is not None:
                logits = logits + mask.unsqueeze(1)  # (nW, h, N, N)
            probs = torch.softmax(logits, dim=-1)
            nw = probs.shape[0]
            out = (probs @ v.reshape(-1, nw, h, N, dv)).reshape(B_, h, N, dv)
        else:
            q = qkv[..., :h * dq].reshape(B_, N, h, dq).transpose(1, 2)
            k = qkv[..., h * dq:2 * h * dq].reshape(B_, N, h, dq).transpose(1, 2)
            if self.fused_attn:
                attn_mask = bias
                if mask is not None:
                    nw = mask.shape[0]
                    m = mask.view(1, nw, 1, N, N).expand(B_ // nw, -1, h, -1, -1)
                    attn_mask = attn_mask + m.reshape(-1, h, N, N)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1) + bias
                if mask is not None:
                    nw = mask.shape[0]
                    attn = (attn.view(-1, nw, h, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, h, N, N)
                out = torch.softmax(attn, dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B_, N, h * dv))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, window={self.window_size}, "
                f"scale={self.scale:.6g}")


# ---------------------------------------------------------------------------------------------
# Architecture description (JSON-able) so a pruned model can be rebuilt without pickles
# ---------------------------------------------------------------------------------------------
def _blocks(model: SwinTransformer) -> list[SwinTransformerBlock]:
    return [blk for stage in model.layers for blk in stage.blocks]


def _unwrap(mod: nn.Module) -> nn.Module:
    return mod.attn if isinstance(mod, MaskedWindowAttention) else mod.mlp if isinstance(mod, MaskedMlp) else mod


def _norms(model: SwinTransformer) -> list[nn.Module]:
    mods = [model.patch_embed.norm, model.norm]
    for stage in model.layers:
        if isinstance(stage.downsample, PatchMerging):
            mods.append(stage.downsample.norm)
        for blk in stage.blocks:
            mods += [blk.norm1, blk.norm2]
    return mods


def _architecture(model: SwinTransformer) -> dict:
    """Constructor arguments that rebuild ``model``'s dense skeleton (checked by ``_check``)."""
    pe = model.patch_embed
    depths, heads, head_dims, windows, ratios = [], [], [], [], []
    for stage in model.layers:
        b0 = stage.blocks[0]
        attn, mlp = _unwrap(b0.attn), _unwrap(b0.mlp)
        depths.append(len(stage.blocks))
        heads.append(attn.num_heads)
        head_dims.append(_head_dim(attn))
        # the block's (possibly clipped to the stage resolution) window: rebuilding with it gives the
        # same window, shift and bias-table size as the original constructor argument did
        windows.append(list(attn.window_size))
        ratios.append(mlp.fc1.out_features / mlp.fc1.in_features)
    b0 = model.layers[0].blocks[0]
    kwargs = dict(
        img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=model.embed_dim,
        depths=depths, num_heads=heads, head_dim=head_dims, window_size=windows,
        always_partition=bool(b0.always_partition), strict_img_size=not model.dynamic_img_size,
        mlp_ratio=ratios, qkv_bias=_unwrap(b0.attn).qkv.bias is not None,
    )
    return {"class": "SwinTransformer", "kwargs": kwargs, "norm_eps": model.norm.eps, "act": activation_name(_unwrap(b0.mlp).act)}


def _build_dense(arch: dict, device: str | torch.device = "cpu") -> SwinTransformer:
    if arch.get("class") != "SwinTransformer":
        raise ValueError(f"unknown Swin architecture class {arch.get('class')!r}")
    kw = dict(arch["kwargs"])
    kw["img_size"], kw["patch_size"] = tuple(kw["img_size"]), tuple(kw["patch_size"])
    kw["depths"], kw["num_heads"], kw["head_dim"] = tuple(kw["depths"]), tuple(kw["num_heads"]), tuple(kw["head_dim"])
    kw["window_size"] = tuple(tuple(w) for w in kw["window_size"])
    kw["mlp_ratio"] = tuple(kw["mlp_ratio"])
    with torch.device(device):
        model = SwinTransformer(**kw, norm_layer=functools.partial(nn.LayerNorm, eps=arch["norm_eps"]),
                                drop_path_rate=0.0, weight_init="skip")
    act = ACTIVATIONS[arch["act"]]
    for blk in _blocks(model):
        if activation_name(blk.mlp.act) != arch["act"]:
            blk.mlp.act = act()
    return model


# ---------------------------------------------------------------------------------------------
# Geometry: tokens, windows and padding of every block for one input size
# ---------------------------------------------------------------------------------------------
def _input_hw(model: SwinTransformer, input_size) -> tuple[int, int]:
    pe = model.patch_embed
    if input_size is None:
        hw = tuple(pe.img_size)
    elif isinstance(input_size, int):
        hw = (input_size, input_size)
    else:
        hw = tuple(int(s) for s in input_size[-2:])
    if hw != tuple(pe.img_size):
        if not model.dynamic_img_size:
            raise ValueError(f"input size {hw} differs from the Swin model's img_size {tuple(pe.img_size)} and the "
                             "model was built with strict_img_size=True; attach masks at the model's own size (or "
                             "build the model with strict_img_size=False / dynamic_img_size=True)")
        if not getattr(pe, "dynamic_img_pad", False) and (hw[0] % pe.patch_size[0] or hw[1] % pe.patch_size[1]):
            raise ValueError(f"input size {hw} is not a multiple of the patch size {tuple(pe.patch_size)}")
    return hw


def _geometry(model: SwinTransformer, hw: tuple[int, int]):
    """(patch grid, per-stage (H, W), per-block dict(H, W, Np, nW, A)) for an input of ``hw`` pixels."""
    pe = model.patch_embed
    ceil = getattr(pe, "dynamic_img_pad", False)
    H = math.ceil(hw[0] / pe.patch_size[0]) if ceil else hw[0] // pe.patch_size[0]
    W = math.ceil(hw[1] / pe.patch_size[1]) if ceil else hw[1] // pe.patch_size[1]
    grid, stages, blocks = (H, W), [], []
    for stage in model.layers:
        if isinstance(stage.downsample, PatchMerging):
            H, W = math.ceil(H / 2), math.ceil(W / 2)  # PatchMerging pads odd sizes
        stages.append((H, W))
        for blk in stage.blocks:
            wh, ww = blk.window_size
            Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww  # _attn pads to whole windows
            blocks.append(dict(H=H, W=W, Np=Hp * Wp, nW=(Hp // wh) * (Wp // ww), A=wh * ww))
    return grid, stages, blocks


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------
def _group_names(s: int, b: int) -> tuple[str, str, str]:
    p = f"layers.{s}.blocks.{b}"
    return f"{p}.attn.qk", f"{p}.attn.v", f"{p}.mlp"


def _named_blocks(model: SwinTransformer):
    """(global index, stage, index in stage, block) in forward order."""
    i = 0
    for s, stage in enumerate(model.layers):
        for b, blk in enumerate(stage.blocks):
            yield i, s, b, blk
            i += 1


class TimmSwin(Family):
    name = FAMILY

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, SwinTransformer)

    # -- checks ----------------------------------------------------------------------------
    def _check(self, model: SwinTransformer) -> None:
        where = type(model).__name__
        if any(isinstance(b.attn, (MaskedWindowAttention, PrunedWindowAttention, ConstantBranch))
               or isinstance(b.mlp, (MaskedMlp, ConstantBranch)) for b in _blocks(model)):
            raise UnsupportedModelError(
                f"this {where} already carries sppbench masks or was compressed; attach masks to the "
                "original dense model (or call detach_masks() first)"
            )
        if type(model.patch_embed) is not PatchEmbed:
            raise UnsupportedModelError(f"{where} with a {type(model.patch_embed).__name__} patch embedding is not "
                                        "supported (only timm.layers.PatchEmbed)")
        if type(model.head) is not ClassifierHead or not isinstance(model.head.fc, (nn.Linear, nn.Identity)):
            raise UnsupportedModelError(f"{where} with a {type(model.head).__name__} head is not supported "
                                        "(only timm's ClassifierHead with a Linear classifier)")
        eps = model.norm.eps if isinstance(model.norm, nn.LayerNorm) else None
        for n in _norms(model):
            if not (isinstance(n, nn.LayerNorm) and n.elementwise_affine and n.bias is not None and n.eps == eps):
                raise UnsupportedModelError(
                    f"{where} with norm layer {type(n).__name__} is not supported: the timm Swin adapter "
                    "rebuilds pruned models with nn.LayerNorm (affine, with bias, one eps for the whole model)"
                )
        dim = model.embed_dim
        for s, stage in enumerate(model.layers):
            if len(stage.blocks) == 0:
                raise UnsupportedModelError(f"stage {s} of {where} has no blocks; not supported")
            if not (isinstance(stage.downsample, nn.Identity) if s == 0 else type(stage.downsample) is PatchMerging):
                raise UnsupportedModelError(f"stage {s} of {where}: downsample {type(stage.downsample).__name__} "
                                            "is not supported (timm's PatchMerging between stages)")
            if stage.blocks[0].dim != dim * 2 ** s:
                raise UnsupportedModelError(f"stage {s} of {where} has width {stage.blocks[0].dim}, not "
                                            f"embed_dim x 2^{s} = {dim * 2 ** s}; per-stage widths are not supported")
            for b, blk in enumerate(stage.blocks):
                if type(blk) is not SwinTransformerBlock:
                    raise UnsupportedModelError(
                        f"block layers.{s}.blocks.{b} of {where} is a {type(blk).__name__}; the timm Swin adapter "
                        "supports timm's SwinTransformerBlock (Swin v1) only (SwinV2's cosine attention, "
                        "post-norm and log-spaced CPB cannot be sliced exactly by it)"
                    )
                a, m = blk.attn, blk.mlp
                if type(a) is not WindowAttention:
                    raise UnsupportedModelError(f"block layers.{s}.blocks.{b}: attention {type(a).__name__} is not "
                                                "supported (only timm's swin_transformer.WindowAttention)")
                if type(m) is not Mlp or not isinstance(m.norm, nn.Identity):
                    raise UnsupportedModelError(f"block layers.{s}.blocks.{b}: MLP {type(m).__name__} (or one with a "
                                                "hidden norm) is not supported; only timm.layers.Mlp")
                hidden, width = m.fc1.out_features, m.fc1.in_features
                if int(width * (hidden / width)) != hidden or hidden != stage.blocks[0].mlp.fc1.out_features:
                    raise UnsupportedModelError(f"block layers.{s}.blocks.{b}: MLP width {hidden} cannot be rebuilt "
                                                "from a per-stage mlp_ratio")
                try:
                    activation_name(m.act)
                except UnsupportedModelError:
                    raise UnsupportedModelError(
                        f"block layers.{s}.blocks.{b}: MLP activation {type(m.act).__name__} is not supported by the "
                        "timm Swin adapter (GELU, GELU-tanh, SiLU, ReLU: each maps 0 to 0, which the mask relies on)"
                    ) from None

    # -- attach / detach -------------------------------------------------------------------
    def attach(self, model: nn.Module, input_size=None) -> MaskedModel:
        self._check(model)
        hw = _input_hw(model, input_size)
        grid, stages, geo = _geometry(model, hw)
        groups, sites, branches = [], {}, []
        branch_params = 0
        for i, s, b, blk in _named_blocks(model):
            gqk, gv, gm = _group_names(s, b)
            attn, mlp = blk.attn, blk.mlp
            g = geo[i]
            D, d = attn.qkv.in_features, _head_dim(attn)
            ls1 = int(isinstance(getattr(blk, "ls1", None), LayerScale))
            ls2 = int(isinstance(getattr(blk, "ls2", None), LayerScale))
            branches.append(Branch("window_attention", {"qk": gqk, "v": gv}, dict(
                D=D, h=attn.num_heads, Np=g["Np"], nW=g["nW"], A=g["A"], out=attn.proj.out_features,
                qkv_bias=int(attn.qkv.bias is not None), proj_bias=int(attn.proj.bias is not None),
                table=attn.relative_position_bias_table.numel(), norm=numel(blk.norm1), ls=ls1)))
            branches.append(Branch("mlp", {"hidden": gm}, dict(
                D=mlp.fc1.in_features, N=g["H"] * g["W"], out=mlp.fc2.out_features,
                fc1_bias=int(mlp.fc1.bias is not None), fc2_bias=int(mlp.fc2.bias is not None),
                norm=numel(blk.norm2), ls=ls2)))
            extra = [getattr(blk, n) for n in ("ls1", "ls2") if isinstance(getattr(blk, n, None), nn.Module)]
            branch_params += numel(blk.norm1, attn, blk.norm2, mlp, *extra)
            blk.attn = MaskedWindowAttention(attn)
            blk.mlp = MaskedMlp(mlp)
            sites[gqk] = (blk.attn, "mask_qk")
            sites[gv] = (blk.attn, "mask_v")
            sites[gm] = (blk.mlp, "mask")
            groups += [MaskGroup(gqk, "qk", "attn", d, i), MaskGroup(gv, "v", "attn", d, i),
                       MaskGroup(gm, "mlp", "mlp", mlp.fc1.out_features, i)]
        # base = patch embedding (conv + norm), patch merging (norm + reduction), final norm, head
        base_params = numel(model) - branch_params - sum(g.size for g in groups)
        pe = model.patch_embed
        base_macs = grid[0] * grid[1] * pe.proj.out_channels * pe.proj.in_channels * pe.patch_size[0] * pe.patch_size[1]
        for stage, (H, W) in zip(model.layers, stages):
            if isinstance(stage.downsample, PatchMerging):
                red = stage.downsample.reduction
                base_macs += H * W * red.in_features * red.out_features
        fc = model.head.fc
        if isinstance(fc, nn.Linear):
            positions = stages[-1][0] * stages[-1][1] if model.head.global_pool.is_identity() else 1
            base_macs += positions * fc.in_features * fc.out_features
        info = {"family": self.name, "model_class": type(model).__name__,
                "tokens": [h * w for h, w in stages], "stage_resolution": [list(r) for r in stages],
                "windows": [[g["nW"], g["A"]] for g in geo],
                "input_size": [pe.proj.in_channels, hw[0], hw[1]], "architecture": _architecture(model)}
        masked = MaskedModel(model, self, sites, groups, CostModel(base_params, base_macs, branches), info)
        # the handle starts in the model's own mode: a MaskedModel is created in train mode, and a later
        # masked.train(was) (as measure.macs does) would otherwise switch an eval model's drop-path on
        return masked.train(model.training)

    def detach(self, masked: MaskedModel) -> None:
        for blk in _blocks(masked.model):
            if isinstance(blk.attn, MaskedWindowAttention):
                blk.attn = blk.attn.attn
            if isinstance(blk.mlp, MaskedMlp):
                blk.mlp = blk.mlp.mlp

    # -- compression -----------------------------------------------------------------------
    def compress(self, masked: MaskedModel, keep) -> nn.Module:
        small = copy.deepcopy(masked.model)
        kept_blocks, scales = [], []
        for i, s, b, blk in _named_blocks(small):
            qk, v, hid = (keep.indices(g) for g in _group_names(s, b))
            attn = blk.attn.attn
            scales.append(float(attn.scale))
            self._slice_attention(blk, attn, qk, v)
            self._slice_mlp(blk, blk.mlp.mlp, hid)
            kept_blocks.append({"qk": qk.tolist(), "v": v.tolist(), "mlp": hid.tolist()})
        small.sppbench_spec = {
            "format": SPEC_FORMAT, "family": self.name, "architecture": masked.info["architecture"],
            "input_size": masked.info["input_size"], "attention_scales": scales, "blocks": kept_blocks,
        }
        return small

    @staticmethod
    def _constant(blk: SwinTransformerBlock, which: int, bias: torch.Tensor | None, dim: int) -> None:
        """Replace a branch by its constant output; its pre-norm (and LayerScale, if any) go too.

        timm's block runs the attention on (windows x B, A, C) and reshapes the result with C: the
        ``ConstantBranch`` returns the input's shape with ``dim`` (= C) channels, and a constant stays
        constant through window reverse, crop and the reverse cyclic shift.
        """
        ls = getattr(blk, f"ls{which}", None)
        const = ConstantBranch(dim, bias is not None)
        if bias is not None:
            val = bias.detach().clone()
            if isinstance(ls, LayerScale):
                val = val * ls.gamma.detach()
            const.value.data.copy_(val)
            const.to(device=bias.device)
        setattr(blk, "attn" if which == 1 else "mlp", const)
        if ls is not None:
            setattr(blk, f"ls{which}", nn.Identity())
        setattr(blk, f"norm{which}", nn.Identity())

    def _slice_attention(self, blk, attn: WindowAttention, qk: torch.Tensor, v: torch.Tensor) -> None:
        h, d, D = attn.num_heads, _head_dim(attn), attn.qkv.in_features
        if len(v) == 0:
            self._constant(blk, 1, attn.proj.bias, attn.proj.out_features)
            return
        heads = torch.arange(h).unsqueeze(1) * d
        q_rows = (heads + qk).flatten()
        v_cols = (heads + v).flatten()
        rows = torch.cat([q_rows, q_rows + h * d, v_cols + 2 * h * d]) if len(qk) else v_cols + 2 * h * d
        new = PrunedWindowAttention(D, h, len(qk), len(v), attn.window_size, attn.scale, attn.qkv.bias is not None,
                                    attn.proj.bias is not None, attn.proj.out_features, attn.fused_attn)
        new.to(dtype=attn.qkv.weight.dtype, device=attn.qkv.weight.device)
        copy_linear(new.qkv, attn.qkv, rows=rows)
        copy_linear(new.proj, attn.proj, cols=v_cols)
        with torch.no_grad():
            new.relative_position_bias_table.copy_(attn.relative_position_bias_table)
        blk.attn = new

    def _slice_mlp(self, blk, mlp: Mlp, hid: torch.Tensor) -> None:
        if len(hid) == 0:
            self._constant(blk, 2, mlp.fc2.bias, mlp.fc2.out_features)
            return
        new = TimmViT._narrow_mlp(mlp.fc1.in_features, len(hid), mlp.fc2.out_features,
                                  mlp.fc1.bias is not None, mlp.fc2.bias is not None, mlp.act)
        new.to(dtype=mlp.fc1.weight.dtype, device=mlp.fc1.weight.device)
        copy_linear(new.fc1, mlp.fc1, rows=hid)
        copy_linear(new.fc2, mlp.fc2, cols=hid)
        blk.mlp = new

    # -- rebuild from a spec ---------------------------------------------------------------
    def build(self, spec: dict) -> nn.Module:
        model = _build_dense(spec["architecture"])
        blocks, kept_blocks = _blocks(model), spec["blocks"]
        scales = spec.get("attention_scales") or [_unwrap(b.attn).scale for b in blocks]
        if len(kept_blocks) != len(blocks) or len(scales) != len(blocks):
            raise SpecError(f"spec lists {len(kept_blocks)} blocks ({len(scales)} attention scales) but the "
                            f"architecture has {len(blocks)}")
        for blk, kept, scale in zip(blocks, kept_blocks, scales):
            rebuild_block(self, blk, kept, lambda a, nq, nv, scale=float(scale): PrunedWindowAttention(
                a.qkv.in_features, a.num_heads, nq, nv, a.window_size, scale, a.qkv.bias is not None,
                a.proj.bias is not None, a.proj.out_features, a.fused_attn))
        model.sppbench_spec = spec
        return model


register(TimmSwin())
