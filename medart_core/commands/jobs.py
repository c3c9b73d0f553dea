"""Job commands: ``worker`` (the supervisor in the foreground) and ``jobs submit|list|show|stop|resume|logs``.
Everything goes through the ``Executor`` (the only door to jobs); ``jobs submit KIND`` exists for each kind
whose registration brings ``add_submit_arguments``/``submit_config`` hooks; ``--executor NAME`` (a name from
``executors list``) says where a job, or a resumed attempt, runs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..jobs import FINAL, STATES, Executor, Job, LocalExecutor, job_kinds, wait_for
from ..jobs.records import iso
from . import add_workspace


def _executor(args: argparse.Namespace, *, start: bool = False) -> Executor:
    from ..workspace import Workspace

    return LocalExecutor(Workspace.open(args.workspace), start_supervisor=start)


def _print_job(job: Job, as_json: bool, ex: Executor | None = None, full: bool = False) -> None:
    if as_json:
        d = job.to_dict()
        if full and ex is not None:
            d["events"] = [dataclasses.asdict(e) for e in ex.events(job.id)]
            d["log_tail"] = ex.log_tail(job.id, 40)
        print(json.dumps(d, sort_keys=True, default=str))
        return
    if not full:
        err = f"  {job.error[:80]}" if job.error else ""
        print(f"{job.id}\t{job.kind}\t{job.progress_text()}\trun={job.run or '-'}\tpid={job.pid or '-'}{err}")
        return
    print(f"job {job.id} ({job.kind}), {job.progress_text()}")
    for k in ("run", "owner", "executor", "remote_id", "pid", "last_checkpoint", "log_path"):
        print(f"  {k}: {getattr(job, k, None)}")
    for k in ("created_at", "started_at", "finished_at", "heartbeat_at"):
        print(f"  {k}: {iso(getattr(job, k))}")
    if ex is not None:
        print("  events:")
        for e in ex.events(job.id):
            print(f"    {iso(e.at)}  #{e.attempt} {e.event:<15} -> {e.state}  {json.dumps(e.detail)}")
        if job.error:
            print("\n" + ex.error_report(job))


# ---- handlers ---------------------------------------------------------------------------------------------
def _cmd_worker(args: argparse.Namespace) -> int:
    from ..jobs import Supervisor
    from ..workspace import Workspace

    ws = Workspace.open(args.workspace)
    return Supervisor(ws, gpu_slots=args.gpu_slots, cpu_slots=args.cpu_slots, poll_s=args.poll,
                      stop_grace_s=args.stop_grace, kill_grace_s=args.kill_grace,
                      heartbeat_timeout_s=args.heartbeat_timeout, idle_exit_s=args.idle_exit).run()


def _cmd_submit(args: argparse.Namespace) -> int:
    from ..workspace import Workspace

    ws = Workspace.open(args.workspace)
    config = args.submit_config(args)
    ex = LocalExecutor(ws, start_supervisor=not args.no_worker)
    try:   # an unknown --executor is a user error listing the known ones (the Executor checks the name)
        _print_job(ex.submit(args.kind, config, owner=args.owner, executor=args.executor), args.json)
    finally:
        ex.close()
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    ex = _executor(args)
    ex.refresh()
    for job in ex.list(states=args.state or None, kind=args.kind, limit=args.limit):
        _print_job(job, args.json)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    ex = _executor(args)
    ex.refresh()
    _print_job(ex.get(args.id), args.json, ex, full=True)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    ex = _executor(args, start=not args.no_worker)
    job = ex.stop(args.id)
    if args.wait:
        job = wait_for(ex, args.id, FINAL, timeout_s=args.wait)
    _print_job(job, args.json)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    """``jobs sample ID``: "Sample now" for a running train job (``--wait``: until it took the request)."""
    from ..jobs import sample_request_path

    ex = _executor(args, start=False)
    job = ex.sample_now(args.id)
    path = sample_request_path(ex.ws, args.id)
    print(f"asked {job.id} to render its validation prompts at its next step (it keeps training)")
    if args.wait:
        end = time.monotonic() + args.wait
        while path.exists():
            if time.monotonic() > end or ex.get(args.id).is_final:
                print(f"{job.id} has not taken the request within {args.wait:g} s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"taken: the grid follows in `jobs show {job.id}` (validation_grid) and the run's metrics.jsonl")
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    ex = _executor(args, start=not args.no_worker)
    # --executor None: where the last attempt ran
    _print_job(ex.resume(args.id, max_steps=args.max_steps, executor=args.executor), args.json)
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    ex = _executor(args)
    job = ex.get(args.id)
    if not args.follow:
        print(ex.log_tail(job.id, args.lines))
        return 0
    path = Path(job.log_path)
    pos = 0
    while True:
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
        job = ex.get(job.id)
        if job.is_final:
            return 0
        time.sleep(0.5)


# ---- the sleep kind's `jobs submit sleep` (its hooks in medart_core.job_registry) --------------------------
def add_sleep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ignore-stop", action="store_true", help="ignore the stop flag (exercises SIGTERM/SIGKILL)")


def sleep_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"seconds": args.seconds, "steps": args.steps, "ignore_stop": args.ignore_stop}


# ---- parsers ----------------------------------------------------------------------------------------------
def worker(p: argparse.ArgumentParser) -> None:
    add_workspace(p)
    p.add_argument("--gpu-slots", type=int, default=1, help="accelerator jobs at once (default 1)")
    p.add_argument("--cpu-slots", type=int, default=2, help="CPU-light jobs at once beside them (default 2)")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between supervision rounds")
    p.add_argument("--stop-grace", type=float, default=60.0, help="seconds after a stop request before SIGTERM")
    p.add_argument("--kill-grace", type=float, default=120.0, help="seconds after SIGTERM before SIGKILL")
    p.add_argument("--heartbeat-timeout", type=float, default=120.0,
                   help="a job silent this long is killed and marked interrupted")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after this many seconds with nothing to do")
    p.set_defaults(func=_cmd_worker)


def _submit(sp: argparse.ArgumentParser) -> None:
    ksub = sp.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in job_kinds().values():
        add_arguments = kind.hook("add_submit_arguments")
        if add_arguments is None:
            continue
        kp = ksub.add_parser(kind.name, help=kind.submit_help)
        add_arguments(kp)
        add_workspace(kp)
        kp.add_argument("--owner", default=None, help="who submits (shown in the list)")
        kp.add_argument("--executor", default="local", metavar="NAME",
                        help="where it runs: local (default) or a name from `executors list`")
        kp.add_argument("--json", action="store_true", help="print the job as one JSON line")
        kp.add_argument("--no-worker", action="store_true", help="do not start a supervisor if none runs")
        kp.set_defaults(func=_cmd_submit, submit_config=kind.hook("submit_config"))


def jobs(jp: argparse.ArgumentParser) -> None:
    jsub = jp.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    _submit(jsub.add_parser("submit", help="queue a job (the supervisor is started if none runs)"))

    p = jsub.add_parser("list", help="jobs, newest first")
    add_workspace(p)
    p.add_argument("--state", action="append", choices=STATES, help="only jobs in this state (repeatable)")
    p.add_argument("--kind", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per job per line")
    p.set_defaults(func=_cmd_list)

    p = jsub.add_parser("show", help="one job: state, progress, events, error with the log tail")
    p.add_argument("id")
    add_workspace(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_show)

    p = jsub.add_parser("stop", help="ask a job to checkpoint and stop")
    p.add_argument("id")
    add_workspace(p)
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS", help="wait until it has stopped")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-worker", action="store_true", help="do not start a supervisor if none runs")
    p.set_defaults(func=_cmd_stop)

    p = jsub.add_parser("sample", help="Sample now: a running train job renders its validation prompts at its "
                                       "next step, without stopping")
    p.add_argument("id")
    add_workspace(p)
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS", help="wait until the job took it")
    p.set_defaults(func=_cmd_sample)

    p = jsub.add_parser("resume", help="queue a new attempt of an interrupted, stopped or failed job")
    p.add_argument("id")
    add_workspace(p)
    p.add_argument("--max-steps", type=int, default=None, help="train to this step (also extends a done run)")
    p.add_argument("--executor", default=None, metavar="NAME",
                   help="run the new attempt there (default: where the last attempt ran)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-worker", action="store_true", help="do not start a supervisor if none runs")
    p.set_defaults(func=_cmd_resume)

    p = jsub.add_parser("logs", help="the job's log (stdout and stderr of every attempt)")
    p.add_argument("id")
    add_workspace(p)
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=_cmd_logs)
