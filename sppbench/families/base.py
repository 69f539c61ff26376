"""The family-adapter interface and the registry that picks an adapter for a model."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from torch import nn

from ..errors import UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from ..masks import MaskedModel
    from ..path import KeepSet


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
        f"Supported families: {', '.join(FAMILIES)}. Pass a timm VisionTransformer / DeiT / DINOv2 "
        "model (e.g. timm.create_model('deit_small_patch16_224')), or add an adapter in "
        "sppbench/families/."
    )


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}"
        ) from None
