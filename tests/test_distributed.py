"""Data-parallel search and fine-tuning (2 CPU processes, gloo, launched by torchrun) and resumable searches
(a process killed with SIGKILL mid-run, then --resume), on a tiny random-init ViT.

Tolerance of the DDP comparison: entry steps and the history's support sizes must be equal; V, M and the
losses within 1e-5 (absolute); keep-sets may differ in at most 0.5% of the entries (entries that entered at
the same step are ordered by |V|, so V values closer than the noise may swap). The only difference from
one process is float32 summation order: one process averages the loss over 8 images in one reduction,
two processes average two 4-image means through the all-reduce.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sppbench.core.path import SolutionPath

pytestmark = pytest.mark.slow  # two-process DDP runs and a SIGKILLed search: `nox -s tests_slow`

WORKER = Path(__file__).parent / "dist_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _single(*args: str, timeout: int = 300) -> None:
    out = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=timeout,
                         env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]


def kill_at_first_checkpoint(cmd: list, ckpt: Path, env: dict) -> None:
    """Start ``cmd``, SIGKILL it as soon as its first checkpoint file appears, and check it really was killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert ckpt.exists()


def assert_same_path(a: SolutionPath, b: SolutionPath, atol: float = 0.0) -> None:
    for g in a.groups:
        assert torch.equal(a.entry_step[g.name], b.entry_step[g.name]), g.name
        assert torch.equal(a.support_steps[g.name], b.support_steps[g.name]), g.name
        torch.testing.assert_close(a.V[g.name], b.V[g.name], atol=atol, rtol=0)
        torch.testing.assert_close(a.M[g.name], b.M[g.name], atol=atol, rtol=0)
    assert [h["support_group"] for h in a.history] == [h["support_group"] for h in b.history]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in a.history]),
                               torch.tensor([h["loss"] for h in b.history]), atol=max(atol, 0.0), rtol=0)
    if atol == 0:
        assert a.order() == b.order()
    else:  # entries that entered at the same step are ordered by |V|; differences below atol may swap neighbours
        total = sum(g.size for g in a.groups)
        for f in (0.3, 0.5, 0.7):
            ka, kb = a.keep(fraction=f).masks, b.keep(fraction=f).masks
            assert sum(int((ka[n] ^ kb[n]).sum()) for n in ka) <= 0.005 * total


def test_two_process_ddp_search_matches_one_process_at_the_same_global_batch(tmp_path):
    _single("search", str(tmp_path / "one.json"), "--steps", "15")
    _torchrun("search", str(tmp_path / "two.json"), "--steps", "15")
    one, two = SolutionPath.load(tmp_path / "one.json"), SolutionPath.load(tmp_path / "two.json")
    assert two.config["processes"] == 2 and "processes" not in one.config
    assert sum(int((t >= 0).sum()) for t in one.entry_step.values()) > 0  # something entered: a real comparison
    assert_same_path(one, two, atol=1e-5)


def test_replica_check_passes_equal_states_and_catches_a_differing_rank(tmp_path):
    _torchrun("replicas", str(tmp_path / "r.txt"))
    same, caught = (tmp_path / "r.txt").read_text().split("\n", 1)
    assert float(same) == 0.0
    assert "differs across ranks" in caught and "0.001" in caught


def test_two_process_ddp_finetune_matches_one_process(tmp_path):
    """Same tolerance, except the attention key biases: their true gradient is exactly zero (softmax ignores a
    shift shared by all keys), so their gradient is float noise, which AdamW turns into steps of up to lr."""
    _single("finetune", str(tmp_path / "one.pt"), "--steps", "6")
    _torchrun("finetune", str(tmp_path / "two.pt"), "--steps", "6")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["state"].keys() == two["state"].keys()
    for k, a in one["state"].items():
        b = two["state"][k]
        if k.endswith("attn.qkv.bias"):
            d = a.numel() // 3
            keys = slice(d, 2 * d)
            assert (a[keys] - b[keys]).abs().max() <= 6 * 1e-3  # steps x lr
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=k)
    torch.testing.assert_close(torch.tensor(one["losses"]), torch.tensor(two["losses"]), atol=1e-5, rtol=0)
    assert one["losses"][0] != one["losses"][-1]


def test_resume_after_sigkill_gives_the_uninterrupted_path(tmp_path):
    steps = "400"
    _single("search", str(tmp_path / "full.json"), "--steps", steps)
    ckpt = tmp_path / "state.pt"
    kill_at_first_checkpoint([sys.executable, str(WORKER), "search", str(tmp_path / "cut.json"), "--steps", steps,
                              "--checkpoint", str(ckpt), "--every", "3"], ckpt, ENV)
    assert not (tmp_path / "cut.json").exists()
    at = torch.load(ckpt, weights_only=True)["step"]
    assert 3 <= at < 400
    _single("search", str(tmp_path / "cut.json"), "--steps", steps, "--checkpoint", str(ckpt), "--every", "3",
            "--resume")
    full, cut = SolutionPath.load(tmp_path / "full.json"), SolutionPath.load(tmp_path / "cut.json")
    assert cut.config["resumed_at"] == [at]
    assert_same_path(full, cut)  # exactly


def test_same_config_and_seed_give_the_same_path(tmp_path):
    _single("search", str(tmp_path / "a.json"), "--steps", "10")
    _single("search", str(tmp_path / "b.json"), "--steps", "10")
    assert_same_path(SolutionPath.load(tmp_path / "a.json"), SolutionPath.load(tmp_path / "b.json"))


@pytest.fixture
def tiny_search():
    sys.path.insert(0, str(WORKER.parent))
    import dist_worker

    return dist_worker


def test_resume_refuses_a_checkpoint_of_another_search(tmp_path, tiny_search):
    from sppbench import SpecError

    ckpt = tmp_path / "s.pt"
    tiny_search.run_search(tmp_path / "a.json", 6, ckpt, 2)
    tiny_search.CONSTS["lam"] = 0.5
    try:
        with pytest.raises(SpecError, match="different search.*lam"):
            tiny_search.run_search(tmp_path / "b.json", 6, ckpt, 2, resume=True)
    finally:
        tiny_search.CONSTS["lam"] = 0.02
    with pytest.raises(SpecError, match="beyond the 3 steps"):
        tiny_search.run_search(tmp_path / "b.json", 3, ckpt, 2, resume=True)
    assert not (tmp_path / "b.json").exists()


def test_resume_from_a_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path, tiny_search):
    from sppbench import SpecError

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SpecError, match="not a readable search checkpoint"):
        tiny_search.run_search(tmp_path / "x.json", 4, bad, 2, resume=True)
    assert bad.read_bytes() == b"not a checkpoint"  # left as it was
    with pytest.raises(SpecError, match="no search checkpoint"):
        tiny_search.run_search(tmp_path / "x.json", 4, tmp_path / "none.pt", 2, resume=True)
    torch.save({"format": "something else"}, bad)
    with pytest.raises(SpecError, match="not a sppbench search checkpoint"):
        tiny_search.run_search(tmp_path / "x.json", 4, bad, 2, resume=True)
