"""Where a compressed model's CPU time goes: the embedded ViT at 50% of the MACs read off one SPP path as is, with
widths rounded to multiples of 8, and Torch-Pruning magnitude at the same MACs; torch.profiler, batch 32.

    python tools/profile_latency.py [--fraction 0.5] [--batch 32]
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sppbench import compress
from sppbench import methods
from sppbench.studies.vision_table import spp_for, study_task


def widths(model) -> list:
    out = []
    for b in model.blocks:
        a = b.attn
        out.append((getattr(a, "qk_dim", getattr(a, "head_dim", None)), getattr(a, "v_dim", getattr(a, "head_dim", None)),
                    b.mlp.fc1.out_features if hasattr(b.mlp, "fc1") else 0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    task = study_task("embedded-vit", 10, 10, 10)
    spp = spp_for("embedded-vit")
    s = task.img_size
    models = {"dense": copy.deepcopy(task.dense).eval()}
    m = task.attach()
    dense = m.dense_cost()[1]
    batches = task.train_batches(32, 30, 0)
    path = methods.ranking("spp", m, batches, F.cross_entropy, steps=30, seed=0, spp=spp)
    budget = int(args.fraction * dense)
    models["spp"] = compress(m, path.keep(macs=budget)).eval()
    models["spp round_to=8"] = compress(m, path.keep(macs=budget, round_to=8)).eval()
    models["tp-magnitude"] = methods.prune("tp-magnitude", m, [{"macs": budget}], batches=batches,
                                           loss_fn=F.cross_entropy, steps=30, spp=spp,
                                           example_inputs=torch.zeros(2, 3, s, s))[0].model.eval()
    m.detach_masks()
    x = torch.randn(args.batch, 3, s, s)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.fraction:.0%} of the dense MACs")
    for name, model in models.items():
        if name != "dense":
            print(f"{name}: per-block (q/k head width, v head width, MLP hidden) = {widths(model)}")
    for name, model in models.items():
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    model(x)
        print(f"--- {name}: 10 forwards, top ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
