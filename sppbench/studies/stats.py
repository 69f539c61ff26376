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

import functools
import math
from typing import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
# A verdict is a claim only when the interval of every one of these bootstrap seeds (seed, seed + 1, ...) excludes zero
# on the same side: a verdict that flips with the bootstrap's own draws is Monte Carlo noise, reported as 'tie'.
BOOTSTRAP_SEEDS = 5
# ... and only when every side with randomness has at least this many search seeds (3 seeds give the two-level
# bootstrap's seed level 10 possible multisets; ``claim``).
MIN_SEEDS_FOR_A_CLAIM = 5


def _as_matrix(x) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"per-example scores must be one array or a list of equal-length arrays, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("per-example scores hold NaN or inf; drop or fix those examples first")
    return arr


@functools.lru_cache(maxsize=2 * BOOTSTRAP_SEEDS + 2)
def _draws(seed: int, resamples: int, sa: int, sb: int, sizes: tuple, two_level: bool, chunk: int = 0) -> tuple:
    """The bootstrap's random draws, in the order one generator seeded ``seed`` makes them: per resample, each
    side's seeds (two-level only), then one index draw per example set; with ``chunk`` (one set, one level) the
    index draws of ``chunk`` resamples at a time. Every comparison with the same seed, shapes and resamples uses the
    same draws (common random numbers), so they are made once and cached. Returns (seed counts of side a, of side
    b, per set the (resamples x n) count of each example in each resample)."""
    rng = np.random.default_rng(seed)
    ca, cb = np.ones((resamples, sa)), np.ones((resamples, sb))
    # small integers, stored compactly (2,000 resamples of ImageNet's 50,000 images: 200 MB, not 800)
    counts = [np.zeros((resamples, n), dtype=np.uint16 if n < 2 ** 16 else np.uint32) for n in sizes]
    if chunk:
        if two_level or len(sizes) != 1:
            raise ValueError("chunked draws are for one example set without seed draws")
        n = sizes[0]
        for start in range(0, resamples, chunk):
            idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
            for i, row in enumerate(idx):
                counts[0][start + i] = np.bincount(row, minlength=n)
        return ca, cb, counts
    for r in range(resamples):
        ia = rng.integers(0, sa, sa) if two_level else np.arange(sa)
        ib = rng.integers(0, sb, sb) if two_level else np.arange(sb)
        ca[r], cb[r] = np.bincount(ia, minlength=sa), np.bincount(ib, minlength=sb)
        for c, n in zip(counts, sizes):
            c[r] = np.bincount(rng.integers(0, n, n), minlength=n)
    return ca, cb, counts


