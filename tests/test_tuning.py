"""The tuning rule: every searching method gets the same grid over its one knob, scored on the validation split
only; the chosen setting feeds the table, whose record says what it ran with."""
from __future__ import annotations

import dataclasses

import pytest
from test_vision import tiny_task

from sppbench import methods
from sppbench.studies.tuning import default_knobs, tune_vision
from sppbench.studies.vision_table import VisionTableConfig, run_vision_table


def _no_test(task):
    """The task with its test split made unreadable: tuning must never touch it."""
    loader = task.loader

    def guarded(split):
        if split == "test":
            raise AssertionError("tuning read the test split")
        return loader(split)

    return dataclasses.replace(task, loader=guarded)


def test_every_method_gets_the_same_grid_on_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = VisionTableConfig(model="embedded-vit", methods=("spp", "lasso-rank", "dessilbi", "magnitude"),
                            macs_fractions=(0.8, 0.5), steps=3, batch_size=8)
    res = tune_vision(cfg, factors=(0.25, 1.0, 4.0), progress=False, task=_no_test(tiny_task()))
    t = res["table"]
    # magnitude has no knob: no tuning budget; the three searching methods get three settings each
    assert t.groupby("method").size().to_dict() == {"spp": 3, "lasso-rank": 3, "dessilbi": 3}
    defaults = default_knobs(cfg)
    for _, r in t.iterrows():
        assert r["knob"] == methods.TUNING_KNOBS[r["method"]]
        assert r["value"] == pytest.approx(defaults[r["method"]][r["knob"]] * r["factor"])
        assert r["budgets_scored"] == 2 and 0 <= r["val_head_refit_mean"] <= 1
    assert set(res["chosen"]) == {"spp", "lasso-rank", "dessilbi"}
    for m, st in res["chosen"].items():
        part = t[t["method"] == m]
        pick = part[part["value"] == st[methods.TUNING_KNOBS[m]]].iloc[0]
        others = part[~part["default"]]
        # every other setting carries its paired interval against the default; the default stays unless one of
        # them is better beyond that interval
        assert others["vs_default_lo"].le(others["vs_default_delta"]).all()
        assert others["vs_default_delta"].le(others["vs_default_hi"]).all()
        assert pick["default"] or pick["vs_default_verdict"] == "better"
        if not (others["vs_default_verdict"] == "better").any():
            assert pick["default"]
    assert t["chosen"].sum() == 3 and res["info"]["validation_images"] == 32
    assert (res["record"] / "metrics.json").is_file()
    # the per-image validation arrays behind every score are in the record: three settings x two budgets each
    import numpy as np
    with np.load(res["record"] / "val_correct.npz") as z:
        assert len(z.files) == 3 * 3 * 2 and all(z[k].shape == (32,) for k in z.files)


def _rows(method, scores, verdicts, scored=(2, 2, 2)):
    return [{"method": method, "knob": "lr", "factor": f, "value": f, "default": f == 1.0, "val_head_refit_mean": s,
             "budgets_scored": n, "vs_default_verdict": v} for f, s, v, n in zip((0.25, 1.0, 4.0), scores, verdicts, scored)]


def test_the_rule_keeps_the_default_unless_a_setting_is_better_beyond_noise():
    import pandas as pd

    from sppbench.studies.tuning import choose

    t = pd.DataFrame(_rows("a", [0.90, 0.80, 0.85], ["tie", None, "better"])  # the higher score is within noise
                     + _rows("b", [0.70, 0.80, 0.90], ["worse", None, "tie"])  # nothing beyond noise: default
                     + _rows("c", [0.85, 0.80, 0.95], ["better", None, "better"], scored=(2, 2, 1))  # refused a budget
                     + _rows("d", [0.85, 0.80, 0.82], ["better", None, "better"])  # two better: the higher one
                     + _rows("e", [0.85, 0.80, 0.82], [None, None, None], scored=(2, 1, 2)))  # default refused
    assert choose(t, 2) == {"a": {"lr": 4.0}, "b": {"lr": 1.0}, "c": {"lr": 0.25}, "d": {"lr": 0.25},
                            "e": {"lr": 0.25}}


def test_the_table_runs_with_the_chosen_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    cfg = VisionTableConfig(model="embedded-vit", methods=("lasso-rank", "dessilbi"), macs_fractions=(0.5,), steps=3,
                            batch_size=8, seeds=1, resamples=100,
                            method_settings={"lasso-rank": {"lr": 0.5}, "dessilbi": {"alpha": 0.004}})
    res = run_vision_table(cfg, task=tiny_task(), progress=False)
    conf = res["info"]["search_configs"]
    assert conf["lasso-rank@seed0"]["lr"] == 0.5 and conf["dessilbi@seed0"]["alpha"] == 0.004
    assert res["info"]["method_settings"] == {"lasso-rank": {"lr": 0.5}, "dessilbi": {"alpha": 0.004}}


@pytest.mark.parametrize("bad", [{"magnitude": {"lr": 1.0}}, {"lasso": {"u": 2.0}}, {"dessilbi": {"alpha": -1.0}},
                                 {"dessilbi": {"alpha": float("nan")}}, {"lasso": {"lr": True}}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        VisionTableConfig(method_settings=bad).resolved()
    with pytest.raises(ValueError, match="eval_split"):
        VisionTableConfig(eval_split="train").resolved()
