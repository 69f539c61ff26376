"""Layer-wise LLM pruning (magnitude, Wanda, RIA, SPP-RIA) on tiny random-init LLaMA (grouped-query) and OPT models:
exact sparsity per layer, scores against direct computations, the Gram form of the reconstruction loss, and the
layer order (each layer sees the already-pruned layers' outputs)."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM  # noqa: E402

from sppbench.errors import BudgetError, UnsupportedModelError  # noqa: E402
from sppbench.methods.llm import LLM_METHODS, decoder_layers, keep_mask, layer_linears, order_rank, parse_pattern, prune_llm, reconstruction_grad, reconstruction_loss, ria_score, spp_path, wanda_score


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64)).eval()


MODELS = {"llama-gqa": tiny_llama, "opt": tiny_opt}


def ids(n: int = 6, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("method", LLM_METHODS)
@pytest.mark.parametrize("pattern", [0.5, 0.3, "2:4"])
def test_exact_sparsity_per_layer(family, method, pattern):
    model = MODELS[family]()
    res = prune_llm(model, method, pattern, ids(), batch_size=4)
    layers, _ = decoder_layers(model)
    target = parse_pattern(pattern)
    assert len(res.layers) == sum(len(layer_linears(layer)) for layer in layers)
    for rec in res.layers:
        assert rec["target"] == target.sparsity
        assert rec["sparsity"] == pytest.approx(target.sparsity, abs=1.0 / rec["shape"][1])
    for layer in layers:
        for name, lin in layer_linears(layer).items():
            W = lin.weight
            if target.kind == "nm":  # exactly N non-zeros in every group of M consecutive inputs of a row
                nz = (W != 0).view(W.shape[0], -1, 4).sum(-1)
                assert bool((nz == 2).all()), name
            elif method == "wanda":  # Wanda compares within rows: every row at the target
                k = round((1 - target.sparsity) * W.shape[1])
                assert bool(((W != 0).sum(1) == k).all()), name
            else:
                assert int((W != 0).sum()) == round((1 - target.sparsity) * W.numel()), name


def test_scores_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, generator=g)
    X = torch.randn(4, 10, generator=g)  # in x tokens
    norm = X.pow(2).sum(1).sqrt()
    wanda, ria = wanda_score(W, norm), ria_score(W, norm)
    for i in range(3):
        for j in range(4):
            assert float(wanda[i, j]) == pytest.approx(float(abs(W[i, j])) * float(torch.linalg.norm(X[j])), rel=1e-6)
            col = sum(abs(W[r, j]) for r in range(3))
            row = sum(abs(W[i, c]) for c in range(4))
            direct = (abs(W[i, j]) / col + abs(W[i, j]) / row) * float(torch.linalg.norm(X[j])) ** 0.5
            assert float(ria[i, j]) == pytest.approx(float(direct), rel=1e-6)


def test_reconstruction_in_gram_form_equals_the_raw_activation_loss():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 7, generator=g, dtype=torch.float64)
    X = torch.randn(7, 40, generator=g, dtype=torch.float64)
    M = torch.rand(5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    raw = W.numel() * ((W @ X - (W * M) @ X).pow(2).sum()) / (W @ X).pow(2).sum()
    gram = reconstruction_loss(W, M.detach(), X @ X.T)
    assert float(gram) == pytest.approx(float(raw.detach()), rel=1e-10)
    raw.backward()
    grad = reconstruction_grad(W, M.detach(), X @ X.T, ((W @ X @ X.T) * W).sum())
    assert torch.allclose(grad, M.grad, rtol=1e-9, atol=1e-12)
    # a step costs the same whatever the token count: the path depends on X only through G
    p1 = spp_path(W.float(), (X @ X.T).float(), steps=5, kappa=1.0, alpha=0.3, nu=2.0, lam=1.5)
    X2 = torch.cat([X, X], 1) / 2 ** 0.5  # other tokens, same Gram matrix
    p2 = spp_path(W.float(), (X2 @ X2.T).float(), steps=5, kappa=1.0, alpha=0.3, nu=2.0, lam=1.5)
    assert torch.equal(p1["entry_step"], p2["entry_step"]) and torch.allclose(p1["M"], p2["M"], atol=1e-5)
    assert p1["losses"][-1] > 0


def test_spp_ria_with_no_steps_is_ria_and_entered_entries_come_first():
    a, b = tiny_llama(), tiny_llama()
    prune_llm(a, "ria", 0.5, ids())
    prune_llm(b, "spp-ria", 0.5, ids(), spp={"steps": 0})
    for (na, la), (nb, lb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(la, lb), na
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    primary = -torch.tensor([[float(i % 3) for i in range(8)]] * 4)  # entry steps 0, 1, 2 (earlier first)
    rank = order_rank(primary, ria_score(W, torch.ones(8)))
    assert bool((rank[primary == 0].max() < rank[primary == -1].min()))


def test_each_layer_sees_the_pruned_layers_before_it():
    """Wanda's layer-1 masks equal those computed from inputs produced by the model with layer 0 already pruned."""
    x = ids()
    model = tiny_llama()
    prune_llm(model, "wanda", 0.5, x)
    ref = tiny_llama()
    layers, _ = decoder_layers(ref)
    one = copy.deepcopy(ref)
    del one.model.layers[1]  # a model that stops after layer 0, to prune layer 0 alone
    one.config.num_hidden_layers = 1
    prune_llm(one, "wanda", 0.5, x)
    layers[0].load_state_dict(one.model.layers[0].state_dict())
    sq = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: sq.__setitem__(n, sq.get(n, 0) + a[0].reshape(-1, a[0].shape[-1])
                                                                           .float().pow(2).sum(0)))
             for n, m in layer_linears(layers[1]).items()]
    with torch.no_grad():
        ref(x, use_cache=False)
    for h in hooks:
        h.remove()
    got = layer_linears(decoder_layers(model)[0][1])
    for n, lin in layer_linears(layers[1]).items():
        rank = order_rank(wanda_score(lin.weight.float(), sq[n].sqrt()))
        expect = keep_mask(rank, parse_pattern(0.5), "row")
        assert torch.equal(got[n].weight != 0, expect), n


