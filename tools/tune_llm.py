"""A small grid over the SPP-RIA constants on SmolLM2-135M, scored on validation windows.

Calibration: 32 random windows x 256 tokens of the first 90 gensim Wikipedia articles (seed 0, the LLM table's
setting). Validation: 32 other random windows of the same articles (seed 1000); the held-out test articles
are not touched, so the table's perplexities stay unbiased by this choice. Each printed line: method,
pattern, constants, validation perplexity, share of entries that entered the path, seconds. Output of the run
behind SPP_RIA_DEFAULTS: results/runs/tune_llm_embedded/20261130-grid.jsonl (2-core CPU, torch 2.14.1).

    python tools/tune_llm.py [JSON list of [method, pattern, spp-dict] ...]
"""
import copy
import json
import sys
import time

from sppbench.methods import llm
from sppbench.tasks import llm_data

model, tok = llm_data.smollm2()
calib = llm_data.calibration_tokens(tok, n_samples=32, seqlen=256, seed=0)
val = llm_data.calibration_tokens(tok, n_samples=32, seqlen=256, seed=1000)
dense = copy.deepcopy(model.state_dict())
grid = [["ria", "0.5", {}], ["ria", "2:4", {}], ["spp-ria", "0.5", {"clip": 1.0, "lam": 1.5}]]
grid += [["spp-ria", "0.5", {"precondition": True, "lam": lam}] for lam in (1.75, 2.0, 2.5, 3.0)]
grid += [["spp-ria", "2:4", {"precondition": True, "lam": lam}] for lam in (2.0, 2.5)]
if len(sys.argv) > 1:
    grid = json.loads(sys.argv[1])
print(json.dumps({"dense_val_ppl": llm_data.perplexity(model, val.ids, batch_size=8)}), flush=True)
for method, pattern, spp in grid:
    model.load_state_dict(dense)
    t = time.time()
    r = llm.prune_llm(model, method, pattern, calib.ids, spp=spp)
    ent = [x["entered"] for x in r.layers if "entered" in x]
    print(json.dumps({"method": method, "pattern": pattern, "spp": r.settings.get("spp"),
                      "val_ppl": round(llm_data.perplexity(model, val.ids, batch_size=8), 3),
                      "entered": round(sum(ent) / len(ent), 4) if ent else None, "s": round(time.time() - t, 1)}),
          flush=True)
