"""Image-caption data for CLIP retrieval: COCO and Flickr30K in the Karpathy splits.

The annotation files are Karpathy's ``dataset_coco.json`` and ``dataset_flickr30k.json`` (both in
https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip). The images are not in that
zip: COCO's come from https://cocodataset.org (``train2014.zip`` and ``val2014.zip``), Flickr30K's from
https://shannon.cs.illinois.edu/DenotationGraph/ (``flickr30k-images``). Nothing is downloaded here.

The folder layout ``karpathy_paths`` expects (one root per dataset)::

    <coco root>/dataset_coco.json
    <coco root>/images/train2014/COCO_train2014_000000000009.jpg ...
    <coco root>/images/val2014/COCO_val2014_000000000042.jpg ...

    <flickr30k root>/dataset_flickr30k.json
    <flickr30k root>/images/1000092795.jpg ...

i.e. an image is at ``<root>/images/<filepath>/<filename>``, where ``filepath`` is the entry's
``"filepath"`` field (COCO only; Flickr30K entries have none, so its images lie directly in ``images/``).
The root is the ``root`` argument, else ``$SPPBENCH_COCO`` / ``$SPPBENCH_FLICKR30K``.
``write_miniature`` writes a tiny synthetic copy of the same layout, for tests.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import DataError

KARPATHY = {
    "coco": {"annotation": "dataset_coco.json", "test_images": 5000},
    "flickr30k": {"annotation": "dataset_flickr30k.json", "test_images": 1000},
}
KARPATHY_ENV = {"coco": "SPPBENCH_COCO", "flickr30k": "SPPBENCH_FLICKR30K"}
KARPATHY_SPLITS = ("train", "val", "test", "restval")
CAPTIONS_PER_IMAGE = 5
IMAGES_DIR = "images"
HOW_TO_GET = {
    "coco": (
        "COCO needs Karpathy's dataset_coco.json (in https://cs.stanford.edu/people/karpathy/deepimagesent/"
        "caption_datasets.zip) and the COCO 2014 images (train2014.zip, val2014.zip from https://cocodataset.org), "
        f"laid out as <root>/dataset_coco.json and <root>/{IMAGES_DIR}/train2014/*.jpg, <root>/{IMAGES_DIR}/val2014/*.jpg; "
        f"pass root=... or set ${KARPATHY_ENV['coco']}=<root>."
    ),
    "flickr30k": (
        "Flickr30K needs Karpathy's dataset_flickr30k.json (in https://cs.stanford.edu/people/karpathy/deepimagesent/"
        "caption_datasets.zip) and the flickr30k-images (https://shannon.cs.illinois.edu/DenotationGraph/), laid out "
        f"as <root>/dataset_flickr30k.json and <root>/{IMAGES_DIR}/*.jpg; pass root=... or set "
        f"${KARPATHY_ENV['flickr30k']}=<root>."
    ),
}
GENERIC_HOW_TO = ("pass a Karpathy-split file (dataset_coco.json or dataset_flickr30k.json, from "
                  "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip)")
# CLIP's (OpenAI) normalisation, the default of image_transform
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SHOWN = 5  # how many missing image paths an error lists


@dataclass
class CaptionSet:
    """Images (by path) and their captions: caption ``j`` describes image ``caption_image[j]``.

    ``meta`` records where the set came from (annotation file, image root, splits read) and its counts.
    """

    image_paths: list[Path]
    captions: list[str]
    caption_image: list[int]
    name: str
    split: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        """The number of images."""
        return len(self.image_paths)

    @property
    def n_captions(self) -> int:
        """The number of captions (up to ``CAPTIONS_PER_IMAGE`` per image for a loaded set)."""
        return len(self.captions)

    def captions_of(self, image: int) -> list[int]:
        """The indices of the captions of one image."""
        return [j for j, i in enumerate(self.caption_image) if i == image]

    def pairs(self) -> list[tuple[int, int]]:
        """(image index, caption index) training pairs, one per caption."""
        return [(i, j) for j, i in enumerate(self.caption_image)]

    def subset(self, n_images: int) -> "CaptionSet":
        """The first ``n_images`` images with all their captions (caption indices renumbered from 0)."""
        if not 1 <= n_images <= len(self):
            raise ValueError(f"n_images must be between 1 and {len(self)} (the images in this set), got {n_images}")
        keep = [j for j, i in enumerate(self.caption_image) if i < n_images]
        meta = {**self.meta, "images": n_images, "captions": len(keep), "subset_of": len(self)}
        return CaptionSet(self.image_paths[:n_images], [self.captions[j] for j in keep],
                          [self.caption_image[j] for j in keep], self.name, self.split, meta)

    def load_image(self, i: int):
        """Image ``i`` as an RGB ``PIL.Image``; a DataError if its file is missing or unreadable."""
        from PIL import Image, UnidentifiedImageError

        path = self.image_paths[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"image {i} of {self.name} {self.split} ({path}) cannot be read ({exc}); the file is "
                            f"missing, truncated or not an image: copy it again from the original dataset") from exc


def _how_to(dataset) -> str:
    return HOW_TO_GET.get(dataset, GENERIC_HOW_TO) if isinstance(dataset, str) else GENERIC_HOW_TO


def _check_dataset_name(dataset: str) -> None:
    if dataset not in KARPATHY:
        raise DataError(f"unknown caption dataset {dataset!r}; pass one of {', '.join(KARPATHY)}")


def karpathy_paths(dataset: str, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(annotation file, image root) of ``dataset`` ('coco' or 'flickr30k') under its root folder.

    The root is ``root``, else ``$SPPBENCH_COCO`` / ``$SPPBENCH_FLICKR30K``; it must hold the annotation
    file, and the images under ``<root>/images`` (layout in the module docstring). The images themselves
    are checked by ``load_karpathy``.
    """
    _check_dataset_name(dataset)
    env = KARPATHY_ENV[dataset]
    given = root if root is not None else os.environ.get(env)
    if not given:
        raise DataError(f"no {dataset} folder given: pass root=... or set ${env}. {HOW_TO_GET[dataset]}")
    folder = Path(given).expanduser()
    where = "the root argument" if root is not None else f"${env}"
    if not folder.is_dir():
        raise DataError(f"the {dataset} folder {folder} (from {where}) does not exist; point it at the folder "
                        f"holding {KARPATHY[dataset]['annotation']}. {HOW_TO_GET[dataset]}")
    annotation = folder / KARPATHY[dataset]["annotation"]
    if not annotation.is_file():
        raise DataError(f"{annotation} is missing (root from {where}). {HOW_TO_GET[dataset]}")
    return annotation, folder / IMAGES_DIR


