"""Numbers reported by others (the SPP paper, its README and reviews, timm, UPop), to show BESIDE ours.

They are facts quoted with their source, never results of this project; every table that shows them
marks their rows as reported (``source`` column) and keeps them apart from measured rows. The
paper's "FLOPs" for DeiT / Swin are multiply-accumulates (DeiT-S 4.6 G equals timm's 4.6 GMACs).
"""
from __future__ import annotations

PAPER = "SPP paper (ICLR 2025, 'Adaptive Pruning of Pretrained Transformer via Differential Inclusions')"

VISION_ROWS = [
    # model, method, top-1 (%), params (M), GMACs, source
    {"model": "deit_tiny_patch16_224", "method": "dense", "top1": 72.2, "params_m": 5.7, "gmacs": 1.3,
     "source": "timm / DeiT paper (dense reference)"},
    {"model": "deit_small_patch16_224", "method": "dense", "top1": 79.8, "params_m": 22.1, "gmacs": 4.6,
     "source": "timm / DeiT paper (dense reference)"},
    {"model": "deit_base_patch16_224", "method": "dense", "top1": 81.8, "params_m": 86.6, "gmacs": 17.6,
     "source": "timm / DeiT paper (dense reference)"},
    {"model": "swin_tiny_patch4_window7_224", "method": "dense", "top1": 81.2, "params_m": 28.3, "gmacs": 4.5,
     "source": "timm / Swin paper (dense reference)"},
    {"model": "deit_small_patch16_224", "method": "spp", "top1": 78.9, "params_m": None, "gmacs": 2.6,
     "source": PAPER + ", Table 1"},
    {"model": "deit_small_patch16_224", "method": "WDPruning", "top1": 78.4, "params_m": None, "gmacs": 2.6,
     "source": PAPER + ", Table 1"},
    {"model": "deit_base_patch16_224", "method": "spp", "top1": 81.2, "params_m": None, "gmacs": 6.9,
     "source": PAPER + ", Table 1"},
    {"model": "deit_small_patch16_224", "method": "UPop", "top1": 80.2, "params_m": 15.7, "gmacs": 3.2,
     "source": "UPop paper (its own published number; the SPP README's DeiT-S 80.2 equals it)"},
    {"model": "swin_tiny_patch4_window7_224", "method": "spp", "top1": 80.6, "params_m": None, "gmacs": None,
     "source": "SPP README (budget not stated there)"},
]

SEARCH_COST = {"spp": "40 search epochs", "UPop": "60", "WDPruning": "100", "ViT-Slim": "50",
               "fine-tune": "300 epochs for all", "source": PAPER + " (answer to reviewers)",
               "hardware": "4 x A100 80GB"}


def vision_rows(model: str | None = None):
    """The reported vision rows (optionally for one timm model name) as a DataFrame."""
    import pandas as pd

    rows = [r for r in VISION_ROWS if model is None or r["model"] == model]
    return pd.DataFrame(rows, columns=["model", "method", "top1", "params_m", "gmacs", "source"])


CLIP_ROWS = [
    # model, method, dataset, R@1 image->text, R@1 text->image (%), budget, source
    {"model": "CLIP (UPop's COCO setting)", "method": "dense", "dataset": "coco", "i2t_r1": 71.5, "t2i_r1": 56.8,
     "budget": "dense", "source": "UPop paper (its fine-tuned CLIP on COCO, Karpathy test 5k)"},
    {"model": "CLIP (UPop's COCO setting)", "method": "UPop", "dataset": "coco", "i2t_r1": 70.8, "t2i_r1": 53.1,
     "budget": "2x compression", "source": "UPop paper"},
    {"model": "CLIP-Large", "method": "spp", "dataset": "coco", "i2t_r1": 70.8, "t2i_r1": None,
     "budget": "not stated", "source": "SPP README (equals UPop's own 2x number; text->image not given)"},
]


def clip_rows():
    """The reported CLIP rows as a DataFrame (numbers of others, shown beside ours, never ours)."""
    import pandas as pd

    return pd.DataFrame(CLIP_ROWS, columns=["model", "method", "dataset", "i2t_r1", "t2i_r1", "budget", "source"])


LLM_ROWS = [
    {"model": "LLaMA-2-7B", "method": "spp (with RIA)", "pattern": "50% unstructured", "metric": "ARC-e accuracy (%)",
     "value": 71.8, "source": "SPP README (zero-shot, no weight update)"},
]


def llm_rows():
    """The reported LLM rows as a DataFrame (numbers of others, shown beside ours, never ours)."""
    import pandas as pd

    return pd.DataFrame(LLM_ROWS, columns=["model", "method", "pattern", "metric", "value", "source"])
