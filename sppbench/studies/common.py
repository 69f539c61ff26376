"""Helpers every study shares: typed-config checks, search defaults, path-health diagnostics, one-call record writing,
and the small measures the studies compare paths with (Jaccard, Kendall tau, path length).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Callable

import torch

from ..configs import load_config
from ..core import auto as A
from ..core.batches import to_device
from ..core.path import KeepSet, SolutionPath
from ..core.search import measure_dense
from .records import RunRecord


def search_defaults(profile: str = "embedded") -> dict:
    """The search constants of a profile, with where they came from (``sppbench/configs``)."""
    return load_config(f"search_{profile}")


def check_types(cfg: Any) -> None:
    """Reject parameters of the wrong type (e.g. a notebook parameter given as a string)."""
    for f in dataclasses.fields(cfg):
        val = getattr(cfg, f.name)
        want = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        ok = True
        if want in ("int",):
            ok = isinstance(val, int) and not isinstance(val, bool)
        elif want in ("float",):
            ok = isinstance(val, (int, float)) and not isinstance(val, bool)
        elif want in ("str",):
            ok = isinstance(val, str)
        elif want.startswith("tuple[float") or want.startswith("Sequence[float"):
            ok = isinstance(val, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        for v in val)
        if not ok:
            raise TypeError(f"parameter {f.name} must be {want}, got {val!r} ({type(val).__name__})")


def path_health(path: SolutionPath, keepsets=None, name: str = "search") -> dict:
    """``path.diagnostics`` for a record, warning (RuntimeWarning) when the path is degenerate: a result
    read off such a path is reported as such, never silently used (docs/path_health.md)."""
    import warnings

    d = path.diagnostics(keepsets)
    if d.get("applicable") and path.config.get("method") == "spp":  # which SLBI form made an SPP path: the report
        d["variant"] = path.config.get("variant", "paper")              # labels every non-paper form a variant
    if d.get("applicable") and not d["healthy"]:
        warnings.warn(f"{name}: the solution path is degenerate ({'; '.join(d['problems'])}); budgets read off it "
                      "are decided by tie-breaks or on a collapsed model. See docs/path_health.md",
                      RuntimeWarning, stacklevel=2)
    return d


# A dress rehearsal of the paper profile (tests/test_rehearsal.py) sets this: its records say so in info.rehearsal,
# and the report never reads such a record as a result.
REHEARSAL_ENV = "SPPBENCH_REHEARSAL"
REHEARSAL_NOTE = ("DRESS REHEARSAL: generated data and random-init weights run through the paper profile's entry "
                  "points; the figures mean nothing and are never a result")


def write_record(study: str, cfg, path: SolutionPath | None, table, info: dict,
                 paths: "dict[str, SolutionPath] | None" = None, health: "dict[str, dict] | None" = None,
                 files: "dict[str, Any] | None" = None, arrays: "dict[str, dict] | None" = None,
                 blobs: "dict[str, bytes] | None" = None) -> "Any":
    """One run record: params.json, metrics.json (rows, info, the search config and the path health of
    every solution path), and per path its entries (``path.csv`` / ``paths/<name>.csv``) and per-step
    history with the loss (``history.json`` / ``paths/<name>.history.json``).

    ``health``: diagnostics already computed (e.g. with the budgets' own keep-sets); the rest are computed
    here with the default budgets. ``files``: further JSON files of the record (name -> object), e.g.
    per-example results; ``arrays``: compressed numpy files (name.npz -> {key: array}), e.g. per-image
    correctness (docs/records.md); ``blobs``: files written as given bytes (e.g. a gzip-compressed log)."""
    if os.environ.get(REHEARSAL_ENV):
        info = {**info, "rehearsal": f"{REHEARSAL_NOTE} ({os.environ[REHEARSAL_ENV]})"}
    rec = RunRecord(study)
    try:
        health = dict(health or {})
        if path is not None and "search" not in health:
            health["search"] = path_health(path, name=study)
        for n, p in (paths or {}).items():
            if n not in health:
                health[n] = path_health(p, name=f"{study} {n}")
        rec.write_json("params.json", dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg)
        rec.write_json("metrics.json", {"rows": table.to_dict(orient="records"), "info": info,
                                        "search": path.config if path is not None else None,
                                        **({"path_health": health} if health else {})})
        if path is not None:
            path.write_csv(rec.file("path.csv"))
            rec.write_json("history.json", path.history)
        for name, obj in (files or {}).items():
            rec.write_json(name, obj)
        for name, arrs in (arrays or {}).items():
            import numpy as np

            with open(rec.file(name), "wb") as fh:
                np.savez_compressed(fh, **arrs)
        for name, data in (blobs or {}).items():
            with open(rec.file(name), "wb") as fh:
                fh.write(data)
        for n, p in (paths or {}).items():
            safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in n)
            p.write_csv(rec.file(f"paths/{safe}.csv"))
            rec.write_json(f"paths/{safe}.history.json", p.history)
        return rec.finish()
    except BaseException:
        rec.abandon()
        raise


# ---------------------------------------------------------------------------------------------
# Agreement measures
# ---------------------------------------------------------------------------------------------
def jaccard(a: KeepSet, b: KeepSet) -> float:
    """|A & B| / |A | B| over every (group, entry) pair; 1.0 for two empty sets."""
    x, y = flat_keep(a), flat_keep(b)
    union = int((x | y).sum())
    return 1.0 if union == 0 else int((x & y).sum()) / union


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's tau between two rankings of the same items without ties (tau-a = tau-b then), in O(n log n):
    1 - 2 * discordant pairs / all pairs, discordant pairs counted as inversions by a Fenwick tree."""
    a, b = torch.as_tensor(a).flatten(), torch.as_tensor(b).flatten()
    n = a.numel()
    if n != b.numel():
        raise ValueError(f"rankings of different lengths: {n} vs {b.numel()}")
    if n < 2:
        return 1.0
    if torch.unique(a).numel() != n or torch.unique(b).numel() != n:
        raise ValueError("kendall_tau takes rankings without ties")
    seq = torch.argsort(torch.argsort(b[torch.argsort(a)])).tolist()  # b's ranks in a's order, as 0..n-1
    tree = [0] * (n + 1)
    inversions = 0
    for seen, v in enumerate(seq):
        i, smaller = v + 1, 0  # count earlier values below v
        while i > 0:
            smaller += tree[i]
            i -= i & -i
        inversions += seen - smaller
        i = v + 1
        while i <= n:
            tree[i] += 1
            i += i & -i
    return 1.0 - 4.0 * inversions / (n * (n - 1))


def path_length(path: SolutionPath, macs: int) -> int | None:
    """First recorded step at which the support of Gamma (entered entries) costs at least ``macs`` MACs, i.e. the
    budget can be read off entered entries alone; None if the search ended before."""
    for rec in path.history:
        widths = {g.name: int(rec["support_group"].get(g.name, 0)) for g in path.groups}
        if path.cost_model.cost(widths)[1] >= macs:
            return int(rec["step"])
    return None


def check_model_steps(model_steps) -> None:
    """A per-model steps override must map model names to positive integers."""
    if not isinstance(model_steps, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for k, v in model_steps.items()):
        raise ValueError(f"model_steps maps model names to positive integer step counts, e.g. "
                         f"{{'embedded-swin': 640}}; got {model_steps!r}")


def check_fractions(name: str, fractions) -> None:
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"{name} must be fractions in (0, 1], got {fractions!r}")


