"""Karpathy-split COCO / Flickr30K caption data: a written miniature round-trips, and every bad input is a
DataError that says what to do."""
from __future__ import annotations

import json

import pytest
import torch

from sppbench.tasks.captions import KARPATHY, CaptionImages, CaptionSet, image_transform, karpathy_paths, load_karpathy, write_miniature
from sppbench.errors import DataError

SIZES = {"train": 6, "val": 2, "test": 4}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A default miniature of each dataset (read-only: tests that damage one write their own)."""
    return {d: write_miniature(tmp_path_factory.mktemp(d), d) for d in KARPATHY}


def load(root, dataset, split="test"):
    ann, images = karpathy_paths(dataset, root)
    return load_karpathy(ann, images, split, dataset)


@pytest.mark.parametrize("dataset", sorted(KARPATHY))
def test_miniature_round_trips_with_the_right_counts(roots, dataset):
    root = roots[dataset]
    ann, images = karpathy_paths(dataset, root)
    assert ann == root / KARPATHY[dataset]["annotation"] and images == root / "images"
    for split, n in SIZES.items():
        data = load_karpathy(ann, images, split, dataset)
        assert isinstance(data, CaptionSet) and (data.name, data.split) == (dataset, split)
        assert len(data) == n and data.n_captions == 5 * n
        assert data.caption_image == [i for i in range(n) for _ in range(5)]
        assert all(c == c.strip() and c for c in data.captions)
        assert all(p.is_file() for p in data.image_paths)
        assert data.pairs() == list(zip(data.caption_image, range(data.n_captions)))
        assert data.captions_of(1) == [5, 6, 7, 8, 9]
        assert data.meta["images"] == n and data.meta["captions"] == 5 * n and data.meta["captions_dropped"] == 0
    raw = json.loads(ann.read_text())
    assert raw["dataset"] == dataset
    assert all(len(e["sentences"]) == 5 and all(s["tokens"] and s["raw"] for s in e["sentences"]) for e in raw["images"])


def test_coco_train_includes_restval_and_uses_its_folders(roots):
    train, restval = load(roots["coco"], "coco", "train"), load(roots["coco"], "coco", "restval")
    assert len(restval) == 2 and set(restval.image_paths) < set(train.image_paths)
    assert train.meta["splits_read"] == ["restval", "train"]
    assert {p.parent.name for p in restval.image_paths} == {"val2014"}
    assert {p.parent.name for p in load(roots["coco"], "coco", "test").image_paths} == {"val2014"}
    assert "train2014" in {p.parent.name for p in train.image_paths}
    flickr = load(roots["flickr30k"], "flickr30k", "test")
    assert {p.parent for p in flickr.image_paths} == {roots["flickr30k"] / "images"}
    with pytest.raises(DataError, match="no images in split 'restval'"):
        load(roots["flickr30k"], "flickr30k", "restval")


def test_environment_variable_is_the_default_root(roots, monkeypatch):
    monkeypatch.setenv("SPPBENCH_FLICKR30K", str(roots["flickr30k"]))
    assert karpathy_paths("flickr30k")[0] == roots["flickr30k"] / "dataset_flickr30k.json"


def test_miniature_is_deterministic(tmp_path):
    a, b = write_miniature(tmp_path / "a", seed=3), write_miniature(tmp_path / "b", seed=3)
    assert (a / "dataset_coco.json").read_text() == (b / "dataset_coco.json").read_text()
    files = sorted(p.relative_to(a) for p in (a / "images").rglob("*.jpg"))
    assert files == sorted(p.relative_to(b) for p in (b / "images").rglob("*.jpg")) and len(files) == 12
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = write_miniature(tmp_path / "c", seed=4)
    assert (c / "dataset_coco.json").read_text() != (a / "dataset_coco.json").read_text()


def test_subset_keeps_the_first_images_and_their_captions(roots):
    data = load(roots["coco"], "coco", "test")
    sub = data.subset(2)
    assert len(sub) == 2 and sub.image_paths == data.image_paths[:2]
    assert sub.captions == data.captions[:10] and sub.caption_image == [0] * 5 + [1] * 5
    assert sub.meta["images"] == 2 and sub.meta["captions"] == 10
    with pytest.raises(ValueError, match="between 1 and 4"):
        data.subset(5)


def test_subset_reindexes_captions_in_any_order():
    data = CaptionSet(["a.jpg", "b.jpg", "c.jpg"], ["c2", "a", "b", "c", "a2"], [2, 0, 1, 2, 0], "x", "test")
    sub = data.subset(2)
    assert sub.captions == ["a", "b", "a2"] and sub.caption_image == [0, 1, 0] and sub.pairs() == [(0, 0), (1, 1), (0, 2)]


def test_images_load_and_transform_to_the_requested_shape(roots):
    data = load(roots["flickr30k"], "flickr30k", "val")
    im = data.load_image(0)
    assert im.mode == "RGB" and max(im.size) == 32
    tf = image_transform(24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = tf(im)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
    images = CaptionImages(data, image_transform(16))
    batch = next(iter(torch.utils.data.DataLoader(images, batch_size=2)))
    assert len(images) == 2 and batch.shape == (2, 3, 16, 16)


def test_more_than_five_captions_are_cut_to_five(tmp_path):
    root = write_miniature(tmp_path, "flickr30k", {"test": 2})
    ann = root / "dataset_flickr30k.json"
    raw = json.loads(ann.read_text())
    raw["images"][0]["sentences"].append({"raw": "a sixth caption", "tokens": ["a", "sixth", "caption"]})
    ann.write_text(json.dumps(raw))
    data = load(root, "flickr30k")
    assert data.n_captions == 10 and "a sixth caption" not in data.captions and data.meta["captions_dropped"] == 1


# ------------------------------------------------------------------ errors


def test_missing_root_says_how_to_set_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SPPBENCH_COCO", raising=False)
    with pytest.raises(DataError, match=r"pass root=\.\.\. or set \$SPPBENCH_COCO.*caption_datasets\.zip"):
        karpathy_paths("coco")
    monkeypatch.setenv("SPPBENCH_COCO", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"nowhere \(from \$SPPBENCH_COCO\) does not exist"):
        karpathy_paths("coco")
    with pytest.raises(DataError, match=r"dataset_coco\.json is missing"):
        karpathy_paths("coco", tmp_path)
    with pytest.raises(DataError, match="pass one of coco, flickr30k"):
        karpathy_paths("flickr8k", tmp_path)


def test_missing_or_broken_annotation_file(tmp_path, roots):
    images = roots["coco"] / "images"
    with pytest.raises(DataError, match="does not exist.*caption_datasets.zip"):
        load_karpathy(tmp_path / "dataset_coco.json", images)
    truncated = tmp_path / "truncated.json"
    truncated.write_text((roots["coco"] / "dataset_coco.json").read_text()[:500])
    with pytest.raises(DataError, match="not valid JSON.*truncated.*fetch it again"):
        load_karpathy(truncated, images)
    (tmp_path / "text.json").write_text("images: none")
    with pytest.raises(DataError, match="not valid JSON"):
        load_karpathy(tmp_path / "text.json", images)


@pytest.mark.parametrize("content, problem", [
    ({"annotations": []}, 'an "images" list'),
    ([1, 2], 'an "images" list'),
    ({"images": [{"split": "test", "sentences": [{"raw": "x"}]}]}, r"images\[0\] has no 'filename'"),
    ({"images": [{"filename": "a.jpg", "split": "test"}]}, r"images\[0\] has no 'sentences'"),
    ({"images": [{"filename": "a.jpg", "sentences": [{"raw": "x"}]}]}, r"images\[0\] has no 'split'"),
    ({"images": [{"filename": "a.jpg", "split": "test", "sentences": []}]}, "has no sentences"),
    ({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"tokens": ["x"]}]}]}, 'without a "raw"'),
])
def test_wrong_schema_is_a_clear_error(tmp_path, content, problem):
    (tmp_path / "ann.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match=f"not a Karpathy-split file.*{problem}"):
        load_karpathy(tmp_path / "ann.json", tmp_path)


def test_unknown_split_and_empty_split(tmp_path, roots):
    ann, images = karpathy_paths("coco", roots["coco"])
    with pytest.raises(DataError, match=r"unknown split 'testing'; pass split= one of train, val, test, restval"):
        load_karpathy(ann, images, "testing")
    root = write_miniature(tmp_path, "coco", {"train": 2, "val": 1, "test": 0})
    with pytest.raises(DataError, match=r"no images in split 'test' \(it holds train: 2, val: 1\)"):
        load(root, "coco", "test")


def test_wrong_dataset_field(roots):
    ann, images = karpathy_paths("flickr30k", roots["flickr30k"])
    with pytest.raises(DataError, match=r"Karpathy file of 'flickr30k', not 'coco': pass dataset='flickr30k'"):
        load_karpathy(ann, images, dataset="coco")
    with pytest.raises(DataError, match="unknown caption dataset 'mscoco'"):
        load_karpathy(ann, images, dataset="mscoco")
    assert load_karpathy(ann, images).name == "flickr30k"  # no dataset given: the file's field names the set


def test_missing_image_root_and_images(tmp_path):
    root = write_miniature(tmp_path, "coco")
    ann = root / "dataset_coco.json"
    with pytest.raises(DataError, match="image folder .*elsewhere does not exist"):
        load_karpathy(ann, tmp_path / "elsewhere")
    test = load(root, "coco", "test")
    for p in test.image_paths[1:3]:
        p.unlink()
    with pytest.raises(DataError, match=r"2 of the 4 images of coco test are missing .*COCO_val2014_") as info:
        load(root, "coco", "test")
    assert str(test.image_paths[1]) in str(info.value) and "cocodataset.org" in str(info.value)
    assert len(load(root, "coco", "val")) == 2  # the other splits are untouched


def test_unreadable_image_is_a_data_error(tmp_path):
    root = write_miniature(tmp_path, "flickr30k", {"test": 1})
    data = load(root, "flickr30k")
    data.image_paths[0].write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot be read.*copy it again"):
        data.load_image(0)
