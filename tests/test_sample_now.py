"""Sample now (issue 19 §4): a running train job renders its validation prompts at its next step on request,
without stopping, and the training is untouched (adapters bitwise equal to a run without the request); the
request is taken once; only a running train job takes one (library, executor and ``jobs sample``)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from training_data import REPO, make_dataset, subprocess_env, tiny_train_config

from medart_core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapters(ws, run: str, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ws.run_layout(run).checkpoint(step) / "adapters.safetensors"))


class _AskAt:
    """Callbacks that ask for a sample once, before the optimiser step after ``step``."""

    def __init__(self, step: int):
        self.at, self.step, self.asked, self.grids = step, 0, 0, []

    def on_step(self, record):
        self.step = record["step"]

    def on_validation(self, grid):
        self.grids.append((self.step, grid))

    def sample_requested(self) -> bool:
        if self.step == self.at and not self.asked:
            self.asked += 1
            return True
        return False


def test_sample_now_renders_the_grid_mid_run_and_leaves_the_training_bitwise_unchanged(ws, store):
    from medart_core.train import train

    make_dataset(ws, store)
    cfg = dict(max_steps=4, checkpoint_every=4, validate_every=100)
    train(tiny_train_config(**cfg), ws, store, run_name="plain", log=lambda m: None)
    ask = _AskAt(2)
    train(tiny_train_config(**cfg), ws, store, run_name="asked", callbacks=ask, log=lambda m: None)

    assert ask.asked == 1 and [s for s, _ in ask.grids] == [2, 4]     # on request at 2, then the final one
    assert ask.grids[0][1].is_file()
    records = [json.loads(line) for line in ws.run_layout("asked").metrics.read_text().splitlines() if line.strip()]
    requested = [r for r in records if r.get("requested")]
    assert len(requested) == 1 and requested[0]["step"] == 2 and "val_loss" in requested[0]
    assert max(r["step"] for r in records) == 4, "it went on training"
    a, b = _adapters(ws, "plain", 4), _adapters(ws, "asked", 4)
    assert set(a) == set(b) and all(bool((a[k] == b[k]).all()) for k in a), "the sample touched the training"
    losses = [[r["loss"] for r in recs if "loss" in r]
              for recs in ([json.loads(x) for x in ws.run_layout(n).metrics.read_text().splitlines() if x.strip()]
                           for n in ("plain", "asked"))]
    assert losses[0] == losses[1]


def test_only_a_running_train_job_takes_a_request_and_it_is_taken_once(ws, ledger):
    from medart_core.jobs import request_sample, sample_request_path, take_sample_request

    job = ledger.submit("sleep", {"seconds": 0})
    with pytest.raises(ConfigError, match="needs a running train job"):
        request_sample(ws, job)
    train = ledger.submit("train", {"train": {"backbone": "tiny", "dataset": "mini"}, "run": "r"})
    with pytest.raises(ConfigError, match="is queued"):
        request_sample(ws, train)
    assert not sample_request_path(ws, train.id).exists(), "a refused request leaves nothing"
    import dataclasses

    running = dataclasses.replace(train, state="running")
    path = request_sample(ws, running)
    assert path == sample_request_path(ws, train.id) and path.is_file()
    assert take_sample_request(ws, train.id) is True
    assert take_sample_request(ws, train.id) is False and not path.exists()


def test_jobs_sample_on_the_command_line_refuses_a_job_that_is_not_training(ws, ledger):
    job = ledger.submit("sleep", {"seconds": 0})
    r = subprocess.run([sys.executable, "-m", "medart_core", "jobs", "sample", job.id, "--workspace", str(ws.root)],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "needs a running train job" in (r.stdout + r.stderr), r.stdout + r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture
def procs(ws, tmp_path, monkeypatch):
    from test_jobs import Procs

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pr = Procs(ws, tmp_path)
    yield pr
    pr.cleanup()


@pytest.mark.slow  # ~30 s: a long tiny train job under the real supervisor, sampled, then stopped
def test_a_running_train_job_samples_on_request_and_keeps_training(ws, store, procs):
    from test_jobs import TRAIN, _done, _wait

    from medart_core.jobs import LocalExecutor, sample_request_path

    make_dataset(ws, store)
    jobs = LocalExecutor(ws, start_supervisor=False)
    try:
        job = jobs.submit("train", {"train": dict(TRAIN, max_steps=100000, checkpoint_every=1000), "run": "long"})
        procs.supervisor()
        job = _wait(jobs, job.id, lambda j: j.is_final or (j.step or 0) >= 2, 120, "training", procs)
        assert job.state == "running", jobs.error_report(job)
        jobs.sample_now(job.id)
        # Taken at the next step: the request file goes, the job's progress names the grid, the run goes on
        job = _wait(jobs, job.id, lambda j: j.is_final or (not sample_request_path(ws, j.id).exists()
                                                             and j.progress_info.get("validation_grid")),
                    120, "the sample", procs)
        assert job.state == "running", jobs.error_report(job)
        at = int(job.progress_info["validation_step"])
        job = _wait(jobs, job.id, lambda j: j.is_final or (j.step or 0) >= at + 2, 120, "more steps", procs)
        assert job.state == "running", "it kept training"
        records = [json.loads(x) for x in ws.run_layout("long").metrics.read_text().splitlines() if x.strip()]
        req = [r for r in records if r.get("requested")]
        assert len(req) == 1 and req[0]["step"] == at and (ws.run_layout("long").root / req[0]["validation_grid"]).is_file()
        assert "sample now: the validation prompts at step" in jobs.log_tail(job.id, 100)
        jobs.stop(job.id)
        assert _wait(jobs, job.id, _done, 120, "the stop", procs).state == "stopped"
    finally:
        jobs.close()