def _read_json(file: Path, dataset: str | None) -> dict:
    if not file.is_file():
        raise DataError(f"the annotation file {file} does not exist; {_how_to(dataset)}")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{file} is not valid JSON ({exc}); it is truncated or not a Karpathy-split file: "
                        f"fetch it again. {_how_to(dataset)}") from exc
    except OSError as exc:
        raise DataError(f"{file} cannot be read ({exc}). {_how_to(dataset)}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{file} is not a Karpathy-split file: expected a JSON object with an \"images\" list. "
                        f"{_how_to(dataset)}")
    return data


def _check_entries(file: Path, images: list, dataset: str | None) -> None:
    """Every entry must be an object with a string filename and split and a non-empty list of sentences,
    each sentence an object with a string "raw"."""
    for k, entry in enumerate(images):
        if not isinstance(entry, dict):
            problem = "is not a JSON object"
        elif missing := [key for key in ("filename", "sentences", "split") if key not in entry]:
            problem = f"has no {', '.join(repr(m) for m in missing)}"
        elif not all(isinstance(entry.get(key, ""), str) for key in ("filename", "split", "filepath")):
            problem = "has a non-string \"filename\", \"split\" or \"filepath\""
        elif not isinstance(entry["sentences"], list) or not entry["sentences"]:
            problem = "has no sentences (\"sentences\" must be a non-empty list)"
        elif not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in entry["sentences"]):
            problem = "has a sentence without a \"raw\" string"
        else:
            continue
        raise DataError(f"{file} is not a Karpathy-split file: images[{k}] {problem} (every entry needs \"filename\", "
                        f"\"split\" and \"sentences\" with \"raw\" text). {_how_to(dataset)}")


