"""The vision-table runner end to end on a tiny random-init ViT and synthetic images (no assets)."""
from __future__ import annotations

import json

import pytest
import torch

from sppbench import methods
from sppbench.tasks.data import Batches, ImageSet, preprocess
from sppbench.tasks.evaluate import image_batches
from sppbench.studies.vision_table import VisionTableConfig, run_vision_table
from sppbench.tasks.vision import VisionTask
from conftest import tiny_vit


def tiny_task() -> VisionTask:
    model = tiny_vit()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 28, 28), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        labels = model(preprocess(images, 32)).argmax(-1)  # labels the dense model gets right
    data = ImageSet(images, labels, torch.arange(96), "train")
    parts = {"refit": data.subset(range(0, 32)), "val": data.subset(range(32, 64)), "test": data.subset(range(64, 96))}
    return VisionTask("tiny-vit", "test model: tiny random-init ViT, synthetic images", model, 32, 5,
                      lambda bs, steps, seed: Batches(parts["refit"], 32, bs, steps, seed=seed),
                      lambda split: image_batches(parts[split], 32, batch_size=16), 1e-2, {"synthetic": True})


def test_vision_table_runs_every_method_on_the_same_budgets(tmp_path, monkeypatch):
    import numpy as np

    from sppbench.studies.vision_table import STAGES, correct_key, parse_key

    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    names = ("spp", "lasso", "dessilbi", "magnitude", "random")
    if methods.peer_reason("tp-magnitude") is None:
        names += ("tp-magnitude",)
    cfg = VisionTableConfig(model="embedded-vit", methods=names, macs_fractions=(0.8, 0.5), steps=3, batch_size=8,
                            seeds=2, lasso_trials=3, finetune_steps=2, finetune_batch=8, resamples=200)
    res = run_vision_table(cfg, task=tiny_task(), progress=False)
    t = res["table"]
    dense = t[t["method"] == "dense"].iloc[0]
    assert dense["top1_no_retrain"] == 1.0  # labels are the dense model's own predictions
    assert dense["top1_restandardised"] == 1.0  # the identity map for the dense model
    pruned = t[t["method"] != "dense"]
    seeded = [n for n in names if n not in methods.DETERMINISTIC_METHODS]
    lasso_rows = int((pruned["method"] == "lasso").sum())  # a budget no try brackets is refused, never filled
    assert len(pruned) == (len(seeded) - 1) * 2 * 2 + (len(names) - len(seeded)) * 2 + lasso_rows
    assert lasso_rows + len(res["info"]["refused"]) == 2 * 2
    assert set(pruned.loc[pruned["method"] == "magnitude", "seed"]) == {0}
    assert set(pruned.loc[pruned["method"] == "spp", "seed"]) == {0, 1}
    assert (pruned["macs"] <= pruned["target_macs"]).all()
    assert set(pruned.loc[pruned["method"] == "random", "readout"]) == {"per-layer"}
    assert set(pruned.loc[pruned["method"] == "spp", "readout"]) <= {"global", "per-layer"}
    sp = pruned[pruned["method"] == "spp"]
    assert sp.loc[sp["seed"] == 0, "val_head_refit"].notna().all()  # chosen on val at the first seed ...
    assert sp.loc[sp["seed"] == 1, "val_head_refit"].isna().all()  # ... and used as it is at the later seeds
    for frac in (0.8, 0.5):
        assert sp.loc[sp["budget_macs_fraction"] == frac, "readout"].nunique() == 1
    assert (pruned.loc[pruned["method"] == "lasso", "lasso_tries"] == 3).all()  # tries shared by both budgets
    for st in (*STAGES, "finetuned"):
        assert pruned[f"top1_{st}"].between(0, 1).all()
    # per-image records: one array per row and stage, all in the same test-image order, means = the table's
    correct = res["correct"]
    assert len(correct) == len(t) * 4
    assert {len(v) for v in correct.values()} == {32}
    for _, r in t.iterrows():
        for st in (*STAGES, "finetuned"):
            arr = correct[correct_key(r["model"], r["method"], r["budget_macs_fraction"], r["seed"], st)]
            assert arr.dtype == np.uint8 and arr.mean() == pytest.approx(r[f"top1_{st}"], abs=1e-6)
    assert parse_key(correct_key("tiny-vit", "dense", 1.0, 0, "head_refit")) == {
        "model": "tiny-vit", "method": "dense", "budget": 1.0, "seed": 0, "stage": "head_refit"}
    on_disk = np.load(res["record"] / "correct.npz")
    assert sorted(on_disk.files) == sorted(correct) and "tiny-vit|dense|1.0|0|no_retrain" in on_disk.files
    # the summary: mean / sd over seeds (ddof = 1) and the paired statistics against spp
    s = res["summary"]
    rnd = s[s["method"] == "random"]
    assert (rnd["seeds"] == 2).all() and "top1_finetuned_sd" in s
    one = t[(t["method"] == "random") & (t["budget_macs_fraction"] == 0.5)]["top1_head_refit"]
    assert float(rnd[rnd["budget_macs_fraction"] == 0.5]["top1_head_refit_sd"].iloc[0]) == pytest.approx(one.std(ddof=1))
    assert s.loc[s["method"] == "magnitude", "top1_head_refit_sd"].isna().all()  # one seed: no spread claimed
    spp_rows = s[s["method"] == "spp"]
    assert (spp_rows["verdict_head_refit"] == "reference").all()
    for st in (*STAGES, "finetuned"):
        for _, r in s[~s["method"].isin(["spp", "dense"])].iterrows():
            ref = s[(s["method"] == "spp") & (s["budget_macs_fraction"] == r["budget_macs_fraction"])].iloc[0]
            assert r[f"delta_{st}"] == pytest.approx(r[f"top1_{st}"] - ref[f"top1_{st}"], abs=1e-6)
            assert r[f"delta_{st}_lo"] <= r[f"delta_{st}"] <= r[f"delta_{st}_hi"]
            assert r[f"verdict_{st}"] in ("better", "worse", "tie") and 0 <= r[f"mcnemar_p_{st}"] <= 1
    assert isinstance(res["sanity"], list)
    fc = res["info"]["family_cost"]
    assert fc["family_size"] == 5 and 0 < fc["ratio_final_runs_only"] and fc["lasso_tries_recorded"] == 3
    rec = json.loads((res["record"] / "metrics.json").read_text())
    assert rec["info"]["readout_rule"].startswith("per method and budget") and len(rec["rows"]) == len(t)
    assert len(rec["info"]["summary"]) == len(s) and rec["info"]["test_images"] == 32


