"""Any model by spec: timm:<name> with a weights file, open_clip:<name> with a tag or file, hf:<folder>; the family
is checked before any weight is read, and every bad input is a one-line error that says what to do."""
from __future__ import annotations

import json

import pytest
import torch

from sppbench.cli import main
from sppbench.core.dynamics import official_held_v
from sppbench.errors import DataError, SppBenchError, UnsupportedModelError
from sppbench.tasks import miniatures, models


def test_split_spec_and_is_spec():
    assert models.split_spec("timm:deit_small_patch16_224") == ("timm", "deit_small_patch16_224")
    assert models.split_spec("hf:/a/b:c") == ("hf", "/a/b:c")
    assert models.split_spec("embedded-vit") == (None, "embedded-vit")
    assert models.split_spec("weird:thing") == (None, "weird:thing")
    assert models.is_spec("open_clip:ViT-B-32", "open_clip") and not models.is_spec("open_clip:ViT-B-32", "timm")
    with pytest.raises(UnsupportedModelError, match="names no model"):
        models.split_spec("timm:")


def test_timm_spec_loads_the_given_weights_file(tmp_path):
    f = miniatures.write_timm_weights("test_vit", tmp_path / "w.pth", seed=3)
    model = models.timm_model("test_vit", f)
    saved = torch.load(f)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not model.training and models.timm_input_size(model) == 160


def test_timm_spec_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(UnsupportedModelError, match="timm has no model 'no_such_net'"):
        models.timm_model("no_such_net", tmp_path / "x.pth")
    with pytest.raises(UnsupportedModelError, match="is a ResNet, which sppbench cannot prune.*hf:<folder>"):
        models.timm_model("resnet18", tmp_path / "x.pth")  # refused before any file is read
    with pytest.raises(DataError, match="does not exist"):
        models.timm_model("test_vit", tmp_path / "missing.pth")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="pass --weights"):
        models.timm_model("test_vit")
    wrong = miniatures.write_timm_weights("test_vit2", tmp_path / "other.pth")
    with pytest.raises(DataError, match="exactly this architecture"):
        models.timm_model("test_vit", wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="could not load"):
        models.timm_model("test_vit", junk)


def test_hf_spec_checks_the_folder_and_architecture(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        models.hf_model_type(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="config.json is missing"):
        models.hf_model_type(tmp_path / "empty")
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="'gpt2' model; sppbench prunes .*llama"):
        models.hf_model_type(gpt)
    (gpt / "config.json").write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        models.hf_model_type(gpt)


def test_hf_spec_loads_a_local_llama(tmp_path):
    folder = miniatures.write_hf_causal_lm(tmp_path / "llm", hidden=32, layers=1, intermediate=64)
    model, tok = models.hf_causal_lm(folder)
    ids = tok("a short sentence", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tok)
    from sppbench.families import detect

    assert detect(model).name == "hf-llama"


def test_open_clip_spec_needs_weights_and_loads_a_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="needs its weights"):
        models.open_clip_model("sppbench-rehearsal-clip", None)
    with pytest.raises(DataError, match="does not exist"):
        models.open_clip_model("sppbench-rehearsal-clip", str(tmp_path / "missing.pt"))
    f = miniatures.write_open_clip_weights("sppbench-rehearsal-clip", tmp_path / "c.pt", seed=1)
    model = models.open_clip_model("sppbench-rehearsal-clip", str(f))
    saved = torch.load(f)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set"):
        models.open_clip_model("ViT-B-32", "openai")


