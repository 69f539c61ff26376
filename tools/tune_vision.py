"""Tune every searching method of a vision table by the same rule on the validation split (sppbench.studies.tuning).

    python tools/tune_vision.py --model embedded-swin --steps 640 [--methods spp,lasso,...] [--fractions 0.7,0.5,0.35]

Writes a ``vision_tuning`` record (one row per method x factor: the knob's value and the validation head-refit
top-1 per budget) and prints the chosen settings as the JSON to pass as ``method_settings`` to the vision table
(notebook 10's ``model_settings`` / noxfile REPRODUCE_PARAMS).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from sppbench import methods
from sppbench.errors import SppBenchError
from sppbench.studies.tuning import FACTORS, tune_vision
from sppbench.studies.vision_table import VisionTableConfig


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"every value must be a positive finite number, got {text!r}")
    return vals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded-vit")
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--methods", default=",".join(methods.TUNING_KNOBS))
    ap.add_argument("--fractions", type=_floats, default=(0.7, 0.5, 0.35))
    ap.add_argument("--factors", type=_floats, default=FACTORS)
    ap.add_argument("--lasso-trials", type=int, default=6)
    ap.add_argument("--n-val", type=int, default=1000)
    a = ap.parse_args(argv)
    if a.steps < 1 or a.lasso_trials < 2 or a.n_val < 1:
        ap.error("--steps and --n-val must be >= 1, --lasso-trials >= 2")
    try:
        cfg = VisionTableConfig(model=a.model, methods=tuple(x.strip() for x in a.methods.split(",")),
                                macs_fractions=a.fractions, steps=a.steps, lasso_trials=a.lasso_trials, n_val=a.n_val)
        res = tune_vision(cfg, factors=a.factors)
    except (SppBenchError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(res["table"].round(4).to_string(index=False))
    print(f"record: {res['record']}")
    print("method_settings:", json.dumps(res["chosen"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
