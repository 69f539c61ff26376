"""Vision tasks by name (``get_task``): the embedded ViT and Swin stand-ins, and the paper-profile models on ImageNet.

Each is a ``sppbench.tasks.task.VisionTask``, the one Task type the CLI, the vision table and the studies take."""
from __future__ import annotations

from typing import Callable

from ..errors import UnsupportedModelError
from .data import Batches
from .embedded import HEAD_WEIGHT_DECAY, IMG_SIZE, STAND_IN, embedded_classifier
from .embedded_swin import SWIN_STAND_IN, embedded_swin
from .evaluate import image_batches
from .models import split_spec, timm_model
from .profiles import PAPER_MODELS, imagenet_task, paper_config, timm_config
from .task import VisionTask


def embedded_vit_task(n_head: int = 3000, n_val: int = 1000, n_test: int = 2000, n_refit: int = 1000,
                      split_seed: int = 0, img_size: int | None = None) -> VisionTask:
    """The embedded DINOv2 ViT-S/14 classifier (stand-in), Fashion-MNIST splits; ``img_size`` (a multiple of 14)
    defaults to the embedded IMG_SIZE (the CLI's ``--img-size``)."""

    size = img_size or IMG_SIZE
    ec = embedded_classifier(size, n_fit=n_head, n_val=n_val, n_test=n_test, seed=split_seed)
    refit = ec.splits.fit.subset(range(min(n_refit, len(ec.splits.fit))))
    sets = {"refit": refit, "val": ec.splits.val, "test": ec.splits.test}
    return VisionTask(
        "embedded-vit", STAND_IN, ec.model, size, 10,
        lambda bs, steps, seed, shard=(0, 1): Batches(ec.splits.fit, size, bs, steps, seed=seed, shard=shard),
        lambda split: image_batches(sets[split], size), HEAD_WEIGHT_DECAY,
        {**ec.info, "refit_images": len(refit), "train_split": "fit (the head's training images)"})


def embedded_swin_task(n_val: int = 1000, n_test: int = 2000, n_refit: int = 1000, split_seed: int = 0,
                       **_) -> VisionTask:
    """The embedded compact Swin, trained here on Fashion-MNIST (stand-in, not a public checkpoint; trained
    once, ~3 min on 2 cores, then cached). Its own training images are the search / fine-tune / refit data;
    val and test are subsets of its held-out splits."""

    es = embedded_swin(seed=split_seed)
    sp = es.splits
    if n_val > len(sp.val) or n_test > len(sp.test):
        raise ValueError(f"embedded-swin holds {len(sp.val)} val and {len(sp.test)} test images; asked for {n_val} / "
                         f"{n_test}")
    sets = {"refit": sp.fit.subset(range(min(n_refit, len(sp.fit)))), "val": sp.val.subset(range(n_val)),
            "test": sp.test.subset(range(n_test))}
    size = es.img_size
    return VisionTask(
        "embedded-swin", SWIN_STAND_IN, es.model, size, 10,
        lambda bs, steps, seed, shard=(0, 1): Batches(sp.fit, size, bs, steps, seed=seed, shard=shard),
        lambda split: image_batches(sets[split], size), 1e-2,
        {**es.info, "refit_images": len(sets["refit"]), "val_images": n_val, "test_images": n_test,
         "train_split": "fit (the Swin's own training images)",
         "search_constants": "the embedded ViT's tuned SPP constants (not re-tuned for this Swin)"})


TASKS: dict[str, Callable[..., VisionTask]] = {"embedded-vit": embedded_vit_task, "embedded-swin": embedded_swin_task}


def get_task(name: str, data_root: str = "", *, weights: str | None = None, n_val: int | None = None,
             n_test: int | None = None, n_refit: int | None = None, **kw) -> VisionTask:
    """A vision task by name: an embedded stand-in, a paper-profile model (timm name) or ``timm:<name>`` (any timm
    ViT / DeiT / Swin, with the weights file ``weights``, else timm's hub weights) on the ImageNet-layout folder
    ``data_root`` (else $SPPBENCH_IMAGENET). ``n_val`` / ``n_test`` / ``n_refit``: split sizes (folder tasks: the
    validation and re-fit images carved from train, spread over the classes, and a subset of the test images)."""
    sizes = {k: v for k, v in (("n_val", n_val), ("n_test", n_test), ("n_refit", n_refit)) if v is not None}
    scheme, rest = split_spec(name)
    if scheme == "timm":
        model = timm_model(rest, weights)
        return imagenet_task(timm_config(rest, model, weights), data_root or None, model=model, **sizes)
    if scheme is not None:
        raise UnsupportedModelError(f"{name}: the vision tasks take timm:<name>; open_clip models run in the CLIP table "
                                    f"(clip-table --model open_clip:<name>) and hf:<folder> in the LLM table")
    if name in PAPER_MODELS:
        return imagenet_task(paper_config(name), data_root or None, weights_file=weights, **sizes)
    if name not in TASKS:
        raise UnsupportedModelError(f"unknown vision model {name!r}; embedded: {', '.join(TASKS)}; paper profiles: "
                                    f"{', '.join(PAPER_MODELS)} (sppbench/configs/paper_*.json); any timm ViT / DeiT / "
                                    "Swin: timm:<name> with --weights <file>")
    if weights:
        raise UnsupportedModelError(f"{name} is an embedded stand-in with its own weights; --weights applies to paper "
                                    "models and timm:<name>")
    return TASKS[name](**sizes, **kw)
