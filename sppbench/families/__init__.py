"""Family adapters: one module per model family; importing this package registers them all."""
from .base import FAMILIES, Family, detect, get, register
from . import vit  # noqa: F401  (registers the timm ViT family)
from . import swin  # noqa: F401

__all__ = ["FAMILIES", "Family", "detect", "get", "register"]
