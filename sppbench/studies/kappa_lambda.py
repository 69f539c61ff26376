"""Study 60 (notebook 60): kappa x lambda (x nu), one axis at a time or the full grid."""
from __future__ import annotations

import itertools
import statistics
import time
import warnings
from dataclasses import dataclass

import torch.nn.functional as F

from .. import methods
from ..core import auto as A
from ..core.batches import to_device
from ..core.compress import compress
from ..core.search import measure_dense
from .common import check_fractions, check_types, jaccard, pairwise, path_length, write_record
from .vision_table import evaluate, spp_for, study_task


# ---------------------------------------------------------------------------------------------
# 60: kappa x lambda (x nu)
# ---------------------------------------------------------------------------------------------
@dataclass
class KappaLambdaConfig:
    """A grid of SPP searches; per cell: top-1 at one budget, path length, stability over two seeds.

    span="auto" (default): every cell's alpha and nu follow the automatic rule (docs/auto_constants.md)
    for that cell's kappa and theta = kappa*lam, from one measurement of the dense model, so every cell's
    path is scaled to span the search and the grid stays inside the region where entries can enter
    (a cell with kappa*lam >= 1, where an entry the loss does not hold can never enter, is marked and not
    searched). span="profile": the profile's alpha and nu (or ``alpha`` / ``nus``) in every cell, as the
    first build did; most of that grid had (almost) no entries."""

    model: str = "embedded-vit"
    kappas: tuple[float, ...] = (5.0, 10.0, 20.0)
    lams: tuple[float, ...] = (0.01, 0.03, 0.045)  # kappa*lam from 0.05 to 0.9
    nus: tuple[float, ...] = (0.0,)  # span="profile" only: 0 = the profile's nu
    alpha: float = 0.0               # span="profile" only: 0 = the profile's alpha
    span: str = "auto"
    budget_macs_fraction: float = 0.5
    steps: int = 40
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1)  # stability: Jaccard of the budget's keep-sets across these seeds
    n_val: int = 500
    n_test: int = 200
    n_refit: int = 1000
    # "grid": every kappa x lam; "cross": each kappa at the middle lam and each lam at the middle kappa (one
    # axis at a time through the centre: len(kappas) + len(lams) - 1 cells instead of their product)
    design: str = "grid"
    study: str = "kappa_lambda"

    def cells(self) -> list[tuple[float, float]]:
        """The (kappa, lam) cells searched, in order."""
        if self.design == "grid":
            return list(itertools.product(self.kappas, self.lams))
        kc, lc = self.kappas[len(self.kappas) // 2], self.lams[len(self.lams) // 2]
        return [(k, lc) for k in self.kappas] + [(kc, lam) for lam in self.lams if lam != lc]

    def resolved(self) -> "KappaLambdaConfig":
        check_types(self)
        check_fractions("budget_macs_fraction", (self.budget_macs_fraction,))
        if not self.kappas or not self.lams or not self.nus:
            raise ValueError("kappas, lams and nus must each hold at least one value")
        if any(v <= 0 for v in (*self.kappas, *self.lams)) or any(v < 0 for v in self.nus):
            raise ValueError("kappas and lams must be > 0 and nus >= 0 (0 = the profile's nu)")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        if self.span not in ("auto", "profile"):
            raise ValueError(f"span must be 'auto' or 'profile', got {self.span!r}")
        if self.design not in ("grid", "cross"):
            raise ValueError(f"design must be 'grid' (every kappa x lam) or 'cross' (one axis at a time through the "
                             f"middle values), got {self.design!r}")
        if self.span == "auto" and (tuple(self.nus) != (0.0,) or self.alpha):
            raise ValueError("span='auto' derives alpha and nu per cell from the model; drop nus= / alpha= or "
                             "pass span='profile' to hold them fixed")
        return self


def run_kappa_lambda(cfg: KappaLambdaConfig | None = None, *, record: bool = True, progress: bool = True,
                     task=None) -> dict:
    """Returns {"table": one row per (kappa, lam) cell (``cfg.cells()``) x nu, "record", "info"}. Top-1 is measured on the VALIDATION split
    (this grid chooses constants; the test split is not used), with the first seed's search."""
    import pandas as pd

    cfg = cfg or KappaLambdaConfig()
    cfg.resolved()
    t0 = time.perf_counter()
    task = task or study_task(cfg.model, cfg.n_val, cfg.n_test, cfg.n_refit)
    base = spp_for(cfg.model)
    m = task.attach()
    dense = m.dense_cost()[1]
    budget = int(cfg.budget_macs_fraction * dense)
    rows = []
    health: dict[str, dict] = {}
    meas = None
    if cfg.span == "auto":  # one measurement of the dense model, on the first seed's first batches

        it = iter(task.train_batches(cfg.batch_size, A.MEASURE_BATCHES, cfg.seeds[0]))
        dev = next(iter(m.mask_parameters().values())).device
        meas = measure_dense(m, [to_device(next(it), dev) for _ in range(A.MEASURE_BATCHES)], F.cross_entropy,
                             seed=cfg.seeds[0])
    try:
        for nu, (kappa, lam) in itertools.product(cfg.nus, cfg.cells()):
            implied = None
            if meas is not None:
                if kappa * lam >= 1:
                    rows.append({"kappa": kappa, "lam": lam, "nu": None, "alpha": None, "theta": kappa * lam,
                                 "budget_macs_fraction": cfg.budget_macs_fraction, "top1_head_refit": None,
                                 "top1_no_retrain": None, "path_length": None, "entered_fraction": 0.0,
                                 "stability_jaccard": None, "path_healthy": False, "max_step_share": None,
                                 "tie_share": None, "degenerate_because": "kappa*lam >= 1: an entry the loss does "
                                 "not hold never enters (not searched)"})
                    continue
                consts, implied = A.derive(meas, cfg.steps, kappa=kappa, theta=kappa * lam)
            else:
                consts = {"kappa": kappa, "alpha": cfg.alpha or base["alpha"], "nu": nu or base["nu"], "lam": lam}
            keeps, first = {}, None
            for seed in cfg.seeds:
                path = methods.ranking("spp", m, task.train_batches(cfg.batch_size, cfg.steps, seed), F.cross_entropy,
                                       steps=cfg.steps, seed=seed, spp=consts)
                keeps[seed] = path.keep(macs=budget)
                if first is None:
                    first = path
            ev = evaluate(compress(m, keeps[cfg.seeds[0]]), task, ("val",))
            pl = path_length(first, budget)
            entered = sum(int((e >= 0).sum()) for e in first.entry_step.values()) / sum(g.size for g in first.groups)
            stab = statistics.fmean(pairwise(keeps, jaccard)) if len(keeps) > 1 else None
            with warnings.catch_warnings():  # a degenerate cell is marked in its row, not warned about 9 times
                warnings.simplefilter("ignore", RuntimeWarning)
                h = first.diagnostics([keeps[cfg.seeds[0]]])
            health[f"kappa={kappa} lam={lam} nu={consts['nu']}"] = h
            rows.append({"kappa": kappa, "lam": lam, "nu": consts["nu"], "alpha": consts["alpha"],
                         "theta": kappa * lam, "budget_macs_fraction": cfg.budget_macs_fraction, "top1_head_refit": ev["val_head_refit"],
                         "top1_no_retrain": ev["val_no_retrain"], "path_length": pl, "entered_fraction": entered,
                         "stability_jaccard": stab, "loss_last": first.history[-1]["loss"] if first.history else None,
                         "search_s": first.config.get("seconds"),
                         "path_healthy": h["healthy"], "max_step_share": h["max_step_share"],
                         "loss_ratio_half": h["loss_ratio_half"], "budget_by_order": h["budgets"][0]["by_order"],
                         "tie_share": h["budgets"][0]["by_tie_break"],
                         **({} if implied is None else {"decay_rate": implied["decay_rate"],
                                                        "predicted_uniform_shrink": implied["predicted_uniform_shrink"]}),
                         "degenerate_because": "; ".join(h["problems"]) or None})
            if progress:
                print(f"[kappa-lambda {time.perf_counter() - t0:6.1f}s] kappa {kappa} lam {lam} nu {consts['nu']}: val "
                      f"top-1 {ev['val_head_refit']:.3f}, path length {pl}, stability {stab}", flush=True)
    finally:
        m.detach_masks()
    table = pd.DataFrame(rows)
    info = {"label": task.label, "task": task.info, "budget_macs_fraction": cfg.budget_macs_fraction,
            "dense_macs": dense, "profile_constants": base, "span": cfg.span, "design": cfg.design,
            "cells": [list(c) for c in cfg.cells()],
            **({"auto": {"measured": meas, "rule": A.RULE + " (kappa and theta = kappa*lam from each cell)"}}
               if meas is not None else {}),
            "tie_share": "share of the budget's keep-set decided by the |V| / |M| tie-break, not by entry order",
            "path_length": f"first step whose entered entries alone cost >= the budget's MACs (None: not within "
                           f"{cfg.steps} steps)",
            "stability": "mean Jaccard of the budget's keep-sets over pairs of data-order seeds",
            "top1": "validation split (the grid chooses constants; the test split is not touched), head re-fit",
            "path_health": "per cell, the first seed's path diagnostics (docs/path_health.md); a cell with "
                           "path_healthy False has a degenerate path: its top-1 is not a result of the order",
            "seconds": round(time.perf_counter() - t0, 1)}
    folder = write_record(cfg.study, cfg, None, table, info, health=health) if record else None
    return {"table": table, "record": folder, "info": info}
