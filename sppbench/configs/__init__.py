"""The configs that ship with the package (layer 0: imports nothing of sppbench but its errors).

``search_<profile>.json``: the search constants of a profile and where they came from;
``paper_<model>.json`` / ``paper_clip_<model>.json``: the paper profiles (budgets, recipe, weights, data);
``openclip/``: open_clip model configs of the embedded CLIP stand-in. ``load_config`` is the one loader.
"""
from __future__ import annotations

import json
from importlib import resources

from ..errors import ConfigError


def names() -> list[str]:
    """Every config name (file stem) that ships with the package."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load_config(name: str) -> dict:
    """The shipped config ``<name>.json`` as a dict; a ConfigError names the ones that exist."""
    f = resources.files(__name__).joinpath(f"{name}.json")
    if not f.is_file():
        raise ConfigError(f"no shipped config {name!r}; the package has: {', '.join(names())}")
    return json.loads(f.read_text())


def folder(name: str):
    """A shipped folder of configs (``openclip``), as an importlib.resources Traversable."""
    return resources.files(__name__).joinpath(name)
