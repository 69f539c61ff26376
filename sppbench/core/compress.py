"""Physical compression and the pruned-model file format (JSON spec + safetensors, no pickles)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import OutputExistsError, SpecError
from ..fileio import atomic_write_text
from .family import get as get_family
from .masks import MaskedModel
from .path import KeepSet

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "model.safetensors"


def compress(m: MaskedModel, keep: KeepSet) -> nn.Module:
    """A new plain model of the same family with the pruned rows / columns physically removed.

    It computes what ``m`` computes with ``m.set_masks(keep)`` (max abs diff <= 1e-5 in float32),
    and carries its architecture spec in ``.sppbench_spec`` for ``save_pruned``. ``m`` is unchanged.
    """
    if not isinstance(m, MaskedModel):
        raise TypeError("compress() takes the MaskedModel returned by sppbench.attach_masks(model)")
    if not isinstance(keep, KeepSet):
        raise TypeError("compress() takes a KeepSet, e.g. path.keep(fraction=0.5)")
    sizes = {g.name: g.size for g in m.groups}
    got = {n: int(t.numel()) for n, t in keep.masks.items()}
    if sizes != got:
        raise ValueError("this keep-set was read off a path of a different architecture (its mask groups differ "
                         "from the model's); search this model and read the keep-set off its path")
    small = m.family.compress(m, keep)
    small.train(m.model.training)
    for p in small.parameters():
        p.requires_grad_(True)
    return small


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tied_names(model: nn.Module) -> dict[str, str]:
    """Parameter names that are another name of an earlier parameter (a tied lm_head -> the embedding)."""
    first: dict[int, str] = {}
    tied = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[n] = first[id(p)]
        else:
            first[id(p)] = n
    return tied


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: a tied parameter once, under its first name (safetensors refuses shared memory)."""
    tied = tied_names(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in tied}


def save_pruned(model: nn.Module, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a compressed model as ``spec.json`` + ``model.safetensors`` in ``folder``.

    The folder is written in a temporary sibling, verified by rebuilding the model from it and
    comparing outputs, and only then moved into place; an existing folder is kept unless
    ``overwrite=True``.
    """
    from safetensors.torch import save_file

    spec = getattr(model, "sppbench_spec", None)
    if spec is None:
        raise SpecError("save_pruned() takes a model returned by sppbench.compress() or load_pruned() "
                        "(it carries the architecture spec needed to rebuild it)")
    if spec.get("unsavable"):
        raise SpecError(spec["unsavable"])
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise OutputExistsError(f"{folder} already exists and is not empty; choose another folder or pass overwrite=True "
                                "(--overwrite on the command line)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        weights = _state_dict(model)
        save_file(weights, str(tmp / WEIGHTS_FILE))
        full = dict(spec)
        full["weights_sha256"] = _sha256(tmp / WEIGHTS_FILE)
        full["params"] = sum(p.numel() for p in model.parameters())
        full["tied"] = tied_names(model)
        atomic_write_text(tmp / SPEC_FILE, json.dumps(full, indent=1))
        _verify(model, tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            os.replace(folder, old / "x")
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@torch.no_grad()
def _verify(model: nn.Module, folder: Path) -> None:
    """Rebuild from the written files and check that it computes what ``model`` computes."""
    rebuilt = load_pruned(folder)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    x = get_family(model.sppbench_spec["family"]).example_inputs(model.sppbench_spec, torch.Generator().manual_seed(0))
    if x is None:
        return
    x = tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in x)
    was = model.training
    model.eval()
    try:
        a = _tensors(model(*x))
        b = _tensors(rebuilt.to(device=device, dtype=dtype)(*x))
    finally:
        model.train(was)
    diff = max((u - v).abs().max().item() for u, v in zip(a, b))
    top = max(u.abs().max().item() for u in a)
    tol = 1e-5 * max(1.0, top) if dtype == torch.float32 else 1e-2 * max(1.0, top)
    if not diff <= tol:
        raise SpecError(f"the model rebuilt from its spec differs from the model being saved (max abs diff {diff:.3g}); "
                        "this architecture has a setting the spec does not capture: please report it")


def _tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (a tensor, a tuple, a dict or a transformers ModelOutput)."""
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def load_pruned(folder: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a pruned model from ``spec.json`` and load ``model.safetensors`` strictly (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    spec_file, weights_file = folder / SPEC_FILE, folder / WEIGHTS_FILE
    if not spec_file.is_file() or not weights_file.is_file():
        raise SpecError(f"{folder} is not a pruned model folder: it needs {SPEC_FILE} and {WEIGHTS_FILE} "
                        "(written by sppbench.save_pruned)")
    try:
        spec = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{spec_file} is not valid JSON ({exc}); the file is corrupt: save the model again") from exc
    if not isinstance(spec, dict) or "family" not in spec or "format" not in spec:
        raise SpecError(f"{spec_file} is not a sppbench pruned-model spec (no 'format' / 'family')")
    expected = spec.get("weights_sha256")
    if expected and _sha256(weights_file) != expected:
        raise SpecError(f"{weights_file} does not match {spec_file} (checksum differs): the weights were changed, "
                        "truncated or come from another model; save the pruned model again")
    family = get_family(spec["family"])
    try:
        model = family.build(spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"{spec_file} does not describe a buildable {spec['family']} model ({exc!r})") from exc
    try:
        weights = load_file(str(weights_file), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SpecError(f"{weights_file} cannot be read ({exc}); the file is corrupt: save the model again") from exc
    tied = dict(spec.get("tied") or {})
    if tied != tied_names(model):
        raise SpecError(f"{spec_file} says tied weights {tied} but the rebuilt model ties {tied_names(model)}; the spec "
                        "does not match this sppbench version: save the pruned model again")
    own = {k: v for k, v in model.state_dict().items() if k not in tied}
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(s for s in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            "shape mismatch " + ", ".join(f"{k}: spec {tuple(own[k].shape)} vs file {tuple(weights[k].shape)}"
                                          for k in wrong[:3]) if wrong else "") if s)
        raise SpecError(f"the weights in {weights_file} do not match the architecture in {spec_file} ({detail}); "
                        "the two files come from different models: save the pruned model again")
    result = model.load_state_dict(weights, strict=False)  # strict except for tied names, loaded with their twin
    if set(result.missing_keys) - set(tied) or result.unexpected_keys:  # pragma: no cover - checked above
        raise SpecError(f"{weights_file} does not match {spec_file}: missing {result.missing_keys[:3]}")
    model.to(map_location)
    model.eval()
    return model
