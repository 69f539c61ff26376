"""The Torch-Pruning peer on tiny random-init timm ViTs (CPU, offline)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch_pruning")

from sppbench.core import measure  # noqa: E402
from sppbench.errors import BudgetError, UnsupportedModelError  # noqa: E402
from sppbench.methods.peers import PEERS, _ratio_grid, available, tp_prune  # noqa: E402
from conftest import synthetic_batches, tiny_deit_distilled, tiny_dinov2, tiny_vit  # noqa: E402

SIZES = {"vit": 32, "dinov2": 28}
MODELS = {"vit": tiny_vit, "dinov2": tiny_dinov2}


def _x(size: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _residual_shapes(model) -> dict:
    """Shapes of every tensor on the residual width (must survive pruning unchanged)."""
    out = {"embed_dim": model.embed_dim, "pos_embed": tuple(model.pos_embed.shape), "norm": tuple(model.norm.weight.shape)}
    for i, b in enumerate(model.blocks):
        out[i] = (b.attn.qkv.in_features, b.attn.proj.out_features, b.mlp.fc1.in_features, b.mlp.fc2.out_features,
                  tuple(b.norm1.weight.shape), tuple(b.norm2.weight.shape),
                  tuple(getattr(b.ls1, "gamma", torch.empty(0)).shape), tuple(getattr(b.ls2, "gamma", torch.empty(0)).shape))
    return out


def _zeroed_dense(dense, kept: dict, pruned_scale: bool = False):
    """The dense model with the pruned units zeroed: q, k AND v rows of every removed head dim, fc1 rows of
    every removed MLP neuron. With the original scale it computes what the pruned model computes."""
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for b, dims, neurons in zip(ref.blocks, kept["head_dims"], kept["mlp"]):
            a = b.attn
            H, hd = a.num_heads, a.head_dim
            gone = [d for d in range(hd) if d not in set(dims)]
            rows = [s * H * hd + h * hd + d for s in range(3) for h in range(H) for d in gone]
            a.qkv.weight[rows] = 0
            if a.qkv.bias is not None:
                a.qkv.bias[rows] = 0
            if pruned_scale:  # the plain path honours attn.scale
                a.fused_attn = False
                a.scale = len(dims) ** -0.5
            lost = [j for j in range(b.mlp.fc1.out_features) if j not in set(neurons)]
            b.mlp.fc1.weight[lost] = 0
            b.mlp.fc1.bias[lost] = 0
    return ref


def test_available():
    assert available() == {p: None for p in PEERS}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_macs_budget(name):
    dense = MODELS[name]()
    before = copy.deepcopy(dense.state_dict())
    shapes = _residual_shapes(dense)
    x = _x(SIZES[name])
    dense_macs = measure.macs(dense, x)
    target = dense_macs // 2
    pruned, info = tp_prune(dense, importance="magnitude", example_inputs=x, macs=target)

    # the budget: at or under the target, and the next less-pruned ratio TP can give is over it (so the
    # bisection found the largest model); tiny models move in coarse steps (d_h = 12 or 16), so the gap
    # to the target is at most 10% here (under 0.5% on DINOv2 ViT-S/14)
    assert info["macs"] == measure.macs(pruned, x) <= target
    assert info["macs"] >= 0.9 * target
    grid = _ratio_grid(dense, False)
    i = grid.index(info["pruning_ratio"])
    prev = [t for t in info["tries"] if t["ratio"] == grid[i - 1]]
    assert prev and prev[0]["macs"] > target
    assert info["params"] == measure.params(pruned) < measure.params(dense)
    assert info["target_macs"] == target and info["peer"] == "torch-pruning" and info["scale"] == "original"
    assert info["seconds"] > 0 and len(info["tries"]) >= 3 and "q, k AND v" in info["units"]["attn"]
    json.dumps(info)  # JSON-able as is

    # runs, same outputs / features shapes, residual width untouched, head dims consistent
    with torch.no_grad():
        assert pruned(x).shape == dense(x).shape
        feats = pruned.forward_features(x)
        assert feats.shape == dense.forward_features(x).shape
        assert pruned.forward_head(feats, pre_logits=True).shape == (x.shape[0], dense.embed_dim)
    assert _residual_shapes(pruned) == shapes
    for b0, b, hd in zip(dense.blocks, pruned.blocks, info["head_dim"]):
        a = b.attn
        assert a.num_heads == b0.attn.num_heads and a.head_dim == hd < b0.attn.head_dim
        assert a.qkv.out_features == 3 * a.num_heads * hd and a.proj.in_features == a.num_heads * hd
        assert a.attn_dim == a.num_heads * hd and a.scale == pytest.approx(hd ** -0.5)
        assert b.mlp.fc2.in_features == b.mlp.fc1.out_features < b0.mlp.fc1.out_features
    assert info["mlp_hidden"] == [b.mlp.fc1.out_features for b in pruned.blocks]

    # the input model is untouched
    after = dense.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in dense.parameters())
    assert all(b.attn.head_dim == (12 if name == "dinov2" else 16) for b in dense.blocks)


@pytest.mark.parametrize("scale", ["original", "pruned"])
def test_pruned_equals_dense_with_units_zeroed(scale):
    """TP removes the same within-head dim from q, k and v; with the original scale the pruned model is
    exactly the dense one with those qkv rows (and the pruned fc1 rows) zeroed."""
    dense = tiny_dinov2()
    x = _x(28, 3)
    pruned, info = tp_prune(dense, importance="magnitude", example_inputs=x, fraction=0.5, scale=scale)
    assert info["scale"] == scale and info["pruning_ratio"] == 0.5
    assert [len(d) for d in info["kept"]["head_dims"]] == info["head_dim"] == [6, 6, 6]
    ref = _zeroed_dense(dense, info["kept"], pruned_scale=scale == "pruned")
    with torch.no_grad():
        got, want = pruned(x), ref(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if scale == "original":  # and the pruned scale would differ: the scale matters here
            other = _zeroed_dense(dense, info["kept"], pruned_scale=True)(x)
            assert not torch.allclose(got, other, atol=1e-3)


def test_no_pruning_is_exact():
    dense = tiny_vit()
    x = _x(32)
    pruned, info = tp_prune(dense, importance="magnitude", example_inputs=x, fraction=1.0)
    assert info["pruning_ratio"] == 0.0 and info["macs"] == measure.macs(dense, x)
    with torch.no_grad():
        assert torch.equal(pruned(x), dense(x))
    # a tiny ratio removes one head dim and one neuron per block, and still runs
    with torch.no_grad():  # TP traces through autograd; the peer turns it back on
        small, info = tp_prune(dense, importance="magnitude", example_inputs=x, fraction=0.99)
    assert info["head_dim"] == [15, 15, 15] and info["mlp_hidden"] == [95, 95, 95]  # int(n * 0.99)
    assert small(x).shape == dense(x).shape


def test_taylor_needs_batches_and_runs():
    dense = tiny_vit()
    x = _x(32)
    with pytest.raises(ValueError, match="batches"):
        tp_prune(dense, importance="taylor", example_inputs=x, fraction=0.5)
    with pytest.raises(ValueError, match="loss_fn"):
        tp_prune(dense, importance="taylor", example_inputs=x, fraction=0.5, batches=synthetic_batches(dense, 32))
    batches = synthetic_batches(dense, 32, n=2)
    target = measure.macs(dense, x) * 6 // 10
    pruned, info = tp_prune(dense, importance="taylor", example_inputs=x, macs=target, batches=batches,
                            loss_fn=F.cross_entropy)
    assert info["importance"] == "taylor" and info["macs"] <= target
    assert pruned(x).shape == (2, 5)
    assert all(p.grad is None for p in dense.parameters()) and all(p.grad is None for p in pruned.parameters())
    _, mag = tp_prune(dense, importance="magnitude", example_inputs=x, fraction=1 - info["pruning_ratio"])
    assert mag["head_dim"] == info["head_dim"]  # same ratio, same widths (local ranking) ...
    assert mag["kept"] != info["kept"]  # ... chosen by a different score


def test_global_round_to_and_distilled():
    dense = tiny_vit()
    x = _x(32)
    pruned, info = tp_prune(dense, importance="magnitude", example_inputs=x, fraction=0.5, global_pruning=True)
    units = sum(info["head_dim"]) + sum(info["mlp_hidden"])
    assert info["global_pruning"] and units <= int(3 * (16 + 96) * 0.5) and pruned(x).shape == (2, 5)
    with pytest.raises(BudgetError, match="every unit"):  # TP would empty (and so silently skip) a group
        tp_prune(dense, importance="magnitude", example_inputs=x, fraction=0.05, global_pruning=True)
    _, info = tp_prune(dense, importance="magnitude", example_inputs=x, fraction=0.6, round_to=4)
    assert all(w % 4 == 0 for w in info["head_dim"] + info["mlp_hidden"]) and info["round_to"] == 4

    deit = tiny_deit_distilled()
    pruned, info = tp_prune(deit, importance="magnitude", example_inputs=x, fraction=0.5)
    assert info["head_dim"] == [8, 8, 8] and pruned.head_dist.in_features == 32
    with torch.no_grad():
        assert pruned(x).shape == deit(x).shape


def test_bad_inputs():
    dense = tiny_vit()
    x = _x(32)
    with pytest.raises(ValueError, match="unknown importance"):
        tp_prune(dense, importance="l1", example_inputs=x, fraction=0.5)
    with pytest.raises(BudgetError, match="exactly one"):
        tp_prune(dense, importance="magnitude", example_inputs=x)
    with pytest.raises(BudgetError, match="exactly one"):
        tp_prune(dense, importance="magnitude", example_inputs=x, fraction=0.5, macs=10**6)
    with pytest.raises(BudgetError, match="fraction"):
        tp_prune(dense, importance="magnitude", example_inputs=x, fraction=0.0)
    with pytest.raises(ValueError, match="scale"):
        tp_prune(dense, importance="magnitude", example_inputs=x, fraction=0.5, scale="new")
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        tp_prune(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 5)), importance="magnitude",
                 example_inputs=x, fraction=0.5)
    with pytest.raises(BudgetError, match="smallest reachable is [0-9]+ MACs"):
        tp_prune(dense, importance="magnitude", example_inputs=x, macs=1000)
