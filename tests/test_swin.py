"""The timm Swin family: masks, exact compression (empty groups included), exact costs, the file format,
the real Swin-T architecture, and the embedded Swin's training / caching path."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sppbench
from sppbench.families.swin import MaskedWindowAttention, PrunedWindowAttention
from sppbench.families.vit import ConstantBranch, MaskedMlp
from timm.models.swin_transformer import SwinTransformer

from conftest import _randomize, synthetic_batches, tiny_swin
from test_masks_compress import random_keep

CONSTS = dict(kappa=5.0, alpha=0.5, nu=50.0, lam=0.05)  # as tests/test_search.py


def tiny_swin_padded(seed: int = 0) -> SwinTransformer:
    """Three stages whose resolutions (12, 6, 3) are not multiples of the window (5): timm pads to whole
    windows; the last stage's window is clipped to 3 (no shift). No qkv bias, head dims 6 / 12 / 12,
    max pooling, MLP ratio 3."""
    return _randomize(SwinTransformer(img_size=24, patch_size=2, embed_dim=12, depths=(2, 2, 2), num_heads=(2, 2, 4),
                                      window_size=5, mlp_ratio=3.0, qkv_bias=False, num_classes=4, global_pool="max",
                                      drop_path_rate=0.0), seed)


def tiny_swin_dynamic(seed: int = 0) -> SwinTransformer:
    """strict_img_size=False: built for 32 px, run at 40 px (20 x 20 tokens, then 10 x 10 padded to 12 x 12)."""
    return _randomize(SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                      window_size=4, mlp_ratio=2.0, num_classes=3, strict_img_size=False,
                                      drop_path_rate=0.0), seed)


VARIANTS = {"swin": (tiny_swin, 32), "padded": (tiny_swin_padded, 24), "dynamic": (tiny_swin_dynamic, 40)}


@pytest.fixture(params=sorted(VARIANTS))
def swin(request):
    """(name, model, input batch) for every tiny Swin variant."""
    build, size = VARIANTS[request.param]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return request.param, build(), x


def _blocks(model):
    return [b for stage in model.layers for b in stage.blocks]


def _empty(model) -> dict:
    """Empty groups: no v (constant attention) in the first block, no q/k in the second (shifted windows) and
    third (first block of stage 1), both q/k and v in the fourth, no MLP in the last block."""
    names = [f"layers.{s}.blocks.{b}" for s, st in enumerate(model.layers) for b in range(len(st.blocks))]
    return {f"{names[0]}.attn.v": True, f"{names[1]}.attn.qk": True, f"{names[2]}.attn.qk": True,
            f"{names[3]}.attn.qk": True, f"{names[3]}.attn.v": True, f"{names[-1]}.mlp": True}


# ---------------------------------------------------------------------------------------------------------------
def test_all_ones_masks_leave_outputs_unchanged(swin):
    name, model, x = swin
    with torch.no_grad():
        ref = model(x)
    m = sppbench.attach_masks(model, input_size=x.shape[1:])
    with torch.no_grad():
        assert (m(x) - ref).abs().max().item() <= 1e-6
    blocks = _blocks(model)
    assert len(m.groups) == 3 * len(blocks)
    assert m.info["family"] == "timm-swin" and m.info["input_size"] == list(x.shape[1:])
    i = 0
    for s, stage in enumerate(model.layers):
        for b, blk in enumerate(stage.blocks):
            assert isinstance(blk.attn, MaskedWindowAttention) and isinstance(blk.mlp, MaskedMlp)
            qk, v, mlp = m.groups[3 * i:3 * i + 3]
            head_dim = blk.attn.attn.qkv.out_features // (3 * blk.attn.attn.num_heads)
            assert (qk.name, qk.kind, qk.pool, qk.size, qk.layer) == (f"layers.{s}.blocks.{b}.attn.qk", "qk", "attn",
                                                                      head_dim, i)
            assert (v.name, v.kind, v.pool, v.size, v.layer) == (f"layers.{s}.blocks.{b}.attn.v", "v", "attn",
                                                                 head_dim, i)
            assert (mlp.name, mlp.kind, mlp.pool, mlp.size) == (f"layers.{s}.blocks.{b}.mlp", "mlp", "mlp",
                                                                blk.mlp.mlp.fc1.out_features)
            i += 1
    # the variants do use shifted windows (an attention mask) somewhere
    assert any(blk.attn_mask is not None or (blk.dynamic_mask and any(blk.shift_size)) for blk in blocks)


def test_masks_matter_and_detach_restores(swin):
    name, model, x = swin
    with torch.no_grad():
        ref = model(x)
    attn0, mlp0 = _blocks(model)[0].attn, _blocks(model)[0].mlp
    m = sppbench.attach_masks(model, input_size=x.shape[1:])
    for group in ("layers.0.blocks.1.attn.qk", "layers.0.blocks.1.attn.v", "layers.1.blocks.0.mlp"):
        m.reset_masks()
        with torch.no_grad():
            m.mask_parameters()[group][:] = 0
            assert (m(x) - ref).abs().max() > 1e-4, group
    plain = m.detach_masks()
    assert _blocks(plain)[0].attn is attn0 and _blocks(plain)[0].mlp is mlp0
    with torch.no_grad():
        assert torch.equal(plain(x), ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compressed_equals_binary_masked(swin, seed):
    name, model, x = swin
    m = sppbench.attach_masks(model, input_size=x.shape[1:])
    keep = random_keep(m, seed, _empty(model))
    m.set_masks(keep)
    small = sppbench.compress(m, keep)
    with torch.no_grad():
        diff = (small(x) - m(x)).abs().max().item()
    assert diff <= 1e-5, f"{name}: compressed differs from masked by {diff}"
    b = _blocks(small)
    assert isinstance(b[0].attn, ConstantBranch) and isinstance(b[0].norm1, nn.Identity)
    assert isinstance(b[1].attn, PrunedWindowAttention) and b[1].attn.qk_dim == 0
    assert isinstance(b[3].attn, ConstantBranch)
    assert isinstance(b[-1].mlp, ConstantBranch) and isinstance(b[-1].norm2, nn.Identity)
    assert not any(isinstance(blk.attn, MaskedWindowAttention) or isinstance(blk.mlp, MaskedMlp) for blk in b)
    for blk, orig in zip(b, _blocks(model)):  # the ORIGINAL softmax scale, whatever the kept q/k width
        if isinstance(blk.attn, PrunedWindowAttention):
            assert blk.attn.scale == orig.attn.attn.scale


def test_compression_is_exact_without_empty_groups(swin):
    name, model, x = swin
    m = sppbench.attach_masks(model, input_size=x.shape[1:])
    keep = random_keep(m, 7)
    m.set_masks(keep)
    small = sppbench.compress(m, keep)
    with torch.no_grad():
        assert (small(x) - m(x)).abs().max().item() <= 1e-5


def test_dense_cost_model_matches_measured(swin):
    name, model, x = swin
    params, macs = sppbench.core.measure.params(model), sppbench.core.measure.macs(model, x)
    m = sppbench.attach_masks(model, input_size=x.shape[1:])
    assert m.cost_model.cost({g.name: g.size for g in m.groups}) == (params, macs)


@pytest.mark.parametrize("seed", [0, 3])
def test_compressed_params_exact_and_macs_within_one_percent(swin, seed):
    name, model, x = swin
    m = sppbench.attach_masks(model, input_size=x.shape[1:])
    keep = random_keep(m, seed, _empty(model))
    small = sppbench.compress(m, keep)
    assert sppbench.core.measure.params(small) == keep.params
    measured = sppbench.core.measure.macs(small, x)
    assert abs(measured - keep.macs) <= 0.01 * keep.macs, (measured, keep.macs)
    # every mask entry removed: only the base and the constant branches are left
    zero = sppbench.compress(m, random_keep(m, seed, {g.name: True for g in m.groups}))
    cost = m.cost_model.cost({g.name: 0 for g in m.groups})
    assert (sppbench.core.measure.params(zero), sppbench.core.measure.macs(zero, x)) == cost


def test_macs_count_window_attention_by_hand():
    model = tiny_swin()
    x = torch.randn(1, 3, 32, 32)
    # stage 0: 16 x 16 tokens of width 16, 16 windows of 16 tokens, 2 heads of 8; stage 1: 8 x 8 of 32, 4 windows
    linear = sum(T * mod.in_features * mod.out_features for T, st in ((256, 0), (64, 1))
                 for b in model.layers[st].blocks for mod in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2))
    attn = 2 * (16 * 2 * 16 * 16 * 16) + 2 * (4 * 4 * 16 * 16 * 16)  # windows x heads x A^2 x (d_qk + d_v)
    patch = 256 * 16 * 3 * 4
    merging = 64 * 64 * 32
    head = 32 * 5
    assert sppbench.core.measure.macs(model, x) == linear + attn + patch + merging + head


def test_nested_keep_sets_from_a_search(tmp_path):
    model = tiny_swin()
    m = sppbench.attach_masks(model)
    path = sppbench.search(m, synthetic_batches(model, 32, n=2), F.cross_entropy, steps=15, seed=0, **CONSTS)
    assert [g.name for g in path.groups] == [g.name for g in m.groups]
    assert sum(int((t >= 0).sum()) for t in path.entry_step.values()) > 0
    path = sppbench.SolutionPath.load(path.save(tmp_path / "path.json"))  # the Swin info / costs are JSON-able
    big, small_keep = path.keep(fraction=0.7), path.keep(fraction=0.4)
    assert small_keep.issubset(big) and small_keep.macs <= big.macs and small_keep.params <= big.params
    lo, hi = path.keep(macs=int(0.5 * path.dense()[1])), path.keep(macs=int(0.8 * path.dense()[1]))
    assert lo.issubset(hi) and lo.macs <= int(0.5 * path.dense()[1]) and hi.macs <= int(0.8 * path.dense()[1])
    x = torch.randn(3, 3, 32, 32)
    for keep in (big, small_keep, lo, hi):
        m.set_masks(keep)
        comp = sppbench.compress(m, keep)
        with torch.no_grad():
            assert (comp(x) - m(x)).abs().max().item() <= 1e-5
        assert sppbench.core.measure.params(comp) == keep.params
        assert abs(sppbench.core.measure.macs(comp, x) - keep.macs) <= 0.01 * keep.macs


def test_save_load_round_trip_and_build_from_spec(swin, tmp_path):
    name, model, x = swin
    m = sppbench.attach_masks(model, input_size=x.shape[1:])
    keep = random_keep(m, 5, _empty(model))
    small = sppbench.compress(m, keep).eval()
    spec = small.sppbench_spec
    assert spec["family"] == "timm-swin" and spec["format"] == "sppbench.pruned/1"
    assert len(spec["blocks"]) == len(_blocks(model)) == len(spec["attention_scales"])
    folder = sppbench.save_pruned(small, tmp_path / "pruned")
    loaded = sppbench.load_pruned(folder)
    assert type(loaded) is SwinTransformer
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert sppbench.core.measure.params(loaded) == keep.params
    rebuilt = sppbench.families.get("timm-swin").build(spec)
    rebuilt.load_state_dict(small.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), small(x))


def test_dense_skeleton_rebuilds_from_the_architecture(swin):
    name, model, x = swin
    m = sppbench.attach_masks(model, input_size=x.shape[1:])
    keep = random_keep(m, 0)
    for n in keep.masks:
        keep.masks[n][:] = True
    dense = sppbench.compress(m, keep).eval()
    rebuilt = sppbench.families.get("timm-swin").build(dense.sppbench_spec)
    rebuilt.load_state_dict(dense.state_dict(), strict=True)
    with torch.no_grad():
        assert (rebuilt.eval()(x) - m(x)).abs().max().item() <= 1e-5


def test_real_swin_tiny_architecture():
    """timm's swin_tiny_patch4_window7_224 (random init): identity, exact compression, Swin-T's 4.5 GMACs."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial norms, biases and position biases on top of timm's init
        for n, p in model.named_parameters():
            if p.ndim == 1 or "relative_position_bias_table" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        ref = model(x)
    m = sppbench.attach_masks(model)
    assert not m.training  # timm's Swin-T has drop-path 0.1: the handle must keep the model's eval mode
    with torch.no_grad():
        assert (m(x) - ref).abs().max().item() <= 1e-6
    measured_dense = sppbench.core.measure.macs(m, x)
    assert not m.model.training
    dense_params, dense_macs = m.cost_model.cost({g.name: g.size for g in m.groups})
    assert dense_params == sppbench.core.measure.params(m) == 28_288_354 and dense_macs == measured_dense
    assert 4.4e9 < dense_macs < 4.6e9  # Swin-T: 4.5 GMACs (Liu et al. 2021; timm)
    assert m.info["tokens"] == [3136, 784, 196, 49]
    keep = random_keep(m, 0, {"layers.2.blocks.3.attn.v": True, "layers.1.blocks.1.attn.qk": True,
                              "layers.3.blocks.0.mlp": True})
    m.set_masks(keep)
    small = sppbench.compress(m, keep).eval()
    with torch.no_grad():
        a, b = small(x), m(x)
    # 12 blocks in float32 (measured: ~4e-7); the bound is relative to the output's scale
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    assert sppbench.core.measure.params(small) == keep.params
    measured = sppbench.core.measure.macs(small, x)
    assert abs(measured - keep.macs) <= 0.01 * keep.macs, (measured, keep.macs)


