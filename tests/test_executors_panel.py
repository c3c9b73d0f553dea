"""Executors in the studio (issue 17 §1): the "Run on" choice of the job forms and the admin-only Executors
section of the Users tab. The handlers are called directly with a ctx (roles checked in them, on the
server), and the built app is read for what reaches ``/config`` (no workspace executor at build time)."""
from __future__ import annotations

import json

import gradio as gr
import pytest

from medart_core.accounts import UserStore
from medart_core.errors import ConfigError, NotFoundError
from medart_core.executors import add_executor, get_executor_spec

PASSWORD = "correct-horse-battery"


@pytest.fixture
def ctx(ws, store):
    from studio.auth import Access
    from studio.context import StudioContext

    users = UserStore.for_workspace(ws)
    for name, role in (("ada", "admin"), ("tom", "trainer"), ("ann", "annotator")):
        users.add(name, role, PASSWORD, by="test")
    return StudioContext(ws=ws, store=store, access=Access("password", users))


def _as(user: str | None) -> gr.Request:
    return gr.Request(username=user)


def test_admin_adds_checks_and_removes_a_trainer_is_refused(ctx):
    from studio.executors_panel import (add_slurm_executor, check_named_executor, executor_rows,
                                        remove_named_executor)

    spec = add_slurm_executor(ctx, _as("ada"), " gpu ", "debug", 1, 4, 16, "02:00:00",
                              "module load cuda\n\n  source venv/bin/activate  \n")
    assert (spec.name, spec.created_by) == ("gpu", "ada")
    s = get_executor_spec(ctx.ws, "gpu").settings
    assert (s.partition, s.gpus_per_node, s.cpus_per_task, s.mem_gb, s.time) == ("debug", 1, 4, 16.0, "02:00:00")
    assert s.setup == ["module load cuda", "source venv/bin/activate"]
    rows = executor_rows(ctx)
    assert [r[0] for r in rows] == ["local", "gpu"]
    assert rows[1][1:8] == ["slurm", "debug", "1", "4", "16", "02:00:00",
                            "module load cuda && source venv/bin/activate"] and rows[1][8] == "ada"
    assert rows[1][10:] == ["1 x 1", "(default)", "(default)"]
    # Data-parallel size, account and QoS, as `executors add` has them
    add_slurm_executor(ctx, _as("ada"), "gpu4", "debug", 4, 8, 0, "", "", False, 2, 4, "lab-a", "normal")
    s4 = get_executor_spec(ctx.ws, "gpu4").settings
    assert (s4.nodes, s4.tasks_per_node, s4.account, s4.qos) == (2, 4, "lab-a", "normal")
    assert executor_rows(ctx)[2][10:] == ["2 x 4", "lab-a", "normal"]
    with pytest.raises(ConfigError, match="tasks_per_node"):
        add_slurm_executor(ctx, _as("ada"), "bad", tasks_per_node=0)
    remove_named_executor(ctx, _as("ada"), "gpu4")

    for user in ("tom", "ann", None):
        with pytest.raises(gr.Error, match="admin role|Sign in first"):
            add_slurm_executor(ctx, _as(user), "cpu")
        with pytest.raises(gr.Error, match="admin role|Sign in first"):
            remove_named_executor(ctx, _as(user), "gpu")
        with pytest.raises(gr.Error, match="admin role|Sign in first"):
            check_named_executor(ctx, _as(user), "gpu")
    assert [r[0] for r in executor_rows(ctx)] == ["local", "gpu"], "nothing changed by the refusals"

    # The library's messages come through: a name taken, bad settings, local built in.
    with pytest.raises(ConfigError, match="exists already"):
        add_slurm_executor(ctx, _as("ada"), "gpu")
    with pytest.raises(ConfigError, match="HH:MM:SS"):
        add_slurm_executor(ctx, _as("ada"), "bad", time="soon")
    with pytest.raises(ConfigError, match="built in"):
        remove_named_executor(ctx, _as("ada"), "local")
    assert check_named_executor(ctx, _as("ada"), "local") == "**local** is ready."

    assert remove_named_executor(ctx, _as("ada"), "gpu") == "gpu"
    assert [r[0] for r in executor_rows(ctx)] == ["local"]


