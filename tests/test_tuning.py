"""The tuning rule: every searching method gets the same grid over its one knob, scored on the validation split
only; the chosen setting feeds the table, whose record says what it ran with."""
from __future__ import annotations

import dataclasses

import pytest
from test_vision import tiny_task

from sppbench import methods
from sppbench.tuning import default_knobs, tune_vision
from sppbench.vision import VisionTableConfig, run_vision_table


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
        best = part["val_head_refit_mean"].max()
        pick = part[part["value"] == st[methods.TUNING_KNOBS[m]]].iloc[0]
        # the best, or the default when the best is no more than 0.001 above it
        assert pick["val_head_refit_mean"] == best or (pick["default"] and best - pick["val_head_refit_mean"] <= 1e-3)
    assert t["chosen"].sum() == 3 and res["info"]["validation_images"] == 32
    assert (res["record"] / "metrics.json").is_file()


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
