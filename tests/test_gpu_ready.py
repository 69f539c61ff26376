"""GPU readiness, checked on CPU: bf16 autocast in search / finetune, fp32 unchanged, device placement,
and tools/gpu_check.py's CPU smoke run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sppbench
from conftest import synthetic_batches, tiny_vit
from sppbench.core.batches import precision_context, resolve_precision, to_device

CONSTS = dict(kappa=5.0, alpha=0.5, nu=50.0, lam=0.05)
ROOT = Path(__file__).resolve().parents[1]


class Recording:
    """A loss_fn that records the dtype of the model output it is given."""

    __name__ = "recording_cross_entropy"

    def __init__(self):
        self.dtypes = []

    def __call__(self, out, target):
        self.dtypes.append(out.dtype)
        return F.cross_entropy(out, target)


def _setup(n=3):
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    return model, m, synthetic_batches(model, 32, n=n)


def _run(steps=12, **kw):
    _, m, batches = _setup()
    loss = Recording()
    path = sppbench.search(m, batches, loss, steps=steps, **{**CONSTS, **kw})
    return m, path, loss


def _same_path(a, b) -> bool:
    return (all(torch.equal(a.V[n], b.V[n]) and torch.equal(a.M[n], b.M[n]) and
                torch.equal(a.entry_step[n], b.entry_step[n]) and torch.equal(a.entry_time[n], b.entry_time[n])
                for n in a.V)
            and [h["loss"] for h in a.history] == [h["loss"] for h in b.history])


def _tensors(obj):
    """Every tensor in a nested state (dicts, lists, tuples)."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _off_device(obj, device: torch.device) -> list[torch.device]:
    return [t.device for t in _tensors(obj) if t.device != device]


def test_bf16_search_runs_under_autocast_and_keeps_state_float32():
    model, m, batches = _setup()
    weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    loss = Recording()
    seen = []

    def callback(step, value, opt):  # after opt.step(): gradients are still there
        for p in m.mask_parameters().values():
            st = opt.state_of(p)
            seen.append((p.dtype, p.grad.dtype, st["V"].dtype, st["gamma"].dtype))

    path = sppbench.search(m, batches, loss, steps=12, callback=callback, precision="bf16", **CONSTS)
    assert path.config["precision"] == "bf16"
    assert loss.dtypes and set(loss.dtypes) == {torch.bfloat16}  # the forward really ran under autocast
    assert seen and set(seen) == {(torch.float32,) * 4}
    assert all(p.dtype == torch.float32 for p in m.parameters())  # the model was not cast
    masks = set(id(p) for p in m.mask_parameters().values())
    for n, p in m.named_parameters():
        if id(p) not in masks:
            assert torch.equal(p, weights[n]), n  # weights frozen
    for n in path.V:
        assert path.V[n].dtype == torch.float32 and path.M[n].dtype == torch.float32
        assert torch.isfinite(path.V[n]).all() and torch.isfinite(path.M[n]).all()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in path.history)
    # close to the fp32 search, but not the same numbers (bf16 did change the arithmetic)
    _, fp32, _ = _run()
    assert [h["loss"] for h in path.history] != [h["loss"] for h in fp32.history]
    assert path.history[0]["loss"] == pytest.approx(fp32.history[0]["loss"], rel=0.05)


def test_fp32_default_is_bit_identical_and_runs_without_autocast():
    _, a, la = _run()
    _, b, _ = _run()
    _, c, lc = _run(precision="fp32")
    assert a.config["precision"] == "fp32" == c.config["precision"]
    assert set(la.dtypes) == {torch.float32} == set(lc.dtypes)
    assert _same_path(a, b) and _same_path(a, c)


