"""Probes behind docs/path_health.md, "Why the path is degenerate here": each prints the figures it measures.

    python tools/path_probes.py fragility            # no-retrain loss of hard keep-sets (embedded ViT)
    python tools/path_probes.py adam --lr 0.03 --nu 2000 --rate 0.0015 --steps 160 [--evaluate]
    python tools/path_probes.py planted --steps 400 [--precondition 10 | --adam-lr 0.01 --nu 6000 --rate 0.0015]
    python tools/path_probes.py snr                  # per-entry mask-gradient signal-to-noise at batch 32

Every probe runs on CPU in a few minutes (2 cores). ``adam`` runs the library's adam form
(``search(variant="adam", lr=...)``); ``planted --precondition`` runs a semi-implicit diagonal step through
``search``'s ``slbi=`` argument (an SLBI subclass), so paths and diagnostics are the library's own.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sppbench import attach_masks, methods, search, studies  # noqa: E402
from sppbench.studies.vision_table import spp_for, study_task  # noqa: E402
from sppbench.core import auto  # noqa: E402
from sppbench.core.dynamics import SLBI, shrink  # noqa: E402
from sppbench.core.search import measure_dense  # noqa: E402


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _short(d: dict) -> dict:
    keys = ("entered", "max_step_share", "t10", "t50", "t90", "loss_start", "loss_max", "loss_at_half",
            "loss_ratio_half", "healthy")
    return {k: (round(d[k], 3) if isinstance(d.get(k), float) else d.get(k)) for k in keys}


def semi_implicit_slbi(diag: dict[int, torch.Tensor]) -> type[SLBI]:
    """Paper form with the M step divided by (1 + kappa*alpha*d) per entry (d: the loss's diagonal curvature,
    ``diag[id(param)]``; 0 where absent), the semi-implicit diagonal step SPP-RIA uses (``precondition``)."""

    class SemiImplicitSLBI(SLBI):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                kappa, alpha, nu, lam = group["kappa"], group["alpha"], group["nu"], group["lam"]
                a = kappa * alpha
                for p in group["params"]:
                    st = self.state_of(p)
                    st["step"] += 1
                    g = p.grad if p.grad is not None else torch.zeros_like(p)
                    V, gamma = st["V"], st["gamma"]
                    v_old = V.clone()
                    diff = p - gamma
                    d = diag.get(id(p), torch.zeros_like(p))
                    p.sub_(a * (g + diff / nu) / (1 + a * d))
                    V.add_(diff, alpha=alpha / nu)
                    gamma.copy_(shrink(V, lam)).mul_(kappa)
                    self.track_entries(st, v_old, lam)

    return SemiImplicitSLBI


def _hard_score(m, keep, batches) -> tuple[float, float]:
    """Loss and top-1 of ``m`` with its masks set to ``keep`` (0/1; None = dense), no retraining."""
    masks = m.mask_parameters()
    with torch.no_grad():
        for g in m.groups:
            masks[g.name].copy_(keep.masks[g.name].float() if keep is not None else torch.ones_like(masks[g.name]))
        out = [(float(F.cross_entropy(m(x), y)), float((m(x).argmax(-1) == y).float().mean())) for x, y in batches]
    m.reset_masks()
    return round(sum(o[0] for o in out) / len(out), 3), round(sum(o[1] for o in out) / len(out), 3)


def fragility(args) -> None:
    """Search loss / top-1 of the hard-masked model (no retraining, dense head) for keep-sets at 90 / 75 / 50 %
    of the entries: what the search model looks like when that share has entered and the rest has decayed."""
    task = study_task("embedded-vit", 10, 10, 10)
    m = task.attach()
    batches = list(task.train_batches(64, 4, 7))  # 256 training images, not the search's first batches

    def score(keep) -> tuple[float, float]:
        return _hard_score(m, keep, batches)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        auto_path = search(m, task.train_batches(32, args.steps, 0), F.cross_entropy, steps=args.steps, seed=0)
        tuned = search(m, task.train_batches(32, args.steps, 0), F.cross_entropy, steps=args.steps, seed=0,
                       **spp_for("embedded-vit"))
    arms = {"spp auto (per-layer)": (auto_path, "per-layer"), "spp auto (global)": (auto_path, "global"),
            "spp tuned (per-layer)": (tuned, "per-layer"), "random per layer": (methods.random_path(m, 0), "per-layer"),
            "magnitude (per-layer)": (methods.magnitude_path(m), "per-layer")}
    print(json.dumps({"dense (loss, top-1)": score(None)}))
    for f in (0.9, 0.75, 0.5):
        print(json.dumps({"kept": f, **{n: score(p.keep(fraction=f, readout=ro)) for n, (p, ro) in arms.items()}}))
    m.detach_masks()


def adam(args) -> None:
    task = study_task("embedded-vit", 10, 1000 if args.evaluate else 10, 1000 if args.evaluate else 10)
    m = task.attach()
    kappa, lam = 10.0, 0.09
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        path = search(m, task.train_batches(32, args.steps, 0), F.cross_entropy, steps=args.steps, seed=0,
                      kappa=kappa, alpha=args.rate * args.nu, nu=args.nu, lam=lam, variant="adam", lr=args.lr)
    dense = m.dense_cost()[1]
    d = path.diagnostics([path.keep(macs=int(f * dense)) for f in (0.7, 0.5, 0.35)])
    M = torch.cat([x.reshape(-1) for x in path.M.values()])
    print(json.dumps({"lr": args.lr, "nu": args.nu, "v_rate": args.rate, "steps": args.steps, **_short(d),
                      "final_M_q05_q50_q95": [round(float(M.quantile(q)), 3) for q in (0.05, 0.5, 0.95)]}))
    if args.evaluate:  # does the order carry information? no-retrain scores, then the order ablation
        batches = list(task.train_batches(64, 4, 7))
        rnd = methods.random_path(m, 0)
        for f in (0.9, 0.75, 0.5):
            print(json.dumps({"kept": f, "global": _hard_score(m, path.keep(fraction=f), batches),
                              "per-layer": _hard_score(m, path.keep(fraction=f, readout="per-layer"), batches),
                              "random per layer": _hard_score(m, rnd.keep(fraction=f, readout="per-layer"), batches)}))
        rows, _ = studies.order_ablation(m, path, task, (0.7, 0.5), seed=0)
        for r in rows:
            print(json.dumps({k: r.get(k) for k in ("arm", "budget_macs_fraction", "top1_head_refit",
                                                     "jaccard_with_entry_order", "delta_vs_entry_order", "delta_lo",
                                                     "delta_hi", "mcnemar_p", "verdict")}))
    m.detach_masks()


def planted_model(seed: int = 0, grade_decades: float = 1.0, scale: float = 4.0, head: float = 5.0):
    """One-block ViT (avg pooling, no class token) whose MLP units have planted, graded output scales
    (10^0 .. 10^-grade_decades, randomly permuted); attention is scaled to ~0, so its masks barely matter."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                              num_classes=5, global_pool="avg", class_token=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        hidden = model.blocks[0].mlp.fc2.weight.shape[1]
        grade = torch.empty(hidden)
        grade[torch.randperm(hidden, generator=g)] = 10 ** (-grade_decades * torch.arange(hidden) / (hidden - 1))
        model.blocks[0].attn.proj.weight.mul_(1e-3)
        model.blocks[0].attn.proj.bias.zero_()
        model.blocks[0].mlp.fc2.weight.mul_(scale * grade.view(1, -1))
        model.blocks[0].mlp.fc2.bias.zero_()
        model.head.weight.mul_(head)
    return model.eval(), grade


