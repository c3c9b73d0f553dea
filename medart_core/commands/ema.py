"""Post-hoc EMA commands (issue 19 §1): ``ema reconstruct`` builds the EMA of any length from a run's snapshots
(trained with ``--ema.posthoc``) and ``ema sweep`` reconstructs several lengths, evaluates them and recommends one.

A reconstruction at step N with relative std S is written to
``runs/RUN/ema/reconstructed/step_<N>-sigma_<S>.safetensors`` (adapter tensors keyed like a checkpoint's
``adapters.safetensors``) with a ``.json`` report beside it (coefficients, profile fit error), and is named
by the checkpoint reference ``RUN@N:ema-S`` in generate, evaluate, the studio and export. N must be a
checkpoint step of the run (its LoRA config and backbone come from that checkpoint); by default the latest.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Any

from . import add_workspace


def _lengths(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.05,0.1,0.2; got {text!r}")
    if not out:
        raise argparse.ArgumentTypeError("give at least one EMA length (sigma_rel), e.g. 0.05,0.1,0.2")
    return out


def reconstruct_checkpoint(ws: Any, run: str, sigma_rel: float, step: int | None = None) -> dict[str, Any]:
    """Write the post-hoc EMA of ``sigma_rel`` at checkpoint ``step`` (default: the latest) of ``run``;
    returns the report (with ``ref``, the reference that names it, and ``path``)."""
    from safetensors.torch import save_file

    from ..checkpoint import checkpoint_step, find_checkpoint, posthoc_dir, reconstructed_path
    from ..ema import list_snapshots, reconstruct, reconstruction_report
    from ..errors import ConfigError
    from ..fileio import atomic_path, atomic_write_text

    ck = find_checkpoint(ws, run, step)
    at = checkpoint_step(ck)
    folder = posthoc_dir(ws.run_dir(run))
    snaps = list_snapshots(folder) if folder.is_dir() else []
    if not snaps:
        raise ConfigError(f"Run {run!r} has no post-hoc EMA snapshots: it was trained without --ema.posthoc.")
    report = reconstruction_report(snaps, sigma_rel, at_step=at)
    tensors = reconstruct(snaps, sigma_rel, at_step=at)
    from safetensors import safe_open

    with safe_open(str(ck / "adapters.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    if keys != set(tensors):
        raise ConfigError(f"The post-hoc EMA snapshots of {run!r} do not hold the same adapter tensors as checkpoint "
                          f"{run}@{at}; the run folder mixes two trainings.")
    path = reconstructed_path(ws.run_dir(run), at, sigma_rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    report = dict(report, ref=f"{run}@{at}:ema-{float(sigma_rel):g}", path=str(path), run=run)
    atomic_write_text(path.with_suffix(".json"), json.dumps(report, indent=2, sort_keys=True))
    return report


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from ..workspace import Workspace

    ws = Workspace.open(args.workspace)
    rep = reconstruct_checkpoint(ws, args.run, args.sigma_rel, args.step)
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        print(f"wrote {rep['path']}")
        print(f"reference: {rep['ref']}  (from {rep['snapshots']} snapshots, profile fit error "
              f"{rep['fit_error']:.2e})")
    return 0


def sweep_table(results: list[Any]) -> tuple[str, dict[str, Any]]:
    """(text table, recommendation) of a sweep's evaluation results: the lowest FD wins; the recommendation
    says whether its bootstrap interval separates it from every other row (``evaluate.comparison_table``)."""
    from ..evaluate import comparison_table, format_comparison

    table = comparison_table(results)
    rows = [r for r in table["rows"] if r["comparable"] and isinstance(r.get("fd"), (int, float))
            and math.isfinite(r["fd"])]
    if not rows:
        return format_comparison(table), {"checkpoint": None, "reason": "no comparable FD"}
    top = min(rows, key=lambda r: r["fd"])
    separated = table["best"].get("fd") == top["id"]
    rec = {"checkpoint": top["checkpoint"], "fd": top["fd"], "fd_ci": top.get("fd_ci"), "separated": separated}
    return format_comparison(table), rec


def sweep(ws: Any, store: Any, run: str, lengths: list[float], spec: Any, *, step: int | None = None,
          with_raw: bool = True, log: Any = None) -> tuple[list[Any], str, dict[str, Any]]:
    """Reconstruct ``lengths`` at checkpoint ``step`` (default: the latest) of ``run``, evaluate them (and the
    raw weights) under ``spec`` through ``evaluate.run_evaluation``; returns (results, table, recommendation)."""
    from ..checkpoint import checkpoint_step, find_checkpoint
    from ..evaluate import run_evaluation

    at = checkpoint_step(find_checkpoint(ws, run, step))
    refs = [f"{run}@{at}"] if with_raw else []
    for s in lengths:
        rep = reconstruct_checkpoint(ws, run, s, at)
        if log is not None:
            log(f"sigma_rel {s:g}: {rep['ref']} (fit error {rep['fit_error']:.2e})")
        refs.append(rep["ref"])
    results = run_evaluation(ws, store, spec, refs, log=log)
    text, rec = sweep_table(results)
    return results, text, rec


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ..captions import CaptionStore
    from ..evaluate import EvalSpec
    from ..workspace import Workspace

    ws = Workspace.open(args.workspace)
    store = CaptionStore.for_workspace(ws)
    spec = EvalSpec(dataset=args.dataset, extractor=args.extractor, per_class=args.per_class, steps=args.steps,
                    guidance=args.guidance, size=args.size, seed=args.seed, precision=args.precision,
                    captions=args.captions, n_boot=args.n_boot,
                    classes=[c for c in args.classes.split(",") if c] if args.classes else None)
    _, text, rec = sweep(ws, store, args.run, args.lengths, spec, step=args.step, with_raw=args.with_raw,
                         log=lambda m: print(m, flush=True))
    print(text)
    if rec["checkpoint"] is None:
        print("no recommendation: no comparable FD")
        return 0
    ci = rec["fd_ci"]
    ci_text = f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
    sure = ("its interval is clear of every other row's" if rec["separated"]
            else "but its interval overlaps another row's: more images (--per-class) would tell them apart")
    print(f"recommended: {rec['checkpoint']} (FD {rec['fd']:.4g}{ci_text}, unpaired bootstrap interval; {sure})")
    if args.json:
        print(json.dumps({"recommended": rec}, sort_keys=True))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    add_workspace(p)
    p.add_argument("--run", required=True, help="a run trained with --ema.posthoc")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--json", action="store_true")


def ema(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="ema_command", required=True, metavar="ACTION")
    r = sub.add_parser("reconstruct", help="write the post-hoc EMA of one length as RUN@STEP:ema-SIGMA")
    _common(r)
    r.add_argument("--sigma-rel", type=float, required=True, help="EMA length as relative std, e.g. 0.08")
    r.set_defaults(func=_cmd_reconstruct)
    s = sub.add_parser("sweep", help="reconstruct several EMA lengths, evaluate them, recommend one by FD")
    _common(s)
    s.add_argument("--lengths", type=_lengths, required=True, help="comma-separated sigma_rel, e.g. 0.05,0.1,0.2")
    s.add_argument("--dataset", required=True, help="the dataset to evaluate against")
    s.add_argument("--with-raw", type=lambda t: t.lower() in ("1", "true", "yes", "on"), default=True,
                   metavar="true|false", help="also evaluate the raw weights (default true)")
    s.add_argument("--extractor", default="domain", choices=("inception", "dinov2", "domain"))
    s.add_argument("--classes", default=None, help="comma-separated classes (default: all)")
    s.add_argument("--per-class", type=int, default=16)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=4.5)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=None)
    s.add_argument("--captions", default="approved", choices=("approved", "latest"))
    s.add_argument("--n-boot", type=int, default=50, help="bootstrap resamples of the FD interval")
    s.set_defaults(func=_cmd_sweep)
