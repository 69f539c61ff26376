"""sppbench: Solution Path Pruning (SPP, ICLR 2025) for pretrained transformers, with baselines.

    m = sppbench.attach_masks(model)              # structured masks, all 1
    path = sppbench.search(m, batches, loss_fn, steps=..., kappa=..., alpha=..., nu=..., lam=...)
    keep = path.keep(fraction=0.5)                # or params=N / macs=N, any budget, one path
    small = sppbench.compress(m, keep)            # physically narrower model
    sppbench.save_pruned(small, folder); sppbench.load_pruned(folder)
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from . import distributed, dynamics, measure
from .compress import compress, load_pruned, save_pruned
from .errors import (BudgetError, ConfigError, DataError, SearchDivergedError, SpecError, SppBenchError,
                     UnsupportedModelError)
from .families import detect as _detect
from .masks import MaskedModel, MaskGroup
from .path import KeepSet, SolutionPath
from .train import finetune, search

__version__ = "0.1.0"


def attach_masks(model: nn.Module, *, input_size: int | Sequence[int] | None = None) -> MaskedModel:
    """Put pair-wise structured masks (all 1) on every block of ``model``, in place.

    The family (timm ViT / DeiT / DINOv2, ...) is detected from the model; an unsupported model
    raises UnsupportedModelError. ``input_size`` ((C,) H, W or an int) sets the token count used
    for MAC budgets; by default the model's own image size.
    """
    if isinstance(model, MaskedModel):
        raise UnsupportedModelError("this model already carries masks (it is a MaskedModel)")
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"attach_masks() takes a torch.nn.Module, got {type(model).__name__}")
    return _detect(model).attach(model, input_size)


__all__ = [
    "attach_masks", "search", "finetune", "compress", "save_pruned", "load_pruned", "SolutionPath", "KeepSet",
    "MaskedModel", "MaskGroup", "distributed", "dynamics", "measure", "SppBenchError", "UnsupportedModelError",
    "BudgetError", "ConfigError", "SearchDivergedError", "SpecError", "DataError", "__version__",
]
