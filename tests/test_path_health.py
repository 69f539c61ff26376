"""Path health: fractional entry times, the diagnostics that flag a degenerate path, auto constants."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import sppbench
from conftest import synthetic_batches, tiny_vit
from sppbench.core.dynamics import SLBI
from sppbench.errors import SpecError
from sppbench.core.path import HEALTH_LIMITS, SolutionPath


def test_fractional_entry_time_orders_entries_that_enter_at_the_same_step():
    # every entry has the same held-up push, slightly graded: all cross lam within one step of each other
    m = torch.nn.Parameter(torch.ones(4))
    opt = SLBI([m], kappa=1.0, alpha=1.0, nu=10.0, lam=0.25)
    push = torch.tensor([-1.00, -1.01, -1.02, -1.03])
    for _ in range(6):
        m.grad = push.clone()
        opt.step()
    st = opt.state[m]
    steps, times = st["entry_step"], st["entry_time"]
    assert (steps > 0).all() and len(set(steps.tolist())) == 1, steps  # an integer-step tie ...
    t = steps[0].item()
    assert ((times > t - 1) & (times <= t)).all(), times
    assert times.tolist() == sorted(times.tolist(), reverse=True), times  # ... ordered by the push: strongest first
    assert len(set(times.tolist())) == 4


def test_fractional_entry_time_interpolates_the_crossing():
    m = torch.nn.Parameter(torch.ones(1))
    opt = SLBI([m], kappa=1.0, alpha=0.1, nu=1.0, lam=0.25)
    vs = [0.0]
    while opt.state.get(m, {}).get("entry_step", torch.tensor([-1]))[0] < 0:
        m.grad = torch.zeros(1)
        opt.step()
        vs.append(float(opt.state[m]["V"][0]))
    st = opt.state[m]
    t = int(st["entry_step"][0])
    want = (t - 1) + (0.25 - vs[t - 1]) / (vs[t] - vs[t - 1])
    assert float(st["entry_time"][0]) == pytest.approx(want, abs=1e-6)


def _path(steps=20, **kw):
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    consts = dict(kappa=5.0, alpha=0.5, nu=50.0, lam=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return m, sppbench.search(m, synthetic_batches(model, 32, n=3), F.cross_entropy, steps=steps,
                                  **{**consts, **kw})


def test_ranking_uses_the_fractional_time_and_old_paths_still_load(tmp_path):
    _, path = _path()
    assert path.has_entry_time
    rows = path.entries_table()
    entered = [r for r in rows if r["entry_step"] > 0]
    assert entered and all(r["entry_step"] - 1 <= r["entry_time"] <= r["entry_step"] for r in entered)
    ranked = sorted(entered, key=lambda r: r["rank"])
    assert [r["entry_time"] for r in ranked] == sorted(r["entry_time"] for r in ranked)
    d = path.to_dict()
    d.pop("entry_time")  # a path written before entry times existed
    f = tmp_path / "old.json"
    f.write_text(json.dumps(d))
    old = SolutionPath.load(f)
    assert not old.has_entry_time
    assert torch.equal(old.entry_time[path.groups[0].name], path.entry_step[path.groups[0].name].double())
    assert old.diagnostics()["fractional_entry_time"] is False
    bad = path.to_dict()
    g = path.groups[0].name
    bad["entry_time"][g] = [-1.0] * len(bad["entry_time"][g])
    bad["entry_step"][g] = [3] * len(bad["entry_step"][g])
    with pytest.raises(SpecError, match="disagree"):
        SolutionPath.from_dict(bad)


def test_health_is_watched_as_the_search_runs():
    """Entries entering all at once are warned at the step they do (not only at the end) and kept in the path's
    config with that step; the step really is one at which more than the limit's share of all entries entered."""
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    with pytest.warns(RuntimeWarning, match="search health: .* of all entries entered at step"):
        path = sppbench.search(m, synthetic_batches(model, 32, n=3), F.cross_entropy, steps=12, kappa=10.0,
                               alpha=0.09, nu=1.0, lam=0.05)
    watch = path.config["health_watch"]
    ev = [e for e in watch["events"] if e["kind"] == "entered_at_once"]
    assert len(ev) == 1 and watch["dense_loss"] == pytest.approx(path.history[0]["loss"])
    total = sum(g.size for g in path.groups)
    at = sum(int((path.entry_step[g.name] == ev[0]["step"]).sum()) for g in path.groups)
    assert at / total == pytest.approx(ev[0]["value"], abs=1e-6) and at / total > HEALTH_LIMITS["max_step_share"]
    for step in range(1, ev[0]["step"]):  # the first such step: no earlier one passed the limit
        n = sum(int((path.entry_step[g.name] == step).sum()) for g in path.groups)
        assert n / total <= HEALTH_LIMITS["max_step_share"]