@pytest.mark.parametrize("argv, says", [
    (["search", "--model", "timm:resnet18", "--out", "p.json"], "cannot prune"),
    (["search", "--model", "open_clip:ViT-B-32", "--out", "p.json"], "runs in clip-table"),
    (["search", "--model", "timm:no_such_net", "--out", "p.json"], "timm has no model"),
    (["paper-check", "--models", "hf:/no/such/folder", "--min-gpus", "0"], "does not exist"),
    (["paper-check", "--models", "timm:test_vit", "--weights", "/no/such.pth", "--min-gpus", "0"],
     "weights file /no/such.pth does not exist"),
    (["clip-table", "--model", "open_clip:not-a-model", "--data-root", "/nowhere"], "open_clip has no model"),
    (["llm-table", "--model", "hf:/no/such/folder"], "does not exist"),
    (["llm-table", "--model", "llama-2-7b"], "a local Hugging Face causal LM is hf:<folder>"),
    (["llm-table", "--methods", "bogus"], "unknown LLM method"),
])
def test_cli_model_spec_errors_are_one_line(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_imagenet_layout_task_from_a_timm_spec_uses_the_asked_split_sizes(tmp_path):
    from sppbench.tasks.vision import get_task

    root = miniatures.write_imagenet_miniature(tmp_path / "inet", classes=3, train_per_class=6, val_per_class=4)
    w = miniatures.write_timm_weights("test_vit", tmp_path / "w.pth")
    task = get_task("timm:test_vit", str(root), weights=str(w), n_val=6, n_refit=3, n_test=5)
    assert task.name == "timm:test_vit" and task.img_size == 160 and task.num_classes == 3
    assert task.info["val_from_train"] == 6 and task.info["refit_images"] == 3 and task.info["test_images"] == 5
    assert task.info["train_images"] == 3 * (6 - 2) and task.info["weights"] == str(w)
    x, y = next(iter(task.loader("test")))
    assert x.shape[1:] == (3, 160, 160) and len(y) == 5
    with pytest.raises(DataError, match="more than the 6 images per class"):
        get_task("timm:test_vit", str(root), weights=str(w), n_val=18)
    with pytest.raises(UnsupportedModelError, match="applies to paper models"):
        get_task("embedded-vit", weights=str(w))


def test_constants_are_automatic_on_real_models_and_given_ones_stay():
    from sppbench import methods
    from sppbench.studies.vision_table import VisionTableConfig, constants_source, spp_constants

    auto = VisionTableConfig(model="timm:test_vit")
    assert spp_constants(auto) is None and constants_source(auto) == "auto"
    given = VisionTableConfig(model="timm:test_vit", kappa=1.0, alpha=0.1, nu=10.0, lam=0.5)
    assert spp_constants(given) == {"kappa": 1.0, "alpha": 0.1, "nu": 10.0, "lam": 0.5}
    assert constants_source(given) == "given"
    with pytest.raises(SppBenchError, match="all four .* or none"):
        spp_constants(VisionTableConfig(model="timm:test_vit", kappa=1.0))
    assert constants_source(VisionTableConfig()) == "tuned" and spp_constants(VisionTableConfig()) is not None
    # spp-official: the released constants on real models, the step-scaled rule on the stand-ins
    real = methods.official_constants("deit_small_patch16_224", 50000)
    assert {k: real[k] for k in ("kappa", "lam", "alpha")} == {"kappa": 1.0, "lam": 3.0, "alpha": 1e-3}
    assert "note" not in real
    assert "only masks the loss pushes above 1 can enter" in methods.official_constants("timm:x", 100)["note"]
    # on the stand-ins: the lr at which a held mask's V reaches lambda half-way on the released schedule
    emb = methods.official_constants("embedded-vit", 160)["alpha"]
    assert official_held_v(emb, 160, 80) == pytest.approx(3.0) and 1.5 * 3.0 / 160 < emb < 2 * 3.0 / 160


def test_the_tables_automatic_constants_are_the_ones_search_derives_itself():
    """A table derives the constants once (first seed's batches); they equal search(constants="auto")'s."""
    import torch.nn.functional as F

    import sppbench
    from conftest import synthetic_batches, tiny_vit
    from sppbench.studies.common import derive_constants

    model = tiny_vit()
    batches = synthetic_batches(model, 32, n=3)
    m = sppbench.attach_masks(model)
    consts, info = derive_constants(m, batches, F.cross_entropy, 20)
    assert info["batches"] == 2 and info["implied"]["threshold"] == pytest.approx(0.9)
    path = sppbench.search(m, batches, F.cross_entropy, steps=20)
    assert {k: path.config[k] for k in ("kappa", "alpha", "nu", "lam")} == consts
    assert all(bool((p == 1).all()) for p in m.mask_parameters().values())  # the measurement left the masks at 1


def test_a_rehearsal_record_says_so_and_the_report_refuses_it(tmp_path, monkeypatch):
    import pandas as pd

    from sppbench.report.build import RecordError, _check
    from sppbench.studies.common import REHEARSAL_ENV, write_record
    from sppbench.studies.records import load_record

    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    monkeypatch.setenv(REHEARSAL_ENV, "unit test")
    folder = write_record("vision_table", {"model": "timm:test_vit"}, None, pd.DataFrame([{"model": "x", "a": 1}]),
                          {"label": "x"})
    rec = load_record(folder)
    assert "DRESS REHEARSAL" in rec["metrics"]["info"]["rehearsal"] and "unit test" in rec["metrics"]["info"]["rehearsal"]
    with pytest.raises(RecordError, match="dress-rehearsal record"):
        _check(rec)
    monkeypatch.delenv(REHEARSAL_ENV)
    plain = load_record(write_record("vision_table", {"model": "x"}, None, pd.DataFrame([{"model": "x"}]), {}))
    assert "rehearsal" not in plain["metrics"]["info"] and _check(plain)
