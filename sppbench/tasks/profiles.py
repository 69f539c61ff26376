"""The paper profile: the paper's models (timm DeiT-T/S/B, Swin-T), ImageNet from a user path, the
paper's budgets and recipe (``sppbench/configs/paper_<model>.json``).

Nothing here can run offline at full size (no ImageNet, no ImageNet checkpoints install here); the
same code builds the same architectures tiny and random-init for the tests, and ``check_ready`` stops
a paper run at once, with what to do, when its data path, weights or GPUs are missing.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..configs import load_config
from ..errors import DataError, SppBenchError, UnsupportedModelError
from .captions import karpathy_paths
from .data import StepBatches
from .task import VisionTask

PAPER_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
                "swin_tiny_patch4_window7_224")


def paper_config(model: str) -> dict:
    """The paper profile of one model (budgets, recipe, weights and data settings)."""
    if model not in PAPER_MODELS:
        raise UnsupportedModelError(f"no paper profile for {model!r}; paper profiles: {', '.join(PAPER_MODELS)}")
    return load_config(f"paper_{model}")


def paper_model(cfg: dict, *, pretrained: bool = True, tiny: bool = False, weights_file: str | None = None) -> nn.Module:
    """The timm model of a paper profile: with its ImageNet weights (hub tag or ``weights_file`` /
    ``cfg['weights']['file']``) on a user's machine, or random-init (``pretrained=False``); ``tiny``
    builds the same architecture class shrunk by the profile's ``tiny_test_overrides`` (tests)."""
    import timm

    name = cfg["model"]
    kw: dict = {}
    if tiny:
        kw = dict(cfg["tiny_test_overrides"])
        pretrained = False
    file = weights_file or cfg["weights"].get("file")
    if pretrained and file:
        if not Path(file).is_file():
            raise DataError(f"weights file {file} does not exist; give the path of a timm checkpoint of {name}")
        kw["pretrained_cfg_overlay"] = {"file": str(file)}
    try:
        return timm.create_model(name, pretrained=pretrained, **kw).eval()
    except (OSError, RuntimeError) as exc:  # hub unreachable, corrupt or mismatched checkpoint
        raise DataError(
            f"could not load the weights of {name} ({exc}). On a machine with hub access unset HF_HUB_OFFLINE; "
            f"otherwise download {cfg['weights']['hub']} and pass its file as weights_file / cfg['weights']['file']"
        ) from exc


def imagenet_root(root: str | os.PathLike | None, cfg: dict) -> Path:
    """The ImageNet folder (argument, else $SPPBENCH_IMAGENET), checked for train/ and val/ class folders."""
    given = root or os.environ.get(cfg["data"]["env"])
    if not given:
        raise DataError(f"the paper profile needs ImageNet: pass its folder or set ${cfg['data']['env']} "
                        f"({cfg['data']['layout']})")
    root = Path(given).expanduser()
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{d} is missing: the ImageNet folder must hold {cfg['data']['layout']}")
        if not any(p.is_dir() for p in d.iterdir()):
            raise DataError(f"{d} holds no class folders ({cfg['data']['layout']})")
    return root


def imagenet_task(cfg: dict, root: str | os.PathLike | None = None, *, model: nn.Module | None = None,
                  eval_batch: int = 250, workers: int = 8, val_per_class: int | None = None, refit_per_class: int = 10,
                  device: str | torch.device = "cpu"):
    """A VisionTask on ImageNet: search / fine-tune batches from train (minus a held-out val carved from
    train, ``val_per_class`` images per class), 'val' = that held-out part (read-out and constant choice),
    'refit' = ``refit_per_class`` other train images per class, 'test' = ImageNet val (reporting only)."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms


    root = imagenet_root(root, cfg)
    size = int(cfg["img_size"])
    norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    eval_tf = transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size),
                                  transforms.ToTensor(), norm])
    train = datasets.ImageFolder(root / "train", transform=train_tf)
    train_eval = datasets.ImageFolder(root / "train", transform=eval_tf)
    test = datasets.ImageFolder(root / "val", transform=eval_tf)
    if train.classes != test.classes:
        raise DataError(f"train/ and val/ under {root} hold different class folders")
    per_class = val_per_class if val_per_class is not None else int(cfg["data"]["val_from_train_per_class"])
    g = torch.Generator().manual_seed(0)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(train.targets):
        by_class.setdefault(t, []).append(i)
    val_idx, refit_idx, train_idx = [], [], []
    for idx in by_class.values():
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        val_idx += perm[:per_class]
        refit_idx += perm[per_class:per_class + refit_per_class]
        train_idx += perm[per_class:]
    sets = {"val": Subset(train_eval, val_idx), "refit": Subset(train_eval, refit_idx), "test": test}
    train_part = Subset(train, train_idx)

    def train_batches(batch_size: int, steps: int, seed: int, shard: tuple[int, int] = (0, 1)):
        """Shuffled global batches of ``batch_size`` (drop last); ``shard=(rank, world)`` loads only this
        process's contiguous slice of each, so the union over ranks is the single-process batch."""
        rank, world = shard
        if batch_size % world:
            raise ValueError(f"the global batch size {batch_size} must be a multiple of the number of processes "
                             f"({world})")
        per = batch_size // world
        n_batches = len(train_part) // batch_size

        def epoch(gen, skip: int = 0):
            perm = torch.randperm(len(train_part), generator=gen)
            rows = [perm[i * batch_size + rank * per:i * batch_size + (rank + 1) * per].tolist()
                    for i in range(skip, n_batches)]
            if rows:
                yield from DataLoader(train_part, batch_sampler=rows, num_workers=workers)

        return StepBatches(epoch, steps, seed, epoch_len=n_batches)

    def loader(split: str):
        return DataLoader(sets[split], batch_size=eval_batch, shuffle=False, num_workers=workers)

    dense = model if model is not None else paper_model(cfg)
    return VisionTask(cfg["model"], "paper profile: ImageNet", dense.to(device), size, len(train.classes),
                      train_batches, loader, 1e-4,
                      {"data": str(root), "val_from_train": len(val_idx), "refit_images": len(refit_idx),
                       "train_images": len(train_idx), "test_images": len(test)})


