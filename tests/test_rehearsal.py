"""The paper profile's dress rehearsal: its own entry points, end to end, on miniatures of what it reads from a
user's machine (an ImageNet-layout folder, a timm weights file, a COCO-layout caption folder with an open_clip
checkpoint, a local Hugging Face LLaMA folder), with no hub access:

  paper-check (the CLI)  ->  sppbench.paper_plan.plan (what `nox -s reproduce -- paper` runs)  ->  notebooks 10 / 20 / 30
  through papermill with the plan's parameters, shrunk by SPPBENCH_PAPER_PARAMS to a few steps  ->  records.

Every record says it is a rehearsal (info.rehearsal), and the report refuses it as a result. Random-init models on
synthetic data: the figures mean nothing; what is checked is that every stage ran and recorded what it did.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sppbench import paper_plan
from sppbench.tasks import miniatures
from sppbench.tasks.captions import write_miniature

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
SHRUNK = {  # the paper plan's parameters cut to a few steps and images (SPPBENCH_PAPER_PARAMS)
    paper_plan.VISION_NB: {"steps": 3, "seeds": 1, "lasso_trials": 2, "n_val": 4, "n_test": 12, "n_refit": 4,
                           "finetune_steps": 2, "resamples": 100, "macs_fractions": [0.5],
                           "methods": ["spp", "spp-official", "lasso", "magnitude", "tp-magnitude"]},
    paper_plan.CLIP_NB: {"steps": 3, "lasso_trials": 2, "n_val": 8, "n_test": 12, "refit_steps": 5,
                         "finetune_steps": 2, "resamples": 100, "macs_fractions": [0.5],
                         "methods": ["spp", "lasso", "magnitude"]},
    paper_plan.LLM_NB: {"methods": ["magnitude", "wanda", "ria", "spp-ria"], "patterns": ["0.5"], "n_samples": 4,
                        "seqlen": 64, "eval_seqlen": 64, "eval_windows": 4, "spp_steps": 3,
                        "structured_fractions": [0.9], "structured_steps": 2, "zero_shot_tasks": ["boolq"],
                        "zero_shot_docs": 4, "seeds": [0], "resamples": 100},
}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """The miniatures and the environment a user would set for `nox -s reproduce -- paper`."""
    d = tmp_path_factory.mktemp("rehearsal")
    inet = miniatures.write_imagenet_miniature(d / "imagenet", classes=4, train_per_class=12, val_per_class=3)
    vit = miniatures.write_timm_weights("test_vit", d / "weights" / "test_vit.pth")
    clip = miniatures.write_open_clip_weights("sppbench-rehearsal-clip", d / "weights" / "clip.pt")
    coco = write_miniature(d / "coco", "coco", {"train": 48, "val": 8, "test": 12})
    llm = miniatures.write_hf_causal_lm(d / "llm")
    models = ["timm:test_vit", "open_clip:sppbench-rehearsal-clip", f"hf:{llm}"]
    (d / "weights.json").write_text(json.dumps({models[0]: str(vit), models[1]: str(clip)}))
    (d / "params.json").write_text(json.dumps(SHRUNK))
    env = {**os.environ, "SPPBENCH_PAPER_MODELS": ",".join(models), "SPPBENCH_IMAGENET": str(inet),
           "SPPBENCH_COCO": str(coco), "SPPBENCH_PAPER_WEIGHTS": str(d / "weights.json"),
           "SPPBENCH_PAPER_PARAMS": str(d / "params.json"), "SPPBENCH_RESULTS": str(d / "results"),
           "SPPBENCH_REHEARSAL": "tests/test_rehearsal.py", "HF_HUB_OFFLINE": "1"}
    env.pop("SPPBENCH_PAPER_CONSTANTS", None)
    return {"dir": d, "env": env, "models": models}


def _run(cmd: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def test_paper_check_says_ready_for_every_planned_model(stage):
    res = _run([sys.executable, "-m", "sppbench", "paper-check", "--models", *stage["models"], "--min-gpus", "0"],
               stage["env"])
    assert [line for line in res.stdout.splitlines() if line.startswith("ready:")] == \
        [f"ready: {m}" for m in stage["models"]]


@pytest.fixture(scope="module")
def records(stage):
    """Run every notebook of the paper plan through papermill, as `nox -s reproduce -- paper` does."""
    books, models = paper_plan.plan(stage["env"])
    assert models == stage["models"]
    out = {}
    for nb, params in books:
        pfile = stage["dir"] / f"{nb}.params.json"
        pfile.write_text(json.dumps(params))
        _run([sys.executable, "-m", "papermill", "--cwd", str(ROOT / "notebooks"), str(ROOT / "notebooks" / nb),
              str(stage["dir"] / f"executed-{nb}"), "-f", str(pfile)], stage["env"])
    for study in ("vision_table", "clip_table", paper_plan.PARAMS[paper_plan.LLM_NB]["study"]):
        folders = sorted((stage["dir"] / "results" / study).iterdir())
        assert len(folders) == 1, (study, folders)
        out[study] = json.loads((folders[0] / "metrics.json").read_text())
    return out


def test_every_record_is_labelled_a_rehearsal(records):
    for study, m in records.items():
        assert "DRESS REHEARSAL" in m["info"]["rehearsal"], study


def test_vision_row_from_a_timm_spec_with_automatic_and_released_constants(records):
    m = records["vision_table"]
    rows = [r for r in m["rows"] if r["model"] == "timm:test_vit"]
    methods = {r["method"] for r in rows}
    assert {"dense", "spp", "spp-official", "magnitude"} <= methods
    spp = next(r for r in rows if r["method"] == "spp")
    assert spp["form"] == "paper" and spp["macs_fraction"] <= 0.5 + 1e-9 and "top1_finetuned" in spp
    info = m["info"]
    assert info["spp_constants_source"] == "auto" and info["spp_auto"]["measured"]["lambda_max"] > 0
    assert info["spp_search_constants"] == info["spp_constants"]  # the paper form searches with the derived ones
    assert {k: info["spp_official_constants"][k] for k in ("kappa", "lam", "alpha")} == \
        {"kappa": 1.0, "lam": 3.0, "alpha": 1e-3}
    assert info["task"]["weights"].endswith("test_vit.pth") and info["task"]["classes"] == 4
    assert "own_head_note" in info["task"]  # a 1000-class head on a 4-class folder: said, not hidden


def test_clip_row_from_an_open_clip_spec(records):
    m = records["clip_table"]
    assert {r["method"] for r in m["rows"]} >= {"dense", "spp", "magnitude"}
    assert m["info"]["spp_constants_source"] == "auto" and "spp_auto" in m["info"]


def test_llm_row_from_a_local_hf_folder(records):
    m = records[paper_plan.PARAMS[paper_plan.LLM_NB]["study"]]
    assert {r["method"] for r in m["rows"]} >= {"dense", "wanda", "ria", "spp-ria"}
    assert m["info"]["label"].startswith("hf:")


def test_the_report_refuses_rehearsal_records(records, stage):
    from sppbench.report.build import build_report

    rep = build_report(root=stage["dir"] / "results", out=stage["dir"] / "report")
    assert "dress-rehearsal" in json.dumps(rep["missing"])


def test_llm_table_command_on_a_local_hf_folder(stage):
    llm = stage["models"][2]
    res = _run([sys.executable, "-m", "sppbench", "llm-table", "--model", llm, "--methods", "magnitude", "wanda",
                "--patterns", "0.5", "--n-samples", "2", "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "2",
                "--seeds", "0", "--structured-methods", "--resamples", "100"], stage["env"])
    assert "wanda" in res.stdout and "record:" in res.stdout
