"""The paper profile's plan (sppbench/paper_plan.py, which `nox -s reproduce -- paper` loads before installing
anything): which notebooks run with which parameters, and a clear stop when the environment describes no run."""
from __future__ import annotations

import json

import pytest

from sppbench import paper_plan as P


def test_no_data_and_no_models_stops_with_what_to_set():
    with pytest.raises(P.PlanError, match="SPPBENCH_IMAGENET"):
        P.plan({})


def test_imagenet_alone_runs_the_four_vision_models_with_automatic_constants():
    books, models = P.plan({"SPPBENCH_IMAGENET": "/data/imagenet"})
    assert models == list(P.VISION)
    (nb, params), = books
    assert nb == P.VISION_NB and params["models"] == list(P.VISION) and params["data_root"] == "/data/imagenet"
    assert params["constants"] == {} and params["weights"] == {}  # constants: derived from each model


def test_models_weights_constants_and_overrides_reach_their_notebooks(tmp_path):
    consts = {"timm:vit_small_patch16_224": {"kappa": 10, "alpha": 0.01, "nu": 5, "lam": 0.09}}
    (tmp_path / "c.json").write_text(json.dumps(consts))
    (tmp_path / "w.json").write_text(json.dumps({"timm:vit_small_patch16_224": "/w/vit.pth",
                                                 "open_clip:ViT-B-16": "/w/clip.pt"}))
    (tmp_path / "p.json").write_text(json.dumps({P.VISION_NB: {"steps": 7}, P.LLM_NB: {"seeds": [0]}}))
    env = {"SPPBENCH_PAPER_MODELS": "timm:vit_small_patch16_224, open_clip:ViT-B-16,hf:/m/llama",
           "SPPBENCH_IMAGENET": "/i", "SPPBENCH_COCO": "/c", "SPPBENCH_PAPER_CONSTANTS": str(tmp_path / "c.json"),
           "SPPBENCH_PAPER_WEIGHTS": str(tmp_path / "w.json"), "SPPBENCH_PAPER_PARAMS": str(tmp_path / "p.json")}
    books, models = P.plan(env)
    assert models == ["timm:vit_small_patch16_224", "open_clip:ViT-B-16", "hf:/m/llama"]
    by = {nb: p for nb, p in books}
    assert by[P.VISION_NB]["constants"] == consts and by[P.VISION_NB]["weights"] == {
        "timm:vit_small_patch16_224": "/w/vit.pth"} and by[P.VISION_NB]["steps"] == 7
    assert by[P.CLIP_NB]["model"] == "open_clip:ViT-B-16" and by[P.CLIP_NB]["pretrained"] == "/w/clip.pt"
    assert by[P.CLIP_NB]["data_root"] == "/c" and by[P.CLIP_NB]["constants"] == {}
    assert by[P.LLM_NB]["model"] == "hf:/m/llama" and by[P.LLM_NB]["seeds"] == [0]


@pytest.mark.parametrize("env, says", [
    ({"SPPBENCH_PAPER_MODELS": "resnet50"}, "unknown paper-profile model 'resnet50'"),
    ({"SPPBENCH_PAPER_MODELS": "deit_small_patch16_224"}, "need SPPBENCH_IMAGENET"),
    ({"SPPBENCH_PAPER_MODELS": "ViT-B-32"}, "need SPPBENCH_COCO"),
    ({"SPPBENCH_IMAGENET": "/i", "SPPBENCH_PAPER_CONSTANTS": "/no/such.json"}, "is not a file"),
])
def test_bad_environments_stop_with_a_clear_message(env, says):
    with pytest.raises(P.PlanError, match=says):
        P.plan(env)


def test_bad_constants_and_weights_files_are_refused(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"deit_small_patch16_224": {"kappa": 1}}))
    with pytest.raises(P.PlanError, match="exactly kappa, alpha, nu, lam"):
        P.plan({"SPPBENCH_IMAGENET": "/i", "SPPBENCH_PAPER_CONSTANTS": str(f)})
    f.write_text("{not json")
    with pytest.raises(P.PlanError, match="not valid JSON"):
        P.plan({"SPPBENCH_IMAGENET": "/i", "SPPBENCH_PAPER_CONSTANTS": str(f)})
    f.write_text(json.dumps({"ViT-L-14": "/w.pt"}))
    with pytest.raises(P.PlanError, match="names models this run does not have"):
        P.plan({"SPPBENCH_IMAGENET": "/i", "SPPBENCH_PAPER_WEIGHTS": str(f)})


def test_every_planned_parameter_is_a_parameter_of_its_notebook():
    """papermill silently ignores a parameter the notebook does not define: a typo here would never run."""
    import ast
    from pathlib import Path

    nbs = Path(__file__).parent.parent / "notebooks"
    books, _ = P.plan({"SPPBENCH_PAPER_MODELS": "deit_small_patch16_224,ViT-B-32,hf:/m", "SPPBENCH_IMAGENET": "/i",
                       "SPPBENCH_COCO": "/c"})
    assert sorted(nb for nb, _ in books) == sorted(P.PARAMS)
    for nb, params in books:
        cells = json.loads((nbs / nb).read_text())["cells"]
        cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
        names = {t.id for n in ast.parse("".join(cell["source"])).body if isinstance(n, ast.Assign) for t in n.targets}
        assert set(params) <= names, (nb, set(params) - names)
