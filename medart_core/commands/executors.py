"""``executors add|list|remove|check``: the named executors (where jobs run) of a workspace.

The arguments and the handler live in :mod:`medart_core.executors` (light: no torch, no submitit at import);
this module registers them and supplies what that module must not know: whether a queued or running job of
the ledger still uses an executor, which ``remove`` refuses on. Both also serve the studio's Executors panel.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from ..executors import LOCAL, add_executors_arguments, cmd_executors

# States in which a job still needs its executor (queued there, or its process/Slurm task is alive).
_LIVE_STATES = ("queued", "running", "stopping")


def job_executor(job: Any) -> str:
    """Where ``job`` runs: its ``executor`` field, ``local`` for rows written before executors existed."""
    return getattr(job, "executor", None) or LOCAL


def in_use_checker(ws: Any) -> Callable[[str], bool]:
    """``in_use(name)``: does a queued or active job of ``ws``'s ledger use executor ``name``? Read through
    the Executor, the only door to jobs (the ledger is opened only when asked, never to start a supervisor)."""
    def in_use(name: str) -> bool:
        from ..jobs import LocalExecutor

        ex = LocalExecutor(ws, start_supervisor=False)
        try:
            return any(job_executor(j) == name for j in ex.list(states=_LIVE_STATES))
        finally:
            ex.close()

    return in_use


def _cmd_executors(args: argparse.Namespace) -> int:
    from ..workspace import Workspace

    in_use = in_use_checker(Workspace.open(args.workspace)) if args.executors_command == "remove" else None
    return cmd_executors(args, in_use=in_use)


def executors(p: argparse.ArgumentParser) -> None:
    """``executors``: add (a Slurm cluster), list, remove (refused while a job uses it), check (a probe job)."""
    add_executors_arguments(p)
    p.set_defaults(func=_cmd_executors)
