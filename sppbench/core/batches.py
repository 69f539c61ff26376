"""Batches for every training loop: device placement, the (inputs, target) loss call, and the cycle that
re-iterates a batch source for as many steps as asked (search, Lasso, DessiLBI, fine-tuning), and the
mixed-precision context of the forward + loss."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable

import torch

#: the ``precision=`` choices of the training loops ("auto": bf16 on a CUDA device that supports it, else fp32)
PRECISIONS = ("fp32", "bf16", "auto")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"fp32" or "bf16" for ``precision`` on ``device``; ValueError naming the choices for anything else."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        dev = torch.device(device)
        return "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def precision_context(precision: str, device: torch.device | str) -> ContextManager:
    """The context for the forward + loss at a resolved ``precision``: nothing for "fp32", bf16 autocast on
    ``device``'s type for "bf16" (parameters, gradients and optimizer state stay float32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"autocast takes a resolved precision ('fp32' or 'bf16'), got {precision!r}; "
                     "call resolve_precision first")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested tuples / lists / dicts) moved to ``device``; the rest as is."""
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