def test_unsupported_models_fail_clearly():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    v2 = SwinTransformerV2(img_size=32, patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4,
                           num_classes=3)
    with pytest.raises(sppbench.UnsupportedModelError, match="no family adapter"):
        sppbench.attach_masks(v2)
    model = tiny_swin()
    m = sppbench.attach_masks(model)
    with pytest.raises(sppbench.UnsupportedModelError, match="already"):
        sppbench.attach_masks(model)
    m.detach_masks()
    with pytest.raises(ValueError, match="img_size"):
        sppbench.attach_masks(model, input_size=40)
    odd = tiny_swin()
    odd.layers[0].blocks[1].attn = nn.Identity()
    with pytest.raises(sppbench.UnsupportedModelError, match="attention Identity"):
        sppbench.attach_masks(odd)
    from timm.layers import RmsNorm
    rms = SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,), window_size=4,
                          norm_layer=RmsNorm, num_classes=3)
    with pytest.raises(sppbench.UnsupportedModelError, match="norm layer RmsNorm"):
        sppbench.attach_masks(rms)
    tanh = tiny_swin()
    tanh.layers[1].blocks[0].mlp.act = nn.Tanh()
    with pytest.raises(sppbench.UnsupportedModelError, match="activation Tanh"):
        sppbench.attach_masks(tanh)


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.embedded
def test_embedded_swin_trains_caches_and_reloads(tmp_path, monkeypatch):
    from sppbench.tasks.data import fashion_mnist_root
    from sppbench.errors import DataError
    from sppbench.tasks.embedded_swin import SWIN_STAND_IN, embedded_swin

    try:
        fashion_mnist_root()
    except DataError as exc:
        if os.environ.get("SPPBENCH_REQUIRE_EMBEDDED") == "1":
            pytest.fail(f"Fashion-MNIST not available: {exc} (SPPBENCH_REQUIRE_EMBEDDED=1)")
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    monkeypatch.setenv("SPPBENCH_CACHE", str(tmp_path))
    kw = dict(n_train=1024, epochs=1, n_val=256, n_test=256, seed=3,
              arch=dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4)))
    first = embedded_swin(**kw)
    assert first.info["label"] == SWIN_STAND_IN and not first.info["from_cache"]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]
    second = embedded_swin(**kw)
    assert second.info["from_cache"]
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("architecture", "training", "train_seconds", "val_top1", "test_top1"):
        assert first.info[key] == second.info[key]
    assert 0.0 <= first.info["test_top1"] <= 1.0 and first.info["splits"] == {"fit": 1024, "val": 256, "test": 256}
    # the model was trained on `fit` only: val is carved from the rest of the training split, test is the test split
    fit, val = set(first.splits.fit.index.tolist()), set(first.splits.val.index.tolist())
    assert not fit & val and first.splits.test.split == "test" and first.splits.fit.split == "train"
    # retraining (refresh=True) reproduces the weights bit for bit: the seed fixes init, data order and flips
    again = embedded_swin(**kw, refresh=True)
    assert not again.info["from_cache"]
    assert all(torch.equal(a[k], v) for k, v in again.model.state_dict().items())
    # another setting is another cache entry, never a stale hit
    third = embedded_swin(**{**kw, "seed": 4})
    assert not third.info["from_cache"] and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_fused_attention_path_is_exact_too():
    """timm's SDPA path (fused_attn=True, off by default for Swin in timm 1.0) is reproduced as well."""
    model = tiny_swin()
    for blk in _blocks(model):
        blk.attn.fused_attn = True
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    m = sppbench.attach_masks(model)
    with torch.no_grad():
        assert (m(x) - ref).abs().max().item() <= 1e-6
    keep = random_keep(m, 1, _empty(model))
    m.set_masks(keep)
    small = sppbench.compress(m, keep)
    assert all(blk.attn.fused_attn for blk in _blocks(small) if isinstance(blk.attn, PrunedWindowAttention))
    with torch.no_grad():
        assert (small(x) - m(x)).abs().max().item() <= 1e-5
    assert sppbench.core.measure.params(small) == keep.params
    assert abs(sppbench.core.measure.macs(small, x) - keep.macs) <= 0.01 * keep.macs
