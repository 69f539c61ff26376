"""``python -m sppbench``: search, prune, quickstart and bench from a shell (and later torchrun)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

EMBEDDED = ("embedded", "embedded-vit", "embedded-swin")


def _models() -> tuple[str, ...]:
    from .tasks.profiles import PAPER_MODELS

    return EMBEDDED + PAPER_MODELS


def _check_model(name: str) -> None:
    from .errors import UnsupportedModelError
    from .tasks.models import is_spec, split_spec

    if is_spec(name):
        scheme, _ = split_spec(name)
        if scheme != "timm":
            raise UnsupportedModelError(f"{name}: search / prune / finetune / vision-table take timm:<name>; "
                                        "open_clip:<name> runs in clip-table and hf:<folder> in llm-table "
                                        "(or notebooks/30_llm_zero_shot.ipynb)")
        return
    if name not in _models():
        raise UnsupportedModelError(
            f"unknown model {name!r}; available here: {', '.join(EMBEDDED)} (stand-ins that install offline) or "
            f"a paper model ({', '.join(_models()[len(EMBEDDED):])}) with --data-root /path/to/imagenet, or any timm "
            "ViT / DeiT / Swin as timm:<name> with --weights <file> and --data-root")


def _task(name: str, img_size: int, data_root: str | None, weights: str | None = None):
    """The vision task search / prune / finetune run on (sppbench.tasks.task.VisionTask): the dense model, its
    input size, its training batches (global batch, sharded per rank) and a test top-1 with its own head."""
    from .tasks.vision import get_task

    if name not in ("embedded", "embedded-vit"):
        _check_model(name)
    return get_task("embedded-vit" if name == "embedded" else name, data_root or "", weights=weights,
                    img_size=img_size)


def _data(task) -> str:
    return "Fashion-MNIST fit split" if task.name == "embedded-vit" else task.info.get("data", "training split")


def _constants(args) -> dict:
    """The search's constants: {"constants": "auto"} (derived from the model by search(); the default
    when no --kappa / --alpha / --nu / --lam is given), or the four given ones ("given"; missing ones
    filled from the embedded ViT's tuned profile, which exists for it only; "tuned" = all four from it)."""
    from .studies.common import search_defaults

    _check_model(args.model)
    names = ("kappa", "alpha", "nu", "lam")
    given = [k for k in names if getattr(args, k) is not None]
    if getattr(args, "variant", "paper") == "adam":  # the labelled variant (docs/path_health.md)
        from . import methods
        from .errors import ConfigError

        if getattr(args, "constants", None) == "auto":
            raise ConfigError("--constants auto is derived for the paper form; the adam form takes its per-model "
                              "setting (methods.ADAM_FORMS, the default) or all of --kappa --alpha --nu --lam --adam-lr")
        if given or args.adam_lr is not None:
            missing = [f"--{k}" for k in names if getattr(args, k) is None] + (
                ["--adam-lr"] if args.adam_lr is None else [])
            if missing:
                raise ConfigError(f"the adam form takes all of --kappa --alpha --nu --lam --adam-lr or none (its "
                                  f"per-model setting); missing {', '.join(missing)}")
            return {**{k: getattr(args, k) for k in names}, "lr": args.adam_lr, "constants": "given"}
        model = "embedded-vit" if args.model == "embedded" else args.model
        c = methods.adam_constants(model, args.steps)
        return {**{k: c[k] for k in names}, "lr": c["lr"], "constants": "given"}
    if getattr(args, "adam_lr", None) is not None:
        from .errors import ConfigError

        raise ConfigError("--adam-lr is the adam form's mask step: pass it with --variant adam")
    mode = getattr(args, "constants", None) or ("given" if given else "auto")
    if mode == "auto" and getattr(args, "variant", "paper") != "paper":
        mode = "tuned" if not given else "given"  # the auto rule is derived for the paper form
    if mode == "auto":
        if given:
            from .errors import ConfigError

            raise ConfigError(f"--constants auto derives kappa, alpha, nu, lam from the model; drop "
                              f"{', '.join('--' + k for k in given)} or pass --constants given")
        return {"constants": "auto"}
    if args.model not in ("embedded", "embedded-vit"):
        missing = [k for k in names if getattr(args, k) is None]
        if missing:
            from .errors import ConfigError

            raise ConfigError(f"{args.model}: give the SPP constants {', '.join('--' + k for k in missing)} or use "
                              "--constants auto (derived from the model); tuned defaults exist for the embedded ViT "
                              "only (choose them on a validation split, see notebooks/60_kappa_lambda.ipynb)")
    d = search_defaults("embedded")["constants"]
    out = {k: (getattr(args, k) if getattr(args, k) is not None and mode != "tuned" else d[k]) for k in names}
    return {**out, "constants": "given"}


def _device(args):
    """This process's device: torchrun's rank device (joining its process group), else --device."""
    from .core import distributed as D

    if D.launched():
        return D.init_from_env()
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _check_global_batch(batch_size: int) -> tuple[int, int]:
    from .core import distributed as D
    from .errors import ConfigError

    rank, world = D.world()
    if batch_size < 1 or batch_size % world:
        raise ConfigError(f"--batch-size is the global batch and must be a positive multiple of the number of "
                          f"processes ({world}); got {batch_size}")
    return rank, world


def cmd_search(args) -> int:
    import torch.nn.functional as F

    from .core import distributed as D
    from .core.search import search
    from .errors import OutputExistsError, SearchDivergedError
    from .families import attach_masks

    out = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".ckpt")
    if out.exists() and not (args.overwrite or args.resume):
        raise OutputExistsError(f"{out} already exists; choose another --out, pass --overwrite, or --resume to "
                                f"continue the search whose checkpoint is {ckpt}")
    if ckpt.exists() and not (args.resume or args.overwrite):
        raise OutputExistsError(f"{ckpt} holds the state of an interrupted search: pass --resume to continue it, or "
                                "--overwrite to start over (the checkpoint is then replaced)")
    consts = _constants(args)
    device = _device(args)
    rank, world = _check_global_batch(args.batch_size)
    task = _task(args.model, args.img_size, args.data_root, args.weights)
    s = task.img_size
    m = attach_masks(task.dense, input_size=(3, s, s)).to(device)
    batches = task.train_batches(args.batch_size, args.steps, args.seed, shard=(rank, world))
    run = {"model": args.model, "img_size": s, "global_batch": args.batch_size, "data": _data(task),
           **({"weights": str(Path(args.weights).resolve())} if args.weights else {})}
    try:
        path = search(m, batches, F.cross_entropy, steps=args.steps, variant=args.variant, seed=args.seed,
                      log_every=args.log_every if D.is_main() else 0, checkpoint=ckpt,
                      checkpoint_every=args.checkpoint_every, resume=args.resume, run=run,
                      precision=args.precision, **consts)
    except SearchDivergedError as exc:
        kept = out.with_name(out.stem + ".diverged.json")
        if D.is_main() and exc.path is not None:
            exc.path.save(kept)
        raise SearchDivergedError(f"{str(exc).rstrip('.')}. Kept: the path up to step {(exc.step or 1) - 1} in {kept}"
                                  + (f"; the last checkpoint stays in {ckpt}" if ckpt.exists() else ""),
                                  exc.path, exc.step) from None
    path.config.update({"model": args.model, "img_size": s, "batch_size": args.batch_size, "data": _data(task),
                        **({"weights": run["weights"]} if args.weights else {}),
                        "stand_in": task.label if args.model in EMBEDDED else None})
    if D.is_main():
        path.save(out)
        ckpt.unlink(missing_ok=True)  # the path now holds everything the checkpoint did
        from .studies.common import path_health

        h = path_health(path, name=f"search {args.model}")
        entered = sum(int((t >= 0).sum()) for t in path.entry_step.values())
        print(json.dumps({"path": str(out), "steps": args.steps, "processes": world, "entered": entered,
                          **{k: path.config[k] for k in ("variant", "constants", "kappa", "alpha", "nu", "lam")
                             if k in path.config}, **({"lr": path.config["lr"]} if "lr" in path.config else {}),
                          "seconds": path.config.get("seconds"),
                          "health": {k: h.get(k) for k in ("healthy", "entered", "max_step_share", "t10", "t90",
                                                           "loss_start", "loss_at_half", "problems")}}))
    return 0