def test_bad_patterns_and_models():
    for bad in (0.0, 1.0, "150%", "4:2", "half", -0.1):
        with pytest.raises(BudgetError):
            parse_pattern(bad)
    assert parse_pattern("2:4").n == 2 and parse_pattern("50%").sparsity == 0.5
    with pytest.raises(BudgetError, match="multiple"):
        keep_mask(torch.zeros(2, 6, dtype=torch.long), parse_pattern("2:4"))
    with pytest.raises(UnsupportedModelError):
        prune_llm(torch.nn.Linear(2, 2), "wanda", 0.5, ids())
    with pytest.raises(UnsupportedModelError, match="unknown"):
        prune_llm(tiny_llama(), "obc", 0.5, ids())
    with pytest.raises(ValueError, match="calibration"):
        prune_llm(tiny_llama(), "wanda", 0.5, None)
    with pytest.raises(ValueError, match="lambda"):
        prune_llm(tiny_llama(), "spp-ria", 0.5, ids(), spp={"lambda": 2.0})


def test_outlier_channels_diverge_unclipped_and_stay_finite_clipped_or_preconditioned():
    """An input channel 1000x louder than the rest makes the explicit iteration unstable (kappa alpha h >> 2); the
    default clipping, or the semi-implicit diagonal step, keeps the path finite."""
    from sppbench.errors import SearchDivergedError

    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=g)
    X = torch.randn(16, 64, generator=g)
    X[3] *= 1000.0
    G = X @ X.T
    kw = dict(steps=60, kappa=1.0, alpha=0.3, nu=2.0, lam=1.5)
    with pytest.raises(SearchDivergedError):
        spp_path(W, G, clip=None, **kw)
    for p in (spp_path(W, G, **kw), spp_path(W, G, clip=None, precondition=True, **kw)):
        assert torch.isfinite(p["M"]).all() and all(v == v for v in p["losses"])


@pytest.mark.parametrize("family", sorted(MODELS))
def test_offload_moves_one_layer_at_a_time_and_prunes_identically(family, monkeypatch):
    """device='cpu:0' differs from the model's 'cpu' but computes on the CPU: the offload path runs for real.
    The embeddings visit the device once and come back; then each layer goes there and back before the next."""
    import sppbench.methods.llm as L

    base = MODELS[family]()
    ref, moved = copy.deepcopy(base), copy.deepcopy(base)
    prune_llm(ref, "ria", 0.5, ids())
    layers, _ = decoder_layers(moved)
    index = {id(layer): i for i, layer in enumerate(layers)}
    log, real = [], L._place

    def place(module, device):
        log.append((index.get(id(module), "other"), str(device)))
        real(module, device)

    monkeypatch.setattr(L, "_place", place)
    prune_llm(moved, "ria", 0.5, ids(), device="cpu:0")
    others = [e for e in log if e[0] == "other"]
    assert others and len(others) % 2 == 0 and {d for _, d in others} == {"cpu:0", "cpu"}
    layer_moves = [e for e in log if e[0] != "other"]
    assert layer_moves == [m for i in range(len(layers)) for m in ((i, "cpu:0"), (i, "cpu"))]
    for (n, a), b in zip(ref.state_dict().items(), moved.state_dict().values()):
        assert torch.equal(a, b), n


