"""Checks for notebook parameters: a papermill value of the wrong type stops the notebook at its second cell
with what to pass, before any work (and before any record is written)."""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError

# spec: "int", "float" (an int is accepted), "str", "bool", "dict", "any", or [spec] for a list of spec
_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict}


def spec_of(value: Any) -> Any:
    """The spec of a parameter from its default value (what the notebooks' check cell is generated from)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, (list, tuple)):
        kinds = {spec_of(v) if not isinstance(v, (list, tuple)) else "any" for v in value}
        if kinds == {"int", "float"}:
            kinds = {"float"}
        return [kinds.pop() if len(kinds) == 1 else "any"]
    return "any"


def _ok(value: Any, spec: Any) -> bool:
    if spec == "any":
        return True
    if isinstance(spec, list):
        return isinstance(value, (list, tuple)) and all(_ok(v, spec[0]) for v in value)
    if isinstance(value, bool) and spec != "bool":  # True is an int in Python, never a number here
        return False
    return isinstance(value, _TYPES[spec])


def _describe(spec: Any) -> str:
    if isinstance(spec, list):
        return f"a list of {_describe(spec[0])}" if spec[0] != "any" else "a list"
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "dict": "a mapping", "any": "any value"}[spec]


def _example(spec: Any) -> str:
    if isinstance(spec, list):
        return "[" + ", ".join([_example(spec[0])] * 2) + "]"
    return {"int": "3", "float": "0.5", "str": '"text"', "bool": "true", "dict": "{}", "any": "..."}[spec]


def check_params(namespace: Mapping[str, Any], specs: Mapping[str, Any]) -> None:
    """Raise ConfigError naming every parameter in ``namespace`` whose value does not fit its spec."""
    problems = []
    for name, spec in specs.items():
        if name not in namespace:
            problems.append(f"{name}: missing (the parameters cell defines it; do not delete it)")
            continue
        value = namespace[name]
        if not _ok(value, spec):
            problems.append(f"{name} must be {_describe(spec)}, got {type(value).__name__} {value!r}; e.g. "
                            f"papermill -y '{name}: {_example(spec)}'")
    if problems:
        raise ConfigError("wrong notebook parameter(s):\n  - " + "\n  - ".join(problems)
                          + "\n(papermill -p parses numbers and true/false; -r passes text as is; -y takes YAML)")
