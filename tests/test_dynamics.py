"""The SLBI optimizer: update rules, inverse scale space, state, and failure modes."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from sppbench.core.dynamics import SLBI, official_held_v, official_lr, official_lr_for_entry, shrink
from sppbench.errors import SearchDivergedError


def test_shrink_is_soft_threshold():
    v = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    assert torch.equal(shrink(v, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]))


def test_paper_step_matches_the_formulas():
    m = torch.nn.Parameter(torch.tensor([1.0, 0.5]))
    opt = SLBI([m], kappa=2.0, alpha=0.1, nu=4.0, lam=0.01)
    st = None
    for step in range(3):
        g = torch.tensor([0.3, -0.2])
        m_old = m.detach().clone()
        st = opt.state[m] if m in opt.state else None
        V_old = st["V"].clone() if st else torch.zeros(2)
        G_old = st["gamma"].clone() if st else torch.zeros(2)
        m.grad = g.clone()
        opt.step()
        st = opt.state[m]
        exp_m = m_old - 2.0 * 0.1 * (g + (m_old - G_old) / 4.0)
        exp_V = V_old + (0.1 / 4.0) * (m_old - G_old)
        assert torch.allclose(m.detach(), exp_m)
        assert torch.allclose(st["V"], exp_V)
        assert torch.allclose(st["gamma"], 2.0 * shrink(exp_V, 0.01))


def test_state_exposes_entry_steps():
    m = torch.nn.Parameter(torch.ones(3))
    opt = SLBI([m], kappa=1.0, alpha=1.0, nu=10.0, lam=0.25)
    for _ in range(5):
        m.grad = torch.tensor([-1.0, 0.0, 0.5])  # entry 0 is held up, entry 2 pushed down
        opt.step()
    st = opt.state[m]
    assert set(("V", "gamma", "entry_step", "support_steps")) <= set(st)
    assert st["entry_step"].dtype == torch.long
    # V grows at alpha/nu * M: the held-up entry reaches lam first, the neutral one next
    t = st["entry_step"].tolist()
    assert 0 < t[0] < t[1], t
    assert t[2] == -1 or t[2] > t[1], t
    assert st["support_steps"][0] == 5 - st["entry_step"][0] + 1


def _linear_problem(seed=0, n=400, p=8):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g)
    w = torch.tensor([3.0, -2.2, 1.6, 1.1, -0.7, 0.4, 0.2, 0.05])[:p]  # importance known: |w_j| (X_j unit scale)
    y = X @ w + 0.01 * torch.randn(n, generator=g)
    return X, w, y


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_inverse_scale_space_orders_features_by_importance(variant):
    """y = X (w * m), w frozen, one mask entry per feature: the most important enter first."""
    X, w, y = _linear_problem()
    m = torch.nn.Parameter(torch.ones(len(w)))
    if variant == "paper":
        opt = SLBI([m], kappa=5.0, alpha=0.02, nu=1.0, lam=0.1)
    else:
        opt = SLBI([m], kappa=1.0, alpha=0.01, nu=1.0, lam=0.05, variant="official")
    for _ in range(3000):
        opt.zero_grad()
        loss = 0.5 * ((X @ (w * m) - y) ** 2).mean()
        loss.backward()
        opt.step()
    st = opt.state[m]
    if variant == "paper":
        t = st["entry_step"].double()
        assert (t > 0).sum() >= 6, t  # most features enter within the run
        t[t < 0] = float("inf")
        order = torch.argsort(t, stable=True)
    else:
        order = torch.argsort(-st["support_steps"].double(), stable=True)
    entered = [int(i) for i in order[: 5]]
    assert entered == [0, 1, 2, 3, 4], (variant, order.tolist(), st["entry_step"].tolist())


def test_nonfinite_gradient_raises_and_changes_nothing():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2))
    opt = SLBI([a, b], kappa=1.0, alpha=0.1, nu=1.0, lam=0.5)
    a.grad = torch.zeros(3)
    b.grad = torch.tensor([0.0, float("nan")])
    with pytest.raises(SearchDivergedError, match="non-finite"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(3)) and torch.equal(b.detach(), torch.ones(2))


def test_bad_constants_are_rejected_and_unstable_ones_warned():
    p = [torch.nn.Parameter(torch.ones(2))]
    for bad in (dict(kappa=0.0), dict(alpha=-1.0), dict(nu=float("nan")), dict(lam=-0.1)):
        kw = {**dict(kappa=1.0, alpha=0.1, nu=1.0, lam=0.1), **bad}
        with pytest.raises(ValueError):
            SLBI(p, **kw)
    with pytest.raises(ValueError, match="variant"):
        SLBI(p, kappa=1.0, alpha=0.1, nu=1.0, lam=0.1, variant="nope")
    with pytest.warns(RuntimeWarning, match="kappa\\*alpha/nu"):
        SLBI(p, kappa=10.0, alpha=1.0, nu=1.0, lam=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SLBI(p, kappa=1.0, alpha=0.1, nu=1.0, lam=0.1)


def test_paper_form_depends_on_kappa_alpha_decay_and_threshold_only():
    """(kappa, alpha, nu, lam) and (2 kappa, alpha / 2, nu, lam / 2) share kappa*alpha, kappa*alpha/nu and
    kappa*lam, so their mask trajectories and entry steps coincide."""
    X, w, y = _linear_problem(seed=1)
    runs = []
    for kappa, alpha, nu, lam in ((4.0, 0.02, 1.0, 0.1), (8.0, 0.01, 1.0, 0.05)):
        m = torch.nn.Parameter(torch.ones(len(w), dtype=torch.float64))
        opt = SLBI([m], kappa=kappa, alpha=alpha, nu=nu, lam=lam)
        for _ in range(400):
            opt.zero_grad()
            (0.5 * ((X.double() @ (w.double() * m) - y.double()) ** 2).mean()).backward()
            opt.step()
        runs.append((m.detach().clone(), opt.state[m]["entry_step"].clone()))
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-9)
    assert torch.equal(runs[0][1], runs[1][1])


def _released_rule(X, w, y, *, lr, steps, lam=3.0, b1=0.9, b2=0.999, eps=1e-4, floor=1e-5, interval=10):
    """The released search's mask update, element by element in plain Python floats, written from the released
    files (not from sppbench): adamw_spp.py ``_single_tensor_adamwprox`` (weight decay 0, kappa 1, lamda 3),
    the optimizer built by deit_search.py (eps 1e-4), timm's cosine schedule from lr to min_lr 1e-5 with no warm-up
    (deit_search.sh) spread over the search, and deit/engine.py's ``print_sparsity_all`` support count at every
    ``interval``-th step and the last."""
    n, p = X.shape
    Xl, wl, yl = X.tolist(), w.tolist(), y.tolist()
    m = [1.0] * p
    exp_avg, exp_avg_sq, z, gamma, record = [0.0] * p, [0.0] * p, [0.0] * p, [0.0] * p, [0] * p
    for t in range(1, steps + 1):
        resid = [sum(Xl[i][j] * wl[j] * m[j] for j in range(p)) - yl[i] for i in range(n)]
        grad = [wl[j] * sum(Xl[i][j] * resid[i] for i in range(n)) / n for j in range(p)]
        lr_t = floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * (t - 1) / steps))
        for j in range(p):
            exp_avg[j] = b1 * exp_avg[j] + (1 - b1) * grad[j]
            exp_avg_sq[j] = b2 * exp_avg_sq[j] + (1 - b2) * grad[j] * grad[j]
            step_size = lr_t / (1 - b1 ** t)
            denom = math.sqrt(exp_avg_sq[j]) / math.sqrt(1 - b2 ** t) + eps
            m[j] -= step_size * exp_avg[j] / denom
            z[j] += step_size * 1.0 * (m[j] - gamma[j])
            scale = max(0.0, 1 - lam / abs(z[j])) if z[j] != 0 else 0.0
            gamma[j] = max(0.0, scale * z[j])
        if (t - 1) % interval == 0 or t == steps:
            record = [r + (g != 0) for r, g in zip(record, gamma)]
    return m, z, gamma, record


def test_official_form_is_the_released_update_step_by_step():
    """200 steps of variant='official' (with the search's schedule) agree with the released rule to 1e-6."""
    X, w, _ = _linear_problem(seed=2, n=64)
    m_star = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.8, 0.5, 0.2, 0.0], dtype=torch.float64)  # where each mask is drawn
    X, w = X.double(), w.double()
    y = X @ (w * m_star)
    steps, lr = 200, 0.03
    m = torch.nn.Parameter(torch.ones(len(w), dtype=torch.float64))
    opt = SLBI([m], kappa=1.0, alpha=lr, nu=1.0, lam=3.0, variant="official", steps=steps)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((X @ (w * m) - y) ** 2).mean()).backward()
        opt.step()
    ref_m, ref_z, ref_gamma, ref_record = _released_rule(X, w, y, lr=lr, steps=steps)
    st = opt.state[m]
    assert torch.allclose(m.detach(), torch.tensor(ref_m, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.allclose(st["V"], torch.tensor(ref_z, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.allclose(st["gamma"], torch.tensor(ref_gamma, dtype=torch.float64), atol=1e-6, rtol=0)
    assert st["support_steps"].tolist() == ref_record
    # not a trivial agreement: some entries entered at different times, some never did
    assert 1 < len(set(ref_record)) and 0 in ref_record and max(ref_record) > 0, ref_record


def test_official_form_departs_from_its_old_v_step():
    """The released V step has no sqrt(1 - beta2^t) factor and eps is 1e-4: the pre-issue-36 form (V step smaller by
    sqrt(1 - beta2^t)) would leave a held mask's V at about half after 640 steps; here it is the sum of s_t."""
    m = torch.nn.Parameter(torch.ones(3))
    steps, lr = 640, 0.01
    opt = SLBI([m], kappa=1.0, alpha=lr, nu=1.0, lam=1e9, variant="official", steps=steps)
    for _ in range(steps):
        m.grad = torch.zeros(3)  # held at 1: Adam moves nothing
        opt.step()
    assert opt.param_groups[0]["eps"] == 1e-4
    assert torch.allclose(opt.state[m]["V"], torch.full((3,), official_held_v(lr, steps)), rtol=1e-5)
    old = sum(official_lr(lr, t, steps) * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) for t in range(1, steps + 1))
    assert official_held_v(lr, steps) > 1.5 * old  # on the same schedule


@pytest.mark.parametrize("steps", [160, 640])
def test_official_default_lr_lets_a_held_mask_enter_half_way(steps):
    lr = official_lr_for_entry(3.0, steps)
    m = torch.nn.Parameter(torch.ones(2))
    opt = SLBI([m], kappa=1.0, alpha=lr, nu=1.0, lam=3.0, variant="official", steps=steps)
    for _ in range(steps):
        m.grad = torch.zeros(2)
        opt.step()
    assert abs(int(opt.state[m]["entry_step"][0]) - steps / 2) <= 1
    assert official_lr(lr, 1, steps) == lr and abs(official_lr(lr, steps + 1, steps) - 1e-5) < 1e-12