def _resampled_means(A: np.ndarray, B: np.ndarray, ca: np.ndarray, cb: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per resample, the mean over the drawn examples of (a's drawn seeds averaged) - (b's drawn seeds averaged):
    linear in the draws, so one product with the count matrices gives every resample at once."""
    n = A.shape[1]
    pa, pb = np.empty((len(counts), A.shape[0])), np.empty((len(counts), B.shape[0]))
    for start in range(0, len(counts), 250):  # (resamples, seeds): each seed's mean over the drawn examples
        c = counts[start:start + 250].astype(np.float64)
        pa[start:start + 250], pb[start:start + 250] = c @ A.T / n, c @ B.T / n
    return (ca * pa).sum(1) / A.shape[0] - (cb * pb).sum(1) / B.shape[0]


def paired_bootstrap(a, b, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
                     chunk: int = 250, resample_seeds: bool = False) -> dict:
    """Mean of ``a - b`` (per-example, seed-averaged) and its percentile bootstrap interval over examples.

    ``resample_seeds``: a two-level (hierarchical) bootstrap: each resample also draws each side's seeds with
    replacement before averaging them per example, so the interval covers the variation between searches as
    well as which examples were drawn (a side with one seed contributes no seed variation). ``chunk``: resamples
    per index draw (one level only). The draws are cached and shared by comparisons of the same shape (``_draws``)."""
    if resamples < 1 or not (0 < level < 1):
        raise ValueError(f"resamples must be >= 1 and level in (0, 1), got {resamples!r}, {level!r}")
    A, B = _as_matrix(a), _as_matrix(b)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"a and b cover different numbers of examples ({A.shape[1]} vs {B.shape[1]}); "
                         "paired statistics need the same examples in the same order")
    d = A.mean(0) - B.mean(0)
    n = d.size
    two_level = bool(resample_seeds and (A.shape[0] > 1 or B.shape[0] > 1))
    ca, cb, (counts,) = _draws(seed, resamples, A.shape[0], B.shape[0], (n,), two_level, 0 if two_level else chunk)
    means = _resampled_means(A, B, ca, cb, counts)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"delta": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(n), "resamples": int(resamples),
            "level": level, "resample_seeds": bool(resample_seeds)}


def paired_bootstrap_parts(parts: Sequence[tuple], *, resamples: int = RESAMPLES, level: float = LEVEL,
                           seed: int = 0, resample_seeds: bool = False) -> dict:
    """A statistic that is a SUM of per-example means over independent example sets (e.g. CLIP's rsum: image
    queries for image->text plus caption queries for text->image): ``parts`` = [(a_p, b_p), ...], each pair per-example
    scores of the row and its reference over one set (one array or a list of per-seed arrays). Returns the
    difference sum_p mean(a_p - b_p) and its percentile interval, each set resampled on its own (and, with
    ``resample_seeds``, the seeds too: the same seed draw for every part of one side)."""
    if resamples < 1 or not (0 < level < 1):
        raise ValueError(f"resamples must be >= 1 and level in (0, 1), got {resamples!r}, {level!r}")
    mats = []
    for a, b in parts:
        A, B = _as_matrix(a), _as_matrix(b)
        if A.shape[1] != B.shape[1]:
            raise ValueError(f"a part covers different numbers of examples ({A.shape[1]} vs {B.shape[1]})")
        mats.append((A, B))
    sa, sb = {A.shape[0] for A, _ in mats}, {B.shape[0] for _, B in mats}
    if len(sa) != 1 or len(sb) != 1:
        raise ValueError("every part of one side needs the same seeds")
    sa, sb = sa.pop(), sb.pop()
    ca, cb, counts = _draws(seed, resamples, sa, sb, tuple(int(A.shape[1]) for A, _ in mats), bool(resample_seeds))
    means = sum(_resampled_means(A, B, ca, cb, c) for (A, B), c in zip(mats, counts))
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    delta = float(sum((A.mean(0) - B.mean(0)).mean() for A, B in mats))
    return {"delta": delta, "lo": float(lo), "hi": float(hi), "n": [int(A.shape[1]) for A, _ in mats],
            "resamples": int(resamples), "level": level, "resample_seeds": bool(resample_seeds),
            "verdict": verdict(float(lo), float(hi)), "seeds": [sa, sb]}


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
            seed: int = 0, resample_seeds: bool = False, bootstrap_seeds: int = BOOTSTRAP_SEEDS) -> dict:
    """Row ``a`` against reference ``b`` on the same examples: delta, lo, hi, (McNemar p for 0/1), verdict.
    ``resample_seeds``: the interval also resamples each side's seeds (``paired_bootstrap``).

    The interval is computed under ``bootstrap_seeds`` bootstrap seeds (``seed``, ``seed + 1``, ...): ``lo`` / ``hi``
    are the first one's, ``lo_range`` / ``hi_range`` the smallest and largest bound over all of them (the Monte Carlo
    spread of each bound), and ``verdict`` is 'better' / 'worse' only when every one of them says so
    (``verdict_stable``: all of them agree, ties included)."""
    if not (isinstance(bootstrap_seeds, int) and bootstrap_seeds >= 1):
        raise ValueError(f"bootstrap_seeds must be a positive integer, got {bootstrap_seeds!r}")
    runs = [paired_bootstrap(a, b, resamples=resamples, seed=seed + k, resample_seeds=resample_seeds)
            for k in range(bootstrap_seeds)]
    out = dict(runs[0])
    verdicts = {verdict(r["lo"], r["hi"], higher_is_better) for r in runs}
    out["verdict"] = verdicts.pop() if len(verdicts) == 1 else "tie"
    out["verdict_stable"] = not verdicts
    out["bootstrap_seeds"] = bootstrap_seeds
    out["lo_range"] = [min(r["lo"] for r in runs), max(r["lo"] for r in runs)]
    out["hi_range"] = [min(r["hi"] for r in runs), max(r["hi"] for r in runs)]
    if binary:
        out["mcnemar_p"] = mcnemar(a, b)["p"]
    out["seeds"] = [int(_as_matrix(a).shape[0]), int(_as_matrix(b).shape[0])]
    return out


def claim(verdict_: str, seeds: Sequence[int], seeded: Sequence[bool], min_seeds: int = MIN_SEEDS_FOR_A_CLAIM) -> str:
    """``verdict_`` as a claim: 'tie' unless every side with randomness (``seeded``) has at least ``min_seeds``
    seeds (``seeds``, one count per side)."""
    enough = all(n >= min_seeds for n, r in zip(seeds, seeded) if r)
    return verdict_ if enough or verdict_ in ("tie", "reference") else "tie"


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values")
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


__all__ = ["compare", "claim", "paired_bootstrap", "paired_bootstrap_parts", "mcnemar", "verdict", "mean_sd", "RESAMPLES",
           "LEVEL", "BOOTSTRAP_SEEDS", "MIN_SEEDS_FOR_A_CLAIM"]