def test_health_watch_warns_each_kind_once_at_its_step():
    from sppbench.core.path import HealthWatch

    w = HealthWatch(100)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for step, (loss, entered) in enumerate([(1.0, 0), (2.0, 5), (3.5, 1), (9.0, 20), (1.0, 0)], 1):
            w.check(step, loss, entered)
    assert [(e["kind"], e["step"]) for e in w.events] == [("loss_above_limit", 3), ("entered_at_once", 4)]
    assert len(got) == 2 and all(issubclass(x.category, RuntimeWarning) for x in got)
    assert w.state["dense_loss"] == 1.0 and w.events[0]["value"] == pytest.approx(3.5)


def test_diagnostics_flag_a_collapsed_path():
    # a huge coupling decay: every mask falls towards 0 together and enters in the same step or two
    _, path = _path(steps=12, kappa=10.0, alpha=0.09, nu=1.0, lam=0.05)
    d = path.diagnostics()
    assert d["applicable"] and not d["healthy"]
    assert d["max_step_share"] > HEALTH_LIMITS["max_step_share"]
    assert any("entered at step" in p for p in d["problems"])
    # budgets: their keep-sets come from the tie-break, and the diagnostics say so
    assert all(b["by_order"] is not None for b in d["budgets"])
    assert min(b["by_order"] for b in d["budgets"]) < 0.5
    # the record carries it and warns
    from sppbench.studies.common import path_health

    with pytest.warns(RuntimeWarning, match="degenerate"):
        h = path_health(path, name="collapsed")
    assert h["problems"] == d["problems"]


def test_diagnostics_figures_are_consistent():
    _, path = _path(steps=30)
    d = path.diagnostics(limits={"max_step_share": 1.0, "min_entered": 0.0, "max_loss_ratio_half": 1e9})
    assert d["healthy"] and d["problems"] == []
    assert 0 < d["entered"] <= 1 and d["entered_count"] == round(d["entered"] * d["entries"])
    assert d["first"] <= d["t10"] <= d["t50"] <= d["t90"] <= d["last"] <= 30
    assert d["spread_steps"] == pytest.approx(d["t90"] - d["t10"])
    assert d["loss_start"] == path.history[0]["loss"]
    keep = path.keep(fraction=0.5, readout="per-layer")
    (b,) = path.diagnostics([keep])["budgets"]
    assert b["readout"] == "per-layer" and b["kept"] == sum(int(k.sum()) for k in keep.masks.values())
    assert 0 <= b["by_order"] <= 1 and b["by_order"] + b["by_tie_break"] == pytest.approx(1)
    # a score-ranked path (a baseline) has no entry order to judge
    scored = SolutionPath(path.groups, path.entry_step, path.V, path.M, path.cost_model, path.config,
                          path.history, score={g.name: torch.rand(g.size) for g in path.groups})
    assert scored.diagnostics() == {"applicable": False, "rank_by": "score", "entries": d["entries"]}


