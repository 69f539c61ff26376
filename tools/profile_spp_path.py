"""Before/after profile of SPP-RIA's per-Linear path: two (D @ G) products per step (the code at commit BEFORE)
vs one (the working tree), on the four Linear shapes of SmolLM2-135M, 20 steps, G from 8192 random tokens.

    python tools/profile_spp_path.py [BEFORE-COMMIT]      (default 5b32a96, the last commit with two products)
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sppbench.methods import llm as new

ROOT = Path(__file__).resolve().parent.parent


def load_before(commit: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:sppbench/methods/llm.py"], capture_output=True,
                         text=True, check=True).stdout
    file = Path(tempfile.mkdtemp()) / "llm_before.py"
    file.write_text(src.replace("from .", "from sppbench."))
    spec = importlib.util.spec_from_file_location("llm_before", file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["llm_before"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    old = load_before(sys.argv[1] if len(sys.argv) > 1 else "5b32a96")
    torch.manual_seed(0)
    cfg = dict(new.SPP_RIA_DEFAULTS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SPP-RIA settings {cfg}")
    shapes = {"q/o (576x576)": (576, 576), "k/v (192x576)": (192, 576), "gate/up (1536x576)": (1536, 576),
              "down (576x1536)": (576, 1536)}
    for name, (o, i) in shapes.items():
        W = torch.randn(o, i) * 0.02
        X = torch.randn(8192, i)
        G = X.T @ X
        res = {}
        for tag, mod in (("before", old), ("after", new)):
            mod.spp_path(W, G, **{**cfg, "steps": 2})
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                out = mod.spp_path(W, G, **cfg)
                times.append(time.perf_counter() - t0)
            res[tag] = (sorted(times)[2], out)
        (tb, ob), (ta, oa) = res["before"], res["after"]
        same = torch.equal(ob["entry_step"], oa["entry_step"]) and torch.equal(ob["M"], oa["M"])
        print(f"{name}: before {1000 * tb:.1f} ms, after {1000 * ta:.1f} ms per 20-step path (x{tb / ta:.2f}); "
              f"identical entry steps and M: {same}; identical losses: {ob['losses'] == oa['losses']}")
    W = torch.randn(576, 1536) * 0.02
    X = torch.randn(8192, 1536)
    G = X.T @ X
    for tag, mod in (("before", old), ("after", new)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            mod.spp_path(W, G, **cfg)
        print(f"--- {tag}: down_proj-shaped Linear, 20 steps, top ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))


if __name__ == "__main__":
    main()
