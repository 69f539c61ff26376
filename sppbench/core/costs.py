"""Analytic parameter and MAC counts of a masked model as a function of its kept widths.

A family adapter describes its model as a fixed ``base`` (everything no mask touches: embeddings,
final norm, head) plus a list of *branches* (one attention or MLP sub-block each). A branch's cost
depends only on how many entries of its mask groups are kept, through the formula registered for
its ``kind``. The formulas are exact for the compressed modules that ``sppbench.core.compress`` builds:
tests check them against ``torch.utils.flop_counter`` and ``numel``.

All MAC counts are multiply-accumulates per sample (one image / one sequence), attention matmuls
included. FLOPs = 2 x MACs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

BranchCost = Callable[[Mapping[str, int], Mapping[str, int]], "tuple[int, int]"]
_BRANCH_COSTS: dict[str, BranchCost] = {}


def register_branch(kind: str) -> Callable[[BranchCost], BranchCost]:
    """Register the cost formula ``f(dims, widths) -> (params, macs)`` of a branch kind."""

    def deco(fn: BranchCost) -> BranchCost:
        _BRANCH_COSTS[kind] = fn
        return fn

    return deco


@register_branch("attention")
def attention_cost(d: Mapping[str, int], w: Mapping[str, int]) -> tuple[int, int]:
    """Multi-head self-attention with pair-wise masks (fused or split q/k/v projections).

    dims: D (width), h (heads), N (tokens per sample), qkv_bias, proj_bias, out (output width),
    norm (params of the pre-norm owned by the branch), ls (1 if a LayerScale follows), masked (1 if
    the attention takes a causal / padding mask).
    widths: qk (kept q/k dims per head), v (kept v dims per head).
    A branch with no kept v dimension collapses to its constant output (proj bias * LayerScale);
    with no kept q/k dimension the attention is uniform: without a mask it is computed on the token
    mean; with one, each token averages the values it may see (computed in full).
    """
    D, h, N, out = d["D"], d["h"], d["N"], d.get("out", d["D"])
    kq, kv = w["qk"], w["v"]
    if kv == 0:
        return (out if d["proj_bias"] else 0), 0
    params = d["norm"] + out * d.get("ls", 0)
    params += (D + d["qkv_bias"]) * h * (2 * kq + kv) + h * kv * out + out * d["proj_bias"]
    if kq == 0 and not d.get("masked", 0):
        macs = D * h * kv + h * kv * out  # v and proj on the token mean, once per sample
    else:
        macs = N * D * h * (2 * kq + kv) + h * N * N * (kq + kv) + N * h * kv * out
    return params, macs


@register_branch("mlp")
def mlp_cost(d: Mapping[str, int], w: Mapping[str, int]) -> tuple[int, int]:
    """fc1 -> act -> fc2 with a mask on the hidden units.

    dims: D, N, fc1_bias, fc2_bias, out, norm, ls. widths: hidden.
    An MLP with no kept hidden unit collapses to its constant output (fc2 bias * LayerScale).
    """
    D, N, out = d["D"], d["N"], d.get("out", d["D"])
    k = w["hidden"]
    if k == 0:
        return (out if d["fc2_bias"] else 0), 0
    params = d["norm"] + out * d.get("ls", 0) + (D + d["fc1_bias"]) * k + k * out + out * d["fc2_bias"]
    return params, N * D * k + N * k * out


@dataclass
class Branch:
    """One maskable sub-block: ``groups`` maps the formula's width names to mask-group names;
    ``part`` names the tower it belongs to in a multi-tower model ('' for single-tower models)."""

    kind: str
    groups: dict[str, str]
    dims: dict[str, int]
    part: str = ""

    def cost(self, widths: Mapping[str, int]) -> tuple[int, int]:
        try:
            fn = _BRANCH_COSTS[self.kind]
        except KeyError:  # pragma: no cover - a family forgot to register its formula
            raise KeyError(f"no cost formula registered for branch kind {self.kind!r}") from None
        return fn(self.dims, {role: widths[g] for role, g in self.groups.items()})


@dataclass
class CostModel:
    """base + sum of branch costs; serialisable so a SolutionPath can price keep-sets alone.

    A multi-tower model (CLIP: image and text encoders) has ``parts``: per tower, the base params and
    MACs that belong to it (``base_*`` holds the rest, e.g. a logit scale). ``cost(widths, part=...)``
    prices one tower alone: MACs per image for the image tower, per caption for the text tower; with
    no part, the whole model (MACs of one image plus one caption).
    """

    base_params: int
    base_macs: int
    branches: list[Branch] = field(default_factory=list)
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)

    def cost(self, widths: Mapping[str, int], part: str | None = None) -> tuple[int, int]:
        """(params, MACs per sample) of the compressed model (or of one ``part``) with these kept widths."""
        if part is None:
            p, m = self.base_params, self.base_macs
            for bp, bm in self.parts.values():
                p, m = p + bp, m + bm
        else:
            if part not in self.parts:
                raise KeyError(f"no part {part!r}; this model's parts: {sorted(self.parts) or 'none'}")
            p, m = self.parts[part]
        for b in self.branches:
            if part is not None and b.part != part:
                continue
            bp, bm = b.cost(widths)
            p += bp
            m += bm
        return p, m

    def group_branch(self) -> dict[str, int]:
        """Index of the branch each mask group belongs to."""
        return {g: i for i, b in enumerate(self.branches) for g in b.groups.values()}

    def to_dict(self) -> dict:
        return {
            "base_params": self.base_params,
            "base_macs": self.base_macs,
            "branches": [{"kind": b.kind, "groups": b.groups, "dims": b.dims, **({"part": b.part} if b.part else {})}
                         for b in self.branches],
            **({"parts": {k: list(v) for k, v in self.parts.items()}} if self.parts else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "CostModel":
        return cls(
            int(d["base_params"]),
            int(d["base_macs"]),
            [Branch(b["kind"], dict(b["groups"]), {k: int(v) for k, v in b["dims"].items()}, str(b.get("part", "")))
             for b in d["branches"]],
            {k: (int(v[0]), int(v[1])) for k, v in d.get("parts", {}).items()},
        )
