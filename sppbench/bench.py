"""Benchmarks that print figures (never timed tests): ``python -m sppbench bench ...``."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def _embedded_model(img_size: int):
    from .embedded import dinov2_vits14

    return dinov2_vits14(img_size, num_classes=10)


def search_step(batch_size: int = 32, steps: int = 5, repeats: int = 5, img_size: int = 56,
                threads: int | None = None, model=None) -> dict:
    """One SPP search step vs one plain forward+backward step of the same frozen model.

    plain: the unmasked model, weights frozen, gradient taken w.r.t. the input (so backward runs
    through every block, as the search's does); spp: ``sppbench.search`` itself (masked forward,
    backward to the masks, SLBI update, support bookkeeping). Blocks of ``steps`` steps of each are
    interleaved ``repeats`` times on the same batches; the ratio is of the median per-step times.
    A third figure, a step with trainable weights (weight gradients), is printed for context.
    """
    from . import attach_masks, search
    from .experiments import search_defaults

    consts = search_defaults("embedded")["constants"]  # the cost of a step does not depend on them

    if threads:
        torch.set_num_threads(threads)
    label = "DINOv2 ViT-S/14 (embedded default)" if model is None else type(model).__name__
    model = model if model is not None else _embedded_model(img_size)
    model.eval()
    g = torch.Generator().manual_seed(0)
    classes = int(getattr(model, "num_classes", 10) or 10)
    data = [(torch.randn(batch_size, 3, img_size, img_size, generator=g),
             torch.randint(0, classes, (batch_size,), generator=g))
            for _ in range(steps)]

    def plain(train_weights: bool) -> float:
        for p in model.parameters():
            p.requires_grad_(train_weights)
        t0 = time.perf_counter()
        for x, y in data:
            x = x.clone().requires_grad_(not train_weights)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / steps

    m = None

    def spp() -> float:
        nonlocal m
        m = attach_masks(model, input_size=(3, img_size, img_size))
        t0 = time.perf_counter()
        search(m, data, F.cross_entropy, steps=steps, **consts)
        dt = (time.perf_counter() - t0) / steps
        m.detach_masks()
        return dt

    plain(False), spp()  # warm-up
    t_plain, t_spp, t_train = [], [], []
    for _ in range(repeats):
        t_plain.append(plain(False))
        t_spp.append(spp())
        t_train.append(plain(True))
    for p in model.parameters():
        p.requires_grad_(True)
    med = statistics.median
    return {
        "figure": "SPP search step / plain forward+backward step (frozen weights, grad w.r.t. input)",
        "ratio": med(t_spp) / med(t_plain),
        "spp_step_s": med(t_spp), "plain_step_s": med(t_plain), "trainable_weights_step_s": med(t_train),
        "ratio_vs_trainable_weights": med(t_spp) / med(t_train),
        "spread_spp_s": [min(t_spp), max(t_spp)], "spread_plain_s": [min(t_plain), max(t_plain)],
        "settings": {"model": label, "img_size": img_size,
                     "batch_size": batch_size, "steps_per_block": steps, "repeats": repeats,
                     "threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu"},
    }
