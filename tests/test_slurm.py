"""medart_core.slurm against a real single-node Slurm (the ``slurm_cluster`` fixture), plus pure unit tests.

The job functions below are pickled by value (cloudpickle) because the compute node's Python cannot
import this test module (tests/ is not on its path), just as a user's cluster would not have it.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from medart_core import slurm
from medart_core.errors import ConfigError
from medart_core.slurm import SlurmError, SlurmSettings, map_state

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _double_under_slurm(x: int) -> dict:
    return {"double": 2 * x, "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def _wait_for_file(path: str, deadline_s: float = 120.0) -> str:
    """Runs on the node: holds the job RUNNING until the test creates ``path`` (an event, not a sleep)."""
    end = time.monotonic() + deadline_s
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.1)
    return "released"


def _settings(cluster, **kw) -> SlurmSettings:
    return SlurmSettings(partition=kw.pop("partition", cluster.partition), time="00:05:00", **kw)


def _poll_until(job_id: str, done, deadline_s: float = 60.0) -> slurm.SlurmStatus:
    """Poll through the library until ``done(status)``; fail with the last status after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        status = slurm.poll([job_id])[job_id]
        if done(status):
            return status
        assert time.monotonic() < end, f"job {job_id} still {status} after {deadline_s} s"
        time.sleep(0.2)


def _one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message.rstrip(".")


# ---------------------------------------------------------------- settings (no cluster)

def test_settings_round_trip_through_json():
    s = SlurmSettings(partition="gpu-a100", gpus_per_node=2, cpus_per_task=8, mem_gb=64, time="48:00:00",
                      account="rad_lab", qos="normal", setup=["module load cuda/12.4", "source ~/venv/bin/activate"],
                      nodes=2, tasks_per_node=2)
    assert SlurmSettings.from_json(s.to_json()) == s
    assert SlurmSettings.from_dict(s.to_dict()) == s
    assert s.timeout_min == 48 * 60
    assert SlurmSettings(time="00:00:30").timeout_min == 1  # rounded up, never less than asked


@pytest.mark.parametrize("kw, words", [
    ({"time": "1h"}, "HH:MM:SS"),
    ({"time": "00:61:00"}, "HH:MM:SS"),
    ({"time": "00:00:00"}, "positive"),
    ({"cpus_per_task": 0}, "at least 1"),
    ({"gpus_per_node": -1}, "at least 0"),
    ({"nodes": 1.5}, "whole number"),
    ({"mem_gb": -2}, "mem_gb"),
    ({"partition": "gpu;rm -rf ~"}, "partition"),
    ({"account": "lab $(id)"}, "account"),
    ({"qos": "a|b"}, "qos"),
    ({"setup": "source venv/bin/activate"}, "list"),
    ({"setup": ["module load a\nmodule load b"]}, "one non-empty line"),
])
def test_settings_reject_bad_values_with_a_clear_message(kw, words):
    with pytest.raises(ConfigError, match=words):
        SlurmSettings(**kw)


def test_settings_from_dict_names_unknown_keys():
    with pytest.raises(ConfigError, match="gpus"):
        SlurmSettings.from_dict({"partition": "a", "gpus": 1})


# ---------------------------------------------------------------- map_state (pure)

@pytest.mark.parametrize("reason", ["Priority", "Resources", "PartitionDown", "BeginTime", "None"])
def test_pending_is_queued_with_the_reason(reason):
    state, message = map_state("PENDING", reason, False)
    assert state == "queued"
    assert reason in message and _one_sentence(message)


@pytest.mark.parametrize("slurm_state", ["RUNNING", "COMPLETING", "CONFIGURING"])
def test_running_states(slurm_state):
    assert map_state(slurm_state, "None", False)[0] == "running"