def cmd_prune(args) -> int:
    from .core.compress import compress, save_pruned
    from .core.path import SolutionPath
    from .families import attach_masks

    budgets = {k: v for k, v in (("fraction", args.fraction), ("params", args.params), ("macs", args.macs))
               if v is not None}
    # fail on a bad path, budget or output folder before building the model
    path = SolutionPath.load(args.path)
    keep = path.keep(**budgets, readout=args.readout, **({"round_to": args.round_to} if args.round_to > 1 else {}))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        from .errors import OutputExistsError

        raise OutputExistsError(f"{out} already exists and is not empty; choose another folder or pass --overwrite")
    img_size = int(path.config.get("img_size") or path.info.get("input_size", [3, 56, 56])[-1])
    task = _task(path.config.get("model", args.model), img_size, args.data_root,
                 args.weights or path.config.get("weights"))
    m = attach_masks(task.dense, input_size=(3, task.img_size, task.img_size))
    small = compress(m, keep)
    folder = save_pruned(small, args.out, overwrite=args.overwrite)
    print(json.dumps({"saved": str(folder), **keep.summary()}))
    return 0


def cmd_finetune(args) -> int:
    from .core import distributed as D
    from .core.compress import load_pruned, save_pruned
    from .core.search import finetune
    from .errors import OutputExistsError

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:  # before any training: nothing is lost
        raise OutputExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    model = load_pruned(args.pruned)  # compressed before DDP wraps it
    device = _device(args)
    rank, world = _check_global_batch(args.batch_size)
    task = _task(args.model, args.img_size, args.data_root, args.weights)
    model.to(device)
    before = task.test_top1(model) if D.is_main() else None
    batches = task.train_batches(args.batch_size, args.steps, args.seed + 1000, shard=(rank, world))
    # a NaN / inf loss stops with SearchDivergedError; nothing is saved then (the weights at that step already
    # give a non-finite loss) and --out is left as it was
    rec = finetune(model, batches, steps=args.steps, lr=args.lr, seed=args.seed,
                   log_every=args.log_every if D.is_main() else 0, precision=args.precision)
    if D.is_main():
        after = task.test_top1(model)
        save_pruned(model.cpu(), out, overwrite=args.overwrite)
        print(json.dumps({"saved": str(out), "steps": args.steps, "processes": world, "lr": args.lr,
                          "test_top1_before": round(before, 4), "test_top1_after": round(after, 4),
                          "loss_first": rec["losses"][0] if rec["losses"] else None,
                          "loss_last": rec["losses"][-1] if rec["losses"] else None, "seconds": rec["seconds"]}))
    return 0