def test_remove_is_refused_while_a_queued_job_uses_the_executor(ctx):
    from studio.executors_panel import remove_named_executor

    add_executor(ctx.ws, "gpu")
    job = ctx.executor.ledger.submit("sleep", {"seconds": 0.1, "steps": 1}, executor="gpu")   # no worker runs
    with pytest.raises(ConfigError, match="used by a queued or running job"):
        remove_named_executor(ctx, _as("ada"), "gpu")
    ctx.executor.stop(job.id)            # queued, never started: stopped at once
    assert remove_named_executor(ctx, _as("ada"), "gpu") == "gpu"


def test_a_trainer_may_run_on_any_executor_an_annotator_on_none(ctx):
    from studio.ablation_panel import submit_ablation
    from studio.executors_panel import chosen_executor

    add_executor(ctx.ws, "gpu")
    assert chosen_executor(ctx, _as("tom"), "gpu") == "gpu"
    assert chosen_executor(ctx, _as("ada"), "gpu") == "gpu"
    assert chosen_executor(ctx, _as("tom"), "") == chosen_executor(ctx, _as("tom"), None) == "local"
    with pytest.raises(NotFoundError, match="No executor named 'nope'"):
        chosen_executor(ctx, _as("tom"), "nope")
    with pytest.raises(gr.Error, match="trainer role"):
        chosen_executor(ctx, _as("ann"), "gpu")

    ctx.executor.start_supervisor = False   # the row is what is checked; nothing needs to run it
    job = submit_ablation(ctx, "tom", "smoke", chosen_executor(ctx, _as("tom"), "gpu"))
    assert (job.executor, job.state) == ("gpu", "queued")
    assert job.progress_text().startswith("queued on gpu"), "the status line says where it waits"
    ctx.executor.stop(job.id)


def _component(config: dict, elem_id: str) -> dict:
    found = [c for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id]
    assert len(found) == 1, elem_id
    return found[0]["props"]


def test_run_on_choices_come_with_the_page_load_not_the_build(ctx):
    from studio.app import build_app
    from studio.executors_panel import run_on_update

    add_executor(ctx.ws, "secret-cluster-7")
    demo = build_app(ctx)
    config = demo.get_config_file() if hasattr(demo, "get_config_file") else demo.config
    assert "secret-cluster-7" not in json.dumps(config, default=str), "no workspace executor in /config"
    for elem_id in ("ft-run-on", "cmp-run-on", "ablation-run-on"):
        props = _component(config, elem_id)
        assert props["value"] == "local" and [c[1] for c in props["choices"]] == ["local"], elem_id
    assert _component(config, "executors-table")

    # What the load handlers return: the workspace's executors now, the pick kept while it exists.
    update = run_on_update(ctx, "secret-cluster-7")
    assert [c[1] for c in update.choices] == ["local", "secret-cluster-7"] and update.value == "secret-cluster-7"
    from medart_core.executors import remove_executor

    remove_executor(ctx.ws, "secret-cluster-7")
    assert run_on_update(ctx, "secret-cluster-7").value == "local"

    # The roles on the server: the Executors section is admin's, the Run-on loads are the trainers' tabs'.
    by_name = {bf.api_name: demo.medart_roles[i] for i, bf in demo.fns.items() if bf.fn is not None}
    for name in ("executors_list", "executors_add", "executors_remove", "executors_check"):
        assert by_name[name] == "admin", name
    for name in ("finetune_load", "finetune_launch", "compare_executors", "compare_run", "ablation_executors",
                 "ablation_run"):
        assert by_name[name] == "trainer", name
