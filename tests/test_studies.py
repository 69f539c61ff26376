"""The studies behind notebooks 40-70, on a tiny random-init ViT task (the notebooks run them on the embedded models)."""
import itertools
import json

import numpy as np
import pandas as pd

import pytest
import torch

from sppbench import methods, studies
from sppbench.core.path import KeepSet
from sppbench.studies.records import list_records, load_record
from test_vision import tiny_task


def brute_tau(a, b):
    n = len(a)
    s = 0
    for i, j in itertools.combinations(range(n), 2):
        s += 1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1
    return s / (n * (n - 1) / 2)


def test_kendall_tau_matches_the_pair_count():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7, 40):
        a, b = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
        assert studies.kendall_tau(a, b) == pytest.approx(brute_tau(a.tolist(), b.tolist()))
    a = torch.randperm(30, generator=g)
    assert studies.kendall_tau(a, a) == 1.0 and studies.kendall_tau(a, 29 - a) == -1.0
    with pytest.raises(ValueError, match="ties"):
        studies.kendall_tau(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="lengths"):
        studies.kendall_tau(torch.arange(3), torch.arange(4))


def keepset(masks):
    return KeepSet({k: torch.tensor(v, dtype=torch.bool) for k, v in masks.items()}, 0.0, {}, 0, 0)


def test_jaccard_over_all_groups():
    a = keepset({"x": [1, 1, 0, 0], "y": [1, 0]})
    b = keepset({"x": [1, 0, 1, 0], "y": [1, 0]})
    assert studies.jaccard(a, b) == pytest.approx(2 / 4)  # common x0, y0; union x0 x1 x2 y0
    assert studies.jaccard(a, a) == 1.0
    empty = keepset({"x": [0, 0, 0, 0], "y": [0, 0]})
    assert studies.jaccard(empty, empty) == 1.0 and studies.jaccard(a, empty) == 0.0


