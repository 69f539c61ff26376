"""The vision-table runner end to end on a tiny random-init ViT and synthetic images (no assets)."""
from __future__ import annotations

import json

import pytest
import torch

from sppbench import methods
from sppbench.data import Batches, ImageSet, preprocess
from sppbench.vision import VisionTableConfig, VisionTask, _imageset_loader, run_vision_table, summarize
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
                      lambda split: _imageset_loader(parts[split], 32, batch_size=16), 1e-2, {"synthetic": True})


def test_vision_table_runs_every_method_on_the_same_budgets(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    names = ("spp", "lasso", "dessilbi", "random")
    if methods.peer_reason("tp-magnitude") is None:
        names += ("tp-magnitude",)
    cfg = VisionTableConfig(model="embedded-vit", methods=names, macs_fractions=(0.8, 0.5), steps=3, batch_size=8,
                            random_seeds=2, lasso_trials=2, finetune_steps=2, finetune_batch=8)
    res = run_vision_table(cfg, task=tiny_task(), progress=False)
    t = res["table"]
    dense = t[t["method"] == "dense"].iloc[0]
    assert dense["top1_no_retrain"] == 1.0  # labels are the dense model's own predictions
    pruned = t[t["method"] != "dense"]
    assert len(pruned) == (len(names) + 1) * 2  # random: two seeds
    assert (pruned["macs"] <= pruned["target_macs"]).all()
    assert set(pruned.loc[pruned["method"] == "random", "readout"]) == {"per-layer"}
    assert set(pruned.loc[pruned["method"] == "spp", "readout"]) <= {"global", "per-layer"}
    assert pruned.loc[pruned["method"] == "spp", "val_head_refit"].notna().all()  # chosen on val
    assert (pruned.loc[pruned["method"] == "lasso", "lasso_tries"] == 2).all()
    for col in ("top1_no_retrain", "top1_head_refit", "top1_finetuned"):
        assert pruned[col].between(0, 1).all()
    fc = res["info"]["family_cost"]
    assert fc["family_size"] == 5 and 0 < fc["ratio_final_runs_only"]
    s = summarize(t)
    rnd = s[s["method"] == "random"]
    assert (rnd["seeds"] == 2).all() and "top1_finetuned_sd" in s
    rec = json.loads((res["record"] / "metrics.json").read_text())
    assert rec["info"]["readout_rule"].startswith("per budget") and len(rec["rows"]) == len(t)


def test_vision_table_rejects_bad_parameters():
    with pytest.raises(TypeError):
        VisionTableConfig(steps="10").resolved()
    with pytest.raises(Exception, match="unknown pruning method"):
        VisionTableConfig(methods=("spp", "obd")).resolved()
    with pytest.raises(ValueError, match="macs_fractions"):
        VisionTableConfig(macs_fractions=(0.5, 1.5)).resolved()
    with pytest.raises(ValueError, match="readout"):
        VisionTableConfig(readout="best").resolved()


def test_a_peer_that_cannot_prune_the_family_is_skipped_with_its_reason(tmp_path, monkeypatch):
    pytest.importorskip("torch_pruning")
    from conftest import tiny_swin

    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    task = tiny_task()
    task.dense, task.name = tiny_swin(), "tiny-swin"
    cfg = VisionTableConfig(methods=("magnitude", "tp-magnitude"), macs_fractions=(0.6,), steps=2, batch_size=8,
                            finetune_steps=1, finetune_batch=8)
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
              lasso_trials=1, finetune_steps=0, finetune_batch=8)
    res = run_vision_table(VisionTableConfig(**kw), task=tiny_task(), progress=False)  # embedded default: adam
    info, t = res["info"], res["table"]
    assert info["spp_form"] == "adam" and info["spp_search_constants"] == methods.adam_constants("embedded-vit", 3)
    assert info["search_configs"]["spp@seed0"]["variant"] == "adam"
    assert res["path_health"]["spp@seed0"]["variant"] == "adam"
    assert set(t.loc[t["method"] == "spp", "form"]) == {"adam"} and t.loc[t["method"] != "spp", "form"].isna().all()
    paper = info["spp_constants"]  # Lasso's step is kappa*alpha of the paper-form constants, never the adam form's
    assert info["search_configs"]["lasso@seed0"][0]["search"]["lr"] == pytest.approx(paper["kappa"] * paper["alpha"])
    assert set(summarize(t).query("method == 'spp'")["form"]) == {"adam"}
    res = run_vision_table(VisionTableConfig(**{**kw, "methods": ("spp",), "spp_form": "paper"}), task=tiny_task(),
                           progress=False)
    assert res["info"]["search_configs"]["spp@seed0"]["variant"] == "paper"
    assert set(res["table"].query("method == 'spp'")["form"]) == {"paper"}
    assert VisionTableConfig(model="deit_small_patch16_224").form == "paper"  # paper models: the paper form
    with pytest.raises(ValueError, match="spp_form"):
        VisionTableConfig(spp_form="official").resolved()