def test_vision_table_rejects_bad_parameters():
    with pytest.raises(TypeError):
        VisionTableConfig(steps="10").resolved()
    with pytest.raises(Exception, match="unknown pruning method"):
        VisionTableConfig(methods=("spp", "obd")).resolved()
    with pytest.raises(ValueError, match="macs_fractions"):
        VisionTableConfig(macs_fractions=(0.5, 1.5)).resolved()
    with pytest.raises(ValueError, match="readout"):
        VisionTableConfig(readout="best").resolved()
    with pytest.raises(ValueError, match="put 'spp' before it"):
        VisionTableConfig(methods=("spp-final-m", "spp")).resolved()


def test_order_arms_read_spp_own_search_at_the_same_budgets(tmp_path, monkeypatch):
    """The order arms reuse SPP's search of their seed: final |M| / |V| re-rank that path (their rankings are its
    entries sorted by |M| / |V|), and random-spp-widths keeps exactly SPP's per-layer widths, so the same MACs."""
    import numpy as np

    from sppbench.studies.vision_table import keep_key, rank_key

    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = VisionTableConfig(model="embedded-vit", methods=("spp", "spp-final-m", "spp-final-v", "random-spp-widths",
                                                           "random"),
                            macs_fractions=(0.8, 0.5), steps=4, batch_size=8, seeds=2, resamples=200)
    res = run_vision_table(cfg, task=tiny_task(), progress=False)
    t, info = res["table"], res["info"]
    assert set(info["order_arms"]) == {"spp-final-m", "spp-final-v", "random-spp-widths"}
    assert {k for k in info["search_seconds"] if not k.startswith(("spp@", "random@"))} == {
        f"{a}@seed{s}" for a in info["order_arms"] for s in (0, 1)}
    assert all(info["search_seconds"][f"{a}@seed{s}"] == 0.0 for a in info["order_arms"] for s in (0, 1))
    keeps = np.load(res["record"] / "keepsets.npz")
    ranks = np.load(res["record"] / "rankings.npz")
    for seed in (0, 1):
        path = res["paths"][f"spp@seed{seed}"]
        for arm, stat in (("spp-final-m", path.M), ("spp-final-v", path.V)):
            score = torch.cat([stat[n].abs() for n in sorted(stat)]).double()  # rankings.npz: groups by name
            ranked = score[torch.argsort(torch.as_tensor(ranks[rank_key("tiny-vit", arm, seed)]))]
            assert bool((ranked[:-1] >= ranked[1:]).all())  # the arm's order is the path's entries by |M| / |V|
        for frac in (0.8, 0.5):
            row = lambda m: t[(t["method"] == m) & (t["seed"] == seed) & (t["budget_macs_fraction"] == frac)].iloc[0]
            assert row("random-spp-widths")["macs"] == row("spp")["macs"]
            assert row("random-spp-widths")["readout"] == "widths"
            spp_keep = keeps[keep_key("tiny-vit", "spp", frac, seed)]
            rnd_keep = keeps[keep_key("tiny-vit", "random-spp-widths", frac, seed)]
            assert spp_keep.sum() == rnd_keep.sum()
            offsets = np.cumsum([0] + [g.size for g in sorted(path.groups, key=lambda g: g.name)])
            for a, b in zip(offsets[:-1], offsets[1:]):  # the same width in every group
                assert spp_keep[a:b].sum() == rnd_keep[a:b].sum()
    s = res["summary"]
    arms = s[s["method"].isin(list(info["order_arms"]))]
    assert len(arms) == 3 * 2 and arms["verdict_head_refit"].isin(["better", "worse", "tie"]).all()


