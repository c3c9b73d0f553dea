"""Ablation as a Slurm job array (issue 17 §3) against the same ablation run locally, on a real local
single-node Slurm (``tests/slurm_cluster.py``: munged, slurmctld and slurmd as root; ``tests/ensure_slurm.sh``
installs them), plus the submit→running overhead of one tiny Slurm job.

    sudo python bench/slurm_fanout.py [--preset smoke] [--rows base,lora,...] [--cpus-per-task 1] [--tiny 5]

1. **local**: ``python -m medart_core ablation --preset P --threads N`` in a fresh workspace (N = the
   machine's cores), timed end to end (dataset, scoring set-up, every cell, the table);
2. **array**: the same ablation in another fresh workspace as a job: ``ablation --executor cluster`` and a
   supervisor (``python -m medart_core worker``); the coordinator runs here and one array task per cell runs
   on Slurm with ``--cpus-per-task`` threads each; timed from the submit to the job's ``done``;
3. **tiny**: ``slurm.submit`` of a function that returns at once, ``--tiny`` times: seconds from the submit
   until squeue shows it RUNNING (or it already finished), and until its result is readable.

The last line printed is one JSON object: local_s, array_s, ratio (array / local, same run), cells,
overhead_per_cell_s ((array_s − local_s) / cells), tiny_submit_to_running_s and tiny_submit_to_result_s
(medians), cpus, the cluster's poll interval.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _noop() -> str:
    return "ok"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def _ablation_args(args: argparse.Namespace) -> list[str]:
    return ["--preset", args.preset] + (["--rows", args.rows] if args.rows else [])


def run_local(root: Path, args: argparse.Namespace, threads: int) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medart_core", "ablation", "--workspace", str(root), "--threads",
                    str(threads), *_ablation_args(args)], cwd=REPO, env=_env(), check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def run_array(root: Path, args: argparse.Namespace, cluster) -> tuple[float, dict]:
    from medart_core import executors
    from medart_core.jobs import JobLedger
    from medart_core.slurm import SlurmSettings
    from medart_core.workspace import Workspace

    ws = Workspace.open(root)
    executors.add_executor(ws, "cluster", settings=SlurmSettings(
        partition=cluster.partition, time="01:00:00", cpus_per_task=args.cpus_per_task, mem_gb=1))
    env = dict(_env(), OMP_NUM_THREADS=str(args.cpus_per_task))
    sup = subprocess.Popen([sys.executable, "-m", "medart_core", "worker", "--workspace", str(root), "--poll", "0.2"],
                           cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                           start_new_session=True)
    ledger = JobLedger(ws)
    try:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "medart_core", "ablation", "--workspace", str(root),
                              "--executor", "cluster", *_ablation_args(args)], cwd=REPO, env=env, check=True,
                             capture_output=True, text=True).stdout
        job_id = out.split("queued ablation job ")[1].split()[0]
        while True:
            job = ledger.get(job_id)
            if job.is_final:
                break
            time.sleep(0.1)
        wall = time.perf_counter() - t
        if job.state != "done":
            raise SystemExit(f"the array ablation ended {job.state}: {ledger.error_report(job)}")
        return wall, job.result
    finally:
        ledger.close()
        os.killpg(sup.pid, 15)
        sup.wait(timeout=30)


def tiny_jobs(root: Path, cluster, n: int) -> tuple[list[float], list[float]]:
    from medart_core import slurm

    settings = slurm.SlurmSettings(partition=cluster.partition, time="00:05:00")
    to_running, to_result = [], []
    for k in range(n):
        t = time.perf_counter()
        jid, folder = slurm.submit(settings, root / f"tiny-{k}", _noop)
        running = None
        while not slurm.has_result(folder, jid):
            if running is None and slurm.poll([jid])[jid].state in ("RUNNING", "COMPLETING", "COMPLETED", ""):
                running = time.perf_counter() - t
            time.sleep(0.02)
        done = time.perf_counter() - t
        to_running.append(running if running is not None else done)
        to_result.append(done)
    return to_running, to_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--rows", default=None, help="comma-separated rows (default: the preset's)")
    ap.add_argument("--cpus-per-task", type=int, default=1)
    ap.add_argument("--tiny", type=int, default=5, help="tiny jobs for the submit→running overhead")
    args = ap.parse_args()

    from slurm_cluster import start_cluster, why_unavailable

    reason = why_unavailable()
    if reason:
        raise SystemExit(f"no local Slurm: {reason}")
    cluster = start_cluster()
    os.environ.update(cluster.env)
    cpus = os.cpu_count() or 1
    from medart_core.ablation import get_preset

    preset = get_preset(args.preset, **({"rows": tuple(args.rows.split(","))} if args.rows else {}))
    cells = len(preset.rows) * len(preset.seeds)
    try:
        with tempfile.TemporaryDirectory(prefix="medart-fanout-bench-") as tmp:
            tmp = Path(tmp)
            os.chmod(tmp, 0o755)
            running, result = tiny_jobs(tmp / "tiny", cluster, args.tiny)
            local_s = run_local(tmp / "local", args, cpus)
            print(f"local: {local_s:.1f} s for {cells} cells on {cpus} threads", flush=True)
            array_s, res = run_array(tmp / "array", args, cluster)
            print(f"array: {array_s:.1f} s for {cells} cells, {args.cpus_per_task} thread(s) per task; "
                  f"tasks {res.get('slurm_tasks')}", flush=True)
    finally:
        cluster.stop()
    out = {"preset": args.preset, "rows": list(preset.rows), "cells": cells, "cpus": cpus,
           "cpus_per_task": args.cpus_per_task, "local_s": round(local_s, 1), "array_s": round(array_s, 1),
           "ratio": round(array_s / local_s, 3), "overhead_per_cell_s": round((array_s - local_s) / cells, 1),
           "tiny_jobs": args.tiny, "tiny_submit_to_running_s": round(statistics.median(running), 2),
           "tiny_submit_to_result_s": round(statistics.median(result), 2),
           "slurm_poll_s": float(os.environ.get("MEDART_SLURM_POLL_S") or 3.0)}
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