def load_karpathy(annotation_file: str | os.PathLike, image_root: str | os.PathLike, split: str = "test",
                  dataset: str | None = None, *, captions_per_image: int = CAPTIONS_PER_IMAGE) -> CaptionSet:
    """One Karpathy split of COCO or Flickr30K as a CaptionSet.

    ``split`` is 'test', 'val', 'train' or 'restval'. Following Karpathy's convention, 'train' means the
    "train" entries *plus* the "restval" ones (COCO: 82,783 + 30,504 = 113,287 images; Flickr30K has no
    restval); 'restval' alone gives only those. The standard test splits are 5,000 (COCO) and 1,000
    (Flickr30K) images (``KARPATHY[...]["test_images"]``).

    Images are at ``image_root / filepath / filename`` (``filepath`` only where the entry has one, i.e. COCO);
    every one of them must exist. Captions are the sentences' "raw" text, stripped, the first
    ``captions_per_image`` (5, the standard 5k/1k retrieval protocol: some COCO images have 6 or 7) of each
    image; ``meta["captions_dropped"]`` counts the rest. ``dataset`` ('coco' / 'flickr30k'), when given,
    must match the file's "dataset" field. Every problem is a DataError saying what to fix.
    """
    if dataset is not None:
        _check_dataset_name(dataset)
    if split not in KARPATHY_SPLITS:
        raise DataError(f"unknown split {split!r}; pass split= one of {', '.join(KARPATHY_SPLITS)} "
                        f"('train' includes 'restval')")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")
    file = Path(annotation_file).expanduser()
    data = _read_json(file, dataset)
    declared = data.get("dataset")
    if dataset is not None and declared is not None and declared != dataset:
        hint = (f"pass dataset={declared!r}" if declared in KARPATHY else "pass the right annotation file")
        raise DataError(f"{file} is the Karpathy file of {declared!r}, not {dataset!r}: {hint}, or the "
                        f"{KARPATHY[dataset]['annotation']} file. {HOW_TO_GET[dataset]}")
    name = dataset or (declared if isinstance(declared, str) else file.stem)
    entries = data["images"]
    _check_entries(file, entries, dataset or declared)
    wanted = {"train", "restval"} if split == "train" else {split}
    chosen = [e for e in entries if e["split"] in wanted]
    if not chosen:
        counts: dict[str, int] = {}
        for e in entries:
            counts[e["split"]] = counts.get(e["split"], 0) + 1
        found = ", ".join(f"{s}: {n}" for s, n in sorted(counts.items())) or "no images at all"
        raise DataError(f"{file} has no images in split {split!r} (it holds {found}); pass another split or the "
                        f"full annotation file. {_how_to(dataset or declared)}")

    root = Path(image_root).expanduser()
    if not root.is_dir():
        raise DataError(f"the image folder {root} does not exist; pass the folder the entries' filepath/filename "
                        f"are relative to. {_how_to(dataset or declared)}")
    paths = [root / (e.get("filepath") or "") / e["filename"] for e in chosen]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:_SHOWN]) + (", ..." if len(missing) > _SHOWN else "")
        raise DataError(f"{len(missing)} of the {len(paths)} images of {name} {split} are missing under {root} "
                        f"(e.g. {shown}); copy the full image folders there. {_how_to(dataset or declared)}")

    captions: list[str] = []
    caption_image: list[int] = []
    dropped = 0
    for i, e in enumerate(chosen):
        sentences = e["sentences"]
        dropped += max(0, len(sentences) - captions_per_image)
        for s in sentences[:captions_per_image]:
            captions.append(s["raw"].strip())
            caption_image.append(i)
    meta = {"annotation": str(file), "image_root": str(root), "dataset": name, "split": split,
            "splits_read": sorted(wanted), "images": len(paths), "captions": len(captions),
            "captions_dropped": dropped, "captions_per_image": captions_per_image, "file_images": len(entries)}
    return CaptionSet(paths, captions, caption_image, name, split, meta)


# ------------------------------------------------------------------ miniature (tests, examples)

