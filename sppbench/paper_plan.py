"""The paper profile's run plan: which notebooks ``nox -s reproduce -- paper`` runs, with which parameters, read
from the environment (docs/usage.md, "The paper profile"). Plain Python, no torch and no other sppbench import:
the noxfile loads this file before it has installed anything, so a missing path stops the run at once.

Environment:
  SPPBENCH_PAPER_MODELS     comma-separated models; default: the four vision paper models when SPPBENCH_IMAGENET is
                            set and ViT-B-32 when SPPBENCH_COCO is set. Also timm:<name>, open_clip:<name>,
                            hf:<folder> (the LLM table, notebook 30).
  SPPBENCH_IMAGENET         the ImageNet-layout folder (vision models)
  SPPBENCH_COCO             the COCO Karpathy folder (CLIP models)
  SPPBENCH_PAPER_WEIGHTS    optional JSON file {model: weights file (vision) or open_clip tag / checkpoint (CLIP)};
                            absent: the hub's weights
  SPPBENCH_PAPER_CONSTANTS  optional JSON file {model: {"kappa", "alpha", "nu", "lam"}}; absent: the automatic
                            constants derived from each model (sppbench.core.auto)
  SPPBENCH_PAPER_PARAMS     optional JSON file {notebook: {parameter: value}} overriding PARAMS below
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

VISION = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "swin_tiny_patch4_window7_224")
CLIP = ("ViT-B-32", "ViT-L-14")
CONSTANT_NAMES = ("kappa", "alpha", "nu", "lam")
VISION_NB, CLIP_NB, LLM_NB = "10_vision_table.ipynb", "20_clip_retrieval.ipynb", "30_llm_zero_shot.ipynb"

# A first pass that fits a day on one GPU; the paper's 40 search epochs and 300 fine-tune epochs on 4 GPUs are the
# torchrun CLI's job (`torchrun ... -m sppbench search / finetune`, docs/usage.md).
PARAMS = {
    VISION_NB: {"steps": 2000, "seeds": 3, "lasso_trials": 6, "n_val": 10000, "n_test": 50000, "n_refit": 10000,
                "finetune_steps": 2000, "resamples": 2000},
    CLIP_NB: {"steps": 2000, "lasso_trials": 3, "n_val": 5000, "n_test": 5000, "refit_steps": 300,
              "finetune_steps": 2000, "methods": ["spp", "lasso", "dessilbi", "magnitude"]},
    # Wanda's setting: 128 calibration windows of 2048 tokens; perplexity on 2048-token windows; the paper's seven
    # zero-shot tasks on their whole splits (docs/zero_shot.md)
    LLM_NB: {"n_samples": 128, "seqlen": 2048, "eval_seqlen": 2048, "eval_windows": 128, "seeds": [0, 1, 2],
             "methods": ["magnitude", "wanda", "ria", "spp-ria", "sparsegpt"], "structured_steps": 200,
             "zero_shot_tasks": ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"],
             "zero_shot_docs": 0, "resamples": 2000, "study": "llm_table_paper"},
}
HOW = ("Set SPPBENCH_IMAGENET (DeiT / Swin: an ImageNet folder with train/ and val/ class folders) and / or "
       "SPPBENCH_COCO (CLIP: the COCO Karpathy folder), or name the models in SPPBENCH_PAPER_MODELS "
       "(e.g. deit_small_patch16_224,timm:vit_small_patch16_224,open_clip:ViT-B-32,hf:/models/llama-2-7b). "
       "Optional: SPPBENCH_PAPER_WEIGHTS / SPPBENCH_PAPER_CONSTANTS / SPPBENCH_PAPER_PARAMS (JSON files; docs/usage.md)")


class PlanError(ValueError):
    """The environment does not describe a runnable paper plan; the message says what to set."""


def json_file(environ: Mapping[str, str], var: str) -> dict:
    file = environ.get(var)
    if not file:
        return {}
    if not Path(file).is_file():
        raise PlanError(f"{var}={file} is not a file. {HOW}")
    try:
        data = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{var}={file} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{var}={file} must hold a JSON object, got {type(data).__name__}")
    return data


def kind(model: str) -> str:
    """"vision", "clip" or "llm": which table runs ``model``."""
    if model in VISION or model.startswith("timm:"):
        return "vision"
    if model in CLIP or model.startswith("open_clip:"):
        return "clip"
    if model.startswith("hf:"):
        return "llm"
    raise PlanError(f"unknown paper-profile model {model!r}: use {', '.join(VISION + CLIP)}, timm:<name>, "
                    "open_clip:<name> or hf:<folder>")


def models(environ: Mapping[str, str]) -> list[str]:
    """The models to run: SPPBENCH_PAPER_MODELS, else the paper models whose data path is set."""
    listed = [m.strip() for m in environ.get("SPPBENCH_PAPER_MODELS", "").split(",") if m.strip()]
    if listed:
        return listed
    out = list(VISION) if environ.get("SPPBENCH_IMAGENET") else []
    if environ.get("SPPBENCH_COCO"):
        out.append("ViT-B-32")
    if not out:
        raise PlanError(f"no paper-profile model to run. {HOW}")
    return out


def plan(environ: Mapping[str, str] | None = None) -> tuple[list[tuple[str, dict]], list[str]]:
    """([(notebook file name, papermill parameters)], models) of the paper profile for ``environ``."""
    environ = os.environ if environ is None else environ
    chosen = models(environ)
    by_kind: dict[str, list[str]] = {"vision": [], "clip": [], "llm": []}
    for m in chosen:
        by_kind[kind(m)].append(m)
    constants, weights, extra = (json_file(environ, v) for v in ("SPPBENCH_PAPER_CONSTANTS", "SPPBENCH_PAPER_WEIGHTS",
                                                             "SPPBENCH_PAPER_PARAMS"))
    bad = {m: c for m, c in constants.items() if m not in chosen or kind(m) == "llm" or not isinstance(c, dict)
           or set(c) != set(CONSTANT_NAMES)}
    if bad:
        raise PlanError(f"SPPBENCH_PAPER_CONSTANTS: every entry must be a model of this run ({', '.join(chosen)}) "
                        f"mapped to exactly {', '.join(CONSTANT_NAMES)}, and no LLM (its SPP-RIA settings are the LLM table's); "
                        f"wrong: {bad}. Leave a model out to use the automatic constants derived from it")
    stray = sorted(set(weights) - set(chosen))
    if stray:
        raise PlanError(f"SPPBENCH_PAPER_WEIGHTS names models this run does not have: {stray} (models: {chosen})")
    if by_kind["vision"] and not environ.get("SPPBENCH_IMAGENET"):
        raise PlanError(f"{', '.join(by_kind['vision'])} need SPPBENCH_IMAGENET (an ImageNet folder with train/ and "
                        "val/ class folders)")
    if by_kind["clip"] and not environ.get("SPPBENCH_COCO"):
        raise PlanError(f"{', '.join(by_kind['clip'])} need SPPBENCH_COCO (the COCO Karpathy folder)")
    books: list[tuple[str, dict]] = []
    if by_kind["vision"]:
        vs = by_kind["vision"]
        books.append((VISION_NB, {**PARAMS[VISION_NB], "models": vs, "data_root": environ["SPPBENCH_IMAGENET"],
                                  "constants": {m: constants[m] for m in vs if m in constants},
                                  "weights": {m: weights[m] for m in vs if m in weights},
                                  **extra.get(VISION_NB, {})}))
    for m in by_kind["clip"]:
        books.append((CLIP_NB, {**PARAMS[CLIP_NB], "model": m, "data_root": environ["SPPBENCH_COCO"],
                                "constants": {m: constants[m]} if m in constants else {},
                                **({"pretrained": weights[m]} if m in weights else {}),
                                **extra.get(CLIP_NB, {})}))
    for m in by_kind["llm"]:
        books.append((LLM_NB, {**PARAMS[LLM_NB], "model": m, **extra.get(LLM_NB, {})}))
    return books, chosen
