"""``ablation``: the paper's ablation table in miniature on the demo backbone (:mod:`medart_core.ablation`),
in the foreground or queued as an ``ablation`` job through the Executor (``--job``, or ``--executor NAME`` to
run that job on a named executor; on a Slurm cluster the job coordinates one array task per (row, seed) cell,
:mod:`medart_core.fanout`)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from . import add_workspace

# Mirrors of medart_core.ablation (checked equal by tests/test_cli.py), so `ablation --help` does not import it.
PRESET_NAMES = ("mini", "smoke")
ROW_NAMES = ("base", "lora", "hldf", "hldf-no-t5", "hldf-dora", "hldf-class", "hldf-empty")


def _cmd_ablation(args: argparse.Namespace) -> int:
    from ..workspace import Workspace

    overrides: dict[str, Any] = {}
    if args.seeds:
        overrides["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.steps:
        overrides["steps"] = args.steps
    if args.rows:
        overrides["rows"] = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    ws = Workspace.open(args.workspace)
    if args.job or args.executor:
        from ..jobs import LocalExecutor

        # An unknown --executor is a user error listing the known ones (the Executor checks the name).
        job = LocalExecutor(ws).submit("ablation", {"preset": args.preset, "overrides": overrides},
                                       executor=args.executor or "local")
        print(f"queued ablation job {job.id} on {job.executor}; follow it with "
              f"`python -m medart_core jobs logs {job.id}`")
        return 0
    import torch

    from ..ablation import format_table, get_preset, run_ablation
    from ..captions import CaptionStore

    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset, **overrides)
    store = CaptionStore.for_workspace(ws)
    try:
        table = run_ablation(ws, store, preset, log=lambda m: print(m, flush=True))
    finally:
        store.close()
    if table is None:
        return 1
    print(format_table(table))
    summary = {"preset": preset.name, "wall_s": table["wall_s"], "threads": table["threads"]}
    for r in table["rows"]:
        for m in table["metrics"]:
            summary[f"{r['row']}.{m}"] = round(r[m]["mean"], 6)
    summary["verdicts"] = {f"{e['effect']} ({e['metric']})": e["verdict"] for e in table["effects"]}
    print(json.dumps(summary, sort_keys=True))
    return 0


def ablation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="mini", choices=sorted(PRESET_NAMES))
    add_workspace(p)
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="training steps per cell (default: the preset's)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROW_NAMES)}")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the foreground (default 2)")
    p.add_argument("--job", action="store_true", help="queue it as an `ablation` job instead of running it here")
    p.add_argument("--executor", default=None, metavar="NAME",
                   help="queue it as an `ablation` job on this executor (local or a name from `executors list`); "
                        "on a Slurm executor each (row, seed) cell is one task of a Slurm job array")
    p.set_defaults(func=_cmd_ablation)
