"""Fan-out (issue 17 §3): an ablation's cells and an evaluation's checkpoints as one Slurm job array, on the
REAL single-node Slurm of the ``slurm_cluster`` fixture (no mock of Slurm or submitit), plus unit tests of
the task counting and of where a fan-out job runs.

The supervisor is a real subprocess; the ablation / evaluate job runs under it as the coordinator, which
submits the array through submitit, polls squeue/scontrol and retries a failed task alone. A task is made to
fail for real: the test kills it with ``scancel --signal=KILL`` while Slurm runs it. Every wait is on a state
with a deadline, never a fixed sleep.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from test_jobs import _done, _wait
from test_slurm_jobs import jobs, procs  # noqa: F401 - fixtures


def _cluster_executor(ws, cluster, name="cluster"):
    from medart_core import executors
    from medart_core.slurm import SlurmSettings

    # One CPU and 1 GB per task: two tasks run side by side on the test node's 2 cores.
    settings = SlurmSettings(partition=cluster.partition, time="00:10:00", cpus_per_task=1, mem_gb=1)
    return executors.add_executor(ws, name, settings=settings)


# =========================================================================================================
# No Slurm: counting and where a fan-out job runs
# =========================================================================================================
def test_tally_and_phase_text_count_pending_running_done():
    from medart_core import fanout as F

    c = F.tally(["pending", "running", "done", "pending", "done", "done"])
    assert c == {"pending": 2, "running": 1, "done": 3, "failed": 0}
    assert F.phase_text(c) == "cells: 2 pending · 1 running · 3 done"
    assert F.phase_text(F.tally(["done", "failed"]), "checkpoints", retried=1) == \
        "checkpoints: 0 pending · 0 running · 1 done · 1 retried · 1 failed"
    with pytest.raises(ValueError):
        F.tally(["lost"])
    # Slurm's states in the queue -> pending / running; out of it -> "" (the coordinator looks at the outcome)
    assert [F.task_state(s) for s in ("PENDING", "REQUEUED", "RUNNING", "COMPLETING", "COMPLETED", "FAILED",
                                      "CANCELLED by 0", "")] == \
        ["pending", "pending", "running", "running", "", "", "", ""]


def test_a_run_of_tasks_counts_earlier_cells_as_done(ws, ledger):
    from medart_core import fanout as F
    from medart_core.jobs.runner import JobContext

    job = ledger.submit("sleep", {"seconds": 0})
    ctx = JobContext(ledger, job)
    run = F.ArrayRun(ctx, None, print, [F.Task("a", ()), F.Task("b", (), state="running")], already_done=2)
    run.report()
    progress, info, _ = ctx.snapshot()
    assert info["phase"] == "cells: 1 pending · 1 running · 2 done" and (info["step"], info["total"]) == (2, 4)


def test_fan_out_kinds_on_a_slurm_executor_run_here_without_the_accelerator_slot(ws, ledger):
    abl = ledger.submit("ablation", {"preset": "smoke"}, executor="cluster")
    assert abl.fans_out and not abl.is_remote and not abl.needs_gpu_slot and abl.uses_gpu
    here = ledger.submit("ablation", {"preset": "smoke"})
    assert not here.fans_out and not here.is_remote and here.needs_gpu_slot
    sleep = ledger.submit("sleep", {"seconds": 0}, executor="cluster")
    assert sleep.is_remote and not sleep.fans_out
    # An attempt an older version handed to Slurm whole stays with the Slurm bridge.
    assert ledger.remote_submitted(abl.id, 1, "4242", str(ws.root / "nowhere"))
    assert ledger.get(abl.id).is_remote


# =========================================================================================================
# On the real local Slurm
# =========================================================================================================
VOLATILE = ("train_s", "eval_s", "evaluations")   # wall times and result ids differ between any two runs


def _comparable(path: Path, root: Path) -> str:
    """A cell's provenance without what differs between any two runs of the same cell (its wall times, its
    results' ids and creation times) and with its workspace's path replaced: the evaluation profiles."""
    prov = json.loads(path.read_text(encoding="utf-8").replace(str(root), "<W>"))
    for k in VOLATILE:
        prov.pop(k)
    for profile in prov["profiles"].values():
        profile.pop("created_at")
    return json.dumps(prov, indent=1, sort_keys=True)


def _figures(table: dict) -> dict:
    return {"rows": [{k: v for k, v in r.items() if k not in ("train_s_per_seed", "eval_s_per_seed", "row_s")}
                     for r in table["rows"]],
            "effects": table["effects"], "metrics": table["metrics"], "dataset": table["dataset"],
            "digest": table["digest"], "preset": table["preset"]}


@pytest.mark.slow  # ~2-3 min on 2 cores: 2 cells locally, then as an array with one task killed and retried
def test_ablation_as_a_job_array_equals_the_local_run_and_a_killed_task_is_retried_alone(
        ws, jobs, procs, slurm_cluster, tmp_path, one_thread):
    from medart_core import ablation as A
    from medart_core.captions import CaptionStore
    from medart_core.workspace import Workspace

    overrides = {"rows": ["base", "lora"]}
    p = A.get_preset("smoke", **overrides)
    # The local run, in a workspace of its own (one thread, as each array task has)
    local_ws = Workspace.open(tmp_path / "local")
    store = CaptionStore.for_workspace(local_ws)
    try:
        local = A.run_ablation(local_ws, store, p, log=lambda m: None)
    finally:
        store.close()

    _cluster_executor(ws, slurm_cluster)
    job = jobs.submit("ablation", {"preset": "smoke", "overrides": overrides}, executor="cluster")
    assert job.fans_out and job.remote_id is None
    procs.supervisor()
    fanout = ws.root / "jobs" / job.id / "attempt-1" / "fanout.json"

    def lora_task(_):
        rec = json.loads(fanout.read_text()) if fanout.is_file() else {}
        return next((t["slurm_id"] for t in rec.get("tasks", []) if t["key"] == "lora-s0"), None)

    phases: set[str] = set()

    def seen(pred):
        def check(j):
            if j.progress_info.get("phase"):
                phases.add(j.progress_info["phase"])
            return pred(j)
        return check

    _wait(jobs, job.id, seen(lambda j: j.is_final or lora_task(j)), 240, "the array submitted", procs)
    first = lora_task(None)
    assert first and re.fullmatch(r"\d+_1", first), first          # an array task, index 1
    slurm_cluster.wait_state(first, {"RUNNING"}, 120)
    slurm_cluster.run("scancel", "--signal=KILL", first)           # the task dies while Slurm runs it
    job = _wait(jobs, job.id, seen(_done), 300, "the table", procs)
    assert job.state == "done", jobs.error_report(job)
    assert job.executor == "cluster" and job.result["table"] == str(A.ablation_dir(ws, p) / "table.md")

    rec = {t["key"]: t for t in json.loads(fanout.read_text())["tasks"]}
    assert rec["base-s0"]["tries"] == 1 and rec["base-s0"]["slurm_id"].startswith(first.split("_")[0] + "_")
    assert rec["lora-s0"]["tries"] == 2 and rec["lora-s0"]["slurm_id"] != first and "_" not in rec["lora-s0"]["slurm_id"]
    log = jobs.log_tail(job.id, 200)
    assert f"lora-s0: Slurm job {first} ended without its result" in log and "retrying it alone" in log, log
    assert "base-s0: done" in log and log.count("retrying it alone") == 1
    assert any(re.fullmatch(r"cells: \d pending · [12] running · \d done.*", ph) for ph in phases), phases

    # The cells: where and as a local run writes them, byte-identical (wall times and result ids live in the
    # provenance records beside them, which differ between any two runs)
    for r in ("base", "lora"):
        mine, theirs = A.cell_path(ws, p, r, 0), A.cell_path(local_ws, p, r, 0)
        assert mine.read_bytes() == theirs.read_bytes(), r
        assert _comparable(A.provenance_path(ws, p, r, 0), ws.root) == \
            _comparable(A.provenance_path(local_ws, p, r, 0), local_ws.root), r
        assert (A.ablation_dir(ws, p) / "samples" / f"{r}-s0.png").read_bytes() == \
            (A.ablation_dir(local_ws, p) / "samples" / f"{r}-s0.png").read_bytes()
    table, theirs = (json.loads((A.ablation_dir(w, p) / "table.json").read_text(encoding="utf-8"))
                     for w in (ws, local_ws))
    assert _figures(table) == _figures(theirs) and theirs["rows"] == json.loads(json.dumps(local["rows"]))
    assert (A.ablation_dir(ws, p) / "table.md").is_file()


@pytest.mark.slow  # ~1 min on 2 cores: a 2-step tiny run, then base + it as a 2-task array, then locally
def test_evaluate_of_two_checkpoints_as_a_job_array_saves_the_local_results(ws, store, jobs, procs,
                                                                           slurm_cluster, one_thread):
    import dataclasses

    from medart_core import evaluate as E
    from medart_core.data import build_sample_dataset
    from medart_core.train import TrainConfig, train

    build_sample_dataset(ws, store, "sample")
    train(TrainConfig.from_preset("cpu-smoke", captions="latest", max_steps=2, checkpoint_every=2,
                                  validate_every=100, export_merged=False), ws, store, run_name="ev",
          log=lambda m: None)
    spec = E.EvalSpec(dataset="sample", per_class=2, captions="latest", n_boot=5, kid_subsets=5, min_samples=2,
                      steps=3)
    _cluster_executor(ws, slurm_cluster)
    job = jobs.submit("evaluate", {"spec": dataclasses.asdict(spec), "checkpoints": ["base", "ev@2"],
                                   "backbone": None}, executor="cluster")
    procs.supervisor()
    job = _wait(jobs, job.id, _done, 240, "the evaluation", procs)
    assert job.state == "done", jobs.error_report(job)
    ids = job.result["results"]
    assert len(ids) == 2 and all("_" in s for s in job.result["slurm_tasks"].values())   # two array tasks
    saved = {r.id: r for r in E.load_results(ws)}
    remote = [saved[i] for i in ids]
    assert [r.profile["checkpoint"] for r in remote] == ["base", "ev@2"]

    shutil.rmtree(ws.samples_dir / "eval")        # the local run draws its own images
    local = E.run_evaluation(ws, store, spec, ["base", "ev@2"])
    for a, b in zip(remote, local):
        assert a.metrics == b.metrics, a.profile["checkpoint"]
        assert E.profile_mismatch(a.profile, b.profile) == []
        assert {k: v for k, v in a.profile.items() if k != "created_at"} == \
            {k: v for k, v in b.profile.items() if k != "created_at"}
        assert [Path(x).name for x in a.images] == [Path(x).name for x in b.images]


def test_a_generation_shards_by_prompt_in_whole_batches():
    from medart_core.fanout import generate_shards

    assert generate_shards(3, 3) == [(0, 1), (1, 2), (2, 3)]            # a task per prompt
    assert generate_shards(2, 5) == [(0, 2), (2, 5)]                     # as even as whole batches allow
    assert generate_shards(16, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]   # never more tasks than batches
    assert len(generate_shards(500, 500)) == 64                           # at most MAX_GENERATE_TASKS
    for n_prompts, n_batches in ((1, 1), (7, 3), (3, 10), (100, 250)):
        cuts = generate_shards(n_prompts, n_batches)
        assert cuts[0][0] == 0 and cuts[-1][1] == n_batches and all(a < b for a, b in cuts)
        assert all(x[1] == y[0] for x, y in zip(cuts, cuts[1:]))         # contiguous, each batch once


@pytest.mark.slow  # ~1 min on 2 cores: 3 prompts x 2 images in batches of 2 -> 3 tasks, then locally
def test_a_batch_generation_as_a_job_array_writes_the_local_runs_files(ws, jobs, procs, slurm_cluster, tmp_path,
                                                                       one_thread):
    from medart_core import generate as G
    from medart_core.workspace import Workspace

    req = G.GenerationRequest(prompts=["An endoscopic image of polyps", "A dermoscopic image of a naevus",
                                       "A third prompt"], n=2, batch_size=2, steps=2, seed=11)
    _cluster_executor(ws, slurm_cluster)
    job = jobs.submit("generate", {"request": req.to_dict(), "backbone": "tiny"}, executor="cluster")
    assert job.fans_out and not job.needs_gpu_slot
    procs.supervisor()
    job = _wait(jobs, job.id, _done, 240, "the images", procs)
    assert job.state == "done", jobs.error_report(job)
    assert len(job.result["slurm_tasks"]) == 3 and all("_" in s for s in job.result["slurm_tasks"].values())
    remote = [Path(p) for p in job.result["images"]]

    local_ws = Workspace.open(tmp_path / "local")
    local = [i.path for i in G.get_generator(local_ws, "tiny").generate(req)]
    assert [p.name for p in remote] == [p.name for p in local] and len(local) == 6
    assert sorted(x.name for x in remote[0].parent.glob("*.png")) == sorted(p.name for p in remote)
    for a, b in zip(remote, local):
        assert a.read_bytes() == b.read_bytes(), a.name           # pixels and their text chunk
        sa, sb = G.read_sidecar(a), G.read_sidecar(b)
        for k in ("prompt", "prompt_number", "index", "seed", "batch", "request_seed", "steps", "guidance"):
            assert sa[k] == sb[k], (a.name, k)


@pytest.mark.slow  # ~1 min on 2 cores: two long cells start under Slurm, then the job is stopped
def test_stopping_an_array_job_stops_its_running_tasks_and_leaves_nothing_queued(ws, jobs, procs, slurm_cluster,
                                                                                  one_thread):
    from medart_core import ablation as A

    overrides = {"rows": ["base", "lora"], "steps": 5000}      # cells far longer than the test waits
    p = A.get_preset("smoke", **overrides)
    _cluster_executor(ws, slurm_cluster)
    job = jobs.submit("ablation", {"preset": "smoke", "overrides": overrides}, executor="cluster")
    procs.supervisor()
    fanout = ws.root / "jobs" / job.id / "attempt-1" / "fanout.json"

    def both_running(j):
        rec = json.loads(fanout.read_text()) if fanout.is_file() else {}
        ids = [t["slurm_id"] for t in rec.get("tasks", [])]
        return j.is_final or (len(ids) == 2 and all((slurm_cluster.squeue(i) or ("",))[0] == "RUNNING" for i in ids))

    _wait(jobs, job.id, both_running, 240, "both cells running under Slurm", procs)
    ids = [t["slurm_id"] for t in json.loads(fanout.read_text())["tasks"]]
    assert "running on cluster" in jobs.get(job.id).progress_text()
    jobs.stop(job.id)
    job = _wait(jobs, job.id, _done, 120, "the stop", procs)
    assert job.state == "stopped", jobs.error_report(job)
    for i in ids:       # nothing of the job is left in Slurm's queue (a task may still be COMPLETING a moment)
        end = time.monotonic() + 60
        while slurm_cluster.squeue(i) is not None:
            assert time.monotonic() < end, (i, slurm_cluster.squeue(i))
            time.sleep(0.2)
    log = jobs.log_tail(job.id, 200)
    assert "stop requested: stop file written" in log, log
    # Each cell saw the stop file at a training step: no cell file, no table, nothing killed by scancel
    assert "still running 30 s after the stop" not in log, log
    assert not any(A.cell_path(ws, p, r, 0).exists() for r in ("base", "lora"))
    assert not (A.ablation_dir(ws, p) / "table.json").exists()