def test_bad_precision_is_refused_naming_the_choices():
    _, m, batches = _setup()
    for bad in ("fp16", "bfloat16", "BF16", None):
        with pytest.raises(ValueError, match="fp32.*bf16.*auto"):
            sppbench.search(m, batches, F.cross_entropy, steps=2, precision=bad, **CONSTS)
        with pytest.raises(ValueError, match="fp32.*bf16.*auto"):
            sppbench.finetune(tiny_vit(), batches, steps=1, precision=bad)
    with pytest.raises(ValueError, match="resolve_precision"):
        precision_context("auto", "cpu")


def test_finetune_bf16_records_it_and_keeps_weights_float32():
    model = tiny_vit()
    batches = synthetic_batches(model, 32, n=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = Recording()
    rec = sppbench.finetune(model, batches, steps=3, lr=1e-3, loss_fn=loss, precision="bf16")
    assert rec["settings"]["precision"] == "bf16"
    assert set(loss.dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # it did train
    assert all(torch.isfinite(torch.tensor(v)) for v in rec["losses"]) and len(rec["losses"]) == 3
    plain = sppbench.finetune(tiny_vit(), batches, steps=0)
    assert plain["settings"]["precision"] == "fp32"


def test_search_keeps_masks_and_slbi_state_on_the_model_device():
    model, m, batches = _setup()
    device = next(model.parameters()).device
    assert device == torch.device("cpu")
    off, inputs = [], []
    m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].device))

    def callback(step, value, opt):
        masks = m.mask_parameters()
        off.extend(_off_device(list(masks.values()), device))
        off.extend(_off_device([p.grad for p in masks.values()], device))
        off.extend(_off_device([opt.state_of(p) for p in masks.values()], device))
        states.append(sum(1 for _ in _tensors([opt.state_of(p) for p in masks.values()])))

    states = []
    sppbench.search(m, batches, F.cross_entropy, steps=4, callback=callback, precision="bf16", **CONSTS)
    assert states and min(states) >= 5 * len(m.groups)  # V, gamma, entry_step, entry_time, support_steps
    assert off == []
    assert inputs and set(inputs) == {device}
    assert _off_device(list(m.parameters()) + list(m.buffers()), device) == []
    # the check above can fail: a tensor on another device is caught
    assert _off_device([torch.zeros(2), {"x": [torch.zeros(1, device="meta")]}], device) == [torch.device("meta")]


def test_to_device_moves_nested_batches():
    meta = torch.device("meta")
    batch = ((torch.zeros(2, 3), [torch.ones(1), {"mask": torch.ones(2, dtype=torch.bool)}]),
             {"y": torch.arange(2), "name": "kept", "n": 3})
    moved = to_device(batch, meta)
    assert isinstance(moved, tuple) and isinstance(moved[0][1], list) and isinstance(moved[1], dict)
    assert [t.device for t in _tensors(moved)] == [meta] * 4
    assert moved[1]["name"] == "kept" and moved[1]["n"] == 3
    assert moved[0][1][1]["mask"].dtype == torch.bool and moved[0][0].shape == (2, 3)
    assert _off_device(to_device(moved, "meta"), meta) == []


def test_auto_precision_on_cpu_is_fp32():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", "meta") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    _, path, loss = _run(steps=3, precision="auto")
    assert path.config["precision"] == "fp32" and set(loss.dtypes) == {torch.float32}
    rec = sppbench.finetune(tiny_vit(), synthetic_batches(tiny_vit(), 32, n=1), steps=1, precision="auto")
    assert rec["settings"]["precision"] == "fp32"


