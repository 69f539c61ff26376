"""Datasets. The embedded default: Fashion-MNIST from the four standard idx files.

Where the files are looked for, in order: the ``root`` argument, the ``SPPBENCH_FASHION_MNIST``
environment variable, Debian's ``dataset-fashion-mnist`` package location. Nothing is downloaded.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

FASHION_ENV = "SPPBENCH_FASHION_MNIST"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
HOW_TO_GET = (
    "Fashion-MNIST needs the four idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; .gz or not) in one folder. Either: "
    "(a) on Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` (installs them in "
    "/usr/share/datasets/fashion-mnist); or (b) download them from "
    "https://github.com/zalandoresearch/fashion-mnist (data/fashion) and set "
    f"{FASHION_ENV}=/path/to/folder (or pass root=...)."
)


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the Fashion-MNIST idx files, or a DataError saying how to get them."""
    candidates = []
    if root is not None:
        candidates.append(("the root argument", Path(root)))
    elif os.environ.get(FASHION_ENV):
        candidates.append((f"${FASHION_ENV}", Path(os.environ[FASHION_ENV])))
    else:
        candidates.append(("the Debian package location", DEBIAN_FASHION))
    for where, folder in candidates:
        if all(_find(folder, name) for split in FASHION_FILES.values() for name in split[:2]):
            return folder
        missing = [n for s in FASHION_FILES.values() for n in s[:2] if not _find(folder, n)]
        raise DataError(f"Fashion-MNIST not found in {folder} ({where}); missing {missing}. {HOW_TO_GET}")
    raise AssertionError  # pragma: no cover


def _find(folder: Path, name: str) -> Path | None:
    for cand in (folder / name, folder / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def read_idx(file: Path) -> np.ndarray:
    """Read one idx file (gzip or raw), checking its header against its length."""
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{file} cannot be read ({exc}); it is corrupt or truncated: fetch it again. {HOW_TO_GET}") from exc
    if len(data) < 8:
        raise DataError(f"{file} is too short to be an idx file; fetch it again. {HOW_TO_GET}")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(f"{file} is not an idx file of unsigned bytes (bad magic); fetch it again. {HOW_TO_GET}")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(f"{file} is truncated or padded: header says {dims} ({expected} bytes), found "
                        f"{len(data) - offset} bytes; fetch it again. {HOW_TO_GET}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


@dataclass
class ImageSet:
    """uint8 images (n, 28, 28) and int64 labels (n,), with the ids of the rows they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    split: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows) -> "ImageSet":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return ImageSet(self.images[rows], self.labels[rows], self.index[rows], self.split)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ImageSet:
    """The full Fashion-MNIST ``train`` (60k) or ``test`` (10k) split."""
    if split not in FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = fashion_mnist_root(root)
    img_name, lab_name, n = FASHION_FILES[split]
    images = read_idx(_find(folder, img_name))
    labels = read_idx(_find(folder, lab_name))
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise DataError(f"Fashion-MNIST {split} in {folder} has shapes {images.shape} / {labels.shape}, expected "
                        f"({n}, 28, 28) / ({n},); the files are not the standard ones. {HOW_TO_GET}")
    return ImageSet(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)),
                    torch.arange(n), split)


@dataclass(frozen=True)
class Splits:
    """Disjoint splits of the embedded data: ``fit`` (head training and search batches) and ``val``
    from the training split, ``test`` from the test split."""

    fit: ImageSet
    val: ImageSet
    test: ImageSet

    def sizes(self) -> dict:
        return {"fit": len(self.fit), "val": len(self.val), "test": len(self.test)}


def fashion_splits(n_fit: int, n_val: int, n_test: int, seed: int = 0, root=None) -> Splits:
    """Class-balanced random subsets: fit and val disjoint from the training split, test from the test split."""
    train, test = load_fashion_mnist("train", root), load_fashion_mnist("test", root)
    if n_fit + n_val > len(train) or n_test > len(test):
        raise ValueError(f"asked for {n_fit}+{n_val} training and {n_test} test images; Fashion-MNIST has "
                         f"{len(train)} and {len(test)}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train), generator=g)
    fit, val = train.subset(perm[:n_fit]), train.subset(perm[n_fit:n_fit + n_val])
    tperm = torch.randperm(len(test), generator=g)
    return Splits(fit, val, test.subset(tperm[:n_test]))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (n, 28, 28) grey images -> float (n, 3, size, size), bilinear resize, ImageNet normalisation."""
    x = images.float().div_(255.0).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class Batches:
    """``steps`` shuffled (inputs, labels) batches, epoch after epoch, in a seed-determined order.

    Re-iterable (every pass yields the same sequence) and lazy: images are preprocessed per batch.
    ``shard=(rank, world)``: this process's contiguous 1/world slice of every global batch (data-parallel
    runs: the union over ranks is exactly the single-process batch). ``iterate(start)`` resumes at batch
    ``start`` without preprocessing the batches before it.
    """

    def __init__(self, data: ImageSet, size: int, batch_size: int, steps: int, seed: int = 0,
                 shard: tuple[int, int] = (0, 1)):
        if batch_size > len(data):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(data)} images available")
        rank, world = shard
        if world < 1 or not 0 <= rank < world or batch_size % world:
            raise ValueError(f"the global batch size {batch_size} must be a multiple of the number of processes "
                             f"({world}); got shard={shard}")
        self.data, self.size, self.batch_size, self.steps, self.seed = data, size, batch_size, steps, seed
        self.shard = (rank, world)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start: int = 0):
        g = torch.Generator().manual_seed(self.seed)
        perm, pos = torch.randperm(len(self.data), generator=g), 0
        rank, world = self.shard
        per = self.batch_size // world
        for i in range(self.steps):
            if pos + self.batch_size > len(perm):
                perm, pos = torch.randperm(len(self.data), generator=g), 0
            rows = perm[pos:pos + self.batch_size][rank * per:(rank + 1) * per]
            pos += self.batch_size
            if i >= start:
                yield preprocess(self.data.images[rows], self.size), self.data.labels[rows]


class StepBatches:
    """A re-iterable of exactly ``steps`` batches: ``epoch(gen)`` yields one pass (a fresh shuffle each call,
    drawn from one generator seeded by ``seed``), and passes are chained until ``steps`` batches were given.

    ``epoch_len``: batches per pass, given when ``epoch(gen, skip=k)`` can skip its first k batches without
    loading them (it must still draw its shuffle from ``gen``); then ``iterate(start)`` resumes at batch
    ``start`` cheaply. Without it, resuming loads and drops the batches before ``start``.
    """

    def __init__(self, epoch, steps: int, seed: int, epoch_len: int | None = None):
        self.epoch, self.steps, self.seed, self.epoch_len = epoch, steps, seed, epoch_len

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start: int = 0):
        g = torch.Generator().manual_seed(self.seed)
        n, skip = 0, 0
        if start and self.epoch_len:
            while start - n >= self.epoch_len:  # whole passes: draw their shuffles, load nothing
                for _ in self.epoch(g, skip=self.epoch_len):
                    pass
                n += self.epoch_len
            skip, n = start - n, start
        while n < self.steps:
            got = False
            for batch in (self.epoch(g, skip=skip) if skip else self.epoch(g)):
                got = True
                if n >= start:
                    yield batch
                n += 1
                if n == self.steps:
                    return
            if not got and not skip:
                raise ValueError("an epoch yielded no batch: the data holds fewer items than one batch")
            skip = 0
