"""The pruning methods behind sppbench.methods: units, Lasso, DessiLBI, magnitude, random, the one
interface, the layer-spread statistic and the shared fine-tuning routine, on tiny random-init ViTs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sppbench
from sppbench import methods
from sppbench.core.dynamics import DessiLBI, ProximalL1, group_shrink
from sppbench.errors import BudgetError, SearchDivergedError, SppBenchError
from sppbench.core.family import UnitSlice
from sppbench.core.search import finetune
from conftest import synthetic_batches, tiny_dinov2, tiny_swin, tiny_vit, mask_vs_zeroed_unit, unit_coverage

SPP = {"kappa": 10.0, "alpha": 0.02, "nu": 10.0, "lam": 0.05}


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_units_cover_every_weight_once_and_zeroing_a_unit_equals_masking_its_entry(family):
    model = tiny_vit() if family == "vit" else tiny_swin()
    x = torch.randn(2, 3, 32, 32)
    m = sppbench.attach_masks(model)
    units = m.family.unit_slices(m)
    counts = unit_coverage(units)
    for c in counts.values():
        assert torch.equal(c, torch.ones_like(c))  # every element of qkv / proj / fc1 / fc2 in exactly one unit
    g = [grp.name for grp in m.groups]
    for name, entry in ((g[3], 2), (g[1], 5), (g[-1], 7)):
        masked, zeroed = mask_vs_zeroed_unit(m, units[name], name, entry, lambda: m(x))
        assert (masked - zeroed).abs().max() < 1e-5, name


def test_proximal_l1_is_a_gradient_step_then_soft_threshold():
    p = torch.nn.Parameter(torch.tensor([1.0, 0.05, -0.5]))
    opt = ProximalL1([p], lr=0.1, lam=1.0)
    p.grad = torch.tensor([0.5, 0.0, 1.0])
    opt.step()
    # 1 - 0.05 = 0.95 -> 0.85; 0.05 -> 0 (|.| < 0.1); -0.5 - 0.1 = -0.6 -> -0.5
    assert torch.allclose(p.detach(), torch.tensor([0.85, 0.0, -0.5]))
    assert opt.state_of(p)["last_nonzero"].tolist() == [1, 0, 1]


def test_group_shrink_zeroes_small_rows_and_shrinks_others_radially():
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = group_shrink(v, torch.tensor([1.0, 1.0]))
    assert torch.allclose(out[0], torch.tensor([3.0, 4.0]) * (1 - 1 / 5))
    assert torch.equal(out[1], torch.zeros(2))


def test_dessilbi_step_matches_the_formula_on_a_toy_unit():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [0.1, 0.1]]))
    unit = UnitSlice(w, 0, torch.tensor([[0], [1]]))
    kappa, alpha, nu, lam = 2.0, 0.1, 0.5, 0.05
    opt = DessiLBI({"g": [unit]}, kappa=kappa, alpha=alpha, nu=nu, lam=lam)
    target = torch.zeros(2, 2)
    w0 = w.detach().clone()
    loss = 0.5 * (w - target).pow(2).sum()
    loss.backward()
    opt.step()
    # gamma starts at 0: W <- W - alpha*(W - T) - (alpha/nu)*W ; V <- (alpha/nu)*W0
    assert torch.allclose(w.detach(), w0 - alpha * (w0 - target) - alpha / nu * w0)
    v = alpha / nu * w0
    assert torch.allclose(opt.V["g"], v)
    thresh = lam * math.sqrt(2)
    expect = torch.stack([kappa * r * max(0.0, 1 - thresh / float(r.norm())) for r in v])
    assert torch.allclose(opt.gamma["g"], expect)
    assert opt.entry_step["g"].tolist() == [1, -1]  # the large row entered, the small one not yet


@pytest.mark.parametrize("method", methods.RANKING_METHODS)
def test_every_ranking_method_gives_nested_exact_budgets(method):
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    m = sppbench.attach_masks(model)
    batches = synthetic_batches(model, 32, n=3)
    dense_macs = m.cost()[1]
    budgets = [{"macs": int(dense_macs * f)} for f in (0.8, 0.6, 0.45)]
    out = methods.prune(method, m, budgets, batches=batches, loss_fn=F.cross_entropy, steps=6, spp=SPP, seed=1)
    assert [p.budget for p in out] == budgets
    for p, b in zip(out, budgets):
        assert p.keep.macs <= b["macs"]
        assert sppbench.core.measure.macs(p.model, x) == pytest.approx(p.keep.macs, rel=0.01)
        m.set_masks(p.keep)
        with torch.no_grad():
            assert (p.model(x) - m(x)).abs().max() < 1e-5
        m.reset_masks()
    assert out[1].keep.issubset(out[0].keep) and out[2].keep.issubset(out[1].keep)
    if method == "random":
        assert all(p.readout == "per-layer" for p in out)
    # the dense weights are untouched (DessiLBI trains them during its search, then restores them)
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_dessilbi_path_records_its_loss_so_its_health_checks_every_limit():
    from sppbench.studies.common import path_health

    model = tiny_vit()
    m = sppbench.attach_masks(model)
    batches = synthetic_batches(model, 32, n=3)
    path = methods.ranking("dessilbi", m, batches, F.cross_entropy, steps=5, seed=0, spp=SPP)
    assert [h["step"] for h in path.history] == [1, 2, 3, 4, 5]
    assert path.history[0]["loss"] == path.config["loss_first"] and path.history[-1]["loss"] == path.config["loss_last"]
    assert path.support_curve().empty  # no per-step support in its history: an empty curve, not a KeyError
    d = path.diagnostics()
    assert d["loss_start"] == path.config["loss_first"]
    assert "variant" not in path_health(path)  # only SPP paths name an SLBI form
    spp = methods.ranking("spp", m, batches, F.cross_entropy, steps=3, seed=0, spp=SPP)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert path_health(spp)["variant"] == "paper"


def test_magnitude_scores_are_the_rms_of_each_unit():
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    path = methods.magnitude_path(m)
    fc1, fc2 = model.blocks[0].mlp.mlp.fc1, model.blocks[0].mlp.mlp.fc2
    j = 4
    direct = torch.cat([fc1.weight[j], fc1.bias[j:j + 1], fc2.weight[:, j]]).detach().pow(2).mean().sqrt()
    assert float(path.score["blocks.0.mlp"][j]) == pytest.approx(float(direct), rel=1e-6)


def test_random_keeps_the_same_share_of_every_group_and_depends_on_the_seed():
    m = sppbench.attach_masks(tiny_vit())
    a = methods.random_path(m, 0).keep(fraction=0.5, readout="per-layer")
    b = methods.random_path(m, 1).keep(fraction=0.5, readout="per-layer")
    for g in m.groups:
        assert int(a.masks[g.name].sum()) == round(0.5 * g.size)
    assert any(not torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_lasso_bisection_meets_the_budget_and_records_every_try():
    model = tiny_dinov2()
    m = sppbench.attach_masks(model)
    batches = synthetic_batches(model, 28, n=3)
    dense = m.cost()[1]
    keep, info = methods.lasso_to_budget(m, batches, F.cross_entropy, {"macs": int(0.5 * dense)}, steps=8, lr=0.2,
                                         trials=4)
    assert keep.macs <= 0.5 * dense
    assert len(info["tries"]) == 4 and info["search_seconds"] > 0
    us = [t["u"] for t in info["tries"]]
    assert len(set(us)) == 4  # every try a different lambda
    # larger lambda never gives a more expensive support (same data, same steps)
    pairs = sorted((t["u"], t["support_cost"]) for t in info["tries"])
    assert all(c1 >= c2 for (_, c1), (_, c2) in zip(pairs, pairs[1:]))
    assert all(float(p.detach().min()) == 1.0 for p in m.mask_parameters().values())  # masks reset


def test_shared_lasso_tries_bracket_every_budget_or_refuse_it():
    model = tiny_dinov2()
    m = sppbench.attach_masks(model)
    batches = synthetic_batches(model, 28, n=3)
    dense = m.cost()[1]
    budgets = [{"macs": int(0.7 * dense)}, {"macs": int(0.4 * dense)}]
    out = methods.lasso_family(m, batches, F.cross_entropy, budgets, steps=8, lr=0.2, trials=6)
    tries = out[0][1]["tries"]
    assert len(tries) == 6 and out[1][1]["tries"] is tries  # one set of tries serves both budgets
    assert len({t["u"] for t in tries}) == 6
    for (keep, info), b in zip(out, budgets):
        assert keep is not None and keep.macs <= b["macs"]
        above, below = info["bracket_cost"]
        assert above >= b["macs"] > below  # a try on each side of the budget
        assert info["overshoot"] >= 0 and tries[info["chosen_try"]]["support_cost"] == above
    # two tries cannot bracket a budget the first try's support is already far below: refused with a reason
    out = methods.lasso_family(m, batches, F.cross_entropy, [{"macs": int(0.999 * dense)}], steps=8, lr=0.2,
                               u_start=50.0, trials=2)
    keep, info = out[0]
    assert keep is None and "cannot be bracketed" in info["refused"] and "u_start" in info["refused"]
    pruned = methods.prune("lasso", m, [{"macs": int(0.999 * dense)}], batches=batches, loss_fn=F.cross_entropy,
                           steps=8, spp={"kappa": 1.0, "alpha": 0.2, "nu": 1.0, "lam": 1.0},
                           settings={"shared_tries": True, "trials": 2, "u_start": 50.0})
    assert pruned[0].model is None and "refused" in pruned[0].info["search"]
    with pytest.raises(ValueError, match="at least 2 tries"):
        methods.lasso_family(m, batches, F.cross_entropy, budgets, steps=8, lr=0.2, trials=1)
    assert all(float(p.detach().min()) == 1.0 for p in m.mask_parameters().values())  # masks reset


def test_lasso_rank_orders_nonzero_by_magnitude_then_zeroed_entries_by_when():
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    path = methods.lasso_search(m, synthetic_batches(model, 32, n=2), F.cross_entropy, steps=10, lr=0.2, lam=0.6)
    order = path.order("global")
    scores = [float(path.score[path.groups[g].name][e]) for g, e in order]
    assert scores == sorted(scores, reverse=True)
    zeros = [s for s in scores if s < 0]
    assert zeros and all(-1 <= s < 0 for s in zeros)


def test_prune_rejects_bad_methods_and_budgets():
    m = sppbench.attach_masks(tiny_vit())
    with pytest.raises(SppBenchError, match="unknown pruning method"):
        methods.prune("obs", m, [{"fraction": 0.5}], batches=[], loss_fn=F.cross_entropy, steps=1, spp=SPP)
    for bad in ({"fraction": 0.5, "macs": 10}, {"fraction": 1.5}, {"flops": 3}, {"macs": float("nan")}):
        with pytest.raises(BudgetError):
            methods.prune("magnitude", m, [bad], batches=[], loss_fn=F.cross_entropy, steps=1, spp=SPP)


def test_spread_reports_uneven_keep_sets():
    m = sppbench.attach_masks(tiny_vit())
    even = methods.random_path(m, 0).keep(fraction=0.5, readout="per-layer")
    s = methods.spread(even, m.groups)
    assert s["mlp"]["cv"] < 0.05 and s["mlp"]["empty_blocks"] == 0
    masks = {n: torch.zeros_like(v) for n, v in even.masks.items()}
    masks["blocks.0.mlp"][:] = True
    lopsided = sppbench.KeepSet(masks, 0.0, {}, 0, 0)
    s = methods.spread(lopsided, m.groups)
    assert s["mlp"]["empty_blocks"] == 2 and s["mlp"]["max"] == 1.0 and s["mlp"]["cv"] > 1


def test_finetune_lowers_the_loss_and_records_its_recipe():
    torch.manual_seed(0)
    model = tiny_vit()
    batches = synthetic_batches(tiny_vit(seed=3), 32, n=2, batch=16)
    with torch.no_grad():
        before = sum(float(F.cross_entropy(model(x), y)) for x, y in batches)
    rec = finetune(model, batches, steps=30, lr=1e-3, warmup_steps=2, seed=0)
    with torch.no_grad():
        after = sum(float(F.cross_entropy(model(x), y)) for x, y in batches)
    assert after < before
    assert rec["settings"]["optimizer"] == "AdamW" and rec["settings"]["steps"] == 30 and len(rec["losses"]) == 30
    bad = [(torch.full((2, 3, 32, 32), float("nan")), torch.tensor([0, 1]))]
    with pytest.raises(SearchDivergedError):
        finetune(tiny_vit(), bad, steps=2)


# ---------------------------------------------------------------------------------------------
# The registry: every registered method runs through the one interface (a new entry is tested by these)
# ---------------------------------------------------------------------------------------------
from sppbench.methods import registry  # noqa: E402


def test_the_method_lists_are_read_off_the_registry():
    assert methods.METHODS == methods.RANKING_METHODS + methods.PER_BUDGET_METHODS + methods.PEER_METHODS
    assert set(methods.METHODS) == set(registry.names("structured"))
    for name in methods.METHODS:
        m = registry.get(name)
        assert m.summary and m.kind in registry.KINDS["structured"]
        assert (name in methods.DETERMINISTIC_METHODS) == (not m.seeded)
        assert methods.TUNING_KNOBS.get(name) == m.tuning_knob
    with pytest.raises(SppBenchError, match="unknown pruning method 'obs'; known methods: spp, "):
        registry.get("obs")
    with pytest.raises(ValueError, match="needs its 'rank' function"):
        registry.Method("x", "structured", "ranking", "no function")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("spp"))


@pytest.mark.parametrize("name", registry.names("structured"))
def test_every_registered_method_meets_a_macs_budget_through_prune(name):
    if methods.peer_reason(name):
        pytest.skip(f"{name}: {methods.peer_reason(name)}")
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    m = sppbench.attach_masks(model)
    batches = synthetic_batches(model, 32, n=3)
    budget = {"macs": int(m.dense_cost()[1] * 0.6)}
    settings = {"trials": 3} if name == "lasso" else {}
    out = methods.prune(name, m, [budget], batches=batches, loss_fn=F.cross_entropy, steps=6, spp=SPP, seed=1,
                        settings=settings, example_inputs=x[:1])
    assert len(out) == 1 and out[0].method == name
    assert sppbench.core.measure.macs(out[0].model, x[:1]) <= budget["macs"] * 1.02
    assert torch.isfinite(out[0].model(x)).all()


def test_every_registered_llm_method_has_its_statistic_and_comparison():
    from sppbench.methods import llm

    assert llm.LLM_METHODS == ("magnitude", "wanda", "ria", "spp-ria", "sparsegpt")
    assert llm.CONTROL_METHODS == ("ria-perturbed",)
    for m in registry.all_methods("llm"):
        assert m.statistic in ("none", "sq", "gram") and m.compare in ("layer", "row", "block") and m.select
    assert llm.GRAM_METHODS == ("spp-ria", "sparsegpt")
