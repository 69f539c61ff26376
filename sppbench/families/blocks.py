"""Slicing helpers shared by the family adapters (vit, swin, openclip, hf_bert, hf_llama).

Every adapter copies the kept rows / columns of its Linears into narrow ones, counts parameters of a
few modules, and records its MLP activation by name in the pruned-model spec; these are the one
implementation of each.
"""
from __future__ import annotations

import functools
from typing import Mapping

import torch
from torch import nn

from ..errors import UnsupportedModelError

#: activations an MLP mask can sit behind (each maps 0 to 0), by the name the pruned-model spec records
ACTIVATIONS: dict[str, type | functools.partial] = {
    "gelu": nn.GELU, "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"), "silu": nn.SiLU, "relu": nn.ReLU}


def activation_name(act: nn.Module, *, extra: Mapping[str, type] | None = None,
                    where: str = "the timm ViT adapter") -> str:
    """The spec name of an MLP activation module; ``extra`` adds family-specific ones (name -> exact class).

    Raises UnsupportedModelError naming what is supported: the MLP mask relies on act(0) = 0.
    """
    for name, cls in (extra or {}).items():
        if cls is not None and type(act) is cls:
            return name
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    for name, cls in (("silu", nn.SiLU), ("relu", nn.ReLU)):
        if type(act) is cls:
            return name
    names = ", ".join(["GELU", "GELU-tanh", "SiLU", "ReLU", *(extra or {})])
    raise UnsupportedModelError(f"MLP activation {type(act).__name__} is not supported by {where} "
                                f"(supported: {names}: each maps 0 to 0, which the MLP mask relies on)")


@torch.no_grad()
def copy_linear(dst: nn.Linear, src: nn.Linear, rows: torch.Tensor | None = None,
                cols: torch.Tensor | None = None) -> None:
    """Copy the kept output rows / input columns of ``src`` into the narrow ``dst`` (bias rows too)."""
    w = src.weight if rows is None else src.weight[rows]
    dst.weight.copy_(w if cols is None else w[:, cols])
    if src.bias is not None:
        dst.bias.copy_(src.bias if rows is None else src.bias[rows])


def numel(*mods: nn.Module) -> int:
    """Parameters of the given modules, summed."""
    return sum(p.numel() for m in mods for p in m.parameters())
