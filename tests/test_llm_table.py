"""The LLM table on a tiny random-init LLaMA with a word tokenizer and synthetic text: calibration seeds,
per-window NLL records, paired perplexity ratios against RIA and Wanda (no assets needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sppbench.studies.llm_table import LLMTableConfig, parse_nll_key, run_llm_table, sanity_checks

WORDS = ("the a of and to in is was for on with as by at from that it an be this are which or his have had one "
         "first new time year people city state world war music film game river king church school").split()


def _text(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


def tiny_setup():
    """A tiny random-init LLaMA and a word-level tokenizer over WORDS (synthetic text: ``_text``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size + 1, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    return model, tok


def tiny_table(**kw):
    model, tok = tiny_setup()
    cfg = LLMTableConfig(**{**dict(methods=("magnitude", "wanda", "ria", "spp-ria"), patterns=("0.5",), n_samples=4,
                                   seqlen=32, eval_seqlen=32, eval_windows=10, seeds=(0, 1, 2), spp_steps=2,
                                   structured_methods=(), resamples=200, batch_size=4), **kw})
    return run_llm_table(cfg, model=model, tokenizer=tok, calib_text=_text(1500, 1), test_text=_text(1500, 2),
                         progress=False)


@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


def test_seeds_records_and_paired_ratios(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    res = tiny_table()
    t, s = res["table"], res["summary"]
    counts = t.groupby("method").size().to_dict()
    assert counts == {"dense": 1, "magnitude": 1, "wanda": 3, "ria": 3, "spp-ria": 3, "ria-perturbed": 3}
    # different calibration draws give different Wanda masks, hence different perplexities
    assert t[t["method"] == "wanda"]["perplexity"].nunique() == 3
    # every run's per-window NLLs are kept, and their mean gives the row's perplexity
    assert len(res["nll"]) == len(t)
    for _, r in t.iterrows():
        key = f"{r['model']}|{r['method']}|{r['pattern']}|{r['seed']}"
        assert res["nll"][key].shape == (10,)
        assert math.exp(res["nll"][key].mean()) == pytest.approx(r["perplexity"], rel=1e-9)
    saved = np.load(res["record"] / "nll.npz")
    assert sorted(saved.files) == sorted(res["nll"]) and parse_nll_key(saved.files[0])["model"] == "smollm2"
    # summary: mean and sample sd over seeds; ratios against both references (never against itself)
    row = s[s["method"] == "spp-ria"].iloc[0]
    assert row["seeds"] == 3 and row["perplexity_sd"] == pytest.approx(
        t[t["method"] == "spp-ria"]["perplexity"].std(ddof=1))
    for ref in ("ria", "wanda"):
        a = np.stack([res["nll"][f"smollm2|spp-ria|{row['pattern']}|{k}"] for k in (0, 1, 2)]).mean(0)
        b = np.stack([res["nll"][f"smollm2|{ref}|{row['pattern']}|{k}"] for k in (0, 1, 2)]).mean(0)
        assert row[f"ratio_vs_{ref}"] == pytest.approx(math.exp((a - b).mean()), rel=1e-9)
        assert row[f"ratio_vs_{ref}_lo"] <= row[f"ratio_vs_{ref}"] <= row[f"ratio_vs_{ref}_hi"]
        assert row[f"verdict_vs_{ref}"] in ("better", "worse", "tie")
    ria = s[s["method"] == "ria"].iloc[0]
    assert isinstance(ria["verdict_vs_wanda"], str) and not isinstance(ria.get("verdict_vs_ria"), str)
    assert "ratio_vs_dense" in s and res["info"]["statistics"]["windows"] == 10
    assert set(res["info"]["ria_control"]["ratios"]["unstructured 50%"]) >= {"spp_ria_over_ria_perturbed", "verdict"}


def test_sanity_flags_a_pruned_model_better_than_dense():
    import pandas as pd

    ok = pd.DataFrame([{"method": "ria", "pattern": "2:4", "verdict_vs_dense": "worse", "ratio_vs_dense": 3.0,
                        "ratio_vs_dense_lo": 2.5, "ratio_vs_dense_hi": 3.5}])
    assert sanity_checks(ok) == []
    bad = ok.assign(verdict_vs_dense="better", ratio_vs_dense=0.9, ratio_vs_dense_lo=0.85, ratio_vs_dense_hi=0.95)
    assert sanity_checks(bad)[0]["check"] == "pruned_beats_dense"


@pytest.mark.parametrize("bad", [{"seeds": ()}, {"seeds": (0, 0)}, {"eval_windows": 0}, {"eval_sampling": "x"},
                                 {"resamples": 0}])
def test_bad_settings(bad):
    with pytest.raises(ValueError):
        LLMTableConfig(**bad).resolved()
