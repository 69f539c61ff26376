"""The family-adapter interface and the registry that picks an adapter for a model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from .masks import MaskedModel
    from .path import KeepSet


class Family:
    """Where masks go in one model family, how to price, slice, describe and rebuild it.

    Subclasses implement every method; they never patch library code, they replace a model's
    attention / MLP modules with explicit wrapper modules and, on compression, with narrow ones.
    """

    name: str = "?"

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def attach(self, model: nn.Module, input_size: Sequence[int] | None = None) -> "MaskedModel":
        """Wrap the model's modules with masks (all 1), in place."""
        raise NotImplementedError

    def detach(self, masked: "MaskedModel") -> None:
        """Put the original modules back."""
        raise NotImplementedError

    def compress(self, masked: "MaskedModel", keep: "KeepSet") -> nn.Module:
        """A new, narrower plain model computing what ``masked`` computes with binary masks ``keep``.

        The result carries its architecture spec in ``model.sppbench_spec`` (a JSON-able dict).
        """
        raise NotImplementedError

    def build(self, spec: dict) -> nn.Module:
        """An (uninitialised) narrow model of the architecture a spec describes, ready for a strict load."""
        raise NotImplementedError

    def example_inputs(self, spec: dict, generator: torch.Generator) -> tuple | None:
        """Positional inputs on which ``save_pruned`` checks that the rebuilt model computes what the saved one
        does; default: two random images of the spec's ``input_size`` (None: no check)."""
        size = spec.get("input_size")
        if not size or isinstance(size, (int, dict)):
            return None
        return (torch.randn(2, *size, generator=generator),)

    def unit_slices(self, masked: "MaskedModel") -> dict[str, list[UnitSlice]]:
        """The weights each mask entry controls (its structural unit), per mask group.

        Default for wrappers that keep the wrapped module as ``.attn`` (a fused ``qkv`` Linear laid
        out [q | k | v], each (heads x head_dim), and a ``proj``) or ``.mlp`` (``fc1``, ``fc2``):
        qk entry j = the q and k rows of dimension j in every head (with their biases); v entry j =
        the v rows of dimension j in every head plus the matching ``proj`` input columns; mlp entry
        j = ``fc1`` row j (and bias) plus ``fc2`` column j. DessiLBI shrinks these groups and the
        magnitude baseline scores them.
        """
        out: dict[str, list[UnitSlice]] = {}
        for g in masked.groups:
            site, _ = masked.site(g.name)
            if g.kind in ("qk", "v"):
                a = site.attn
                h, d = a.num_heads, g.size
                heads = torch.arange(h).unsqueeze(0) * d + torch.arange(d).unsqueeze(1)  # (d, h)
                if g.kind == "qk":
                    rows = torch.cat([heads, heads + h * d], dim=1)
                    out[g.name] = _linear_rows(a.qkv, rows)
                else:
                    out[g.name] = _linear_rows(a.qkv, heads + 2 * h * d) + [UnitSlice(a.proj.weight, 1, heads)]
            elif g.kind == "mlp":
                mlp = site.mlp
                idx = torch.arange(g.size).unsqueeze(1)
                out[g.name] = _linear_rows(mlp.fc1, idx) + [UnitSlice(mlp.fc2.weight, 1, idx)]
            else:  # pragma: no cover - a family with other mask kinds overrides this method
                raise NotImplementedError(f"no structural units for mask kind {g.kind!r}")
        return out


@dataclass(frozen=True)
class UnitSlice:
    """Entry j of a mask group controls ``param.index_select(dim, index[j])`` (index: (entries, k))."""

    param: nn.Parameter
    dim: int
    index: torch.Tensor

    def gather(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """(entries, -1): the unit's values of ``tensor`` (default the parameter itself)."""
        t = self.param if tensor is None else tensor
        sel = t.index_select(self.dim, self.index.flatten())
        sel = sel.movedim(self.dim, 0).reshape(self.index.shape[0], -1)
        return sel

    def scatter_(self, tensor: torch.Tensor, values: torch.Tensor) -> None:
        """Write (entries, -1) ``values`` back into ``tensor`` at the unit's positions."""
        shape = list(tensor.movedim(self.dim, 0).shape)
        shape[0] = self.index.numel()
        vals = values.reshape(shape).movedim(0, self.dim)
        tensor.index_copy_(self.dim, self.index.flatten(), vals)


def _linear_rows(lin: nn.Linear, rows: torch.Tensor) -> list[UnitSlice]:
    out = [UnitSlice(lin.weight, 0, rows)]
    if lin.bias is not None:
        out.append(UnitSlice(lin.bias, 0, rows))
    return out


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def detect(model: nn.Module) -> Family:
    """The family adapter for ``model``, or a clear error listing the supported families."""
    for fam in FAMILIES.values():
        if fam.matches(model):
            return fam
    raise UnsupportedModelError(
        f"sppbench has no family adapter for {type(model).__module__}.{type(model).__name__}. "
        f"Supported families: {', '.join(FAMILIES)}. Pass a timm VisionTransformer / DeiT / DINOv2 or "
        "SwinTransformer model (e.g. timm.create_model('deit_small_patch16_224')), an open_clip CLIP "
        "(sppbench.tasks.clip.create_model('ViT-B-32')) or a Hugging Face BertModel, or add an adapter in "
        "sppbench/families/."
    )


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}"
        ) from None
