"""Evaluation of image classifiers: top-1, pooled features, and the linear-head re-fit read-out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.masks import MaskedModel
from .data import ImageSet, preprocess


def _timm(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, MaskedModel) else model


@torch.no_grad()
def features(model: nn.Module, data: ImageSet, size: int, batch_size: int = 250) -> torch.Tensor:
    """Pooled pre-logit features (what the classifier head reads), float32 on CPU."""
    return loader_features(_timm(model), image_batches(data, size, batch_size))[0]


@torch.no_grad()
def top1(model: nn.Module, data: ImageSet, size: int, batch_size: int = 250) -> float:
    """Top-1 accuracy of the model's own head."""
    return loader_top1(model, image_batches(data, size, batch_size))


@torch.no_grad()
def loader_top1(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of the model's own head over every (x, y) batch of ``loader``."""
    was = model.training
    model.eval()
    correct = n = 0
    try:
        dev = next(model.parameters()).device
        for x, y in loader:
            correct += int((model(x.to(dev)).argmax(-1).cpu() == y).sum())
            n += len(y)
    finally:
        model.train(was)
    return correct / n


@dataclass
class LinearHead:
    weight: torch.Tensor
    bias: torch.Tensor
    settings: dict

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.weight.T + self.bias

    def accuracy(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self(feats).argmax(-1) == labels).float().mean())


def fit_linear_head(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-4,
                    max_iter: int = 300) -> LinearHead:
    """Multinomial logistic regression on fixed features (full-batch L-BFGS, deterministic).

    Features are standardised for the optimisation and the scaling folded back into the weights,
    so the returned head applies to raw features.
    """
    feats = feats.double()
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd
    W = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W.T + b, labels) + 0.5 * weight_decay * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    Wr = (W.detach() / sd).float()
    br = (b.detach() - (W.detach() / sd) @ mu).float()
    return LinearHead(Wr, br, {"solver": "lbfgs", "weight_decay": weight_decay, "max_iter": max_iter,
                               "n": int(len(labels)), "standardised": True})


def refit_head_top1(model: nn.Module, fit: ImageSet, test: ImageSet, size: int, num_classes: int = 10,
                    **kw) -> float:
    """Top-1 on ``test`` after re-fitting a linear head on the model's features of ``fit``."""
    head = fit_linear_head(features(model, fit, size), fit.labels, num_classes, **kw)
    return head.accuracy(features(model, test, size), test.labels)


class image_batches:
    """Re-iterable (x, y) batches of an ImageSet, preprocessed to ``size`` (the order of the set)."""

    def __init__(self, data: ImageSet, size: int, batch_size: int = 250):
        self.data, self.size, self.batch_size = data, size, batch_size

    def __iter__(self):
        d, b = self.data, self.batch_size
        for i in range(0, len(d), b):
            yield preprocess(d.images[i:i + b], self.size), d.labels[i:i + b]


@torch.no_grad()
def loader_features(model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features (float32, CPU) and labels of every (x, y) batch of ``loader``.

    ``model`` is a timm classifier (or anything with ``forward_features`` / ``forward_head``); it is
    evaluated in eval mode and put back in its own mode after.
    """
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    feats, labels = [], []
    try:
        for x, y in loader:
            feats.append(model.forward_head(model.forward_features(x.to(dev)), pre_logits=True).float().cpu())
            labels.append(y)
    finally:
        model.train(was)
    return torch.cat(feats), torch.cat(labels)


def own_head_top1(model: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of the model's own classifier head on pooled features from ``loader_features``."""
    head = model.get_classifier()
    dev = next(model.parameters()).device
    with torch.no_grad():
        pred = head(feats.to(dev)).argmax(-1).cpu()
    return float((pred == labels).float().mean())
