"""Split Linearized Bregman Iteration (SLBI) on mask tensors: the discretised differential inclusion.

Paper form (docs/method.md section 3), per mask tensor M with sparse twin Gamma and auxiliary V:

    M     <- M - kappa * alpha * (grad_M L + (M - Gamma) / nu)
    V     <- V + (alpha / nu) * (M - Gamma)
    Gamma <- kappa * shrink(V, lam),          shrink(v, l) = sign(v) * max(|v| - l, 0)

The V and M updates both use the M and Gamma of the previous iterate (the standard SLBI of Huang
and Yao; the coupling gradient enters M's update *before* the step, unlike the released code which
added it after backward() where it never reaches M).

With V' = kappa * V the paper form reads M <- M - (kappa*alpha) grad L - (kappa*alpha/nu)(M - Gamma),
V' <- V' + (kappa*alpha/nu)(M - Gamma), Gamma = shrink(V', kappa*lam): the path depends on the four
constants only through kappa*alpha (the loss step), kappa*alpha/nu (the decay rate of a mask the loss
does not hold up) and kappa*lam (the entry threshold, relative to V's ceiling of 1 for such a mask).
Grids over (kappa, alpha, nu, lam) should vary these three.

Official form (``variant="official"``): the released update, term for term (``adamw_spp.py``,
``_single_tensor_adamwprox``, as ``deit_search.py`` builds it; docs/method.md section 3 names each term's source).
With s_t = lr_t / (1 - beta1^t) (lr_t = ``alpha`` on the released cosine schedule, ``official_lr``):

    M     <- M - s_t * m_t / (sqrt(v_t / (1 - beta2^t)) + eps)     (Adam on the task loss alone, eps 1e-4)
    V     <- V + kappa * s_t * (M_new - Gamma)                      (the same s_t, the mask already moved)
    Gamma <- max(shrink(V, lam), 0)                                 (one-sided; the released kappa 1, lam 3)

and ``support_steps`` counts Gamma != 0 only every ``OFFICIAL_SUPPORT_EVERY`` steps and at the last one, as the
released training loop counts its ``step_record``.

Adam form (``variant="adam"``, a labelled research variant: docs/path_health.md): the paper form's coupling,
V and Gamma, with the M step replaced by Adam (step ``lr``, bias-corrected) on the paper's full gradient
grad_M L + (M - Gamma) / nu. The step then no longer scales with the loss's curvature, so nu (the coupling)
and alpha / nu (V's rate) can be set for the path alone; on the embedded ViT it is the only form found whose
path passes the health limits (160 steps; the paper form would need ~1e5).

Each parameter's state exposes ``V``, ``gamma``, ``entry_step`` (the first step at which the entry
entered supp(Gamma); -1 = not entered), ``entry_time`` (the same instant as a fraction of a step:
``t - 1 + (lam - |V_{t-1}|) / (|V_t| - |V_{t-1}|)``, where the threshold crossing falls when V is
interpolated linearly between the two iterates; signed V for the one-sided official form; -1 = not
entered), ``support_steps`` (steps spent in the support) and ``step``. Entries entering at the same
integer step are thereby ordered by the dynamics themselves (who crossed first), not by a tie-break.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch

from ..errors import SearchDivergedError

VARIANTS = ("paper", "official", "adam")
# The released search (deit_search.py / deit_search.sh, deit/engine.py): the optimizer's eps, the interval at which the
# training loop counts each mask's steps in the support, and the cosine schedule's floor (timm's min_lr).
OFFICIAL_EPS = 1e-4
OFFICIAL_SUPPORT_EVERY = 10
OFFICIAL_LR_FLOOR = 1e-5


def official_lr(lr: float, t: int, steps: int | None) -> float:
    """The released search's learning rate at step ``t`` (1-based) of ``steps``: timm's cosine from ``lr`` to the floor
    min(OFFICIAL_LR_FLOOR, lr) over the whole search, no warm-up (deit_search.sh: --sched cosine, --warmup-epochs 0,
    --min-lr 1e-5), taken per step instead of per epoch. ``steps`` None: a constant ``lr``."""
    if steps is None:
        return lr
    floor = min(OFFICIAL_LR_FLOOR, lr)
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * (t - 1) / steps))


def official_settings(steps: int) -> dict:
    """What the official form's search runs at besides its constants (recorded in the path's config; a resumed search
    must match it: the schedule is fixed by the search's length)."""
    return {"eps": OFFICIAL_EPS, "support_every": OFFICIAL_SUPPORT_EVERY, "schedule_steps": steps,
            "schedule": f"cosine from alpha to min({OFFICIAL_LR_FLOOR:g}, alpha) over the search, per step, no warm-up",
            "follows": "adamw_spp.py _single_tensor_adamwprox; deit_search.py / .sh; deit/engine.py (released code)"}


