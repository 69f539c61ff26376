"""Any model by a spec string, with the user's own weights (docs/usage.md, "Your own model"):

* ``timm:<name>`` with a weights file (timm's ``pretrained_cfg_overlay``), else timm's hub weights;
* ``open_clip:<name>`` with an open_clip pretrained tag or a checkpoint file;
* ``hf:<path>`` a local Hugging Face causal LM folder (config.json, weights, tokenizer).

The family is detected before any weights are read (the architecture is built on the meta device for timm, the
folder's config.json is read for Hugging Face), so an unsupported architecture fails at once with what is supported.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..core.family import detect
from ..errors import DataError, UnsupportedModelError
from ..families import hf_llama

SCHEMES = {"timm": "timm:<name> --weights <file> (a timm ViT / DeiT / Swin; weights: a .pth / .safetensors state dict)",
           "open_clip": "open_clip:<name> --pretrained <tag or file> (an open_clip CLIP)",
           "hf": "hf:<folder> (a local Hugging Face LLaMA / Mistral / Qwen2 causal LM)"}
TIMM_FAMILIES = ("timm-vit", "timm-swin")
HF_MODEL_TYPES = tuple(hf_llama.MODEL_TYPES)


def split_spec(spec: str) -> tuple[str | None, str]:
    """("timm" | "open_clip" | "hf", name) for a spec string; (None, spec) for a plain name."""
    scheme, sep, rest = str(spec).partition(":")
    if sep and scheme in SCHEMES:
        if not rest:
            raise UnsupportedModelError(f"{spec!r} names no model: use {SCHEMES[scheme]}")
        return scheme, rest
    return None, str(spec)


def is_spec(spec: str, scheme: str | None = None) -> bool:
    """Whether ``spec`` is a model spec string (of ``scheme``, when given)."""
    s, sep, _ = str(spec).partition(":")
    return bool(sep) and s in SCHEMES and (scheme is None or s == scheme)


def supported() -> str:
    """One line naming every model spec sppbench takes."""
    return "; ".join(SCHEMES.values())


def timm_skeleton(name: str) -> nn.Module:
    """The timm model ``name`` built on the meta device (no memory, no weights), checked to be a family sppbench
    prunes; raises UnsupportedModelError naming what is supported."""
    import timm

    if not timm.is_model(name):
        raise UnsupportedModelError(f"timm has no model {name!r} (timm {timm.__version__}); e.g. "
                                    "timm:deit_small_patch16_224, timm:swin_tiny_patch4_window7_224")
    with torch.device("meta"):
        skeleton = timm.create_model(name, pretrained=False)
    try:
        fam = detect(skeleton).name
    except UnsupportedModelError:
        fam = None
    if fam not in TIMM_FAMILIES:
        raise UnsupportedModelError(f"timm:{name} is a {type(skeleton).__name__}, which sppbench cannot prune; the "
                                    f"timm families it prunes: VisionTransformer (ViT, DeiT, DINOv2) and "
                                    f"SwinTransformer. Supported model specs: {supported()}")
    return skeleton


def timm_model(name: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """The timm model ``name`` with the weights in the file ``weights`` (else timm's hub weights), eval mode.
    Checked before any weight is read: timm knows the name, sppbench has an adapter for its family."""
    import timm

    timm_skeleton(name)  # the name and family, checked before any weight is read
    kw: dict = {}
    if weights:
        file = Path(weights).expanduser()
        if not file.is_file():
            raise DataError(f"the weights file {file} does not exist; pass the path of a {name} state dict "
                            "(.pth / .bin / .safetensors) with --weights")
        kw["pretrained_cfg_overlay"] = {"file": str(file)}
    elif os.environ.get("HF_HUB_OFFLINE"):
        raise DataError(f"timm:{name} without --weights reads timm's hub weights, and HF_HUB_OFFLINE is set: pass "
                        f"--weights <file> (a state dict of {name}) or unset HF_HUB_OFFLINE on a machine with hub access")
    try:
        model = timm.create_model(name, pretrained=True, **kw)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:  # hub unreachable, corrupt or mismatched file
        raise DataError(f"could not load the weights of timm:{name} ({str(exc)[:400]}); the file must be a state "
                        f"dict of exactly this architecture (timm.create_model({name!r}).state_dict())") from exc
    return model.eval()


def timm_input_size(model: nn.Module) -> int:
    """The square input size a timm model was built for (its pretrained_cfg, else its patch embed)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size:
        return int(size[-1] if isinstance(size, (tuple, list)) else size)
    raise UnsupportedModelError(f"cannot tell the input size of {type(model).__name__}")


def open_clip_model(name: str, pretrained: str | os.PathLike | None) -> nn.Module:
    """The open_clip model ``name`` with ``pretrained`` (an open_clip tag or a local checkpoint file)."""
    from .clip import create_model

    if not pretrained:
        raise DataError(f"open_clip:{name} needs its weights: pass --pretrained <tag> (e.g. openai, laion2b_s34b_b79k) "
                        "or --pretrained <checkpoint file>")
    if (os.sep in str(pretrained) or str(pretrained).endswith((".pt", ".pth", ".bin", ".safetensors"))) \
            and not Path(pretrained).expanduser().is_file():
        raise DataError(f"the open_clip checkpoint {pretrained} does not exist; pass a file or an open_clip tag")
    if os.environ.get("HF_HUB_OFFLINE") and not Path(str(pretrained)).expanduser().is_file():
        raise DataError(f"open_clip:{name} with the tag {pretrained!r} reads the hub, and HF_HUB_OFFLINE is set: pass a "
                        "local checkpoint file as --pretrained, or unset HF_HUB_OFFLINE on a machine with hub access")
    model = create_model(name, pretrained=str(Path(pretrained).expanduser())
                         if Path(str(pretrained)).expanduser().is_file() else str(pretrained))
    fam = detect(model).name
    if fam != "open-clip":
        raise UnsupportedModelError(f"open_clip:{name} built a {type(model).__name__} ({fam}); the CLIP table "
                                    f"takes a whole open_clip CLIP. Supported model specs: {supported()}")
    return model


def hf_model_type(folder: str | os.PathLike) -> str:
    """The model_type of a local Hugging Face model folder, checked to be one sppbench prunes."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"hf:{folder}: the folder {root} does not exist; pass a local Hugging Face model folder "
                        "(config.json, model weights, tokenizer files), e.g. one written by save_pretrained()")
    cfg = root / "config.json"
    if not cfg.is_file():
        raise DataError(f"hf:{folder}: {cfg} is missing; the folder must hold a transformers model "
                        "(save_pretrained() writes config.json)")
    try:
        kind = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{cfg} is not valid JSON ({exc}); re-save the model with save_pretrained()") from exc
    if kind not in HF_MODEL_TYPES:
        raise UnsupportedModelError(f"hf:{folder} is a {kind!r} model; sppbench prunes the Hugging Face causal LMs "
                                    f"{', '.join(HF_MODEL_TYPES)} (family hf-llama). Supported model specs: "
                                    f"{supported()}")
    return kind


def hf_causal_lm(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a local Hugging Face causal LM folder, every weight checked to be loaded."""
    from .llm_data import load_causal_lm

    hf_model_type(folder)
    model, tokenizer = load_causal_lm(Path(folder).expanduser(), dtype)
    return model.eval(), tokenizer