def test_a_peer_that_cannot_prune_the_family_is_skipped_with_its_reason(tmp_path, monkeypatch):
    pytest.importorskip("torch_pruning")
    from conftest import tiny_swin

    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    task = tiny_task()
    task.dense, task.name = tiny_swin(), "tiny-swin"
    cfg = VisionTableConfig(methods=("magnitude", "tp-magnitude"), macs_fractions=(0.6,), steps=2, batch_size=8,
                            finetune_steps=1, finetune_batch=8, resamples=100)
    res = run_vision_table(cfg, task=task, progress=False)
    assert "SwinTransformer" in res["info"]["skipped"]["tp-magnitude"]
    assert set(res["table"]["method"]) == {"dense", "magnitude"}


def test_adam_constants_are_written_free_of_the_step_count():
    vit = methods.adam_constants("embedded-vit")  # the setting chosen on the embedded ViT, at its 160 steps
    assert vit == {"variant": "adam", "kappa": 10.0, "alpha": 3.0, "nu": 2000.0, "lam": 0.09, "lr": 0.03}
    assert methods.ADAM_FORM == vit
    for model in ("embedded-vit", "embedded-swin", "some-other-model"):
        s = methods.adam_setting(model)
        for n in (7, 160, 640):
            c = methods.adam_constants(model, n)
            assert c["lr"] * n == pytest.approx(s["travel"])
            # a mask held at 1 enters after held_entry of the steps: kappa*alpha/nu * held_entry * n = kappa*lam
            assert c["kappa"] * c["alpha"] / c["nu"] * s["held_entry"] * n == pytest.approx(c["kappa"] * c["lam"])
    assert methods.adam_setting("some-other-model") == methods.ADAM_FORMS["default"]
    assert methods.adam_setting("embedded-swin")["travel"] < methods.adam_setting("embedded-vit")["travel"]
    with pytest.raises(ValueError, match="steps"):
        methods.adam_constants("embedded-vit", 0)
    with pytest.raises(Exception, match="unknown SPP form"):
        methods.spp_search_constants("official", {})


