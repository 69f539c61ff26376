"""Masks, compression, exact costs and the pruned-model file format on tiny timm ViT variants."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sppbench
from sppbench.core.costs import CostModel
from sppbench.core.path import KeepSet
from conftest import tiny_vit


def random_keep(m: sppbench.MaskedModel, seed: int, empty: dict | None = None) -> KeepSet:
    """A random keep-set; ``empty`` = {group name: True} forces groups to keep nothing."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for grp in m.groups:
        frac = torch.rand(1, generator=g).item()
        k = torch.rand(grp.size, generator=g) < max(frac, 0.2)
        if (empty or {}).get(grp.name):
            k[:] = False
        elif not k.any():
            k[0] = True
        masks[grp.name] = k
    widths = {n: int(v.sum()) for n, v in masks.items()}
    p, mac = m.cost_model.cost(widths)
    return KeepSet(masks, sum(widths.values()) / sum(g.size for g in m.groups), {}, p, mac)


def test_all_ones_masks_leave_outputs_unchanged(tiny):
    name, model, x = tiny
    ref = model(x)
    m = sppbench.attach_masks(model)
    assert torch.equal(m(x), ref) or (m(x) - ref).abs().max() < 1e-6
    assert len(m.groups) == 3 * len(model.blocks)


def test_masks_change_outputs_when_zeroed():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    m = sppbench.attach_masks(model)
    ref = m(x)
    with torch.no_grad():
        m.mask_parameters()["blocks.1.attn.v"][0] = 0
    assert (m(x) - ref).abs().max() > 1e-4


def test_detach_restores_original_modules():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    attn0 = model.blocks[0].attn
    m = sppbench.attach_masks(model)
    plain = m.detach_masks()
    assert plain.blocks[0].attn is attn0
    assert torch.equal(plain(x), ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compressed_equals_binary_masked(tiny, seed):
    name, model, x = tiny
    m = sppbench.attach_masks(model)
    depth = len(model.blocks)
    # block 0: no V entries (attention collapses), last block: no MLP entries, block 1: no q/k entries
    empty = {"blocks.0.attn.v": True, f"blocks.{depth - 1}.mlp": True, "blocks.1.attn.qk": True}
    keep = random_keep(m, seed, empty)
    m.set_masks(keep)
    small = sppbench.compress(m, keep)
    with torch.no_grad():
        diff = (small(x) - m(x)).abs().max().item()
    assert diff <= 1e-5, f"{name}: compressed differs from masked by {diff}"
    assert not any(isinstance(b.attn, type(m.model.blocks[1].attn)) for b in small.blocks)


def test_compression_is_exact_for_a_partial_keep_without_empty_groups(tiny):
    name, model, x = tiny
    m = sppbench.attach_masks(model)
    keep = random_keep(m, 7)
    m.set_masks(keep)
    small = sppbench.compress(m, keep)
    assert (small(x) - m(x)).abs().max().item() <= 1e-5


def test_dense_cost_model_matches_measured(tiny):
    name, model, x = tiny
    params, macs = sppbench.core.measure.params(model), sppbench.core.measure.macs(model, x)
    m = sppbench.attach_masks(model, input_size=x.shape[1:])
    assert m.cost_model.cost({g.name: g.size for g in m.groups}) == (params, macs)


@pytest.mark.parametrize("seed", [0, 3])
def test_compressed_params_exact_and_macs_within_one_percent(tiny, seed):
    name, model, x = tiny
    m = sppbench.attach_masks(model, input_size=x.shape[1:])
    keep = random_keep(m, seed, {"blocks.0.attn.v": True, "blocks.1.mlp": True})
    small = sppbench.compress(m, keep)
    assert sppbench.core.measure.params(small) == keep.params
    measured = sppbench.core.measure.macs(small, x)
    assert abs(measured - keep.macs) <= 0.01 * keep.macs, (measured, keep.macs)


def test_macs_count_the_attention_matmuls():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    N, D = 17, 48
    linear_only = sum(N * mod.in_features * mod.out_features for b in model.blocks
                      for mod in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2))
    attn_matmuls = len(model.blocks) * 2 * N * N * D
    patch = 16 * D * 3 * 64
    head = D * 5
    assert sppbench.core.measure.macs(model, x) == linear_only + attn_matmuls + patch + head


