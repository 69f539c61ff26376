"""Data-parallel runs with PyTorch's own engine: ``torchrun ... -m sppbench search|finetune``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; ``init_from_env()`` starts the
process group from them (NCCL on CUDA, gloo on CPU; ``SPPBENCH_DIST_BACKEND`` overrides). Every rank
holds the whole model and the same SLBI state; each takes a contiguous slice of every global batch,
DistributedDataParallel averages the gradients, so every rank makes the same update (checked at the
end of a search by ``check_replicas``). Only rank 0 writes files.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch
import torch.distributed as dist

BACKEND_ENV = "SPPBENCH_DIST_BACKEND"


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def active() -> bool:
    """True inside a process group of more than one process."""
    return world()[1] > 1


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str | None = None) -> torch.device:
    """Join the process group torchrun describes (no-op for a single process); returns this rank's device:
    ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if launched() and not dist.is_initialized():
        backend = backend or os.environ.get(BACKEND_ENV) or ("nccl" if cuda else "gloo")
        dist.init_process_group(backend=backend)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def mean_scalar(value: torch.Tensor) -> float:
    """The mean of a scalar over ranks (a float on every rank): the loss of the global batch."""
    if not active():
        return float(value)
    t = value.detach().double().reshape(1).clone()
    dist.all_reduce(t)
    return float(t) / world()[1]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over ``model``'s trainable parameters (call after compression and after
    freezing what must not train); the model itself outside a process group."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    import inspect

    # buffers are identical on every rank (same checkpoint, eval-mode norms): no per-forward buffer sync
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=ids, **no_sync)


def check_replicas(tensors: Iterable[torch.Tensor], what: str = "the SLBI state") -> float:
    """Largest absolute difference between this rank's tensors and rank 0's (0.0 when identical); raises
    when any rank differs, since the ranks would then read different solution paths."""
    if not active():
        return 0.0
    flat = torch.cat([t.detach().double().reshape(-1).cpu() for t in tensors])
    ref = flat.clone()
    if dist.get_backend() == "nccl":
        ref = ref.cuda()
        dist.broadcast(ref, src=0)
        ref = ref.cpu()
    else:
        dist.broadcast(ref, src=0)
    diff = torch.tensor([float((flat - ref).abs().max()) if flat.numel() else 0.0], dtype=torch.double)
    if dist.get_backend() == "nccl":
        diff = diff.cuda()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    worst = float(diff)
    if worst != 0.0:
        raise RuntimeError(f"{what} differs across ranks (max |difference| {worst:.3g}); every rank must see the same "
                           "global batch and run the same code: report this as a bug")
    return worst
