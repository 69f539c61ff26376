"""Split Linearized Bregman Iteration (SLBI) on mask tensors: the discretised differential inclusion.

Paper form (method.md section 3), per mask tensor M with sparse twin Gamma and auxiliary V:

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

Each parameter's state exposes ``V``, ``gamma``, ``entry_step`` (the first step at which the entry
entered supp(Gamma); -1 = not entered), ``support_steps`` (steps spent in the support) and ``step``.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch

from .errors import SearchDivergedError

VARIANTS = ("paper", "official")


def shrink(v: torch.Tensor, lam: float) -> torch.Tensor:
    """Soft threshold: sign(v) * max(|v| - lam, 0)."""
    return torch.sign(v) * torch.clamp(v.abs() - lam, min=0.0)


def check_constants(kappa: float, alpha: float, nu: float, lam: float, variant: str = "paper") -> None:
    """Reject impossible constants; warn on the ones that make the iteration unstable."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SLBI variant {variant!r}; use one of {VARIANTS}")
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
                 variant: str = "paper", betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        check_constants(kappa, alpha, nu, lam, variant)
        defaults = dict(kappa=float(kappa), alpha=float(alpha), nu=float(nu), lam=float(lam), variant=variant,
                        betas=betas, eps=eps)
        super().__init__(params, defaults)

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["V"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["gamma"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["entry_step"] = torch.full(p.shape, -1, dtype=torch.long, device=p.device)
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
                st = self._state(p)
                st["step"] += 1
                t = st["step"]
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                V, gamma = st["V"], st["gamma"]
                if group["variant"] == "paper":
                    diff = p - gamma
                    p.add_(grad, alpha=-kappa * alpha).add_(diff, alpha=-kappa * alpha / nu)
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
                inside = gamma != 0
                st["entry_step"].masked_fill_(inside & (st["entry_step"] < 0), t)
                st["support_steps"].add_(inside.long())
        return loss

    def support(self) -> list[torch.Tensor]:
        """Boolean supp(Gamma) of every parameter, in parameter order."""
        return [self._state(p)["gamma"] != 0 for g in self.param_groups for p in g["params"]]