def test_auto_constants_are_the_default_and_recorded(tmp_path):
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    batches = synthetic_batches(model, 32, n=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the tiny model may not be holdable in 15 steps
        path = sppbench.search(m, batches, F.cross_entropy, steps=15)
    c = path.config
    assert c["constants"] == "auto"
    meas, implied = c["auto"]["measured"], c["auto"]["implied"]
    with torch.no_grad():  # measured on the search's own first batches, at the dense model
        dense = [float(F.cross_entropy(model(x), y)) for x, y in batches[:meas["batches"]]]
    assert meas["lambda_max"] > 0 and meas["grad_rms"] > 0
    assert meas["loss_dense"] == pytest.approx(sum(dense) / len(dense), rel=1e-5)
    # the derived constants: loss step at half the stability limit, unheld entries enter at 0.8 of the steps
    a = c["kappa"] * c["alpha"]
    assert a == pytest.approx(0.5 / meas["lambda_max"])
    assert implied["unheld_entry_step"] == pytest.approx(0.8 * 15)
    assert c["kappa"] * c["lam"] == pytest.approx(0.9) and "0.5/lambda_max" in c["auto"]["rule"]
    assert isinstance(implied["can_hold"], bool) and implied["steps_to_hold"] > 0
    # the same search run again gives the same constants and path (the measurement is deterministic)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        again = sppbench.search(m, batches, F.cross_entropy, steps=15)
    assert {k: again.config[k] for k in ("kappa", "alpha", "nu", "lam")} == {k: c[k] for k in ("kappa", "alpha", "nu", "lam")}
    assert all(torch.equal(again.entry_step[n], path.entry_step[n]) for n in path.entry_step)
    # the measurement does not shift the data: batch 1 of the search is the first batch
    with torch.no_grad():
        first = float(F.cross_entropy(model(batches[0][0]), batches[0][1]))
    assert path.history[0]["loss"] == pytest.approx(first, rel=1e-5)


def test_auto_constants_warn_when_the_model_cannot_be_held():
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    with pytest.warns(RuntimeWarning, match="steps to keep this model"):
        path = sppbench.search(m, synthetic_batches(model, 32, n=2), F.cross_entropy, steps=3)
    assert path.config["auto"]["implied"]["can_hold"] is False


def test_constants_are_all_given_or_all_derived():
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    b = synthetic_batches(model, 32, n=2)
    with pytest.raises(ValueError, match="need all four"):
        sppbench.search(m, b, F.cross_entropy, steps=2, kappa=5.0, lam=0.05)
    with pytest.raises(ValueError, match="derives kappa"):
        sppbench.search(m, b, F.cross_entropy, steps=2, constants="auto", kappa=5.0)
    with pytest.raises(ValueError, match="paper form"):
        sppbench.search(m, b, F.cross_entropy, steps=2, variant="official")
    with pytest.raises(ValueError, match="'auto' or 'given'"):
        sppbench.search(m, b, F.cross_entropy, steps=2, constants="magic")


def test_auto_constants_resume_from_the_checkpoint(tmp_path):
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    b = synthetic_batches(model, 32, n=3)
    ck = tmp_path / "s.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full = sppbench.search(m, b, F.cross_entropy, steps=8)
        class Stop(Exception):
            pass

        def stop(step, loss, opt):
            if step == 5:
                raise Stop

        with pytest.raises(Stop):
            sppbench.search(m, b, F.cross_entropy, steps=8, checkpoint=ck, checkpoint_every=4, callback=stop)
        resumed = sppbench.search(m, b, F.cross_entropy, steps=8, checkpoint=ck, resume=True)
    assert resumed.config["auto"]["implied"] == full.config["auto"]["implied"]
    assert resumed.config["resumed_at"] == [4]
    assert all(torch.equal(resumed.entry_step[n], full.entry_step[n]) for n in full.entry_step)
    assert all(torch.allclose(resumed.entry_time[n], full.entry_time[n]) for n in full.entry_time)


def test_records_carry_the_health_and_every_path(tmp_path, monkeypatch):
    import pandas as pd

    from sppbench.studies.common import write_record

    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    _, good = _path(steps=20)
    _, bad = _path(steps=12, kappa=10.0, alpha=0.09, nu=1.0, lam=0.05)
    with pytest.warns(RuntimeWarning, match="degenerate"):
        folder = write_record("health_test", {"x": 1}, good, pd.DataFrame([{"a": 1}]), {},
                              paths={"spp@seed0": bad})
    metrics = json.loads((folder / "metrics.json").read_text())
    h = metrics["path_health"]
    assert set(h) == {"search", "spp@seed0"}
    assert h["spp@seed0"]["healthy"] is False and h["spp@seed0"]["problems"]
    assert (folder / "path.csv").is_file() and (folder / "history.json").is_file()
    assert (folder / "paths" / "spp@seed0.csv").is_file()
    hist = json.loads((folder / "paths" / "spp@seed0.history.json").read_text())
    assert [r["loss"] for r in hist] == [r["loss"] for r in bad.history]
    header = (folder / "paths" / "spp@seed0.csv").read_text().splitlines()[0]
    assert "entry_time" in header.split(",")


def test_order_ablation_reads_one_search_four_ways():
    from sppbench.studies import ORDER_ARMS, order_ablation, order_variants
    from test_vision import tiny_task

    task = tiny_task()
    m = sppbench.attach_masks(task.dense, input_size=(3, task.img_size, task.img_size))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            path = sppbench.search(m, task.train_batches(16, 15, 0), F.cross_entropy, steps=15,
                                   kappa=5.0, alpha=0.5, nu=50.0, lam=0.05)
        arms = order_variants(path)
        assert tuple(arms) == ORDER_ARMS
        # the |V| and |M| arms rank by those statistics alone
        v_path = arms["final-abs-V"][0]
        assert v_path.rank_by == "score"
        first = v_path.order()[0]
        g = path.groups[first[0]].name
        assert float(path.V[g][first[1]].abs()) == max(float(t.abs().max()) for t in path.V.values())
        rows, per_example = order_ablation(m, path, task, (0.7, 0.5))
        assert len(rows) == 2 * len(ORDER_ARMS) and set(per_example) == {f"{a}@{f}" for a in ORDER_ARMS for f in (0.7, 0.5)}
        n = rows[0]["n_test"]
        assert all(len(v) == n and set(v) <= {0, 1} for v in per_example.values())
        for r in rows:  # every arm meets the same budget and reports its agreement with the entry order
            assert r["achieved_fraction"] <= r["budget_macs_fraction"] + 1e-9
            assert 0 <= r["jaccard_with_entry_order"] <= 1
            assert r["top1_head_refit"] == pytest.approx(sum(per_example[f"{r['arm']}@{r['budget_macs_fraction']}"]) / n)
        assert [r["jaccard_with_entry_order"] for r in rows if r["arm"] == "entry-order"] == [1.0, 1.0]
        # each arm is paired against the entry order at its budget, on the same test images
        for r in rows:
            if r["arm"] == "entry-order":
                assert r["verdict"] == "reference"
                continue
            ref = [x for x in rows if x["arm"] == "entry-order" and x["budget_macs_fraction"] == r["budget_macs_fraction"]][0]
            assert r["delta_vs_entry_order"] == pytest.approx(r["top1_head_refit"] - ref["top1_head_refit"])
            assert r["delta_lo"] <= r["delta_vs_entry_order"] <= r["delta_hi"] and 0 <= r["mcnemar_p"] <= 1
            assert r["verdict"] in ("better", "worse", "tie")
    finally:
        m.detach_masks()


def test_search_takes_an_slbi_subclass_and_records_it(tmp_path):
    class HalfStep(SLBI):  # a research variant: the paper form with every gradient halved
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(0.5)
            return super().step(closure)

    model = tiny_vit()
    m = sppbench.attach_masks(model)
    batches = synthetic_batches(model, 32, n=2)
    consts = dict(kappa=10.0, alpha=0.05, nu=1.0, lam=0.05)
    plain = sppbench.search(m, batches, F.cross_entropy, steps=4, **consts)
    half = sppbench.search(m, batches, F.cross_entropy, steps=4, **consts, slbi=HalfStep)
    assert "slbi" not in plain.config and half.config["slbi"].endswith("HalfStep")
    assert any(not torch.equal(plain.M[n], half.M[n]) for n in plain.M)  # the subclass's step ran
    with pytest.raises(TypeError, match="subclass"):
        sppbench.search(m, batches, F.cross_entropy, steps=2, **consts, slbi=torch.optim.SGD)
    # a checkpoint of one variant does not resume as another
    ck = tmp_path / "s.pt"
    sppbench.search(m, batches, F.cross_entropy, steps=2, **consts, slbi=HalfStep, checkpoint=ck, checkpoint_every=1)
    with pytest.raises(SpecError, match="slbi"):
        sppbench.search(m, batches, F.cross_entropy, steps=3, **consts, checkpoint=ck, resume=True)


def test_adam_form_steps_m_by_adam_on_the_papers_gradient():
    from sppbench.core.dynamics import check_constants

    m = torch.nn.Parameter(torch.ones(3))
    opt = SLBI([m], kappa=10.0, alpha=2.0, nu=100.0, lam=0.09, variant="adam", lr=0.05)
    m.grad = torch.tensor([-1.0, 0.0, 1.0])
    opt.step()
    # first Adam step: -lr * sign(grad + (M - Gamma) / nu); V moves by (alpha / nu) (M - Gamma) of the old iterate
    total = torch.tensor([-1.0, 0.0, 1.0]) + 1.0 / 100.0
    assert torch.allclose(m.detach(), 1 - 0.05 * total.sign(), atol=1e-6)
    assert torch.allclose(opt.state[m]["V"], torch.full((3,), 2.0 / 100.0))
    with pytest.raises(ValueError, match="needs lr"):
        check_constants(10.0, 2.0, 100.0, 0.09, "adam")
    with pytest.raises(ValueError, match="adam form"):
        check_constants(10.0, 2.0, 100.0, 0.09, "paper", lr=0.1)


def test_adam_form_through_search_records_and_resumes_only_as_itself(tmp_path):
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    batches = synthetic_batches(model, 32, n=2)
    consts = dict(kappa=10.0, alpha=2.0, nu=200.0, lam=0.09)
    path = sppbench.search(m, batches, F.cross_entropy, steps=6, variant="adam", lr=0.05, **consts)
    assert path.config["variant"] == "adam" and path.config["lr"] == 0.05 and path.rank_by == "entry"
    with pytest.raises(ValueError, match="needs lr"):
        sppbench.search(m, batches, F.cross_entropy, steps=2, variant="adam", **consts)
    with pytest.raises(ValueError, match="only then"):
        sppbench.search(m, batches, F.cross_entropy, steps=2, lr=0.05, **consts)
    from sppbench import methods

    via = methods.ranking("spp", m, batches, F.cross_entropy, steps=6, spp={**consts, "variant": "adam", "lr": 0.05})
    assert all(torch.equal(via.entry_step[n], path.entry_step[n]) for n in path.entry_step)
    ck = tmp_path / "a.pt"
    sppbench.search(m, batches, F.cross_entropy, steps=2, variant="adam", lr=0.05, **consts, checkpoint=ck,
                    checkpoint_every=1)
    with pytest.raises(SpecError, match="lr"):
        sppbench.search(m, batches, F.cross_entropy, steps=3, variant="adam", lr=0.1, **consts, checkpoint=ck,
                        resume=True)


def _spearman(a, b) -> float:
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_adam_form_orders_planted_importance():
    """A one-block ViT whose 64 MLP units have planted output scales over a decade (tools/path_probes.py planted:
    their single-unit ablation effects are the known importance), distillation loss, full batch. The adam form's
    entry order must follow that importance (Spearman >= 0.8), at least 95% of the planted units must enter, and
    the model must hold. The setting (400 steps, lr 0.01, nu 6000, alpha/nu 0.0015) was chosen on this planted
    problem (8 tried: 0.54-0.84, docs/path_health.md); the paper form with auto constants reaches 0.43 here, so
    this pins the variant's behaviour, it is not evidence for an automatic rule."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from path_probes import planted_problem

    m, x, target, name, effect = planted_problem()
    steps = 400
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        path = sppbench.search(m, [(x, target)] * steps, F.cross_entropy, steps=steps, kappa=10.0, alpha=9.0,
                               nu=6000.0, lam=0.09, variant="adam", lr=0.01)
    et = path.entry_time[name].clone()
    assert float((et >= 0).double().mean()) >= 0.95  # (almost) every planted unit entered
    et[et < 0] = float("inf")  # never entered: last
    rho = _spearman([-e for e in effect], et.tolist())  # larger effect -> earlier entry
    assert rho >= 0.8, rho
    d = path.diagnostics()
    assert d["loss_ratio_half"] is not None and d["loss_ratio_half"] < 1.1  # the model holds while the path forms
    assert _spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)  # the rank correlation itself