def cmd_quickstart(args) -> int:
    from .studies.quickstart import QuickstartConfig, run_quickstart

    cfg = QuickstartConfig(steps=args.steps, fractions=tuple(args.fractions), n_test=args.n_test,
                           readout=args.readout, seed=args.seed)
    res = run_quickstart(cfg)
    print(res["table"].to_string(index=False))
    return 0


def _print_bench(res: dict) -> None:
    print(f"== {res['figure']}")
    for k, v in res.items():
        if k in ("figure", "rows", "settings"):
            continue
        print(f"   {k}: {round(v, 4) if isinstance(v, float) else v}")
    if res.get("rows"):
        import pandas as pd

        print(pd.DataFrame(res["rows"]).to_string(index=False))
    print(f"   settings: {json.dumps(res['settings'])}")


def cmd_bench(args) -> int:
    from .studies import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    what = ["search-step", "family-cost", "latency", "llm-step", "llm-time"] if args.what == "all" else [args.what]
    results = {}
    for w in what:
        if w == "search-step":
            res = bench.search_step(batch_size=args.batch_size, steps=args.steps, repeats=args.repeats,
                                    img_size=args.img_size)
        elif w == "family-cost":
            res = bench.family_cost(steps=args.search_steps, lasso_trials=args.lasso_trials)
        elif w == "latency":
            res = bench.latency(repeats=args.latency_repeats, steps=args.search_steps, round_to=tuple(args.round_to))
        elif w == "llm-step":
            res = bench.llm_step()
        else:
            res = bench.llm_time()
        results[w] = res
        _print_bench(res)
    if args.json:
        from .fileio import atomic_write_text
        from .studies.records import dumps

        atomic_write_text(args.json, dumps(results))
        print(f"written: {args.json}")
    return 0