def official_held_v(lr: float, steps: int, upto: int | None = None, beta1: float = 0.9) -> float:
    """V of the official form after ``upto`` (default: all) of ``steps`` steps for a mask the loss holds at 1 outside
    the support: the sum of the step sizes s_t = lr_t / (1 - beta1^t). It enters once this passes lam."""
    n = steps if upto is None else upto
    return sum(official_lr(lr, t, steps) / (1 - beta1 ** t) for t in range(1, n + 1))


def official_lr_for_entry(lam: float, steps: int, share: float = 0.5, beta1: float = 0.9) -> float:
    """The official form's lr at which a mask held at 1 enters the support after ``share`` of ``steps`` (its V reaches
    ``lam`` there): the step-scaled default of the embedded stand-ins. Above the floor f, V = f * A + (lr - f) * C with
    A = sum_t 1 / (1 - beta1^t) and C = sum_t c_t / (1 - beta1^t), c_t the cosine's share; below it, V = lr * A."""
    k = max(1, round(share * steps))
    bc = [1 - beta1 ** t for t in range(1, k + 1)]
    a = sum(1 / b for b in bc)
    c = sum(0.5 * (1.0 + math.cos(math.pi * (t - 1) / steps)) / b for t, b in enumerate(bc, start=1))
    lr = OFFICIAL_LR_FLOOR + (lam - OFFICIAL_LR_FLOOR * a) / c
    return lr if lr >= OFFICIAL_LR_FLOOR else lam / a


def shrink(v: torch.Tensor, lam: float) -> torch.Tensor:
    """Soft threshold: sign(v) * max(|v| - lam, 0)."""
    return torch.sign(v) * torch.clamp(v.abs() - lam, min=0.0)


