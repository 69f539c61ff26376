"""Structured masks and the MaskedModel that carries them.

Three pair-wise mask kinds per transformer block (docs/method.md section 2):

- ``qk``: shape (d_h,), shared by all heads, multiplies q and k after the head split;
- ``v``: shape (d_h,), shared by all heads, multiplies v (and so removes output-projection columns);
- ``mlp``: shape (H,), multiplies fc1's output before the activation.

A family adapter (``sppbench.families``) replaces the attention / MLP modules of a model with masked
wrappers that own these parameters; ``MaskedModel`` is the handle users hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping

import torch
from torch import nn

from .costs import CostModel

if TYPE_CHECKING:  # pragma: no cover
    from .family import Family
    from .path import KeepSet

POOLS = ("attn", "mlp")


@dataclass(frozen=True)
class MaskGroup:
    """One mask tensor: ``name`` is unique in the model, ``pool`` is 'attn' or 'mlp'."""

    name: str
    kind: str  # 'qk' | 'v' | 'mlp'
    pool: str
    size: int
    layer: int  # block index, for per-layer read-outs and plots
    tower: str = ""  # 'image' / 'text' in a dual encoder (CLIP); '' in a single-tower model

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "pool": self.pool, "size": self.size, "layer": self.layer}
        return {**d, "tower": self.tower} if self.tower else d

    @classmethod
    def from_dict(cls, d: Mapping) -> "MaskGroup":
        return cls(str(d["name"]), str(d["kind"]), str(d["pool"]), int(d["size"]), int(d["layer"]),
                   str(d.get("tower", "")))


class MaskedModel(nn.Module):
    """A model whose attention and MLP modules carry structured masks (all 1 at attach time).

    ``forward`` is the wrapped model's forward. The wrapped model is modified in place (its
    attention / MLP modules are replaced by masked wrappers that reuse the original weights);
    ``detach_masks()`` puts the original modules back.
    """

    def __init__(self, model: nn.Module, family: "Family", sites: dict[str, tuple[nn.Module, str]],
                 groups: list[MaskGroup], cost_model: CostModel, info: dict):
        super().__init__()
        self.model = model
        self.family = family
        self._sites = sites  # group name -> (masked module, parameter attribute)
        self.groups = groups
        self.cost_model = cost_model
        self.info = info  # family-specific facts recorded with results (tokens, input size, ...)
        # the handle starts in the wrapped model's mode: a later handle.train(was) must not switch an eval
        # model (e.g. one with drop-path) into training mode
        self.training = model.training

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # -- masks -------------------------------------------------------------------------------
    def mask_parameters(self) -> dict[str, nn.Parameter]:
        """Mask tensors by group name, in a fixed order (block order; qk, v, mlp within a block)."""
        return {g.name: getattr(*self._sites[g.name]) for g in self.groups}

    def site(self, group: str) -> tuple[nn.Module, str]:
        """Where group ``group``'s mask lives: (the masked module, the name of its mask parameter)."""
        return self._sites[group]

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that is not a mask."""
        masks = {id(p) for p in self.mask_parameters().values()}
        return (p for p in self.parameters() if id(p) not in masks)

    @torch.no_grad()
    def set_masks(self, keep: "KeepSet | Mapping[str, torch.Tensor]") -> "MaskedModel":
        """Set binary 0/1 masks from a keep-set (or continuous values from a dict of tensors)."""
        values = keep.masks if hasattr(keep, "masks") else keep
        params = self.mask_parameters()
        missing = set(params) - set(values)
        extra = set(values) - set(params)
        if missing or extra:
            raise ValueError(
                "the keep-set does not match this model's mask groups "
                f"(missing {sorted(missing)[:3]}, unknown {sorted(extra)[:3]}); "
                "read it off a path searched on this same architecture"
            )
        for name, p in params.items():
            v = torch.as_tensor(values[name])
            if v.shape != p.shape:
                raise ValueError(f"mask {name}: expected shape {tuple(p.shape)}, got {tuple(v.shape)}")
            p.copy_(v.to(p.dtype))
        return self

    @torch.no_grad()
    def reset_masks(self) -> "MaskedModel":
        """All masks back to 1 (the unmasked model)."""
        for p in self.mask_parameters().values():
            p.fill_(1.0)
        return self

    def widths(self) -> dict[str, int]:
        """Non-zero entries per group (what compression would keep)."""
        return {n: int((p != 0).sum()) for n, p in self.mask_parameters().items()}

    def cost(self) -> tuple[int, int]:
        """(params, MACs per sample) of the model that compressing the current masks would give."""
        return self.cost_model.cost(self.widths())

    def dense_cost(self) -> tuple[int, int]:
        """(params, MACs per sample) of the unpruned model (every entry kept)."""
        return self.cost_model.cost({g.name: g.size for g in self.groups})

    def detach_masks(self) -> nn.Module:
        """Put the original modules back and return the plain model."""
        self.family.detach(self)
        return self.model
