"""CLIP dual encoders: creating open_clip models sppbench can rebuild, the contrastive search loss,
retrieval (recall@1/5/10 both ways) and zero-shot evaluation, and the projection re-fit.

    model = sppbench.tasks.clip.create_model("ViT-B-32", pretrained="openai")   # records its open_clip config
    m = sppbench.attach_masks(model)                 # masks on BOTH towers ("image." / "text." groups)
    path = sppbench.search(m, batches, sppbench.tasks.clip.contrastive_loss, ...)
    keep = path.keep(macs=...)                       # joint budget (one image + one caption), or
    keep = path.keep_towers({"image": {"fraction": 0.5}, "text": {"fraction": 0.7}})

A search batch is ``((images, tokens), keys)``: ``keys[i]`` identifies what pair i shows, so that
pairs sharing a caption (or an image) count as positives of each other.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import folder as config_folder
from ..errors import DataError, SearchDivergedError, UnsupportedModelError
from .captions import CaptionImages, image_transform, karpathy_paths, load_karpathy
from .data import StepBatches

KS = (1, 5, 10)
_REGISTERED = False


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover
        raise UnsupportedModelError("CLIP support needs open_clip: pip install 'sppbench[clip]'") from exc
    return open_clip


def register_configs() -> None:
    """Make sppbench's open_clip model configs (``sppbench-tiny-clip``, used by the tests) known to open_clip."""
    global _REGISTERED
    if not _REGISTERED:
        _open_clip().add_model_config(config_folder("openclip"))
        _REGISTERED = True


