"""``python -m sppbench``: search, prune, quickstart and bench from a shell (and later torchrun)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODELS = ("embedded",)


def _model(name: str, img_size: int):
    if name != "embedded":
        from .errors import UnsupportedModelError

        raise UnsupportedModelError(
            f"unknown model {name!r}; available here: {', '.join(MODELS)} (the DINOv2 ViT-S/14 Fashion-MNIST "
            "classifier). From Python, any timm ViT/DeiT works: sppbench.attach_masks(timm.create_model(...))")
    from .embedded import embedded_classifier

    return embedded_classifier(img_size)


def _constants(args) -> dict:
    from .experiments import search_defaults

    d = search_defaults("embedded")["constants"]
    return {k: (getattr(args, k) if getattr(args, k) is not None else d[k]) for k in ("kappa", "alpha", "nu", "lam")}


def cmd_search(args) -> int:
    import torch.nn.functional as F

    from . import attach_masks, search
    from .data import Batches

    ec = _model(args.model, args.img_size)
    m = attach_masks(ec.model, input_size=(3, args.img_size, args.img_size))
    consts = _constants(args)
    batches = Batches(ec.splits.fit, args.img_size, args.batch_size, args.steps, seed=args.seed)
    path = search(m, batches, F.cross_entropy, steps=args.steps, variant=args.variant, seed=args.seed,
                  log_every=args.log_every, **consts)
    path.config.update({"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size,
                        "data": "Fashion-MNIST fit split", "stand_in": ec.info["label"]})
    out = path.save(args.out)
    entered = sum(int((t >= 0).sum()) for t in path.entry_step.values())
    print(json.dumps({"path": str(out), "steps": args.steps, "entered": entered, **consts,
                      "seconds": path.config.get("seconds")}))
    return 0


def cmd_prune(args) -> int:
    from . import attach_masks, compress, save_pruned
    from .path import SolutionPath

    budgets = {k: v for k, v in (("fraction", args.fraction), ("params", args.params), ("macs", args.macs))
               if v is not None}
    # fail on a bad path, budget or output folder before building the model
    path = SolutionPath.load(args.path)
    keep = path.keep(**budgets, readout=args.readout)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        from .errors import OutputExistsError

        raise OutputExistsError(f"{out} already exists and is not empty; choose another folder or pass --overwrite")
    img_size = int(path.config.get("img_size") or path.info.get("input_size", [3, 56, 56])[-1])
    ec = _model(path.config.get("model", args.model), img_size)
    m = attach_masks(ec.model, input_size=(3, img_size, img_size))
    small = compress(m, keep)
    folder = save_pruned(small, args.out, overwrite=args.overwrite)
    print(json.dumps({"saved": str(folder), **keep.summary()}))
    return 0


def cmd_quickstart(args) -> int:
    from .experiments import QuickstartConfig, run_quickstart

    cfg = QuickstartConfig(steps=args.steps, fractions=tuple(args.fractions), n_test=args.n_test,
                           readout=args.readout, seed=args.seed)
    res = run_quickstart(cfg)
    print(res["table"].to_string(index=False))
    return 0


def cmd_bench(args) -> int:
    from .bench import search_step

    if args.what == "search-step":
        res = search_step(batch_size=args.batch_size, steps=args.steps, repeats=args.repeats,
                          img_size=args.img_size, threads=args.threads)
        print(json.dumps(res, indent=1))
    return 0


def cmd_vision_table(args) -> int:
    from .vision import VisionTableConfig, run_vision_table, summarize

    cfg = VisionTableConfig(model=args.model, methods=tuple(args.methods), macs_fractions=tuple(args.macs_fractions),
                            steps=args.steps, random_seeds=args.random_seeds, lasso_trials=args.lasso_trials,
                            readout=args.readout, n_val=args.n_val, n_test=args.n_test, n_refit=args.n_refit,
                            finetune_steps=args.finetune_steps, seed=args.seed, data_root=args.data_root or "",
                            **{k: getattr(args, k) or 0.0 for k in ("kappa", "alpha", "nu", "lam")})
    res = run_vision_table(cfg)
    s = summarize(res["table"])
    print(s.round(4).to_string(index=False))
    print(f"family cost: {res['info']['family_cost']}")
    print(f"record: {res['record']}")
    return 0


def cmd_clip_table(args) -> int:
    from .clip_table import ClipTableConfig, run_clip_table

    cfg = ClipTableConfig(model=args.model, pretrained=args.pretrained, dataset=args.dataset,
                          data_root=args.data_root or "", methods=tuple(args.methods),
                          macs_fractions=tuple(args.macs_fractions), budget_towers=args.budget_towers, steps=args.steps,
                          lasso_trials=args.lasso_trials, readout=args.readout, n_val=args.n_val, n_test=args.n_test,
                          refit_steps=args.refit_steps, finetune_steps=args.finetune_steps, seed=args.seed,
                          **{k: getattr(args, k) or 0.0 for k in ("kappa", "alpha", "nu", "lam")})
    if cfg.model != "embedded-clip":
        from .profiles import clip_check_ready, clip_paper_config

        clip_check_ready(clip_paper_config(cfg.model), cfg.dataset, cfg.data_root or None, min_gpus=0)
    res = run_clip_table(cfg)
    cols = [c for c in ("method", "budget_macs_fraction", "macs_image_fraction", "macs_text_fraction", "readout",
                        "no_retrain_i2t_r1", "no_retrain_t2i_r1", "refit_i2t_r1", "refit_t2i_r1", "finetuned_i2t_r1",
                        "finetuned_t2i_r1") if c in res["table"]]
    print(res["table"][cols].round(3).to_string(index=False))
    print(f"record: {res['record']}")
    return 0


def cmd_report(args) -> int:
    from .report import build_report

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
    from .profiles import CLIP_PAPER_MODELS, PAPER_MODELS, check_ready, clip_check_ready, clip_paper_config, paper_config

    problems = []
    for name in args.models or PAPER_MODELS + CLIP_PAPER_MODELS:
        try:
            if name in CLIP_PAPER_MODELS:
                clip_check_ready(clip_paper_config(name), args.dataset, args.data_root, min_gpus=args.min_gpus)
            else:
                check_ready(paper_config(name), args.data_root, min_gpus=args.min_gpus)
            print(f"ready: {name}")
        except SppBenchError as exc:
            problems.append(str(exc))
    if problems:
        raise SppBenchError("\n".join(problems))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sppbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run one SLBI search and save its solution path (JSON)")
    s.add_argument("--model", default="embedded", help=f"model to search ({', '.join(MODELS)})")
    s.add_argument("--img-size", type=int, default=56)
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--batch-size", type=int, default=32)
    for k in ("kappa", "alpha", "nu", "lam"):
        s.add_argument(f"--{k}", type=float, default=None, help="default: the profile's tuned value")
    s.add_argument("--variant", choices=("paper", "official"), default="paper")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--log-every", type=int, default=10)
    s.add_argument("--out", type=Path, required=True, help="where to write the path (JSON)")
    s.set_defaults(fn=cmd_search)

    r = sub.add_parser("prune", help="read a budget off a saved path, compress the model and save it")
    r.add_argument("--path", type=Path, required=True)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=float, help="share of entries kept per pool, in (0, 1]")
    g.add_argument("--params", type=int, help="parameter budget")
    g.add_argument("--macs", type=int, help="multiply-adds per sample budget")
    r.add_argument("--readout", choices=("global", "per-layer"), default="global")
    r.add_argument("--model", default="embedded")
    r.add_argument("--out", type=Path, required=True, help="folder for spec.json + model.safetensors")
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(fn=cmd_prune)

    q = sub.add_parser("quickstart", help="the quickstart study: one search, several budgets, a record")
    q.add_argument("--steps", type=int, default=100)
    q.add_argument("--fractions", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.4, 0.3])
    q.add_argument("--n-test", type=int, default=1000)
    q.add_argument("--readout", choices=("global", "per-layer"), default="global")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=cmd_quickstart)

    from .methods import METHODS

    v = sub.add_parser("vision-table", help="every method on the same model, budgets (by MACs) and fine-tune")
    v.add_argument("--model", default="embedded-vit",
                   help="embedded-vit, embedded-swin, or a paper model (e.g. deit_small_patch16_224) with --data-root")
    v.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    v.add_argument("--macs-fractions", type=float, nargs="+", default=[0.7, 0.5, 0.35])
    v.add_argument("--steps", type=int, default=100)
    v.add_argument("--random-seeds", type=int, default=3)
    v.add_argument("--lasso-trials", type=int, default=5)
    v.add_argument("--readout", choices=("val", "global", "per-layer"), default="val")
    v.add_argument("--n-val", type=int, default=1000)
    v.add_argument("--n-test", type=int, default=2000)
    v.add_argument("--n-refit", type=int, default=1000)
    v.add_argument("--finetune-steps", type=int, default=100)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--data-root", default=None, help="paper profile: the ImageNet folder (else $SPPBENCH_IMAGENET)")
    for k in ("kappa", "alpha", "nu", "lam"):
        v.add_argument(f"--{k}", type=float, default=None, help="SPP constant (required for paper models)")
    v.set_defaults(fn=cmd_vision_table)

    t = sub.add_parser("clip-table", help="every method on a CLIP dual encoder: per-tower costs, retrieval R@1/5/10")
    t.add_argument("--model", default="embedded-clip", help="embedded-clip, or ViT-B-32 / ViT-L-14 with --data-root")
    t.add_argument("--pretrained", default="openai", help="paper models: open_clip pretrained tag or checkpoint file")
    t.add_argument("--dataset", default="coco", choices=("coco", "flickr30k"))
    t.add_argument("--data-root", default=None, help="paper models: the dataset folder (else $SPPBENCH_COCO / ...)")
    t.add_argument("--methods", nargs="+", default=["spp", "lasso", "dessilbi", "magnitude", "random"],
                   choices=[m for m in METHODS if not m.startswith("tp-")])
    t.add_argument("--macs-fractions", type=float, nargs="+", default=[0.7, 0.5, 0.35])
    t.add_argument("--budget-towers", default="joint", choices=("joint", "image", "text", "each"))
    t.add_argument("--steps", type=int, default=60)
    t.add_argument("--lasso-trials", type=int, default=3)
    t.add_argument("--readout", choices=("val", "global", "per-layer"), default="val")
    t.add_argument("--n-val", type=int, default=500)
    t.add_argument("--n-test", type=int, default=1000)
    t.add_argument("--refit-steps", type=int, default=300)
    t.add_argument("--finetune-steps", type=int, default=40)
    t.add_argument("--seed", type=int, default=0)
    for k in ("kappa", "alpha", "nu", "lam"):
        t.add_argument(f"--{k}", type=float, default=None, help="SPP constant (required for paper models)")
    t.set_defaults(fn=cmd_clip_table)

    c = sub.add_parser("paper-check", help="say whether the paper profile can run here (data, weights, GPUs)")
    c.add_argument("--models", nargs="*", default=None)
    c.add_argument("--dataset", default="coco", choices=("coco", "flickr30k"), help="CLIP models: which dataset")
    c.add_argument("--data-root", default=None)
    c.add_argument("--min-gpus", type=int, default=1)
    c.set_defaults(fn=cmd_paper_check)

    r = sub.add_parser("report", help="tables and figures from the run records only (results/tables, results/figures)")
    r.add_argument("--runs", default=None, help="records folder (default: results/runs of this checkout)")
    r.add_argument("--out", default=None, help="output folder (default: the records folder's parent)")
    r.set_defaults(fn=cmd_report)

    b = sub.add_parser("bench", help="print benchmark figures")
    b.add_argument("what", choices=("search-step",))
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--img-size", type=int, default=56)
    b.add_argument("--threads", type=int, default=None)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import SppBenchError

    try:
        return args.fn(args)
    except SppBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
