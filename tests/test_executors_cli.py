"""The executors on the command line (issue 17 §1): ``executors add|list|remove|check`` registered in the one
CLI table, ``remove`` refused while a job uses the executor, and ``--executor NAME`` on ``jobs submit``,
``jobs resume``, ``ablation`` and ``evaluate``. No Slurm is needed: nothing here starts a worker, so a job
queued on a named executor stays queued (the Slurm runs are tests/test_slurm*.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from medart_core.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medart_core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_executors_add_list_check_remove_through_python_m(tmp_path):
    w = str(tmp_path / "ws")
    out = run("executors", "add", "gpu", "--partition", "debug", "--gpus-per-node", "1", "--time", "02:00:00",
              "--setup", "module load cuda", "--setup", "source venv/bin/activate", "-w", w)
    assert out.returncode == 0, out.stderr
    assert "added executor gpu" in out.stdout and "executors check gpu" in out.stdout

    out = run("executors", "list", "--json", "-w", w)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert [e["name"] for e in listed] == ["local", "gpu"]
    assert listed[0] == {"name": "local", "kind": "local", "settings": None, "created_by": None, "created_at": ""}
    s = listed[1]["settings"]
    assert (s["partition"], s["gpus_per_node"], s["time"]) == ("debug", 1, "02:00:00")
    assert s["setup"] == ["module load cuda", "source venv/bin/activate"]

    text = run("executors", "list", "-w", w).stdout.splitlines()
    assert text[0].split()[:2] == ["local", "local"] and "partition=debug" in text[1]

    out = run("executors", "check", "local", "-w", w)
    assert out.returncode == 0 and "executor local is ready" in out.stdout, out.stdout + out.stderr
    out = run("executors", "check", "nope", "-w", w)
    assert out.returncode == 2 and "No executor named 'nope'" in out.stderr and "Traceback" not in out.stderr

    out = run("executors", "add", "gpu", "-w", w)
    assert out.returncode == 2 and "exists already" in out.stderr
    out = run("executors", "remove", "local", "-w", w)
    assert out.returncode == 2 and "built in" in out.stderr

    out = run("executors", "remove", "gpu", "-w", w)
    assert out.returncode == 0 and "removed executor gpu" in out.stdout, out.stderr
    assert [e["name"] for e in json.loads(run("executors", "list", "--json", "-w", w).stdout)] == ["local"]


def test_jobs_submit_show_resume_take_the_executor_and_remove_waits_for_the_job(ws, capsys):
    from medart_core.executors import add_executor

    w = str(ws.root)
    add_executor(ws, "gpu", settings={"partition": "debug"})
    capsys.readouterr()

    # Queued on gpu (no worker runs, so it stays queued): the row says where it runs.
    assert main(["jobs", "submit", "sleep", "--seconds", "0.1", "--steps", "2", "--no-worker", "--json",
                 "--executor", "gpu", "-w", w]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["executor"] == "gpu" and job["remote_id"] is None and job["state"] == "queued"

    assert main(["jobs", "show", job["id"], "--json", "-w", w]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {"id", "kind", "state", "progress", "pid", "run", "error", "executor", "remote_id"} <= set(shown)
    assert (shown["executor"], shown["remote_id"]) == ("gpu", None)
    assert main(["jobs", "show", job["id"], "-w", w]) == 0
    assert "  executor: gpu" in capsys.readouterr().out

    # The executor cannot go while a queued job uses it ...
    assert main(["executors", "remove", "gpu", "-w", w]) == 2
    err = capsys.readouterr().err
    assert "used by a queued or running job" in err and "Traceback" not in err

    # ... a job elsewhere does not hold it, and once its own job is stopped it can go.
    assert main(["jobs", "submit", "sleep", "--no-worker", "--json", "-w", w]) == 0
    assert json.loads(capsys.readouterr().out)["executor"] == "local"
    assert main(["jobs", "stop", job["id"], "--no-worker", "--json", "-w", w]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "stopped"

    # Resume moves the new attempt to the executor asked for; an unknown name is a user error.
    assert main(["jobs", "resume", job["id"], "--executor", "nope", "--no-worker", "-w", w]) == 2
    assert "No executor named 'nope'" in capsys.readouterr().err
    assert main(["jobs", "resume", job["id"], "--executor", "local", "--no-worker", "--json", "-w", w]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert (resumed["id"], resumed["executor"], resumed["attempt"]) == (job["id"], "local", 2)

    assert main(["executors", "remove", "gpu", "-w", w]) == 0
    assert "removed executor gpu" in capsys.readouterr().out


def test_an_unknown_executor_is_a_user_error_for_every_command_that_submits(ws, capsys):
    w = str(ws.root)
    assert main(["jobs", "submit", "sleep", "--no-worker", "--executor", "nope", "-w", w]) == 2
    assert "No executor named 'nope' (known: local)" in capsys.readouterr().err
    assert main(["ablation", "--preset", "smoke", "--executor", "nope", "-w", w]) == 2
    assert "No executor named 'nope'" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", "d", "--checkpoints", "base", "--executor", "nope", "-w", w]) == 2
    assert "No executor named 'nope'" in capsys.readouterr().err
    # Nothing was queued by the refusals.
    assert main(["jobs", "list", "--json", "-w", w]) == 0
    assert capsys.readouterr().out.strip() == ""


def test_help_of_the_executor_options_answers():
    out = run("executors", "add", "--help")
    assert out.returncode == 0 and "--partition" in out.stdout and "--setup" in out.stdout, out.stderr
    for argv, flag in ((("jobs", "submit", "sleep", "--help"), "--executor"), (("jobs", "resume", "--help"),
                       "--executor"), (("ablation", "--help"), "--executor"), (("evaluate", "--help"), "--executor")):
        out = run(*argv)
        assert out.returncode == 0 and flag in out.stdout, (argv, out.stderr)