def cmd_vision_table(args) -> int:
    from .studies.vision_table import VisionTableConfig, run_vision_table

    cfg = VisionTableConfig(model=args.model, methods=tuple(args.methods), macs_fractions=tuple(args.macs_fractions),
                            steps=args.steps, seeds=args.seeds, lasso_trials=args.lasso_trials,
                            readout=args.readout, n_val=args.n_val, n_test=args.n_test, n_refit=args.n_refit,
                            finetune_steps=args.finetune_steps, resamples=args.resamples, seed=args.seed,
                            data_root=args.data_root or "", weights=args.weights or "",
                            spp_form=args.spp_form, **{k: getattr(args, k) or 0.0 for k in ("kappa", "alpha", "nu", "lam")})
    res = run_vision_table(cfg)
    s = res["summary"]
    cols = [c for c in s.columns if c.startswith(("top1_", "delta_head_refit", "verdict_")) or c in
            ("method", "budget_macs_fraction", "seeds", "macs_fraction")]
    print(s[cols].round(4).to_string(index=False))
    for c in res["sanity"]:
        print(f"SANITY CHECK FAILED: {c['message']}")
    print(f"family cost: {res['info']['family_cost']}")
    print(f"record: {res['record']}")
    return 0


def cmd_clip_table(args) -> int:
    from .studies.clip_table import ClipTableConfig, run_clip_table

    cfg = ClipTableConfig(model=args.model, pretrained=args.pretrained, dataset=args.dataset,
                          data_root=args.data_root or "", methods=tuple(args.methods),
                          macs_fractions=tuple(args.macs_fractions), budget_towers=args.budget_towers, steps=args.steps,
                          lasso_trials=args.lasso_trials, readout=args.readout, n_val=args.n_val, n_test=args.n_test,
                          refit_steps=args.refit_steps, finetune_steps=args.finetune_steps, seed=args.seed,
                          seeds=args.seeds, resamples=args.resamples,
                          spp_form=args.spp_form, **{k: getattr(args, k) or 0.0 for k in ("kappa", "alpha", "nu", "lam")})
    if cfg.model != "embedded-clip":
        from .tasks.profiles import clip_check_ready, clip_profile

        clip_check_ready(clip_profile(cfg.model, cfg.pretrained), cfg.dataset, cfg.data_root or None, min_gpus=0)
    res = run_clip_table(cfg)
    cols = [c for c in ("method", "budget_macs_fraction", "macs_image_fraction", "macs_text_fraction", "readout",
                        "no_retrain_i2t_r1", "no_retrain_t2i_r1", "refit_i2t_r1", "refit_t2i_r1", "finetuned_i2t_r1",
                        "finetuned_t2i_r1") if c in res["table"]]
    print(res["table"][cols].round(3).to_string(index=False))
    print(f"record: {res['record']}")
    return 0


def cmd_llm_table(args) -> int:
    from .studies.llm_table import LLMTableConfig, run_llm_table

    cfg = LLMTableConfig(model=args.model, methods=tuple(args.methods), patterns=tuple(args.patterns),
                         n_samples=args.n_samples, seqlen=args.seqlen, eval_seqlen=args.eval_seqlen,
                         eval_windows=args.eval_windows, seeds=tuple(args.seeds),
                         structured_methods=tuple(args.structured_methods),
                         structured_fractions=tuple(args.structured_fractions), structured_steps=args.structured_steps,
                         zero_shot_tasks=tuple(args.zero_shot_tasks), zero_shot_docs=args.zero_shot_docs,
                         resamples=args.resamples).resolved()  # a bad model, method or task stops before any work
    res = run_llm_table(cfg)
    cols = [c for c in ("method", "pattern", "seeds", "perplexity", "perplexity_sd", "ratio_vs_ria", "verdict_vs_ria")
            if c in res["summary"]]
    print(res["summary"][cols].to_string(index=False) if cols else res["summary"].to_string(index=False))
    print(f"record: {res['record']}")
    return 0


