"""Jobs with real processes, no mocks: a supervisor subprocess (``python -m medart_core worker``) runs real
``train`` jobs (tiny backbone, 32 px) and cheap ``sleep`` jobs; the tests stop, SIGTERM, SIGKILL and SIGSTOP
them, kill the supervisor itself, and check the ledger, the checkpoints and the final adapter tensors.

Every process a test starts (supervisors, and job processes found in the ledger) is killed by process group
in a finalizer."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_data import make_dataset

REPO = Path(__file__).resolve().parent.parent

TRAIN = {
    "backbone": "tiny", "resolution": 32, "dataset": "mini", "captions": "latest",
    "lora": {"rank": 2, "alpha": 2.0, "t5_enabled": True},
    "hldf": {"pixel_every": 3, "sample_steps": 2, "checkpointing": False},
    "batch_size": 1, "max_steps": 8, "checkpoint_every": 1, "keep_checkpoints": 2,
    "validate_every": 100, "validation_steps": 2, "validation_seeds": [0], "val_images": 1,
    "export_merged": False,
}


def _env() -> dict[str, str]:
    # One thread per process: identical arithmetic everywhere and no oversubscription on a shared 2-core box.
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONUNBUFFERED="1")


class Procs:
    """Starts supervisors; at teardown kills them and every job process the ledger knows (by group)."""

    def __init__(self, ws, tmp_path):
        self.ws, self.tmp = ws, tmp_path
        self.sups: list[subprocess.Popen] = []

    def supervisor(self, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"supervisor-{len(self.sups)}.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "medart_core", "worker", "--workspace", str(self.ws.root),
                              "--poll", "0.2", *args], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        log.close()
        self.sups.append(p)
        from medart_core.jobs import supervisor_pid

        deadline = time.monotonic() + 30
        while supervisor_pid(self.ws) != p.pid:
            assert p.poll() is None, self.supervisor_log()
            assert time.monotonic() < deadline, "supervisor did not take the lock"
            time.sleep(0.05)
        return p

    def supervisor_log(self) -> str:
        return "\n".join(f.read_text(errors="replace") for f in sorted(self.tmp.glob("supervisor-*.log")))

    def kill_supervisor(self, p: subprocess.Popen) -> None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def cleanup(self) -> None:
        from medart_core.jobs import JobLedger, signal_group

        for p in self.sups:
            if p.poll() is None:
                with _suppress():
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        if self.ws.jobs_db.exists():
            led = JobLedger(self.ws)
            for job in led.list():
                signal_group(job.pid, job.pid_start, signal.SIGKILL)
            led.close()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


@pytest.fixture
def procs(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pr = Procs(ws, tmp_path)
    yield pr
    pr.cleanup()


@pytest.fixture
def mini(ws, store):
    make_dataset(ws, store)
    return "mini"


def _wait(ledger, job_id, pred, timeout=180, what="condition", procs=None):
    deadline = time.monotonic() + timeout
    while True:
        job = ledger.get(job_id)
        if pred(job):
            return job
        if time.monotonic() > deadline:
            log = ledger.log_tail(job_id, 40)
            extra = procs.supervisor_log() if procs else ""
            raise AssertionError(f"timeout waiting for {what}; job is {job.state} {job.progress_info}\n{log}\n{extra}")
        time.sleep(0.05)


def _done(job):
    return job.is_final


def _cli(ws, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medart_core", *args, "--workspace", str(ws.root)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=60)


def _adapters(ws, run: str, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ws.run_layout(run).checkpoint(step) / "adapters.safetensors"))


def _train_job(ledger, run: str, **over):
    return ledger.submit("train", {"train": dict(TRAIN, **over), "run": run})


# =========================================================================================================
# Ledger, no training
# =========================================================================================================
def test_ledger_events_are_append_only_and_fold_to_the_row(ws, ledger):
    job = ledger.submit("sleep", {"seconds": 0.1, "steps": 2}, owner="dr ana")
    assert (job.state, job.attempt, job.owner) == ("queued", 1, "dr ana")
    assert ledger.state_from_events(job.id) == ("queued", 1)
    stopped = ledger.request_stop(job.id)          # a queued job is stopped at once
    assert stopped.state == "stopped"
    again = ledger.resume(job.id)
    assert (again.state, again.attempt) == ("queued", 2)
    assert [e.event for e in ledger.events(job.id)] == ["submitted", "stop_requested", "resumed"]
    assert ledger.state_from_events(job.id) == ("queued", 2)
    con = sqlite3.connect(ws.jobs_db)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE job_events SET state = 'done'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM job_events")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_submit_validates_before_queueing(ws, ledger, mini):
    from medart_core.errors import ConfigError, NotFoundError

    with pytest.raises(ConfigError, match="Unknown job kind"):
        ledger.submit("paint", {})
    with pytest.raises(ConfigError, match="batch_size"):
        _train_job(ledger, "bad", batch_size=0)
    with pytest.raises(NotFoundError, match="no run 'nope'"):
        ledger.submit("train", {"resume": "nope"})
    job = _train_job(ledger, "r1")
    with pytest.raises(ConfigError, match="belongs to job"):
        _train_job(ledger, "r1")
    assert job.run == "r1" and job.uses_gpu and job.config["train"]["max_steps"] == 8
    assert ledger.list() == [ledger.get(job.id)]


def test_failure_messages_name_the_cause():
    from medart_core.errors import MissingWeightsError, TrainingDivergedError
    from medart_core.jobs import describe_failure
    from medart_core.jobs import is_cuda_oom as _is_cuda_oom
    from medart_core.train_job import _oom_message
    from medart_core.train import TrainConfig

    cfg = TrainConfig.from_preset("paper", batch_size=4)
    assert _oom_message(120, cfg) == ("CUDA out of memory at step 120 with batch 4 at 512 px: try batch 1 or the "
                                      "small-gpu preset.")
    import torch

    assert _is_cuda_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not _is_cuda_oom(ValueError("nope"))
    msg = "PixArt-alpha/X is not in the Hugging Face cache and the Hub is unreachable: download it first."
    assert describe_failure(MissingWeightsError(msg)) == msg
    assert describe_failure(TrainingDivergedError("Training diverged at step 3: the loss is nan.")).startswith(
        "Training diverged at step 3")
    assert describe_failure(KeyError("x")).startswith("Unexpected KeyError")


def test_process_identity_detects_pid_reuse_and_zombies():
    from medart_core.jobs import process_alive, process_start_token

    tok = process_start_token(os.getpid())
    assert tok and process_alive(os.getpid(), tok)
    assert not process_alive(os.getpid(), tok.rsplit(":", 1)[0] + ":1")   # same pid, other start time
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    t = process_start_token(p.pid)
    deadline = time.monotonic() + 10
    while process_start_token(p.pid) is not None and time.monotonic() < deadline:   # exited = zombie = gone
        time.sleep(0.02)
    assert process_start_token(p.pid) is None and not process_alive(p.pid, t)
    p.wait()


# =========================================================================================================
# Supervisor with cheap sleep jobs: escalation, silent jobs, reconcile at start, one supervisor only
# =========================================================================================================
def test_stop_escalates_to_sigterm_then_sigkill(ws, ledger, procs):
    procs.supervisor("--stop-grace", "0.5", "--kill-grace", "0.5")
    job = ledger.submit("sleep", {"seconds": 60, "steps": 600, "ignore_stop": True})
    _wait(ledger, job.id, lambda j: (j.step or 0) >= 1, 30, "first step", procs)
    ledger.request_stop(job.id)
    job = _wait(ledger, job.id, _done, 30, "stop", procs)
    assert job.state == "stopped"
    sigs = [e.detail.get("signal") for e in ledger.events(job.id) if e.event == "signal"]
    assert sigs == ["SIGTERM", "SIGKILL"]
    assert "SIGTERM received" in ledger.log_tail(job.id)   # the job process saw the SIGTERM first


def test_silent_job_is_killed_and_marked_interrupted(ws, ledger, procs):
    procs.supervisor("--heartbeat-timeout", "2")
    job = ledger.submit("sleep", {"seconds": 60, "steps": 600})
    job = _wait(ledger, job.id, lambda j: (j.step or 0) >= 1, 30, "first step", procs)
    os.kill(job.pid, signal.SIGSTOP)          # frozen: alive, but no heartbeat any more
    job = _wait(ledger, job.id, _done, 30, "reconcile", procs)
    assert job.state == "interrupted" and "no heartbeat" in job.error
    assert ledger.state_from_events(job.id) == ("interrupted", 1)


def test_one_supervisor_per_workspace_and_reconcile_at_start(ws, ledger, procs):
    from medart_core.jobs import ensure_supervisor

    first = procs.supervisor()
    assert ensure_supervisor(ws) == first.pid                     # no second one spawned
    # the entry point of older versions (`python -m medart_core.jobs worker`) still reaches the one CLI
    second = subprocess.run([sys.executable, "-m", "medart_core.jobs", "worker", "--workspace", str(ws.root)],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "another supervisor" in second.stdout
    job = ledger.submit("sleep", {"seconds": 60, "steps": 600})
    job = _wait(ledger, job.id, lambda j: (j.step or 0) >= 1, 30, "first step", procs)
    procs.kill_supervisor(first)                                  # supervisor gone, job keeps running
    time.sleep(0.5)
    assert ledger.get(job.id).state == "running"
    os.killpg(job.pid, signal.SIGKILL)                            # then the job dies while nobody watches
    time.sleep(0.3)
    assert ledger.get(job.id).state == "running"                  # nobody has looked yet
    procs.supervisor()                                            # the next supervisor reconciles at start
    job = _wait(ledger, job.id, _done, 15, "reconcile", procs)
    assert job.state == "interrupted" and "is gone" in job.error and "resume" in job.error
    # resume = a new attempt of the same job; the sleep kind continues at its last reported step
    step = job.step
    ledger.resume(job.id)
    job = _wait(ledger, job.id, lambda j: j.attempt == 2 and j.state == "running" and (j.step or 0) > step, 30,
                "attempt 2", procs)
    ledger.request_stop(job.id)
    assert _wait(ledger, job.id, _done, 30, "stop", procs).state == "stopped"


def test_cpu_light_jobs_run_beside_a_gpu_job(ws, ledger, procs):
    gpu = ledger.submit("sleep", {"seconds": 60, "steps": 600})
    import medart_core.jobs as jobs

    # A GPU-kind stand-in: the same function under another kind name that needs the accelerator slot.
    jobs.register_kind("sleep-gpu", jobs.run_sleep_job, uses_gpu=True, prepare=jobs.prepare_sleep)
    try:
        g1 = ledger.submit("sleep-gpu", {"seconds": 60, "steps": 600})
        g2 = ledger.submit("sleep-gpu", {"seconds": 60, "steps": 600})
    finally:
        jobs._KINDS.pop("sleep-gpu")
    procs.supervisor()
    _wait(ledger, g1.id, lambda j: j.state == "running", 30, "g1 running", procs)
    _wait(ledger, gpu.id, lambda j: j.state == "running", 30, "cpu job running", procs)
    time.sleep(1.0)
    assert ledger.get(g2.id).state == "queued"           # one accelerator job at a time
    ledger.request_stop(g1.id)
    _wait(ledger, g2.id, lambda j: j.state == "running", 30, "g2 after g1", procs)
    assert ledger.get(g1.id).state == "stopped"
    for j in (gpu, g2):
        ledger.request_stop(j.id)
        _wait(ledger, j.id, _done, 30, "stop", procs)


# =========================================================================================================
# Real training jobs
# =========================================================================================================
@pytest.mark.slow
def test_train_jobs_queue_on_the_accelerator_slot_show_progress_and_finish(ws, ledger, procs, mini):
    # Progress reaches the ledger at most every FLAG_POLL_S (0.5 s): the run must last several of those for a
    # mid-run value to exist at all (6 steps once finished between two flushes on an idle machine).
    total = 30
    a = _train_job(ledger, "a", max_steps=total)
    b = _train_job(ledger, "b", max_steps=total)
    procs.supervisor()
    seen_progress = []
    while True:
        ja, jb = ledger.get(a.id), ledger.get(b.id)
        if ja.state == "running":
            assert jb.state == "queued", "the second accelerator job started before the first finished"
            if ja.step and 0 < ja.progress < 1:
                seen_progress.append((ja.step, ja.progress, ja.eta_s))
        if ja.is_final:
            break
        time.sleep(0.05)
    assert ja.state == "done", ledger.error_report(ja)
    assert seen_progress and seen_progress[-1][1] == pytest.approx(seen_progress[-1][0] / total)
    assert any(eta is not None for _, _, eta in seen_progress)
    assert ja.progress == 1.0 and ja.result["step"] == total and ja.result["status"] == "finished"
    assert Path(ja.last_checkpoint) == ws.run_layout("a").checkpoint(total)
    assert (ws.run_layout("a").checkpoint(total) / "adapters.safetensors").is_file()
    assert "run a" in ledger.log_tail(a.id, 200)
    jb = _wait(ledger, b.id, _done, 180, "b done", procs)
    assert jb.state == "done" and ledger.get(b.id).started_at >= ja.finished_at
    assert [e.event for e in ledger.events(a.id)][:2] == ["submitted", "started"]
    assert ledger.state_from_events(a.id) == ("done", 1)

    out = _cli(ws, "jobs", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {r["id"]: (r["state"], r["run"], r["progress"]) for r in rows} == {a.id: ("done", "a", 1.0),
                                                                            b.id: ("done", "b", 1.0)}
    assert all({"id", "kind", "state", "progress", "pid", "run", "error"} <= set(r) for r in rows)
    show = _cli(ws, "jobs", "show", a.id)
    assert "finished" in show.stdout and "checkpoint" in show.stdout


@pytest.mark.slow
def test_stop_checkpoints_then_sigterm_then_resume_to_done(ws, ledger, procs, mini):
    total = 200   # headroom: under load the stop must land before the run could finish
    job = _train_job(ledger, "s", max_steps=total, checkpoint_every=100)
    procs.supervisor()
    _wait(ledger, job.id, lambda j: (j.step or 0) >= 2, 180, "step 2", procs)
    ledger.request_stop(job.id)
    job = _wait(ledger, job.id, _done, 120, "stopped", procs)
    assert job.state == "stopped", ledger.error_report(job)
    k = job.result["step"]
    assert 2 <= k < total and job.result["status"] == "stopped"
    assert Path(job.last_checkpoint) == ws.run_layout("s").checkpoint(k)      # checkpointed at the stop step
    assert (ws.run_layout("s").checkpoint(k) / "adapters.safetensors").is_file()

    # Ctrl-C / SIGTERM of the job's own process also ends it as stopped with a checkpoint
    job = ledger.resume(job.id)
    job = _wait(ledger, job.id, lambda j: j.attempt == 2 and j.state == "running" and (j.step or 0) >= k + 2, 180,
                "attempt 2 past the stop", procs)
    os.kill(job.pid, signal.SIGTERM)
    job = _wait(ledger, job.id, _done, 120, "stopped by SIGTERM", procs)
    assert job.state == "stopped", ledger.error_report(job)
    k2 = job.result["step"]
    assert k < k2 < total and Path(job.last_checkpoint) == ws.run_layout("s").checkpoint(k2)
    assert "SIGTERM received" in ledger.log_tail(job.id, 200)
    assert [e.detail.get("cause") for e in ledger.events(job.id) if e.event == "finished"] == \
        ["stop request", "SIGTERM"]

    job = ledger.resume(job.id)
    job = _wait(ledger, job.id, _done, 180, "done", procs)
    assert (job.state, job.attempt, job.result["step"]) == ("done", 3, total), ledger.error_report(job)
    from medart_core.train import read_metrics

    steps = [r["step"] for r in read_metrics(ws, "s") if "loss_latent" in r]
    assert steps == list(range(1, total + 1))        # every step exactly once over the three attempts


@pytest.mark.slow
def test_sigkill_reconciles_to_interrupted_and_resume_is_bitwise_identical(ws, ledger, procs, mini):
    import torch

    # Enough steps to span several progress writes: on an idle machine 10 tiny steps could finish between two.
    total = 40
    full = _train_job(ledger, "full", max_steps=total)
    cut = _train_job(ledger, "cut", max_steps=total)
    procs.supervisor()
    assert _wait(ledger, full.id, _done, 180, "full", procs).state == "done"
    job = _wait(ledger, cut.id, lambda j: j.state == "running" and (j.step or 0) >= 4, 180, "cut at step 4", procs)
    os.killpg(job.pid, signal.SIGKILL)
    job = _wait(ledger, cut.id, _done, 30, "reconcile", procs)
    assert job.state == "interrupted"
    assert "killed by SIGKILL" in job.error and "resume continues from the last checkpoint" in job.error
    assert ledger.state_from_events(cut.id) == ("interrupted", 1)
    job = ledger.resume(cut.id)
    job = _wait(ledger, cut.id, _done, 180, "resumed", procs)
    assert (job.state, job.attempt, job.result["step"]) == ("done", 2, total), ledger.error_report(job)
    assert "resuming run cut" in ledger.log_tail(cut.id, 400)
    a, b = _adapters(ws, "full", total), _adapters(ws, "cut", total)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"adapter tensor {k} differs after SIGKILL + resume"
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)   # it really trained


@pytest.mark.slow
def test_supervisor_killed_mid_job_the_job_continues_and_a_new_supervisor_adopts_it(ws, ledger, procs, mini):
    job = _train_job(ledger, "adopt", max_steps=20)
    sup = procs.supervisor()
    job = _wait(ledger, job.id, lambda j: (j.step or 0) >= 2, 180, "step 2", procs)
    procs.kill_supervisor(sup)
    step, beat = job.step, job.heartbeat_at
    later = _wait(ledger, job.id, lambda j: (j.step or 0) >= step + 2 or j.is_final, 120, "progress", procs)
    # Alive without a supervisor: the job itself wrote after the kill (a heartbeat, or - when the remaining
    # steps fit between two heartbeats - its own final record).
    assert later.state in ("running", "done") and (later.step or 0) >= step + 2
    assert later.heartbeat_at > beat or (later.state == "done" and later.finished_at > beat), later
    procs.supervisor()                     # reconnects: the live job stays running, then ends on its own
    job = _wait(ledger, job.id, _done, 180, "done", procs)
    assert job.state == "done" and job.attempt == 1, ledger.error_report(job)
    assert job.result["step"] == 20


@pytest.mark.slow
def test_a_failing_train_job_says_why_with_the_log_tail(ws, ledger, procs, store):
    make_dataset(ws, store, name="few", n=2)
    job = ledger.submit("train", {"train": dict(TRAIN, dataset="few", batch_size=4), "run": "f"})
    procs.supervisor()
    job = _wait(ledger, job.id, _done, 180, "failed", procs)
    assert job.state == "failed"
    assert "fewer than one step needs" in job.error and "\n" not in job.error
    report = ledger.error_report(job)
    assert report.startswith(job.error) and "Last lines of" in report and "failed:" in report
    out = _cli(ws, "jobs", "show", job.id, "--json")
    d = json.loads(out.stdout)
    assert d["state"] == "failed" and d["error"] == job.error and d["log_tail"]


def test_cli_submit_list_stop_resume_logs(ws, mini):
    out = _cli(ws, "jobs", "submit", "train", "--dataset", "mini", "--captions", "latest", "--max_steps", "3",
               "--lora.rank", "2", "--run", "cli", "--json", "--no-worker")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert (job["kind"], job["state"], job["run"]) == ("train", "queued", "cli")
    assert job["config"]["train"]["max_steps"] == 3 and job["config"]["train"]["lora"]["rank"] == 2
    again = _cli(ws, "jobs", "submit", "train", "--dataset", "mini", "--run", "cli", "--no-worker")
    assert again.returncode == 2 and "belongs to job" in again.stderr
    stop = _cli(ws, "jobs", "stop", job["id"], "--json", "--no-worker")
    assert json.loads(stop.stdout)["state"] == "stopped"
    res = _cli(ws, "jobs", "resume", job["id"], "--json", "--no-worker")
    assert (json.loads(res.stdout)["state"], json.loads(res.stdout)["attempt"]) == ("queued", 2)
    lst = _cli(ws, "jobs", "list")
    assert job["id"] in lst.stdout and "queued (attempt 2)" in lst.stdout
    logs = _cli(ws, "jobs", "logs", job["id"])
    assert logs.returncode == 0
    missing = _cli(ws, "jobs", "show", "nope")
    assert missing.returncode == 2 and "No job 'nope'" in missing.stderr


# =========================================================================================================
# Rows written by older versions, and the roles' public ledger APIs
# =========================================================================================================
def test_targets_of_older_versions_resolve_to_the_new_homes():
    from medart_core import train_job
    from medart_core.jobs import resolve_target, run_sleep_job

    assert resolve_target("medart_core.jobs:run_train_job") is train_job.run_train_job
    assert resolve_target("medart_core.jobs:prepare_train") is train_job.prepare_train
    assert resolve_target("medart_core.jobs:run_sleep_job") is run_sleep_job
    assert resolve_target("medart_core.train_job:run_train_job") is train_job.run_train_job


def test_kinds_are_registered_by_name_and_the_job_machinery_imports_no_stage():
    code = ("import json, sys, medart_core.jobs as j; k = j.job_kinds(); print(json.dumps({'kinds': sorted(k), "
            "'train': k['train'].target, 'loaded': sorted(m for m in sys.modules if m.startswith('medart_core'))}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["kinds"] == ["ablation", "evaluate", "generate", "sleep", "train"]
    assert d["train"] == "medart_core.train_job:run_train_job"
    for stage in ("train", "train_job", "evaluate", "generate", "ablation", "vsg", "data", "captions", "commands"):
        assert f"medart_core.{stage}" not in d["loaded"], f"importing medart_core.jobs loaded medart_core.{stage}"


def test_an_interrupted_job_message_ends_with_its_kinds_resume_hint(ws, ledger, mini):
    from medart_core.jobs import resume_hint

    train = _train_job(ledger, "hint")
    sleep = ledger.submit("sleep", {"seconds": 0.1, "steps": 2})
    assert resume_hint(train) == "; resume continues from the last checkpoint."
    assert resume_hint(sleep) == "; resume starts a new attempt."


@pytest.mark.slow
def test_a_row_of_an_older_version_resumes_to_done(ws, ledger, procs, mini):
    job = _train_job(ledger, "old", max_steps=2)
    assert ledger.request_stop(job.id).state == "stopped"       # queued -> stopped, as an old ledger may hold it
    con = sqlite3.connect(ws.jobs_db)
    with con:
        con.execute("UPDATE jobs SET target = ? WHERE id = ?", ("medart_core.jobs:run_train_job", job.id))
    con.close()
    assert ledger.get(job.id).target == "medart_core.jobs:run_train_job"
    ledger.resume(job.id)
    procs.supervisor()
    job = _wait(ledger, job.id, _done, 180, "done", procs)
    assert (job.state, job.attempt, job.result["step"]) == ("done", 2, 2), ledger.error_report(job)
    assert (ws.run_layout("old").checkpoint(2) / "adapters.safetensors").is_file()
