"""Data-parallel training as one multi-task Slurm job (issue 17 §2): an executor with ``tasks_per_node=2`` runs
a ``train`` job as two Slurm tasks joined by submitit's torch distributed environment (gloo on CPU); task 0
alone writes the run and the attempt's files. On the REAL single-node Slurm of the ``slurm_cluster`` fixture
(2 CPUs: one per task), compared with the same two-rank run launched locally by torchrun; plus unit tests of
the follower channel and the start record that need no Slurm.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_ddp import run_two_ranks
from test_jobs import _done, _wait
from test_slurm_jobs import _cluster_executor, jobs, procs  # noqa: F401 - fixtures
from training_data import make_dataset, tiny_train_config

# The two-rank run of tests/test_ddp.py: 7 images, 1 held out, 2 images per step (one per rank), 4 steps.
DP = dict(lora={"rank": 2, "alpha": 2.0}, hldf={"pixel_every": 2, "sample_steps": 2, "checkpointing": False},
          validate_every=4, lr=1e-2)


# =========================================================================================================
# No Slurm
# =========================================================================================================
def test_follower_channel_reads_the_stop_flag_and_writes_nothing(tmp_path):
    from medart_core.jobs.channel import FollowerChannel, request_stop_file

    folder = tmp_path / "attempt-1"
    folder.mkdir()
    ch = FollowerChannel(folder)
    assert ch.beat(0.5, {"step": 1}) == (True, False)
    ch.checkpoint("/x/step_000001", 1)
    assert ch.finish("done", error=None, result={}, progress=1.0, info={}, detail={}) is False
    assert sorted(p.name for p in folder.iterdir()) == []            # no heartbeat, checkpoints or final record
    request_stop_file(folder)
    assert ch.read_flags() == (True, True) and ch.beat(None, None) == (True, True)


def test_tasks_learn_the_start_count_task_0_recorded_for_their_start(tmp_path, monkeypatch):
    from medart_core.jobs import remote
    from medart_core.jobs.channel import count_start, read_start

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    key = remote._start_key()
    assert read_start(tmp_path, key) is None
    assert count_start(tmp_path, key) == 1 and remote._wait_start(tmp_path, key) == 1
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")                   # Slurm requeued the job
    again = remote._start_key()
    assert again != key and read_start(tmp_path, again) is None     # the last start's record is not this one's
    assert count_start(tmp_path, again) == 2 and read_start(tmp_path, again) == 2
    assert remote.slurm_task() == (0, 1) or "SLURM_PROCID" in __import__("os").environ


def test_executors_add_takes_tasks_per_node_and_nodes_and_list_shows_them(ws, capsys):
    from medart_core.cli import main
    from medart_core.executors import get_executor_spec

    assert main(["executors", "add", "dp", "--workspace", str(ws.root), "--tasks-per-node", "4", "--nodes", "2",
                 "--gpus-per-node", "4"]) == 0
    assert "nodes=2 tasks/node=4 (train: 8 ranks)" in capsys.readouterr().out
    s = get_executor_spec(ws, "dp").settings
    assert (s.nodes, s.tasks_per_node) == (2, 4)
    assert main(["executors", "list", "--workspace", str(ws.root)]) == 0
    assert "nodes=2 tasks/node=4" in capsys.readouterr().out


# =========================================================================================================
# On the real local Slurm
# =========================================================================================================
def _task_log(job, task: int) -> str:
    return (Path(job.remote_folder) / f"{job.remote_id}_{task}_log.out").read_text(errors="replace")


def _metrics(ws, run: str) -> list[dict]:
    return [json.loads(line) for line in ws.run_layout(run).metrics.read_text().splitlines()]


@pytest.mark.slow
def test_a_two_task_slurm_train_job_equals_the_same_two_rank_torchrun(ws, store, jobs, procs, slurm_cluster,  # noqa: F811
                                                                       tmp_path, free_port):
    import torch

    from medart_core.checkpoint import read_checkpoint

    make_dataset(ws, store, n=7)
    cfg = tiny_train_config(**DP)
    run_two_ranks(ws, tmp_path, cfg, free_port())                        # run "ddp", launched the existing way
    _cluster_executor(ws, slurm_cluster, "dp", tasks_per_node=2, cpus_per_task=1, mem_gb=2)
    job = jobs.submit("train", {"train": cfg.to_dict(), "run": "sdp"}, executor="dp")
    procs.supervisor()
    job = _wait(jobs, job.id, _done, 240, "done", procs)
    assert (job.state, job.result["step"], job.result["total_steps"]) == ("done", 4, 4), jobs.error_report(job)
    assert job.progress_info.get("world_size") == 2

    # The job's own log (task 0) and the run say two processes; the checkpoint is rank 0's, world size 2.
    log = jobs.log_tail(job.id, 400)
    assert "2 process(es)" in log and "Slurm task 0 of 2: data parallel over 2 processes" in log, log
    assert "task 1 of 2" not in log                                  # task 1 does not write the job's log
    assert "Slurm task 1 of 2: data parallel" in _task_log(job, 1)    # its output stays in Slurm's task log
    a_state, a = read_checkpoint(ws.run_layout("ddp").checkpoint(4))
    b_state, b = read_checkpoint(ws.run_layout("sdp").checkpoint(4))
    assert (b_state["world_size"], b_state["writer_rank"], b_state["images_per_step"]) == (2, 0, 2)
    assert b_state["data_order"] == a_state["data_order"] and b_state["samples_seen"] == a_state["samples_seen"]

    # One writer of the attempt's files: task 0 (the checkpoint's writer) alone counted the start and beat.
    folder = ws.root / "jobs" / job.id / "attempt-1"
    assert json.loads((folder / "starts.json").read_text())["starts"] == 1
    assert json.loads((folder / "heartbeat.json").read_text())["pid"] == b_state["writer_pid"]
    assert [c["step"] for c in json.loads((folder / "checkpoints.json").read_text())] == [2, 4]

    # Same arithmetic as torchrun: bitwise equal adapters, both ranks' RNG streams, the same losses per step.
    assert sorted(a["adapters"]) == sorted(b["adapters"]) and a["adapters"]
    for k in a["adapters"]:
        assert torch.equal(a["adapters"][k], b["adapters"][k]), f"Slurm and torchrun disagree on {k}"
    assert b["rng"]["torch_cpu"].shape[0] == 2
    ma, mb = _metrics(ws, "ddp"), _metrics(ws, "sdp")
    steps = [m["step"] for m in mb if "loss_latent" in m]
    assert steps == [1, 2, 3, 4]                                     # one writer, no duplicates
    assert [m["loss"] for m in ma if "loss_latent" in m] == [m["loss"] for m in mb if "loss_latent" in m]


@pytest.mark.slow
def test_a_stop_reaches_every_task_which_stop_at_the_same_step_and_rank_0_checkpoints(ws, store, jobs, procs,  # noqa: F811
                                                                                        slurm_cluster):
    from medart_core.checkpoint import read_checkpoint

    make_dataset(ws, store, n=7)
    cfg = tiny_train_config(**dict(DP, max_steps=400, checkpoint_every=100, validate_every=1000))
    _cluster_executor(ws, slurm_cluster, "dp", tasks_per_node=2, cpus_per_task=1, mem_gb=2)
    job = jobs.submit("train", {"train": cfg.to_dict(), "run": "sdp"}, executor="dp")
    procs.supervisor()
    job = _wait(jobs, job.id, lambda j: j.state == "running" and (j.step or 0) >= 2, 240, "running", procs)
    jobs.stop(job.id)
    job = _wait(jobs, job.id, _done, 120, "stopped", procs)
    assert job.state == "stopped", jobs.error_report(job)
    k = int(job.result["step"])
    assert 2 <= k < 400 and Path(job.last_checkpoint).name == f"step_{k:06d}"
    state, tensors = read_checkpoint(Path(job.last_checkpoint))
    assert (state["step"], state["world_size"], state["writer_rank"]) == (k, 2, 0)
    assert tensors["rng"]["torch_cpu"].shape[0] == 2                 # a collective: both ranks took part
    # Both tasks ended on their own at the stop (no scancel after the grace period): the Slurm job completed.
    assert slurm_cluster.wait_state(job.remote_id, {"COMPLETED", "FAILED", "CANCELLED"}, 60) == "COMPLETED"
    assert "attempt 1: stopped" in _task_log(job, 1)
    assert [m["step"] for m in _metrics(ws, "sdp") if "loss_latent" in m] == list(range(1, k + 1))
