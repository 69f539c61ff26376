"""An independent check of sppbench's Wanda and SparseGPT: llmcompressor's own WandaPruningModifier and
SparseGPTModifier on the same model and the same calibration windows, Linear by Linear (issue 19, point 3).

llmcompressor pins older torch / transformers, so it is not a project dependency; install it beside them with
--no-deps (it worked with torch 2.14.1 and transformers 5.24-5.25):

    pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0 && pip install loguru py-cpuinfo nvidia-ml-py
    python tools/check_llmcompressor.py [--methods wanda sparsegpt] [--patterns 2:4 0.5]
        [--out results/bench/llmcompressor_check.json]

Per method, pattern and Linear it reports the share of weights on which the two keep-sets agree, the Jaccard index
of the pruned sets, both models' perplexities on the same held-out windows, and the perplexity of THEIR masks on
OUR dense weights (Wanda: separates the masks from anything their save / reload changes). Both prune sequentially
(each layer's statistics from the already-pruned layers before it). Wanda scores |W| * ||x||_2 per weight inside
each output row (unstructured) or each group of M inputs (N:M), so the masks should agree up to ties and
floating-point order. SparseGPT's masks follow its own weight updates, so they agree less; its perplexity is the
check (block 128, dampening 0.01 of the mean Hessian diagonal on both sides).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sppbench.tasks import llm_data  # noqa: E402
from sppbench.methods.llm import SPARSEGPT_DEFAULTS, decoder_layers, prune_llm  # noqa: E402


def linear_masks(model) -> dict[str, torch.Tensor]:
    layers, _ = decoder_layers(model)
    return {f"{i}.{n}": (m.weight.detach() != 0) for i, layer in enumerate(layers)
            for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _linears(model) -> list:
    layers, _ = decoder_layers(model)
    return [m for layer in layers for _, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]


def theirs(model, tokenizer, ids: torch.Tensor, pattern: str, method: str = "wanda"):
    """llmcompressor's Wanda on a copy of ``model`` saved to a folder (its oneshot reads the config from the
    model's path); returns (the pruned model, seconds)."""
    import tempfile

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

    structure = pattern if ":" in pattern else "0:0"
    sparsity = 0.5 if ":" in pattern else float(pattern)
    if method == "wanda":
        recipe = WandaPruningModifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"],
                                      ignore=["re:.*lm_head"])
    else:
        recipe = SparseGPTModifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"],
                                   ignore=["re:.*lm_head"], block_size=SPARSEGPT_DEFAULTS["blocksize"],
                                   dampening_frac=SPARSEGPT_DEFAULTS["damp"])
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        t0 = time.perf_counter()
        pruned = oneshot(model=folder, processor=folder, dataset=ds, recipe=recipe, num_calibration_samples=len(ids),
                         max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential",
                         sequential_targets=["LlamaDecoderLayer"])
        return pruned, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"], choices=["wanda", "sparsegpt"])
    ap.add_argument("--patterns", nargs="+", default=["2:4", "0.5"])
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--out", default="results/bench/llmcompressor_check.json")
    a = ap.parse_args()
    import llmcompressor

    torch.manual_seed(0)
    model, tok = llm_data.smollm2()
    calib = llm_data.calibration_tokens(tok, n_samples=a.n_samples, seqlen=a.seqlen, seed=0)
    test = llm_data.perplexity_tokens(tok, seqlen=a.seqlen, max_windows=a.eval_windows)

    def ppl(m):
        return llm_data.perplexity_from_nll(llm_data.window_nll(m, test.ids, batch_size=8))

    out = {"what": "sppbench's Wanda / SparseGPT vs llmcompressor's WandaPruningModifier / SparseGPTModifier, same "
                   "model and calibration windows",
           "model": llm_data.SMOLLM2_LABEL, "calibration": f"{a.n_samples} windows x {a.seqlen} tokens, seed 0",
           "perplexity_windows": f"{test.ids.shape[0]} x {test.ids.shape[1]} tokens",
           "llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
           "dense_perplexity": ppl(model), "runs": {}}
    for method, pattern in ((m, p) for m in a.methods for p in a.patterns):
        ours = copy.deepcopy(model)
        t0 = time.perf_counter()
        prune_llm(ours, method, pattern, calib.ids, batch_size=8)
        ours_s = time.perf_counter() - t0
        other, other_s = theirs(model, tok, calib.ids, pattern, method)
        other = other.float().eval()
        mo, mt = linear_masks(ours), linear_masks(other)
        assert mo.keys() == mt.keys(), (sorted(mo)[:3], sorted(mt)[:3])
        # their masks on our dense weights: separates the masks from anything their save / reload changed
        masked = copy.deepcopy(model)
        for (k, m), layer_mod in zip(mt.items(), _linears(masked)):
            layer_mod.weight.data *= m.to(layer_mod.weight.dtype)
        dense_w = dict(zip(mt, (m.weight.detach() for m in _linears(model))))
        kept_diff = max(((m.weight.detach() - dense_w[k]) * mt[k]).abs().max().item()
                        for k, m in zip(mt, _linears(other)))
        per = {}
        for k in mo:
            agree = (mo[k] == mt[k]).float().mean().item()
            po, pt = ~mo[k], ~mt[k]
            jac = (po & pt).sum().item() / max((po | pt).sum().item(), 1)
            per[k] = {"agreement": agree, "pruned_jaccard": jac, "sparsity_ours": po.float().mean().item(),
                      "sparsity_theirs": pt.float().mean().item()}
        n = {k: mo[k].numel() for k in mo}
        tot = sum(n.values())
        out["runs"][f"{method} {pattern}"] = {
            "agreement_weighted": sum(per[k]["agreement"] * n[k] for k in per) / tot,
            "agreement_min": min(v["agreement"] for v in per.values()),
            "agreement_min_linear": min(per, key=lambda k: per[k]["agreement"]),
            "layer0_agreement_min": min(v["agreement"] for k, v in per.items() if k.startswith("0.")),
            "perplexity_ours": ppl(ours), "perplexity_theirs": ppl(other),
            "perplexity_their_masks_on_our_dense_weights": ppl(masked),
            "their_kept_weights_max_abs_change": kept_diff,
            "seconds_ours": round(ours_s, 1), "seconds_theirs": round(other_s, 1), "per_linear": per}
        r = out["runs"][f"{method} {pattern}"]
        print(f"{method} {pattern}: agreement {r['agreement_weighted']:.4f} (min {r['agreement_min']:.4f} at "
              f"{r['agreement_min_linear']}; layer 0 min {r['layer0_agreement_min']:.4f}), perplexity ours "
              f"{r['perplexity_ours']:.2f} vs llmcompressor {r['perplexity_theirs']:.2f} (its masks on our dense "
              f"weights {r['perplexity_their_masks_on_our_dense_weights']:.2f}; its kept weights moved by at most "
              f"{kept_diff:.2e})", flush=True)
        del ours, other, masked
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
