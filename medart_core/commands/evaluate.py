"""Evaluation commands: ``evaluate`` (FD/KID/PRDC of checkpoints under one recorded protocol) and
``review-results`` (the comparison and blind-review tables)."""
from __future__ import annotations

import argparse
import json

from . import add_workspace


def _submit_evaluation(ws: object, spec: object, refs: list[str], args: argparse.Namespace) -> int:
    """``--executor NAME``: queue the same evaluation as an ``evaluate`` job (the studio's Compare form's); on a
    Slurm executor it runs one array task per checkpoint (:mod:`medart_core.fanout`)."""
    import dataclasses

    from ..jobs import LocalExecutor

    # An unknown --executor is a user error listing the known ones (the Executor checks the name).
    job = LocalExecutor(ws).submit("evaluate", {"spec": dataclasses.asdict(spec), "checkpoints": refs,
                                                "backbone": args.backbone}, executor=args.executor)
    if args.json:
        print(json.dumps(job.to_dict(), sort_keys=True, default=str))
    else:
        print(f"queued evaluate job {job.id} on {job.executor}; follow it with `python -m medart_core jobs logs "
              f"{job.id}` and read the table with `python -m medart_core review-results`")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..captions import CaptionStore
    from ..evaluate import EvalSpec, comparison_table, format_comparison, run_evaluation
    from ..workspace import Workspace

    ws = Workspace.open(args.workspace)
    spec = EvalSpec(dataset=args.dataset, extractor=args.extractor, extractor_weights=args.weights,
                    per_class=args.per_class, captions=args.captions, steps=args.steps, guidance=args.guidance,
                    size=args.size, seed=args.seed, precision=args.precision,
                    classes=[c for c in args.classes.split(",") if c] if args.classes else None)
    refs = [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    if args.executor:
        return _submit_evaluation(ws, spec, refs, args)
    store = CaptionStore.for_workspace(ws)
    results = run_evaluation(ws, store, spec, refs, backbone=args.backbone,
                             log=None if args.json else (lambda m: print(m, flush=True)))
    table = comparison_table(results)
    if args.json:
        for r in results:
            print(json.dumps({"id": r.id, "checkpoint": r.profile["checkpoint"], "overall": r.metrics["overall"],
                              "profile": r.profile}, sort_keys=True))
    else:
        print(format_comparison(table))
        for w in results[0].metrics["overall"].get("warnings", []):
            print(f"warning: {w}")
    return 0


def _cmd_review_results(args: argparse.Namespace) -> int:
    from ..blind import ReviewStore
    from ..evaluate import comparison_table, format_blind_results, format_comparison, load_results
    from ..workspace import Workspace

    ws = Workspace.open(args.workspace)
    results = load_results(ws)
    if args.dataset:
        results = [r for r in results if r.profile.get("dataset") == args.dataset]
    if results:
        print(format_comparison(comparison_table(results)))
    else:
        print("no evaluation results yet (python -m medart_core evaluate ...)")
    rs = ReviewStore.for_workspace(ws)
    for st in rs.studies():
        print()
        print(format_blind_results(rs.results(st["name"])))
    return 0


def evaluate(p: argparse.ArgumentParser) -> None:
    add_workspace(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--checkpoints", required=True, help="comma-separated: base,RUN,RUN@STEP")
    p.add_argument("--extractor", default="domain", choices=("inception", "dinov2", "domain"))
    p.add_argument("--weights", default=None, help="Inception weights file, or DINOv2 Hub id / folder")
    p.add_argument("--backbone", default=None, help="backbone to generate with (default: the run's)")
    p.add_argument("--classes", default=None, help="comma-separated classes (default: all)")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--captions", default="approved", choices=("approved", "latest"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--size", type=int, default=64, help="preparation size S for real and generated images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=None,
                   help="generation precision: fp32 | bf16 | auto (bf16 where the device runs it fast). Default: "
                        "bf16 on a GPU, fp32 on a CPU; results in different precisions are not compared")
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
    p.add_argument("--executor", default=None, metavar="NAME",
                   help="queue it as an `evaluate` job on this executor (local or a name from `executors list`) "
                        "instead of running it here; on a Slurm executor each checkpoint is one task of a Slurm job "
                        "array")
    p.set_defaults(func=_cmd_evaluate)


def review_results(p: argparse.ArgumentParser) -> None:
    add_workspace(p)
    p.add_argument("--dataset", default=None)
    p.set_defaults(func=_cmd_review_results)
