"""The reproduce session's settings keep issue 18's statistical floor (seeds, samples, resamples, no fine-tune
column that lowers accuracy) and name only methods and knobs that exist."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

NOXFILE = Path(__file__).parent.parent / "noxfile.py"


def _reproduce_params() -> dict:
    """REPRODUCE_PARAMS, with the module-level literals it names (MODEL_SETTINGS) substituted."""
    tree = ast.parse(NOXFILE.read_text())
    assigns = {n.targets[0].id: n.value for n in tree.body
               if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}

    class Inline(ast.NodeTransformer):
        def visit_Name(self, node):
            return assigns[node.id] if node.id in assigns else node

    return ast.literal_eval(Inline().visit(assigns["REPRODUCE_PARAMS"]))


def test_every_notebook_named_exists():
    params = _reproduce_params()
    books = {p.name for p in (NOXFILE.parent / "notebooks").glob("[0-9]*.ipynb")}
    assert set(params) <= books


def test_vision_table_keeps_the_statistical_floor():
    from sppbench import methods

    from sppbench.studies import stats

    p = _reproduce_params()["10_vision_table.ipynb"]
    assert p["seeds"] >= stats.MIN_SEEDS_FOR_A_CLAIM and p["resamples"] >= 2000  # else no row could make a claim
    assert p["n_test"] >= 5000            # the whole 10,000-image split, or at least 5,000 when time forces it
    assert all(n >= 5000 for n in p.get("model_n_test", {}).values())
    assert p["n_refit"] == 3000           # the dense head's own fit set (no fit-set advantage for pruned rows)
    assert p["finetune_steps"] == 0       # no fine-tune column until one recovers accuracy
    assert p["lasso_trials"] >= 5         # Lasso brackets each budget or refuses it
    from sppbench.studies.vision_table import ORDER_ARMS, QUESTION, VisionTableConfig

    for model in p["models"]:  # every model's list is a valid table (the order arms after spp)
        VisionTableConfig(model=model, methods=tuple(p.get("model_methods", {}).get(model, p["methods"]))).resolved()
    headline = set(p["methods"])  # the central question in full on the models that run the default list
    assert {m for m, _ in QUESTION} <= headline and set(ORDER_ARMS) <= headline
    for model, by_method in p.get("model_settings", {}).items():
        for m, knob in by_method.items():
            assert set(knob) == {methods.TUNING_KNOBS[m]}, (model, m, knob)


def test_clip_and_llm_tables_keep_the_statistical_floor():
    p = _reproduce_params()
    clip = p["20_clip_retrieval.ipynb"]
    assert clip["seeds"] >= 3 and clip["resamples"] >= 2000 and clip["finetune_steps"] == 0
    assert clip["refit_steps"] == 0  # the re-fit is the dense projections' own recipe (no advantage for pruned rows)
    llm = p["30_llm_zero_shot.ipynb"]
    assert len(llm["seeds"]) >= 3 and llm["resamples"] >= 2000 and llm["eval_windows"] >= 128


def test_the_llm_table_runs_every_zero_shot_task_and_the_peers():
    from sppbench.tasks import zeroshot
    from sppbench.methods.llm import LLM_METHODS

    llm = _reproduce_params()["30_llm_zero_shot.ipynb"]
    assert tuple(llm["zero_shot_tasks"]) == zeroshot.TASKS  # the noxfile's copy of the list agrees
    assert 30 <= llm["zero_shot_docs"]                      # a subset that still gives a per-task SE under 0.1
    assert {"magnitude", "wanda", "ria", "spp-ria", "sparsegpt"} <= set(llm["methods"]) <= set(LLM_METHODS)


def test_the_seed_study_reads_a_vision_table_that_runs_before_it_with_its_methods_and_seeds():
    p = _reproduce_params()
    seed = p["50_seed_stability.ipynb"]
    if seed.get("source") != "vision_table":
        return
    vt = p["10_vision_table.ipynb"]
    assert "10_vision_table.ipynb" < "50_seed_stability.ipynb"  # notebooks run in name order
    assert seed["model"] in vt["models"] and vt["seeds"] >= 3
    ran = vt.get("model_methods", {}).get(seed["model"])
    assert ran is None or set(seed["methods"]) <= set(ran)
    assert "lasso" not in seed["methods"] or ran is None or "lasso-rank" in ran  # Lasso's order: lasso-rank


@pytest.mark.parametrize("book", sorted(_reproduce_params()))
def test_reproduce_parameters_are_notebook_parameters(book):
    import json

    nb = json.loads((NOXFILE.parent / "notebooks" / book).read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    names = {t.targets[0].id for t in ast.parse("".join(cell["source"])).body if isinstance(t, ast.Assign)}
    assert set(_reproduce_params()[book]) <= names


def _literal(name: str) -> dict:
    tree = ast.parse(NOXFILE.read_text())
    return ast.literal_eval(next(n.value for n in tree.body if isinstance(n, ast.Assign)
                                 and isinstance(n.targets[0], ast.Name) and n.targets[0].id == name))


@pytest.mark.parametrize("table", ["REPRODUCE_PARAMS", "NBVAL_TINY"])
def test_every_parameter_given_is_a_parameter_of_its_notebook(table):
    """A name papermill injects that the notebook does not have would be silently ignored."""
    params = _reproduce_params() if table == "REPRODUCE_PARAMS" else _literal(table)
    for book, over in params.items():
        nb = json.loads((NOXFILE.parent / "notebooks" / book).read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        names = {t.id for n in ast.parse("".join(cell["source"])).body if isinstance(n, ast.Assign) for t in n.targets}
        assert set(over) <= names, (table, book, set(over) - names)


def test_the_tiny_notebook_run_never_trains_the_swin_stand_in():
    """`nox -s tests` stays within minutes on a fresh machine: the Swin stand-in (about 7 minutes to train once)
    is left to `nox -s tests_slow` and reproduce."""
    tiny = _literal("NBVAL_TINY")
    for path in sorted((NOXFILE.parent / "notebooks").glob("[0-9]*.ipynb")):
        nb = json.loads(path.read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        values = {t.id: ast.literal_eval(n.value) for n in ast.parse("".join(cell["source"])).body
                  if isinstance(n, ast.Assign) for t in n.targets}
        values.update(tiny.get(path.name, {}))
        for key in ("model", "models"):
            v = values.get(key, [])
            assert "embedded-swin" not in ([v] if isinstance(v, str) else v), (path.name, key, v)
