"""Exceptions sppbench raises. Every message says what to do next."""
from __future__ import annotations


class SppBenchError(Exception):
    """Base class of every sppbench error."""


class UnsupportedModelError(SppBenchError, TypeError):
    """The model (or one of its blocks) has no family adapter."""


class BudgetError(SppBenchError, ValueError):
    """A budget that cannot be met or is malformed."""


class SearchDivergedError(SppBenchError, FloatingPointError):
    """The loss became NaN or inf during a search.

    ``path`` holds the solution path as it was after the last finite step, so nothing already
    computed is lost.
    """

    def __init__(self, message: str, path=None, step: int | None = None):
        super().__init__(message)
        self.path = path
        self.step = step


class AutoConstantsError(SppBenchError, ValueError):
    """The automatic constants cannot be derived from this model and data (the masks get no gradient, the curvature
    estimate is noise, a derived value is out of bounds); raised before the search's first step."""


class SpecError(SppBenchError, ValueError):
    """A pruned-model spec or weights file that is missing, corrupt or does not match."""


class DataError(SppBenchError, FileNotFoundError):
    """Missing or malformed data."""


class OutputExistsError(SppBenchError, FileExistsError):
    """An output folder already holds results; nothing is overwritten unless asked."""


class ConfigError(SppBenchError, ValueError):
    """Settings that cannot work together (a notebook parameter of the wrong type, a batch that does not
    split across processes, missing constants)."""
