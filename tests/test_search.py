"""The search loop on tiny models: determinism, frozen weights, divergence handling, the public API."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sppbench
from conftest import synthetic_batches, tiny_vit

CONSTS = dict(kappa=5.0, alpha=0.5, nu=50.0, lam=0.05)


def _search(seed=0, steps=30, **kw):
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    batches = synthetic_batches(model, 32, n=3)
    return m, sppbench.search(m, batches, F.cross_entropy, steps=steps, seed=seed, **{**CONSTS, **kw})


def test_search_returns_a_path_over_every_mask_entry():
    m, path = _search()
    assert [g.name for g in path.groups] == [g.name for g in m.groups]
    entered = sum(int((t >= 0).sum()) for t in path.entry_step.values())
    assert 0 < entered <= sum(g.size for g in m.groups)
    assert len(path.history) == 30 and path.history[-1]["step"] == 30
    assert path.config["kappa"] == CONSTS["kappa"] and path.config["variant"] == "paper"
    # one support-size record per step, and the support is not empty by the end
    sizes = [h["support_pool"]["attn"] + h["support_pool"]["mlp"] for h in path.history]
    assert sizes[-1] > 0


def test_same_seed_and_data_give_the_same_path():
    _, a = _search()
    _, b = _search()
    for n in a.entry_step:
        assert torch.equal(a.entry_step[n], b.entry_step[n])
        assert torch.equal(a.V[n], b.V[n])


def test_search_leaves_weights_and_masks_as_they_were():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = sppbench.attach_masks(model)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    sppbench.search(m, synthetic_batches(model, 32, n=2), F.cross_entropy, steps=5, **CONSTS)
    after = {k: v for k, v in m.model.state_dict().items() if "mask" not in k}
    assert all(torch.equal(before[k.replace(".attn.attn.", ".attn.").replace(".mlp.mlp.", ".mlp.")], v)
               for k, v in after.items())
    assert all(p.requires_grad for p in m.weight_parameters())
    assert torch.equal(m(x), ref)  # masks back at 1


def test_official_variant_runs_and_ranks():
    _, path = _search(variant="official", kappa=1.0, alpha=0.01, nu=1.0, lam=0.02)
    assert path.variant == "official"
    assert sum(int(s.sum()) for s in path.support_steps.values()) > 0
    keep = path.keep(fraction=0.5)
    assert 0.45 < keep.fraction < 0.55


def test_nan_loss_stops_with_the_last_good_path():
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    batches = synthetic_batches(model, 32, n=4)
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] == 4 else loss

    with pytest.raises(sppbench.SearchDivergedError, match="step 4") as info:
        sppbench.search(m, batches, loss_fn, steps=10, **CONSTS)
    assert info.value.path is not None and info.value.path.config["steps"] == 3
    assert len(info.value.path.history) == 3
    assert all(torch.all(p == 1) for p in m.mask_parameters().values())
    assert all(p.requires_grad for p in m.weight_parameters())


def test_search_rejects_bad_arguments():
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    batches = synthetic_batches(model, 32, n=1)
    with pytest.raises(TypeError, match="MaskedModel"):
        sppbench.search(model, batches, F.cross_entropy, steps=2, **CONSTS)
    with pytest.raises(ValueError, match="steps"):
        sppbench.search(m, batches, F.cross_entropy, steps=0, **CONSTS)
    with pytest.raises(ValueError, match="ran out"):
        sppbench.search(m, iter(batches), F.cross_entropy, steps=3, **CONSTS)


def test_public_api_end_to_end(tmp_path):
    """The README's example, verbatim in spirit: attach, search, keep, set_masks, compress, save, load."""
    model = tiny_vit()
    x = torch.randn(4, 3, 32, 32)
    m = sppbench.attach_masks(model)
    opt = sppbench.core.dynamics.SLBI(m.mask_parameters().values(), kappa=1.0, alpha=0.1, nu=1.0, lam=0.5)
    assert isinstance(opt, torch.optim.Optimizer)
    path = sppbench.search(m, synthetic_batches(model, 32), F.cross_entropy, steps=10, seed=0, **CONSTS)
    keep = path.keep(fraction=0.5)
    m.set_masks(keep)
    small = sppbench.compress(m, keep)
    assert (small(x) - m(x)).abs().max() <= 1e-5
    assert sppbench.core.measure.params(small) == keep.params < sppbench.core.measure.params(m)
    assert abs(sppbench.core.measure.macs(small, x) - keep.macs) <= 0.01 * keep.macs
    lat = sppbench.core.measure.latency(small, x, repeats=3)
    assert lat["median_s"] > 0 and lat["batch"] == 4
    sppbench.save_pruned(small, tmp_path / "small")
    assert torch.equal(sppbench.load_pruned(tmp_path / "small")(x), small.eval()(x))
    path.save(tmp_path / "path.json")
    again = sppbench.SolutionPath.load(tmp_path / "path.json").keep(fraction=0.5)
    assert all(torch.equal(again.masks[n], keep.masks[n]) for n in keep.masks)
