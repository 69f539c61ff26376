"""Paired statistics: bootstrap intervals, McNemar's exact test, verdicts, sample sd."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sppbench.studies import stats


def test_identical_rows_tie_with_a_zero_interval():
    a = np.random.default_rng(0).integers(0, 2, 500)
    out = stats.compare(a, a)
    assert out["delta"] == 0.0 and out["lo"] == 0.0 and out["hi"] == 0.0
    assert out["mcnemar_p"] == 1.0 and out["verdict"] == "tie"


def test_a_clear_gap_is_detected_and_its_sign_kept():
    rng = np.random.default_rng(1)
    b = (rng.random(2000) < 0.70).astype(int)
    a = b.copy()
    flip = np.flatnonzero(b == 0)[:200]  # a is right on 200 examples b gets wrong: +0.10
    a[flip] = 1
    better = stats.compare(a, b)
    assert better["delta"] == pytest.approx(0.10) and better["lo"] > 0.08 and better["verdict"] == "better"
    assert better["mcnemar_p"] < 1e-40
    worse = stats.compare(b, a)
    assert worse["verdict"] == "worse" and worse["hi"] < 0


def test_the_interval_covers_a_small_noisy_difference():
    rng = np.random.default_rng(2)
    a = (rng.random(300) < 0.75).astype(int)
    b = (rng.random(300) < 0.75).astype(int)  # independent draws of the same accuracy
    out = stats.compare(a, b, resamples=4000)
    assert out["lo"] < out["delta"] < out["hi"] and out["verdict"] == "tie"
    # the paired interval is about +-1.96 sd of the mean difference
    sd = np.std(a - b, ddof=1) / math.sqrt(300)
    assert out["hi"] - out["lo"] == pytest.approx(2 * 1.96 * sd, rel=0.15)


def test_mcnemar_matches_the_binomial_tail():
    a = np.array([1] * 8 + [0] * 2 + [1] * 50)
    b = np.array([0] * 8 + [1] * 2 + [1] * 50)  # 8 vs 2 discordant
    out = stats.mcnemar(a, b)
    tail = sum(math.comb(10, i) for i in range(3)) / 2 ** 10
    assert (out["b10"], out["b01"]) == (8, 2) and out["p"] == pytest.approx(2 * tail)


def test_seeds_are_averaged_per_example_and_bad_input_refused():
    a = [[1, 0, 1, 1], [1, 1, 1, 0]]
    b = [1, 0, 0, 1]
    out = stats.paired_bootstrap(a, b, resamples=10)
    assert out["delta"] == pytest.approx(np.mean([0.0, 0.5, 1.0, -0.5]))
    assert stats.compare(a, b, resamples=10)["seeds"] == [2, 1]
    with pytest.raises(ValueError, match="same examples"):
        stats.paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        stats.paired_bootstrap([1.0, float("nan")], [1.0, 0.0])
    assert stats.verdict(-0.01, 0.02) == "tie" and stats.verdict(0.01, 0.02, higher_is_better=False) == "worse"
    assert stats.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0) and stats.mean_sd([4.0]) == (4.0, None)


def test_resampling_seeds_widens_the_interval_by_the_spread_between_searches():
    rng = np.random.default_rng(0)
    n = 4000
    base = rng.random(n)
    ref = [(base < 0.80).astype(float)]
    # three seeds that disagree by a few points: the seed-averaged difference is small, the spread between seeds large
    seeds = [(base < p).astype(float) for p in (0.78, 0.83, 0.86)]
    plain = stats.compare(seeds, ref, resamples=1000)
    both = stats.compare(seeds, ref, resamples=1000, resample_seeds=True)
    assert plain["delta"] == both["delta"]
    assert (both["hi"] - both["lo"]) > 3 * (plain["hi"] - plain["lo"])
    assert plain["verdict"] == "better" and both["verdict"] == "tie"  # the images alone would have claimed a win
    # one seed per side: nothing to resample, the same interval as the plain bootstrap
    one = stats.compare([seeds[0]], ref, resamples=500, resample_seeds=True)
    assert (one["lo"], one["hi"]) == (stats.compare([seeds[0]], ref, resamples=500)["lo"],
                                      stats.compare([seeds[0]], ref, resamples=500)["hi"])


def test_a_sum_over_independent_query_sets_is_bootstrapped_part_by_part():
    rng = np.random.default_rng(1)
    a1, b1 = rng.random(300), rng.random(300)
    a2, b2 = rng.random(500) + 0.2, rng.random(500)
    out = stats.paired_bootstrap_parts([(a1, b1), (a2, b2)], resamples=500)
    assert out["delta"] == pytest.approx((a1 - b1).mean() + (a2 - b2).mean())
    assert out["lo"] < out["delta"] < out["hi"] and out["n"] == [300, 500]
    # one part: the same as the plain paired bootstrap's interval width (not the same draws)
    one = stats.paired_bootstrap_parts([(a2, b2)], resamples=2000)
    plain = stats.paired_bootstrap(a2, b2, resamples=2000)
    assert one["hi"] - one["lo"] == pytest.approx(plain["hi"] - plain["lo"], rel=0.15)
    assert one["verdict"] == "better"
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_bootstrap_parts([([a1, a1], b1), (a2, b2)])


@pytest.mark.parametrize("two_level", [False, True])
def test_bootstrap_from_cached_draws_equals_the_resample_loop(two_level):
    """The vectorised bootstrap (cached draws, one product per comparison) gives the interval of the plain loop that
    draws each resample's seeds and examples from the same generator and averages the drawn differences."""
    g = np.random.default_rng(5)
    A, B = (g.random((3, 300)) < 0.7).astype(float), (g.random((2, 300)) < 0.6).astype(float)
    rng = np.random.default_rng(0)
    means = []
    for start in range(0, 400, 250):  # the one-level loop draws its example indices 250 resamples at a time
        if two_level:
            for _ in range(min(250, 400 - start)):
                d = A[rng.integers(0, 3, 3)].mean(0) - B[rng.integers(0, 2, 2)].mean(0)
                means.append(d[rng.integers(0, 300, 300)].mean())
        else:
            d = A.mean(0) - B.mean(0)
            means.extend(d[rng.integers(0, 300, size=(min(250, 400 - start), 300))].mean(1))
    lo, hi = np.quantile(means, [0.025, 0.975])
    out = stats.paired_bootstrap(A, B, resamples=400, resample_seeds=two_level)
    assert out["lo"] == pytest.approx(lo, abs=1e-12) and out["hi"] == pytest.approx(hi, abs=1e-12)
    assert stats.paired_bootstrap(A, B, resamples=400, resample_seeds=two_level) == out  # the cache changes nothing


