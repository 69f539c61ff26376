"""timm VisionTransformer family: ViT, DeiT (incl. distilled), DINOv2-style (LayerScale, registers).

Masks live in explicit wrapper modules (``MaskedAttention``, ``MaskedMlp``) that replace each
``Block``'s ``attn`` / ``mlp`` and reuse the original Linear layers. Compression builds
``PrunedAttention`` (q/k and v of different widths, original softmax scale), a narrow timm ``Mlp``,
or ``ConstantBranch`` for a branch with nothing left, inside a copy of the original model.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.costs import Branch, CostModel
from ..core.family import Family, register
from ..core.masks import MaskedModel, MaskGroup
from ..errors import SpecError, UnsupportedModelError
from .blocks import ACTIVATIONS, activation_name, copy_linear, numel

try:  # timm is a hard dependency of this family only
    from timm.layers import Attention as TimmAttention
    from timm.layers import LayerScale, Mlp
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer
except ImportError:  # pragma: no cover
    VisionTransformer = None  # type: ignore[assignment]

SPEC_FORMAT = "sppbench.pruned/1"


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class MaskedAttention(nn.Module):
    """timm ``Attention`` with pair-wise masks: q, k scaled by ``mask_qk``; v by ``mask_v``.

    Computes exactly timm's attention when both masks are 1 (same fused kernel, same scale).
    ``(q * m) . (k * m) = q . (m * m * k)``: the mask is applied once, as m^2, to k.
    """

    def __init__(self, attn: "TimmAttention"):
        super().__init__()
        self.attn = attn
        self.train(attn.training)  # attention dropout follows the wrapped module's mode
        w = attn.qkv.weight
        self.mask_qk = nn.Parameter(torch.ones(attn.head_dim, dtype=w.dtype, device=w.device))
        self.mask_v = nn.Parameter(torch.ones(attn.head_dim, dtype=w.dtype, device=w.device))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        a = self.attn
        B, N, _ = x.shape
        q, k, v = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        k = k * (self.mask_qk * self.mask_qk).to(k.dtype)  # bf16 autocast: stay in the activation dtype
        v = v * self.mask_v.to(v.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=a.scale,
            dropout_p=a.attn_drop.p if self.training else 0.0,
        )
        x = x.transpose(1, 2).reshape(B, N, a.num_heads * a.head_dim)
        return a.proj_drop(a.proj(x))


class MaskedMlp(nn.Module):
    """timm ``Mlp`` with a mask on fc1's output, before the activation (act(0) = 0)."""

    def __init__(self, mlp: "Mlp"):
        super().__init__()
        self.mlp = mlp
        self.train(mlp.training)
        w = mlp.fc1.weight
        self.mask = nn.Parameter(torch.ones(mlp.fc1.out_features, dtype=w.dtype, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        h = m.fc1(x)
        h = m.act(h * self.mask.to(h.dtype))
        return m.drop2(m.fc2(m.norm(m.drop1(h))))


class PrunedAttention(nn.Module):
    """Self-attention whose q/k head width (``qk_dim``) and v head width (``v_dim``) differ.

    The softmax scale is the ORIGINAL head width's, so the result equals the binary-masked model.
    With ``qk_dim == 0`` every logit is 0 and attention is uniform: without a mask the output is the
    projection of the mean value, computed once per sample on the mean token (exact, since v is
    affine in x); with a mask (causal, padding) each token averages the values it may see.
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float,
                 qkv_bias: bool = True, proj_bias: bool = True, out_dim: int | None = None):
        super().__init__()
        if v_dim < 1:
            raise ValueError("PrunedAttention needs v_dim >= 1; a branch with no v is a ConstantBranch")
        self.num_heads, self.qk_dim, self.v_dim, self.scale = num_heads, qk_dim, v_dim, scale
        self.head_dim = v_dim  # what flows out of each head
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.proj = nn.Linear(num_heads * v_dim, out_dim or dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        B, N, _ = x.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        if dq == 0:
            if attn_mask is None and not is_causal:
                out = self.proj(self.qkv(x.mean(dim=1, keepdim=True)))
                return out.expand(B, N, out.shape[-1])
            v = self.qkv(x).reshape(B, N, h, dv).transpose(1, 2)
            # all logits are 0: the mask alone shapes the softmax (SDPA conventions: bool True = may attend)
            if is_causal:
                attn_mask = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=v.dtype, device=v.device).masked_fill(~attn_mask,
                                                                                                   float("-inf"))
            x = torch.softmax(attn_mask.to(v.dtype), dim=-1) @ v
            return self.proj(x.transpose(1, 2).reshape(B, N, h * dv))
        q, k, v = self.qkv(x).split([h * dq, h * dq, h * dv], dim=-1)
        q = q.reshape(B, N, h, dq).transpose(1, 2)
        k = k.reshape(B, N, h, dq).transpose(1, 2)
        v = v.reshape(B, N, h, dv).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(B, N, h * dv))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, scale={self.scale:.6g}"


class ConstantBranch(nn.Module):
    """A residual branch with no kept entry: it adds a constant (bias x LayerScale), or nothing."""

    def __init__(self, dim: int, has_value: bool):
        super().__init__()
        self.dim = dim
        self.value = nn.Parameter(torch.zeros(dim)) if has_value else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.dim)
        return out if self.value is None else out + self.value


# ---------------------------------------------------------------------------------------------
# Architecture description (JSON-able) so a pruned model can be rebuilt without pickles
# ---------------------------------------------------------------------------------------------
def _is(mod: nn.Module | None, cls) -> bool:
    return mod is not None and not isinstance(mod, nn.Identity) and isinstance(mod, cls)


def _architecture(model: "VisionTransformer") -> dict:
    """Constructor arguments that rebuild ``model``'s dense skeleton."""
    b0 = model.blocks[0]
    attn, mlp = b0.attn, b0.mlp
    if isinstance(attn, MaskedAttention):
        attn = attn.attn
    if isinstance(mlp, MaskedMlp):
        mlp = mlp.mlp
    pe = model.patch_embed
    kwargs = dict(
        img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=model.embed_dim,
        depth=len(model.blocks), num_heads=attn.num_heads, mlp_ratio=mlp.fc1.out_features / model.embed_dim,
        qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
        init_values=1e-5 if isinstance(b0.ls1, LayerScale) else None,
        class_token=model.cls_token is not None, reg_tokens=model.num_reg_tokens,
        no_embed_class=model.no_embed_class, pos_embed="learn" if model.pos_embed is not None else "none",
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        # timm: final_norm gates both norms; fc_norm picks which of the two exists
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        fc_norm=not isinstance(model.fc_norm, nn.Identity), pool_include_prefix=model.pool_include_prefix,
        dynamic_img_size=model.dynamic_img_size, dynamic_img_pad=bool(getattr(pe, "dynamic_img_pad", False)),
    )
    return {
        "class": "VisionTransformerDistilled" if isinstance(model, VisionTransformerDistilled) else "VisionTransformer",
        "kwargs": kwargs,
        "norm_eps": b0.norm1.eps,
        "act": activation_name(mlp.act),
    }


def _build_dense(arch: dict, device: str | torch.device = "cpu") -> "VisionTransformer":
    cls = {"VisionTransformer": VisionTransformer, "VisionTransformerDistilled": VisionTransformerDistilled}[arch["class"]]
    kw = dict(arch["kwargs"])
    kw["img_size"], kw["patch_size"] = tuple(kw["img_size"]), tuple(kw["patch_size"])
    with torch.device(device):
        return cls(**kw, norm_layer=functools.partial(nn.LayerNorm, eps=arch["norm_eps"]),
                   act_layer=ACTIVATIONS[arch["act"]], weight_init="skip")


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------
def _group_names(i: int) -> tuple[str, str, str]:
    return f"blocks.{i}.attn.qk", f"blocks.{i}.attn.v", f"blocks.{i}.mlp"


class TimmViT(Family):
    name = "timm-vit"

    def matches(self, model: nn.Module) -> bool:
        return VisionTransformer is not None and isinstance(model, VisionTransformer)

    # -- checks ----------------------------------------------------------------------------
    def _check(self, model: "VisionTransformer") -> None:
        where = type(model).__name__
        if any(isinstance(b.attn, (MaskedAttention, PrunedAttention, ConstantBranch)) for b in model.blocks):
            raise UnsupportedModelError(
                f"this {where} already carries sppbench masks or was compressed; attach masks to the "
                "original dense model (or call detach_masks() first)"
            )
        if model.global_pool in ("map", "prr"):
            raise UnsupportedModelError(f"{where} with global_pool={model.global_pool!r} (attention pooling) "
                                        "is not supported; use 'token' or 'avg' pooling")
        if not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedModelError(f"{where} with a patch-embedding norm is not supported")
        for i, b in enumerate(model.blocks):
            if type(b) is not Block:
                raise UnsupportedModelError(
                    f"block {i} of {where} is a {type(b).__name__}; the timm ViT adapter supports the "
                    "pre-norm timm Block (ViT, DeiT, DINOv2, CLIP-style ViT)"
                )
            a, m = b.attn, b.mlp
            if type(a) is not TimmAttention:
                raise UnsupportedModelError(f"block {i}: attention {type(a).__name__} is not supported "
                                            "(only timm.layers.Attention)")
            if not (isinstance(a.q_norm, nn.Identity) and isinstance(a.k_norm, nn.Identity)
                    and isinstance(a.norm, nn.Identity) and getattr(a, "gate", None) is None):
                raise UnsupportedModelError(
                    f"block {i}: attention with qk_norm / scale_norm / gating cannot be sliced exactly "
                    "(the norms mix the dimensions a mask removes)"
                )
            if type(m) is not Mlp or not isinstance(m.norm, nn.Identity):
                raise UnsupportedModelError(f"block {i}: MLP {type(m).__name__} (or one with a hidden norm) "
                                            "is not supported; only timm.layers.Mlp")
            activation_name(m.act)

    def tokens(self, model: "VisionTransformer", input_size: Sequence[int] | int | None) -> tuple[int, tuple[int, int, int]]:
        """Tokens per sample and the (C, H, W) input size they are computed for."""
        pe = model.patch_embed
        if input_size is None:
            hw = tuple(pe.img_size)
        elif isinstance(input_size, int):
            hw = (input_size, input_size)
        else:
            hw = tuple(input_size[-2:])
        if hw != tuple(pe.img_size) and not model.dynamic_img_size:
            raise ValueError(f"input size {hw} differs from the model's img_size {tuple(pe.img_size)} and the "
                             "model was not built with dynamic_img_size=True")
        ph, pw = pe.patch_size
        rnd = math.ceil if getattr(pe, "dynamic_img_pad", False) else (lambda v: int(v))
        gh, gw = rnd(hw[0] / ph), rnd(hw[1] / pw)
        return model.num_prefix_tokens + gh * gw, (pe.proj.in_channels, hw[0], hw[1])

    # -- attach / detach -------------------------------------------------------------------
    def attach(self, model: nn.Module, input_size=None) -> MaskedModel:
        self._check(model)
        N, in_size = self.tokens(model, input_size)
        D = model.embed_dim
        groups, sites, branches = [], {}, []
        branch_params = 0
        for i, blk in enumerate(model.blocks):
            gqk, gv, gm = _group_names(i)
            attn, mlp = blk.attn, blk.mlp
            ls1 = int(isinstance(blk.ls1, LayerScale))
            ls2 = int(isinstance(blk.ls2, LayerScale))
            branches.append(Branch("attention", {"qk": gqk, "v": gv}, dict(
                D=D, h=attn.num_heads, N=N, out=attn.proj.out_features,
                qkv_bias=int(attn.qkv.bias is not None), proj_bias=int(attn.proj.bias is not None),
                norm=numel(blk.norm1), ls=ls1)))
            branches.append(Branch("mlp", {"hidden": gm}, dict(
                D=D, N=N, out=mlp.fc2.out_features, fc1_bias=int(mlp.fc1.bias is not None),
                fc2_bias=int(mlp.fc2.bias is not None), norm=numel(blk.norm2), ls=ls2)))
            branch_params += numel(blk.norm1, attn, blk.ls1, blk.norm2, mlp, blk.ls2)
            blk.attn = MaskedAttention(attn)
            blk.mlp = MaskedMlp(mlp)
            sites[gqk] = (blk.attn, "mask_qk")
            sites[gv] = (blk.attn, "mask_v")
            sites[gm] = (blk.mlp, "mask")
            groups += [MaskGroup(gqk, "qk", "attn", attn.head_dim, i), MaskGroup(gv, "v", "attn", attn.head_dim, i),
                       MaskGroup(gm, "mlp", "mlp", mlp.fc1.out_features, i)]
        # base = everything outside the branches; its MACs are the patch conv and the head(s)
        base_params = numel(model) - branch_params - sum(g.size for g in groups)
        pe = model.patch_embed
        patches = N - model.num_prefix_tokens
        base_macs = patches * D * pe.proj.in_channels * pe.patch_size[0] * pe.patch_size[1]
        for head in (model.head, getattr(model, "head_dist", None)):
            if isinstance(head, nn.Linear):
                base_macs += head.in_features * head.out_features
        info = {"family": self.name, "model_class": type(model).__name__, "tokens": N,
                "input_size": list(in_size), "architecture": _architecture(model)}
        return MaskedModel(model, self, sites, groups, CostModel(base_params, base_macs, branches), info)

    def detach(self, masked: MaskedModel) -> None:
        for blk in masked.model.blocks:
            if isinstance(blk.attn, MaskedAttention):
                blk.attn = blk.attn.attn
            if isinstance(blk.mlp, MaskedMlp):
                blk.mlp = blk.mlp.mlp

    # -- compression -----------------------------------------------------------------------
    def compress(self, masked: MaskedModel, keep) -> nn.Module:
        small = copy.deepcopy(masked.model)
        kept_blocks = []
        for i, blk in enumerate(small.blocks):
            gqk, gv, gm = _group_names(i)
            qk, v, hid = (keep.indices(g) for g in (gqk, gv, gm))
            self._slice_attention(blk, blk.attn.attn, qk, v)
            self._slice_mlp(blk, blk.mlp.mlp, hid)
            kept_blocks.append({"qk": qk.tolist(), "v": v.tolist(), "mlp": hid.tolist()})
        small.sppbench_spec = {
            "format": SPEC_FORMAT, "family": self.name, "architecture": masked.info["architecture"],
            "input_size": masked.info["input_size"], "attention_scale": masked.model.blocks[0].attn.attn.scale,
            "blocks": kept_blocks,
        }
        return small

    @staticmethod
    def _constant(blk: nn.Module, which: int, bias: torch.Tensor | None, dim: int) -> None:
        ls = getattr(blk, f"ls{which}")
        const = ConstantBranch(dim, bias is not None)
        if bias is not None:
            val = bias.detach().clone()
            if isinstance(ls, LayerScale):
                val = val * ls.gamma.detach()
            const.value.data.copy_(val)
        setattr(blk, "attn" if which == 1 else "mlp", const)
        setattr(blk, f"ls{which}", nn.Identity())
        setattr(blk, f"norm{which}", nn.Identity())

    def _slice_attention(self, blk, attn, qk: torch.Tensor, v: torch.Tensor) -> None:
        h, d, D = attn.num_heads, attn.head_dim, attn.qkv.in_features
        if len(v) == 0:
            self._constant(blk, 1, attn.proj.bias, attn.proj.out_features)
            return
        heads = torch.arange(h).unsqueeze(1) * d
        q_rows = (heads + qk).flatten()
        v_cols = (heads + v).flatten()
        rows = torch.cat([q_rows, q_rows + h * d, v_cols + 2 * h * d]) if len(qk) else v_cols + 2 * h * d
        new = PrunedAttention(D, h, len(qk), len(v), attn.scale, attn.qkv.bias is not None,
                              attn.proj.bias is not None, attn.proj.out_features)
        new.to(dtype=attn.qkv.weight.dtype, device=attn.qkv.weight.device)
        copy_linear(new.qkv, attn.qkv, rows=rows)
        copy_linear(new.proj, attn.proj, cols=v_cols)
        blk.attn = new

    def _slice_mlp(self, blk, mlp, hid: torch.Tensor) -> None:
        if len(hid) == 0:
            self._constant(blk, 2, mlp.fc2.bias, mlp.fc2.out_features)
            return
        new = self._narrow_mlp(mlp.fc1.in_features, len(hid), mlp.fc2.out_features,
                               mlp.fc1.bias is not None, mlp.fc2.bias is not None, mlp.act)
        new.to(dtype=mlp.fc1.weight.dtype, device=mlp.fc1.weight.device)
        copy_linear(new.fc1, mlp.fc1, rows=hid)
        copy_linear(new.fc2, mlp.fc2, cols=hid)
        blk.mlp = new

    @staticmethod
    def _narrow_mlp(dim: int, hidden: int, out: int, b1: bool, b2: bool, act: nn.Module) -> "Mlp":
        new = Mlp(dim, hidden, out, bias=(b1, b2))
        new.act = copy.deepcopy(act)
        return new

    # -- rebuild from a spec ---------------------------------------------------------------
    def build(self, spec: dict) -> nn.Module:
        arch = spec["architecture"]
        model = _build_dense(arch)
        blocks = spec["blocks"]
        if len(blocks) != len(model.blocks):
            raise SpecError(f"spec lists {len(blocks)} blocks but the architecture has {len(model.blocks)}")
        scale = float(spec["attention_scale"])
        for blk, kept in zip(model.blocks, blocks):
            rebuild_block(self, blk, kept, lambda a, nq, nv: PrunedAttention(
                a.qkv.in_features, a.num_heads, nq, nv, scale, a.qkv.bias is not None, a.proj.bias is not None,
                a.proj.out_features))
        model.sppbench_spec = spec
        return model


def rebuild_block(family: Family, blk: nn.Module, kept: dict, make_attention) -> None:
    """Give a dense block the narrow attention / MLP (or constant branches) that a spec's kept lists describe.

    ``make_attention(dense_attn, qk_width, v_width)`` builds the family's narrow attention module.
    """
    attn, mlp = blk.attn, blk.mlp
    nq, nv, nh = len(kept["qk"]), len(kept["v"]), len(kept["mlp"])
    if nv == 0:
        family._constant(blk, 1, attn.proj.bias, attn.proj.out_features)
    else:
        blk.attn = make_attention(attn, nq, nv)
    if nh == 0:
        family._constant(blk, 2, mlp.fc2.bias, mlp.fc2.out_features)
    else:
        blk.mlp = TimmViT._narrow_mlp(mlp.fc1.in_features, nh, mlp.fc2.out_features, mlp.fc1.bias is not None,
                                      mlp.fc2.bias is not None, mlp.act)


register(TimmViT())
