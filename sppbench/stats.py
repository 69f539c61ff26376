"""Paired statistics over per-example records (docs/statistics.md).

Two methods evaluated on the same examples are compared example by example: the paired bootstrap
resamples examples (not methods), so the interval reflects how much the difference depends on which
examples were drawn, and McNemar's exact test asks whether the discordant examples (one right, the
other wrong) split evenly. Several seeds of one method are first averaged per example.

``compare(a, b)`` is the one entry point: ``a`` and ``b`` are per-example scores of the row and of its
reference (0/1 correctness, or any per-example score such as a negative log-likelihood), either one
array or a list of arrays (one per seed), all over the same examples in the same order.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _as_matrix(x) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"per-example scores must be one array or a list of equal-length arrays, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("per-example scores hold NaN or inf; drop or fix those examples first")
    return arr


def paired_bootstrap(a, b, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
                     chunk: int = 250) -> dict:
    """Mean of ``a - b`` (per-example, seed-averaged) and its percentile bootstrap interval over examples."""
    if resamples < 1 or not (0 < level < 1):
        raise ValueError(f"resamples must be >= 1 and level in (0, 1), got {resamples!r}, {level!r}")
    A, B = _as_matrix(a), _as_matrix(b)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"a and b cover different numbers of examples ({A.shape[1]} vs {B.shape[1]}); "
                         "paired statistics need the same examples in the same order")
    d = A.mean(0) - B.mean(0)
    n = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        means[start:start + k] = d[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"delta": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(n), "resamples": int(resamples),
            "level": level}


def mcnemar(a, b) -> dict:
    """Exact two-sided McNemar test on 0/1 correctness (seed-averaged correctness is rounded at 0.5 first).

    ``b01``: examples ``a`` gets wrong and ``b`` right; ``b10``: the reverse. p = P(min count as extreme)
    under Binomial(b01 + b10, 1/2), doubled, capped at 1."""
    Am, Bm = _as_matrix(a), _as_matrix(b)
    if Am.shape[1] != Bm.shape[1]:
        raise ValueError(f"a and b cover different numbers of examples ({Am.shape[1]} vs {Bm.shape[1]})")
    A, B = Am.mean(0) >= 0.5, Bm.mean(0) >= 0.5
    b10 = int((A & ~B).sum())
    b01 = int((~A & B).sum())
    n = b01 + b10
    if n == 0:
        return {"b01": 0, "b10": 0, "p": 1.0}
    k = min(b01, b10)
    # log-space binomial tail: exact for any n
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return {"b01": b01, "b10": b10, "p": float(min(1.0, 2 * tail))}


def verdict(lo: float, hi: float, higher_is_better: bool = True) -> str:
    """'better' / 'worse' when the interval excludes zero, else 'tie' (within noise)."""
    if lo > 0:
        return "better" if higher_is_better else "worse"
    if hi < 0:
        return "worse" if higher_is_better else "better"
    return "tie"


def compare(a, b, *, binary: bool = True, higher_is_better: bool = True, resamples: int = RESAMPLES,
            seed: int = 0) -> dict:
    """Row ``a`` against reference ``b`` on the same examples: delta, lo, hi, (McNemar p for 0/1), verdict."""
    out = paired_bootstrap(a, b, resamples=resamples, seed=seed)
    if binary:
        out["mcnemar_p"] = mcnemar(a, b)["p"]
    out["verdict"] = verdict(out["lo"], out["hi"], higher_is_better)
    out["seeds"] = [int(_as_matrix(a).shape[0]), int(_as_matrix(b).shape[0])]
    return out


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values")
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


__all__ = ["compare", "paired_bootstrap", "mcnemar", "verdict", "mean_sd", "RESAMPLES", "LEVEL"]
