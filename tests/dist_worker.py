"""A search / fine-tune on a tiny random-init ViT, run as its own process by test_distributed.py:

    python tests/dist_worker.py search OUT.json [--steps N] [--checkpoint F --every K] [--resume]
    torchrun --nproc_per_node=2 tests/dist_worker.py search OUT.json ...      (gloo, CPU)
    torchrun --nproc_per_node=2 tests/dist_worker.py finetune OUT.pt ...

Data: GLOBAL_BATCH synthetic images per step, labelled by the dense model; each rank takes its
contiguous slice of every global batch, so 1 and N processes see the same global batches.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_vit  # noqa: E402

from sppbench import attach_masks, finetune, search
from sppbench import compress  # noqa: E402
from sppbench.core import distributed  # noqa: E402

GLOBAL_BATCH = 8
CONSTS = dict(kappa=10.0, alpha=0.05, nu=10.0, lam=0.02)


class SyntheticBatches:
    """``steps`` global batches of random images labelled by ``model``; this rank's slice of each."""

    def __init__(self, model, steps: int, shard=(0, 1), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.xs = torch.randn(steps, GLOBAL_BATCH, 3, 32, 32, generator=g)
        with torch.no_grad():
            self.ys = torch.stack([model(x).argmax(-1) for x in self.xs])
        rank, world = shard
        self.sl = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        self.steps = steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start: int = 0):
        for i in range(start, self.steps):
            yield self.xs[i, self.sl], self.ys[i, self.sl]


def run_search(out: Path, steps: int, checkpoint=None, every: int = 0, resume: bool = False):
    model = tiny_vit(0)
    m = attach_masks(model, input_size=(3, 32, 32))
    batches = SyntheticBatches(model, steps, distributed.world())
    path = search(m, batches, F.cross_entropy, steps=steps, checkpoint=checkpoint, checkpoint_every=every,
                  resume=resume, run={"model": "tiny_vit", "global_batch": GLOBAL_BATCH}, **CONSTS)
    if distributed.is_main():
        path.save(out)
    return path


def run_finetune(out: Path, steps: int):
    model = tiny_vit(0)
    m = attach_masks(model, input_size=(3, 32, 32))
    small = compress(m, _half_keep(m))  # compressed before DDP wraps it (inside finetune)
    batches = SyntheticBatches(model, steps, distributed.world(), seed=1)
    rec = finetune(small, batches, steps=steps, lr=1e-3, warmup_steps=1)
    if distributed.is_main():
        torch.save({"state": small.state_dict(), "losses": rec["losses"]}, out)


def run_replicas(out: Path):
    """check_replicas: 0.0 for equal tensors on every rank, an error when one rank's tensor differs."""
    rank = distributed.world()[0]
    same = distributed.check_replicas([torch.ones(3), torch.arange(4)])
    try:
        distributed.check_replicas([torch.ones(3) + rank * 1e-3])
        caught = ""
    except RuntimeError as exc:
        caught = str(exc)
    if distributed.is_main():
        out.write_text(f"{same}\n{caught}")


def _half_keep(m):
    from sppbench.core.path import SolutionPath

    # a fixed keep-set: the first half of every group (no search needed)
    entry = {g.name: torch.arange(g.size) for g in m.groups}
    zeros = {g.name: torch.zeros(g.size) for g in m.groups}
    return SolutionPath(m.groups, entry, zeros, zeros, m.cost_model).keep(fraction=0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("search", "finetune", "replicas"))
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    distributed.init_from_env()
    try:
        if args.what == "search":
            run_search(args.out, args.steps, args.checkpoint, args.every, args.resume)
        elif args.what == "finetune":
            run_finetune(args.out, args.steps)
        else:
            run_replicas(args.out)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
