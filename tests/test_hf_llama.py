"""The Hugging Face LLaMA-style family (LlamaForCausalLM / Qwen2 / Mistral, grouped-query attention, RoPE, gated MLP):
masks, exact compression (empty groups included), exact costs, structural units, generation with a cache, the file
format and unsupported configs, on tiny random-init models."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sppbench
from sppbench import methods
from sppbench.families.hf_llama import MaskedLlamaAttention, MaskedLlamaMLP, PrunedLlamaAttention

from conftest import _randomize, mask_vs_zeroed_unit, unit_coverage
from test_masks_compress import random_keep

transformers = pytest.importorskip("transformers")
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaModel, MistralConfig, MistralForCausalLM,  # noqa: E402
                          Qwen2Config, Qwen2ForCausalLM)

VOCAB, N = 128, 24
EMPTY = {"blocks.0.attn.v": True, "blocks.1.attn.qk": True, "blocks.1.mlp": True}
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def tiny(kind: str = "llama", impl: str = "sdpa", seed: int = 0, **overrides) -> nn.Module:
    """A tiny random-init model with every parameter (norms, biases) randomized, in eval mode."""
    cfg = {**BASE, "attn_implementation": impl, **overrides}
    if kind == "qwen2":  # q/k/v biases, no o_proj bias
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    elif kind == "llama-bias":  # attention_bias (o_proj too) and mlp_bias, llama3 RoPE scaling
        model = LlamaForCausalLM(LlamaConfig(**cfg, attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3_ROPE))
    elif kind == "llama-base":
        model = LlamaModel(LlamaConfig(**cfg))
    else:
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return _randomize(model, seed)


CASES = [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "eager"), ("qwen2", "sdpa")]


@pytest.fixture(params=CASES, ids=[f"{k}-{i}" for k, i in CASES])
def case(request):
    return request.param


def batch(seed: int = 1):
    """Token ids (2, 16): row 0 left-padded by 5 tokens, row 1 full."""
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :5] = 0
    return ids, mask


@torch.no_grad()
def run(model, ids, mask=None):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_all_ones_masks_leave_outputs_unchanged(case):
    model = tiny(*case)
    ids, mask = batch()
    ref, ref_plain = run(model, ids, mask), run(model, ids)
    layer0 = model.model.layers[0]
    sa, mlp = layer0.self_attn, layer0.mlp
    m = sppbench.attach_masks(model)
    assert m.family.name == "hf-llama"
    assert _max_diff(run(m, ids, mask), ref) <= 1e-5 and _max_diff(run(m, ids), ref_plain) <= 1e-5
    assert isinstance(layer0.self_attn, MaskedLlamaAttention) and isinstance(layer0.mlp, MaskedLlamaMLP)
    assert [(g.name, g.kind, g.pool, g.size, g.layer) for g in m.groups[:3]] == [
        ("blocks.0.attn.qk", "qk", "attn", 8, 0), ("blocks.0.attn.v", "v", "attn", 16, 0),
        ("blocks.0.mlp", "mlp", "mlp", 96, 0)]
    assert len(m.groups) == 6 and m.info["tokens"] == 64 and m.info["architecture"]["class"] == type(model).__name__
    json.dumps(m.info)
    for group in ("blocks.1.attn.qk", "blocks.0.attn.v", "blocks.1.mlp"):  # masks matter
        m.reset_masks()
        with torch.no_grad():
            m.mask_parameters()[group][:3] = 0
        assert _max_diff(run(m, ids, mask), ref) > 1e-4, group
    plain = m.detach_masks()
    assert plain.model.layers[0].self_attn is sa and plain.model.layers[0].mlp is mlp
    assert torch.equal(run(plain, ids, mask), ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_compressed_equals_binary_masked(case, seed):
    m = sppbench.attach_masks(tiny(*case))
    ids, mask = batch()
    for empty in (None, EMPTY):
        keep = random_keep(m, seed, empty)
        m.set_masks(keep)
        small = sppbench.compress(m, keep)
        assert _max_diff(run(small, ids, mask), run(m, ids, mask)) <= 1e-5, empty
        assert _max_diff(run(small, ids), run(m, ids)) <= 1e-5, empty  # no attention mask: causal only
        for i, layer in enumerate(small.model.layers):
            sa = layer.self_attn
            assert isinstance(sa, PrunedLlamaAttention) and sa.scaling == pytest.approx(16 ** -0.5)
            assert sa.v_dim == int(keep.masks[f"blocks.{i}.attn.v"].sum())
            assert layer.mlp.gate_proj.out_features == int(keep.masks[f"blocks.{i}.mlp"].sum())
    layers = small.model.layers
    assert layers[0].self_attn.o_proj.in_features == 0 and isinstance(layers[0].input_layernorm, nn.Identity)
    assert layers[1].self_attn.qk_dim == 0 and layers[1].self_attn.q_proj.out_features == 0
    assert layers[1].mlp.down_proj.in_features == 0 and isinstance(layers[1].post_attention_layernorm, nn.Identity)


@pytest.mark.parametrize("kind", ["llama-bias", "llama-base"])
def test_compression_with_biases_rope_scaling_and_the_base_model(kind):
    model = tiny(kind, "sdpa")
    ids, mask = batch()
    ref = run(model, ids, mask)
    m = sppbench.attach_masks(model, input_size=N)
    assert _max_diff(run(m, ids, mask), ref) <= 1e-5
    for seed, empty in ((2, None), (3, EMPTY)):
        keep = random_keep(m, seed, empty)
        m.set_masks(keep)
        small = sppbench.compress(m, keep)
        assert _max_diff(run(small, ids, mask), run(m, ids, mask)) <= 1e-5
        x = _full_input()
        assert sppbench.core.measure.params(small) == keep.params
        assert abs(sppbench.core.measure.macs(small, x) - keep.macs) <= 0.01 * keep.macs


def test_nested_keep_sets_from_a_path():
    m = sppbench.attach_masks(tiny("qwen2", "sdpa"))
    path = methods.magnitude_path(m)
    hi, lo = path.keep(fraction=0.7), path.keep(fraction=0.4)
    assert lo.issubset(hi) and lo.params <= hi.params and lo.macs <= hi.macs
    ids, mask = batch()
    for keep in (hi, lo):
        m.set_masks(keep)
        assert _max_diff(run(sppbench.compress(m, keep), ids, mask), run(m, ids, mask)) <= 1e-5


def _full_input(n: int = N):
    return (torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(3)),)


def test_costs_are_exact(case):
    model = tiny(*case)
    x = _full_input()
    m = sppbench.attach_masks(model, input_size=N)
    assert m.info["tokens"] == N
    assert m.cost_model.cost({g.name: g.size for g in m.groups}) == (sppbench.core.measure.params(m),
                                                                      sppbench.core.measure.macs(m, x))
    for seed, empty in ((0, None), (3, EMPTY), (4, {g.name: True for g in m.groups})):
        keep = random_keep(m, seed, empty)
        small = sppbench.compress(m, keep)
        assert sppbench.core.measure.params(small) == keep.params
        measured = sppbench.core.measure.macs(small, x)
        assert abs(measured - keep.macs) <= 0.01 * keep.macs, (seed, measured, keep.macs)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sppbench.attach_masks(tiny(*case), input_size=65)


@pytest.mark.parametrize("kind,impl,tied", [("llama", "eager", False), ("qwen2", "sdpa", False), ("llama", "sdpa", True)])
def test_save_load_round_trip(kind, impl, tied, tmp_path):
    model = tiny(kind, impl, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    m = sppbench.attach_masks(model, input_size=N)
    keep = random_keep(m, 5, EMPTY)
    small = sppbench.compress(m, keep)
    folder = sppbench.save_pruned(small, tmp_path / "pruned")
    loaded = sppbench.load_pruned(folder)
    assert type(loaded) is type(model) and loaded.config._attn_implementation == impl
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ids, mask = batch()
    assert torch.equal(run(loaded, ids, mask), run(small.eval(), ids, mask))
    assert sppbench.core.measure.params(loaded) == keep.params
    spec = json.loads((folder / "spec.json").read_text())
    assert spec["format"] == "sppbench.pruned/1" and spec["family"] == "hf-llama" and spec["input_size"] == N
    assert spec["architecture"]["class"] == type(model).__name__ and len(spec["blocks"]) == 2
    assert spec["blocks"][0]["v"] == [] and spec["blocks"][1]["qk"] == [] and spec["blocks"][1]["mlp"] == []
    (ids,) = m.family.example_inputs(spec, torch.Generator().manual_seed(0))  # what save_pruned checked
    assert ids.shape == (2, N) and ids.dtype == torch.long and int(ids.max()) < VOCAB
    spec["blocks"] = spec["blocks"][:-1]
    with pytest.raises(sppbench.SpecError, match="blocks"):
        m.family.build(spec)
    (folder / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(sppbench.SpecError):
        sppbench.load_pruned(folder)


def test_generation_with_a_cache_matches_the_masked_model():
    m = sppbench.attach_masks(tiny("llama", "sdpa"))
    keep = random_keep(m, 1, {"blocks.0.attn.v": True, "blocks.1.attn.qk": True})  # layer 0 caches placeholders
    m.set_masks(keep)
    small = sppbench.compress(m, keep)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = m.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = small.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(a, b)
        out = small(b[:, :-1], use_cache=True)
        step = small(b[:, -1:], cache=out.cache).logits[:, -1]
        assert _max_diff(step, small(b).logits[:, -1]) <= 1e-5


def test_units_cover_every_weight_once_and_zeroing_a_unit_equals_masking_its_entry():
    m = sppbench.attach_masks(tiny("qwen2", "eager"))
    ids, mask = batch()
    units = m.family.unit_slices(m)
    counts = unit_coverage(units)
    expected = set()
    for layer in m.model.model.layers:
        a, mlp = layer.self_attn.attn, layer.mlp.mlp
        expected |= {id(p) for lin in (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj) for p in lin.parameters()}
        expected |= {id(a.o_proj.weight), id(mlp.down_proj.weight)}
    assert set(counts) == expected
    for c in counts.values():
        assert torch.equal(c, torch.ones_like(c))
    for name, entry in (("blocks.1.attn.qk", 2), ("blocks.0.attn.v", 5), ("blocks.1.mlp", 7)):
        masked, zeroed = mask_vs_zeroed_unit(m, units[name], name, entry, lambda: run(m, ids, mask))
        assert _max_diff(masked, zeroed) < 1e-5, name


def _next_token_loss(out, labels):
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def test_a_short_search_gives_a_path():
    m = sppbench.attach_masks(tiny("llama", "sdpa"), input_size=N)
    ids = _full_input()[0]
    path = sppbench.search(m, [((ids,), ids)], _next_token_loss, steps=3, kappa=5, alpha=0.5, nu=50, lam=0.05)
    keep = path.keep(fraction=0.5)
    m.set_masks(keep)
    small = sppbench.compress(m, keep)
    assert _max_diff(run(small, ids), run(m, ids)) <= 1e-5 and sppbench.core.measure.params(small) == keep.params


def test_unsupported_configs_fail_clearly():
    mistral = dict(BASE, num_hidden_layers=1)
    with pytest.raises(sppbench.UnsupportedModelError, match="sliding"):
        sppbench.attach_masks(MistralForCausalLM(MistralConfig(**mistral, sliding_window=16)))
    assert sppbench.attach_masks(MistralForCausalLM(MistralConfig(**mistral, sliding_window=None))).family.name == "hf-llama"
    with pytest.raises(sppbench.UnsupportedModelError, match="sliding"):
        sppbench.attach_masks(Qwen2ForCausalLM(Qwen2Config(**mistral, use_sliding_window=True, sliding_window=16,
                                                           max_window_layers=0)))
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 32}
    with pytest.raises(sppbench.UnsupportedModelError, match="rope_type"):
        sppbench.attach_masks(LlamaForCausalLM(LlamaConfig(**mistral, rope_parameters=yarn)))
    model = tiny("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(sppbench.UnsupportedModelError, match="attn_implementation"):
        sppbench.attach_masks(model)
    model = tiny("llama", "sdpa")
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(sppbench.UnsupportedModelError, match="tied"):
        sppbench.attach_masks(model)
    model = tiny("llama", "sdpa")
    m = sppbench.attach_masks(model)
    with pytest.raises(sppbench.UnsupportedModelError, match="already"):
        sppbench.attach_masks(model)
    small = sppbench.compress(m, random_keep(m, 0))
    with pytest.raises(sppbench.UnsupportedModelError, match="already"):
        sppbench.attach_masks(small)
