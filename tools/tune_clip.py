"""A small grid over the SPP constants on the embedded CLIP stand-in, scored on the validation split.

Each line printed: the constants, the share of entries that entered the support within 60 steps, the loss, and
for 50% and 35% of the dense joint MACs and each read-out: (val rsum with no retraining, val rsum after the
projection re-fit). Output of the run behind configs/search_embedded_clip.json:
results/runs/tune_clip_embedded/20261130-grid6.jsonl (2-core CPU, torch 2.14.1).

    python tools/tune_clip.py [kappa,alpha,nu,lam ...]
"""
import json
import sys
import time

import sppbench
from sppbench.tasks.clip import contrastive_loss, refit_projections
from sppbench.tasks.embedded_clip import embedded_clip_task

task = embedded_clip_task(n_val=500, n_test=200)
m = sppbench.attach_masks(task.model, input_size=task.input_size)
dense = m.cost_model.cost({g.name: g.size for g in m.groups})[1]
ri, rt, rk, rti = task.refit_pairs
grid = [(10, 0.02, 10, 0.05), (10, 0.05, 50, 0.05), (5, 0.5, 50, 0.05), (10, 0.005, 10, 0.05), (10, 0.02, 10, 0.2),
        (10, 0.1, 50, 0.02)]
if len(sys.argv) > 1:
    grid = [tuple(map(float, a.split(","))) for a in sys.argv[1:]]
for k, a, nu, lam in grid:
    t = time.time()
    batches = task.train_batches(32, 60, 0)
    path = sppbench.search(m, batches, contrastive_loss, steps=60, kappa=k, alpha=a, nu=nu, lam=lam)
    entered = sum(int((e >= 0).sum()) for e in path.entry_step.values()) / sum(g.size for g in path.groups)
    res = {"c": (k, a, nu, lam), "entered": round(entered, 3), "loss_max": max(h["loss"] for h in path.history),
           "loss_last": path.history[-1]["loss"], "s": round(time.time() - t, 1)}
    for frac in (0.5, 0.35):
        for ro in ("global", "per-layer"):
            ks = path.keep(macs=int(frac * dense), readout=ro)
            small = sppbench.compress(m, ks)
            nr = task.evaluate(small, "val")["rsum"]
            refit_projections(small, ri, rt, rk, task.tokenizer, text_image=rti, steps=300)
            res[f"{frac}-{ro}"] = (round(nr, 1), round(task.evaluate(small, "val")["rsum"], 1))
    print(json.dumps(res), flush=True)