def planted_problem():
    """The planted model with masks, its full batch with the dense model's soft predictions as targets
    (distillation: the dense model is the loss's optimum), the planted mask's name and each planted unit's
    known effect (the loss increase when it alone is removed). Returns (m, x, target, name, effect)."""
    from sppbench.tasks.data import preprocess

    model, _ = planted_model()
    g = torch.Generator().manual_seed(1)
    x = preprocess(torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=g), 32)
    with torch.no_grad():
        target = F.softmax(model(x), -1)
    m = attach_masks(model, input_size=32)
    name = next(n for n in m.mask_parameters() if "mlp" in n)
    P = m.mask_parameters()[name]
    for p in m.weight_parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        base = float(F.cross_entropy(m(x), target))
        effect = []
        for j in range(P.numel()):
            P[j] = 0.0
            effect.append(float(F.cross_entropy(m(x), target)) - base)
            P[j] = 1.0
    return m, x, target, name, effect


def planted(args) -> None:
    m, x, target, name, effect = planted_problem()
    P = m.mask_parameters()[name]
    P.requires_grad_(True)
    gr = torch.autograd.grad(F.cross_entropy(m(x), target), P, create_graph=True)[0]
    diag = torch.stack([torch.autograd.grad(gr[j], P, retain_graph=True)[0][j] for j in range(P.numel())]).detach()
    P.requires_grad_(False)
    batches = [(x, target)] * args.steps
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if args.adam_lr:  # the adam form at a hand setting (docs/path_health.md, planted test)
            path = search(m, batches, F.cross_entropy, steps=args.steps, seed=0, record_every=1, kappa=10.0,
                          alpha=args.rate * args.nu, nu=args.nu, lam=0.09, variant="adam", lr=args.adam_lr)
        elif args.precondition:
            meas = measure_dense(m, [(x, target)] * 2, F.cross_entropy)
            consts, _ = auto.derive(meas, args.steps)
            # K x the loss step at the same decay rate kappa*alpha/nu; the diagonal keeps the stiff units stable
            consts = {**consts, "alpha": consts["alpha"] * args.precondition, "nu": consts["nu"] * args.precondition}
            path = search(m, batches, F.cross_entropy, steps=args.steps, seed=0, record_every=1, **consts,
                          slbi=semi_implicit_slbi({id(P): diag.clamp_min(0).float()}))
        else:
            path = search(m, batches, F.cross_entropy, steps=args.steps, seed=0, record_every=1)
    et = path.entry_time[name].clone()
    entered = et >= 0
    et[~entered] = float("inf")
    print(json.dumps({"steps": args.steps, "precondition": args.precondition or None,
                      **({"adam": {"lr": args.adam_lr, "nu": args.nu, "v_rate": args.rate}} if args.adam_lr else {}),
                      "planted_entered": round(float(entered.float().mean()), 3),
                      "spearman_effect_vs_entry_order": round(_spearman(-np.array(effect), et.numpy()), 3),
                      "spearman_effect_vs_diag_curvature": round(_spearman(np.array(effect), diag.numpy()), 3),
                      "whole_path": _short(path.diagnostics()), "seconds": round(time.perf_counter() - t0, 1)}))


