"""Constants derived from the model: ``search(..., constants="auto")`` (docs/auto_constants.md).

At the dense model (every mask 1) and on the first few batches of the search's own data, measure:

* ``grad_rms`` / ``grad_abs_mean``: the per-entry scale of the mask gradient of the search loss;
* ``lambda_max``: the largest curvature of the loss in mask space (power iteration on finite-difference
  Hessian-vector products, the same batches every iteration);
* ``h_uniform``: the curvature along the uniform direction (every mask shrunk together), the
  direction in which the coupling term pulls a model whose masks the loss does not hold.

With a = kappa*alpha (loss step), r = kappa*alpha/nu (the rate at which the coupling pulls an
unheld mask towards Gamma = 0) and theta = kappa*lam (entry threshold; V's ceiling for an unheld mask
is 1 in units of 1/kappa), the paper form's path has these scales (method notes in docs/):

* a held entry (M ~ 1) enters at step theta / r, an unheld one (M decaying as (1-r)^t) at
  -ln(1 - theta) / r;
* the iteration is stable for a < 2 / (lambda_max + 1/nu);
* at equilibrium the coupling shrinks the model along the uniform direction by
  delta_u = 1 / (1 + h_uniform * nu).

``derive`` sets theta = 0.9 and r so that the unheld entries enter at 0.8 of the requested steps (the
path spans the search), a = 0.5 / lambda_max (half the stability limit), nu = a / r, kappa = 10. It also
reports the uniform shrink this implies and the number of steps the paper form would need to keep it
under 5% (``steps_to_hold``). When that exceeds the steps asked, the paper form cannot hold the
model while the path forms; the record says so and ``search`` warns.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch

from ..errors import AutoConstantsError
from .batches import forward_loss

RULE = ("theta = kappa*lam = 0.9; r = kappa*alpha/nu = -ln(0.1)/(0.8*steps) (unheld entries enter at 0.8 of the "
        "steps); a = kappa*alpha = 0.5/lambda_max (half the stability limit), capped so that a*max|grad| <= 0.5; "
        "nu = a/r; kappa = 10")
THETA = 0.9            # kappa * lam
SPAN = 0.8             # unheld entries enter at this share of the steps
STEP_SHARE = 0.5       # a = STEP_SHARE * (1 / lambda_max) ... half of the stability limit 2 / lambda_max
KAPPA = 10.0
HOLD_SHRINK = 0.05     # tolerated uniform shrink of a held model
MEASURE_BATCHES = 2
POWER_ITERS = 6
# Checks on the measurement and bounds on what it implies (docs/auto_constants.md, "Checks and bounds"):
GRAD_FLOOR = 1e-6      # mask-gradient rms / |dense loss| below this: the masks barely change the loss
CURVATURE_DRIFT = 0.5  # the power iteration's last two curvature estimates differ by more than this share: noise
FIRST_MOVE = 0.5       # the first loss step a * max|grad| moves no mask by more than this (a is capped to hold it)


def _grads(m, masks: Sequence[torch.Tensor], batches: list, loss_fn: Callable) -> tuple[torch.Tensor, float]:

    total = None
    loss_sum = 0.0
    for b in batches:
        loss = forward_loss(m, b, loss_fn)
        g = torch.autograd.grad(loss, list(masks))
        flat = torch.cat([x.reshape(-1) for x in g]).double()
        total = flat if total is None else total + flat
        loss_sum += float(loss.detach())
    total, loss_sum = total / len(batches), loss_sum / len(batches)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # under torchrun each rank holds a slice of every global batch: average, as DDP does for the search
        world = torch.distributed.get_world_size()
        both = torch.cat([total, torch.tensor([loss_sum], dtype=total.dtype)]).to(masks[0].device)
        torch.distributed.all_reduce(both)
        both = (both / world).cpu()
        total, loss_sum = both[:-1], float(both[-1])
    return total, loss_sum


def _set(masks: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    with torch.no_grad():
        off = 0
        for p in masks:
            n = p.numel()
            p.copy_(flat[off:off + n].reshape(p.shape).to(p.dtype))
            off += n


def measure(m, batches: list, loss_fn: Callable, *, power_iters: int = POWER_ITERS, eps: float = 1e-3,
            seed: int = 0) -> dict:
    """Gradient and curvature scales of the masks at the dense model, on ``batches`` (a short list).

    Leaves every mask at 1. Costs (2 + 2 * (power_iters + 1)) forward/backward passes per batch."""
    masks = list(m.mask_parameters().values())
    t0 = time.perf_counter()
    base = torch.cat([p.detach().reshape(-1) for p in masks]).double()
    n = base.numel()
    try:
        g0, loss0 = _grads(m, masks, batches, loss_fn)
        per_batch = []
        for b in batches:
            gb, _ = _grads(m, masks, [b], loss_fn)
            per_batch.append(gb)
        gstack = torch.stack(per_batch)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            v = v / v.norm()
            _set(masks, base + eps * v)
            gp, _ = _grads(m, masks, batches, loss_fn)
            _set(masks, base - eps * v)
            gm, _ = _grads(m, masks, batches, loss_fn)
            _set(masks, base)
            return (gp - gm) / (2 * eps)

        u = torch.ones(n, dtype=torch.float64) / math.sqrt(n)
        h_uniform = float(hvp(u) @ u)
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        v /= v.norm()
        trace = []
        for _ in range(power_iters):
            hv = hvp(v)
            trace.append(float(hv @ v))
            v = hv / hv.norm().clamp_min(1e-30)
    finally:
        _set(masks, base)
    return {"batches": len(batches), "loss_dense": loss0,
            "grad_rms": float(g0.pow(2).mean().sqrt()), "grad_abs_mean": float(g0.abs().mean()),
            "grad_abs_median": float(g0.abs().median()), "grad_abs_max": float(g0.abs().max()),
            "grad_snr_median": (float((gstack.mean(0).abs() / gstack.std(0).clamp_min(1e-30)).median())
                                if len(batches) > 1 else None),
            "lambda_max": abs(trace[-1]) if trace else 0.0, "lambda_trace": trace, "h_uniform": h_uniform,
            "entries": n, "power_iters": power_iters,
            "seconds": round(time.perf_counter() - t0, 2)}


def check(meas: dict) -> None:
    """Stop before any search step when ``measure``'s figures cannot drive the rule: AutoConstantsError, one line
    saying what was found and what to do."""
    loss, g = meas["loss_dense"], meas["grad_rms"]
    hand = "pass kappa, alpha, nu, lam yourself (or variant='adam' with lr)"
    if not all(math.isfinite(x) for x in (loss, g, meas["lambda_max"], meas["h_uniform"])):
        raise AutoConstantsError(f"auto constants: the dense model's loss, mask gradient or curvature is not finite on "
                                 f"the search's first batches (loss {loss}, gradient rms {g}); check the data and the "
                                 "loss function")
    if g <= GRAD_FLOOR * max(abs(loss), 1e-12):
        raise AutoConstantsError(f"auto constants: the masks barely change this model's loss (mask-gradient rms {g:.3g} "
                                 f"against a loss of {loss:.3g}, below {GRAD_FLOOR:g} of it), so there is nothing to "
                                 "rank: is the model random-init, or its LayerScale at its initial value? Search trained "
                                 f"weights, or {hand}")
    trace = meas.get("lambda_trace") or [meas["lambda_max"]]
    last, prev = trace[-1], trace[-2] if len(trace) > 1 else trace[-1]
    if last == 0 or abs(last - prev) > CURVATURE_DRIFT * abs(last):  # a settled negative estimate is real: |it| is used
        raise AutoConstantsError(f"auto constants: the curvature estimate is noise (power iteration "
                                 f"{', '.join(f'{x:.3g}' for x in trace[-3:])}): the finite-difference Hessian does "
                                 f"not resolve this model's mask curvature; measure on more or larger batches, or {hand}")


def derive(meas: dict, steps: int, *, kappa: float = KAPPA, theta: float = THETA) -> tuple[dict, dict]:
    """Paper-form constants for ``steps`` from ``measure``'s scales; returns (constants, what they imply).

    ``kappa`` and ``theta`` (= kappa * lam, the entry threshold in units of 1/kappa) default to the rule's
    10 and 0.9; the kappa/lambda study passes each grid cell's, so every cell's path spans the same steps.
    theta must lie in (0, 1): at theta >= 1 an entry the loss does not hold never enters."""
    if not (0 < theta < 1):
        raise ValueError(f"theta = kappa*lam must lie in (0, 1) for the path to span the search, got {theta!r}: "
                         "at kappa*lam >= 1 an entry the loss does not hold never enters")
    if not (math.isfinite(kappa) and kappa > 0):
        raise ValueError(f"kappa must be a positive finite number, got {kappa!r}")
    check(meas)
    lmax = meas["lambda_max"]
    a = STEP_SHARE / lmax
    gmax = meas.get("grad_abs_max", 0.0)
    capped = gmax > 0 and a * gmax > FIRST_MOVE
    if capped:
        a = FIRST_MOVE / gmax
    r = -math.log(1 - theta) / (SPAN * steps)
    nu = a / r
    consts = {"kappa": kappa, "alpha": a / kappa, "nu": nu, "lam": theta / kappa}
    if not all(math.isfinite(v) and v > 0 for v in consts.values()):
        raise AutoConstantsError(f"auto constants out of bounds ({consts}); pass kappa, alpha, nu, lam yourself")
    h = max(meas["h_uniform"], 1e-12)
    shrink = 1.0 / (1.0 + h * nu)
    nu_hold = (1.0 / HOLD_SHRINK - 1.0) / h
    steps_to_hold = int(math.ceil(-math.log(1 - theta) / SPAN * nu_hold / a))
    implied = {"loss_step": a, "loss_step_capped": capped, "first_move": a * gmax, "decay_rate": r, "threshold": theta,
               "held_entry_step": theta / r, "unheld_entry_step": -math.log(1 - theta) / r,
               "stability_limit_loss_step": 2.0 / (lmax + 1.0 / nu),
               "condition_number": lmax / h,
               "predicted_uniform_shrink": shrink, "steps_to_hold": steps_to_hold,
               "can_hold": steps_to_hold <= steps}
    return consts, implied
