"""Fashion-MNIST idx loading from any folder, and the errors for missing or damaged files."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from sppbench.tasks.data import Batches, fashion_mnist_root, load_fashion_mnist, preprocess, read_idx
from sppbench.errors import DataError

N = {"train": 60000, "t10k": 10000}


def write_idx(path, arr: np.ndarray, compress=True):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def fake_folder(tmp_path, compress=True):
    rng = np.random.default_rng(0)
    for prefix, n in N.items():
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)), compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), compress)
    return tmp_path


@pytest.mark.parametrize("compress", [True, False])
def test_loads_any_folder_with_the_four_files(tmp_path, compress):
    folder = fake_folder(tmp_path, compress)
    test = load_fashion_mnist("test", root=folder)
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == torch.uint8
    assert test.labels.dtype == torch.int64 and int(test.labels.max()) <= 9


def test_environment_variable_is_used(tmp_path, monkeypatch):
    folder = fake_folder(tmp_path)
    monkeypatch.setenv("SPPBENCH_FASHION_MNIST", str(folder))
    assert fashion_mnist_root() == folder


def test_missing_folder_says_how_to_get_the_files(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_truncated_file_is_a_clear_error(tmp_path):
    folder = fake_folder(tmp_path, compress=False)
    f = folder / "t10k-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(f)
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"\x12\x34garbage!")
    with pytest.raises(DataError, match="bad magic"):
        load_fashion_mnist("test", root=folder)
    g = folder / "bad.gz"
    g.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt"):
        read_idx(g)


def test_preprocess_and_batches_are_deterministic(tmp_path):
    folder = fake_folder(tmp_path)
    data = load_fashion_mnist("test", root=folder).subset(range(100))
    x = preprocess(data.images[:4], 56)
    assert x.shape == (4, 3, 56, 56) and torch.isfinite(x).all()
    a = [y for _, y in Batches(data, 28, 32, 7, seed=3)]
    b = [y for _, y in Batches(data, 28, 32, 7, seed=3)]
    assert len(a) == 7 and all(torch.equal(u, v) for u, v in zip(a, b))
