"""Recompute a vision- or CLIP-table record's summary and sanity checks from its own rows and per-example results.

    python tools/resummarize.py results/runs/vision_table/<run-id> results/runs/clip_table/<run-id> [...]

Reads ``metrics.json`` (rows) and ``correct.npz`` (vision) or ``ranks.npz`` (CLIP), recomputes ``info.summary``
and ``info.sanity`` with the current ``sppbench.vision.summarize`` / ``sanity_checks`` (CLIP:
``sppbench.clip_table.summarize_clip`` / ``sanity_checks_clip``; same resamples as the run), and rewrites
``metrics.json`` atomically, noting in ``info.statistics.recomputed`` when and at which commit. Nothing
measured changes (rows, arrays, paths); only the statistics derived from them. Used when the statistics
changed after a run (e.g. the two-level bootstrap over seeds and images).
"""
from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from sppbench.fileio import atomic_write_text
from sppbench.results import dumps, git_commit
from sppbench.vision import sanity_checks, summarize


def resummarize(folder: Path) -> dict:
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    info = metrics["info"]
    if (folder / "ranks.npz").is_file():
        return _resummarize_clip(folder, metrics)
    correct = dict(np.load(folder / "correct.npz"))
    table = pd.DataFrame(metrics["rows"])
    resamples = info["statistics"]["resamples"]
    summary = summarize(table, correct, resamples=resamples)
    info["summary"] = summary.to_dict(orient="records")
    info["sanity"] = sanity_checks(table, correct, resamples=resamples)
    info["statistics"]["interval"] = (
        "95% two-level paired bootstrap: each resample draws each side's seeds with replacement, averages them per "
        "test image, then draws test images with replacement (covers search-seed and test-sample variation)")
    info["statistics"]["recomputed"] = {
        "by": "tools/resummarize.py (sppbench.vision.summarize / sanity_checks on this record's rows and correct.npz)",
        "commit": git_commit(), "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(metrics_file, dumps(metrics))
    return info


def _resummarize_clip(folder: Path, metrics: dict) -> dict:
    from sppbench.clip_table import sanity_checks_clip, summarize_clip

    info = metrics["info"]
    ranks = dict(np.load(folder / "ranks.npz"))
    table = pd.DataFrame(metrics["rows"])
    resamples = info["statistics"]["resamples"]
    info["summary"] = summarize_clip(table, ranks, resamples=resamples).to_dict(orient="records")
    info["sanity"] = sanity_checks_clip(table, ranks, resamples=resamples)
    info["statistics"]["recomputed"] = {
        "by": "tools/resummarize.py (sppbench.clip_table.summarize_clip / sanity_checks_clip on this record's rows and "
              "ranks.npz)",
        "commit": git_commit(), "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(folder / "metrics.json", dumps(metrics))
    return info


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for arg in sys.argv[1:]:
        info = resummarize(Path(arg))
        print(f"{arg}: {len(info['summary'])} summary rows, {len(info['sanity'])} failed sanity checks")