def _edge_case(n=400, seed=3):
    """A difference right at the edge of significance: some bootstrap seeds' intervals exclude zero, some not."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 2, n).astype(float)
    a = b.copy()
    flip = rng.choice(n, 40, replace=False)
    a[flip[:26]], a[flip[26:]] = 1 - b[flip[:26]], b[flip[26:]]
    return a, b


def test_a_verdict_that_flips_with_the_bootstrap_seed_is_not_a_claim():
    for seed in range(40):  # find data whose single-seed verdict depends on the bootstrap seed
        a, b = _edge_case(seed=seed)
        single = {stats.verdict(r["lo"], r["hi"]) for r in
                  (stats.paired_bootstrap(a, b, resamples=300, seed=k) for k in range(stats.BOOTSTRAP_SEEDS))}
        if len(single) > 1:
            break
    else:
        pytest.fail("no edge case found")
    out = stats.compare(a, b, resamples=300)
    assert out["verdict"] == "tie" and out["verdict_stable"] is False
    assert out["lo_range"][0] < 0 < out["lo_range"][1] or out["hi_range"][0] < 0 < out["hi_range"][1]
    first = stats.paired_bootstrap(a, b, resamples=300, seed=0)
    assert (out["lo"], out["hi"]) == (first["lo"], first["hi"])  # the reported interval is the first seed's
    clear = stats.compare(np.ones(200), np.zeros(200), resamples=300)
    assert clear["verdict"] == "better" and clear["verdict_stable"] and clear["bootstrap_seeds"] == stats.BOOTSTRAP_SEEDS


def test_a_claim_needs_enough_seeds_on_every_side_with_randomness():
    assert stats.claim("better", (5, 1), (True, False)) == "better"
    assert stats.claim("better", (3, 5), (True, True)) == "tie"
    assert stats.claim("worse", (1, 3), (False, True)) == "tie"
    assert stats.claim("worse", (1, 1), (False, False)) == "worse"  # two deterministic rows: nothing to draw
    with pytest.raises(ValueError, match="bootstrap_seeds"):
        stats.compare(np.ones(5), np.zeros(5), bootstrap_seeds=0)