def _gpu_problem(cfg: dict, min_gpus: int, problems: list) -> int:
    """The CUDA GPU count; appends what is wrong when it is below ``min_gpus``."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < min_gpus:
        problems.append(f"found {gpus} CUDA GPU(s), the paper profile needs at least {min_gpus} "
                        f"({cfg['hardware']['note']})")
    return gpus


def check_ready(cfg: dict, root: str | os.PathLike | None = None, *, min_gpus: int = 1) -> dict:
    """Stop a paper-profile run at once, with what to do, if its data, weights or GPUs are missing."""
    problems = []
    try:
        imagenet_root(root, cfg)
    except DataError as exc:
        problems.append(str(exc))
    gpus = _gpu_problem(cfg, min_gpus, problems)
    if os.environ.get("HF_HUB_OFFLINE") and not cfg["weights"].get("file"):
        problems.append(f"HF_HUB_OFFLINE is set and no local weights file is given for {cfg['model']}: unset it on a "
                        f"machine with hub access, or download {cfg['weights']['hub']} and set weights.file")
    if problems:
        raise SppBenchError(f"the paper profile of {cfg['model']} cannot run here:\n  - " + "\n  - ".join(problems))
    return {"gpus": gpus}


# ---------------------------------------------------------------------------------------------
# CLIP (open_clip) paper profiles: ViT-B-32 / ViT-L-14 on COCO / Flickr30K Karpathy splits
# ---------------------------------------------------------------------------------------------
CLIP_PAPER_MODELS = ("ViT-B-32", "ViT-L-14")


def clip_paper_config(model: str) -> dict:
    """The paper profile of one open_clip model (pretrained tag, datasets, budgets, recipe)."""
    if model not in CLIP_PAPER_MODELS:
        raise UnsupportedModelError(f"no CLIP paper profile for {model!r}; CLIP paper profiles: "
                                    f"{', '.join(CLIP_PAPER_MODELS)}")
    return load_config(f"paper_clip_{model}")


def clip_check_ready(cfg: dict, dataset: str = "coco", root: str | os.PathLike | None = None, *,
                     min_gpus: int = 1) -> dict:
    """Stop a CLIP paper-profile run at once, with what to do, if its data, weights or GPUs are missing."""

    problems = []
    if dataset not in cfg["data"]["datasets"]:
        problems.append(f"dataset must be one of {cfg['data']['datasets']}, got {dataset!r}")
    else:
        try:
            karpathy_paths(dataset, root)
        except DataError as exc:
            problems.append(str(exc))
    gpus = _gpu_problem(cfg, min_gpus, problems)
    if os.environ.get("HF_HUB_OFFLINE") and not Path(str(cfg.get("pretrained", ""))).is_file():
        problems.append(f"HF_HUB_OFFLINE is set and {cfg['model']}'s weights are the hub tag {cfg['pretrained']!r}: "
                        "unset it on a machine with hub access, or pass a local checkpoint file as pretrained")
    if problems:
        raise SppBenchError(f"the CLIP paper profile of {cfg['model']} on {dataset} cannot run here:\n  - "
                            + "\n  - ".join(problems))
    return {"gpus": gpus}
