"""SparseGPT: the blocked, lazy Cholesky form equals the direct OBS computation, keeps the pattern, and
reconstructs the layer's outputs better than the same mask without the weight updates."""
import pytest
import torch

from sppbench.methods.sparsegpt import sparsegpt, sparsegpt_reference


def _case(seed: int, d_out: int = 6, d_in: int = 16, tokens: int = 40, dead: int | None = None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d_in, dtype=torch.float64)
    if dead is not None:
        X[:, dead] = 0.0
    return W, X, X.T @ X


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kw", [dict(sparsity=0.5, blocksize=4), dict(sparsity=0.5, blocksize=16),
                                dict(sparsity=0.3, blocksize=8), dict(n=2, m=4, blocksize=8),
                                dict(n=1, m=4, blocksize=4)])
def test_blocked_cholesky_form_equals_the_direct_obs_computation(seed, kw):
    W, _, H = _case(seed, dead=3 if seed else None)
    fast, keep = sparsegpt(W, H, **kw)
    ref, keep_ref = sparsegpt_reference(W, H, **kw)
    assert torch.equal(keep, keep_ref)
    assert torch.allclose(fast, ref, atol=1e-10, rtol=1e-9)
    assert (fast[~keep] == 0).all() and (fast[keep] != 0).any()


def test_the_pattern_holds_and_dead_inputs_are_pruned():
    W, _, H = _case(2, d_out=8, d_in=32, dead=5)
    out, keep = sparsegpt(W, H, n=2, m=4, blocksize=16)
    assert (keep.reshape(8, -1, 4).sum(-1) == 2).all()              # 2 of every 4 consecutive inputs, every row
    assert (out[~keep] == 0).all() and (out[:, 5] == 0).all()       # a dead input's weights carry nothing
    out, keep = sparsegpt(W, H, sparsity=0.5, blocksize=8)
    assert int((~keep).sum()) == W.numel() // 2                      # 50% of every block of 8 columns
    for i in range(0, 32, 8):
        assert int((~keep[:, i:i + 8]).sum()) == 8 * 8 // 2


def test_updates_reconstruct_the_outputs_better_than_the_mask_alone():
    W, _, _ = _case(3, d_out=16, d_in=32)
    g = torch.Generator().manual_seed(4)  # correlated inputs (as a network's activations are): the updates can use them
    X = torch.randn(200, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 32, generator=g, dtype=torch.float64)
    X = X + 0.1 * torch.randn(200, 32, generator=g, dtype=torch.float64)
    H = X.T @ X
    out, keep = sparsegpt(W, H, sparsity=0.5, blocksize=8)
    masked = W * keep
    err = lambda V: float(((X @ (W - V).T) ** 2).sum())  # noqa: E731
    assert err(out) < err(masked)
    assert err(out) < 0.9 * err(masked)


def test_bad_arguments_are_refused():
    W, _, H = _case(0)
    with pytest.raises(ValueError, match="both n and m"):
        sparsegpt(W, H, n=2)
    with pytest.raises(ValueError, match="0 < n < m"):
        sparsegpt(W, H, n=4, m=4)
    with pytest.raises(ValueError, match="multiple of m"):
        sparsegpt(W, H, n=2, m=4, blocksize=6)
    with pytest.raises(ValueError, match="sparsity"):
        sparsegpt(W, H, sparsity=1.0)
    with pytest.raises(ValueError, match="H must be"):
        sparsegpt(W, H[:4, :4])