def test_compression_updates_static_attributes():
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    keep = random_keep(m, 4)
    small = sppbench.compress(m, keep)
    for i, blk in enumerate(small.blocks):
        kq, kv = int(keep.masks[f"blocks.{i}.attn.qk"].sum()), int(keep.masks[f"blocks.{i}.attn.v"].sum())
        assert (blk.attn.qk_dim, blk.attn.v_dim, blk.attn.num_heads) == (kq, kv, 3)
        assert blk.attn.scale == pytest.approx(16 ** -0.5)  # the original head width's scale
        assert blk.mlp.fc1.out_features == int(keep.masks[f"blocks.{i}.mlp"].sum())


def test_save_load_round_trip(tiny, tmp_path):
    name, model, x = tiny
    m = sppbench.attach_masks(model, input_size=x.shape[1:])
    keep = random_keep(m, 5, {"blocks.0.mlp": True, "blocks.1.attn.v": True})
    small = sppbench.compress(m, keep)
    folder = sppbench.save_pruned(small, tmp_path / "pruned")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "spec.json"]
    loaded = sppbench.load_pruned(folder)
    assert torch.equal(loaded(x), small.eval()(x))
    assert type(loaded) is type(model)
    assert sppbench.core.measure.params(loaded) == keep.params


def test_spec_that_does_not_match_weights_fails_clearly(tmp_path):
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    a = sppbench.save_pruned(sppbench.compress(m, random_keep(m, 1)), tmp_path / "a")
    b = sppbench.save_pruned(sppbench.compress(m, random_keep(m, 2)), tmp_path / "b")
    # another model's spec next to these weights: the checksum catches it
    (a / "spec.json").write_text((b / "spec.json").read_text())
    with pytest.raises(sppbench.SpecError, match="does not match"):
        sppbench.load_pruned(a)
    # a spec edited by hand (no checksum) with other widths: the strict shape check catches it
    spec = json.loads((b / "spec.json").read_text())
    del spec["weights_sha256"]
    spec["blocks"][0]["mlp"] = spec["blocks"][0]["mlp"][:-1]
    (b / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(sppbench.SpecError, match="do not match the architecture"):
        sppbench.load_pruned(b)


def test_corrupt_or_missing_files_fail_clearly(tmp_path):
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    folder = sppbench.save_pruned(sppbench.compress(m, random_keep(m, 1)), tmp_path / "p")
    (folder / "spec.json").write_text("{not json")
    with pytest.raises(sppbench.SpecError, match="not valid JSON"):
        sppbench.load_pruned(folder)
    with pytest.raises(sppbench.SpecError, match="not a pruned model folder"):
        sppbench.load_pruned(tmp_path / "nowhere")


def test_save_refuses_to_overwrite(tmp_path):
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    small = sppbench.compress(m, random_keep(m, 1))
    folder = sppbench.save_pruned(small, tmp_path / "p")
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        sppbench.save_pruned(sppbench.compress(m, random_keep(m, 2)), folder)
    assert (folder / "model.safetensors").read_bytes() == before
    sppbench.save_pruned(sppbench.compress(m, random_keep(m, 2)), folder, overwrite=True)
    assert (folder / "model.safetensors").read_bytes() != before


def test_unsupported_models_fail_clearly():
    with pytest.raises(sppbench.UnsupportedModelError, match="no family adapter"):
        sppbench.attach_masks(nn.Sequential(nn.Linear(4, 4)))
    from timm.models.vision_transformer import VisionTransformer
    qkn = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, qk_norm=True)
    with pytest.raises(sppbench.UnsupportedModelError, match="qk_norm"):
        sppbench.attach_masks(qkn)
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    with pytest.raises(sppbench.UnsupportedModelError, match="already"):
        sppbench.attach_masks(m)
    with pytest.raises(sppbench.UnsupportedModelError, match="already"):
        sppbench.attach_masks(model)


def test_cost_model_serialises():
    m = sppbench.attach_masks(tiny_vit())
    again = CostModel.from_dict(json.loads(json.dumps(m.cost_model.to_dict())))
    widths = {g.name: g.size // 2 for g in m.groups}
    assert again.cost(widths) == m.cost_model.cost(widths)
