"""Run records: ``results/runs/<study>/<run-id>/`` with params.json, metrics.json, path.csv, env.json.

A record is assembled in a hidden temporary folder and renamed into place when complete, so a
reader (or the report) never sees a half-written record, and two runs never share a folder.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write_text

RESULTS_ENV = "SPPBENCH_RESULTS"


def repo_root(start: Path | None = None) -> Path | None:
    """The sppbench checkout containing ``start`` (default: the working directory), if any."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "noxfile.py").is_file() and (d / "sppbench").is_dir():
            return d
    return None


def results_root() -> Path:
    """Where run records go: $SPPBENCH_RESULTS, else <checkout>/results/runs, else ./results/runs."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    root = repo_root()
    return (root / "results" / "runs") if root else Path("results") / "runs"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if torch.is_tensor(obj):
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(_jsonable(obj), indent=1, sort_keys=False)


def git_commit() -> str | None:
    root = repo_root()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    """Versions and hardware a number was measured on."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "torchvision", "timm", "open_clip_torch", "transformers", "numpy", "sppbench"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions, "git_commit": git_commit(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


class RunRecord:
    """A record being written; ``finish()`` moves it into ``results/runs/<study>/<run_id>/``."""

    def __init__(self, study: str, root: Path | None = None):
        if not study or "/" in study or study.startswith("."):
            raise ValueError(f"bad study name {study!r}")
        self.study = study
        self.root = Path(root) if root is not None else results_root()
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.run_id = f"{stamp}-{uuid.uuid4().hex[:8]}"
        self.final = self.root / study / self.run_id
        self.tmp = self.root / study / f".tmp-{self.run_id}"
        self.tmp.mkdir(parents=True, exist_ok=False)
        self.write_json("env.json", environment())

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_text(self.tmp / name, dumps(obj))

    def file(self, name: str) -> Path:
        """A path inside the record for writers that need one (e.g. a CSV)."""
        return self.tmp / name

    def finish(self) -> Path:
        os.replace(self.tmp, self.final)
        return self.final

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def load_record(folder: str | os.PathLike) -> dict:
    """params, metrics and env of one record as dicts."""
    folder = Path(folder)
    out = {"run_id": folder.name, "study": folder.parent.name, "dir": str(folder)}
    for name in ("params", "metrics", "env"):
        f = folder / f"{name}.json"
        out[name] = json.loads(f.read_text()) if f.is_file() else None
    return out


def list_records(study: str, root: Path | None = None) -> list[Path]:
    """Finished records of a study, oldest first (temporary folders are skipped)."""
    base = (Path(root) if root else results_root()) / study
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