def snr(args) -> None:
    from sppbench.core.auto import _grads

    task = study_task("embedded-vit", 10, 10, 10)
    m = task.attach()
    ps = list(m.mask_parameters().values())
    for p in m.weight_parameters():
        p.requires_grad_(False)
    for p in ps:
        p.requires_grad_(True)
    G = torch.stack([_grads(m, ps, [b], F.cross_entropy)[0] for b in task.train_batches(32, args.batches, 0)])
    mu, sd = G.mean(0), G.std(0)
    print(json.dumps({"batches": args.batches, "batch_size": 32, "grad_rms": float(G.pow(2).mean().sqrt()),
                      "median_abs_mean": float(mu.abs().median()), "median_sd": float(sd.median()),
                      "snr_median": float((mu.abs() / sd).median()), "snr_q90": float((mu.abs() / sd).quantile(0.9))}))
    m.detach_masks()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("fragility")
    p.add_argument("--steps", type=int, default=60)
    p = sub.add_parser("adam")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--nu", type=float, default=6300.0)
    p.add_argument("--rate", type=float, default=0.015, help="V's rate alpha/nu")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--evaluate", action="store_true", help="no-retrain scores and the order ablation (1000 test)")
    p = sub.add_parser("planted")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--precondition", type=float, default=0.0, help="K: semi-implicit diagonal step, K x auto's")
    p.add_argument("--adam-lr", type=float, default=0.0, help="run the adam form with this lr (0: paper form)")
    p.add_argument("--nu", type=float, default=6000.0, help="adam form: nu")
    p.add_argument("--rate", type=float, default=0.0015, help="adam form: V's rate alpha/nu")
    p = sub.add_parser("snr")
    p.add_argument("--batches", type=int, default=12)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    {"fragility": fragility, "adam": adam, "planted": planted, "snr": snr}[args.probe](args)


if __name__ == "__main__":
    main()
