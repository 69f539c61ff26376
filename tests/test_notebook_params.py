"""Wrong notebook parameter types stop a notebook at its check cell, saying what to pass, before any work."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sppbench import ConfigError
from sppbench.studies.notebook import check_params, spec_of

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_specs_from_defaults():
    assert spec_of(3) == "int" and spec_of(0.5) == "float" and spec_of(True) == "bool" and spec_of("x") == "str"
    assert spec_of([0.7, 0.5]) == ["float"] and spec_of([1, 0.5]) == ["float"] and spec_of(["a"]) == ["str"]
    assert spec_of({}) == "dict" and spec_of([]) == ["any"]


def test_check_params_accepts_right_types_and_names_every_wrong_one():
    specs = {"steps": "int", "lr": "float", "models": ["str"], "fractions": ["float"], "flag": "bool"}
    check_params({"steps": 3, "lr": 1, "models": ["a"], "fractions": [1, 0.5], "flag": False}, specs)
    with pytest.raises(ConfigError) as err:
        check_params({"steps": "3", "lr": True, "models": "embedded-vit", "fractions": [0.5, "x"], "flag": 1}, specs)
    msg = str(err.value)
    for name in specs:
        assert f"{name} must be" in msg
    assert "steps must be an integer, got str '3'" in msg and "papermill -y 'steps: 3'" in msg
    with pytest.raises(ConfigError, match="seed: missing"):
        check_params({}, {"seed": "int"})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_checks_its_parameters_right_after_them(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    params = ast.parse("".join(cells[0]["source"]))
    expected = {n.targets[0].id: spec_of(ast.literal_eval(n.value)) for n in params.body}
    check = ast.parse("".join(cells[1]["source"]))
    call = next(n.value for n in check.body if isinstance(n, ast.Expr))
    assert call.func.id == "check_params"
    assert ast.literal_eval(call.args[1]) == expected


def test_papermill_with_a_wrong_type_stops_with_the_fix(tmp_path):
    nb = next(p for p in NOTEBOOKS if p.name.startswith("90_"))
    report = tmp_path / "report"
    out = subprocess.run([sys.executable, "-m", "papermill", str(nb), str(tmp_path / "o.ipynb"), "-p", "runs", "5",
                          "-p", "out", str(report), "--cwd", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "runs must be a string, got int 5" in out.stdout + out.stderr
    assert not report.exists()  # stopped before the report wrote anything
    ok = subprocess.run([sys.executable, "-m", "papermill", str(nb), str(tmp_path / "o2.ipynb"), "-p", "out",
                         str(report), "--cwd", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (report / "report.md").is_file()  # the same call with right types does write there
