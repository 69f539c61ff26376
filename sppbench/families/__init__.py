"""Family adapters: one module per model family; importing this package registers them all."""
from .base import FAMILIES, Family, detect, get, register
from . import vit  # noqa: F401  (registers the timm ViT family)
from . import swin  # noqa: F401
from . import hf_bert  # noqa: F401  (registers the Hugging Face BERT family)
from . import hf_llama  # noqa: F401  (Hugging Face LLaMA / Mistral / Qwen2 causal LMs)
from . import openclip  # noqa: F401  (open_clip transformers and whole CLIP dual encoders)

__all__ = ["FAMILIES", "Family", "detect", "get", "register"]
