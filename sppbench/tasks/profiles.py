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

from .. import paper_plan
from ..configs import load_config
from ..errors import DataError, SppBenchError, UnsupportedModelError
from .captions import karpathy_paths
from .data import StepBatches
from .task import VisionTask

PAPER_MODELS = paper_plan.VISION  # the one list (sppbench/paper_plan.py, which the noxfile reads)


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


FOLDER_DATA = {"env": "SPPBENCH_IMAGENET",
               "layout": "an ImageFolder root with train/<class>/*.JPEG and val/<class>/*.JPEG (the same classes)",
               "val_from_train_per_class": 10}


def timm_config(name: str, model: nn.Module, weights: str | os.PathLike | None = None) -> dict:
    """A profile for any timm model (``--model timm:<name>``): its own input size, an ImageNet-layout folder."""
    from .models import timm_input_size

    return {"profile": "timm", "model": f"timm:{name}", "img_size": timm_input_size(model),
            "weights": {"hub": f"timm/{name}", "file": str(weights) if weights else None},
            "data": dict(FOLDER_DATA),
            "hardware": {"gpus": 1, "note": "one GPU is enough; torchrun spreads the search over several"}}


def _loader_workers(workers: int) -> int:
    """DataLoader workers: ``workers``, at most the CPUs this process may use (0 = load in the main process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        cpus = os.cpu_count() or 1
    return max(0, min(int(workers), cpus))


def imagenet_task(cfg: dict, root: str | os.PathLike | None = None, *, model: nn.Module | None = None,
                  eval_batch: int = 250, workers: int = 8, val_per_class: int | None = None, refit_per_class: int = 10,
                  n_val: int | None = None, n_refit: int | None = None, n_test: int | None = None,
                  weights_file: str | None = None, device: str | torch.device | None = None):
    """A VisionTask on an ImageNet-layout folder: search / fine-tune batches from train (minus a held-out val carved
    from train, ``val_per_class`` images per class), 'val' = that held-out part (read-out and constant choice),
    'refit' = ``refit_per_class`` other train images per class, 'test' = the folder's val/ (reporting only).

    ``n_val`` / ``n_refit`` (totals, spread evenly over the classes) override the per-class counts; ``n_test`` keeps
    a seeded random subset of the test images. Loaders use ``workers`` processes (at most the CPUs available) and
    pinned memory on CUDA; the evaluation loaders are built once and keep their workers. ``device``: default CUDA
    when available."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    root = imagenet_root(root, cfg)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
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
    n_classes = len(train.classes)
    per_class = val_per_class if val_per_class is not None else (
        max(1, n_val // n_classes) if n_val else int(cfg["data"]["val_from_train_per_class"]))
    refit_per = max(1, n_refit // n_classes) if n_refit else refit_per_class
    g = torch.Generator().manual_seed(0)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(train.targets):
        by_class.setdefault(t, []).append(i)
    short = {train.classes[c]: len(idx) for c, idx in by_class.items() if len(idx) <= per_class}
    if short or len(by_class) < n_classes:
        raise DataError(f"{root / 'train'}: every class needs more than the {per_class} images per class carved out "
                        f"for validation; too few in {dict(list(short.items())[:5]) or 'an empty class folder'} "
                        "(lower n_val / val_per_class or add images)")
    val_idx, refit_idx, train_idx = [], [], []
    for idx in by_class.values():
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        val_idx += perm[:per_class]
        refit_idx += perm[per_class:per_class + refit_per]
        train_idx += perm[per_class:]
    test_part = test
    if n_test and n_test < len(test):
        keep = sorted(torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n_test].tolist())
        test_part = Subset(test, keep)
    sets = {"val": Subset(train_eval, val_idx), "refit": Subset(train_eval, refit_idx), "test": test_part}
    train_part = Subset(train, train_idx)
    nw = _loader_workers(workers)
    pin = device.type == "cuda"

    def train_batches(batch_size: int, steps: int, seed: int, shard: tuple[int, int] = (0, 1)):
        """Shuffled global batches of ``batch_size`` (drop last); ``shard=(rank, world)`` loads only this
        process's contiguous slice of each, so the union over ranks is the single-process batch."""
        rank, world = shard
        if batch_size % world:
            raise ValueError(f"the global batch size {batch_size} must be a multiple of the number of processes "
                             f"({world})")
        per = batch_size // world
        n_batches = len(train_part) // batch_size
        if n_batches < 1:
            raise DataError(f"{root / 'train'} leaves {len(train_part)} training images after the validation carve-out, "
                            f"fewer than one batch of {batch_size}")

        def epoch(gen, skip: int = 0):
            perm = torch.randperm(len(train_part), generator=gen)
            rows = [perm[i * batch_size + rank * per:i * batch_size + (rank + 1) * per].tolist()
                    for i in range(skip, n_batches)]
            if rows:
                yield from DataLoader(train_part, batch_sampler=rows, num_workers=nw, pin_memory=pin)

        return StepBatches(epoch, steps, seed, epoch_len=n_batches)

    loaders: dict = {}

    def loader(split: str):
        if split not in loaders:
            loaders[split] = DataLoader(sets[split], batch_size=eval_batch, shuffle=False, num_workers=nw,
                                        pin_memory=pin, persistent_workers=nw > 0)
        return loaders[split]

    dense = model if model is not None else paper_model(cfg, weights_file=weights_file)
    heads = getattr(dense, "num_classes", None)
    what = "paper profile: ImageNet" if cfg.get("profile") == "paper" else \
        f"{cfg['model']} on the ImageNet-layout folder {root.name}/"
    return VisionTask(cfg["model"], what, dense.to(device), size, n_classes,
                      train_batches, loader, 1e-4,
                      {"data": str(root), "classes": n_classes, "val_from_train": len(val_idx),
                       "refit_images": len(refit_idx), "train_images": len(train_idx), "test_images": len(test_part),
                       "weights": cfg["weights"].get("file") or weights_file or cfg["weights"].get("hub"),
                       "loader_workers": nw, "pin_memory": pin,
                       **({"own_head_note": f"the model's head has {heads} classes and the folder {n_classes}: the "
                                            "own-head read-outs compare unrelated label sets; read the re-fit head"}
                          if heads not in (None, n_classes) else {})})


def vision_profile(name: str, weights: str | os.PathLike | None = None) -> dict:
    """The profile ``check_ready`` reads for a vision model: a paper model's config (``weights`` replacing its
    weights file), or ``timm:<name>``'s (checked to be a timm family sppbench prunes; no weight is read)."""
    from .models import split_spec, timm_skeleton

    scheme, rest = split_spec(name)
    if scheme == "timm":
        return timm_config(rest, timm_skeleton(rest), weights)
    if scheme is not None:
        raise UnsupportedModelError(f"{name} is not a vision model; vision models: {', '.join(PAPER_MODELS)} or "
                                    "timm:<name>")
    cfg = paper_config(name)
    if weights:
        cfg["weights"] = {**cfg["weights"], "file": str(weights)}
    return cfg


def clip_profile(name: str, pretrained: str | os.PathLike | None = None) -> dict:
    """The profile ``clip_check_ready`` reads: a CLIP paper model's config (``pretrained`` replacing its tag), or
    ``open_clip:<name>``'s (an open_clip model name and its tag or checkpoint file)."""
    from .models import split_spec

    scheme, rest = split_spec(name)
    if scheme == "open_clip":
        import open_clip

        from .clip import register_configs

        register_configs()
        if open_clip.get_model_config(rest) is None:
            raise UnsupportedModelError(f"open_clip has no model {rest!r}; see open_clip.list_models() "
                                        "(e.g. ViT-B-32, ViT-L-14)")
        return {"profile": "open_clip", "model": name, "pretrained": str(pretrained) if pretrained else "",
                "data": {"datasets": ["coco", "flickr30k"]},
                "hardware": {"gpus": 1, "note": "one GPU is enough for the table's settings"}}
    cfg = clip_paper_config(name)
    if pretrained:
        cfg["pretrained"] = str(pretrained)
    return cfg


def hf_check_ready(name: str, *, min_gpus: int = 1) -> dict:
    """Stop an ``hf:<folder>`` run at once, with what to do, if the folder is not a causal LM sppbench prunes or the
    GPUs are missing."""
    from .models import hf_model_type, split_spec

    scheme, folder = split_spec(name)
    if scheme != "hf":
        raise UnsupportedModelError(f"{name} is not an hf:<folder> model")
    problems = []
    try:
        kind = hf_model_type(folder)
    except SppBenchError as exc:
        problems.append(str(exc))
        kind = None
    gpus = _gpu_problem({"hardware": {"note": "a 7B model needs one 80 GB GPU"}}, min_gpus, problems)
    if problems:
        raise SppBenchError(f"{name} cannot run here:\n  - " + "\n  - ".join(problems))
    return {"gpus": gpus, "model_type": kind}


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
    file = cfg["weights"].get("file")
    if file and not Path(file).expanduser().is_file():
        problems.append(f"the weights file {file} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") and not file:
        problems.append(f"HF_HUB_OFFLINE is set and no local weights file is given for {cfg['model']}: unset it on a "
                        f"machine with hub access, or download {cfg['weights']['hub']} and set weights.file")
    if problems:
        raise SppBenchError(f"the paper profile of {cfg['model']} cannot run here:\n  - " + "\n  - ".join(problems))
    return {"gpus": gpus}


# ---------------------------------------------------------------------------------------------
# CLIP (open_clip) paper profiles: ViT-B-32 / ViT-L-14 on COCO / Flickr30K Karpathy splits
# ---------------------------------------------------------------------------------------------
CLIP_PAPER_MODELS = paper_plan.CLIP


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
    if not cfg.get("pretrained"):
        problems.append(f"{cfg['model']} needs its weights: an open_clip tag or a checkpoint file (--pretrained)")
    elif os.environ.get("HF_HUB_OFFLINE") and not Path(str(cfg.get("pretrained", ""))).is_file():
        problems.append(f"HF_HUB_OFFLINE is set and {cfg['model']}'s weights are the hub tag {cfg['pretrained']!r}: "
                        "unset it on a machine with hub access, or pass a local checkpoint file as pretrained")
    if problems:
        raise SppBenchError(f"the CLIP paper profile of {cfg['model']} on {dataset} cannot run here:\n  - "
                            + "\n  - ".join(problems))
    return {"gpus": gpus}
