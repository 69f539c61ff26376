"""Reading budgets off a solution path: ranking, tie-breaks, nesting, achieved budgets, bad budgets."""
from __future__ import annotations

import math

import pytest
import torch

import sppbench
from sppbench.core.path import SolutionPath
from conftest import tiny_vit


def synthetic_path(seed: int = 0, never_frac: float = 0.3, variant: str = "paper") -> SolutionPath:
    """A path over the tiny ViT's real mask groups and cost model, with random entry statistics."""
    m = sppbench.attach_masks(tiny_vit())
    g = torch.Generator().manual_seed(seed)
    entry, V, M, sup = {}, {}, {}, {}
    for grp in m.groups:
        t = torch.randint(1, 40, (grp.size,), generator=g)
        t[torch.rand(grp.size, generator=g) < never_frac] = -1
        entry[grp.name] = t
        V[grp.name] = torch.randn(grp.size, generator=g)
        M[grp.name] = torch.rand(grp.size, generator=g)
        sup[grp.name] = torch.randint(0, 50, (grp.size,), generator=g)
    return SolutionPath(m.groups, entry, V, M, m.cost_model, {"variant": variant}, [], sup, m.info)


def test_ranking_follows_entry_step_then_abs_v_then_abs_m():
    path = synthetic_path()
    order = path.order("global")
    keys = []
    for gi, e in order:
        name = path.groups[gi].name
        t = int(path.entry_step[name][e])
        keys.append((math.inf if t < 0 else t, -abs(float(path.V[name][e])), -abs(float(path.M[name][e]))))
    assert keys == sorted(keys)
    assert len(set(order)) == sum(g.size for g in path.groups)  # a total order over every entry


def test_ties_in_entry_step_are_broken_by_abs_v():
    path = synthetic_path()
    name = path.groups[0].name
    path.entry_step[name][:] = 5
    path.V[name][:] = torch.arange(path.groups[0].size, dtype=torch.float32)  # larger |V| = earlier
    path._orders.clear()
    ranks = path.ranking()[name]
    assert torch.equal(torch.argsort(ranks), torch.arange(path.groups[0].size).flip(0))


def test_official_variant_ranks_by_time_in_support():
    path = synthetic_path(variant="official")
    order = path.order()
    sup = [int(path.support_steps[path.groups[g].name][e]) for g, e in order]
    assert sup == sorted(sup, reverse=True)


@pytest.mark.parametrize("readout", ["global", "per-layer"])
def test_keep_sets_are_nested_across_budgets(readout):
    path = synthetic_path()
    for kind, grid in (("fraction", [0.95, 0.8, 0.6, 0.45, 0.3, 0.1]),):
        keeps = [path.keep(**{kind: v}, readout=readout) for v in grid]
        assert all(small.issubset(big) for small, big in zip(keeps[1:], keeps[:-1]))
    lo, hi = path.smallest()[0], path.dense()[0]
    keeps = [path.keep(params=int(lo + f * (hi - lo)), readout=readout) for f in (0.9, 0.7, 0.5, 0.2)]
    assert all(small.issubset(big) for small, big in zip(keeps[1:], keeps[:-1]))
    lo, hi = path.smallest()[1], path.dense()[1]
    keeps = [path.keep(macs=int(lo + f * (hi - lo)), readout=readout) for f in (0.9, 0.6, 0.3)]
    assert all(small.issubset(big) for small, big in zip(keeps[1:], keeps[:-1]))


def test_fraction_budget_keeps_that_share_of_each_pool():
    path = synthetic_path()
    keep = path.keep(fraction=0.4)
    attn = sum(g.size for g in path.groups if g.pool == "attn")
    mlp = sum(g.size for g in path.groups if g.pool == "mlp")
    assert keep.fractions["attn"] == round(0.4 * attn) / attn
    assert keep.fractions["mlp"] == round(0.4 * mlp) / mlp
    assert keep.request == {"fraction": 0.4}


def test_per_layer_readout_keeps_the_same_share_in_every_group():
    path = synthetic_path()
    keep = path.keep(fraction=0.5, readout="per-layer")
    for g in path.groups:
        assert int(keep.masks[g.name].sum()) == round(0.5 * g.size)


def test_keep_widths_keeps_each_groups_best_ranked_at_the_given_widths():
    """keep_widths: exactly the given width per group, the best-ranked entries inside each group, and the cost of
    another keep-set with those widths, whatever the order (a random order at SPP's widths costs what SPP's does)."""
    path, other = synthetic_path(0), synthetic_path(1)
    ref = other.keep(macs=int(0.5 * path.dense()[1]), readout="global")
    keep = path.keep_widths(ref.widths(), request={"macs": ref.macs})
    assert keep.widths() == ref.widths() and (keep.params, keep.macs) == (ref.params, ref.macs)
    ranks = path.ranking("global")
    for g in path.groups:
        kept, dropped = ranks[g.name][keep.masks[g.name]], ranks[g.name][~keep.masks[g.name]]
        if len(kept) and len(dropped):
            assert int(kept.max()) < int(dropped.min())  # the group's best-ranked entries
    rescored = path.rescored({g.name: -path.ranking("global")[g.name].double() for g in path.groups}, what="same")
    assert rescored.order("global") == path.order("global") and rescored.config["what"] == "same"
    with pytest.raises(sppbench.BudgetError, match="every group"):
        path.keep_widths({path.groups[0].name: 1})
    with pytest.raises(sppbench.BudgetError, match="every group"):
        path.keep_widths({g.name: g.size + 1 for g in path.groups})