def cmd_report(args) -> int:
    from .report.build import build_report

    rep = build_report(root=args.runs, out=args.out)
    for kind in ("tables", "figures"):
        print(f"{kind}: {len(rep[kind])}")
        for f in rep[kind]:
            print(f"  {f}")
    for study, why in rep["missing"].items():
        print(f"missing {study}: {why}")
    print(f"index: {rep['index']}")
    return 0


def cmd_paper_check(args) -> int:
    from .errors import SppBenchError
    from .tasks.models import split_spec
    from .tasks.profiles import (
        CLIP_PAPER_MODELS,
        PAPER_MODELS,
        check_ready,
        clip_check_ready,
        clip_profile,
        hf_check_ready,
        vision_profile,
    )

    import os

    from .paper_plan import PlanError, json_file

    try:  # per-model weights of the paper plan (a file or tag given here applies to every model checked)
        planned = json_file(os.environ, "SPPBENCH_PAPER_WEIGHTS")
    except PlanError as exc:
        raise SppBenchError(str(exc)) from None
    problems = []
    for name in args.models or PAPER_MODELS + CLIP_PAPER_MODELS:
        try:
            scheme, _ = split_spec(name)
            if name in CLIP_PAPER_MODELS or scheme == "open_clip":
                clip_check_ready(clip_profile(name, args.pretrained or planned.get(name)), args.dataset, args.data_root,
                                 min_gpus=args.min_gpus)
            elif scheme == "hf":
                hf_check_ready(name, min_gpus=args.min_gpus)
            else:
                check_ready(vision_profile(name, args.weights or planned.get(name)), args.data_root,
                            min_gpus=args.min_gpus)
            print(f"ready: {name}")
        except SppBenchError as exc:
            problems.append(str(exc))
    if problems:
        raise SppBenchError("\n".join(problems))
    return 0


