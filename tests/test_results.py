"""Run records are complete or absent, uniquely named; configs reject wrongly typed parameters."""
from __future__ import annotations

import json

import pytest

from sppbench.experiments import QuickstartConfig
from sppbench.results import RunRecord, list_records, load_record


def test_record_appears_only_when_finished(tmp_path):
    rec = RunRecord("study", root=tmp_path)
    rec.write_json("params.json", {"a": 1, "nan": float("nan")})
    assert list_records("study", root=tmp_path) == []  # still hidden while being written
    folder = rec.finish()
    assert list_records("study", root=tmp_path) == [folder]
    loaded = load_record(folder)
    assert loaded["params"] == {"a": 1, "nan": None}
    assert {"python", "versions", "torch_threads", "cpu"} <= set(loaded["env"])


def test_abandoned_record_leaves_nothing(tmp_path):
    rec = RunRecord("study", root=tmp_path)
    rec.write_json("params.json", {})
    rec.abandon()
    assert list_records("study", root=tmp_path) == []
    assert not any((tmp_path / "study").iterdir())


def test_run_ids_are_unique(tmp_path):
    ids = {RunRecord("s", root=tmp_path).run_id for _ in range(20)}
    assert len(ids) == 20


def test_wrongly_typed_parameters_are_refused():
    with pytest.raises(TypeError, match="steps must be int"):
        QuickstartConfig(steps="100").resolved()
    with pytest.raises(TypeError, match="fractions"):
        QuickstartConfig(fractions=("0.5",)).resolved()
    cfg = QuickstartConfig(steps=10, kappa=3.0).resolved()
    assert cfg.kappa == 3.0 and cfg.alpha > 0  # zeros resolve to the profile's tuned defaults
    assert json.loads(json.dumps(cfg.__dict__))  # JSON-able as recorded
