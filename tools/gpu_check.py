"""GPU readiness check: images/s and peak memory of plain training steps vs SLBI search steps, per precision.

    tools/gpu_check.sh [--precisions bf16 fp32] [--model deit_small_patch16_224] [--batch 256] [--steps 20]
    python tools/gpu_check.py --cpu-smoke --model test_vit      # the same code on CPU, to test the script

Random-init timm model (no download), random images and labels. (a) plain: a fresh model in train mode, AdamW
on every weight, forward + backward + step. (b) search: ``sppbench.search`` on the masks of another fresh model
(weights frozen), hand-given constants. Warm-up steps are excluded; the clock runs between
``torch.cuda.synchronize()`` calls. Goal: search images/s >= 0.90 x plain. Writes
``<out>/gpu_check_<device>.json`` (default out: results/bench) and prints a summary. Without CUDA it exits 2
unless --cpu-smoke is given.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sppbench  # noqa: E402
from sppbench.core.batches import precision_context  # noqa: E402
from sppbench.core.search import search  # noqa: E402

GOAL = 0.90
NO_CUDA = "no CUDA GPU: tools/gpu_check.sh runs only on a GPU machine"
# record_every=1 is what the CLI and the study runners use (search()'s default): one support record per step,
# i.e. one small GPU->CPU read per mask group per step; the search already reads the loss every step.
RECORD_EVERY = 1


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_small_patch16_224", help="timm model name (random init)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 256; --cpu-smoke: 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 20; --cpu-smoke: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --cpu-smoke: 1)")
    ap.add_argument("--img", type=int, default=None, help="image size (default: the model's own)")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--record-every", type=int, default=RECORD_EVERY)
    ap.add_argument("--kappa", type=float, default=10.0)
    ap.add_argument("--alpha", type=float, default=1e-4)
    ap.add_argument("--nu", type=float, default=10.0)
    ap.add_argument("--lam", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench", help="folder for the JSON")
    ap.add_argument("--cpu-smoke", action="store_true", help="run on CPU (tests this script; timings mean nothing)")
    args = ap.parse_args(argv)
    small = args.cpu_smoke
    args.batch = args.batch if args.batch is not None else (4 if small else 256)
    args.steps = args.steps if args.steps is not None else (3 if small else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 5)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.record_every < 1:
        ap.error("--batch, --steps and --record-every must be >= 1, --warmup >= 0")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def fresh_model(name: str, img: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"img_size": img} if img is not None else {}
    return timm.create_model(name, pretrained=False, **kw).to(device)


def make_batches(n: int, batch: int, img: int, classes: int, device: torch.device) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, img, img, generator=g).to(device),
             torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(n)]


def time_plain(args, img: int, batches: list, precision: str, device: torch.device) -> dict:
    """AdamW on every weight of a fresh model in train mode: forward + loss (under the precision), backward, step."""
    reset_memory(device)
    model = fresh_model(args.model, img, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        x, y = batches[i % len(batches)]
        with precision_context(precision, device):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    seconds = time.perf_counter() - t0
    out = {"seconds": round(seconds, 4), "images_per_s": round(args.batch * args.steps / seconds, 2),
           "max_memory_bytes": peak_memory(device), "final_loss": float(loss.detach())}
    del model, opt, loss
    return out


def time_search(args, img: int, batches: list, precision: str, device: torch.device) -> dict:
    """sppbench.search on the masks of a fresh model; the clock runs from the end of the last warm-up step to the
    end of the last step (through search()'s callback), so setup and the final path snapshot are outside it."""
    reset_memory(device)
    model = fresh_model(args.model, img, device)
    m = sppbench.attach_masks(model)
    marks = {}

    def callback(step, value, opt):
        if step == args.warmup or step == args.warmup + args.steps:
            sync(device)
            marks[step] = time.perf_counter()

    if args.warmup == 0:
        sync(device)
        marks[0] = time.perf_counter()
    path = search(m, batches, F.cross_entropy, steps=args.warmup + args.steps, precision=precision,
                  kappa=args.kappa, alpha=args.alpha, nu=args.nu, lam=args.lam, record_every=args.record_every,
                  callback=callback, seed=0)
    seconds = marks[args.warmup + args.steps] - marks[args.warmup]
    out = {"seconds": round(seconds, 4), "images_per_s": round(args.batch * args.steps / seconds, 2),
           "max_memory_bytes": peak_memory(device), "final_loss": path.history[-1]["loss"],
           "path_precision": path.config["precision"], "mask_groups": len(m.groups),
           "support_last": path.history[-1]["support_pool"]}
    del model, m, path
    return out


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}".strip()


def main(argv=None) -> int:
    args = parse(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print(NO_CUDA, file=sys.stderr)
        return 2
    probe = timm.create_model(args.model, pretrained=False)
    img = args.img or int(probe.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    classes = int(probe.num_classes) or 1000
    del probe
    name = device_label(device)
    batches = make_batches(2, args.batch, img, classes, device)
    runs = {}
    for precision in args.precisions:
        plain = time_plain(args, img, batches, precision, device)
        srch = time_search(args, img, batches, precision, device)
        ratio = srch["images_per_s"] / plain["images_per_s"]
        runs[precision] = {"plain": plain, "search": srch, "ratio_search_over_plain": round(ratio, 4),
                           "verdict": "PASS" if ratio >= GOAL else "BELOW GOAL"}
    result = {
        "what": "tools/gpu_check.py: plain training steps vs sppbench.search steps",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name, "device_type": device.type, "cpu_smoke": bool(args.cpu_smoke),
        "torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "model": args.model, "image_size": img, "classes": classes, "batch": args.batch, "steps": args.steps,
        "warmup": args.warmup, "precisions": list(args.precisions), "goal_ratio": GOAL,
        "search_constants": {"kappa": args.kappa, "alpha": args.alpha, "nu": args.nu, "lam": args.lam},
        "record_every": args.record_every,
        "record_every_note": "1 = search()'s default, as the CLI and the study runners run it",
        "plain_recipe": "fresh model, train mode, AdamW on every weight, no masks, no per-step loss read",
        "search_recipe": "sppbench.search: masks only (weights frozen), eval mode, loss read every step",
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    file = args.out / f"gpu_check_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_') or 'device'}.json"
    file.write_text(json.dumps(result, indent=2) + "\n")

    def gib(b):
        return "n/a" if b is None else f"{b / 2**30:.2f} GiB"

    print(f"{name} | torch {torch.__version__} | {args.model} {img}px | batch {args.batch} | "
          f"{args.steps} timed steps after {args.warmup} warm-up | record_every {args.record_every} "
          "(search()'s default, as the CLI runs it)" + (" | CPU SMOKE: timings mean nothing" if args.cpu_smoke else ""))
    for precision, r in runs.items():
        p, s = r["plain"], r["search"]
        print(f"  {precision}: plain {p['images_per_s']:.1f} img/s (peak {gib(p['max_memory_bytes'])}) | "
              f"search {s['images_per_s']:.1f} img/s (peak {gib(s['max_memory_bytes'])}) | "
              f"search/plain {r['ratio_search_over_plain']:.3f} (goal >= {GOAL}) {r['verdict']}")
    print(f"wrote {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