def check_constants(kappa: float, alpha: float, nu: float, lam: float, variant: str = "paper",
                    lr: float | None = None) -> None:
    """Reject impossible constants; warn on the ones that make the iteration unstable."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SLBI variant {variant!r}; use one of {VARIANTS}")
    if variant == "adam":
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"the adam form needs lr (its M step), a positive finite number; got {lr!r}")
    elif lr is not None:
        raise ValueError(f"lr is the adam form's M step; the {variant!r} form takes kappa, alpha, nu, lam only")
    for name, val in (("kappa", kappa), ("alpha", alpha), ("nu", nu)):
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
            raise ValueError(f"{name} must be a positive finite number, got {val!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if variant == "paper" and kappa * alpha / nu >= 2.0:
        warnings.warn(
            f"kappa*alpha/nu = {kappa * alpha / nu:.3g} >= 2: the coupling term alone makes M overshoot and "
            "oscillate (stability needs kappa*alpha < 2 / (Lip + 1/nu)); lower kappa*alpha or raise nu",
            RuntimeWarning, stacklevel=3,
        )


class SLBI(torch.optim.Optimizer):
    """SLBI on mask tensors (W frozen elsewhere); see the module docstring for both forms."""

    def __init__(self, params: Iterable[torch.Tensor], kappa: float, alpha: float, nu: float, lam: float,
                 variant: str = "paper", betas: tuple[float, float] = (0.9, 0.999), eps: float | None = None,
                 lr: float | None = None, steps: int | None = None):
        """eps: Adam's (default 1e-8; the official form's OFFICIAL_EPS). steps: the search's length, which the
        official form's cosine schedule and last support count need (None: a constant lr, support every interval)."""
        check_constants(kappa, alpha, nu, lam, variant, lr)
        if steps is not None and not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be a positive integer or None, got {steps!r}")
        if eps is None:
            eps = OFFICIAL_EPS if variant == "official" else 1e-8
        defaults = dict(kappa=float(kappa), alpha=float(alpha), nu=float(nu), lam=float(lam), variant=variant,
                        betas=betas, eps=eps, lr=None if lr is None else float(lr), steps=steps)
        super().__init__(params, defaults)

    def state_of(self, p: torch.Tensor) -> dict:
        """The optimizer state of mask ``p`` (created on first use)."""
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["V"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["gamma"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["entry_step"] = torch.full(p.shape, -1, dtype=torch.long, device=p.device)
            st["entry_time"] = torch.full(p.shape, -1.0, dtype=torch.float64, device=p.device)
            st["support_steps"] = torch.zeros(p.shape, dtype=torch.long, device=p.device)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # check every gradient before touching any state: a bad step changes nothing
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    raise SearchDivergedError(
                        "non-finite mask gradient: the search diverged; lower kappa*alpha (or the data / "
                        "loss produced NaN); the masks were left at their last finite values"
                    )
        for group in self.param_groups:
            kappa, alpha, nu, lam = group["kappa"], group["alpha"], group["nu"], group["lam"]
            for p in group["params"]:
                st = self.state_of(p)
                st["step"] += 1
                t = st["step"]
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                V, gamma = st["V"], st["gamma"]
                v_old = V.clone()
                if group["variant"] == "paper":
                    diff = p - gamma
                    p.add_(grad, alpha=-kappa * alpha).add_(diff, alpha=-kappa * alpha / nu)
                    V.add_(diff, alpha=alpha / nu)
                    gamma.copy_(shrink(V, lam)).mul_(kappa)
                elif group["variant"] == "adam":
                    b1, b2 = group["betas"]
                    if "exp_avg" not in st:
                        st["exp_avg"] = torch.zeros_like(p)
                        st["exp_avg_sq"] = torch.zeros_like(p)
                    diff = p - gamma
                    total = grad + diff / nu
                    m1, m2 = st["exp_avg"], st["exp_avg_sq"]
                    m1.mul_(b1).add_(total, alpha=1 - b1)
                    m2.mul_(b2).addcmul_(total, total, value=1 - b2)
                    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                    denom = (m2 / bc2).sqrt_().add_(group["eps"])
                    p.addcdiv_(m1, denom, value=-group["lr"] / bc1)
                    V.add_(diff, alpha=alpha / nu)
                    gamma.copy_(shrink(V, lam)).mul_(kappa)
                else:
                    self._official_step(p, grad, st, group)
                counted = group["variant"] != "official" or (t - 1) % OFFICIAL_SUPPORT_EVERY == 0 \
                    or t == group["steps"]
                self.track_entries(st, v_old, lam, signed=group["variant"] == "official", count_support=counted)
        return loss

    @staticmethod
    def _official_step(p: torch.Tensor, grad: torch.Tensor, st: dict, group: dict) -> None:
        """The released update (module docstring): Adam on the task loss, then V and Gamma with the same step size."""
        b1, b2 = group["betas"]
        t = st["step"]
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        m, v2 = st["exp_avg"], st["exp_avg_sq"]
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = official_lr(group["alpha"], t, group["steps"]) / (1 - b1 ** t)
        denom = (v2.sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
        p.addcdiv_(m, denom, value=-step_size)
        st["V"].add_(p - st["gamma"], alpha=step_size * group["kappa"])
        st["gamma"].copy_(shrink(st["V"], group["lam"]).clamp_(min=0))

    @staticmethod
    def track_entries(st: dict, v_old: torch.Tensor, lam: float, signed: bool = False,
                      count_support: bool = True) -> None:
        """After a step (``st["step"]`` already advanced, ``st["V"]`` / ``st["gamma"]`` updated): record the entries
        that just entered supp(Gamma) -- ``entry_step``, the fractional ``entry_time`` where V (|V|, or signed V
        for the one-sided form) crossed ``lam`` -- and (``count_support``) add one to ``support_steps`` of every
        entry inside.
        Subclasses that change the M step (research variants) call it to keep the path's bookkeeping."""
        t, V = st["step"], st["V"]
        inside = st["gamma"] != 0
        new = inside & (st["entry_step"] < 0)
        if bool(new.any()):
            a0, a1 = (v_old, V) if signed else (v_old.abs(), V.abs())
            frac = ((lam - a0) / (a1 - a0).clamp_min(1e-30)).clamp_(0.0, 1.0).double()
            st["entry_time"] = torch.where(new, (t - 1) + frac, st.setdefault(
                "entry_time", torch.full(V.shape, -1.0, dtype=torch.float64, device=V.device)))
        st["entry_step"].masked_fill_(new, t)
        if count_support:
            st["support_steps"].add_(inside.long())

    def support(self) -> list[torch.Tensor]:
        """Boolean supp(Gamma) of every parameter, in parameter order."""
        return [self.state_of(p)["gamma"] != 0 for g in self.param_groups for p in g["params"]]


class ProximalL1(torch.optim.Optimizer):
    """Lasso on mask tensors: a gradient step on the loss, then the soft threshold of L1 (ISTA).

        M <- shrink(M - lr * grad_M L, lr * lam)

    State per parameter: ``step`` and ``last_nonzero`` (the last step after which the entry was
    non-zero; 0 = zeroed at the first step), used to order entries that ended at zero.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, lam: float):
        for name, val in (("lr", lr), ("lam", lam)):
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {val!r}")
        super().__init__(params, dict(lr=float(lr), lam=float(lam)))

    def state_of(self, p: torch.Tensor) -> dict:
        """The optimizer state of mask ``p`` (created on first use)."""
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["last_nonzero"] = torch.zeros(p.shape, dtype=torch.long, device=p.device)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    raise SearchDivergedError("non-finite mask gradient in the Lasso search; lower its lr")
        for group in self.param_groups:
            lr, lam = group["lr"], group["lam"]
            for p in group["params"]:
                st = self.state_of(p)
                st["step"] += 1
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
                p.copy_(shrink(p, lr * lam))
                st["last_nonzero"].masked_fill_(p != 0, st["step"])
        return None


def group_shrink(v: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    """Row-wise group soft threshold of (entries, n) ``v``: v_j * max(0, 1 - thresh_j / ||v_j||)."""
    norm = v.norm(dim=1, keepdim=True)
    factor = torch.clamp(1 - thresh.reshape(-1, 1) / norm.clamp_min(1e-30), min=0.0)
    return v * factor


class DessiLBI:
    """SLBI on the WEIGHTS (DessiLBI, Fu et al. 2020) with group sparsity over structural units.

    ``units[name]`` lists the weight slices that entry j of mask group ``name`` controls (see
    ``Family.unit_slices``); every element of a trained tensor belongs to exactly one unit. Per step,
    with W the unit's weights (gathered as (entries, n)) and Gamma its sparse twin:

        W     <- W - alpha * (grad_W L + (W - Gamma) / nu)      (the whole tensor; coupling on units)
        V     <- V + (alpha / nu) * (W - Gamma)
        Gamma <- kappa * group_shrink(V, lam * sqrt(n))           (sqrt(n): units of different size compare)

    ``entry_step[name][j]`` is the first step at which unit j's Gamma became non-zero.
    """

    def __init__(self, units: dict, kappa: float, alpha: float, nu: float, lam: float):
        check_constants(kappa, alpha, nu, lam)
        self.units, self.kappa, self.alpha, self.nu, self.lam = units, kappa, alpha, nu, lam
        self.params = list({id(s.param): s.param for sl in units.values() for s in sl}.values())
        self.t = 0
        self.V, self.gamma, self.entry_step, self.width = {}, {}, {}, {}
        for name, sl in units.items():
            w = torch.cat([s.gather().detach() for s in sl], dim=1)
            self.V[name] = torch.zeros_like(w)
            self.gamma[name] = torch.zeros_like(w)
            self.entry_step[name] = torch.full((w.shape[0],), -1, dtype=torch.long)
            self.width[name] = w.shape[1]

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise SearchDivergedError("non-finite weight gradient in the DessiLBI search; lower alpha")
        self.t += 1
        # the coupling gradient (W - Gamma) / nu, computed from the weights before the step
        diffs = {name: torch.cat([s.gather().detach() for s in sl], dim=1) - self.gamma[name]
                 for name, sl in self.units.items()}
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.alpha)
        for name, sl in self.units.items():
            diff = diffs[name]
            col = 0
            for s in sl:
                n = s.gather().shape[1]
                upd = s.gather().detach() - (self.alpha / self.nu) * diff[:, col:col + n]
                s.scatter_(s.param.data, upd)
                col += n
            self.V[name].add_(diff, alpha=self.alpha / self.nu)
            thresh = torch.full((diff.shape[0],), self.lam * math.sqrt(self.width[name]), dtype=diff.dtype)
            self.gamma[name] = self.kappa * group_shrink(self.V[name], thresh)
            inside = self.gamma[name].abs().sum(dim=1) > 0
            self.entry_step[name].masked_fill_(inside & (self.entry_step[name] < 0), self.t)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
