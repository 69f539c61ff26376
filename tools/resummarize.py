"""Recompute a vision-, CLIP- or LLM-table record's summary and sanity checks from its own rows and per-example
results.

    python tools/resummarize.py results/runs/vision_table/<run-id> results/runs/clip_table/<run-id> [...]

LLM records (``zero_shot.npz``): the zero-shot part only (its answer diagnostics from the harness's own per-sample
log ``zero_shot_samples.jsonl.gz``, then ``zero_shot_summary`` and ``zero_shot_sanity``).

Reads ``metrics.json`` (rows) and ``correct.npz`` (vision) or ``ranks.npz`` (CLIP), recomputes ``info.summary``
and ``info.sanity`` with the current ``sppbench.studies.vision_table.summarize`` / ``sanity_checks`` (CLIP:
``sppbench.studies.clip_table.summarize_clip`` / ``sanity_checks_clip``; same resamples as the run), and rewrites
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
from sppbench.studies.records import dumps, git_commit
from sppbench.studies.vision_table import sanity_checks, summarize


def resummarize(folder: Path) -> dict:
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    info = metrics["info"]
    if (folder / "ranks.npz").is_file():
        return _resummarize_clip(folder, metrics)
    if (folder / "zero_shot.npz").is_file():
        return _resummarize_llm_zero_shot(folder, metrics)
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
        "by": "tools/resummarize.py (sppbench.studies.vision_table.summarize / sanity_checks on this record's rows and correct.npz)",
        "commit": git_commit(), "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(metrics_file, dumps(metrics))
    return info


def _resummarize_clip(folder: Path, metrics: dict) -> dict:
    from sppbench.studies.clip_table import sanity_checks_clip, summarize_clip

    info = metrics["info"]
    ranks = dict(np.load(folder / "ranks.npz"))
    table = pd.DataFrame(metrics["rows"])
    resamples = info["statistics"]["resamples"]
    info["summary"] = summarize_clip(table, ranks, resamples=resamples).to_dict(orient="records")
    info["sanity"] = sanity_checks_clip(table, ranks, resamples=resamples)
    info["statistics"]["recomputed"] = {
        "by": "tools/resummarize.py (sppbench.studies.clip_table.summarize_clip / sanity_checks_clip on this record's rows and "
              "ranks.npz)",
        "commit": git_commit(), "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(folder / "metrics.json", dumps(metrics))
    return info


def _resummarize_llm_zero_shot(folder: Path, metrics: dict) -> dict:
    import gzip

    from sppbench.studies.llm_table import zero_shot_sanity, zero_shot_summary
    from sppbench.tasks.zeroshot import choice_stats, correct_key

    info = metrics["info"]
    zs = info["zero_shot"]
    correct = dict(np.load(folder / "zero_shot.npz"))
    samples: dict[tuple[str, str], list] = {}
    with gzip.open(folder / "zero_shot_samples.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            s = json.loads(line)
            samples.setdefault((s["row"], s["task"]), []).append(s)
    for row in zs["rows"]:
        if "error" in row:
            continue
        key = f"{row['model']}|{row['method']}|{row['pattern']}|{int(row['seed'])}"
        mine = sorted(samples[(key, row["task"])], key=lambda s: int(s["doc_id"]))
        acc = correct[correct_key(row["model"], row["method"], row["pattern"], row["seed"], row["task"], "acc")]
        st = choice_stats(mine, acc)
        if st:
            pred = st.pop("pred")
            stored = correct.get(correct_key(row["model"], row["method"], row["pattern"], row["seed"], row["task"],
                                             "pred"))
            if stored is not None and stored.tolist() != pred.tolist():
                raise SystemExit(f"{folder}: the per-sample log's answers differ from zero_shot.npz for {key} "
                                 f"{row['task']}")
            row.update(st)
    resamples = info["statistics"]["resamples"]
    summary, paired = zero_shot_summary(zs["rows"], correct, model=zs["rows"][0]["model"], resamples=resamples)
    zs["summary"], zs["comparisons"] = summary, paired
    zs["sanity"] = zero_shot_sanity(zs["rows"], summary, paired)
    zs["recomputed"] = {
        "by": "tools/resummarize.py (sppbench.tasks.zeroshot.choice_stats on this record's zero_shot_samples.jsonl.gz, "
              "sppbench.studies.llm_table.zero_shot_summary / zero_shot_sanity on its rows and zero_shot.npz)",
        "commit": git_commit(), "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(folder / "metrics.json", dumps(metrics))
    return {"summary": summary, "sanity": zs["sanity"]}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for arg in sys.argv[1:]:
        info = resummarize(Path(arg))
        print(f"{arg}: {len(info['summary'])} summary rows, {len(info['sanity'])} failed sanity checks")
