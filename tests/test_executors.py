"""Named executors (medart_core.executors): the workspace table, its validation and locking, the CLI handlers.

Fast tests on tmp_path workspaces; one slow test runs ``check`` against the real single-node Slurm of the
``slurm_cluster`` fixture.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import stat

import pytest

from medart_core.errors import ConfigError, NotFoundError
from medart_core.executors import (LOCAL, ExecutorSpec, add_executor, add_executors_arguments, check_executor,
                                   cmd_executors, executors_path, get_executor_spec, list_executors,
                                   remove_executor)
from medart_core.slurm import SlurmSettings
from medart_core.workspace import Workspace


def _names(ws) -> list[str]:
    return [s.name for s in list_executors(ws)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medart")
    add_executors_arguments(parser.add_subparsers(dest="command", required=True))
    return parser


def _run_cli(ws, *argv: str, in_use=None) -> int:
    args = _parser().parse_args(["executors", *argv, "--workspace", str(ws.root)])
    return cmd_executors(args, in_use=in_use)


# ---------------------------------------------------------------- the table

def test_a_new_workspace_has_only_local(ws):
    specs = list_executors(ws)
    assert specs == [ExecutorSpec(name="local", kind="local")]
    assert get_executor_spec(ws, "local").settings is None
    assert check_executor(ws, "local") == []
    assert not executors_path(ws).exists()


def test_add_list_get_remove(ws):
    gpu = SlurmSettings(partition="gpu", gpus_per_node=2, time="04:00:00", setup=["module load cuda"])
    spec = add_executor(ws, "gpu", settings=gpu, by="alice")
    add_executor(ws, "cpu", settings={"partition": "cpu", "cpus_per_task": 4})
    assert _names(ws) == ["local", "cpu", "gpu"]  # local first, then by name
    got = get_executor_spec(ws, "gpu")
    assert got == spec and got.settings == gpu and got.kind == "slurm" and got.created_by == "alice"
    assert got.created_at.endswith("Z")
    assert get_executor_spec(ws, "cpu").settings.cpus_per_task == 4

    remove_executor(ws, "gpu")
    assert _names(ws) == ["local", "cpu"]
    with pytest.raises(NotFoundError, match="No executor named 'gpu'.*known: local, cpu"):
        get_executor_spec(ws, "gpu")
    with pytest.raises(NotFoundError, match="nothing was removed"):
        remove_executor(ws, "gpu")


def test_the_file_is_private_and_survives_reopening(ws):
    add_executor(ws, "gpu", settings=SlurmSettings(partition="gpu"))
    path = executors_path(ws)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["version"] == 1 and list(data["executors"]) == ["gpu"]
    assert "local" not in data["executors"]
    assert get_executor_spec(Workspace.open(ws.root), "gpu").settings.partition == "gpu"


def test_an_existing_name_needs_replace(ws):
    add_executor(ws, "gpu", settings=SlurmSettings(partition="gpu", time="01:00:00"))
    with pytest.raises(ConfigError, match="exists already: pass --replace"):
        add_executor(ws, "gpu", settings=SlurmSettings(partition="other"))
    assert get_executor_spec(ws, "gpu").settings.partition == "gpu"
    add_executor(ws, "gpu", settings=SlurmSettings(partition="other", time="08:00:00"), replace=True)
    assert get_executor_spec(ws, "gpu").settings.time == "08:00:00"
    assert _names(ws) == ["local", "gpu"]


@pytest.mark.parametrize("name", ["local", "LOCAL", "Local"])
def test_local_cannot_be_redefined(ws, name):
    with pytest.raises(ConfigError, match="built in.*cannot be redefined"):
        add_executor(ws, name, settings=SlurmSettings(), replace=True)
    assert _names(ws) == ["local"]


def test_local_cannot_be_removed(ws):
    with pytest.raises(ConfigError, match="built in.*cannot be removed"):
        remove_executor(ws, "local")


def test_remove_refuses_an_executor_a_job_uses(ws):
    add_executor(ws, "gpu", settings=SlurmSettings(partition="gpu"))
    add_executor(ws, "cpu", settings=SlurmSettings(partition="cpu"))
    asked: list[str] = []

    def in_use(name: str) -> bool:
        asked.append(name)
        return name == "gpu"

    with pytest.raises(ConfigError, match="'gpu' is used by a queued or running job"):
        remove_executor(ws, "gpu", in_use=in_use)
    remove_executor(ws, "cpu", in_use=in_use)
    assert asked == ["gpu", "cpu"] and _names(ws) == ["local", "gpu"]


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("name", ["", "has space", "../up", "-dash", "x" * 65, "a/b"])
def test_bad_executor_names_are_refused(ws, name):
    with pytest.raises(ConfigError, match="Invalid executor name"):
        add_executor(ws, name, settings=SlurmSettings())


def test_bad_settings_are_refused_with_a_message(ws):
    with pytest.raises(ConfigError, match=r"Slurm time '4h' must be a positive HH:MM:SS"):
        add_executor(ws, "gpu", settings={"time": "4h"})
    with pytest.raises(ConfigError, match=r"Slurm partition 'gpu; rm -rf' may only contain letters"):
        add_executor(ws, "gpu", settings={"partition": "gpu; rm -rf"})
    with pytest.raises(ConfigError, match="Unknown executor kind 'kubernetes'"):
        add_executor(ws, "gpu", kind="kubernetes")
    assert _names(ws) == ["local"] and not executors_path(ws).exists()


def _write_raw(ws, text: str) -> None:
    executors_path(ws).write_text(text)


def test_a_file_that_is_not_json_gives_a_clear_message(ws):
    _write_raw(ws, '{"version": 1, "executors": {"gpu": {"kind": "slurm",,}}}')
    with pytest.raises(ConfigError) as info:
        list_executors(ws)
    message = str(info.value)
    assert str(executors_path(ws)) in message and "not valid JSON" in message and "line 1" in message


@pytest.mark.parametrize("entry, words", [
    ({"kind": "slurm", "settings": {"time": "soon"}}, "invalid Slurm settings (Slurm time 'soon'"),
    ({"kind": "slurm", "settings": {"partition": "a b"}}, "invalid Slurm settings (Slurm partition 'a b'"),
    ({"kind": "slurm", "settings": {"gpus": 2}}, "Unknown Slurm setting(s) gpus"),
    ({"kind": "docker", "settings": {}}, "has kind 'docker'"),
    ({"kind": "slurm"}, "must have a \"settings\" object"),
    ({"kind": "slurm", "settings": {}, "colour": "red"}, "unknown key(s) colour"),
    ("slurm", "must be a JSON object"),
])
def test_a_broken_entry_names_the_file_and_the_entry(ws, entry, words):
    add_executor(ws, "fine", settings=SlurmSettings())
    data = json.loads(executors_path(ws).read_text())
    data["executors"]["broken"] = entry
    _write_raw(ws, json.dumps(data))
    for read in (lambda: list_executors(ws), lambda: get_executor_spec(ws, "fine"),
                 lambda: add_executor(ws, "other", settings=SlurmSettings())):
        with pytest.raises(ConfigError) as info:
            read()
        message = str(info.value)
        assert f"The executors file {executors_path(ws)}: entry 'broken'" in message
        assert words in message and "executors remove broken" in message
    # The way out the message gives works, and keeps the good entry.
    remove_executor(ws, "broken")
    assert _names(ws) == ["local", "fine"]


@pytest.mark.parametrize("text, words", [
    ("[]", "must hold a JSON object"),
    ('{"version": 1}', "must hold a JSON object"),
    ('{"version": 9, "executors": {}}', "format version 9"),
    ('{"version": 1, "executors": {"local": {"kind": "slurm", "settings": {}}}}', "redefines the built-in"),
    ('{"version": 1, "executors": {"bad name": {"kind": "slurm", "settings": {}}}}', "invalid name"),
])
def test_a_broken_file_shape_gives_a_clear_message(ws, text, words):
    _write_raw(ws, text)
    with pytest.raises(ConfigError, match="The executors file") as info:
        list_executors(ws)
    assert words in str(info.value) and str(executors_path(ws)) in str(info.value)


# ---------------------------------------------------------------- two processes at once

def _add_many(root: str, prefix: str, count: int, barrier) -> None:
    ws = Workspace.open(root)
    barrier.wait()  # both processes start their read-modify-writes together
    for i in range(count):
        add_executor(ws, f"{prefix}{i}", settings=SlurmSettings(partition=prefix))


def test_concurrent_adds_from_two_processes_keep_every_entry(ws):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    count = 15
    procs = [ctx.Process(target=_add_many, args=(str(ws.root), prefix, count, barrier)) for prefix in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    names = set(_names(ws))
    assert names == {"local", *(f"a{i}" for i in range(count)), *(f"b{i}" for i in range(count))}


# ---------------------------------------------------------------- CLI handlers

def test_cli_add_list_json_remove(ws, capsys):
    assert _run_cli(ws, "add", "gpu", "--kind", "slurm", "--partition", "gpu", "--gpus-per-node", "2",
                    "--cpus-per-task", "8", "--mem-gb", "64", "--time", "48:00:00", "--account", "lab",
                    "--qos", "normal", "--setup", "module load cuda", "--setup", "source venv/bin/activate",
                    "--nodes", "2", "--tasks-per-node", "4") == 0
    assert "added executor gpu" in capsys.readouterr().out
    assert _run_cli(ws, "add", "cpu") == 0  # no flags: the cluster's defaults
    capsys.readouterr()

    assert _run_cli(ws, "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed] == ["local", "cpu", "gpu"]
    assert all(set(e) == {"name", "kind", "settings", "created_by", "created_at"} for e in listed)
    assert listed[0] == {"name": "local", "kind": "local", "settings": None, "created_by": None, "created_at": ""}
    assert listed[1]["settings"] == SlurmSettings().to_dict()
    assert listed[2]["created_by"] == "cli"
    assert listed[2]["settings"] == SlurmSettings(
        partition="gpu", gpus_per_node=2, cpus_per_task=8, mem_gb=64.0, time="48:00:00", account="lab",
        qos="normal", setup=["module load cuda", "source venv/bin/activate"], nodes=2, tasks_per_node=4).to_dict()

    assert _run_cli(ws, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["local", "cpu", "gpu"] and "partition=gpu" in lines[2]

    with pytest.raises(ConfigError, match="used by a queued or running job"):
        _run_cli(ws, "remove", "gpu", in_use=lambda name: True)
    assert _run_cli(ws, "remove", "gpu") == 0
    assert "removed executor gpu" in capsys.readouterr().out
    assert _names(ws) == ["local", "cpu"]


def test_cli_replace_and_validation(ws, capsys):
    assert _run_cli(ws, "add", "gpu", "--partition", "gpu") == 0
    with pytest.raises(ConfigError, match="exists already"):
        _run_cli(ws, "add", "gpu", "--partition", "other")
    assert _run_cli(ws, "add", "gpu", "--partition", "other", "--replace") == 0
    assert get_executor_spec(ws, "gpu").settings.partition == "other"
    with pytest.raises(ConfigError, match="Slurm time '90' must be a positive HH:MM:SS"):
        _run_cli(ws, "add", "slow", "--time", "90")
    with pytest.raises(ConfigError, match="Slurm partition 'a\\$b' may only contain"):
        _run_cli(ws, "add", "odd", "--partition", "a$b")
    with pytest.raises(SystemExit):  # argparse: local is not a kind one adds
        _parser().parse_args(["executors", "add", "x", "--kind", "local"])
    assert _names(ws) == ["local", "gpu"]


def test_the_executors_parser_can_be_given_directly(ws, capsys):
    parser = argparse.ArgumentParser(prog="executors")
    add_executors_arguments(parser)
    args = parser.parse_args(["list", "--json", "-w", str(ws.root)])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == LOCAL


def test_cli_check_local_is_ready(ws, capsys):
    assert _run_cli(ws, "check", "local") == 0
    assert "executor local is ready" in capsys.readouterr().out


# ---------------------------------------------------------------- check without a reachable Slurm

def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.rstrip().endswith((".", ")", "?"))


def test_check_without_slurm_commands_gives_a_sentence(ws, tmp_path, monkeypatch, capsys):
    add_executor(ws, "gpu", settings=SlurmSettings(partition="gpu"))
    empty = tmp_path / "no-slurm-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no sinfo or sbatch on this machine
    problems = check_executor(ws, "gpu")
    assert len(problems) == 1 and "sinfo is not installed" in problems[0] and _one_sentence(problems[0])
    assert _run_cli(ws, "check", "gpu") == 1
    assert capsys.readouterr().out.strip() == problems[0]


def test_check_when_the_controller_does_not_answer_gives_a_sentence(ws, tmp_path, monkeypatch, free_port):
    import shutil

    if shutil.which("sinfo") is None:
        pytest.skip("sinfo is not installed (tests/ensure_slurm.sh installs Slurm)")
    add_executor(ws, "gpu", settings=SlurmSettings(partition="gpu"))
    # A login node whose slurmctld is away: the configured controller port has nobody listening.
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"ClusterName=away\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort={free_port()}\n"
                    "MessageTimeout=2\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    problems = check_executor(ws, "gpu")
    assert len(problems) == 1 and _one_sentence(problems[0])
    assert "did not answer sinfo" in problems[0] and "Unable to contact slurm controller" in problems[0]


@pytest.mark.slow
def test_check_on_a_partition_that_does_not_exist(slurm_cluster, ws):
    add_executor(ws, "nowhere", settings=SlurmSettings(partition=slurm_cluster.missing_partition, time="00:05:00"))
    problems = check_executor(ws, "nowhere")
    assert len(problems) == 1 and _one_sentence(problems[0])
    assert f"Partition {slurm_cluster.missing_partition!r} does not exist" in problems[0]
    assert slurm_cluster.partition in problems[0]  # it names the partitions that do exist