def flat_keep(keep) -> torch.Tensor:
    """All groups' keep masks of a ``KeepSet`` as one bool vector (groups in name order)."""
    return torch.cat([keep.masks[n].flatten() for n in sorted(keep.masks)])


def flat_ranking(path, readout: str = "global") -> torch.Tensor:
    """A solution path's rank of every entry (0 = kept first), groups in name order (as ``flat_keep``)."""
    r = path.ranking(readout)
    return torch.cat([r[n].flatten() for n in sorted(r)]).long()


def pairwise(values: dict, fn) -> list[float]:
    return [fn(values[a], values[b]) for a, b in itertools.combinations(sorted(values), 2)]


def derive_constants(m, batches, loss_fn: Callable, steps: int, *, seed: int = 0) -> tuple[dict, dict]:
    """The paper form's automatic constants for a search of ``steps`` (``sppbench.core.auto``, the rule of
    ``search(constants="auto")``), measured at the dense model on the first batches of ``batches``; returns
    (kappa / alpha / nu / lam, {"measured", "implied", "rule"}). A table derives them once per model, on its first
    seed's batches (the same batches ``search(constants="auto")`` of that seed measures on), and every seed and every
    baseline whose step follows SPP's uses them."""
    device = next(iter(m.mask_parameters().values())).device
    it = iter(batches)
    head = []
    for _ in range(A.MEASURE_BATCHES):
        try:
            head.append(to_device(next(it), device))
        except StopIteration:
            break
    meas = measure_dense(m, head, loss_fn, seed=seed)
    consts, implied = A.derive(meas, steps)
    return consts, {"measured": meas, "implied": implied, "rule": A.RULE, "batches": len(head)}