def create_model(name_or_cfg: str | dict, pretrained: str | None = None, **kwargs) -> nn.Module:
    """An open_clip model (eval mode) that remembers its config, so pruned copies can be saved and rebuilt.

    ``name_or_cfg``: an open_clip model name (``"ViT-B-32"``, ``"ViT-L-14"``, ``"sppbench-tiny-clip"``) or
    a config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...). ``pretrained``: an open_clip tag
    (e.g. ``"openai"``, ``"laion2b_s34b_b79k"``) or a local checkpoint file; None = random init.
    """
    open_clip = _open_clip()
    register_configs()
    if isinstance(name_or_cfg, dict):
        cfg = copy.deepcopy(name_or_cfg)
        if pretrained:
            raise ValueError("pretrained= applies to named models; load a checkpoint into a config-built model yourself")
        from open_clip.model import CLIP, CustomTextCLIP

        custom = bool(cfg.pop("custom_text", False)) or bool((cfg.get("text_cfg") or {}).get("hf_model_name"))
        model = (CustomTextCLIP if custom else CLIP)(**copy.deepcopy(cfg), **kwargs)
        if custom:
            cfg["custom_text"] = True
    else:
        cfg = open_clip.get_model_config(name_or_cfg)
        if cfg is None:
            raise UnsupportedModelError(f"open_clip has no model {name_or_cfg!r}; see open_clip.list_models() "
                                        "(e.g. 'ViT-B-32', 'ViT-L-14')")
        try:
            model = open_clip.create_model(name_or_cfg, pretrained=pretrained, **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:  # hub unreachable, unknown tag, corrupt checkpoint
            raise DataError(f"could not load {name_or_cfg} weights {pretrained!r} ({exc}). On a machine with hub access "
                            "unset HF_HUB_OFFLINE; otherwise download the checkpoint and pass its file as pretrained="
                            ) from exc
        cfg = copy.deepcopy(cfg)
    json.dumps(cfg)  # must be JSON-able: it goes into the pruned model's spec
    model.sppbench_model_cfg = cfg
    return model.eval()


class ImageTower(nn.Module):
    """``model.encode_image`` as a module (for MAC counts and latency of the image tower alone)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class TextTower(nn.Module):
    """``model.encode_text`` as a module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def _features(out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
    if isinstance(out, (tuple, list)) and len(out) >= 3:
        return out[0], out[1], out[2], (out[3] if len(out) > 3 else None)
    raise TypeError("contrastive_loss expects the output of an open_clip model's forward(images, tokens): "
                    "(image_features, text_features, logit_scale[, logit_bias])")


def contrastive_loss(out, keys: torch.Tensor | None = None) -> torch.Tensor:
    """The symmetric InfoNCE loss of a CLIP forward (normalised features, the model's logit scale).

    ``keys``: what each pair shows; pairs with equal keys are positives of each other (soft targets
    spread evenly over them), so a batch holding two pairs with the same caption does not push them
    apart. With unique keys (or None) this is CLIP's loss exactly: cross-entropy on the diagonal, both ways.
    """
    img, txt, scale, bias = _features(out)
    if bias is not None:
        raise UnsupportedModelError("models with a logit bias are trained with the sigmoid (SigLIP) loss, which "
                                    "sppbench does not implement; use a CLIP model")
    logits = scale * img @ txt.T
    if keys is None:
        target = torch.arange(len(img), device=img.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    pos = (keys.view(-1, 1) == keys.view(1, -1)).to(logits.dtype)
    soft = pos / pos.sum(1, keepdim=True)
    return (-(soft * F.log_softmax(logits, 1)).sum(1).mean() - (soft * F.log_softmax(logits.T, 1)).sum(1).mean()) / 2


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2-normalised image embeddings of every batch, in order."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return torch.cat([F.normalize(model.encode_image(x.to(device)).float(), dim=-1).cpu() for x in batches])
    finally:
        model.train(was)


@torch.no_grad()
def encode_texts(model: nn.Module, texts: Sequence[str], tokenizer: Callable, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings; each distinct string is encoded once."""
    unique = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(unique)}
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = [F.normalize(model.encode_text(tokenizer(unique[i:i + batch_size]).to(device)).float(), dim=-1).cpu()
               for i in range(0, len(unique), batch_size)]
    finally:
        model.train(was)
    feats = torch.cat(out)
    return feats[torch.as_tensor([where[t] for t in texts])]


def recall_at_k(image_feats: torch.Tensor, text_feats: torch.Tensor, image_keys: torch.Tensor,
                text_keys: torch.Tensor, ks: Sequence[int] = KS) -> dict:
    """Image->text and text->image recall@k (in %): a query counts as found at k if one of its top-k
    results is relevant; image i and caption j are relevant to each other when their keys are equal
    (COCO / Flickr: the caption's image index; the embedded stand-in: the described class and attributes)."""
    rel = image_keys.view(-1, 1) == text_keys.view(1, -1)
    if not bool(rel.any(1).all()) or not bool(rel.any(0).all()):
        raise DataError("every image needs at least one relevant caption and every caption one relevant image")
    ranks = query_ranks(image_feats, text_feats, image_keys, text_keys)
    out = {}
    for name in ("i2t", "t2i"):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * float((ranks[name] <= k).mean())
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


def query_ranks(image_feats: torch.Tensor, text_feats: torch.Tensor, image_keys: torch.Tensor,
                text_keys: torch.Tensor) -> dict:
    """Per query, the 1-based rank of its first relevant result: {"i2t": one per image, "t2i": one per caption}
    (int64 numpy arrays, query order = the set's order); ``recall_at_k`` is 100 * mean(rank <= k). Ties count
    against the query: an irrelevant result scoring exactly as high as the best relevant one ranks before it."""
    import numpy as np

    sim = image_feats @ text_feats.T
    rel = image_keys.view(-1, 1) == text_keys.view(1, -1)
    out = {}
    for name, s, r in (("i2t", sim, rel), ("t2i", sim.T, rel.T)):
        best = torch.where(r, s, torch.full_like(s, -float("inf"))).max(1).values.view(-1, 1)  # best relevant score
        ahead = (s > best) | ((s == best) & ~r)
        out[name] = (1 + ahead.sum(1)).numpy().astype(np.int64)
    return out


def rsum_per_query(ranks: dict, ks: Sequence[int] = KS) -> dict:
    """Each query's share of rsum: 100 * (number of k in ``ks`` with rank <= k); rsum = the mean over image queries
    plus the mean over caption queries (``stats.paired_bootstrap_parts`` compares two models on it)."""
    import numpy as np

    return {d: 100.0 * sum((np.asarray(ranks[d]) <= k).astype(np.float64) for k in ks) for d in ("i2t", "t2i")}


def zero_shot_accuracy(image_feats: torch.Tensor, labels: torch.Tensor, class_feats: torch.Tensor) -> float:
    """Top-1 (in %) of classifying each image by its most similar class embedding (already normalised)."""
    return 100.0 * float(((image_feats @ class_feats.T).argmax(1) == labels).float().mean())


def class_embeddings(model: nn.Module, classnames: Sequence[str], templates: Sequence[str], tokenizer: Callable
                     ) -> torch.Tensor:
    """One normalised embedding per class: the mean over the templates of its prompts, renormalised."""
    texts = [t.format(name=c) for c in classnames for t in templates]
    f = encode_texts(model, texts, tokenizer).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(f, dim=-1)


@dataclass
class RetrievalSet:
    """Evaluation images (a re-iterable of image batches), their captions and the relevance keys."""

    images: Iterable[torch.Tensor]
    captions: list[str]
    image_keys: torch.Tensor
    caption_keys: torch.Tensor
    labels: torch.Tensor | None = None  # class per image, for zero-shot accuracy
    info: dict = field(default_factory=dict)


@dataclass
class PooledSet:
    """A retrieval set's features before the projections, computed once for models that share their towers and
    differ only in their projections (a pruned model and its projection re-fit): the image batches as the set
    gives them, the distinct captions in chunks of 256, as :func:`encode_images` / :func:`encode_texts` run them."""

    images: list[torch.Tensor]
    texts: list[torch.Tensor]
    unique: list[str]


@torch.no_grad()
def pool_set(model: nn.Module, data: RetrievalSet, tokenizer: Callable, batch_size: int = 256) -> PooledSet:
    """``data``'s pooled features under ``model``'s towers (see :class:`PooledSet`)."""
    slots = _projection_slots(model)
    unique = list(dict.fromkeys(data.captions))
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with _without_projections(model, slots):
            img = [model.encode_image(x.to(device)) for x in data.images]
            txt = [model.encode_text(tokenizer(unique[i:i + batch_size]).to(device))
                   for i in range(0, len(unique), batch_size)]
    finally:
        model.train(was)
    return PooledSet(img, txt, unique)


@torch.no_grad()
def _project(model: nn.Module, pooled: PooledSet, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised embeddings ``encode_images`` / ``encode_texts`` give, from pooled features: each chunk goes
    through the model's own projection module (or parameter), as inside its forward."""
    slots = _projection_slots(model)

    def proj(t: str, x: torch.Tensor) -> torch.Tensor:
        obj = getattr(*slots[t])
        return obj(x) if isinstance(obj, nn.Module) else x @ obj

    img = torch.cat([F.normalize(proj("image", x).float(), dim=-1).cpu() for x in pooled.images])
    txt = torch.cat([F.normalize(proj("text", x).float(), dim=-1).cpu() for x in pooled.texts])
    where = {t: i for i, t in enumerate(pooled.unique)}
    return img, txt[torch.as_tensor([where[t] for t in captions])]


def evaluate(model: nn.Module, data: RetrievalSet, tokenizer: Callable, *, classnames: Sequence[str] | None = None,
             templates: Sequence[str] | None = None, ranks: bool = False, pooled: PooledSet | None = None) -> dict:
    """Recall@1/5/10 both ways (and zero-shot top-1 where class names and labels exist), in %; with ``ranks``
    also "ranks": every query's rank of its first relevant result (``query_ranks``). ``pooled``: the set's pooled
    features from :func:`pool_set` under this model's towers (then only the projections run here)."""
    if pooled is None:
        img = encode_images(model, data.images)
        txt = encode_texts(model, data.captions, tokenizer)
    else:
        img, txt = _project(model, pooled, data.captions)
    out = recall_at_k(img, txt, data.image_keys, data.caption_keys)
    if ranks:
        out["ranks"] = query_ranks(img, txt, data.image_keys, data.caption_keys)
    if classnames is not None and data.labels is not None:
        out["zero_shot_top1"] = zero_shot_accuracy(img, data.labels, class_embeddings(model, classnames, templates,
                                                                                       tokenizer))
    return out


# ---------------------------------------------------------------------------------------------
# Projections: the CLIP counterpart of a classifier's head re-fit
# ---------------------------------------------------------------------------------------------
def _projection_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Where each tower's final projection lives: (owner module, attribute)."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.model import CLIP
    from open_clip.timm_model import TimmModel

    slots = {}
    v = model.visual
    if isinstance(v, TimmModel):
        if not isinstance(v.head._modules.get("proj"), nn.Linear):
            raise UnsupportedModelError("projection re-fit needs a linear image projection (timm_proj='linear')")
        slots["image"] = (v.head, "proj")
    elif getattr(v, "proj", None) is not None:
        slots["image"] = (v, "proj")
    text = model if isinstance(model, CLIP) else model.text
    if isinstance(text, HFTextEncoder):
        if not isinstance(text.proj, nn.Linear):
            raise UnsupportedModelError("projection re-fit needs a linear text projection (hf_proj_type='linear')")
        slots["text"] = (text, "proj")
    elif getattr(text, "text_projection", None) is not None:
        slots["text"] = (text, "text_projection")
    if set(slots) != {"image", "text"}:
        raise UnsupportedModelError("projection re-fit needs a projection on both towers")
    return slots


def _as_matrix(obj) -> torch.Tensor:
    """(in, out) matrix of a projection (a Linear's weight transposed, or open_clip's parameter)."""
    if isinstance(obj, nn.Linear):
        if obj.bias is not None:
            raise UnsupportedModelError("projection re-fit supports bias-free projections")
        return obj.weight.detach().T
    return obj.detach()


@contextlib.contextmanager
def _without_projections(model: nn.Module, slots: dict):
    """Temporarily swap each projection for the identity, so the towers output their pooled features."""
    saved = {t: getattr(owner, attr) for t, (owner, attr) in slots.items()}
    try:
        for t, (owner, attr) in slots.items():
            obj = saved[t]
            if isinstance(obj, nn.Module):
                setattr(owner, attr, nn.Identity())
            else:
                d = obj.shape[0]
                setattr(owner, attr, nn.Parameter(torch.eye(d, dtype=obj.dtype, device=obj.device), requires_grad=False))
        yield
    finally:
        for t, (owner, attr) in slots.items():
            setattr(owner, attr, saved[t])


@torch.no_grad()
def pooled_features(model: nn.Module, images: Iterable[torch.Tensor], texts: Sequence[str], tokenizer: Callable
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each tower's pooled features BEFORE its projection (unnormalised), for images and texts."""
    slots = _projection_slots(model)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with _without_projections(model, slots):
            img = torch.cat([model.encode_image(x.to(device)).float().cpu() for x in images])
            unique = list(dict.fromkeys(texts))
            where = {t: i for i, t in enumerate(unique)}
            txt = torch.cat([model.encode_text(tokenizer(unique[i:i + 256]).to(device)).float().cpu()
                             for i in range(0, len(unique), 256)])
    finally:
        model.train(was)
    return img, txt[torch.as_tensor([where[t] for t in texts])]


def fit_projections(img_feats: torch.Tensor, txt_feats: torch.Tensor, keys: torch.Tensor, *, init: dict | None = None,
                    embed_dim: int | None = None, logit_scale: float = math.log(1 / 0.07), steps: int = 300,
                    batch_size: int = 256, lr: float = 1e-3, seed: int = 0) -> dict:
    """Train the two projections (and the logit scale) on fixed pooled features with the contrastive loss.

    ``img_feats[i]`` and ``txt_feats[i]`` form pair i with key ``keys[i]``. ``init``: start from these
    (in, out) matrices (the re-fit of a pruned model starts from its current projections).
    Returns {"image": (in, out), "text": (in, out), "logit_scale": float, "losses": [...]}.
    """
    g = torch.Generator().manual_seed(seed)
    if init is None:
        if embed_dim is None:
            raise ValueError("give embed_dim (or init) to fit projections from scratch")
        wi = torch.randn(img_feats.shape[1], embed_dim, generator=g) / math.sqrt(img_feats.shape[1])
        wt = torch.randn(txt_feats.shape[1], embed_dim, generator=g) / math.sqrt(txt_feats.shape[1])
    else:
        wi, wt = init["image"].detach().float().clone(), init["text"].detach().float().clone()
    wi, wt = nn.Parameter(wi), nn.Parameter(wt)
    ls = nn.Parameter(torch.tensor(float(logit_scale)))
    opt = torch.optim.Adam([wi, wt, ls], lr=lr)
    losses = []
    n = len(keys)
    for step in range(steps):
        rows = torch.randint(0, n, (min(batch_size, n),), generator=g)
        out = (F.normalize(img_feats[rows] @ wi, dim=-1), F.normalize(txt_feats[rows] @ wt, dim=-1),
               ls.clamp(max=math.log(100)).exp())
        loss = contrastive_loss(out, keys[rows])
        value = loss.item()
        if not math.isfinite(value):
            raise SearchDivergedError(f"projection fit: the loss is {value} at step {step + 1}; lower lr")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(value)
    return {"image": wi.detach(), "text": wt.detach(), "logit_scale": float(ls.detach().clamp(max=math.log(100))),
            "losses": losses}


@torch.no_grad()
def set_projections(model: nn.Module, fit: dict) -> None:
    """Write fitted (in, out) projection matrices (and the logit scale) into the model."""
    for t, (owner, attr) in _projection_slots(model).items():
        obj = getattr(owner, attr)
        w = fit[t].to(dtype=_as_matrix(obj).dtype, device=_as_matrix(obj).device)
        if isinstance(obj, nn.Linear):
            obj.weight.copy_(w.T)
        else:
            obj.copy_(w)
    if "logit_scale" in fit:
        model.logit_scale.fill_(fit["logit_scale"])


def refit_projections(model: nn.Module, images: Iterable[torch.Tensor], texts: Sequence[str], keys: torch.Tensor,
                      tokenizer: Callable, *, text_image: torch.Tensor | None = None, init: str = "current",
                      **kw) -> dict:
    """Re-fit a (pruned) model's two projections (and logit scale) on its own pooled features, in place; the
    towers are untouched. Pair j = (image ``text_image[j]``, ``texts[j]``) with key ``keys[j]`` (default: text j
    goes with image j). ``init="current"`` starts from the model's projections and logit scale; ``"scratch"``
    from random ones (``embed_dim`` and, optionally, ``logit_scale`` in ``kw``), which with the dense
    projections' own recipe and fit set re-makes them exactly on the dense model. ``kw`` goes to
    :func:`fit_projections`. Returns the fit's settings and losses."""
    if init not in ("current", "scratch"):
        raise ValueError(f"init must be 'current' or 'scratch', got {init!r}")
    img, txt = pooled_features(model, images, texts, tokenizer)
    if text_image is not None:
        img = img[torch.as_tensor(text_image)]
    if init == "current":
        slots = _projection_slots(model)
        start = {t: _as_matrix(getattr(o, a)).float().cpu() for t, (o, a) in slots.items()}
        fit = fit_projections(img, txt, keys, init=start, logit_scale=model.logit_scale.item(), **kw)
    else:
        fit = fit_projections(img, txt, keys, **kw)
    set_projections(model, fit)
    tail = fit["losses"][-max(1, len(fit["losses"]) // 10):]
    return {"init": init, "steps": len(fit["losses"]), "loss_first": fit["losses"][0], "loss_last": fit["losses"][-1],
            "loss_tail": sum(tail) / len(tail), "pairs": len(keys), **{k: v for k, v in kw.items()}}


# ---------------------------------------------------------------------------------------------
# Tasks: a dual encoder with its search batches and evaluation sets
# ---------------------------------------------------------------------------------------------
@dataclass
class ClipTask:
    """What a CLIP table needs: the dense model, its tokenizer, search / fine-tune batches
    (``((images, tokens), keys)``), the evaluation sets ('val' chooses, 'test' reports), the pairs the
    projection re-fit uses, and class names / templates for zero-shot accuracy (None: not reported)."""

    name: str
    label: str
    model: nn.Module
    tokenizer: Callable
    train_batches: Callable[[int, int, int], Iterable]
    sets: dict
    refit_pairs: tuple | None = None  # (image batches, texts, keys per text, image index per text)
    classnames: Sequence[str] | None = None
    templates: Sequence[str] | None = None
    input_size: dict = field(default_factory=dict)  # {"image": px, "text": tokens per caption}
    info: dict = field(default_factory=dict)
    # how the projections are re-fit (refit_projections' init and fit_projections' settings); None: from the
    # model's current projections, Adam lr 1e-3 (a pretrained CLIP has no recipe of its own projections to re-run)
    refit_recipe: dict | None = None

    def evaluate(self, model: nn.Module, split: str = "test", ranks: bool = False,
                 pooled: PooledSet | None = None) -> dict:
        """:func:`evaluate` on ``split``; ``pooled``: that split's :meth:`pool` under the same towers."""
        return evaluate(model, self._set(split), self.tokenizer, classnames=self.classnames, templates=self.templates,
                        ranks=ranks, pooled=pooled)

    def pool(self, model: nn.Module, split: str = "test") -> PooledSet:
        """``split``'s pooled features under ``model``'s towers, for several :meth:`evaluate` calls of models that
        differ only in their projections."""
        return pool_set(model, self._set(split), self.tokenizer)

    def _set(self, split: str) -> RetrievalSet:
        if split not in self.sets:
            raise ValueError(f"unknown split {split!r}; this task has {sorted(self.sets)}")
        return self.sets[split]


def karpathy_task(model: nn.Module, tokenizer: Callable, dataset: str, root=None, *, image_size: int | None = None,
                  n_val: int | None = None, n_test: int | None = None, refit_images: int = 1000, eval_batch: int = 250,
                  workers: int = 8, mean=None, std=None) -> ClipTask:
    """A ClipTask on COCO or Flickr30K, Karpathy splits read from a user folder (``sppbench.tasks.captions``):
    search / fine-tune on 'train' (one random caption of each image per pair), 'val' = Karpathy val,
    'test' = Karpathy test (5k COCO / 1k Flickr images, 5 captions each), relevance = same image."""
    from torch.utils.data import DataLoader


    ann, img_root = karpathy_paths(dataset, root)
    size = image_size or int(model.visual.image_size[0])
    tf = image_transform(size, *(x for x in (mean, std) if x is not None))
    splits = {}
    for split, n in (("train", None), ("val", n_val), ("test", n_test)):
        cs = load_karpathy(ann, img_root, split, dataset)
        splits[split] = cs.subset(n) if n else cs

    def retrieval(cs) -> RetrievalSet:
        loader = DataLoader(CaptionImages(cs, tf), batch_size=eval_batch, shuffle=False, num_workers=workers)
        return RetrievalSet(loader, list(cs.captions), torch.arange(len(cs)), torch.as_tensor(cs.caption_image),
                            info={"images": len(cs), "captions": cs.n_captions})

    train = splits["train"]

    data = CaptionImages(train, tf)
    caps = [train.captions_of(i) for i in range(len(train))]

    def train_batches(batch_size: int, steps: int, seed: int):
        """One random caption per image; the key of a pair is its image index."""
        def epoch(g):
            perm = torch.randperm(len(train), generator=g)
            for s in range(0, len(perm) - batch_size + 1, batch_size):
                rows = perm[s:s + batch_size].tolist()
                texts = [train.captions[caps[i][int(torch.randint(len(caps[i]), (1,), generator=g))]] for i in rows]
                yield (torch.stack([data[i] for i in rows]), tokenizer(texts)), torch.as_tensor(rows)

        return StepBatches(epoch, steps, seed)

    sub = train.subset(min(refit_images, len(train)))
    refit = (DataLoader(CaptionImages(sub, tf), batch_size=eval_batch, num_workers=workers), list(sub.captions),
             torch.as_tensor(sub.caption_image), torch.as_tensor(sub.caption_image))
    ctx = int(getattr(tokenizer, "context_length", 77) or 77)
    return ClipTask(dataset, f"paper profile: {dataset} Karpathy splits", model, tokenizer, train_batches,
                    {"val": retrieval(splits["val"]), "test": retrieval(splits["test"])}, refit,
                    input_size={"image": size, "text": ctx},
                    info={"data": str(ann), "train_images": len(train), "val_images": len(splits["val"]),
                          "test_images": len(splits["test"])})
