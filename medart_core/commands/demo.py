"""``demo-backbone build``: train the embedded demo backbone (:mod:`medart_core.demo_backbone`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import add_workspace


def _cmd_build(args: argparse.Namespace) -> int:
    from ..demo_backbone import build_demo_backbone

    m = build_demo_backbone(args.out, workspace=args.workspace, schedule="short" if args.short else "full",
                            seed=args.seed, log=lambda s: print(s, flush=True))
    print(json.dumps({"out": str(Path(args.out).resolve()), "total_bytes": m["total_bytes"],
                      "build_seconds": m["build_seconds"], "metrics": m["metrics"]}))
    return 0


def demo_backbone(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="train it from seeded random weights (about 20 min on 2 CPU cores)")
    b.add_argument("--out", required=True, help="output folder (a diffusers pipeline folder + MANIFEST.json)")
    b.add_argument("--short", action="store_true", help="a few steps of the same recipe (a smoke test)")
    b.add_argument("--seed", type=int, default=0)
    add_workspace(b, help="workspace whose 'sample' dataset to use (default: a temporary one)")
    b.set_defaults(func=_cmd_build)