def test_memory_estimate_grows_with_calibration_and_gram_state():
    from sppbench.methods.llm import llm_memory

    small = llm_memory(4096, 11008, 32, heads=32, n_samples=64)
    big = llm_memory(4096, 11008, 32, heads=32, n_samples=128)
    assert big["activations_gib"] == pytest.approx(2 * small["activations_gib"], rel=0.01)
    assert llm_memory(4096, 11008, 32, heads=32, method="ria")["statistics_gib"] < big["statistics_gib"]
    assert 12 < big["host_gib"] < 13.5  # LLaMA-2-7B in fp16: 6.7e9 parameters x 2 bytes


def test_pruned_by_path_counts_what_the_entry_order_decided():
    from sppbench.methods.llm import pruned_by_path

    es = torch.tensor([[1, 2, 3, -1], [1, 5, -1, -1]])
    half = parse_pattern("unstructured:0.5")
    # kept: the four earliest (steps 1, 1, 2, 3); pruned: step 5 and three never-entered; all later than step 3
    keep = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert pruned_by_path(es, keep, half) == 1.0
    # kept a never-entered weight: the pruned never-entered ones tie with it (the tie-break decided them)
    keep2 = torch.tensor([[True, True, False, True], [True, False, False, False]])
    assert pruned_by_path(es, keep2, half) == 0.0
    # per row: row 0 keeps {1, 2} and prunes {3, never}: both later; row 1 keeps {1, 5}, prunes two never-entered
    row_keep = torch.tensor([[True, True, False, False], [True, True, False, False]])
    assert pruned_by_path(es, row_keep, half, "row") == 1.0
    # N:M (2:4): each group of four is its own competition
    nm = parse_pattern("2:4")
    assert pruned_by_path(es, row_keep, nm) == 1.0
    everything_ties = torch.full((2, 4), -1)
    assert pruned_by_path(everything_ties, keep, half) == 0.0
    # and it agrees with the read-out SPP-RIA uses: entry step first, ties by a score
    score = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    e = es.double()
    rank = order_rank(-torch.where(e < 0, torch.full_like(e, float("inf")), e), score)
    k = keep_mask(rank, half)
    assert int(k.sum()) == 4 and pruned_by_path(es, k, half) == 1.0


@pytest.mark.parametrize("pattern,compare", [("0.5", "layer"), ("0.5", "row"), ("2:4", "layer")])
def test_perturb_keep_moves_exactly_the_share_and_keeps_the_pattern(pattern, compare):
    from sppbench.methods.llm import perturb_keep

    pat = parse_pattern(pattern)
    g = torch.Generator().manual_seed(0)
    keep = keep_mask(order_rank(torch.rand(16, 32, generator=g)), pat, compare)
    assert torch.equal(perturb_keep(keep, 0.0, pat, compare), keep)
    for share in (0.1, 0.25):
        new = perturb_keep(keep, share, pat, compare, generator=torch.Generator().manual_seed(1))
        pruned = int((~keep).sum())
        assert int((new & ~keep).sum()) == int((keep & ~new).sum())  # a swap: as many in as out
        assert int((new & ~keep).sum()) == pytest.approx(share * pruned, abs=16 if compare == "row" else 1)
        if pat.kind == "nm":
            assert bool((new.view(16, -1, 4).sum(-1) == 2).all())
        elif compare == "row":
            assert torch.equal(new.sum(1), keep.sum(1))
        assert int(new.sum()) == int(keep.sum())
        again = perturb_keep(keep, share, pat, compare, generator=torch.Generator().manual_seed(1))
        assert torch.equal(new, again)  # the seed decides the draw
    with pytest.raises(ValueError, match="share"):
        perturb_keep(keep, 1.5, pat, compare)


