"""Family adapters: one module per model family; importing this package registers them all."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import UnsupportedModelError
from ..core.masks import MaskedModel
from ..core.family import FAMILIES, Family, detect, get, register
from ..families import vit  # noqa: F401  (registers the timm ViT family)
from ..families import swin  # noqa: F401
from ..families import hf_bert  # noqa: F401  (registers the Hugging Face BERT family)
from ..families import hf_llama  # noqa: F401  (Hugging Face LLaMA / Mistral / Qwen2 causal LMs)
from ..families import openclip  # noqa: F401  (open_clip transformers and whole CLIP dual encoders)


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
    return detect(model).attach(model, input_size)


__all__ = ["FAMILIES", "Family", "attach_masks", "detect", "get", "register"]