def _positive(kind, zero: bool = False):
    what = f"{'a non-negative' if zero else 'a positive'} {kind.__name__}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= 0 if zero else value > 0) or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def _fraction(text: str) -> float:
    """A share in (0, 1] (a budget fraction, a MAC fraction)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


_SEED = _positive(int, zero=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sppbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run one SLBI search and save its solution path (JSON); torchrun-able")
    s.add_argument("--model", default="embedded",
                   help="embedded (= embedded-vit), embedded-swin, a paper model (e.g. deit_small_patch16_224) "
                        "with --data-root, or timm:<name> (any timm ViT / DeiT / Swin) with --weights and --data-root")
    s.add_argument("--data-root", default=None, help="paper models: the ImageNet folder (else $SPPBENCH_IMAGENET)")
    s.add_argument("--weights", default=None, help="paper models / timm:<name>: a local weights file (state dict)")
    s.add_argument("--img-size", type=_positive(int), default=56, help="embedded ViT only: input size (multiple of 14)")
    s.add_argument("--steps", type=_positive(int), default=100)
    s.add_argument("--batch-size", type=_positive(int), default=32, help="the GLOBAL batch (split across torchrun processes)")
    s.add_argument("--constants", choices=("auto", "given", "tuned"), default=None,
                   help="auto (default when no constant is given): derived from the model's mask gradients and "
                        "curvature (docs/auto_constants.md); given: --kappa/--alpha/--nu/--lam (missing ones from the "
                        "embedded profile); tuned: the embedded ViT's tuned profile")
    for k in ("kappa", "alpha", "nu", "lam"):
        s.add_argument(f"--{k}", type=_positive(float), default=None, help="a hand-given constant (implies --constants given)")
    s.add_argument("--variant", choices=("paper", "official", "adam"), default="paper",
                   help="the SLBI form; adam = the labelled variant whose path is healthy on the embedded stand-ins "
                        "(its per-model setting at --steps unless all constants and --adam-lr are given; "
                        "docs/path_health.md)")
    s.add_argument("--adam-lr", type=_positive(float), default=None, help="adam form only: the Adam step of the masks")
    s.add_argument("--seed", type=_SEED, default=0)
    s.add_argument("--log-every", type=_positive(int, zero=True), default=10, help="progress line every N steps (0: none)")
    s.add_argument("--out", type=Path, required=True, help="where to write the path (JSON)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--checkpoint", type=Path, default=None, help="search state file (default: OUT.ckpt)")
    s.add_argument("--checkpoint-every", type=_positive(int, zero=True), default=10,
                   help="write the search state every N steps (0: never)")
    s.add_argument("--resume", action="store_true", help="continue from --checkpoint (same settings)")
    s.add_argument("--device", default="auto", help="single process: auto (cuda if present), cpu, cuda:0, ...")
    s.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="the forward pass: auto = bf16 autocast on a CUDA GPU that supports it, else fp32; masks, "
                        "SLBI state and weights stay fp32")
    s.set_defaults(fn=cmd_search)

    r = sub.add_parser("prune", help="read a budget off a saved path, compress the model and save it")
    r.add_argument("--path", type=Path, required=True)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=_fraction, help="share of entries kept per pool, in (0, 1]")
    g.add_argument("--params", type=_positive(int), help="parameter budget")
    g.add_argument("--macs", type=_positive(int), help="multiply-adds per sample budget")
    r.add_argument("--readout", choices=("global", "per-layer"), default="global")
    r.add_argument("--round-to", type=_positive(int), default=1,
                   help="with --params / --macs: kept widths in multiples of this (e.g. 8; faster kernels)")
    r.add_argument("--model", default="embedded", help="used when the path does not name its model")
    r.add_argument("--data-root", default=None, help="paper models: the ImageNet folder")
    r.add_argument("--weights", default=None, help="timm:<name>: the weights file (default: the one the search used)")
    r.add_argument("--out", type=Path, required=True, help="folder for spec.json + model.safetensors")
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(fn=cmd_prune)

    f = sub.add_parser("finetune", help="fine-tune a pruned model (the shared recipe) and save it; torchrun-able")
    f.add_argument("--pruned", type=Path, required=True, help="a folder written by `prune` / save_pruned")
    f.add_argument("--model", default="embedded", help="whose training data to use (as for search)")
    f.add_argument("--data-root", default=None)
    f.add_argument("--weights", default=None, help="paper models / timm:<name>: the dense weights file (for its data "
                   "and input size only; the pruned weights come from --pruned)")
    f.add_argument("--img-size", type=_positive(int), default=56)
    f.add_argument("--steps", type=_positive(int), default=100)
    f.add_argument("--batch-size", type=_positive(int), default=32, help="the GLOBAL batch (split across torchrun processes)")
    f.add_argument("--lr", type=_positive(float), default=3e-6,
                   help="AdamW peak lr (default: chosen on the embedded val split)")
    f.add_argument("--seed", type=_SEED, default=0)
    f.add_argument("--log-every", type=_positive(int, zero=True), default=10, help="progress line every N steps (0: none)")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("--device", default="auto")
    f.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="the forward pass: auto = bf16 autocast on a CUDA GPU that supports it, else fp32")
    f.set_defaults(fn=cmd_finetune)

    q = sub.add_parser("quickstart", help="the quickstart study: one search, several budgets, a record")
    q.add_argument("--steps", type=_positive(int), default=100)
    q.add_argument("--fractions", type=_fraction, nargs="+", default=[0.9, 0.7, 0.5, 0.4, 0.3])
    q.add_argument("--n-test", type=_positive(int), default=1000)
    q.add_argument("--readout", choices=("global", "per-layer"), default="global")
    q.add_argument("--seed", type=_SEED, default=0)
    q.set_defaults(fn=cmd_quickstart)

    from .methods.structured import METHODS
    from .studies.vision_table import VisionTableConfig

    TABLE_METHODS = VisionTableConfig().methods + tuple(m for m in METHODS if m not in VisionTableConfig().methods)
    v = sub.add_parser("vision-table", help="every method on the same model, budgets (by MACs) and fine-tune")
    v.add_argument("--model", default="embedded-vit",
                   help="embedded-vit, embedded-swin, a paper model (e.g. deit_small_patch16_224) with --data-root, "
                        "or timm:<name> with --weights and --data-root")
    v.add_argument("--methods", nargs="+", default=list(TABLE_METHODS), choices=TABLE_METHODS,
                   help="pruning methods and SPP's order arms (spp-final-m, spp-final-v, random-spp-widths: rows "
                        "read off spp's own search, after spp)")
    v.add_argument("--macs-fractions", type=_fraction, nargs="+", default=[0.7, 0.5, 0.35])
    v.add_argument("--steps", type=_positive(int), default=160)
    v.add_argument("--spp-form", choices=("", "adam", "paper"), default="",
                   help="the spp rows' search: adam (labelled variant) or paper; default: adam on the embedded "
                        "stand-ins, paper on the paper models (docs/path_health.md)")
    v.add_argument("--seeds", type=_positive(int), default=3,
                   help="seeds of every method with randomness (magnitude and tp-magnitude run once)")
    v.add_argument("--lasso-trials", type=_positive(int), default=6, help="Lasso tries per seed, shared by the budgets")
    v.add_argument("--readout", choices=("val", "global", "per-layer"), default="val")
    v.add_argument("--n-val", type=_positive(int), default=1000)
    v.add_argument("--n-test", type=_positive(int), default=10000)
    v.add_argument("--n-refit", type=_positive(int), default=3000)
    v.add_argument("--finetune-steps", type=_positive(int, zero=True), default=0, help="0 = no fine-tune column")
    v.add_argument("--resamples", type=_positive(int), default=2000, help="paired bootstrap resamples")
    v.add_argument("--seed", type=_SEED, default=0)
    v.add_argument("--data-root", default=None, help="paper profile: the ImageNet folder (else $SPPBENCH_IMAGENET)")
    v.add_argument("--weights", default=None, help="paper models / timm:<name>: a local weights file (state dict)")
    for k in ("kappa", "alpha", "nu", "lam"):
        v.add_argument(f"--{k}", type=_positive(float), default=None, help="SPP constant (all four or none; none = "
                       "derived from the model on real models, sppbench.core.auto)")
    v.set_defaults(fn=cmd_vision_table)

    t = sub.add_parser("clip-table", help="every method on a CLIP dual encoder: per-tower costs, retrieval R@1/5/10")
    t.add_argument("--model", default="embedded-clip", help="embedded-clip, ViT-B-32 / ViT-L-14, or open_clip:<name> "
                   "with --pretrained and --data-root")
    t.add_argument("--pretrained", default="openai", help="paper models: open_clip pretrained tag or checkpoint file")
    t.add_argument("--dataset", default="coco", choices=("coco", "flickr30k"))
    t.add_argument("--data-root", default=None, help="paper models: the dataset folder (else $SPPBENCH_COCO / ...)")
    t.add_argument("--methods", nargs="+", default=["spp", "lasso", "dessilbi", "magnitude", "random"],
                   choices=[m for m in METHODS if not m.startswith("tp-")])
    t.add_argument("--macs-fractions", type=_fraction, nargs="+", default=[0.7, 0.5, 0.35])
    t.add_argument("--budget-towers", default="joint", choices=("joint", "image", "text", "each"))
    t.add_argument("--steps", type=_positive(int), default=160)
    t.add_argument("--spp-form", choices=("", "adam", "paper"), default="",
                   help="the spp rows' search: adam (labelled variant) or paper; default: adam on the stand-in")
    t.add_argument("--lasso-trials", type=_positive(int), default=3)
    t.add_argument("--seeds", type=_positive(int), default=3,
                   help="seeds of every method with randomness (magnitude runs once)")
    t.add_argument("--resamples", type=_positive(int), default=2000, help="paired bootstrap resamples")
    t.add_argument("--readout", choices=("val", "global", "per-layer"), default="val")
    t.add_argument("--n-val", type=_positive(int), default=500)
    t.add_argument("--n-test", type=_positive(int), default=1000)
    t.add_argument("--refit-steps", type=_positive(int, zero=True), default=0,
                   help="projection re-fit steps; 0 = the task's recipe (the stand-in: its dense projections' own)")
    t.add_argument("--finetune-steps", type=_positive(int, zero=True), default=40)
    t.add_argument("--seed", type=_SEED, default=0)
    for k in ("kappa", "alpha", "nu", "lam"):
        t.add_argument(f"--{k}", type=_positive(float), default=None, help="SPP constant (all four or none; none = "
                       "derived from the model on real models, sppbench.core.auto)")
    t.set_defaults(fn=cmd_clip_table)

    lt = sub.add_parser("llm-table", help="layer-wise LLM pruners (Wanda, RIA, SPP-RIA, ...) on one causal LM: "
                                          "perplexity, zero-shot tasks, the structured variant")
    lt.add_argument("--model", default="smollm2", help="smollm2 (the embedded stand-in) or hf:<folder> (a local "
                    "LLaMA / Mistral / Qwen2 folder written by save_pretrained)")
    lt.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "ria", "spp-ria", "sparsegpt"])
    lt.add_argument("--patterns", nargs="+", default=["0.5", "2:4"], help="sparsity (unstructured) or N:M")
    lt.add_argument("--n-samples", type=_positive(int), default=32, help="calibration windows per seed")
    lt.add_argument("--seqlen", type=_positive(int), default=256, help="calibration window length (tokens)")
    lt.add_argument("--eval-seqlen", type=_positive(int), default=256)
    lt.add_argument("--eval-windows", type=_positive(int), default=128)
    lt.add_argument("--seeds", type=_SEED, nargs="+", default=[0, 1, 2], help="calibration draws")
    lt.add_argument("--structured-methods", nargs="*", default=["spp", "magnitude"])
    lt.add_argument("--structured-fractions", type=_fraction, nargs="+", default=[0.8, 0.6])
    lt.add_argument("--structured-steps", type=_positive(int), default=20)
    lt.add_argument("--zero-shot-tasks", nargs="*", default=[], help="lm-eval tasks on local data (docs/zero_shot.md)")
    lt.add_argument("--zero-shot-docs", type=_positive(int, zero=True), default=50, help="documents per task (0: all)")
    lt.add_argument("--resamples", type=_positive(int), default=2000)
    lt.set_defaults(fn=cmd_llm_table)

    c = sub.add_parser("paper-check", help="say whether the paper profile can run here (data, weights, GPUs)")
    c.add_argument("--models", nargs="*", default=None)
    c.add_argument("--dataset", default="coco", choices=("coco", "flickr30k"), help="CLIP models: which dataset")
    c.add_argument("--data-root", default=None)
    c.add_argument("--min-gpus", type=_positive(int, zero=True), default=1)
    c.add_argument("--weights", default=None, help="timm:<name> / paper models: a local weights file")
    c.add_argument("--pretrained", default=None, help="open_clip:<name>: an open_clip tag or a checkpoint file")
    c.set_defaults(fn=cmd_paper_check)

    r = sub.add_parser("report", help="tables and figures from the run records only (results/tables, results/figures)")
    r.add_argument("--runs", default=None, help="records folder (default: results/runs of this checkout)")
    r.add_argument("--out", default=None, help="output folder (default: the records folder's parent)")
    r.set_defaults(fn=cmd_report)

    b = sub.add_parser("bench", help="print the performance figures (issue 8) with their settings")
    b.add_argument("what", choices=("all", "search-step", "family-cost", "latency", "llm-step", "llm-time"))
    b.add_argument("--batch-size", type=_positive(int), default=32, help="search-step: batch")
    b.add_argument("--steps", type=_positive(int), default=5, help="search-step: steps per timed block")
    b.add_argument("--repeats", type=_positive(int), default=5, help="search-step: timed blocks")
    b.add_argument("--img-size", type=_positive(int), default=56)
    b.add_argument("--search-steps", type=_positive(int), default=30, help="family-cost / latency: search length")
    b.add_argument("--lasso-trials", type=_positive(int), default=1, help="family-cost: Lasso runs per budget")
    b.add_argument("--latency-repeats", type=_positive(int), default=20)
    b.add_argument("--round-to", type=_positive(int), nargs="+", default=[1, 8], help="latency: SPP width rounding")
    b.add_argument("--threads", type=_positive(int), default=None)
    b.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .core import distributed as D
    from .errors import SppBenchError

    try:
        return args.fn(args)
    except SppBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main())
