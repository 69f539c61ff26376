"""The one Task type of the image studies: a dense classifier, its data splits and its evaluation hooks.

Embedded and paper-profile tasks alike are built by ``sppbench.tasks.vision.get_task``; the CLI, the vision
table and the studies 40-70 all take one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

from ..core.masks import MaskedModel
from ..families import attach_masks
from .evaluate import loader_top1


@dataclass
class VisionTask:
    """A dense timm classifier plus its data splits.

    ``train_batches(batch_size, steps, seed, shard=(rank, world))``: re-iterable (x, y) batches of the training
    split (``batch_size`` is the global batch; a shard is this process's slice of it in data-parallel runs)
    (search, Lasso, DessiLBI, Taylor scores and fine-tuning all draw from it);
    ``loader(split)``: (x, y) batches of 'refit' (training images for the head re-fit), 'val'
    (training images held out: read-out choice) or 'test' (reporting only).
    """

    name: str
    label: str
    dense: nn.Module
    img_size: int
    num_classes: int
    train_batches: Callable[[int, int, int], Iterable]
    loader: Callable[[str], Iterable]
    head_weight_decay: float
    info: dict

    def attach(self, model: nn.Module | None = None) -> "MaskedModel":
        """Masks on ``model`` (default: this task's dense model), with this task's input size for MAC budgets."""

        return attach_masks(self.dense if model is None else model, input_size=(3, self.img_size, self.img_size))

    def test_top1(self, model: nn.Module | None = None) -> float:
        """Top-1 of ``model``'s own head (default: the dense model) on the 'test' split."""

        return loader_top1(self.dense if model is None else model, self.loader("test"))