def test_path_study_nested_keep_sets_path_length_and_entry_matrix(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = studies.PathStudyConfig(models=("embedded-vit",), steps=6, batch_size=8, macs_fractions=(0.8, 0.5, 0.3))
    res = studies.run_path_study(cfg, tasks={"embedded-vit": tiny_task()}, progress=False)
    n = res["nested"]
    assert len(n) == 2 * 3 and n["nested_in_next"].dropna().all()
    assert (n["achieved_fraction"] <= n["macs_fraction"] + 1e-9).all()
    path = res["paths"]["embedded-vit"]
    assert len(path.history) == 6
    # entry matrix: each layer's row holds its entry steps sorted, never-entered (-1) last, padding -2
    for pool in {g.pool for g in path.groups}:
        mat, layers = studies.entry_matrix(path, pool)
        groups = sorted((g for g in path.groups if g.pool == pool), key=lambda g: g.layer)
        assert layers == [g.layer for g in groups]
        for row, g in zip(mat, groups):
            e = path.entry_step[g.name]
            entered = sorted(int(v) for v in e if v >= 0)
            assert row[:len(entered)].tolist() == entered
            assert (row[len(entered):g.size] == -1).all() and (row[g.size:] == -2).all()
    # path length: the first recorded step whose support alone costs the budget
    dense = path.cost_model.cost({g.name: g.size for g in path.groups})[1]
    assert studies.path_length(path, 0) == 1
    assert studies.path_length(path, dense + 1) is None
    rec = load_record(list_records("solution_path", tmp_path)[-1])
    assert rec["params"]["model"] == "embedded-vit" and rec["metrics"]["info"]["pool_sizes"]


def test_seed_study_rows_overlaps_and_rankings(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = studies.SeedStudyConfig(seeds=(0, 1), macs_fractions=(0.6,), steps=3, batch_size=8, lasso_trials=1)
    res = studies.run_seed_study(cfg, task=tiny_task(), progress=False)
    t = res["table"]
    assert len(t) == 2 * 2 and (t["macs_fraction"] <= 0.6 + 1e-9).all()
    assert set(res["jaccard"]["method"]) == {"spp", "lasso"} and res["jaccard"]["mean"].between(0, 1).all()
    k = res["kendall"].set_index("method")
    assert k.loc["lasso", "ranking"].startswith("lasso-rank") and k["mean"].abs().le(1).all()


def test_seed_study_from_the_vision_table_reads_its_keep_sets_and_orders(tmp_path, monkeypatch):
    from sppbench.studies.vision_table import VisionTableConfig, run_vision_table

    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run notebook 10"):
        studies.seed_study_from_table("tiny-vit", ("spp", "lasso"))
    cfg = VisionTableConfig(model="embedded-vit", methods=("spp", "lasso", "lasso-rank", "magnitude"),
                            macs_fractions=(0.8, 0.5), steps=3, batch_size=8, seeds=2, lasso_trials=3,
                            finetune_steps=0, resamples=100)
    vt = run_vision_table(cfg, task=tiny_task(), progress=False)
    with np.load(vt["record"] / "keepsets.npz") as z:
        keeps = {k: z[k] for k in z.files}
    with np.load(vt["record"] / "rankings.npz") as z:
        ranks = {k: z[k] for k in z.files}
    t = vt["table"]
    assert len(keeps) == int((t["method"] != "dense").sum())  # one keep-set per pruned row
    assert {k.rsplit("|", 1)[0] for k in ranks} == {"tiny-vit|spp", "tiny-vit|lasso-rank", "tiny-vit|magnitude"}
    # each saved keep-set is its row's: the larger budget keeps more, and a row read out globally keeps a prefix
    # of its method's saved order
    checked = 0
    for r in t[t["method"].isin(["spp", "magnitude"])].itertuples():
        k = keeps[f"tiny-vit|{r.method}|{r.budget_macs_fraction!r}|{r.seed}"].astype(bool)
        assert k.sum() < keeps[f"tiny-vit|{r.method}|0.8|{r.seed}"].sum() or r.budget_macs_fraction == 0.8
        if r.readout == "global":
            order = ranks[f"tiny-vit|{r.method}|{r.seed}"]
            assert order[k].max() < order[~k].min()
            checked += 1
    assert checked
    res = studies.seed_study_from_table("tiny-vit", ("spp", "lasso"))
    assert res["info"]["source_run"] == vt["record"].name and res["record"] is not None
    rows = res["table"]
    assert len(rows) == int(t["method"].isin(["spp", "lasso"]).sum())
    # the Jaccard equals the one computed from the keep-sets; the Kendall tau the one from the orders
    for _, j in res["jaccard"].iterrows():
        a, b = (keeps[f"tiny-vit|{j['method']}|{j['budget_macs_fraction']!r}|{s}"].astype(bool) for s in (0, 1))
        assert j["mean"] == pytest.approx((a & b).sum() / (a | b).sum()) and j["pairs"] == 1
        ro = t.set_index(["method", "budget_macs_fraction", "seed"])["readout"]
        same = ro[(j["method"], j["budget_macs_fraction"], 0)] == ro[(j["method"], j["budget_macs_fraction"], 1)]
        assert j["same_readout_pairs"] == int(same) and (j["mean_same_readout"] == j["mean"] if same
                                                         else j["mean_same_readout"] is None)
    k = res["kendall"].set_index("method")
    assert k.loc["spp", "mean"] == pytest.approx(studies.kendall_tau(torch.as_tensor(ranks["tiny-vit|spp|0"]),
                                                                     torch.as_tensor(ranks["tiny-vit|spp|1"])))
    assert k.loc["lasso", "ranking"].startswith("lasso-rank")
    with pytest.raises(FileNotFoundError, match="no 'random' rows"):
        studies.seed_study_from_table("tiny-vit", ("random",), vt["record"])


def test_kappa_lambda_cross_design_runs_one_axis_at_a_time(tmp_path, monkeypatch):
    cfg = studies.KappaLambdaConfig(kappas=(5.0, 10.0, 20.0), lams=(0.01, 0.03, 0.045), design="cross")
    assert cfg.cells() == [(5.0, 0.03), (10.0, 0.03), (20.0, 0.03), (10.0, 0.01), (10.0, 0.045)]
    assert len(studies.KappaLambdaConfig(kappas=(5.0, 10.0), lams=(0.01, 0.03)).cells()) == 4  # grid: the product
    with pytest.raises(ValueError, match="design"):
        studies.KappaLambdaConfig(design="diagonal").resolved()
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = studies.KappaLambdaConfig(kappas=(5.0, 10.0), lams=(0.02, 0.05), steps=3, batch_size=8, seeds=(0,),
                                    design="cross")
    res = studies.run_kappa_lambda(cfg, task=tiny_task(), progress=False)
    assert list(zip(res["table"]["kappa"], res["table"]["lam"])) == [(5.0, 0.05), (10.0, 0.05), (10.0, 0.02)]
    assert res["info"]["design"] == "cross" and len(res["info"]["cells"]) == 3


def test_path_study_runs_the_adam_form_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = studies.PathStudyConfig(models=("embedded-vit",), steps=4, batch_size=8, macs_fractions=(0.5,), form="adam")
    res = studies.run_path_study(cfg, tasks={"embedded-vit": tiny_task()}, progress=False)
    c = res["paths"]["embedded-vit"].config
    want = methods.adam_constants("embedded-vit", 4)  # the ViT's step-free setting at 4 steps
    assert c["variant"] == "adam" and c["lr"] == want["lr"] and c["alpha"] == want["alpha"] and c["nu"] == want["nu"]
    rec = load_record(res["records"][0])
    assert rec["params"]["form"] == "adam" and rec["metrics"]["search"]["variant"] == "adam"
    assert rec["metrics"]["path_health"]["search"]["variant"] == "adam"


def test_path_study_model_steps_override_the_steps_per_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = studies.PathStudyConfig(models=("embedded-vit",), steps=4, batch_size=8, macs_fractions=(0.5,), form="adam",
                                  model_steps={"embedded-vit": 6, "embedded-swin": 9})
    res = studies.run_path_study(cfg, tasks={"embedded-vit": tiny_task()}, progress=False)
    path = res["paths"]["embedded-vit"]
    assert path.config["steps"] == 6 and len(path.history) == 6
    assert path.config["lr"] == methods.adam_constants("embedded-vit", 6)["lr"]
    assert load_record(res["records"][0])["params"]["steps"] == 6
    for bad in ({"embedded-vit": 0}, {"embedded-vit": 2.5}, {"embedded-vit": True}, [("embedded-vit", 3)]):
        with pytest.raises(ValueError, match="model_steps"):
            studies.PathStudyConfig(model_steps=bad).resolved()


def test_path_study_runs_the_order_ablation_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = studies.PathStudyConfig(models=("embedded-vit",), steps=4, batch_size=8, macs_fractions=(0.5,),
                                  ablation_fractions=(0.7, 0.5))
    res = studies.run_path_study(cfg, tasks={"embedded-vit": tiny_task()}, progress=False)
    a = res["ablation"]
    assert len(a) == 2 * len(studies.ORDER_ARMS) and set(a["verdict"]) <= {"reference", "better", "worse", "tie"}
    folder = res["records"][0]
    correct = json.loads((folder / "order_ablation_correct.json").read_text())
    assert set(correct) == {f"{arm}@{f}" for arm in studies.ORDER_ARMS for f in (0.7, 0.5)}
    assert load_record(folder)["metrics"]["info"]["order_ablation"][0]["model"] == "embedded-vit"


def test_kappa_lambda_grid(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = studies.KappaLambdaConfig(kappas=(5.0, 10.0), lams=(0.05,), steps=3, batch_size=8, seeds=(0, 1))
    res = studies.run_kappa_lambda(cfg, task=tiny_task(), progress=False)
    t = res["table"]
    assert len(t) == 2 and set(t["kappa"]) == {5.0, 10.0}
    assert t["top1_head_refit"].between(0, 1).all() and t["stability_jaccard"].between(0, 1).all()
    assert list_records("kappa_lambda", tmp_path)
    # span="auto": each cell's alpha and nu follow the rule for its own kappa*lam, from one measurement
    assert t["theta"].tolist() == pytest.approx([0.25, 0.5])
    decay = -np.log(1 - t["theta"]) / (0.8 * cfg.steps)
    assert t["decay_rate"].to_numpy() == pytest.approx(decay.to_numpy())
    assert (t["kappa"] * t["alpha"] / t["nu"]).to_numpy() == pytest.approx(decay.to_numpy())
    lmax = res["info"]["auto"]["measured"]["lambda_max"]
    assert (t["kappa"] * t["alpha"]).to_numpy() == pytest.approx([0.5 / lmax] * 2)
    assert t["tie_share"].between(0, 1).all() and t["entered_fraction"].between(0, 1).all()


def test_kappa_lambda_marks_cells_where_nothing_can_enter(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = studies.KappaLambdaConfig(kappas=(5.0, 20.0), lams=(0.1,), steps=2, batch_size=8, seeds=(0,))
    t = studies.run_kappa_lambda(cfg, task=tiny_task(), progress=False)["table"].set_index("kappa")
    assert t.loc[20.0, "path_healthy"] == False and "never enters" in t.loc[20.0, "degenerate_because"]  # noqa: E712
    assert pd.isna(t.loc[20.0, "top1_head_refit"]) and not pd.isna(t.loc[5.0, "top1_head_refit"])


def test_kappa_lambda_profile_span_keeps_the_old_grid(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = studies.KappaLambdaConfig(kappas=(5.0,), lams=(0.05,), nus=(7.0,), alpha=0.01, span="profile", steps=2,
                                    batch_size=8, seeds=(0,))
    t = studies.run_kappa_lambda(cfg, task=tiny_task(), progress=False)["table"]
    assert t["nu"].tolist() == [7.0] and t["alpha"].tolist() == [0.01] and "decay_rate" not in t


def test_cost_latency_measures_every_model_and_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    peers = ("tp-magnitude",) if methods.peer_reason("tp-magnitude") is None else ()
    cfg = studies.CostLatencyConfig(family_fractions=(0.8, 0.5), steps=2, batch_size=8, lasso_trials=1, step_repeats=1,
                                    latency_fractions=(0.5,), latency_batches=(1, 4), latency_repeats=1, peers=peers,
                                    gpu=False)
    task = tiny_task()
    n_dense = sum(p.numel() for p in task.dense.parameters())
    res = studies.run_cost_latency(cfg, task=task, progress=False)
    lat = res["latency"]
    assert (lat.loc[lat["method"] == "dense", "params"] == n_dense).all()  # timed without mask wrappers
    assert len(lat) == (1 + len(cfg.round_to) + len(peers)) * 2  # dense, SPP as read off and rounded to 8, peers
    assert set(lat.loc[lat["method"].str.startswith("spp"), "round_to"]) == {1, 8}
    pruned = lat[lat["method"] != "dense"]
    assert (pruned["macs_fraction"] <= 0.51).all() and (pruned["macs_reduction"] > 1.9).all()
    dense = lat[lat["method"] == "dense"]
    assert (dense["speedup"] == 1.0).all()
    f = res["family_cost"]
    assert f["budgets"] == 2 and f["lasso_runs"] == 2 and f["ratio_final_runs_only"] > 0
    assert res["search_step"]["ratio"] > 0


@pytest.mark.parametrize("make", [
    lambda: studies.PathStudyConfig(macs_fractions=(0.5, 1.5)),
    lambda: studies.PathStudyConfig(form="lbfgs"),
    lambda: studies.PathStudyConfig(ablation_fractions=(0.0,)),
    lambda: studies.SeedStudyConfig(seeds=(1,)),
    lambda: studies.SeedStudyConfig(seeds=(1, 1, 2)),
    lambda: studies.SeedStudyConfig(methods=("spp", "dessilbi")),
    lambda: studies.KappaLambdaConfig(kappas=()),
    lambda: studies.KappaLambdaConfig(lams=(-1.0,)),
    lambda: studies.KappaLambdaConfig(nus=(5.0,)),
    lambda: studies.KappaLambdaConfig(span="fixed"),
    lambda: studies.CostLatencyConfig(latency_batches=(0,)),
    lambda: studies.CostLatencyConfig(round_to=(0,)),
    lambda: studies.CostLatencyConfig(peers=("sparsegpt",)),
    lambda: studies.PathStudyConfig(steps="60"),
])
def test_bad_study_parameters_are_refused(make):
    with pytest.raises((ValueError, TypeError)):
        make().resolved()
