"""`python -m sppbench`: subcommands exist and bad input gives a clear error, not a traceback."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from sppbench.cli import main
from test_path import synthetic_path


def test_help_lists_search_and_prune():
    out = subprocess.run([sys.executable, "-m", "sppbench", "--help"], capture_output=True, text=True, check=True)
    assert "search" in out.stdout and "prune" in out.stdout


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["search", "--model", "resnet-nope", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet-nope'" in err and "embedded" in err


def test_prune_with_a_missing_or_corrupt_path(tmp_path, capsys):
    assert main(["prune", "--path", str(tmp_path / "none.json"), "--fraction", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "no solution path" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["prune", "--path", str(bad), "--fraction", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "truncated" in capsys.readouterr().err


def test_prune_rejects_impossible_budgets_before_building_anything(tmp_path, capsys):
    f = synthetic_path().save(tmp_path / "p.json")
    with pytest.raises(SystemExit) as exc:  # refused by the parser, before anything is read
        main(["prune", "--path", str(f), "--fraction", "1.5", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "expected a number in (0, 1], got '1.5'" in capsys.readouterr().err
    assert main(["prune", "--path", str(f), "--params", "10", "--out", str(tmp_path / "o")]) == 2
    assert "below the smallest" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_two_budgets_at_once_are_refused():
    out = subprocess.run([sys.executable, "-m", "sppbench", "prune", "--path", "p.json", "--fraction", "0.5",
                          "--params", "100", "--out", "o"], capture_output=True, text=True)
    assert out.returncode == 2 and "not allowed with argument" in out.stderr


def test_prune_refuses_to_overwrite_an_existing_folder(tmp_path, capsys):
    f = synthetic_path().save(tmp_path / "p.json")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    assert main(["prune", "--path", str(f), "--fraction", "0.5", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "earlier work"


def test_vision_table_on_a_paper_model_takes_all_four_constants_or_none_then_needs_imagenet(tmp_path, capsys,
                                                                                             monkeypatch):
    monkeypatch.delenv("SPPBENCH_IMAGENET", raising=False)
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    assert main(["vision-table", "--model", "deit_small_patch16_224", "--kappa", "1"]) == 2
    assert "give all four SPP constants (kappa, alpha, nu, lam) or none" in capsys.readouterr().err
    assert main(["vision-table", "--model", "deit_small_patch16_224"]) == 2  # none: automatic, then the data
    assert "needs ImageNet" in capsys.readouterr().err
    consts = ["--kappa", "1", "--alpha", "0.1", "--nu", "10", "--lam", "0.5"]
    assert main(["vision-table", "--model", "deit_small_patch16_224", *consts]) == 2
    assert "needs ImageNet" in capsys.readouterr().err
    assert main(["vision-table", "--model", "resnet50", *consts]) == 2
    assert "unknown vision model" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_paper_check_says_what_is_missing(capsys, monkeypatch):
    monkeypatch.delenv("SPPBENCH_IMAGENET", raising=False)
    assert main(["paper-check", "--models", "deit_small_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert "needs ImageNet" in err and "GPU" in err


@pytest.mark.parametrize("argv, says", [
    (["search", "--kappa", "nan"], "expected a positive float, got 'nan'"),
    (["search", "--lam", "-1"], "expected a positive float, got '-1'"),
    (["search", "--alpha", "inf"], "expected a positive float, got 'inf'"),
    (["search", "--seed", "-3"], "expected a non-negative int, got '-3'"),
    (["search", "--img-size", "0"], "expected a positive int, got '0'"),
    (["search", "--steps", "2.5"], "expected a positive int, got '2.5'"),
    (["vision-table", "--macs-fractions", "0.5", "1.2"], "expected a number in (0, 1], got '1.2'"),
    (["clip-table", "--n-test", "-5"], "expected a positive int, got '-5'"),
    (["quickstart", "--fractions", "nan"], "expected a number in (0, 1], got 'nan'"),
    (["paper-check", "--min-gpus", "-1"], "expected a non-negative int, got '-1'"),
    (["llm-table", "--structured-fractions", "0"], "expected a number in (0, 1], got '0'"),
    (["llm-table", "--seeds", "-1"], "expected a non-negative int, got '-1'"),
    (["search", "--log-every", "-1"], "expected a non-negative int, got '-1'"),  # 0 (no progress lines) is valid
])
def test_every_bad_number_is_a_one_line_error_not_a_traceback(argv, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([*argv, *(["--out", str(tmp_path / "p.json")] if argv[0] == "search" else [])])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and says in err and "Traceback" not in err


def test_no_numeric_option_takes_an_unchecked_int_or_float():
    """Every numeric CLI option goes through a validating type (the bare int / float of argparse would take
    nan, inf and negatives)."""
    from sppbench.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = [(name, a.dest) for name, p in sub.choices.items() for a in p._actions if a.type in (int, float)]
    assert bare == []