def test_resume_needs_the_recorded_precision(tmp_path):
    ck = tmp_path / "state.pt"
    _, m, batches = _setup()
    with pytest.raises(KeyboardInterrupt):
        def stop(step, value, opt):
            if step == 4:
                raise KeyboardInterrupt
        sppbench.search(m, batches, F.cross_entropy, steps=8, precision="bf16", checkpoint=ck, checkpoint_every=2,
                        callback=stop, **CONSTS)
    assert ck.is_file()
    with pytest.raises(sppbench.SpecError, match="precision: checkpoint 'bf16', now 'fp32'"):
        sppbench.search(m, batches, F.cross_entropy, steps=8, checkpoint=ck, resume=True, **CONSTS)
    full = sppbench.search(m, batches, F.cross_entropy, steps=8, precision="bf16", **CONSTS)
    resumed = sppbench.search(m, batches, F.cross_entropy, steps=8, precision="bf16", checkpoint=ck, resume=True,
                              **CONSTS)
    assert resumed.config["precision"] == "bf16" and resumed.config["resumed_at"] == [2]
    assert _same_path(full, resumed)
    # a checkpoint written before precision was recorded was fp32
    state = torch.load(ck, weights_only=True)
    del state["config"]["precision"]
    torch.save(state, ck)
    assert sppbench.search(m, batches, F.cross_entropy, steps=8, checkpoint=ck, resume=True,
                           **CONSTS).config["precision"] == "fp32"
    with pytest.raises(sppbench.SpecError, match="precision: checkpoint 'fp32', now 'bf16'"):
        sppbench.search(m, batches, F.cross_entropy, steps=8, precision="bf16", checkpoint=ck, resume=True, **CONSTS)


def test_gpu_check_without_cuda_exits_2(monkeypatch, capsys, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tool.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "no CUDA GPU: tools/gpu_check.sh runs only on a GPU machine\n"
    assert list(tmp_path.iterdir()) == []


def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu-smoke", "--model", "test_vit",
           "--batch", "2", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    files = list(tmp_path.glob("gpu_check_*.json"))
    assert len(files) == 1, files
    d = json.loads(files[0].read_text())
    assert d["cpu_smoke"] is True and d["device_type"] == "cpu" and d["model"] == "test_vit"
    assert (d["batch"], d["steps"], d["warmup"], d["image_size"]) == (2, 2, 1, 160)
    assert d["torch"] == torch.__version__ and d["record_every"] == 1 and d["goal_ratio"] == 0.9
    assert set(d["runs"]) == {"bf16", "fp32"}
    for precision, r in d["runs"].items():
        for kind in ("plain", "search"):
            assert r[kind]["images_per_s"] > 0 and r[kind]["seconds"] > 0 and r[kind]["max_memory_bytes"] is None
        assert r["search"]["path_precision"] == precision
        assert r["ratio_search_over_plain"] == pytest.approx(
            r["search"]["images_per_s"] / r["plain"]["images_per_s"], rel=1e-3)
        assert r["verdict"] == ("PASS" if r["ratio_search_over_plain"] >= 0.9 else "BELOW GOAL")
    assert "search/plain" in res.stdout and f"wrote {files[0]}" in res.stdout


def test_masked_activations_stay_bf16_under_autocast():
    """The adapters cast each mask to the activation dtype, so the MLP hidden activations (the widest tensors) stay
    bf16 under autocast instead of being promoted to fp32 by the fp32 mask (then the search would cost more memory
    and time than plain training)."""
    model = tiny_vit()
    m = sppbench.attach_masks(model)
    seen = []
    hooks = [mod.register_forward_pre_hook(lambda _, inp: seen.append(inp[0].dtype))
             for mod in model.modules() if isinstance(mod, torch.nn.GELU)]
    x = torch.randn(2, 3, 32, 32)
    with precision_context("bf16", "cpu"):
        m(x)
    for h in hooks:
        h.remove()
    assert seen and all(d == torch.bfloat16 for d in seen), seen
    with torch.no_grad():
        for p in m.mask_parameters().values():
            p.mul_(0.5)  # non-trivial masks: still the activation dtype, and fp32 without autocast is unchanged
    seen.clear()
    hooks = [mod.register_forward_pre_hook(lambda _, inp: seen.append(inp[0].dtype))
             for mod in model.modules() if isinstance(mod, torch.nn.GELU)]
    m(x)
    assert seen and all(d == torch.float32 for d in seen)
    assert all(p.dtype == torch.float32 for p in m.mask_parameters().values())
