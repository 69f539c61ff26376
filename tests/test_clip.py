"""open_clip dual encoders: masks on both towers (native CLIP, and a CustomTextCLIP with a timm trunk and a BERT
text tower), exact compression, per-tower costs and budgets, the file format, the real ViT-B-32 architecture,
the contrastive loss and the retrieval metrics."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("open_clip")

import sppbench  # noqa: E402
from sppbench.tasks.clip import ImageTower, TextTower, contrastive_loss, create_model, recall_at_k, zero_shot_accuracy
from sppbench.errors import BudgetError, SpecError, UnsupportedModelError  # noqa: E402
from sppbench.families.openclip import MaskedMHA, MaskedSeqMlp  # noqa: E402
from sppbench.methods.structured import magnitude_path, prune  # noqa: E402

from conftest import _randomize  # noqa: E402
from test_masks_compress import random_keep  # noqa: E402


def tiny_clip(seed: int = 0):
    """open_clip's native CLIP at toy size (config 'sppbench-tiny-clip'): ViT 16 px / patch 8 (5 tokens), causal text
    transformer of 8 tokens; every parameter randomised."""
    return _randomize(create_model("sppbench-tiny-clip"), seed)


def tiny_custom_clip(tmp_path, seed: int = 0):
    """CustomTextCLIP: a timm ViT trunk (vit_tiny at 32 px) and a Hugging Face BERT text tower (random init)."""
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64,
               max_position_embeddings=16).save_pretrained(tmp_path / "bert")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "token",
                          "timm_proj": "linear", "image_size": 32},
           "text_cfg": {"hf_model_name": str(tmp_path / "bert"), "hf_model_pretrained": False, "hf_proj_type": "linear",
                        "hf_pooler_type": "mean_pooler", "context_length": 8}}
    model = create_model(cfg)
    model.visual.trunk.set_input_size(img_size=32)
    return _randomize(model, seed)


def inputs(model, n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = model.sppbench_model_cfg["vision_cfg"]["image_size"]
    ctx = model.sppbench_model_cfg["text_cfg"]["context_length"]
    vocab = model.sppbench_model_cfg["text_cfg"].get("vocab_size", 64)
    x = torch.randn(n, 3, size, size, generator=g)
    t = torch.randint(1, vocab, (n, ctx), generator=g)
    t[1, ctx // 2:] = 0  # a padded caption
    return x, t


def _diff(a, b) -> float:
    return max((u - v).abs().max().item() for u, v in zip(a[:2], b[:2]))


def _empty(m) -> dict:
    """Empty groups in BOTH towers: no v in image block 0, no q/k in image block 1 and text block 0 (causal / padded
    attention with uniform weights), no MLP in text block 1."""
    names = {g.name for g in m.groups}
    want = ["image.blocks.0.attn.v", "image.blocks.1.attn.qk", "text.blocks.0.attn.qk", "text.blocks.1.mlp"]
    assert set(want) <= names
    return dict.fromkeys(want, True)


@pytest.fixture(params=["native", "custom"])
def clip_model(request, tmp_path):
    return tiny_clip() if request.param == "native" else tiny_custom_clip(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
def test_masks_on_both_towers_leave_outputs_unchanged(clip_model):
    x, t = inputs(clip_model)
    with torch.no_grad():
        ref = clip_model(x, t)
    m = sppbench.attach_masks(clip_model)
    assert m.info["family"] == "open-clip"
    towers = {g.tower for g in m.groups}
    assert towers == {"image", "text"}
    assert all(g.name.startswith(g.tower + ".") for g in m.groups)
    with torch.no_grad():
        assert _diff(ref, m(x, t)) <= 1e-6
    from open_clip.model import CLIP

    if isinstance(clip_model, CLIP):
        assert isinstance(clip_model.transformer.resblocks[0].attn, MaskedMHA)
        assert isinstance(clip_model.visual.transformer.resblocks[0].mlp, MaskedSeqMlp)
    m.detach_masks()
    with torch.no_grad():
        assert _diff(ref, clip_model(x, t)) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compressed_equals_masked_on_both_towers(clip_model, seed):
    x, t = inputs(clip_model)
    m = sppbench.attach_masks(clip_model)
    keep = random_keep(m, seed, _empty(m) if seed == 2 else None)
    m.set_masks(keep)
    with torch.no_grad():
        masked = m(x, t)
        small = sppbench.compress(m, keep)
        out = small(x, t)
    assert _diff(masked, out) <= 1e-5
    # the image and text embeddings separately, too
    with torch.no_grad():
        assert (m.model.encode_text(t) - small.encode_text(t)).abs().max() <= 1e-5
        assert (m.model.encode_image(x) - small.encode_image(x)).abs().max() <= 1e-5


def test_costs_per_tower_match_measured(clip_model):
    x, t = inputs(clip_model, n=2)
    # the unmasked model (nn.MultiheadAttention's fused inference kernel included) measures what the cost model says
    dense_img, dense_txt = sppbench.core.measure.macs(ImageTower(clip_model), x), sppbench.core.measure.macs(TextTower(clip_model), t)
    m = sppbench.attach_masks(clip_model)
    dense_params = sum(p.numel() for p in clip_model.parameters()) - sum(g.size for g in m.groups)
    path = magnitude_path(m)
    assert path.dense()[0] == dense_params
    assert (dense_img, dense_txt) == (path.dense("image")[1], path.dense("text")[1])
    for seed, empty in ((0, None), (2, _empty(m))):
        keep = random_keep(m, seed, empty)
        small = sppbench.compress(m, keep)
        ks = path._keepset([(i, e) for i, g in enumerate(m.groups) for e in keep.indices(g.name).tolist()], {}, "global")
        img = sppbench.core.measure.macs(ImageTower(small), x)
        txt = sppbench.core.measure.macs(TextTower(small), t)
        assert abs(img - ks.towers["image"]["macs"]) <= 0.01 * img
        assert abs(txt - ks.towers["text"]["macs"]) <= 0.01 * txt
        assert ks.macs == ks.towers["image"]["macs"] + ks.towers["text"]["macs"]
        assert sppbench.core.measure.params(small) == ks.params
        assert ks.params == ks.towers["image"]["params"] + ks.towers["text"]["params"] + 1  # + the logit scale


def test_tower_budgets_are_nested_and_keep_the_other_tower_dense():
    m = sppbench.attach_masks(tiny_clip())
    path = magnitude_path(m)
    assert path.towers == ["image", "text"]
    a, b = path.keep(fraction=0.7), path.keep(fraction=0.4)
    assert b.issubset(a)
    dense_text = path.dense("text")
    for frac in (0.6, 0.3):
        ks = path.keep(fraction=frac, tower="image")
        assert ks.request == {"fraction": frac, "tower": "image"}
        assert ks.towers["text"]["fraction"] == 1.0 and ks.towers["text"]["macs"] == dense_text[1]
    small_budget = int(0.5 * path.dense("image")[1])
    ks = path.keep(macs=small_budget, tower="image")
    assert ks.towers["image"]["macs"] <= small_budget
    assert path.keep(macs=int(0.4 * path.dense("image")[1]), tower="image").issubset(ks)
    both = path.keep_towers({"image": {"macs": small_budget}, "text": {"fraction": 0.5}})
    assert both.towers["image"]["macs"] == ks.towers["image"]["macs"]
    assert both.towers["text"]["fraction"] == pytest.approx(0.5, abs=0.05)
    assert "towers" in both.request and both.to_dict()["towers"] == both.towers
    with pytest.raises(BudgetError, match="towers"):
        path.keep(fraction=0.5, tower="audio")
    with pytest.raises(BudgetError, match="smallest"):
        path.keep(macs=1, tower="text")


def test_save_load_round_trip_and_unsavable_models(clip_model, tmp_path):
    x, t = inputs(clip_model)
    m = sppbench.attach_masks(clip_model)
    small = sppbench.compress(m, random_keep(m, 2, _empty(m)))
    folder = sppbench.save_pruned(small, tmp_path / "pruned")
    back = sppbench.load_pruned(folder)
    with torch.no_grad():
        assert _diff(small(x, t), back(x, t)) == 0.0
    # a CLIP built without sppbench.tasks.clip.create_model has no recorded config: compress works, saving says how to fix
    bare = tiny_clip()
    del bare.sppbench_model_cfg
    mb = sppbench.attach_masks(bare)
    sb = sppbench.compress(mb, random_keep(mb, 0))
    with pytest.raises(SpecError, match="create_model"):
        sppbench.save_pruned(sb, tmp_path / "bare")
    assert not (tmp_path / "bare").exists()


def test_search_with_the_contrastive_loss_and_methods():
    model = tiny_clip()
    m = sppbench.attach_masks(model)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x, t = inputs(model, n=6, seed=int(torch.randint(100, (1,), generator=g)))
        batches.append(((x, t), torch.arange(6)))
    path = sppbench.search(m, batches, contrastive_loss, steps=6, kappa=5.0, alpha=0.5, nu=50.0, lam=0.05)
    assert path.towers == ["image", "text"]
    out = prune("spp", m, [{"fraction": 0.5, "tower": "text"}, {"towers": {"image": {"fraction": 0.5},
                                                                            "text": {"fraction": 0.6}}}],
                batches=batches, loss_fn=contrastive_loss, steps=6, spp=dict(kappa=5.0, alpha=0.5, nu=50.0, lam=0.05),
                path=path)
    assert out[0].keep.towers["image"]["fraction"] == 1.0
    assert out[1].keep.towers["image"]["fraction"] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(BudgetError, match="Lasso"):
        prune("lasso", m, [{"towers": {"image": {"fraction": 0.5}}}], batches=batches, loss_fn=contrastive_loss,
              steps=2, spp=dict(kappa=5.0, alpha=0.5, nu=50.0, lam=0.05))
    dl = prune("dessilbi", m, [{"fraction": 0.5}], batches=batches, loss_fn=contrastive_loss, steps=3,
               spp=dict(kappa=5.0, alpha=0.5, nu=50.0, lam=0.05))
    assert dl[0].keep.fraction == pytest.approx(0.5, abs=0.02)


def test_contrastive_loss_is_clips_and_handles_duplicate_captions():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    ref = ClipLoss()(img, txt, scale)
    assert contrastive_loss((img, txt, scale)) == pytest.approx(float(ref), rel=1e-6)
    assert contrastive_loss((img, txt, scale), torch.arange(5)) == pytest.approx(float(ref), rel=1e-6)
    # pairs 0 and 1 show the same caption: swapping their texts changes nothing with keys, a lot without
    keys = torch.tensor([7, 7, 1, 2, 3])
    txt2 = txt.clone()
    txt2[[0, 1]] = txt[[1, 0]]
    assert contrastive_loss((img, txt, scale), keys) == pytest.approx(float(contrastive_loss((img, txt2, scale), keys)))
    with pytest.raises(UnsupportedModelError, match="SigLIP"):
        contrastive_loss((img, txt, scale, torch.tensor(-10.0)))


def test_recall_and_zero_shot_on_a_hand_made_case():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1], [0, 1, 0]])  # captions of images 0, 1, 2, 1
    r = recall_at_k(img, txt, torch.arange(3), torch.tensor([0, 1, 2, 1]), ks=(1, 2))
    # image 0 -> caption 0 (right); image 1 -> caption 3 (right); image 2 -> caption 2 (right)
    assert r["i2t_r1"] == 100.0
    # caption 1 ([0.9, 0.1, 0]) retrieves image 0 first (wrong), image 1 second
    assert r["t2i_r1"] == 75.0 and r["t2i_r2"] == 100.0
    assert zero_shot_accuracy(img, torch.tensor([0, 1, 1]), torch.eye(3)) == pytest.approx(200 / 3)


def test_unsupported_open_clip_variants_are_refused():
    cfg = copy.deepcopy(create_model("sppbench-tiny-clip").sppbench_model_cfg)
    cfg["vision_cfg"]["qk_norm"] = True  # custom blocks mix the dimensions a mask removes
    with pytest.raises(UnsupportedModelError, match="CustomResidualAttentionBlock"):
        sppbench.attach_masks(create_model(cfg))
    m = sppbench.attach_masks(tiny_clip())
    with pytest.raises(UnsupportedModelError):
        sppbench.attach_masks(m.model)


def test_real_vit_b_32_architecture():
    """open_clip ViT-B-32, random init, full size: 151.3 M params; MACs per tower measured == analytic."""
    torch.manual_seed(0)
    model = create_model("ViT-B-32")
    m = sppbench.attach_masks(model)
    path = magnitude_path(m)
    params, _ = path.dense()
    assert params == sum(p.numel() for p in model.parameters()) - sum(g.size for g in m.groups)
    assert abs(params - 151.28e6) < 0.01e6
    keep = path.keep(fraction=0.5)
    small = sppbench.compress(m, keep)
    x = torch.randn(1, 3, 224, 224)
    t = torch.randint(1, 49408, (1, 77))
    m.set_masks(keep)
    with torch.no_grad():
        assert _diff(m(x, t), small(x, t)) <= 1e-5
    for tower, mod, inp in (("image", ImageTower(small), x), ("text", TextTower(small), t)):
        measured = sppbench.core.measure.macs(mod, inp)
        assert abs(measured - keep.towers[tower]["macs"]) <= 0.01 * measured
    dense_img, dense_txt = path.dense("image")[1], path.dense("text")[1]
    assert 4.3e9 < dense_img < 4.5e9 and 2.8e9 < dense_txt < 3.1e9


def test_vit_l_14_profile_architecture():
    """open_clip ViT-L-14, random init: 427.62 M params (open_clip's published count); costs as the profile says."""
    from sppbench.tasks.profiles import clip_paper_config

    m = sppbench.attach_masks(create_model("ViT-L-14"))
    path = magnitude_path(m)
    ref = clip_paper_config("ViT-L-14")["dense_reference"]
    assert path.dense()[0] / 1e6 == pytest.approx(427.62, abs=0.01)
    assert path.dense("image")[1] / 1e9 == pytest.approx(ref["image_gmacs"], abs=0.01)
    assert path.dense("text")[1] / 1e9 == pytest.approx(ref["text_gmacs"], abs=0.001)
    assert len([g for g in m.groups if g.tower == "image"]) == 3 * 24


def tokenizer(texts):
    """Words -> ids by CRC (a stand-in tokenizer for the tiny model's 64-token vocabulary), 8 tokens, 0-padded."""
    import zlib

    out = torch.zeros(len(texts), 8, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [zlib.crc32(w.encode()) % 63 + 1 for w in t.split()][:8]
        out[i, :len(ids)] = torch.as_tensor(ids)
    return out


def tiny_task(seed: int = 0):
    """A ClipTask around the tiny native CLIP: random 16 px images in 4 'classes', captions naming the class."""
    from sppbench.tasks.clip import ClipTask, RetrievalSet

    model = tiny_clip(seed)
    g = torch.Generator().manual_seed(seed)

    words = ["red square", "blue circle", "green line", "grey dot"]

    def split(n):
        keys = torch.arange(n) % 4
        images = torch.randn(n, 3, 16, 16, generator=g) + keys.view(-1, 1, 1, 1).float()
        caps = [f"a {words[k]} photo" for k in keys.tolist()]
        return images, caps, keys

    xi, xc, xk = split(24)

    def train_batches(bs, steps, seed_):
        gen = torch.Generator().manual_seed(seed_)
        out = []
        for _ in range(steps):
            rows = torch.randperm(24, generator=gen)[:bs]
            out.append(((xi[rows], tokenizer([xc[r] for r in rows.tolist()])), xk[rows]))
        return out

    sets = {}
    for name in ("val", "test"):
        im, caps, keys = split(12)
        sets[name] = RetrievalSet([im[:6], im[6:]], caps, keys, keys, keys)
    return ClipTask("tiny-clip", "tiny random CLIP (test)", model, tokenizer, train_batches, sets,
                    ([xi[:12], xi[12:]], xc, xk), ("red square", "blue circle", "green line", "grey dot"),
                    ("a {name} photo",), {"text": 8}, {"relevance": "same class"})


@pytest.mark.parametrize("towers", ["joint", "each", "text"])
def test_clip_table_runs_every_method_within_budget(towers):
    from sppbench.studies.clip_table import ClipTableConfig, run_clip_table

    methods = ("spp", "dessilbi", "magnitude", "random") + (() if towers == "each" else ("lasso",))
    cfg = ClipTableConfig(model="embedded-clip", methods=methods, macs_fractions=(0.8, 0.6), budget_towers=towers,
                          steps=4, batch_size=8, lasso_trials=2, refit_steps=5, finetune_steps=2, finetune_batch=8,
                          kappa=5.0, alpha=0.5, nu=50.0, lam=0.05, seeds=2 if towers == "joint" else 1, resamples=200)
    res = run_clip_table(cfg, task=tiny_task(), record=False, progress=False)
    t = res["table"]
    pruned = t[t["method"] != "dense"]
    n_seeds = cfg.seeds
    assert len(pruned) == (n_seeds * (len(methods) - 1) + 1) * 2 and set(pruned["method"]) == set(methods)
    assert set(pruned.loc[pruned["method"] == "magnitude", "seed"]) == {0}  # deterministic: one run
    # every row (a reused read-out re-fit too) carries its re-fit's loss on the fit pairs: the diagnostic that tells
    # "better features for this task" from chance when a pruned row beats dense
    assert t["refit_fit_loss"].notna().all() and (t["refit_fit_loss"] > 0).all()
    # per-query ranks of every row and stage; the table's recall is recomputed from them
    ranks = res["ranks"]
    assert len(ranks) == len(t) * 3 * 2
    from sppbench.studies.clip_table import ranks_key

    for _, r in t.iterrows():
        for stage in ("no_retrain", "refit", "finetuned"):
            i2t = ranks[ranks_key(r["model"], r["method"], r["budget_macs_fraction"], r["seed"], stage, "i2t")]
            assert 100 * (i2t <= 1).mean() == pytest.approx(r[f"{stage}_i2t_r1"])
    s = res["summary"]
    assert (s.loc[s["method"] == "spp", "verdict_refit_rsum"] == "reference").all()
    others = s[~s["method"].isin(["spp", "dense"])]
    assert others["verdict_refit_rsum"].isin(["better", "worse", "tie"]).all()
    for _, r in others.iterrows():
        ref = s[(s["method"] == "spp") & (s["budget_macs_fraction"] == r["budget_macs_fraction"])].iloc[0]
        assert r["delta_refit_rsum"] == pytest.approx(r["refit_rsum"] - ref["refit_rsum"], abs=1e-6)
        assert r["delta_refit_rsum_lo"] <= r["delta_refit_rsum"] <= r["delta_refit_rsum_hi"]
    if n_seeds > 1:
        assert s.loc[s["method"] == "spp", "refit_rsum_sd"].notna().all()
    dense = t[t["method"] == "dense"].iloc[0]
    for _, r in pruned.iterrows():
        if towers == "joint":
            assert r["macs_image"] + r["macs_text"] <= r["budget_macs_fraction"] * (dense["macs_image"]
                                                                                  + dense["macs_text"]) + 1
        elif towers == "each":
            assert r["macs_image_fraction"] <= r["budget_macs_fraction"] + 1e-9
            assert r["macs_text_fraction"] <= r["budget_macs_fraction"] + 1e-9
        else:
            assert r["macs_text_fraction"] <= r["budget_macs_fraction"] + 1e-9 and r["macs_image_fraction"] == 1.0
        for stage in ("no_retrain", "refit", "finetuned"):
            assert 0.0 <= r[f"{stage}_i2t_r1"] <= r[f"{stage}_i2t_r5"] <= r[f"{stage}_i2t_r10"] <= 100.0
        assert r["params_image"] + r["params_text"] + 1 == r["params"]
    assert res["info"]["budget_rule"]
    assert isinstance(res["sanity"], list) and res["info"]["sanity"] == res["sanity"]


def _ranks_table(rank_of: dict, n: int = 400, seeds=(0, 1, 2)):
    """A CLIP table and its ranks.npz content from {(method, budget): share of queries hit at rank 1}."""
    import numpy as np
    import pandas as pd

    from sppbench.studies.clip_table import ranks_key

    rng = np.random.default_rng(0)
    rows, ranks = [], {}
    for (method, budget), share in rank_of.items():
        for seed in ((0,) if method == "dense" else seeds):
            for d in ("i2t", "t2i"):
                ranks[ranks_key("m", method, budget, seed, "refit", d)] = np.where(rng.random(n) < share, 1, 100)
            rows.append({"model": "m", "method": method, "budget_macs_fraction": budget, "seed": seed,
                         "refit_rsum": 0.0})
    return pd.DataFrame(rows), ranks


def test_clip_sanity_checks_flag_a_pruned_row_above_dense_and_rsum_rising_as_the_budget_shrinks():
    from sppbench.studies.clip_table import sanity_checks_clip

    healthy, ranks = _ranks_table({("dense", 1.0): 0.8, ("spp", 0.7): 0.78, ("spp", 0.5): 0.6})
    assert sanity_checks_clip(healthy, ranks, resamples=300) == []
    bad, ranks = _ranks_table({("dense", 1.0): 0.5, ("spp", 0.7): 0.6, ("spp", 0.5): 0.9})
    checks = {c["check"] for c in sanity_checks_clip(bad, ranks, resamples=300)}
    assert checks == {"pruned beats dense", "rsum rises as the budget shrinks"}
    # a row above dense carries the re-fit losses on the fit pairs, the diagnostic that tells a better fit from a
    # held-out gain
    bad["refit_fit_loss"] = [2.8 if m == "dense" else 2.9 for m in bad["method"]]
    above = [c for c in sanity_checks_clip(bad, ranks, resamples=300) if c["check"] == "pruned beats dense"]
    assert above and all(c["fit_loss"] == pytest.approx(2.9) and c["fit_loss_dense"] == 2.8 for c in above)
    assert all("dense model fits the fit set better" in c["message"] for c in above)


def test_clip_table_config_errors():
    from sppbench.studies.clip_table import ClipTableConfig

    with pytest.raises(sppbench.SppBenchError, match="no peer"):
        ClipTableConfig(methods=("tp-magnitude",)).resolved()
    with pytest.raises(sppbench.SppBenchError, match="Lasso"):
        ClipTableConfig(methods=("lasso",), budget_towers="each").resolved()
    with pytest.raises(ValueError, match="budget_towers"):
        ClipTableConfig(budget_towers="audio").resolved()
    with pytest.raises(sppbench.SppBenchError, match="unknown CLIP model"):
        ClipTableConfig(model="resnet50").resolved()
    with pytest.raises(TypeError, match="steps"):
        ClipTableConfig(steps="12").resolved()


@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
def test_karpathy_task_on_a_miniature(tmp_path, dataset):
    """The paper profile's data path: a generated miniature of the COCO / Flickr30K Karpathy layout, read into a
    ClipTask (search batches, val / test retrieval sets, re-fit pairs), then a short CLIP table on it."""
    from sppbench.tasks.captions import write_miniature
    from sppbench.tasks.clip import karpathy_task
    from sppbench.studies.clip_table import ClipTableConfig, run_clip_table

    root = write_miniature(tmp_path / dataset, dataset, n_per_split={"train": 12, "val": 4, "test": 6}, size=20)
    task = karpathy_task(tiny_clip(), tokenizer, dataset, root, workers=0, eval_batch=4)
    assert task.info["train_images"] == 12 and task.info["test_images"] == 6
    test = task.sets["test"]
    assert len(test.captions) == 30 and test.caption_keys.tolist() == [i for i in range(6) for _ in range(5)]
    (x, t), keys = next(iter(task.train_batches(4, 5, 0)))
    assert x.shape == (4, 3, 16, 16) and t.shape == (4, 8) and len(set(keys.tolist())) == 4
    assert len(list(task.train_batches(4, 5, 0))) == 5  # 3 batches per epoch, chained
    scores = task.evaluate(task.model, "test")
    assert 0 <= scores["i2t_r1"] <= scores["i2t_r10"] <= 100
    cfg = ClipTableConfig(model="embedded-clip", methods=("spp", "magnitude"), macs_fractions=(0.7,), steps=3,
                          batch_size=4, readout="global", refit_steps=3, finetune_steps=1, finetune_batch=4,
                          kappa=5.0, alpha=0.5, nu=50.0, lam=0.05, seeds=1, resamples=100)
    res = run_clip_table(cfg, task=task, record=False, progress=False)
    assert len(res["table"]) == 3


def test_clip_paper_profiles_say_what_is_missing(monkeypatch, tmp_path):
    from sppbench.tasks.profiles import CLIP_PAPER_MODELS, clip_check_ready, clip_paper_config

    monkeypatch.delenv("SPPBENCH_COCO", raising=False)
    for name in CLIP_PAPER_MODELS:
        cfg = clip_paper_config(name)
        assert cfg["model"] == name and cfg["pretrained"]
        with pytest.raises(sppbench.SppBenchError, match="SPPBENCH_COCO"):
            clip_check_ready(cfg, "coco", None, min_gpus=0)
    from sppbench.tasks.captions import write_miniature

    root = write_miniature(tmp_path / "coco", "coco")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert clip_check_ready(clip_paper_config("ViT-B-32"), "coco", root, min_gpus=0) == {"gpus": 0}
    with pytest.raises(sppbench.SppBenchError, match="GPU"):
        clip_check_ready(clip_paper_config("ViT-B-32"), "coco", root, min_gpus=99)


def test_per_query_ranks_give_the_same_recall_and_rsum():
    import numpy as np

    from sppbench.tasks.clip import query_ranks, rsum_per_query

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(90, 16, generator=g), dim=-1)
    ikeys = torch.arange(40) % 13  # several relevant captions per image and images per caption
    tkeys = torch.arange(90) % 13
    r = recall_at_k(img, txt, ikeys, tkeys)
    ranks = query_ranks(img, txt, ikeys, tkeys)
    assert ranks["i2t"].shape == (40,) and ranks["t2i"].shape == (90,) and ranks["i2t"].min() >= 1
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert 100 * np.mean(ranks[d] <= k) == pytest.approx(r[f"{d}_r{k}"])
    per = rsum_per_query(ranks)
    assert per["i2t"].mean() + per["t2i"].mean() == pytest.approx(r["rsum"])


def test_resummarize_recomputes_a_clip_record_from_its_ranks(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    import numpy as np

    table, ranks = _ranks_table({("dense", 1.0): 0.5, ("spp", 0.7): 0.6, ("magnitude", 0.7): 0.3})
    np.savez(tmp_path / "ranks.npz", **ranks)
    (tmp_path / "metrics.json").write_text(json.dumps({"rows": table.to_dict(orient="records"),
                                                       "info": {"statistics": {"resamples": 300}}}))
    spec = importlib.util.spec_from_file_location(
        "resummarize", Path(__file__).parent.parent / "tools" / "resummarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    info = mod.resummarize(tmp_path)
    assert [c["check"] for c in info["sanity"]] == ["pruned beats dense"]  # spp at 0.7 above dense
    mag = next(r for r in info["summary"] if r["method"] == "magnitude")
    assert mag["verdict_refit_rsum"] == "worse" and mag["delta_refit_rsum_hi"] < 0
    saved = json.loads((tmp_path / "metrics.json").read_text())["info"]
    assert saved["sanity"] == info["sanity"] and "recomputed" in saved["statistics"]


def test_the_scratch_refit_remakes_the_dense_projections():
    """The stand-in's re-fit re-runs its dense projections' recipe on the same fit set: on the dense model it gives
    the dense projections back, so the re-fit stage cannot favour pruned rows over the dense one."""
    import copy

    from sppbench.tasks.clip import _as_matrix, _projection_slots, fit_projections, pooled_features, refit_projections, set_projections
    from sppbench.studies.clip_table import ClipTableConfig, refit_recipe

    task = tiny_task()
    images, texts, keys = task.refit_pairs
    recipe = {"init": "scratch", "embed_dim": 16, "steps": 12, "batch_size": 8, "lr": 2e-3, "seed": 0}
    img, txt = pooled_features(task.model, images, texts, tokenizer)
    dense = copy.deepcopy(task.model)
    set_projections(dense, fit_projections(img, txt, keys, **{k: v for k, v in recipe.items() if k != "init"}))
    again = copy.deepcopy(dense)
    info = refit_projections(again, images, texts, keys, tokenizer, **recipe)
    assert info["init"] == "scratch" and info["steps"] == 12
    for t, (o, a) in _projection_slots(dense).items():
        o2, a2 = _projection_slots(again)[t]
        assert torch.equal(_as_matrix(getattr(o, a)), _as_matrix(getattr(o2, a2)))
    assert float(dense.logit_scale) == float(again.logit_scale)
    # from the current projections the same steps move them (why the old re-fit lowered the dense rsum)
    moved = copy.deepcopy(dense)
    refit_projections(moved, images, texts, keys, tokenizer, init="current", steps=12, lr=2e-3)
    (o, a), (o2, a2) = _projection_slots(dense)["image"], _projection_slots(moved)["image"]
    assert not torch.equal(_as_matrix(getattr(o, a)), _as_matrix(getattr(o2, a2)))
    with pytest.raises(ValueError, match="init"):
        refit_projections(moved, images, texts, keys, tokenizer, init="zero")
    # the table takes the task's recipe; refit_steps > 0 overrides its steps; no recipe: from the current ones
    task.refit_recipe = recipe
    assert refit_recipe(task, ClipTableConfig()) == recipe
    assert refit_recipe(task, ClipTableConfig(refit_steps=3))["steps"] == 3
    task.refit_recipe = None
    assert refit_recipe(task, ClipTableConfig())["init"] == "current"
    with pytest.raises(ValueError, match="refit_steps"):
        ClipTableConfig(refit_steps=-1).resolved()


def test_the_clip_tables_dense_row_is_unchanged_by_its_refit():
    """In the table itself: when the task's recipe is the one that made the dense projections, the dense row's re-fit
    scores exactly its no-retrain scores (no re-fit advantage either way), and every pruned row goes through the same
    recipe."""
    import copy

    from sppbench.tasks.clip import fit_projections, pooled_features, set_projections
    from sppbench.studies.clip_table import ClipTableConfig, run_clip_table

    task = tiny_task()
    images, texts, keys = task.refit_pairs
    recipe = {"init": "scratch", "embed_dim": 16, "steps": 12, "batch_size": 8, "lr": 2e-3, "seed": 0}
    img, txt = pooled_features(task.model, images, texts, tokenizer)
    set_projections(task.model, fit_projections(img, txt, keys, **{k: v for k, v in recipe.items() if k != "init"}))
    task.refit_recipe = copy.deepcopy(recipe)
    cfg = ClipTableConfig(model="embedded-clip", methods=("spp", "magnitude"), macs_fractions=(0.6,), steps=3,
                          batch_size=8, finetune_steps=0, seeds=1, resamples=100)
    res = run_clip_table(cfg, task=task, record=False, progress=False)
    t = res["table"]
    dense = t[t["method"] == "dense"].iloc[0]
    assert dense["refit_rsum"] == dense["no_retrain_rsum"]
    assert res["info"]["refit"]["init"] == "scratch" and res["info"]["refit"]["steps"] == 12
    assert t["refit_fit_loss"].notna().all()


def test_pooled_evaluation_equals_the_full_one_for_a_model_and_its_refit(clip_model):
    """One pass over a set serves every read-out of models that share their towers: the no-retrain scores and the
    re-fit copy's scores from pool_set are bit for bit those of running each model over the set."""
    import copy

    from sppbench.tasks.clip import RetrievalSet, _as_matrix, _projection_slots, evaluate, pool_set, set_projections

    g = torch.Generator().manual_seed(0)
    size = clip_model.sppbench_model_cfg["vision_cfg"]["image_size"]
    keys = torch.arange(10) % 3
    words = ["red square", "blue circle", "green line"]
    data = RetrievalSet([torch.randn(6, 3, size, size, generator=g), torch.randn(4, 3, size, size, generator=g)],
                        [f"a {words[k]} photo" for k in keys.tolist()], keys, keys, keys)
    refit = copy.deepcopy(clip_model)
    set_projections(refit, {t: torch.randn(_as_matrix(getattr(*s)).shape, generator=g)
                            for t, s in _projection_slots(refit).items()})
    pooled = pool_set(clip_model, data, tokenizer)
    for model in (clip_model, refit):
        full = evaluate(model, data, tokenizer, classnames=words, templates=("a {name} photo",), ranks=True)
        fast = evaluate(model, data, tokenizer, classnames=words, templates=("a {name} photo",), ranks=True,
                        pooled=pooled)
        rf, rq = full.pop("ranks"), fast.pop("ranks")
        for d in ("i2t", "t2i"):
            assert (rf[d] == rq[d]).all()
        assert full == fast
    # the re-fit's projections do change the scores (the shared pass is not hiding the projections)
    assert evaluate(refit, data, tokenizer, pooled=pooled) != evaluate(clip_model, data, tokenizer, pooled=pooled)
