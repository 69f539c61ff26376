"""The notebooks' nbval policy: a literal `parameters` cell, volatile cells tagged, a stored check cell."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ is empty"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_holds_literals_only(path):
    cells = _code_cells(json.loads(path.read_text()))
    first = cells[0]
    assert "parameters" in first["metadata"].get("tags", []), "the first code cell must be tagged 'parameters'"
    tree = ast.parse("".join(first["source"]))
    for node in tree.body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.dump(node)
        ast.literal_eval(node.value)  # raises if not a literal


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_volatile_cells_are_tagged_and_stored_outputs_are_checks(path):
    cells = _code_cells(json.loads(path.read_text()))
    for c in cells[1:]:
        tags = c["metadata"].get("tags", [])
        volatile = "nbval-ignore-output" in tags or "nbval-skip" in tags
        if volatile:
            assert not c["outputs"], "a volatile cell must be stored without outputs"
        else:
            assert c["outputs"], f"an untagged cell must store the output nbval compares:\n{''.join(c['source'])}"
            assert c.get("execution_count"), "a cell with stored outputs needs an execution count (else nbval: 'unrun')"
    last = cells[-1]
    assert last["outputs"] and "nbval-ignore-output" not in last["metadata"].get("tags", [])


def test_committed_executed_notebooks_hold_no_absolute_machine_paths():
    """results/executed/ is committed: noxfile's _machine_paths_out makes this checkout's paths relative."""
    import re

    bad = {p.name: m.group(0) for p in (Path(__file__).parents[1] / "results" / "executed").glob("*.ipynb")
           for m in [re.search(r"/(home|root|work|tmp|Users|usr|opt)/[\w.-]+/", p.read_text())] if m}
    assert not bad, f"absolute paths in executed notebooks: {bad}"
