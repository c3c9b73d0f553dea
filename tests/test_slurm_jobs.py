"""Jobs on Slurm behind the one Executor door (issue 17 §2 and §4), on the REAL single-node Slurm of the
``slurm_cluster`` fixture, plus unit tests of the remote channel and its ingestion that need no Slurm.

The supervisor is a real subprocess (``python -m medart_core worker``) that submits through submitit and
polls squeue/scontrol; the compute node runs ``medart_core.jobs.remote.RemoteAttempt`` and reports through
files in ``W/jobs/<id>/attempt-<n>/``. Every wait is on a state with a deadline, never a fixed sleep.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_jobs import TRAIN, Procs, _done, _wait
from training_data import make_dataset


@pytest.fixture
def procs(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEDART_SLURM_POLL_S", "0.5")     # the supervisor's Slurm poll, shortened for tests
    pr = Procs(ws, tmp_path)
    yield pr
    pr.cleanup()


@pytest.fixture
def jobs(ws):
    from medart_core.jobs import LocalExecutor

    ex = LocalExecutor(ws, start_supervisor=False)      # the tests start their own supervisor (procs)
    yield ex
    ex.close()


def _cluster_executor(ws, cluster, name="cluster", **kw):
    from medart_core import executors
    from medart_core.slurm import SlurmSettings

    settings = SlurmSettings(partition=kw.pop("partition", cluster.partition), time=kw.pop("time", "00:10:00"),
                             **kw)
    return executors.add_executor(ws, name, settings=settings)


# =========================================================================================================
# No Slurm: the channel files, their ingestion, the checkpoint marker, the schema
# =========================================================================================================
def _fake_remote(ledger, ws, executor="cluster", **config):
    """A queued remote row as the supervisor leaves it after sbatch (the name is not checked at this level)."""
    job = ledger.submit("sleep", {"seconds": 0, "steps": 4, **config}, executor=executor)
    assert ledger.remote_submitted(job.id, 1, "4242", str(ws.root / "nowhere"))
    return ledger.get(job.id)


def test_file_channel_writes_atomic_files_and_the_bridge_ingests_them(ws, ledger):
    from medart_core.jobs.channel import FileChannel, attempt_dir, read_remote, request_stop_file
    from medart_core.jobs.slurm_bridge import SlurmBridge
    from medart_core.slurm import SlurmStatus

    job = _fake_remote(ledger, ws)
    assert (job.state, job.executor, job.remote_id) == ("queued", "cluster", "4242")
    folder = attempt_dir(ws, job.id, 1)
    ch = FileChannel(folder)
    said: list[str] = []
    bridge = SlurmBridge(ws, ledger, said.append)

    bridge._ingest(job, SlurmStatus("4242", "PENDING", "Resources"))
    job = ledger.get(job.id)
    assert (job.state, job.remote_reason) == ("queued", "Resources")
    assert job.progress_text().startswith("queued on cluster (Slurm: Resources)")
    assert job.to_dict()["executor"] == "cluster" and job.to_dict()["remote_id"] == "4242"

    # the node reports: heartbeat + progress, a checkpoint; nothing touches SQLite on its side
    assert ch.beat(0.5, {"step": 2, "total": 4}) == (True, False)
    ch.checkpoint("/x/step_000002", 2)
    assert json.loads((folder / "heartbeat.json").read_text())["info"] == {"step": 2, "total": 4}
    bridge._ingest(job, SlurmStatus("4242", "RUNNING", "None"))
    job = ledger.get(job.id)
    assert (job.state, job.step, job.progress, job.last_checkpoint) == ("running", 2, 0.5, "/x/step_000002")
    bridge._ingest(job, SlurmStatus("4242", "RUNNING", "None"))      # ingesting twice adds no event
    assert [e.event for e in ledger.events(job.id)].count("checkpoint") == 1

    # a stop: the flag is a file the node reads
    assert request_stop_file(folder) and ch.read_flags() == (True, True)
    ch.finish("done", error=None, result={"step": 4}, progress=1.0, info={"step": 4, "total": 4}, detail={})
    assert read_remote(folder).final["state"] == "done"
    bridge._ingest(job, SlurmStatus("4242", "", ""))                  # gone, but it wrote its final record
    job = ledger.get(job.id)
    assert (job.state, job.result, job.step) == ("done", {"step": 4}, 4)
    assert ledger.state_from_events(job.id) == ("done", 1)


@pytest.mark.parametrize("slurm_state, want, words", [
    ("CANCELLED", "interrupted", "cancelled outside Med-Art"),
    ("TIMEOUT", "interrupted", "time limit"),
    ("PREEMPTED", "interrupted", "preempted"),
    ("NODE_FAIL", "interrupted", "NODE_FAIL"),
    ("", "interrupted", "no longer knows the job"),
    ("OUT_OF_MEMORY", "failed", "ran out of memory"),
])
def test_slurm_ends_without_a_final_record_map_to_resumable_or_failed(ws, ledger, slurm_state, want, words):
    from medart_core.jobs.slurm_bridge import SlurmBridge
    from medart_core.slurm import SlurmStatus

    job = _fake_remote(ledger, ws)
    bridge = SlurmBridge(ws, ledger, lambda m: None)
    bridge._ingest(job, SlurmStatus("4242", "RUNNING", "None"))
    bridge._ingest(ledger.get(job.id), SlurmStatus("4242", slurm_state, "", "0:9"))
    job = ledger.get(job.id)
    assert job.state == want and words in job.error, job.error
    assert job.state != "running"
    if want == "interrupted":
        assert job.resumable and job.error.count(". ") == 0       # one sentence


def test_a_slurm_signal_stop_we_did_not_ask_for_is_interrupted_and_a_requeue_goes_back_to_queued(ws, ledger):
    from medart_core.jobs.channel import FileChannel, attempt_dir
    from medart_core.jobs.slurm_bridge import SlurmBridge
    from medart_core.slurm import SlurmStatus

    job = _fake_remote(ledger, ws)
    bridge = SlurmBridge(ws, ledger, lambda m: None)
    bridge._ingest(job, SlurmStatus("4242", "RUNNING", "None"))
    bridge._ingest(ledger.get(job.id), SlurmStatus("4242", "PENDING", "BeginTime"))   # submitit requeued it
    job = ledger.get(job.id)
    assert (job.state, job.remote_reason) == ("queued", "BeginTime")
    assert "requeued" in [e.event for e in ledger.events(job.id)]
    bridge._ingest(job, SlurmStatus("4242", "RUNNING", "None"))
    FileChannel(attempt_dir(ws, job.id, 1)).finish("stopped", error=None, result={"status": "stopped"},
                                                   progress=0.5, info={}, detail={"cause": "SIGTERM"})
    bridge._ingest(ledger.get(job.id), SlurmStatus("4242", "CANCELLED", ""))
    job = ledger.get(job.id)
    assert job.state == "interrupted" and "cancelled outside Med-Art" in job.error


def test_stop_of_a_remote_job_in_the_slurm_queue_waits_for_the_supervisor(ws, ledger):
    job = _fake_remote(ledger, ws)
    assert ledger.request_stop(job.id).state == "stopping"   # Slurm has it: the supervisor must cancel it
    plain = ledger.submit("sleep", {"seconds": 0}, executor="cluster")
    assert ledger.request_stop(plain.id).state == "stopped"  # never handed over: stopped at once


def test_resume_moves_the_next_attempt_to_another_executor_and_unknown_names_are_refused(ws, jobs, ledger):
    from medart_core.errors import NotFoundError

    with pytest.raises(NotFoundError, match="known: local"):
        jobs.submit("sleep", {"seconds": 0}, executor="nope")
    job = _fake_remote(ledger, ws)
    ledger.request_stop(job.id)
    ledger.remote_gone(job.id, 1, "interrupted", "x")
    job = jobs.resume(job.id, executor="local")
    assert (job.attempt, job.executor, job.remote_id, job.remote_folder) == (2, "local", None, None)
    assert [e.detail.get("executor") for e in jobs.events(job.id) if e.event == "resumed"] == ["local"]
    with pytest.raises(NotFoundError):
        jobs.resume(job.id, executor="nope")


def test_checkpoint_completion_marker_and_checkpoints_of_older_versions(tmp_path):
    import torch

    from medart_core.checkpoint import COMPLETE_MARKER, latest_checkpoint, list_checkpoints, write_checkpoint

    run = tmp_path / "run"
    t = {"adapters": {"w": torch.ones(2)}}
    a = write_checkpoint(run, 1, t, {"step": 1}, keep=5)
    b = write_checkpoint(run, 2, t, {"step": 2}, keep=5)
    assert (b / COMPLETE_MARKER).is_file() and latest_checkpoint(run) == b
    # a folder a shared filesystem shows before its marker is not complete: the previous one is used
    (b / COMPLETE_MARKER).unlink()
    assert latest_checkpoint(run) == a and list_checkpoints(run) == [a]
    # a checkpoint of the old code names no marker and has none: complete by its files, so old runs resume
    state = json.loads((b / "state.json").read_text())
    del state["complete_marker"]
    (b / "state.json").write_text(json.dumps(state))
    assert latest_checkpoint(run) == b


# =========================================================================================================
# On the real local Slurm
# =========================================================================================================
@pytest.mark.slow
def test_sleep_on_slurm_queued_running_done(ws, jobs, procs, slurm_cluster):
    _cluster_executor(ws, slurm_cluster)
    job = jobs.submit("sleep", {"seconds": 6, "steps": 6}, executor="cluster")
    assert (job.state, job.executor, job.remote_id) == ("queued", "cluster", None)   # the row first
    procs.supervisor()
    job = _wait(jobs, job.id, lambda j: j.remote_id is not None, 60, "submitted to Slurm", procs)
    job = _wait(jobs, job.id, lambda j: j.state == "running" and (j.step or 0) >= 1, 90, "running", procs)
    assert slurm_cluster.squeue(job.remote_id)[0] == "RUNNING"       # Slurm itself runs it
    assert job.heartbeat_at is not None and "running on cluster" in job.progress_text()
    job = _wait(jobs, job.id, _done, 90, "done", procs)
    assert (job.state, job.step, job.result["step"]) == ("done", 6, 6), jobs.error_report(job)
    d = job.to_dict()
    assert d["executor"] == "cluster" and d["remote_id"] == job.remote_id
    assert "===== job" in jobs.log_tail(job.id, 50)            # the job's own log, as for a local job
    events = [e.event for e in jobs.events(job.id)]
    assert events[:2] == ["submitted", "submitted_remote"] and events[-1] == "finished"
    assert events.count("started") == 1      # a "pending" event may come first, while Slurm schedules it


@pytest.mark.slow
def test_scancel_behind_our_back_is_interrupted_then_resume_is_done_at_the_last_step(ws, jobs, procs,
                                                                                      slurm_cluster):
    _cluster_executor(ws, slurm_cluster)
    job = jobs.submit("sleep", {"seconds": 20, "steps": 20}, executor="cluster")
    procs.supervisor()
    job = _wait(jobs, job.id, lambda j: j.state == "running" and (j.step or 0) >= 2, 120, "running", procs)
    slurm_cluster.run("scancel", job.remote_id)
    job = _wait(jobs, job.id, _done, 60, "interrupted", procs)
    assert job.state == "interrupted", jobs.error_report(job)
    assert "cancelled outside Med-Art" in job.error and job.resumable
    k = job.step
    job = jobs.resume(job.id, max_steps=None)
    assert (job.attempt, job.executor) == (2, "cluster")
    job = _wait(jobs, job.id, lambda j: j.attempt == 2 and j.remote_id is not None, 60, "attempt 2", procs)
    job = _wait(jobs, job.id, _done, 150, "done", procs)      # the sleep kind continues at its reported step
    assert (job.state, job.attempt, job.result["step"]) == ("done", 2, 20), jobs.error_report(job)
    assert k >= 2


@pytest.mark.slow
def test_a_failing_setup_command_shows_slurms_stderr(ws, jobs, procs, slurm_cluster):
    _cluster_executor(ws, slurm_cluster, "broken", setup=["echo medart-setup-went-wrong >&2", "false"])
    job = jobs.submit("sleep", {"seconds": 0, "steps": 1}, executor="broken")
    procs.supervisor()
    job = _wait(jobs, job.id, _done, 120, "failed", procs)
    assert job.state == "failed", (job.state, job.error)
    report = jobs.error_report(job)
    assert "Slurm's stderr of job" in report and "medart-setup-went-wrong" in report, report
    assert "medart-setup-went-wrong" in jobs.log_tail(job.id, 20)


@pytest.mark.slow
def test_pending_reason_is_shown_and_a_pending_job_stops(ws, jobs, procs, slurm_cluster):
    _cluster_executor(ws, slurm_cluster, "down", partition=slurm_cluster.down_partition)
    job = jobs.submit("sleep", {"seconds": 1}, executor="down")
    procs.supervisor()
    job = _wait(jobs, job.id, lambda j: j.remote_reason == "PartitionDown", 60, "PartitionDown", procs)
    assert job.state == "queued" and "queued on down (Slurm: PartitionDown)" in job.progress_text()
    assert jobs.stop(job.id).state == "stopping"
    job = _wait(jobs, job.id, _done, 60, "stopped", procs)
    assert job.state == "stopped"
    slurm_cluster.wait_state(job.remote_id, {"CANCELLED"}, 30)


@pytest.mark.slow
def test_a_preemption_signal_requeues_the_same_attempt_which_continues(ws, jobs, procs, slurm_cluster):
    """submitit's checkpointing: USR2 (what Slurm sends before a time limit or on preemption) makes the job
    stop at its next step, and submitit requeues the same Slurm job, which continues to the end."""
    _cluster_executor(ws, slurm_cluster)
    job = jobs.submit("sleep", {"seconds": 20, "steps": 20}, executor="cluster")
    procs.supervisor()
    job = _wait(jobs, job.id, lambda j: j.state == "running" and (j.step or 0) >= 2, 120, "running", procs)
    slurm_cluster.run("scancel", "--signal=USR2", job.remote_id)
    job = _wait(jobs, job.id, _done, 180, "done after the requeue", procs)
    assert (job.state, job.attempt, job.result["step"]) == ("done", 1, 20), jobs.error_report(job)
    events = [e.event for e in jobs.events(job.id)]
    assert events.count("submitted_remote") == 1            # the same Slurm job, requeued by submitit
    starts = json.loads((ws.root / "jobs" / job.id / "attempt-1" / "starts.json").read_text())["starts"]
    assert starts == 2 and "checkpointing for a requeue" in jobs.log_tail(job.id, 200)


# =========================================================================================================
# §4: exact resume across executors
# =========================================================================================================
@pytest.mark.slow
def test_train_local_then_slurm_then_local_is_bitwise_equal_to_an_uninterrupted_run(ws, jobs, procs, store,
                                                                                    slurm_cluster):
    import torch
    from safetensors.torch import load_file

    make_dataset(ws, store)
    _cluster_executor(ws, slurm_cluster, mem_gb=2)
    total = 240     # headroom: a stop lands some steps after it is asked (the ledger/file round trips)
    train = dict(TRAIN, max_steps=total, checkpoint_every=100)
    full = jobs.submit("train", {"train": train, "run": "full"})
    cut = jobs.submit("train", {"train": train, "run": "cut"})
    procs.supervisor()
    assert _wait(jobs, full.id, _done, 300, "full", procs).state == "done"

    def stop_after(job_id: str, attempt: int, steps: int) -> int:
        j = _wait(jobs, job_id, lambda j: j.attempt == attempt and j.state == "running" and (j.step or 0) >= steps,
                  300, f"attempt {attempt} at step {steps}", procs)
        jobs.stop(j.id)
        j = _wait(jobs, job_id, _done, 180, f"attempt {attempt} stopped", procs)
        assert j.state == "stopped", jobs.error_report(j)
        return int(j.result["step"])

    k1 = stop_after(cut.id, 1, 3)                                   # locally
    job = jobs.resume(cut.id, executor="cluster")
    assert job.executor == "cluster"
    k2 = stop_after(cut.id, 2, k1 + 5)                              # on Slurm: stop flag file, checkpoint
    job = jobs.get(cut.id)
    assert job.remote_id and Path(job.last_checkpoint).name == f"step_{k2:06d}"
    job = jobs.resume(cut.id, executor="local")
    job = _wait(jobs, cut.id, _done, 300, "done locally", procs)
    assert (job.state, job.attempt, job.result["step"], job.executor) == ("done", 3, total, "local"), \
        jobs.error_report(job)
    assert k1 < k2 < total
    a = load_file(str(ws.run_layout("full").checkpoint(total) / "adapters.safetensors"))
    b = load_file(str(ws.run_layout("cut").checkpoint(total) / "adapters.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"adapter tensor {key} differs after local -> Slurm -> local"
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
