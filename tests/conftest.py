"""Tiny random-init timm models for unit tests (CPU, offline, milliseconds each)."""
from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter (biases, norms, LayerScale included) non-trivial values, so a bug in
    any slice, bias or scale shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def tiny_vit(seed: int = 0) -> VisionTransformer:
    """ViT / DeiT-style: class token, qkv bias, no LayerScale."""
    return _randomize(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3,
                                        mlp_ratio=2.0, num_classes=5), seed)


def tiny_deit_distilled(seed: int = 0) -> VisionTransformerDistilled:
    """DeiT with a distillation token and head."""
    return _randomize(VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                                 mlp_ratio=3.0, num_classes=4), seed)


def tiny_dinov2(seed: int = 0) -> VisionTransformer:
    """DINOv2-style: LayerScale, register tokens, patch 7, dynamic image size."""
    return _randomize(VisionTransformer(img_size=28, patch_size=7, embed_dim=48, depth=3, num_heads=4,
                                        mlp_ratio=2.0, init_values=0.5, reg_tokens=2, num_classes=3,
                                        dynamic_img_size=True), seed)


def tiny_avgpool(seed: int = 0) -> VisionTransformer:
    """No class token, average pooling with fc_norm, no qkv bias."""
    return _randomize(VisionTransformer(img_size=32, patch_size=8, embed_dim=36, depth=2, num_heads=3,
                                        mlp_ratio=2.0, class_token=False, global_pool="avg", qkv_bias=False,
                                        num_classes=6), seed)


TINY = {"vit": tiny_vit, "deit_distilled": tiny_deit_distilled, "dinov2": tiny_dinov2, "avgpool": tiny_avgpool}
INPUT = {"vit": 32, "deit_distilled": 32, "dinov2": 28, "avgpool": 32}


@pytest.fixture(params=sorted(TINY))
def tiny(request):
    """(name, model, input batch) for every tiny variant."""
    name = request.param
    size = INPUT[name]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    return name, TINY[name](), x


def synthetic_batches(model: torch.nn.Module, size: int, n: int = 4, batch: int = 8, seed: int = 0):
    """Labelled batches whose labels are the dense model's own predictions (so the masks matter)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.randn(batch, 3, size, size, generator=g)
            out.append((x, model(x).argmax(-1)))
    return out


def tiny_swin(seed: int = 0):
    """Swin v1 (timm SwinTransformer): two stages of two blocks, shifted windows in both stages
    (16 x 16 then 8 x 8 tokens, window 4), relative position bias, no drop-path."""
    from timm.models.swin_transformer import SwinTransformer

    return _randomize(SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                      window_size=4, mlp_ratio=2.0, num_classes=5, drop_path_rate=0.0), seed)


def mask_vs_zeroed_unit(m, unit_slices, name: str, entry: int, run):
    """(output with mask entry ``entry`` of group ``name`` at 0, output with that entry's unit weights zeroed instead);
    masks and weights are restored afterwards. ``run()`` computes the model's output."""
    with torch.no_grad():
        m.reset_masks()
        m.mask_parameters()[name][entry] = 0
        masked = run()
        m.reset_masks()
        saved = [s.param.detach().clone() for s in unit_slices]
        for s in unit_slices:
            vals = s.gather().detach().clone()
            vals[entry] = 0
            s.scatter_(s.param.data, vals)
        zeroed = run()
        for s, b in zip(unit_slices, saved):
            s.param.copy_(b)
    return masked, zeroed


def unit_coverage(unit_slices) -> dict:
    """How many units cover each element of each sliced parameter: {id(param): count tensor}."""
    counts = {}
    for sl in unit_slices.values():
        for s in sl:
            c = counts.setdefault(id(s.param), torch.zeros_like(s.param))
            tmp = torch.zeros_like(s.param)
            s.scatter_(tmp, torch.ones(s.gather().shape))
            c += tmp
    return counts
