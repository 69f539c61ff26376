"""Batches for every training loop: device placement, the (inputs, target) loss call, and the cycle that
re-iterates a batch source for as many steps as asked (search, Lasso, DessiLBI, fine-tuning)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def forward_loss(model: torch.nn.Module, batch: Any, loss_fn: Callable) -> torch.Tensor:
    """``loss_fn(model(inputs), target)`` for a batch ``(inputs, target)``; a tuple of inputs is splatted."""
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise TypeError("each batch must be a pair (inputs, target); inputs may be a tuple of tensors")
    inputs, target = batch
    out = model(*inputs) if isinstance(inputs, (list, tuple)) else model(inputs)
    return loss_fn(out, target)


class BatchCycle:
    """Public: the search, Lasso, DessiLBI and fine-tuning loops all draw batches through it.

    Iterate batches for as many steps as asked, re-iterating a re-iterable when it runs out.

    ``start``: begin at batch ``start`` of the sequence (a resumed search); batch sources with an
    ``iterate(start)`` method skip cheaply, others are read and dropped up to ``start``.
    """

    def __init__(self, batches: Iterable, start: int = 0):
        self.batches = batches
        self.reiterable = not hasattr(batches, "__next__")  # a list / DataLoader, not a one-shot iterator
        if start and hasattr(batches, "iterate"):
            self.it = batches.iterate(start)
        else:
            self.it = iter(batches)
            for _ in range(start):
                next(self)

    def __next__(self):
        try:
            return next(self.it)
        except StopIteration:
            if not self.reiterable:
                raise ValueError("the batch iterator ran out before the requested number of steps; pass a "
                                 "re-iterable (a list or DataLoader) or an iterator that yields enough batches") from None
            self.it = iter(self.batches)
            try:
                return next(self.it)
            except StopIteration:
                raise ValueError("batches is empty: pass at least one (inputs, target) batch") from None
