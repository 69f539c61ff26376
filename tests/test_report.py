"""The report reads only run records and writes tables / figures; missing or broken records are reported."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sppbench.report import build as report
from sppbench.report.build import PAPER_SOURCE, build_report
from sppbench.studies.records import RunRecord, list_records

REAL_RUNS = Path(__file__).resolve().parent.parent / "results" / "runs"
PNG = b"\x89PNG\r\n\x1a\n"
VIT = "stand-in: test ViT"


def _record(root: Path, study: str, run_id: str, params, metrics, files: dict | None = None) -> Path:
    """A finished record with a chosen run id (ids order the records: the later id is the newer)."""
    rec = RunRecord(study, root=root)
    rec.write_json("params.json", params)
    if isinstance(metrics, str):
        rec.file("metrics.json").write_text(metrics)
    else:
        rec.write_json("metrics.json", metrics)
    for name, text in (files or {}).items():
        rec.file(name).write_text(text)
    rec.run_id, rec.final = run_id, rec.final.with_name(run_id)
    return rec.finish()


def _vision_rows(model, top1s, methods=("spp",)):
    rows = [{"model": model, "method": "dense", "seed": 0, "budget_macs_fraction": 1.0, "macs": 100, "params": 10,
             "macs_fraction": 1.0, "readout": None, "top1_no_retrain": 0.9, "top1_head_refit": 0.9,
             "top1_finetuned": 0.9, "search_s": 0.0}]
    for method in methods:
        for seed, t in enumerate(top1s):
            rows.append({"model": model, "method": method, "seed": seed, "budget_macs_fraction": 0.5, "macs": 50 + seed,
                         "params": 5, "macs_fraction": 0.5 + seed / 100, "readout": "global", "top1_no_retrain": t / 2,
                         "top1_head_refit": t, "top1_finetuned": t + 0.01, "search_s": 1.0})
    return rows


def _vision(root, run_id, model, top1s):
    info = {"label": f"stand-in: test {model}", "family_cost": {"ratio_final_runs_only": 0.2}, "dense_macs": 100}
    return _record(root, "vision_table", run_id, {"model": model, "study": "vision_table"},
                   {"rows": _vision_rows(model, top1s), "info": info, "search": None})


def _solution_path(root, run_id, model, search=None):
    groups = []
    for layer in range(3):
        for pool, n in (("attn", 4), ("mlp", 6)):
            for i in range(n):
                entry = -1 if (layer + i) % 5 == 0 else 1 + (layer * 7 + i * 3) % 10
                groups.append({"group": f"blocks.{layer}.{pool}", "kind": pool, "pool": pool, "layer": layer,
                               "index": i, "entry_step": entry, "support_steps": max(0, 11 - entry) if entry > 0 else 0,
                               "V": 0.1, "M": 0.2, "rank": 0})
    path = pd.DataFrame(groups)
    history = [{"step": s, "loss": 1.0 / s,
                "support_pool": {p: int(((path["pool"] == p) & (path["entry_step"] > 0) & (path["entry_step"] <= s)).sum())
                                 for p in ("attn", "mlp")},
                "support_group": {}} for s in range(1, 11)]
    rows = [{"model": model, "macs_fraction": f, "kept_entries": k, "macs": int(f * 100), "nested_in_next": True}
            for f, k in ((0.3, 10), (0.5, 20), (0.7, 30))]
    info = {"label": f"stand-in: test {model}", "pool_sizes": {"attn": 12, "mlp": 18}}
    return _record(root, "solution_path", run_id, {"model": model, "study": "solution_path"},
                   {"rows": rows, "info": info, "search": search},
                   files={"history.json": json.dumps(history), "path.csv": path.to_csv(index=False)})


def _all_studies(root: Path) -> None:
    """One synthetic record of every study (two vision models, an older and a newer embedded-vit)."""
    _vision(root, "20200101T000000Z-000000aa", "embedded-vit", [0.1, 0.1])  # older: must not be used
    _vision(root, "20200102T000000Z-000000bb", "embedded-vit", [0.6, 0.8])
    _vision(root, "20200101T120000Z-000000cc", "embedded-swin", [0.5])
    _record(root, "quickstart", "20200101T000000Z-00000001", {"study": "quickstart"},
            {"rows": [{"budget": "dense", "fraction": 1.0, "macs": 100, "top1_no_retrain": 0.9, "top1_head_refit": 0.9},
                      {"budget": "fraction=0.5", "fraction": 0.5, "macs": 50, "top1_no_retrain": 0.2,
                       "top1_head_refit": 0.8}],
             "info": {"label": VIT, "stand_in": VIT}, "search": {}})
    clip_rows = [{"model": "embedded-clip", "method": m, "seed": s, "budget_towers": "joint", "budget_macs_fraction": b,
                  "macs_fraction": b, "no_retrain_rsum": 100.0 * b, "refit_rsum": 300.0 * b + 10 * s,
                  "finetuned_rsum": 290.0 * b}
                 for m, bs in (("dense", [1.0]), ("spp", [0.7, 0.5]), ("magnitude", [0.7, 0.5])) for b in bs
                 for s in ((0,) if m == "dense" else (0, 1))]
    _record(root, "clip_table", "20200101T000000Z-00000002", {"model": "embedded-clip", "study": "clip_table"},
            {"rows": clip_rows, "info": {"label": "stand-in: test clip"}, "search": None})
    llm_rows = [{"model": "smollm2", "method": m, "pattern": p, "sparsity": 0.5, "perplexity": ppl, "seconds": 1.0}
                for m, p, ppl in (("dense", "dense", 20.0), ("wanda", "unstructured 50%", 50.0),
                                  ("spp-ria", "unstructured 50%", 120.0), ("wanda", "2:4", 200.0),
                                  ("spp-ria", "2:4", 2000.0))]
    structured = [{"method": "dense", "macs_fraction_target": 1.0, "params": 10, "macs": 100, "latency_ms": 5.0,
                   "perplexity": 20.0}, {"method": "spp", "macs_fraction_target": 0.8, "params": 8, "macs": 80,
                                          "latency_ms": 4.0, "perplexity": 90.0}]
    _record(root, "llm_table", "20200101T000000Z-00000003", {"model": "smollm2", "study": "llm_table"},
            {"rows": llm_rows, "info": {"label": "SmolLM2 test", "structured": structured, "dense_perplexity": 20.0,
                                        "ppl_ratio_spp_ria_over_ria": {"2:4": 10.0}}, "search": None})
    _solution_path(root, "20200101T000000Z-00000004", "embedded-vit")
    _solution_path(root, "20200101T000000Z-00000005", "embedded-swin")
    seed_rows = [{"method": m, "seed": s, "budget_macs_fraction": b, "macs_fraction": b,
                  "top1_no_retrain": 0.1, "top1_head_refit": t}
                 for m in ("spp", "lasso") for b in (0.5, 0.7) for s, t in ((0, 0.70), (1, 0.74))]
    jaccard = [{"method": m, "budget_macs_fraction": b, "mean": 0.8 if m == "spp" else 0.6, "min": 0.5, "pairs": 1}
               for m in ("spp", "lasso") for b in (0.5, 0.7)]
    kendall = [{"method": m, "ranking": "path order", "mean": 0.9, "min": 0.9, "pairs": 1} for m in ("spp", "lasso")]
    _record(root, "seed_stability", "20200101T000000Z-00000006", {"model": "embedded-vit", "study": "seed_stability"},
            {"rows": seed_rows, "info": {"label": VIT, "jaccard": jaccard, "kendall": kendall}, "search": None})
    kl_rows = [{"kappa": k, "lam": lam, "nu": nu, "top1_head_refit": 0.5 + k / 100 + lam, "top1_no_retrain": 0.1,
                "path_length": 10 * k, "entered_fraction": 0.5, "budget_macs_fraction": 0.5,
                "stability_jaccard": 0.7 if nu == 1.0 else None,  # None: one seed only
                "path_healthy": lam != 0.1}  # degenerate cells are marked in the heat map, not plotted
               for k in (1.0, 10.0) for lam in (0.01, 0.05, 0.1) for nu in (1.0, 10.0)]
    _record(root, "kappa_lambda", "20200101T000000Z-00000007", {"model": "embedded-vit", "study": "kappa_lambda"},
            {"rows": kl_rows, "info": {"label": VIT, "budget_macs_fraction": 0.5}, "search": None,
             "path_health": {"kappa=1.0 lam=0.1": {"applicable": True, "healthy": False, "entered": 0.99,
                                                   "max_step_share": 0.835, "loss_ratio_half": 8.2, "steps": 30,
                                                   "problems": ["83.5% of the entered entries entered at step 35"]},
                             "kappa=10.0 lam=0.01": {"applicable": True, "healthy": True, "entered": 0.95,
                                                     "max_step_share": 0.03, "loss_ratio_half": 1.4, "steps": 30,
                                                     "problems": []},
                             "lasso": {"applicable": False}}})
    cost_rows = [{"model": "embedded-vit", "method": "spp", "macs_fraction": f, "macs": 100 * f, "params": 10,
                  "batch_size": bs, "latency_ms": 10 * f * 1.2, "dense_latency_ms": 10.0, "speedup": 1 / (f * 1.2),
                  "macs_reduction": 1 / f, "speedup_over_macs_reduction": 1 / 1.2, "device": dev}
                 for f in (0.7, 0.5) for bs in (1, 32) for dev in ("cpu", "cuda")]
    _record(root, "cost_latency", "20200101T000000Z-00000008", {"model": "embedded-vit", "study": "cost_latency"},
            {"rows": cost_rows, "info": {"label": VIT, "family_cost": {"spp_search_s": 10.0, "budgets": 2,
                                                                     "ratio_final_runs_only": 0.25,
                                                                     "ratio_with_bisection": 0.1},
                                         "search_step": {"ratio": 1.5, "spp_step_s": 0.3, "plain_step_s": 0.2},
                                         "gpu": "Test GPU"}, "search": None})


EXPECTED_TABLES = {"quickstart.csv", "vision_table.csv", "paper_vision.csv", "clip_table.csv", "paper_clip.csv",
                   "llm_table.csv", "llm_structured.csv", "paper_llm.csv", "solution_path_nested.csv",
                   "seed_stability.csv", "seed_kendall.csv", "kappa_lambda.csv", "cost_latency.csv",
                   "cost_summary.csv", "path_health.csv"}
EXPECTED_FIGURES = {"vision_top1_vs_macs.png", "clip_rsum_vs_macs.png", "llm_perplexity.png",
                    "path_support_embedded-vit.png", "path_entry_order_embedded-vit.png",
                    "path_support_embedded-swin.png", "path_entry_order_embedded-swin.png", "seed_stability.png",
                    "kappa_lambda.png", "latency_vs_macs.png"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("res") / "runs"
    _all_studies(root)
    rep = build_report(root=root)  # default out: the runs folder's parent
    return root, rep


def test_every_study_writes_its_tables_and_figures(synthetic):
    root, rep = synthetic
    out = root.parent
    assert rep["missing"] == {}
    assert {Path(t).name for t in rep["tables"]} == EXPECTED_TABLES
    assert {Path(f).name for f in rep["figures"]} == EXPECTED_FIGURES
    assert all(Path(t).parent == out / "tables" for t in rep["tables"])
    assert all(Path(f).parent == out / "figures" for f in rep["figures"])
    for f in rep["figures"]:
        assert Path(f).read_bytes()[:8] == PNG, f
    # nothing half-written left behind (atomic writes go through hidden temp files)
    assert not [p for p in (out / "tables").iterdir() if p.name.startswith(".")]
    assert not [p for p in (out / "figures").iterdir() if p.name.startswith(".")]
    assert set(rep["sources"]) == set(report.STUDIES)
    index = Path(rep["index"]).read_text()
    for name in EXPECTED_TABLES | EXPECTED_FIGURES:
        assert name in index
    # the index names the runs folder relative to the report's checkout, never a machine's absolute path
    assert str(root.resolve()) not in index and f"`{out.name}/runs`" in index


def test_report_states_path_health_in_words(synthetic):
    root, rep = synthetic
    index = Path(rep["index"]).read_text()
    assert "## Path health" in index and "1 of 2 solution paths in these records are healthy" in index
    assert "kappa=1.0 lam=0.1: degenerate; 99.0% entered, at most 83.5% at one step, loss at half entered 8.2x" in index
    ph = pd.read_csv(root.parent / "tables" / "path_health.csv")
    assert len(ph) == 2 and set(ph["healthy"]) == {True, False}  # score paths (not applicable) are left out


def test_report_recomputes_the_health_of_records_written_before_diagnostics(tmp_path):
    import torch

    from sppbench.core.path import entry_health

    root = tmp_path / "runs"
    folder = _solution_path(root, "20200101T000000Z-00000001", "embedded-vit", search={"method": "spp", "steps": 10})
    rep = build_report(root=root, out=tmp_path, studies=["solution_path"])
    (row,) = rep["health"]
    table = pd.read_csv(folder / "path.csv")
    steps = torch.tensor(table["entry_step"].to_numpy())
    expect = entry_health(steps.double(), steps, json.loads((folder / "history.json").read_text()))
    assert row["search"] == "search (recomputed)" and row["entered"] == pytest.approx(expect["entered"])
    assert row["max_step_share"] == pytest.approx(expect["max_step_share"]) and row["healthy"] == expect["healthy"]
    assert expect["entered"] == pytest.approx(24 / 30)  # 6 of the 30 synthetic entries never enter
    entered = table["entry_step"][table["entry_step"] >= 0]
    assert row["max_step_share"] == pytest.approx(entered.value_counts().max() / len(entered))
    assert "search (recomputed): degenerate" in Path(rep["index"]).read_text()


def test_every_table_names_its_run_and_stand_in(synthetic):
    root, rep = synthetic
    for t in rep["tables"]:
        df = pd.read_csv(t)
        assert "source_run" in df and df["source_run"].notna().all() and len(df), t
        name = Path(t).name
        if name.startswith("paper_"):
            assert (df["source"] == PAPER_SOURCE).all() and "reported_by" in df
        else:
            # every synthetic record is a stand-in (labels 'stand-in: ...', or SmolLM2): rows carry the label
            assert "stand_in" in df and df["stand_in"].notna().all(), name
    runs = {r.name for study in report.STUDIES for r in list_records(study, root)}
    for t in rep["tables"]:
        if not Path(t).name.startswith("paper_"):
            assert set(pd.read_csv(t)["source_run"]) <= runs
    llm = pd.read_csv(Path(rep["tables"][0]).parent / "llm_table.csv")
    assert set(llm["stand_in"]) == {"SmolLM2 test"}  # smollm2 is a stand-in though its label does not say so


def test_newest_record_per_model_and_mean_over_seeds(synthetic):
    root, rep = synthetic
    t = pd.read_csv(root.parent / "tables" / "vision_table.csv")
    assert set(t["model"]) == {"embedded-vit", "embedded-swin"}
    vit = t[(t["model"] == "embedded-vit") & (t["method"] == "spp")]
    assert len(vit) == 1
    row = vit.iloc[0]
    assert row["source_run"] == "20200102T000000Z-000000bb"  # the newer record of the model, not ...aa
    assert row["seeds"] == 2
    assert row["top1_head_refit"] == pytest.approx(0.7)
    assert row["top1_head_refit_sd"] == pytest.approx(0.1 * 2 ** 0.5)  # sample sd (ddof = 1) of (0.6, 0.8)
    assert row["top1_no_retrain"] == pytest.approx(0.35)
    assert row["macs_fraction"] == pytest.approx(0.505)
    swin = t[(t["model"] == "embedded-swin") & (t["method"] == "spp")].iloc[0]
    assert swin["source_run"] == "20200101T120000Z-000000cc" and pd.isna(swin["top1_head_refit_sd"])  # one seed
    assert rep["sources"]["vision_table"] == "20200101T120000Z-000000cc, 20200102T000000Z-000000bb"


def test_study_tables_hold_the_records_numbers(synthetic):
    root, _ = synthetic
    tables = root.parent / "tables"
    clip = pd.read_csv(tables / "clip_table.csv")
    spp = clip[(clip["method"] == "spp") & (clip["budget_macs_fraction"] == 0.5)].iloc[0]
    assert spp["refit_rsum"] == pytest.approx(155.0) and spp["refit_rsum_sd"] == pytest.approx(5.0 * 2 ** 0.5)
    seed = pd.read_csv(tables / "seed_stability.csv")
    s = seed[(seed["method"] == "spp") & (seed["budget_macs_fraction"] == 0.7)].iloc[0]
    assert s["top1_head_refit"] == pytest.approx(0.72) and s["top1_head_refit_sd"] == pytest.approx(0.02 * 2 ** 0.5)
    assert s["jaccard_mean"] == pytest.approx(0.8) and s["jaccard_min"] == pytest.approx(0.5)
    assert seed[seed["method"] == "lasso"]["jaccard_mean"].tolist() == pytest.approx([0.6, 0.6])
    kendall = pd.read_csv(tables / "seed_kendall.csv")
    assert set(kendall["method"]) == {"spp", "lasso"} and kendall["kendall_tau_mean"].tolist() == [0.9, 0.9]
    structured = pd.read_csv(tables / "llm_structured.csv")
    assert structured["perplexity"].tolist() == [20.0, 90.0]
    summary = pd.read_csv(tables / "cost_summary.csv")
    assert sorted(summary["value"].dropna().tolist()) == [0.1, 0.25, 1.5]
    assert "Test GPU" in set(summary["settings"])
    kl = pd.read_csv(tables / "kappa_lambda.csv")
    assert len(kl) == 12 and kl["stability_jaccard"].isna().sum() == 6
    nested = pd.read_csv(tables / "solution_path_nested.csv")
    assert set(nested["model"]) == {"embedded-vit", "embedded-swin"} and len(nested) == 6
    quick = pd.read_csv(tables / "quickstart.csv")
    assert quick["top1_head_refit"].tolist() == [0.9, 0.8] and set(quick["stand_in"]) == {VIT}


def test_entry_order_matrix_sorts_each_layer_and_marks_never_entered():
    path = pd.DataFrame({"layer": [0, 0, 0, 1, 1], "entry_step": [5, -1, 2, 3, 1]})
    layers, mat = report._entry_matrix(path, max_step=9)
    assert layers == [0, 1]
    assert mat[0].tolist() == [2, 5, 10]  # never entered = max step + 1, sorted last
    assert mat[1, :2].tolist() == [1, 3] and np.isnan(mat[1, 2])  # a shorter layer is padded


def test_missing_and_malformed_records_are_reported_not_raised(tmp_path):
    root = tmp_path / "runs"
    # vision: the newest embedded-vit record is corrupt, the older one is fine -> not used in its place;
    # embedded-swin is fine -> used
    _vision(root, "20200101T000000Z-00000001", "embedded-vit", [0.6])
    _record(root, "vision_table", "20200102T000000Z-00000002", {"model": "embedded-vit"}, "{")
    _vision(root, "20200101T000000Z-00000003", "embedded-swin", [0.5])
    # single-record study whose newest record is corrupt JSON
    _record(root, "clip_table", "20200101T000000Z-00000004", {"model": "embedded-clip"}, "{")
    # valid JSON, but rows lack what the study needs
    _record(root, "llm_table", "20200101T000000Z-00000005", {"model": "smollm2"},
            {"rows": [{"x": 1}], "info": {"label": "x"}})
    # metrics without rows
    _record(root, "quickstart", "20200101T000000Z-00000006", {}, {"info": {}})
    rep = build_report(root=root, out=tmp_path / "out")
    missing = rep["missing"]
    assert "20200102T000000Z-00000002" in missing["vision_table"] and "embedded-vit" in missing["vision_table"]
    assert rep["sources"]["vision_table"] == "20200101T000000Z-00000003"  # only the swin record
    t = pd.read_csv(tmp_path / "out" / "tables" / "vision_table.csv")
    assert set(t["model"]) == {"embedded-swin"}
    assert "20200101T000000Z-00000004" in missing["clip_table"] and "malformed" in missing["clip_table"]
    assert "lack the column 'method'" in missing["llm_table"]
    assert "rows" in missing["quickstart"]
    for study in ("solution_path", "seed_stability", "kappa_lambda", "cost_latency"):
        assert missing[study] == (f"no record under {root / study}; run notebook {report.NOTEBOOKS[study]} "
                                  f"or nox -s reproduce")
    assert set(rep["sources"]) == {"vision_table"}
    names = {Path(p).name for p in rep["tables"] + rep["figures"]}
    assert names == {"vision_table.csv", "paper_vision.csv", "vision_top1_vs_macs.png"}
    index = Path(rep["index"]).read_text()
    assert "## Missing" in index and "clip_table" in index and "no record under" in index
    assert str(root) not in index and "no record under runs/solution_path" in index  # relative, not this machine's


def test_empty_root_and_unknown_study(tmp_path):
    rep = build_report(root=tmp_path / "nothing" / "runs", out=tmp_path / "out", studies=["vision_table"])
    assert rep["tables"] == [] and rep["figures"] == [] and rep["sources"] == {}
    assert list(rep["missing"]) == ["vision_table"] and "run notebook 10" in rep["missing"]["vision_table"]
    with pytest.raises(ValueError, match="unknown studies"):
        build_report(root=tmp_path, out=tmp_path / "out", studies=["nope"])


@pytest.mark.skipif(not REAL_RUNS.is_dir(), reason="no committed records in this checkout")
def test_committed_records_produce_their_tables(tmp_path):
    studies = ["quickstart", "vision_table", "clip_table", "llm_table"]
    rep = build_report(root=REAL_RUNS, out=tmp_path, studies=studies)
    assert rep["missing"] == {}
    names = {Path(t).name for t in rep["tables"]}
    llm_info = json.loads((list_records("llm_table", REAL_RUNS)[-1] / "metrics.json").read_text())["info"]
    assert names == {"quickstart.csv", "vision_table.csv", "paper_vision.csv", "clip_table.csv", "paper_clip.csv",
                     "llm_table.csv", "paper_llm.csv", "path_health.csv",
                     *(["llm_table_runs.csv"] if "summary" in llm_info else []),
                     *(["llm_structured.csv"] if llm_info.get("structured") else []),
                     *(["llm_zero_shot.csv", "llm_zero_shot_per_task.csv"]
                       if (llm_info.get("zero_shot") or {}).get("summary") else []),
                     *{n for n in names if n.endswith(("_unstructured.csv", "_unstructured_runs.csv",
                                                        "_unstructured_per_task.csv"))}}
    # a second run of notebook 30 (study llm_table_unstructured) adds its own tables when it has a record
    assert bool(list_records("llm_table_unstructured", REAL_RUNS)) == ("llm_table_unstructured.csv" in names)
    # the committed quickstart predates path diagnostics: the report recomputes its path's health from path.csv
    health = [(r["study"], r["search"], r["form"], r["healthy"]) for r in rep["health"]]
    assert [(h[0], h[3]) for h in health if h[0] == "quickstart"] == [("quickstart", False)]
    spp = [r for r in rep["health"] if r["study"] in ("vision_table", "clip_table") and r["search"].startswith("spp@")]
    assert spp  # the tables' SPP rows are read off paths whose health the records carry, all in the adam form ...
    assert all(r["form"] == "adam" for r in spp), spp
    # ... every one with a definite verdict, each degenerate one named in the report. The CLIP searches (the
    # stand-in's default step) are healthy; the vision tables' SPP searches run at the step sizes the validation
    # tuning chose (docs/tuning.md), which gave degenerate paths on both stand-ins: flagged, not hidden
    assert all(isinstance(r["healthy"], bool) for r in spp), spp
    assert all(r["healthy"] for r in spp if r["study"] == "clip_table")
    text = Path(rep["index"]).read_text()
    for r in spp:
        if not r["healthy"]:
            assert f"`{r['run_id']}` {r['search']} (adam form, a labelled variant): degenerate" in text, r
    assert all(form is None for s, name, form, _ in health if name.startswith("dessilbi"))
    assert {Path(f).name for f in rep["figures"]} == {"vision_top1_vs_macs.png", "clip_rsum_vs_macs.png",
                                                      "llm_perplexity.png"} | (
        {"llm_perplexity_unstructured.png"} if list_records("llm_table_unstructured", REAL_RUNS) else set())
    for study in ("quickstart", "clip_table", "llm_table"):
        newest = list_records(study, REAL_RUNS)[-1]
        assert rep["sources"][study] == newest.name
        rows = pd.DataFrame(json.loads((newest / "metrics.json").read_text())["rows"])
        table = pd.read_csv(tmp_path / "tables" / f"{study}.csv")
        assert set(table["source_run"]) == {newest.name}
        if study == "clip_table":  # one row per method x budget (mean over seeds)
            assert len(table) == len(rows.groupby(["method", "budget_macs_fraction"]))
            assert table["refit_rsum"].sum() == pytest.approx(
                rows.groupby(["method", "budget_macs_fraction"])["refit_rsum"].mean().sum())
        elif study == "llm_table" and "summary" in llm_info:  # one row per method x pattern (mean over calibration seeds)
            assert len(table) == len(rows.groupby(["method", "pattern"]))
            assert table["perplexity"].sum() == pytest.approx(
                rows.groupby(["method", "pattern"])["perplexity"].mean().sum())
        else:
            assert len(table) == len(rows)
    vision = pd.read_csv(tmp_path / "tables" / "vision_table.csv")
    for model, part in vision.groupby("model"):
        newest = [r for r in list_records("vision_table", REAL_RUNS)
                  if json.loads((r / "params.json").read_text()).get("model") == model][-1]
        assert set(part["source_run"]) == {newest.name}
        assert part["stand_in"].str.startswith("stand-in").all()
        raw = pd.DataFrame(json.loads((newest / "metrics.json").read_text())["rows"])
        expect = raw.groupby(["method", "budget_macs_fraction"])["top1_head_refit"].mean()
        got = part.set_index(["method", "budget_macs_fraction"])["top1_head_refit"]
        assert got.sort_index().to_numpy() == pytest.approx(expect.sort_index().to_numpy())
    for t in rep["tables"]:
        assert "source_run" in pd.read_csv(t, nrows=1)


def test_report_shows_the_vision_table_inline_with_verdicts_and_hardware(tmp_path, monkeypatch):
    """A vision record with per-image results (written by the runner itself) is shown in report.md as a markdown
    table with intervals and verdicts, the settings and the hardware; the figure is linked inline."""
    from test_vision import tiny_task

    from sppbench.studies.vision_table import VisionTableConfig, run_vision_table

    root = tmp_path / "runs"
    monkeypatch.setenv("SPPBENCH_RESULTS", str(root))
    cfg = VisionTableConfig(methods=("spp", "spp-final-m", "random-spp-widths", "magnitude", "random"),
                            macs_fractions=(0.8, 0.5), steps=3, batch_size=8, seeds=2, resamples=200)
    res = run_vision_table(cfg, task=tiny_task(), progress=False)
    rep = build_report(root=root, out=tmp_path, studies=["vision_table"])
    assert rep["missing"] == {}
    text = Path(rep["index"]).read_text()
    # what was found comes first: the central question in words (2 seeds: no claim, so within noise), files last
    assert text.index("## What was found") < text.index("## Vision table") < text.index("## Files")
    m = res["summary"].set_index(["method", "budget_macs_fraction"]).loc[("spp-final-m", 0.5)]
    assert (f"- tiny-vit at 0.5 of the dense MACs: the entry order is within noise of its own final |M| "
            f"({-m['delta_head_refit'] * 100:+.2f} [{-m['delta_head_refit_hi'] * 100:+.2f}, "
            f"{-m['delta_head_refit_lo'] * 100:+.2f}] points)") in text
    assert "- tiny-vit, over its budgets: its own final |M|: beats at 0, loses at 0, within noise at 2 of 2" in text
    assert "## Vision table" in text and f"run `{res['record'].name}`" in text
    assert "Test images: 32; seeds: 2 per method with randomness (magnitude deterministic: one run)" in text
    assert "Hardware: " in text and " torch threads, " in text and "200 bootstrap resamples" in text
    assert "| method | MACs budget | seeds |" in text and "head_refit: vs spp, delta [95% CI] verdict" in text
    s = res["summary"]
    r = s[(s["method"] == "random") & (s["budget_macs_fraction"] == 0.5)].iloc[0]
    words = {"better": "better than spp", "worse": "worse than spp", "tie": "within noise of spp"}
    assert (f"- random at 0.5 MACs: {words[r['verdict_head_refit']]} ({r['delta_head_refit']:+.3f} "
            f"[{r['delta_head_refit_lo']:+.3f}, {r['delta_head_refit_hi']:+.3f}]") in text
    assert "Sanity checks" in text and "![vision table: top-1 vs MACs](figures/vision_top1_vs_macs.png)" in text
    assert "No tuning record" in text  # no vision_tuning record under this root: said, not hidden
    assert str(tmp_path) not in text  # no machine-specific path
    t = pd.read_csv(tmp_path / "tables" / "vision_table.csv")
    assert {"delta_head_refit_lo", "verdict_restandardised", "top1_restandardised_sd"} <= set(t.columns)


def test_report_shows_the_clip_table_inline_with_verdicts(tmp_path, monkeypatch):
    """A CLIP record with per-query ranks is shown in report.md with rsum per method and budget, the paired
    comparison with spp (table and words), the sanity checks and the hardware."""
    from test_clip import tiny_task

    from sppbench.studies.clip_table import ClipTableConfig, run_clip_table

    root = tmp_path / "runs"
    monkeypatch.setenv("SPPBENCH_RESULTS", str(root))
    cfg = ClipTableConfig(methods=("spp", "magnitude", "random"), macs_fractions=(0.8, 0.5), steps=3, batch_size=8,
                          refit_steps=3, finetune_steps=0, kappa=5.0, alpha=0.5, nu=50.0, lam=0.05, seeds=2,
                          resamples=200)
    res = run_clip_table(cfg, task=tiny_task(), progress=False)
    rep = build_report(root=root, out=tmp_path, studies=["clip_table"])
    assert rep["missing"] == {}
    text = Path(rep["index"]).read_text()
    assert "## CLIP table" in text and f"run `{res['record'].name}`" in text and "Hardware: " in text
    assert "| method | MACs budget | seeds | rsum no_retrain (mean ± sd) |" in text
    assert "refit: vs spp, delta [95% CI] verdict" in text and "no fine-tune" in text
    s = res["summary"]
    r = s[(s["method"] == "random") & (s["budget_macs_fraction"] == 0.5)].iloc[0]
    words = {"better": "better than spp", "worse": "worse than spp", "tie": "within noise of spp"}
    assert (f"- random at 0.5 MACs: {words[r['verdict_refit_rsum']]} ({r['delta_refit_rsum']:+.1f} "
            f"[{r['delta_refit_rsum_lo']:+.1f}, {r['delta_refit_rsum_hi']:+.1f}] rsum points)") in text
    assert "Sanity checks" in text and "not computed" not in text and str(tmp_path) not in text
    t = pd.read_csv(tmp_path / "tables" / "clip_table.csv")
    assert len(t) == len(s) and {"delta_refit_rsum_lo", "refit_rsum_sd"} <= set(t.columns)


def test_report_shows_the_llm_table_inline_with_ratios(tmp_path, monkeypatch):
    """An LLM record with calibration seeds and per-window NLLs is summarised per method and pattern, with the
    paired ratios against RIA and Wanda in a markdown table and in words."""
    from test_llm_table import tiny_table

    root = tmp_path / "runs"
    monkeypatch.setenv("SPPBENCH_RESULTS", str(root))
    res = tiny_table()
    rep = build_report(root=root, out=tmp_path, studies=["llm_table"])
    assert rep["missing"] == {}
    text = Path(rep["index"]).read_text()
    assert "## LLM table" in text and f"run `{res['record'].name}`" in text and "seeds [0, 1, 2]" in text
    assert "| method | pattern | seeds | perplexity (mean ± sd) | ratio vs ria [95% CI] verdict |" in text
    r = res["summary"].set_index("method").loc["spp-ria"]
    words = {"better": "lower perplexity than ria", "worse": "higher perplexity than ria", "tie": "within noise of ria"}
    assert (f"- spp-ria at {r['pattern']}: {words[r['verdict_vs_ria']]} (ratio {r['ratio_vs_ria']:.3f} "
            f"[{r['ratio_vs_ria_lo']:.3f}, {r['ratio_vs_ria_hi']:.3f}])") in text
    assert "figures/llm_perplexity.png" in text and str(tmp_path) not in text
    t = pd.read_csv(tmp_path / "tables" / "llm_table.csv")
    assert len(t) == len(res["summary"]) and {"ratio_vs_wanda_lo", "perplexity_sd"} <= set(t.columns)
    assert len(pd.read_csv(tmp_path / "tables" / "llm_table_runs.csv")) == len(res["table"])


@pytest.mark.skipif(not REAL_RUNS.is_dir(), reason="no committed records in this checkout")
def test_committed_llm_record_recomputes_from_its_window_nlls():
    """The newest committed LLM record with nll.npz: every row's perplexity is exp of its windows' mean NLL, and the
    stored summary (per-seed mean and sd, ratios against RIA and Wanda, their intervals) is recomputed from them."""
    import math

    from sppbench.studies.llm_table import summarize

    folders = [f for f in list_records("llm_table", REAL_RUNS) if (f / "nll.npz").is_file()]
    if not folders:
        pytest.skip("no committed LLM record keeps per-window NLLs yet")
    metrics = json.loads((folders[-1] / "metrics.json").read_text())
    info, rows = metrics["info"], pd.DataFrame(metrics["rows"])
    nll = dict(np.load(folders[-1] / "nll.npz"))
    assert {len(v) for v in nll.values()} == {info["statistics"]["windows"]} and info["statistics"]["windows"] >= 128
    for r in rows.itertuples():
        assert math.exp(nll[f"{r.model}|{r.method}|{r.pattern}|{r.seed}"].mean()) == pytest.approx(r.perplexity, rel=1e-9)
    got = summarize(rows, nll, model=rows["model"].iloc[0], resamples=info["statistics"]["resamples"])
    stored = pd.DataFrame(info["summary"])
    cols = [c for c in stored.columns if c.startswith("ratio_") or c in ("perplexity", "perplexity_sd")]
    pd.testing.assert_frame_equal(got[cols].reset_index(drop=True), stored[cols].reset_index(drop=True), rtol=1e-9)
    assert (got.filter(like="verdict_").fillna("") == stored.filter(like="verdict_").fillna("")).all().all()
    assert info["sanity"] == [] and info["calibration"]["seeds"] == [0, 1, 2]
    assert info["perplexity_data"]["articles_scored"] >= 0.9 * info["perplexity_data"]["articles_total"]


def test_committed_vision_records_recompute_from_their_per_image_results():
    """The newest committed vision record of each model that keeps correct.npz: every row's top-1 is the mean of its
    arrays, every delta and interval of the stored summary is recomputed from them, and its checks passed."""
    from sppbench.studies import stats
    from sppbench.studies.vision_table import _arrays, _seeded, correct_key

    checked = 0
    for folder in reversed(list_records("vision_table", REAL_RUNS)):
        if not (folder / "correct.npz").is_file():
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        info = metrics["info"]
        correct = dict(np.load(folder / "correct.npz"))
        lengths = {len(v) for v in correct.values()}
        assert lengths == {info["test_images"]}
        for r in metrics["rows"]:
            for st in info["stages"]:
                arr = correct[correct_key(r["model"], r["method"], r["budget_macs_fraction"], r["seed"], st)]
                assert arr.mean() == pytest.approx(r[f"top1_{st}"], abs=1e-6)
        summary = [r for r in info["summary"] if r["method"] not in ("dense", "spp")]
        for r in summary:
            a = _arrays(correct, r["model"], r["method"], r["budget_macs_fraction"], "head_refit")
            b = _arrays(correct, r["model"], "spp", r["budget_macs_fraction"], "head_refit")
            assert r["delta_head_refit"] == pytest.approx(np.mean(a, 0).mean() - np.mean(b, 0).mean(), abs=1e-9)
        r = summary[0]
        a = _arrays(correct, r["model"], r["method"], r["budget_macs_fraction"], "head_refit")
        b = _arrays(correct, r["model"], "spp", r["budget_macs_fraction"], "head_refit")
        got = stats.compare(a, b, resamples=info["statistics"]["resamples"], resample_seeds=True)
        assert (got["lo"], got["hi"]) == pytest.approx((r["delta_head_refit_lo"], r["delta_head_refit_hi"]))
        if "claim" in info["statistics"]:  # records since issue 36 store the claim (enough seeds, every bootstrap seed)
            assert stats.claim(got["verdict"], (len(a), len(b)), (_seeded(r["method"]), True)) == r["verdict_head_refit"]
        else:  # earlier records: one bootstrap seed's verdict, which this one equals where it is stable
            assert got["verdict"] == r["verdict_head_refit"] or not got["verdict_stable"]
        assert info["sanity"] == []  # no pruned row above dense, no accuracy rising as the budget shrinks
        checked += 1
    assert checked >= 1


@pytest.mark.skipif(not (REAL_RUNS / "vision_tuning").is_dir(), reason="no committed tuning records in this checkout")
def test_report_shows_the_committed_tuning_behind_the_vision_tables(tmp_path):
    """The step sizes the vision tables ran with come from the newest tuning record per model, shown inline."""
    rep = build_report(root=REAL_RUNS, out=tmp_path, studies=["vision_table"])
    text = Path(rep["index"]).read_text()
    assert "### Tuning (validation split; docs/tuning.md)" in text
    for folder in list_records("vision_tuning", REAL_RUNS):
        info = json.loads((folder / "metrics.json").read_text())["info"]
        model = json.loads((folder / "params.json").read_text())["model"]
        newest = [f for f in list_records("vision_tuning", REAL_RUNS)
                  if json.loads((f / "params.json").read_text())["model"] == model][-1]
        if folder == newest:
            assert f"run `{folder.name}`" in text and f"chosen `{json.dumps(info['chosen'])}`" in text
    assert text.count("**chosen**") >= 2
