"""The method registry: every way of choosing what to prune is one ``Method`` entry.

Two domains:

- ``"structured"``: methods that choose which mask entries (attention dimensions, MLP neurons) of a
  ``MaskedModel`` to keep, for the vision and CLIP tables (``sppbench.methods.structured``). Kinds:
  ``"ranking"`` (one search or score gives a total order, and any budget is read off it: SPP, the official
  SPP form, Lasso-rank, DessiLBI, magnitude, random), ``"per-budget"`` (a search per budget: Lasso) and
  ``"peer"`` (another library prunes a dense copy: the Torch-Pruning peers).
- ``"llm"``: layer-wise pruners of the Linears of a causal LM (``sppbench.methods.llm``): magnitude, Wanda,
  RIA, SPP-RIA, SparseGPT, and the control ``ria-perturbed``.

Adding a method means registering one entry (with the function that does its work); the CLI's choices, the
tables' method lists and the tests that run every registered method (tests/test_methods.py,
tests/test_llm.py) all read this registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..errors import SppBenchError

DOMAINS = ("structured", "llm")
KINDS = {"structured": ("ranking", "per-budget", "peer"), "llm": ("layer-wise",)}


@dataclass(frozen=True)
class Method:
    """One pruning method.

    name / domain / kind: as in the module docstring; summary: one line for listings.
    seeded: its result depends on the seed (False: a table runs it once, e.g. magnitude).
    tuning_knob: the one knob the equal tuning budget tunes (its step size; None = nothing to tune).
    defaults: its own default settings (documented, recorded with its rows).
    readout: a fixed read-out for ranking methods (random always reads per layer); None = the table's.
    control: a control arm, not a method a user picks (excluded from the default lists).
    rank: ranking methods: (m, batches, loss_fn, *, steps, seed, spp, settings) -> SolutionPath.
    prune: per-budget and peer methods: (m, budgets, *, batches, loss_fn, steps, spp, seed, settings,
        example_inputs) -> list of ``Pruned``.
    select: llm methods: (W, stats, pattern, compare, ctx) -> (keep mask, per-Linear extras).
    statistic: llm methods: what each Linear's calibration inputs must give ("none", "sq": the squared input
        norms per column, "gram": the input Gram matrix X^T X).
    compare: llm methods: the comparison group of the unstructured read-out ("layer", "row", "block").
    """

    name: str
    domain: str
    kind: str
    summary: str
    seeded: bool = True
    tuning_knob: str | None = None
    defaults: Mapping = field(default_factory=dict)
    readout: str | None = None
    control: bool = False
    rank: Callable | None = None
    prune: Callable | None = None
    select: Callable | None = None
    statistic: str = "none"
    compare: str = "layer"

    def __post_init__(self):
        if self.domain not in DOMAINS or self.kind not in KINDS[self.domain]:
            raise ValueError(f"method {self.name!r}: domain {self.domain!r} / kind {self.kind!r} is not one of {KINDS}")
        needs = {"ranking": "rank", "per-budget": "prune", "peer": "prune", "layer-wise": "select"}[self.kind]
        if getattr(self, needs) is None:
            raise ValueError(f"method {self.name!r} ({self.kind}) needs its {needs!r} function")


_REGISTRY: dict[tuple[str, str], Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name may be registered once per domain)."""
    key = (method.domain, method.name)
    if key in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered in domain {method.domain!r}")
    _REGISTRY[key] = method
    return method


def get(name: str, domain: str = "structured") -> Method:
    """The registered method ``name`` of ``domain``; an SppBenchError lists the known ones."""
    try:
        return _REGISTRY[(domain, name)]
    except KeyError:
        known = ", ".join(names(domain, controls=True))
        what = "pruning method" if domain == "structured" else "LLM pruning method"
        raise SppBenchError(f"unknown {what} {name!r}; known methods: {known}") from None


def names(domain: str = "structured", kind: str | None = None, *, controls: bool = False) -> tuple[str, ...]:
    """Registered method names of ``domain`` (and ``kind``), in registration order; controls only if asked."""
    return tuple(m.name for (d, _), m in _REGISTRY.items()
                 if d == domain and (kind is None or m.kind == kind) and (controls or not m.control))


def all_methods(domain: str | None = None) -> list[Method]:
    """Every registered method (of ``domain``), controls included."""
    return [m for (d, _), m in _REGISTRY.items() if domain is None or d == domain]