def test_ria_perturbed_control_is_ria_at_share_zero_and_moves_the_given_share():
    a, b, c = tiny_llama(), tiny_llama(), tiny_llama()
    prune_llm(a, "ria", 0.5, ids())
    prune_llm(b, "ria-perturbed", 0.5, ids(), perturb={"shares": 0.0, "seed": 0})
    for (na, la), (_, lb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(la != 0, lb != 0), na
    res = prune_llm(c, "ria-perturbed", 0.5, ids(), perturb={"shares": {"0.self_attn.q_proj": 0.2}, "seed": 0})
    assert {r["name"]: r["perturbed_share"] for r in res.layers if r["layer"] == 0}["self_attn.q_proj"] == 0.2
    qa = decoder_layers(a)[0][0].self_attn.q_proj.weight != 0
    qc = decoder_layers(c)[0][0].self_attn.q_proj.weight != 0
    assert int((qc & ~qa).sum()) == round(0.2 * int((~qa).sum()))
    assert res.sparsity() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="perturb"):
        prune_llm(tiny_llama(), "ria", 0.5, ids(), perturb={"shares": 0.1})
    with pytest.raises(ValueError, match="perturb"):
        prune_llm(tiny_llama(), "ria-perturbed", 0.5, ids())


def test_spp_ria_records_how_far_it_moved_rias_cut():
    res = prune_llm(tiny_llama(), "spp-ria", 0.5, ids(), spp={"steps": 0})
    assert all(r["differs_from_ria"] == 0.0 for r in res.layers)  # no steps: exactly RIA
    ria, spp = tiny_llama(), tiny_llama()
    prune_llm(ria, "ria", 0.5, ids())
    res = prune_llm(spp, "spp-ria", 0.5, ids(), spp={"steps": 5, "lam": 0.5})
    # the first layer sees the same inputs in both runs: its recorded share is the measured one
    for name, lin in layer_linears(decoder_layers(spp)[0][0]).items():
        kept_spp = lin.weight != 0
        kept_ria = layer_linears(decoder_layers(ria)[0][0])[name].weight != 0
        expect = float((kept_ria & ~kept_spp).sum()) / float((~kept_spp).sum())
        got = next(r["differs_from_ria"] for r in res.layers if r["layer"] == 0 and r["name"] == name)
        assert got == pytest.approx(expect), name
    assert any(r["differs_from_ria"] > 0 for r in res.layers)  # with these steps the path does move RIA's cut


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "0.5"])
def test_keep_by_order_equals_the_full_sort_with_ties(pattern):
    """The grouped read-out (no full sort) keeps exactly what order_rank + keep_mask keep, ties included: SPP-RIA's
    primary key is an entry step with many ties and -inf for never-entered entries, its secondary RIA score ties too."""
    from sppbench.methods.llm import keep_by_order

    pat = parse_pattern(pattern)
    g = torch.Generator().manual_seed(3)
    for trial in range(4):
        e = torch.randint(-1, 4, (24, 32), generator=g).double()
        primary = -torch.where(e < 0, torch.full_like(e, float("inf")), e)
        secondary = torch.randint(0, 3, (24, 32), generator=g).float()  # coarse: many secondary ties too
        if trial == 3:
            primary = torch.zeros(24, 32)  # everything ties on the primary key
        for sec in (secondary, None):
            expect = keep_mask(order_rank(primary, sec), pat, "layer")
            assert torch.equal(keep_by_order(primary, sec, pat), expect)
    with pytest.raises(Exception, match="multiple"):
        keep_by_order(torch.zeros(2, 6), None, parse_pattern("2:4"))


@pytest.mark.parametrize("pattern", [0.5, "2:4"])
def test_sparsegpt_in_the_layer_loop_equals_a_direct_call_and_updates_the_kept_weights(pattern):
    from sppbench.methods.llm import SPARSEGPT_DEFAULTS
    from sppbench.methods.sparsegpt import sparsegpt

    dense = tiny_llama()
    layer0, _ = decoder_layers(dense)
    q = layer_linears(layer0[0])["self_attn.q_proj"]
    seen = []
    hook = q.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for i in range(0, 6, 4):  # the same batches prune_llm feeds the first layer (batch_size=4)
            dense(ids()[i:i + 4])
    hook.remove()
    H = 0
    for x in seen:  # per batch, summed in order, as prune_llm accumulates it
        H = H + x.float().T @ x.float()
    p = parse_pattern(pattern)
    want, keep = sparsegpt(q.weight.data, H, sparsity=p.sparsity, n=p.n or None, m=p.m or None,
                           **SPARSEGPT_DEFAULTS)
    model = tiny_llama()
    res = prune_llm(model, "sparsegpt", pattern, ids(), batch_size=4)
    got = layer_linears(decoder_layers(model)[0][0])["self_attn.q_proj"].weight.data
    assert torch.allclose(got, want, atol=1e-5)
    assert bool((got[keep] != q.weight.data[keep]).any())  # the kept weights moved (OBS updates), not only a mask
    assert res.settings["sparsegpt"] == SPARSEGPT_DEFAULTS and all(r["weights_updated"] for r in res.layers)
