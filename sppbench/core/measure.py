"""Measured cost of a model: parameters, multiply-adds (torch's FLOP counter), wall-clock latency."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from .masks import MaskedModel


def params(model: nn.Module, *, include_masks: bool = False) -> int:
    """Number of parameters (shared tensors counted once); masks of a MaskedModel excluded by default."""

    skip = set()
    if isinstance(model, MaskedModel) and not include_masks:
        skip = {id(p) for p in model.mask_parameters().values()}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _call(model: nn.Module, x: Any):
    return model(*x) if isinstance(x, (list, tuple)) else model(x)


def _batch(x: Any) -> int:
    t = x[0] if isinstance(x, (list, tuple)) else x
    return int(t.shape[0])


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the fused CPU attention kernel, which torch's counter does not know (it would count 0)."""
    *batch, L, e = q
    n = 1
    for b in batch:
        n *= b
    return 2 * n * L * k[-2] * (e + v[-1])


def _mha_fast_path_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of nn.MultiheadAttention's fused inference kernel (batch-first): the q / k / v and output projections
    and the two attention matmuls; the counter does not know this kernel either."""
    B, L, E = query
    S = key[-2]
    return 2 * (B * L * E * E + 2 * B * S * E * E + 2 * B * L * S * E + B * L * E * E)


def _custom_flops() -> dict:
    ops = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
                     ("_native_multi_head_attention", _mha_fast_path_flops)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops[op] = fn
    return ops


@torch.no_grad()
def macs(model: nn.Module, x: Any, *, per_sample: bool = True) -> int:
    """Multiply-accumulates of one forward of ``x`` (attention matmuls included), per sample by default.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmul, linear, conv, bmm, SDPA); FLOPs =
    2 x MACs. Element-wise ops, norms and softmax are not counted, as is usual for MACs. The fused CPU
    attention kernel, which the counter misses, is counted here (q k^T and attn v).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_custom_flops()) as counter:
            _call(model, x)
    finally:
        model.train(was)
    total = counter.get_total_flops() // 2
    return total // _batch(x) if per_sample else total


@torch.no_grad()
def latency(model: nn.Module, x: Any, *, warmup: int = 3, repeats: int = 10, min_seconds: float = 0.0) -> dict:
    """Wall-clock seconds of one forward of ``x`` in eval mode: median and spread over repeats.

    Returns a dict with median_s, p10_s, p90_s, repeats, batch, threads and device, so a number is
    never reported without the settings it was measured under.
    """
    was = model.training
    model.eval()
    dev = (x[0] if isinstance(x, (list, tuple)) else x).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    try:
        for _ in range(warmup):
            _call(model, x)
        sync()
        start = time.perf_counter()
        while len(times) < repeats or (time.perf_counter() - start) < min_seconds:
            t0 = time.perf_counter()
            _call(model, x)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_s": statistics.median(times), "p10_s": q[0], "p90_s": q[-1], "repeats": len(times),
            "batch": _batch(x), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}


def interleaved_latency(models: dict, x: torch.Tensor, repeats: int, warmup: int = 3) -> dict:
    """Median forward time of each model, measured in rounds that visit every model once (rotating the order),
    so slow drifts of the machine hit every model alike."""
    names = list(models)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            for _ in range(warmup):
                models[n](x)
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                models[n](x)
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}