def test_vision_table_spp_rows_use_their_form_and_the_baselines_keep_the_paper_step(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    kw = dict(model="embedded-vit", methods=("spp", "lasso"), macs_fractions=(0.6,), steps=3, batch_size=8,
              lasso_trials=2, finetune_steps=0, finetune_batch=8, seeds=1, resamples=100)
    res = run_vision_table(VisionTableConfig(**kw), task=tiny_task(), progress=False)  # embedded default: adam
    info, t = res["info"], res["table"]
    assert info["spp_form"] == "adam" and info["spp_search_constants"] == methods.adam_constants("embedded-vit", 3)
    assert info["search_configs"]["spp@seed0"]["variant"] == "adam"
    assert res["path_health"]["spp@seed0"]["variant"] == "adam"
    assert set(t.loc[t["method"] == "spp", "form"]) == {"adam"} and t.loc[t["method"] != "spp", "form"].isna().all()
    paper = info["spp_constants"]  # Lasso's step is kappa*alpha of the paper-form constants, never the adam form's
    assert info["search_configs"]["lasso@seed0"][0]["search"]["lr"] == pytest.approx(paper["kappa"] * paper["alpha"])
    assert set(res["summary"].query("method == 'spp'")["form"]) == {"adam"}
    res = run_vision_table(VisionTableConfig(**{**kw, "methods": ("spp",), "spp_form": "paper"}), task=tiny_task(),
                           progress=False)
    assert res["info"]["search_configs"]["spp@seed0"]["variant"] == "paper"
    assert set(res["table"].query("method == 'spp'")["form"]) == {"paper"}
    assert VisionTableConfig(model="deit_small_patch16_224").form == "paper"  # paper models: the paper form
    with pytest.raises(ValueError, match="spp_form"):
        VisionTableConfig(spp_form="official").resolved()


def _synthetic(acc: dict, n: int = 2000, seed: int = 0):
    """A table and per-image arrays with the given accuracies: {(method, budget): [p per seed]}."""
    import numpy as np
    import pandas as pd

    from sppbench.studies.vision_table import correct_key

    rng = np.random.default_rng(seed)
    rows, correct = [], {}
    base = rng.random(n)
    for (method, budget), ps in acc.items():
        for sd, p in enumerate(ps):
            arr = (base < p).astype(np.uint8)  # nested: a higher p is right on a superset of images
            flip = rng.random(n) < 0.02
            arr[flip] = 1 - arr[flip]
            correct[correct_key("m", method, budget, sd, "head_refit")] = arr
            rows.append({"model": "m", "method": method, "seed": sd, "budget_macs_fraction": budget,
                         "top1_head_refit": float(arr.mean())})
    return pd.DataFrame(rows), correct


def test_sanity_checks_flag_a_pruned_row_beating_dense_and_accuracy_rising_as_the_budget_shrinks():
    from sppbench.studies.vision_table import sanity_checks, summarize

    table, correct = _synthetic({("dense", 1.0): [0.80], ("spp", 0.7): [0.78, 0.79, 0.78],
                                 ("spp", 0.5): [0.74, 0.75, 0.74], ("odd", 0.7): [0.70, 0.70, 0.71],
                                 ("odd", 0.5): [0.90, 0.90, 0.90]})
    fails = sanity_checks(table, correct, resamples=300)
    kinds = {(f["check"], f["method"], f["budget"]) for f in fails}
    assert kinds == {("pruned beats dense", "odd", 0.5), ("accuracy rises as the budget shrinks", "odd", 0.5)}
    assert all(f["lo"] > 0 and f["message"] for f in fails)
    s = summarize(table, correct, resamples=300)
    odd = s[(s["method"] == "odd")].set_index("budget_macs_fraction")
    # three seeds: the intervals exclude zero, but a claim needs stats.MIN_SEEDS_FOR_A_CLAIM seeds per random side
    assert odd.loc[0.5, "delta_head_refit_lo"] > 0 and odd.loc[0.7, "delta_head_refit_hi"] < 0
    assert odd.loc[0.5, "verdict_head_refit"] == "tie" and odd.loc[0.7, "verdict_head_refit"] == "tie"
    assert odd.loc[0.5, "mcnemar_p_head_refit"] < 0.01
    five, correct5 = _synthetic({("dense", 1.0): [0.80], ("spp", 0.7): [0.78, 0.79, 0.78, 0.79, 0.78],
                                 ("odd", 0.7): [0.70, 0.70, 0.71, 0.70, 0.71], ("spp", 0.5): [0.74] * 5,
                                 ("odd", 0.5): [0.90] * 5})
    odd = summarize(five, correct5, resamples=300).query("method == 'odd'").set_index("budget_macs_fraction")
    assert odd.loc[0.5, "verdict_head_refit"] == "better" and odd.loc[0.7, "verdict_head_refit"] == "worse"
    healthy, correct = _synthetic({("dense", 1.0): [0.80], ("spp", 0.7): [0.78, 0.79, 0.78],
                                   ("spp", 0.5): [0.74, 0.75, 0.74]})
    assert sanity_checks(healthy, correct, resamples=300) == []


def test_two_methods_with_the_same_keep_set_are_flagged():
    from sppbench.studies.vision_table import _identical_rows

    d = {("dessilbi", 0, 0.5): "abc", ("magnitude", 0, 0.5): "abc", ("spp", 0, 0.5): "def",
         ("dessilbi", 1, 0.5): "abc"}
    out = _identical_rows(d)
    assert out == {("dessilbi", 0, 0.5): "magnitude", ("magnitude", 0, 0.5): "dessilbi"}
