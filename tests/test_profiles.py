"""The paper profile's code path, offline: configs, the same architectures random-init (tiny and full
size), budgets read off a path at the paper's MAC ratios, ImageNet folder checks on a miniature."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sppbench
from sppbench.tasks import profiles
from sppbench.errors import DataError, SppBenchError, UnsupportedModelError

SPP = {"kappa": 10.0, "alpha": 0.02, "nu": 10.0, "lam": 0.05}


@pytest.mark.parametrize("name", profiles.PAPER_MODELS)
def test_paper_configs_hold_budgets_recipe_and_data_settings(name):
    cfg = profiles.paper_config(name)
    assert cfg["model"] == name and cfg["profile"] == "paper"
    assert cfg["budgets"] and all(0 < b["macs"] < cfg["dense_reported"]["gmacs"] * 1e9 for b in cfg["budgets"])
    ft = cfg["finetune"]
    assert ft["optimizer"] == "AdamW" and ft["epochs"] == 300 and ft["weight_decay"] == 0.05
    assert ft["lr"] == pytest.approx(1e-4 * ft["batch_size"] / 512)
    assert cfg["search"]["epochs"] == 40
    assert cfg["data"]["env"] == "SPPBENCH_IMAGENET"


def test_deit_small_profile_has_the_papers_2p6_gmacs_budget():
    assert {"macs": 2_600_000_000} in profiles.paper_config("deit_small_patch16_224")["budgets"]


def test_unknown_paper_model_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="paper profiles"):
        profiles.paper_config("resnet50")


@pytest.mark.parametrize("name", profiles.PAPER_MODELS)
def test_full_size_architecture_costs_match_the_reported_dense_macs(name):
    cfg = profiles.paper_config(name)
    model = profiles.paper_model(cfg, pretrained=False)
    m = sppbench.attach_masks(model)
    params, macs = m.cost()
    rep = cfg["dense_reported"]
    assert macs / 1e9 == pytest.approx(rep["gmacs"], rel=0.04)
    assert params / 1e6 == pytest.approx(rep["params_m"], rel=0.02)
    # every paper budget is reachable from a path on this architecture, and nested
    path = sppbench.SolutionPath(m.groups, {g.name: torch.arange(g.size) for g in m.groups},
                                 {g.name: torch.zeros(g.size) for g in m.groups},
                                 {g.name: torch.ones(g.size) for g in m.groups}, m.cost_model)
    keeps = [path.keep(macs=b["macs"]) for b in sorted(cfg["budgets"], key=lambda b: -b["macs"])]
    for k, b in zip(keeps, sorted(cfg["budgets"], key=lambda b: -b["macs"])):
        assert b["macs"] * 0.97 <= k.macs <= b["macs"]
    assert all(a.issubset(b) for a, b in zip(keeps[1:], keeps[:-1]))


@pytest.mark.parametrize("name", profiles.PAPER_MODELS)
def test_tiny_paper_architecture_runs_the_whole_pipeline(name, tmp_path):
    cfg = profiles.paper_config(name)
    model = profiles.paper_model(cfg, tiny=True)
    assert type(model).__name__ in ("VisionTransformer", "VisionTransformerDistilled", "SwinTransformer")
    size = cfg["tiny_test_overrides"]["img_size"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(8, 3, size, size, generator=g)
    y = model(x).argmax(-1)
    m = sppbench.attach_masks(model)
    path = sppbench.search(m, [(x, y)], F.cross_entropy, steps=5, **SPP)
    ratio = max(b["macs"] for b in cfg["budgets"]) / (cfg["dense_reported"]["gmacs"] * 1e9)
    keep = path.keep(macs=int(ratio * m.cost()[1]))
    small = sppbench.compress(m, keep)
    m.set_masks(keep)
    with torch.no_grad():
        assert (small(x) - m(x)).abs().max() < 1e-5
    back = sppbench.load_pruned(sppbench.save_pruned(small, tmp_path / "pruned"))
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def test_paper_run_stops_at_once_without_imagenet_or_gpus(monkeypatch, tmp_path):
    cfg = profiles.paper_config("deit_small_patch16_224")
    monkeypatch.delenv("SPPBENCH_IMAGENET", raising=False)
    with pytest.raises(SppBenchError) as err:
        profiles.check_ready(cfg)
    msg = str(err.value)
    assert "SPPBENCH_IMAGENET" in msg and "GPU" in msg
    with pytest.raises(DataError, match="train"):
        profiles.imagenet_root(tmp_path, cfg)
    with pytest.raises(DataError, match="does not exist"):
        profiles.paper_model(cfg, weights_file=str(tmp_path / "missing.safetensors"))


def _miniature_imagenet(root, classes=("n01", "n02"), per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{c}_{i}.JPEG")
    return root


def test_imagenet_task_reads_a_miniature_folder_with_the_same_layout(tmp_path):
    cfg = dict(profiles.paper_config("deit_tiny_patch16_224"))
    cfg["img_size"] = 32
    root = _miniature_imagenet(tmp_path / "imagenet")
    model = profiles.paper_model(cfg, tiny=True)
    task = profiles.imagenet_task(cfg, root, model=model, eval_batch=3, workers=0, val_per_class=1, refit_per_class=1)
    assert task.info["val_from_train"] == 2 and task.info["refit_images"] == 2 and task.info["test_images"] == 8
    x, y = next(iter(task.train_batches(2, 3, 0)))
    assert x.shape == (2, 3, 32, 32) and y.shape == (2,)
    assert len(list(task.train_batches(2, 3, 0))) == 3
    xs = [b[0] for b in task.loader("test")]
    assert sum(len(b) for b in xs) == 8
    from sppbench.studies.vision_table import evaluate

    ev = evaluate(model, task, ("val", "test"))
    assert 0 <= ev["test_head_refit"] <= 1 and 0 <= ev["val_no_retrain"] <= 1


def test_the_paper_model_lists_have_one_source_the_noxfile_reads():
    from pathlib import Path

    from sppbench import paper_plan
    from sppbench.tasks.profiles import CLIP_PAPER_MODELS, PAPER_MODELS

    assert PAPER_MODELS is paper_plan.VISION and CLIP_PAPER_MODELS is paper_plan.CLIP
    nox_text = (Path(__file__).parent.parent / "noxfile.py").read_text()
    assert '"sppbench" / "paper_plan.py"' in nox_text and "deit_small_patch16_224" not in nox_text
