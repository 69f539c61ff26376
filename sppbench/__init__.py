"""sppbench: Solution Path Pruning (SPP, ICLR 2025) for pretrained transformers, with baselines.

    m = sppbench.attach_masks(model)              # structured masks, all 1
    path = sppbench.search(m, batches, loss_fn, steps=..., kappa=..., alpha=..., nu=..., lam=...)
    keep = path.keep(fraction=0.5)                # or params=N / macs=N, any budget, one path
    small = sppbench.compress(m, keep)            # physically narrower model
    sppbench.save_pruned(small, folder); sppbench.load_pruned(folder)
"""
from __future__ import annotations

from .core import distributed, dynamics, measure
from .core.compress import compress, load_pruned, save_pruned
from .core.masks import MaskedModel, MaskGroup
from .core.path import KeepSet, SolutionPath
from .core.search import finetune, search
from .errors import (AutoConstantsError, BudgetError, ConfigError, DataError, SearchDivergedError, SpecError,
                     SppBenchError, UnsupportedModelError)
from .families import attach_masks

__version__ = "0.1.0"


__all__ = [
    "attach_masks", "search", "finetune", "compress", "save_pruned", "load_pruned", "SolutionPath", "KeepSet",
    "MaskedModel", "MaskGroup", "distributed", "dynamics", "measure", "SppBenchError", "UnsupportedModelError",
    "BudgetError", "ConfigError", "SearchDivergedError", "SpecError", "DataError", "AutoConstantsError", "__version__",
]
