"""The solution path: entry steps -> one total ranking -> a keep-set for any budget.

A ``SolutionPath`` holds, for every mask entry, the step at which it entered supp(Gamma) and the
final V and M of the search, plus the cost model of the searched architecture, so keep-sets for
any budget (fraction per pool, parameters, MACs) are read off it with no model and no new search.
Every keep-set is a prefix of one fixed order, hence supports are nested across budgets.
"""
from __future__ import annotations

import csv
import io
import json
import math
import warnings
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ..errors import BudgetError, SpecError
from ..fileio import atomic_write_text
from .costs import CostModel
from .masks import POOLS, MaskGroup

PATH_FORMAT = "sppbench.core.path/1"
READOUTS = ("global", "per-layer")
# A path is "healthy" (docs/path_health.md) when no integer step holds more than 5% of the entries
# that entered, at least 90% of entries enter within the search, and the search loss where half of the
# entries have entered is at most 3x the dense model's.
HEALTH_LIMITS = {"max_step_share": 0.05, "min_entered": 0.90, "max_loss_ratio_half": 3.0}


@dataclass
class KeepSet:
    """Which entries of every mask group are kept, and what that costs.

    ``masks[name]`` is a bool tensor per group. ``fraction`` is kept entries / all entries,
    ``fractions`` the same per pool; ``params`` and ``macs`` (multiply-adds per sample) are those
    of the compressed model; ``request`` is the budget asked for; ``readout`` 'global' or 'per-layer'.
    ``towers``: for a multi-tower model (CLIP), params, MACs (per image / per caption) and the kept
    fraction of each tower.
    """

    masks: dict[str, torch.Tensor]
    fraction: float
    fractions: dict[str, float]
    params: int
    macs: int
    request: dict = field(default_factory=dict)
    readout: str = "global"
    towers: dict = field(default_factory=dict)

    def indices(self, group: str) -> torch.Tensor:
        """Sorted indices of the kept entries of one group."""
        return torch.nonzero(self.masks[group], as_tuple=False).flatten()

    def widths(self) -> dict[str, int]:
        return {n: int(m.sum()) for n, m in self.masks.items()}

    def issubset(self, other: "KeepSet") -> bool:
        return all(bool((m & ~other.masks[n]).sum() == 0) for n, m in self.masks.items())

    def summary(self) -> dict:
        out = {"request": self.request, "readout": self.readout, "fraction": self.fraction,
               "fractions": self.fractions, "params": self.params, "macs": self.macs}
        return {**out, "towers": self.towers} if self.towers else out

    def to_dict(self) -> dict:
        return {**self.summary(), "kept": {n: self.indices(n).tolist() for n in self.masks},
                "sizes": {n: int(m.numel()) for n, m in self.masks.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "KeepSet":
        masks = {}
        for n, size in d["sizes"].items():
            m = torch.zeros(int(size), dtype=torch.bool)
            m[torch.as_tensor(d["kept"][n], dtype=torch.long)] = True
            masks[n] = m
        return cls(masks, float(d["fraction"]), dict(d["fractions"]), int(d["params"]), int(d["macs"]),
                   dict(d.get("request", {})), d.get("readout", "global"), dict(d.get("towers", {})))


def loss_near(history: Sequence[Mapping], step: float, half_width: int = 2) -> float | None:
    """The search loss averaged over the history records within ``half_width`` steps of ``step`` (None if
    the history has no loss there)."""
    near = [h["loss"] for h in history if abs(h["step"] - step) <= half_width and "loss" in h]
    if not near:
        near = [h["loss"] for h in history if h["step"] >= step and "loss" in h][:1]
    return float(sum(near) / len(near)) if near else None


class HealthWatch:
    """The path-health limits (``HEALTH_LIMITS``) watched while a search runs: the first step at which more than
    ``max_step_share`` of ALL entries enter at once (the end-of-search check counts the share of the entered ones,
    so this fires no later), and the first step at which the loss passes ``max_loss_ratio_half`` x the dense loss
    (the first step's, every mask at 1; the end-of-search check applies that limit where half the entries have
    entered, so an early spike the search recovers from is an event, not a failure). Each is warned once, at its
    step (RuntimeWarning). ``state`` ({"dense_loss", "events"}) is updated in place: the search keeps it as
    ``path.config["health_watch"]`` (and a resumed search continues its own)."""

    def __init__(self, total: int, state: dict | None = None, limits: Mapping[str, float] | None = None):
        self.total, self.lim = int(total), {**HEALTH_LIMITS, **(limits or {})}
        self.state = state if state is not None else {}
        self.state.setdefault("dense_loss", None)
        self.state.setdefault("events", [])

    @property
    def events(self) -> list[dict]:
        return self.state["events"]

    def check(self, step: int, loss: float, entered_now: int) -> None:
        """One search step: its loss and how many entries entered at it."""
        if self.state["dense_loss"] is None:
            self.state["dense_loss"] = loss
        dense = self.state["dense_loss"]
        seen = {e["kind"] for e in self.events}
        share = entered_now / self.total if self.total else 0.0
        if "entered_at_once" not in seen and share > self.lim["max_step_share"]:
            self._event("entered_at_once", step, share,
                        f"{share:.1%} of all entries entered at step {step} (limit {self.lim['max_step_share']:.0%}): "
                        "their order among themselves is a tie-break")
        ratio = loss / dense if dense > 0 else math.inf
        if "loss_above_limit" not in seen and ratio > self.lim["max_loss_ratio_half"]:
            self._event("loss_above_limit", step, ratio,
                        f"the search loss {loss:.3g} at step {step} is {ratio:.1f}x the dense {dense:.3g} "
                        f"(limit {self.lim['max_loss_ratio_half']:g}x where half the entries have entered; "
                        "path.diagnostics() decides at the end)")

    def _event(self, kind: str, step: int, value: float, message: str) -> None:
        self.events.append({"kind": kind, "step": int(step), "value": round(float(value), 6), "message": message})
        warnings.warn(f"search health: {message}", RuntimeWarning, stacklevel=3)


def entry_health(entry_time: torch.Tensor, entry_step: torch.Tensor, history: Sequence[Mapping],
                 limits: Mapping[str, float] | None = None) -> dict:
    """The entry-order part of ``SolutionPath.diagnostics`` from flat per-entry entry times (float, -1 =
    never entered), integer entry steps and the per-step history with the loss; also used by the report
    for records written before diagnostics existed (their ``path.csv`` / ``history.json``)."""
    lim = {**HEALTH_LIMITS, **(limits or {})}
    t = entry_time.double().reshape(-1)
    steps_int = entry_step.reshape(-1)
    total = int(t.numel())
    ent = t[t >= 0]
    n_ent = int(ent.numel())
    out: dict = {"entered": n_ent / total if total else 0.0, "entered_count": n_ent, "limits": lim}
    if n_ent:
        vals, counts = torch.unique(steps_int[steps_int >= 0], return_counts=True)
        k = int(counts.argmax())
        s = ent.sort().values
        q = lambda f: float(s[min(n_ent - 1, max(0, int(math.ceil(f * n_ent)) - 1))])  # noqa: E731
        out.update(max_step_share=float(counts[k]) / n_ent, max_step=int(vals[k]), first=float(s[0]),
                   t10=q(0.1), t50=q(0.5), t90=q(0.9), last=float(s[-1]))
        out["spread_steps"] = out["t90"] - out["t10"]
    else:
        out.update(max_step_share=None, max_step=None, t10=None, t50=None, t90=None, spread_steps=None)
    out["loss_start"] = history[0]["loss"] if history and "loss" in history[0] else None
    losses = [h["loss"] for h in history if "loss" in h]
    out["loss_max"] = max(losses) if losses else None
    out["loss_at_half"] = out["loss_ratio_half"] = None
    if total and n_ent >= (total + 1) // 2:
        half = float(ent.sort().values[(total + 1) // 2 - 1])
        out["t_half_all"] = half
        out["loss_at_half"] = loss_near(history, half)
        if out["loss_at_half"] is not None and out["loss_start"]:
            out["loss_ratio_half"] = out["loss_at_half"] / out["loss_start"]
    problems = []
    if out["entered"] < lim["min_entered"]:
        problems.append(f"only {out['entered']:.1%} of entries entered (need >= {lim['min_entered']:.0%}): "
                        "the rest are ordered by the |V| tie-break")
    if out["max_step_share"] is not None and out["max_step_share"] > lim["max_step_share"]:
        problems.append(f"{out['max_step_share']:.1%} of the entered entries entered at step {out['max_step']} "
                        f"(limit {lim['max_step_share']:.0%})")
    if out["loss_ratio_half"] is not None and out["loss_ratio_half"] > lim["max_loss_ratio_half"]:
        problems.append(f"the search loss where half the entries had entered is {out['loss_at_half']:.3g}, "
                        f"{out['loss_ratio_half']:.1f}x the dense {out['loss_start']:.3g} "
                        f"(limit {lim['max_loss_ratio_half']:g}x): the order was decided on a collapsed model")
    out["problems"] = problems
    out["healthy"] = not problems
    return out


class SolutionPath:
    """Entry statistics of one search, with the ranking and budget read-outs built on them.

    Attributes: ``groups`` (MaskGroup list), per-group tensors ``entry_step`` (long, -1 = never
    entered), ``entry_time`` (float64: the fractional instant the entry crossed the threshold, between
    step ``entry_step - 1`` and ``entry_step``; paths written before it existed fall back to
    ``entry_step``), ``support_steps`` (steps spent in the support), ``V``, ``M`` (final values);
    ``cost_model``; ``config`` (search settings); ``history`` (list of per-record dicts: step,
    loss, support size per pool and per group).
    """

    def __init__(self, groups: Sequence[MaskGroup], entry_step: Mapping[str, torch.Tensor],
                 V: Mapping[str, torch.Tensor], M: Mapping[str, torch.Tensor], cost_model: CostModel,
                 config: dict | None = None, history: list[dict] | None = None,
                 support_steps: Mapping[str, torch.Tensor] | None = None, info: dict | None = None,
                 score: Mapping[str, torch.Tensor] | None = None,
                 entry_time: Mapping[str, torch.Tensor] | None = None):
        self.groups = list(groups)
        names = [g.name for g in self.groups]
        self.entry_step = {n: torch.as_tensor(entry_step[n], dtype=torch.long).clone() for n in names}
        self.V = {n: torch.as_tensor(V[n], dtype=torch.float32).clone() for n in names}
        self.M = {n: torch.as_tensor(M[n], dtype=torch.float32).clone() for n in names}
        self.support_steps = {n: (torch.as_tensor(support_steps[n], dtype=torch.long).clone() if support_steps
                                  else torch.zeros(g.size, dtype=torch.long)) for n, g in zip(names, self.groups)}
        self.score = ({n: torch.as_tensor(score[n], dtype=torch.float64).clone() for n in names}
                      if score is not None else None)
        self._entry_time = ({n: torch.as_tensor(entry_time[n], dtype=torch.float64).clone() for n in names}
                            if entry_time is not None else None)
        for g in self.groups:
            if self._entry_time is not None:
                et, es = self._entry_time[g.name], self.entry_step[g.name]
                if et.shape != es.shape or bool(((et >= 0) != (es >= 0)).any()):
                    raise SpecError(f"path group {g.name}: entry_time and entry_step disagree on which entries entered")
            for what in (self.entry_step, self.V, self.M, self.support_steps, self.score or {g.name: torch.zeros(g.size)}):
                if what[g.name].shape != (g.size,):
                    raise SpecError(f"path group {g.name}: expected {g.size} entries, got {tuple(what[g.name].shape)}")
        self.cost_model = cost_model
        self.config = dict(config or {})
        self.history = list(history or [])
        self.info = dict(info or {})
        self._orders: dict[str, list[tuple[int, int]]] = {}

    @property
    def entry_time(self) -> dict[str, torch.Tensor]:
        """Fractional entry instant per entry (-1 = never entered); ``entry_step`` as float when the
        search did not record one."""
        if self._entry_time is not None:
            return self._entry_time
        return {n: t.double() for n, t in self.entry_step.items()}

    @property
    def has_entry_time(self) -> bool:
        return self._entry_time is not None

    # -- ranking -----------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        return self.config.get("variant", "paper")

    @property
    def rank_by(self) -> str:
        """'entry' (SPP paper form), 'support' (official form) or 'score' (a baseline's importance score)."""
        if self.score is not None:
            return "score"
        return "support" if self.variant == "official" else "entry"

    def _sort_keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(group index, entry index, rank position) over all entries, in the path's total order.

        paper: entry time ascending (the fractional crossing instant, or the entry step for paths
        without one; never entered last), ties by |V| then |M| descending.
        official: the support count descending (Gamma != 0 counted every 10th step, as the released code counts its
        step_record), ties the same way.
        score (baselines: Lasso's |M|, magnitude, random): score descending, ties the same way.
        Remaining ties (exactly equal statistics) go by group then entry index: deterministic.
        """
        gi = torch.cat([torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(self.groups)])
        ei = torch.cat([torch.arange(g.size) for g in self.groups])
        t = torch.cat([self.entry_time[g.name] for g in self.groups]).double()
        if self.rank_by == "score":
            primary = -torch.cat([self.score[g.name] for g in self.groups]).double()
        elif self.rank_by == "support":
            primary = -torch.cat([self.support_steps[g.name] for g in self.groups]).double()
        else:
            primary = torch.where(t < 0, torch.full_like(t, math.inf), t)
        v = torch.cat([self.V[g.name].abs() for g in self.groups]).double()
        m = torch.cat([self.M[g.name].abs() for g in self.groups]).double()
        cols = list(zip(primary.tolist(), (-v).tolist(), (-m).tolist(), gi.tolist(), ei.tolist()))
        keys = sorted(range(len(cols)), key=cols.__getitem__)
        order = torch.as_tensor(keys, dtype=torch.long)
        return gi[order], ei[order], order

    def rescored(self, score: Mapping[str, torch.Tensor], **config) -> "SolutionPath":
        """A copy of this search ranked by ``score`` instead (higher first; ties as in ``_sort_keys``), e.g. its
        own final |M|; ``config`` entries are added to the copy's config (what the score is)."""
        return SolutionPath(self.groups, self.entry_step, self.V, self.M, self.cost_model, {**self.config, **config},
                            self.history, self.support_steps, self.info, score=score,
                            entry_time=self._entry_time)

    def order(self, readout: str = "global") -> list[tuple[int, int]]:
        """Every entry as (group index, entry index), most important first.

        'global': the path's total order across layers. 'per-layer': entries interleaved so that
        every prefix keeps about the same fraction of each group, ranked by the path inside it.
        """
        if readout not in READOUTS:
            raise BudgetError(f"unknown readout {readout!r}; use one of {READOUTS}")
        if readout not in self._orders:
            gi, ei, _ = self._sort_keys()
            glob = list(zip(gi.tolist(), ei.tolist()))
            if readout == "global":
                self._orders[readout] = glob
            else:
                seen = [0] * len(self.groups)
                keyed = []
                for pos, (g, e) in enumerate(glob):
                    seen[g] += 1
                    keyed.append(((seen[g] - 0.5) / self.groups[g].size, pos, g, e))
                keyed.sort()
                self._orders[readout] = [(g, e) for _, _, g, e in keyed]
        return self._orders[readout]

    def ranking(self, readout: str = "global") -> dict[str, torch.Tensor]:
        """Rank position (0 = most important) of every entry, per group."""
        ranks = {g.name: torch.empty(g.size, dtype=torch.long) for g in self.groups}
        for pos, (g, e) in enumerate(self.order(readout)):
            ranks[self.groups[g].name][e] = pos
        return ranks

    # -- budgets -----------------------------------------------------------------------------
    def _keepset(self, chosen: Iterable[tuple[int, int]], request: dict, readout: str) -> KeepSet:
        masks = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in self.groups}
        for g, e in chosen:
            masks[self.groups[g].name][e] = True
        widths = {n: int(m.sum()) for n, m in masks.items()}
        params, macs = self.cost_model.cost(widths)
        total = sum(g.size for g in self.groups)
        fractions = {}
        for pool in POOLS:
            size = sum(g.size for g in self.groups if g.pool == pool)
            if size:
                fractions[pool] = sum(widths[g.name] for g in self.groups if g.pool == pool) / size
        towers = {}
        for t in self.towers:
            tp, tm = self.cost_model.cost(widths, part=t)
            members = [g for g in self.groups if g.tower == t]
            towers[t] = {"params": tp, "macs": tm,
                         "fraction": sum(widths[g.name] for g in members) / sum(g.size for g in members)}
        return KeepSet(masks, sum(widths.values()) / total, fractions, params, macs, request, readout, towers)

    @property
    def towers(self) -> list[str]:
        """The towers of a multi-tower model (e.g. ['image', 'text'] for CLIP), else []."""
        return sorted({g.tower for g in self.groups if g.tower})

    def smallest(self, tower: str | None = None) -> tuple[int, int]:
        """(params, MACs) of the model (or of one tower) with every mask entry removed."""
        return self.cost_model.cost({g.name: 0 for g in self.groups}, part=tower)

    def dense(self, tower: str | None = None) -> tuple[int, int]:
        return self.cost_model.cost({g.name: g.size for g in self.groups}, part=tower)

    def _check_tower(self, tower: str) -> None:
        if tower not in self.towers:
            raise BudgetError(f"tower={tower!r}: this path's model has towers {self.towers or 'none (single tower)'}; "
                              + ("use one of them" if self.towers else "leave tower unset"))

    def keep_towers(self, budgets: Mapping[str, Mapping], *, readout: str = "global") -> KeepSet:
        """One budget per tower, e.g. ``{"image": {"macs": 2e9}, "text": {"fraction": 0.5}}``: each tower is read
        off its own part of the ranking and priced alone (MACs per image / per caption). Towers not named
        stay dense. Supports stay nested across budgets of the same tower."""
        if not budgets:
            raise BudgetError("keep_towers() needs at least one tower budget, e.g. {'image': {'fraction': 0.5}}")
        masks = None
        for tower, b in budgets.items():
            ks = self.keep(**dict(b), readout=readout, tower=tower)
            mine = {g.name for g in self.groups if g.tower == tower}
            masks = ({n: m.clone() for n, m in ks.masks.items()} if masks is None
                     else {n: (ks.masks[n] if n in mine else m) for n, m in masks.items()})
        index = {g.name: i for i, g in enumerate(self.groups)}
        chosen = [(index[n], int(e)) for n, m in masks.items() for e in torch.nonzero(m).flatten().tolist()]
        return self._keepset(chosen, {"towers": {t: dict(b) for t, b in budgets.items()}}, readout)

    def keep(self, fraction: float | None = None, *, params: int | None = None, macs: int | None = None,
             readout: str = "global", tower: str | None = None, round_to: int = 1) -> KeepSet:
        """The keep-set for exactly one budget, read off this path.

        fraction: keep this fraction of the entries of each pool (attention, MLP), rounded to the
            nearest entry; params / macs: the longest prefix of the ranking whose compressed model
            fits (MACs = multiply-adds per sample). The result reports what was achieved.
        tower: in a multi-tower model (CLIP), apply the budget to this tower alone (priced alone: MACs
            per image or per caption) and keep the other towers dense; without it the budget is joint
            (one image plus one caption; fractions over both towers' pools).
        round_to: with a params / macs budget, make every group's kept width a multiple of this (or the
            group's full width), which matrix kernels run faster: each group first keeps the largest
            multiple its share of the prefix allows, then whole blocks of ``round_to`` entries are added,
            earliest-ranked block first, while the budget holds. Rounded keep-sets follow the path's order
            inside every group but are not guaranteed nested across budgets.
        """
        given = {k: v for k, v in (("fraction", fraction), ("params", params), ("macs", macs)) if v is not None}
        if len(given) != 1:
            raise BudgetError(
                f"give exactly one budget: fraction=, params= or macs= (got {sorted(given) or 'none'}); "
                "read several budgets with several keep() calls on the same path"
            )
        (kind, value), = given.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BudgetError(f"{kind} must be a finite number, got {value!r}")
        order = self.order(readout)
        request = {kind: value}
        fixed: list[tuple[int, int]] = []  # entries outside the budgeted tower: kept
        if tower is not None:
            self._check_tower(tower)
            request["tower"] = tower
            fixed = [(g, e) for g, e in order if self.groups[g].tower != tower]
            order = [(g, e) for g, e in order if self.groups[g].tower == tower]
        if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
            raise BudgetError(f"round_to must be a positive integer (e.g. 8), got {round_to!r}")
        if round_to > 1:
            request["round_to"] = round_to
            if kind == "fraction":
                raise BudgetError("round_to needs a params= or macs= budget (a fraction is already a width); e.g. "
                                  "keep(macs=..., round_to=8)")
        if kind == "fraction":
            if not 0.0 < value <= 1.0:
                raise BudgetError(f"fraction must be in (0, 1] (the share of entries kept), got {value}; "
                                  "e.g. keep(fraction=0.5) keeps half of each pool")
            chosen = []
            if readout == "global":
                for pool in POOLS:
                    members = [(g, e) for g, e in order if self.groups[g].pool == pool]
                    chosen += members[: int(round(value * len(members)))]
            else:  # the same share of every group, by the path's order inside the group
                per_group: dict[int, list[int]] = {}
                for g, e in order:
                    per_group.setdefault(g, []).append(e)
                for g, es in per_group.items():
                    chosen += [(g, e) for e in es[: int(round(value * len(es)))]]
            return self._keepset(fixed + chosen, request, readout)
        value = int(value)
        idx = 0 if kind == "params" else 1
        low = self.smallest(tower)[idx]
        if value < low:
            raise BudgetError(
                f"{kind}={value:,} is below the smallest model this architecture"
                + (f"'s {tower} tower" if tower else "") + " can be pruned to "
                f"({low:,} {kind}: embeddings, norms, head and constant branches with every mask entry "
                f"removed); ask for at least {low:,}"
            )
        # longest prefix that fits; costs are monotone in the prefix length, so bisect
        names = [g.name for g in self.groups]

        def cost_of(k: int) -> int:
            widths = dict.fromkeys(names, 0)
            for g, _ in order[:k]:
                widths[names[g]] += 1
            return self.cost_model.cost(widths, part=tower)[idx]

        lo, hi = 0, len(order)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost_of(mid) <= value:
                lo = mid
            else:
                hi = mid - 1
        if round_to > 1:
            return self._keepset(fixed + self._rounded(order, lo, round_to, idx, value, tower), request, readout)
        return self._keepset(fixed + order[:lo], request, readout)

    def keep_widths(self, widths: Mapping[str, int], request: dict | None = None) -> KeepSet:
        """The keep-set with exactly ``widths[group]`` entries of every group, each group's best-ranked by this
        path (e.g. a random order at another keep-set's per-layer widths: ``rescored`` random, then the other
        keep-set's ``widths()``). Its cost is the cost of those widths, whatever the order."""
        names = {g.name for g in self.groups}
        if set(widths) != names or any(not 0 <= int(w) <= g.size for g, w in
                                        ((g, widths[g.name]) for g in self.groups)):
            raise BudgetError(f"widths must give every group of this path a width between 0 and its size; got "
                              f"{len(widths)} widths for {len(names)} groups")
        taken = dict.fromkeys(range(len(self.groups)), 0)
        chosen = []
        for g, e in self.order("global"):
            if taken[g] < int(widths[self.groups[g].name]):
                taken[g] += 1
                chosen.append((g, e))
        return self._keepset(chosen, dict(request or {"widths": "given"}), "widths")

    def _rounded(self, order: list, prefix: int, r: int, idx: int, value: int, tower: str | None) -> list:
        """Widths that are multiples of ``r`` (or full), within ``value`` (params or MACs): see keep()."""
        names = [g.name for g in self.groups]
        by_group: dict[int, list[tuple[int, int]]] = {}  # each group's entries in path order, with global position
        for pos, (g, e) in enumerate(order):
            by_group.setdefault(g, []).append((pos, e))
        counts = dict.fromkeys(by_group, 0)
        for g, _ in order[:prefix]:
            counts[g] += 1
        size = {g: len(es) for g, es in by_group.items()}
        width = {g: (c if c == size[g] else (c // r) * r) for g, c in counts.items()}

        def cost(w: dict) -> int:
            widths = dict.fromkeys(names, 0)
            for g, n in w.items():
                widths[names[g]] = n
            return self.cost_model.cost(widths, part=tower)[idx]

        while True:  # add the block whose last entry comes earliest in the path's order, while it fits
            best = None
            for g, n in width.items():
                if n >= size[g]:
                    continue
                step = min(r, size[g] - n)
                key = by_group[g][n + step - 1][0]
                if best is None or key < best[0]:
                    trial = {**width, g: n + step}
                    if cost(trial) <= value:
                        best = (key, g, step)
            if best is None:
                break
            width[best[1]] += best[2]
        return [(g, e) for g, es in by_group.items() for _, e in es[:width[g]]]

    # -- health --------------------------------------------------------------------------------
    def loss_near(self, step: float, half_width: int = 2) -> float | None:
        """The search loss averaged over the records within ``half_width`` steps of ``step`` (None if
        the history has no loss there)."""
        return loss_near(self.history, step, half_width)

    def diagnostics(self, keepsets: Sequence["KeepSet"] | None = None,
                    limits: Mapping[str, float] | None = None) -> dict:
        """How healthy the path is, as plain numbers (see docs/path_health.md).

        entered: share of entries that entered by the end; max_step_share: the largest share of the
        entered entries entering at one integer step (and ``max_step``, which); t10 / t50 / t90: the
        entry times by which 10 / 50 / 90 % of the entered entries had entered, ``spread_steps`` = t90 - t10;
        loss_start (the dense model's search loss, step 1), loss_at_half (the loss, smoothed over +-2
        steps, where half of ALL entries had entered; None if fewer entered) and their ratio; per budget
        (``keepsets``, default: global keep fractions 0.25 / 0.5 / 0.75): ``by_order`` = share of the
        kept entries that entered strictly before every entry left out of the same competition (the
        pool for a fraction budget, the group for per-layer, the budgeted model or tower for params /
        MACs) -- the rest were decided by the |V| / |M| tie-break -- and the loss where the budget's last
        kept entry entered. ``healthy`` applies ``limits`` (default HEALTH_LIMITS); ``problems`` says
        what failed, in words. Paths ranked by a score (baselines) report ``applicable: False``.
        """
        total = sum(g.size for g in self.groups)
        if self.rank_by == "score":
            return {"applicable": False, "rank_by": "score", "entries": total}
        t = torch.cat([self.entry_time[g.name] for g in self.groups]).double()
        steps_int = torch.cat([self.entry_step[g.name] for g in self.groups])
        out: dict = {"applicable": True, "rank_by": self.rank_by, "entries": total,
                     "steps": self.config.get("steps"), "fractional_entry_time": self.has_entry_time}
        out.update(entry_health(t, steps_int, self.history, limits))
        if keepsets is None:
            keepsets = [self.keep(fraction=f) for f in (0.25, 0.5, 0.75)]
        out["budgets"] = [self._budget_health(ks, t) for ks in keepsets]
        # the health verdict is decided by entry_health (the budgets add figures, not limits)
        out["problems"], out["healthy"] = out.pop("problems"), out.pop("healthy")
        return out

    def _budget_health(self, ks: "KeepSet", t_all: torch.Tensor) -> dict:
        inf = math.inf
        req = dict(ks.request)
        if ks.readout == "per-layer":
            comp = {g.name: g.name for g in self.groups}
        elif "towers" in req:  # one budget per tower (keep_towers): each tower is its own competition
            comp = {g.name: f"{g.tower}/{g.pool}" if "fraction" in req["towers"].get(g.tower, {}) else g.tower
                    for g in self.groups}
        elif "fraction" in req:
            comp = {g.name: g.pool for g in self.groups}
        else:
            comp = {g.name: "all" for g in self.groups}
        tower = req.get("tower")
        towers = set(req["towers"]) if "towers" in req else None
        first_out: dict = {}
        kept_times: list[tuple[str, float]] = []
        for g in self.groups:
            if (tower is not None and g.tower != tower) or (towers is not None and g.tower not in towers):
                continue
            tt = self.entry_time[g.name].double()
            tt = torch.where(tt < 0, torch.full_like(tt, inf), tt)
            keep = ks.masks[g.name]
            c = comp[g.name]
            if bool((~keep).any()):
                first_out[c] = min(first_out.get(c, inf), float(tt[~keep].min()))
            kept_times += [(c, v) for v in tt[keep].tolist()]
        by_order = sum(1 for c, v in kept_times if v < first_out.get(c, inf))
        finite = [v for _, v in kept_times if v < inf]
        last = max(finite) if finite else None
        return {"request": req, "readout": ks.readout, "kept": len(kept_times),
                "by_order": by_order / len(kept_times) if kept_times else None,
                "by_tie_break": 1 - by_order / len(kept_times) if kept_times else None,
                "last_kept_entry_time": last,
                "all_kept_entered": len(finite) == len(kept_times),
                "loss_at_last_kept": self.loss_near(last) if last is not None else None}

    # -- support curves ------------------------------------------------------------------------
    def support_curve(self, by: str = "pool"):
        """A pandas DataFrame of support size vs step, per pool ('pool') or per group ('group')."""
        import pandas as pd

        rows = []
        for rec in self.history:
            if "support_pool" not in rec:  # a path whose history holds the loss only (DessiLBI)
                continue
            sizes = rec["support_pool"] if by == "pool" else rec["support_group"]
            for name, size in sizes.items():
                rows.append({"step": rec["step"], by: name, "support": size})
        return pd.DataFrame(rows)

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": PATH_FORMAT,
            "config": self.config,
            "info": self.info,
            "groups": [g.to_dict() for g in self.groups],
            "cost_model": self.cost_model.to_dict(),
            "entry_step": {n: t.tolist() for n, t in self.entry_step.items()},
            "support_steps": {n: t.tolist() for n, t in self.support_steps.items()},
            "V": {n: t.tolist() for n, t in self.V.items()},
            "M": {n: t.tolist() for n, t in self.M.items()},
            **({"score": {n: t.tolist() for n, t in self.score.items()}} if self.score is not None else {}),
            **({"entry_time": {n: t.tolist() for n, t in self._entry_time.items()}}
               if self._entry_time is not None else {}),
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "SolutionPath":
        if d.get("format") != PATH_FORMAT:
            raise SpecError(f"not a sppbench solution path (format {d.get('format')!r}, expected {PATH_FORMAT!r})")
        groups = [MaskGroup.from_dict(g) for g in d["groups"]]
        return cls(groups, d["entry_step"], d["V"], d["M"], CostModel.from_dict(d["cost_model"]),
                   d.get("config"), d.get("history"), d.get("support_steps"), d.get("info"), d.get("score"),
                   d.get("entry_time"))

    def save(self, file: str | os.PathLike) -> Path:
        """Write the path as JSON, atomically (temp file + rename)."""
        file = Path(file)
        atomic_write_text(file, json.dumps(self.to_dict()))
        return file

    @classmethod
    def load(cls, file: str | os.PathLike) -> "SolutionPath":
        file = Path(file)
        if not file.is_file():
            raise SpecError(f"no solution path at {file}; write one with path.save(file) after a search")
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"{file} is not a readable solution path ({exc}); it may be truncated: rerun the "
                            "search or restore the file") from exc
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as exc:
            raise SpecError(f"{file} is missing field {exc} of a solution path; rerun the search") from exc

    def entries_table(self) -> list[dict]:
        """One row per entry: group, pool, layer, index, entry_step, entry_time, support_steps, V, M (6 significant
        digits), rank."""
        ranks = self.ranking("global")
        rows = []
        for g in self.groups:
            for e in range(g.size):
                rows.append({"group": g.name, "kind": g.kind, "pool": g.pool, "layer": g.layer, "index": e,
                             "entry_step": int(self.entry_step[g.name][e]),
                             "entry_time": float(f"{float(self.entry_time[g.name][e]):.6g}"),
                             "support_steps": int(self.support_steps[g.name][e]),
                             "V": float(f"{float(self.V[g.name][e]):.6g}"),
                             "M": float(f"{float(self.M[g.name][e]):.6g}"),
                             **({"score": float(f"{float(self.score[g.name][e]):.6g}")} if self.score is not None else {}),
                             "rank": int(ranks[g.name][e])})
        return rows

    def write_csv(self, file: str | os.PathLike) -> Path:
        rows = self.entries_table()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        return atomic_write_text(file, buf.getvalue())