@pytest.mark.parametrize("kind,idx", [("params", 0), ("macs", 1)])
def test_achieved_budget_is_within_one_entry_of_the_request(kind, idx):
    path = synthetic_path()
    order = path.order()
    names = [g.name for g in path.groups]
    lo, hi = path.smallest()[idx], path.dense()[idx]
    for f in (0.15, 0.5, 0.85):
        budget = int(lo + f * (hi - lo))
        keep = path.keep(**{kind: budget})
        got = keep.params if kind == "params" else keep.macs
        assert got <= budget
        # the next entry in rank order would not have fitted: the gap is below that entry's cost
        k = sum(int(m.sum()) for m in keep.masks.values())
        widths = keep.widths()
        gi, _ = order[k]
        widths[names[gi]] += 1
        nxt = path.cost_model.cost(widths)[idx]
        assert nxt > budget  # i.e. budget - achieved < the next entry's marginal cost


def test_keep_reports_what_was_achieved_exactly():
    path = synthetic_path()
    keep = path.keep(fraction=0.5)
    assert (keep.params, keep.macs) == path.cost_model.cost(keep.widths())
    total = sum(g.size for g in path.groups)
    assert keep.fraction == sum(keep.widths().values()) / total


def test_bad_budgets_fail_clearly():
    path = synthetic_path()
    for bad in (0.0, -0.2, 1.5, float("nan")):
        with pytest.raises(sppbench.BudgetError):
            path.keep(fraction=bad)
    with pytest.raises(sppbench.BudgetError, match="exactly one budget"):
        path.keep(fraction=0.5, params=10_000)
    with pytest.raises(sppbench.BudgetError, match="exactly one budget"):
        path.keep()
    with pytest.raises(sppbench.BudgetError, match="below the smallest"):
        path.keep(params=path.smallest()[0] - 1)
    with pytest.raises(sppbench.BudgetError, match="below the smallest"):
        path.keep(macs=10)
    with pytest.raises(sppbench.BudgetError, match="readout"):
        path.keep(fraction=0.5, readout="sideways")
    assert path.keep(fraction=1.0).fraction == 1.0


def test_path_save_load_round_trip(tmp_path):
    path = synthetic_path()
    f = path.save(tmp_path / "p.json")
    again = SolutionPath.load(f)
    for budget in (dict(fraction=0.3), dict(params=path.smallest()[0] + 20_000)):
        a, b = path.keep(**budget), again.keep(**budget)
        assert a.summary() == b.summary()
        assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    f.write_text(f.read_text()[:100])
    with pytest.raises(sppbench.SpecError, match="truncated"):
        SolutionPath.load(f)
    with pytest.raises(sppbench.SpecError, match="no solution path"):
        SolutionPath.load(tmp_path / "missing.json")


def test_keepset_serialises():
    from sppbench.core.path import KeepSet

    keep = synthetic_path().keep(fraction=0.6)
    again = KeepSet.from_dict(keep.to_dict())
    assert again.summary() == keep.summary()
    assert all(torch.equal(again.masks[n], keep.masks[n]) for n in keep.masks)


@pytest.mark.parametrize("r", [2, 4, 8])
def test_round_to_gives_multiples_within_budget_in_path_order(r):
    path = synthetic_path()
    dense = path.dense()[1]
    for f in (0.8, 0.5, 0.3):
        plain = path.keep(macs=int(f * dense))
        ks = path.keep(macs=int(f * dense), round_to=r)
        assert ks.macs <= int(f * dense) and ks.request["round_to"] == r
        ranks = path.ranking()
        for g in path.groups:
            kept = ks.masks[g.name]
            n = int(kept.sum())
            assert n % r == 0 or n == g.size, (g.name, n)
            # the kept entries of a group are its best-ranked ones
            if 0 < n < g.size:
                assert ranks[g.name][kept].max() < ranks[g.name][~kept].min()
        # no whole block of r more entries would still fit: the rounding does not waste the budget
        names = [g.name for g in path.groups]
        widths = {n_: int(ks.masks[n_].sum()) for n_ in names}
        for g in path.groups:
            if widths[g.name] < g.size:
                more = {**widths, g.name: min(g.size, widths[g.name] + r)}
                assert path.cost_model.cost(more)[1] > int(f * dense)
        assert ks.macs >= 0.8 * plain.macs  # close to the unrounded read-out


def test_round_to_is_refused_where_it_cannot_apply():
    from sppbench.errors import BudgetError

    path = synthetic_path()
    with pytest.raises(BudgetError, match="round_to needs a params= or macs= budget"):
        path.keep(fraction=0.5, round_to=8)
    with pytest.raises(BudgetError, match="positive integer"):
        path.keep(macs=10**9, round_to=0)
