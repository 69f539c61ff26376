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

Official form (``variant="official"``, to compare with the released DeiT code): M moves by Adam
on the task loss alone, V <- V + s_k (M_new - Gamma) with s_k Adam's bias-corrected step size,
Gamma = kappa * max(shrink(V, lam), 0) (one-sided; the released code has kappa = 1, lam = 3).

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
                 variant: str = "paper", betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr: float | None = None):
        check_constants(kappa, alpha, nu, lam, variant, lr)
        defaults = dict(kappa=float(kappa), alpha=float(alpha), nu=float(nu), lam=float(lam), variant=variant,
                        betas=betas, eps=eps, lr=None if lr is None else float(lr))
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
                    b1, b2 = group["betas"]
                    if "exp_avg" not in st:
                        st["exp_avg"] = torch.zeros_like(p)
                        st["exp_avg_sq"] = torch.zeros_like(p)
                    m, v2 = st["exp_avg"], st["exp_avg_sq"]
                    m.mul_(b1).add_(grad, alpha=1 - b1)
                    v2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                    step_size = alpha * math.sqrt(bc2) / bc1
                    denom = v2.sqrt().add_(group["eps"] * math.sqrt(bc2))
                    p.addcdiv_(m, denom, value=-step_size)
                    V.add_(p - gamma, alpha=step_size)
                    gamma.copy_(shrink(V, lam).clamp_(min=0)).mul_(kappa)
                self.track_entries(st, v_old, lam, signed=group["variant"] == "official")
        return loss

    @staticmethod
    def track_entries(st: dict, v_old: torch.Tensor, lam: float, signed: bool = False) -> None:
        """After a step (``st["step"]`` already advanced, ``st["V"]`` / ``st["gamma"]`` updated): record the entries
        that just entered supp(Gamma) -- ``entry_step``, the fractional ``entry_time`` where V (|V|, or signed V
        for the one-sided form) crossed ``lam`` -- and add one to ``support_steps`` of every entry inside.
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