@pytest.mark.parametrize("slurm_state", ["CANCELLED", "CANCELLED by 0", "CANCELLED+", "TIMEOUT", "PREEMPTED",
                                         "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "", "COMPLETED", "SOMETHING_NEW"])
def test_lost_jobs_are_interrupted_never_running(slurm_state):
    state, message = map_state(slurm_state, "None", False)
    assert state == "interrupted"
    assert "resume" in message and _one_sentence(message)


def test_out_of_memory_fails_with_its_cause():
    state, message = map_state("OUT_OF_MEMORY", "OutOfMemory", False, "0:125")
    assert state == "failed"
    assert "out of memory" in message and "mem_gb" in message and _one_sentence(message)


def test_failed_without_final_record_gives_the_exit_code():
    state, message = map_state("FAILED", "NonZeroExitCode", False, "127:0")
    assert state == "failed" and "127:0" in message and _one_sentence(message)


@pytest.mark.parametrize("slurm_state", ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "RUNNING", "COMPLETING",
                                         "OUT_OF_MEMORY", ""])
def test_the_jobs_own_final_record_stands(slurm_state):
    assert map_state(slurm_state, "None", True)[0] is None


# ---------------------------------------------------------------- a real Slurm

def test_submit_runs_on_slurm_and_the_result_comes_back(slurm_cluster, tmp_path):
    go = tmp_path / "go"
    job_id, folder = slurm.submit(_settings(slurm_cluster), tmp_path / "jobs", _wait_for_file, str(go))
    status = _poll_until(job_id, lambda s: s.state == "RUNNING")
    assert slurm_cluster.squeue(job_id)[0] == "RUNNING"
    assert map_state(status.state, status.reason, False) == ("running", "Running on Slurm.")
    go.touch()
    status = _poll_until(job_id, lambda s: s.state not in slurm.ACTIVE_STATES)
    assert status.state == "COMPLETED" and status.exit_code == "0:0"
    assert slurm.has_result(folder, job_id) and slurm.result(folder, job_id) == "released"

    job_id, folder = slurm.submit(_settings(slurm_cluster), tmp_path / "jobs", _double_under_slurm, 21)
    _poll_until(job_id, lambda s: slurm.has_result(folder, job_id))
    assert slurm.result(folder, job_id) == {"double": 42, "slurm_job_id": job_id}


def test_array_jobs_each_give_their_result(slurm_cluster, tmp_path):
    ids, folder = slurm.submit_array(_settings(slurm_cluster), tmp_path / "jobs", _double_under_slurm, [1, 2, 3])
    assert len(ids) == 3 and all(i.startswith(ids[0].split("_")[0] + "_") for i in ids)
    for i in ids:
        _poll_until(i, lambda s, i=i: slurm.has_result(folder, i))
    assert [slurm.result(folder, i)["double"] for i in ids] == [2, 4, 6]
    assert set(slurm.poll(ids)) == set(ids)


def test_pending_jobs_show_slurms_reason(slurm_cluster, tmp_path):
    down, _ = slurm.submit(_settings(slurm_cluster, partition=slurm_cluster.down_partition), tmp_path / "jobs",
                           _double_under_slurm, 1)
    too_big, _ = slurm.submit(_settings(slurm_cluster, cpus_per_task=slurm_cluster.cpus + 1), tmp_path / "jobs",
                              _double_under_slurm, 1)
    later = slurm_cluster.sbatch("--begin=now+1hour", "-o", "/dev/null", "--wrap", "true")
    try:
        expected = {down: "PartitionDown", too_big: "PartitionConfig", later: "BeginTime"}
        # The controller sets the reason on its first scheduling pass after submission.
        end = time.monotonic() + 30
        while True:
            statuses = slurm.poll(list(expected))
            if all(statuses[j].reason == r for j, r in expected.items()) or time.monotonic() > end:
                break
            time.sleep(0.2)
        for job_id, reason in expected.items():
            s = statuses[job_id]
            assert (s.state, s.reason) == ("PENDING", reason)
            state, message = map_state(s.state, s.reason, False)
            assert state == "queued" and f"Slurm reason: {reason}" in message
    finally:
        for job_id in (down, too_big, later):
            slurm.cancel(job_id)


def test_a_job_slurm_forgot_is_gone_and_interrupted(slurm_cluster, tmp_path):
    job_id, folder = slurm.submit(_settings(slurm_cluster), tmp_path / "jobs", _double_under_slurm, 1)
    forgotten = str(int(job_id) + 100000)  # an id this cluster never gave out, polled with a real one
    statuses = slurm.poll([job_id, forgotten])
    assert statuses[forgotten] == slurm.SlurmStatus(forgotten, "")
    assert statuses[job_id].state != ""
    assert slurm.poll([forgotten]) == {forgotten: slurm.SlurmStatus(forgotten, "")}  # squeue errs on a lone bad id
    assert map_state("", "", False)[0] == "interrupted"
    _poll_until(job_id, lambda s: slurm.has_result(folder, job_id))


def test_scancel_by_someone_else_reads_as_interrupted(slurm_cluster, tmp_path):
    job_id, folder = slurm.submit(_settings(slurm_cluster), tmp_path / "jobs", _wait_for_file,
                                  str(tmp_path / "never"))
    _poll_until(job_id, lambda s: s.state == "RUNNING")
    slurm.cancel(job_id)
    status = _poll_until(job_id, lambda s: s.state not in slurm.ACTIVE_STATES)
    assert status.state == "CANCELLED"
    assert slurm_cluster.squeue(job_id) is None  # only scontrol still knows it: poll's fallback worked
    state, message = map_state(status.state, status.reason, slurm.has_result(folder, job_id), status.exit_code)
    assert state == "interrupted" and "cancelled" in message
    slurm.cancel(job_id)  # cancelling an ended job is not an error


def test_a_failing_setup_command_shows_slurms_stderr(slurm_cluster, tmp_path):
    settings = _settings(slurm_cluster, setup=["echo preparing", "medart_missing_tool --version", "echo not reached"])
    job_id, folder = slurm.submit(settings, tmp_path / "jobs", _double_under_slurm, 1)
    status = _poll_until(job_id, lambda s: s.state not in slurm.ACTIVE_STATES)
    assert status.state == "FAILED" and status.exit_code == "127:0"
    assert not slurm.has_result(folder, job_id)  # our function never started
    assert "medart_missing_tool: command not found" in slurm.stderr_tail(folder, job_id, 5)
    assert slurm.stdout_tail(folder, job_id).splitlines() == ["preparing"]
    state, message = map_state(status.state, status.reason, False, status.exit_code)
    assert state == "failed" and "127:0" in message


def test_sbatch_refusal_is_a_slurm_error(slurm_cluster, tmp_path):
    with pytest.raises(SlurmError, match="invalid partition"):
        slurm.submit(_settings(slurm_cluster, partition=slurm_cluster.missing_partition), tmp_path / "jobs",
                     _double_under_slurm, 1)


def test_poll_raises_when_the_controller_does_not_answer(slurm_cluster, tmp_path, monkeypatch):
    # A copy of slurm.conf pointing at a port nobody listens on: "no answer" must not read as "job gone".
    conf = tmp_path / "slurm.conf"
    text = slurm_cluster.conf.read_text()
    port = next(ln for ln in text.splitlines() if ln.startswith("SlurmctldPort="))
    conf.write_text(text.replace(port, "SlurmctldPort=1") + "MessageTimeout=2\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    with pytest.raises(SlurmError):
        slurm.poll(["1"])


# ---------------------------------------------------------------- check

@pytest.mark.slow  # the probe imports torch on the node: ~12 s on two busy cores
def test_check_passes_on_a_healthy_cluster(slurm_cluster, tmp_path):
    workspace = tmp_path / "workspace"
    assert slurm.check(_settings(slurm_cluster), workspace) == []
    assert list((workspace / ".slurm-probe").iterdir()) == []  # tokens and the probe's job files cleaned up


def test_check_names_a_partition_that_does_not_exist(slurm_cluster, tmp_path):
    problems = slurm.check(_settings(slurm_cluster, partition=slurm_cluster.missing_partition), tmp_path / "ws")
    assert problems == [f"Partition {slurm_cluster.missing_partition!r} does not exist on this cluster "
                        f"(sinfo lists: {slurm_cluster.partition}, {slurm_cluster.down_partition})."]


def test_check_reports_a_probe_that_stays_pending(slurm_cluster, tmp_path):
    problems = slurm.check(_settings(slurm_cluster, partition=slurm_cluster.down_partition), tmp_path / "ws",
                           pending_deadline_s=2)
    assert len(problems) == 1 and "stayed pending" in problems[0] and "PartitionDown" in problems[0]
    assert slurm_cluster.run("squeue", "-h", "-p", slurm_cluster.down_partition).stdout.strip() == ""


def test_check_reports_missing_gpus(slurm_cluster, tmp_path):
    problems = slurm.check(_settings(slurm_cluster, gpus_per_node=1), tmp_path / "ws")
    assert len(problems) == 1 and "no GPUs for gpus_per_node=1" in problems[0]


def _hidden_dir(cluster) -> Path:
    if cluster.node_hidden_dir is None:
        pytest.skip("no private mount namespace here (needs CAP_SYS_ADMIN): cannot hide a folder from the node")
    return cluster.node_hidden_dir


@pytest.mark.slow  # the probe imports torch on the node: ~12 s on two busy cores
def test_check_reports_a_workspace_the_node_cannot_see(slurm_cluster, tmp_path):
    # slurmd (and so every job) runs with an empty tmpfs over node_hidden_dir: the studio sees the
    # workspace, the node does not, as with a workspace on a local disk of the login node.
    workspace = _hidden_dir(slurm_cluster) / "ws-visible-here-only"
    workspace.mkdir()
    problems = slurm.check(_settings(slurm_cluster), workspace, folder=tmp_path / "probe-jobs")
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"The compute node {slurm_cluster.node} cannot see the workspace {workspace} ")
    assert "No such file or directory" in problems[0]


def test_check_reports_a_job_folder_the_node_cannot_see(slurm_cluster):
    # The probe's own folder inside the hidden workspace: Slurm cannot even open the job's log files.
    workspace = _hidden_dir(slurm_cluster) / "ws-and-logs-visible-here-only"
    workspace.mkdir()
    problems = slurm.check(_settings(slurm_cluster), workspace)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"The compute node cannot see the folder {workspace / '.slurm-probe'}: ")
