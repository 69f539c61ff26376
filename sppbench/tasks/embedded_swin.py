"""The embedded Swin: a compact timm SwinTransformer trained here on Fashion-MNIST, and cached.

No pretrained Swin checkpoint installs offline, so the Swin family's embedded model is trained from
scratch on the CPU (a few minutes), deterministically from its seed, and cached as safetensors + JSON
in ``$SPPBENCH_CACHE`` or ``~/.cache/sppbench``. It is a stand-in, not a public checkpoint: results on
it never claim to reproduce a paper row.

Data: ``fashion_splits(n_train, n_val, n_test, seed)``. The model is trained on ``splits.fit`` (and
only on it); ``splits.val`` is carved from the rest of the Fashion-MNIST training split (model and
constant selection); ``splits.test`` comes from the test split (reporting only). Pruning searches
should draw their batches from ``fit`` (or ``val``), never from ``test``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fileio import atomic_write_bytes, atomic_write_text
from .assets import cache_dir
from .data import Splits, fashion_splits, preprocess
from .evaluate import top1

SWIN_STAND_IN = "stand-in: compact timm Swin trained here on Fashion-MNIST (not a public checkpoint)"
CACHE_FORMAT = "sppbench-embedded-swin-v1"

# Fashion-MNIST resized to 32 px, patch 4: 8 x 8 tokens in stage 0 (4 windows of 4 x 4, shifted in every
# second block), 4 x 4 in stage 1 (one window); 0.37 M params, 9.5 MMACs per image. Chosen for accuracy per
# CPU second: ~65 ms per training step of 128 images on 2 cores, where patch-2 variants (14 x 14 or 16 x 16
# tokens) cost 135-210 ms. Measured (2 threads, idle machine): 7 epochs on 55k images train in ~190 s to
# val top-1 0.888 / test top-1 0.879 (6 epochs on 55k: val 0.885 / test 0.876).
ARCHITECTURE = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=64, depths=(2, 2),
                    num_heads=(2, 4), window_size=4, mlp_ratio=2.0, qkv_bias=True)
TRAINING = dict(batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=0.5, label_smoothing=0.1,
                hflip=True, optimizer="AdamW", schedule="linear warm-up then cosine to 0, per step")
N_TRAIN, N_VAL, N_TEST, EPOCHS = 55000, 5000, 10000, 7


@dataclass
class EmbeddedSwin:
    model: torch.nn.Module
    splits: Splits
    img_size: int
    info: dict


def _architecture(arch: dict | None) -> dict:
    out = dict(ARCHITECTURE)
    out.update(arch or {})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def build_swin(arch: dict):
    """The (randomly initialised) timm SwinTransformer of an architecture dict (see ``ARCHITECTURE``)."""
    from timm.models.swin_transformer import SwinTransformer

    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}
    return SwinTransformer(**kw, drop_path_rate=0.0)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def train_swin(model: torch.nn.Module, splits: Splits, img_size: int, epochs: int, seed: int, settings: dict,
               log_every: int = 0) -> tuple[float, float]:
    """Train in place on ``splits.fit``; a fixed data order and flips from ``seed``.

    Returns (wall-clock seconds, process CPU seconds over all threads): the second tells a slow run on a
    shared machine from a slow configuration.
    """
    bs = settings["batch_size"]
    steps_per_epoch = len(splits.fit) // bs
    if steps_per_epoch < 1:
        raise ValueError(f"n_train={len(splits.fit)} is smaller than the batch size {bs}")
    total = steps_per_epoch * epochs
    warm = max(1, int(settings["warmup_epochs"] * steps_per_epoch))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(splits.fit), generator=gen)
        for b in range(steps_per_epoch):
            rows = perm[b * bs:(b + 1) * bs]
            images = splits.fit.images[rows]
            if settings["hflip"]:
                flip = torch.rand(len(rows), generator=gen) < 0.5
                images = torch.where(flip.view(-1, 1, 1), images.flip(-1), images)
            loss = F.cross_entropy(model(preprocess(images, img_size)), splits.fit.labels[rows],
                                   label_smoothing=settings["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if log_every and step % log_every == 0:
                print(f"[embedded swin] epoch {epoch + 1}/{epochs} step {step}/{total} loss {loss.item():.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return time.perf_counter() - t0, time.process_time() - c0


def embedded_swin(n_train: int = N_TRAIN, epochs: int = EPOCHS, seed: int = 0, refresh: bool = False, *,
                  n_val: int = N_VAL, n_test: int = N_TEST, arch: dict | None = None, training: dict | None = None,
                  data_root=None, log_every: int = 0) -> EmbeddedSwin:
    """The compact Swin trained on ``n_train`` Fashion-MNIST training images for ``epochs`` epochs (cached).

    The cache key covers every setting (architecture, training settings, split sizes and seed, the rows
    trained on); ``refresh=True`` retrains. ``info`` records the architecture, training settings, training
    seconds (of the run that produced the cached weights), val / test top-1 and the stand-in label.
    """
    from safetensors.torch import load, save

    arch = _architecture(arch)
    settings = dict(TRAINING)
    settings.update(training or {})
    splits = fashion_splits(n_train, n_val, n_test, seed=seed, root=data_root)
    img_size = int(arch["img_size"])
    key_fields = {"format": CACHE_FORMAT, "architecture": arch, "training": settings, "epochs": epochs, "seed": seed,
                  "n_train": n_train, "n_val": n_val, "n_test": n_test,
                  "fit_rows": _digest(splits.fit.index.tolist()), "test_rows": _digest(splits.test.index.tolist())}
    key = f"swin_fmnist_{_digest(key_fields)}"
    weights_file, meta_file = cache_dir() / f"{key}.safetensors", cache_dir() / f"{key}.json"

    torch.manual_seed(seed)
    model = build_swin(arch)
    meta = None
    if weights_file.is_file() and meta_file.is_file() and not refresh:
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("key") != key_fields:
                raise ValueError("cache entry of other settings")
            model.load_state_dict(load(weights_file.read_bytes()), strict=True)
        except Exception:  # a corrupt or foreign cache entry is retrained, never trusted
            meta = None
            torch.manual_seed(seed)
            model = build_swin(arch)
    from_cache = meta is not None
    if meta is None:
        seconds, cpu_seconds = train_swin(model, splits, img_size, epochs, seed, settings, log_every=log_every)
        meta = {"key": key_fields, "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1),
                "threads": torch.get_num_threads(),
                "val_top1": top1(model, splits.val, img_size), "test_top1": top1(model, splits.test, img_size),
                "params": sum(p.numel() for p in model.parameters())}
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(weights_file, save(state))
        atomic_write_text(meta_file, json.dumps(meta, indent=1))
    model.eval()
    info = {"model": "timm SwinTransformer (Swin v1), trained from scratch here", "label": SWIN_STAND_IN,
            "architecture": arch, "training": {**settings, "epochs": epochs, "seed": seed},
            "train_seconds": meta["train_seconds"], "train_cpu_seconds": meta["train_cpu_seconds"],
            "train_threads": meta["threads"], "params": meta["params"],
            "val_top1": meta["val_top1"], "test_top1": meta["test_top1"], "img_size": img_size,
            "data": "Fashion-MNIST", "splits": splits.sizes(), "split_seed": seed,
            "trained_on": "splits.fit (Fashion-MNIST training split); val: held-out training images; "
                          "test: the test split",
            "from_cache": from_cache, "cache_file": str(weights_file)}
    return EmbeddedSwin(model, splits, img_size, info)