_COLOURS = {"red": (200, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (230, 210, 40),
            "white": (245, 245, 245), "black": (15, 15, 15), "purple": (140, 50, 170), "orange": (240, 140, 30)}
_SHAPES = ("circle", "square", "triangle")
_TEMPLATES = ("A {c} {s} on a {b} background.", "a {s} coloured {c} in front of {b}", "There is a {c} {s} here ",
              "A picture of one {c} {s} over a {b} field.", "  {b} image showing a {c} {s}.")
DEFAULT_MINIATURE = {"train": 6, "val": 2, "test": 4}


def _draw(rng: random.Random, size: int):
    """A small RGB image (one shape on a plain background) and the words describing it."""
    from PIL import Image, ImageDraw

    names = list(_COLOURS)
    back, colour = rng.sample(names, 2)
    shape = rng.choice(_SHAPES)
    w, h = (size, max(1, size * 3 // 4))
    if rng.random() < 0.5:  # portrait or landscape, as photographs are
        w, h = h, w
    im = Image.new("RGB", (w, h), _COLOURS[back])
    d = ImageDraw.Draw(im)
    x0, y0 = rng.randint(0, w // 3), rng.randint(0, h // 3)
    x1, y1 = rng.randint(2 * w // 3, w - 1), rng.randint(2 * h // 3, h - 1)
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=_COLOURS[colour])
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=_COLOURS[colour])
    else:
        d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=_COLOURS[colour])
    return im, {"c": colour, "s": shape, "b": back}


def _tokens(raw: str) -> list[str]:
    return [t.strip(".,") for t in raw.lower().split() if t.strip(".,")]


def write_miniature(folder: str | os.PathLike, dataset: str = "coco", n_per_split: dict | None = None,
                    size: int = 32, seed: int = 0) -> Path:
    """Write a tiny synthetic COCO / Flickr30K in the layout ``karpathy_paths`` reads; returns its root.

    ``n_per_split`` (default ``{"train": 6, "val": 2, "test": 4}``) gives the images per split as
    ``load_karpathy`` will return them. For COCO, unless it has a "restval" key, the last third of the
    'train' images are written as "restval" (so ``split="train"`` still returns ``n_per_split["train"]``);
    an explicit "restval" count is written on top of "train". As in the real files, COCO's train images
    are in ``train2014/``, its val/test/restval images in ``val2014/``, and Flickr30K's directly in
    ``images/``; entries are shuffled. Each image has 5 sentences ("raw" and "tokens") and is a ``size``-pixel
    (longer side) JPEG of one coloured shape. The same ``seed`` writes the same files.
    """
    _check_dataset_name(dataset)
    counts = dict(DEFAULT_MINIATURE if n_per_split is None else n_per_split)
    unknown = set(counts) - set(KARPATHY_SPLITS)
    if unknown or any(not isinstance(n, int) or n < 0 for n in counts.values()):
        raise ValueError(f"n_per_split maps {', '.join(KARPATHY_SPLITS)} to image counts >= 0, got {counts}")
    if dataset == "flickr30k" and counts.get("restval"):
        raise ValueError("Flickr30K has no 'restval' split; leave it out of n_per_split")
    if dataset == "coco" and "restval" not in counts:
        counts["restval"] = counts.get("train", 0) // 3
        counts["train"] = counts.get("train", 0) - counts["restval"]
    rng = random.Random(seed)
    splits = [s for s in KARPATHY_SPLITS for _ in range(counts.get(s, 0))]
    rng.shuffle(splits)
    root = Path(folder)
    images_dir = root / IMAGES_DIR
    entries = []
    sentid = 0
    for imgid, split in enumerate(splits):
        cocoid = 100000 + 37 * imgid + rng.randint(0, 36)
        if dataset == "coco":
            filepath = "train2014" if split == "train" else "val2014"
            filename = f"COCO_{filepath}_{cocoid:012d}.jpg"
            target = images_dir / filepath / filename
        else:
            filepath, filename = None, f"{1000000000 + cocoid}.jpg"
            target = images_dir / filename
        im, words = _draw(rng, size)
        target.parent.mkdir(parents=True, exist_ok=True)
        im.save(target, format="JPEG", quality=90)
        sentences = []
        for template in _TEMPLATES:
            raw = template.format(**words)
            sentences.append({"tokens": _tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        entry = {"filename": filename, "imgid": imgid, "sentences": sentences,
                 "sentids": [s["sentid"] for s in sentences], "split": split}
        if dataset == "coco":
            entry = {"filepath": filepath, **entry, "cocoid": cocoid}
        entries.append(entry)
    root.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(exist_ok=True)
    (root / KARPATHY[dataset]["annotation"]).write_text(json.dumps({"images": entries, "dataset": dataset}))
    return root


# ------------------------------------------------------------------ images as tensors

def _to_rgb(image):
    return image.convert("RGB")


def image_transform(size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD) -> Callable:
    """PIL image -> float tensor (3, size, size): shorter side resized to ``size`` (bicubic, as CLIP),
    centre crop, scaled to [0, 1], normalised by ``mean`` / ``std`` (CLIP's by default)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class CaptionImages(torch.utils.data.Dataset):
    """The images of a CaptionSet, transformed (e.g. by ``image_transform``), in order: for embedding
    the images in evaluation batches. Captions are tokenised by the caller."""

    def __init__(self, data: CaptionSet, transform: Callable):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.data.load_image(i))
