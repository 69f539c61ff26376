"""Run records are complete or absent, uniquely named; configs reject wrongly typed parameters."""
from __future__ import annotations

import json

import pytest

from sppbench.studies.quickstart import QuickstartConfig
from sppbench.studies.records import RunRecord, list_records, load_record


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


_WRITER = """
import sys, time
from pathlib import Path
from sppbench.studies.records import RunRecord
root, tag, n, pause = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
for i in range(n):
    rec = RunRecord("study", root=root)
    rec.write_json("params.json", {"writer": tag, "i": i})
    time.sleep(pause)
    rec.write_json("metrics.json", {"writer": tag, "i": i, "big": list(range(2000))})
    rec.finish()
print("done", flush=True)
"""


def test_two_writers_at_once_never_mix_records(tmp_path):
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), tag, "15", "0"])
             for tag in ("a", "b")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    folders = list_records("study", root=tmp_path)
    assert len(folders) == 30 and len({f.name for f in folders}) == 30
    for f in folders:
        rec = load_record(f)
        assert rec["params"]["writer"] == rec["metrics"]["writer"] and rec["params"]["i"] == rec["metrics"]["i"]
    assert sorted(rec["params"]["writer"] for rec in map(load_record, folders)).count("a") == 15


def test_a_run_killed_while_writing_leaves_no_record(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), "k", "1", "60"])
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "study").glob(".tmp-*/params.json")):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert list((tmp_path / "study").glob(".tmp-*/params.json"))  # the half-written record is there ...
    assert list_records("study", root=tmp_path) == []  # ... and invisible
    from sppbench.report.build import build_report

    build_report(root=tmp_path, out=tmp_path / "out")  # the report does not trip over it
