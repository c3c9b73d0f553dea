"""Executors in the studio (issue 17 §1): the "Run on" choice the job forms share, and the admin-only
Executors section of the Users tab (list, add a Slurm executor, remove, check).

Who may do what is checked on the server, in these functions themselves (beside the tab guard of
``studio.app``): a trainer (or above) may run a job on any executor; only an admin may add or remove one,
or submit the probe of ``check``. The choices are read from the workspace when the page loads, never at build
time (build-time values reach ``/config`` for every role). The library does the work
(:mod:`medart_core.executors`); these are the few lines around it.
"""
# No ``from __future__ import annotations``: Gradio inspects the real ``gr.Request`` annotation.
from typing import Any

import gradio as gr

from medart_core.accounts import ADMIN, TRAINER
from medart_core.commands.executors import in_use_checker
from medart_core.executors import (LOCAL, ExecutorSpec, add_executor, check_executor, get_executor_spec,
                                   list_executors, remove_executor)

from .auth import Refused, current_request
from .context import StudioContext
from .errors import user_errors

RUN_ON_LABEL = "Run on"
RUN_ON_INFO = "local: this machine; a Slurm executor: its cluster (an admin adds them in the Users tab)"
COLUMNS = ["name", "kind", "partition", "gpus/node", "cpus/task", "mem GB", "time", "setup", "added by", "added",
           "nodes x tasks/node", "account", "qos"]


# =========================================================================================================
# The "Run on" choice (Fine-tune, Compare → Metrics, Ablation)
# =========================================================================================================
def executor_names(ctx: StudioContext) -> list[str]:
    """``local`` first, then the workspace's named executors."""
    return [s.name for s in list_executors(ctx.ws)]


def run_on_dropdown(elem_id: str, **kwargs: Any) -> gr.Dropdown:
    """The "Run on" dropdown as built: only ``local`` (no workspace data); the page load fills the rest."""
    return gr.Dropdown([LOCAL], value=LOCAL, label=RUN_ON_LABEL, info=RUN_ON_INFO, elem_id=elem_id,
                       allow_custom_value=True, **kwargs)


def run_on_update(ctx: StudioContext, current: str | None = None) -> gr.Dropdown:
    """The dropdown's choices from the workspace now; the current pick kept while it still exists."""
    names = executor_names(ctx)
    return gr.Dropdown(choices=names, value=current if current in names else LOCAL)


def _check_role(ctx: StudioContext, request: Any, needed: str) -> None:
    try:
        ctx.access.check(request if request is not None else current_request(), needed)
    except Refused as e:
        raise gr.Error(str(e), print_exception=False) from None


def chosen_executor(ctx: StudioContext, request: Any, name: str | None) -> str:
    """The executor a job form asked for, checked: the caller may run jobs (trainer or above) and the name
    exists (a ``NotFoundError`` listing the known ones otherwise). Empty means ``local``."""
    _check_role(ctx, request, TRAINER)
    return get_executor_spec(ctx.ws, (name or "").strip() or LOCAL).name


# =========================================================================================================
# The admin section: list, add, remove, check
# =========================================================================================================
def executor_rows(ctx: StudioContext) -> list[list[str]]:
    """One row per executor, ``local`` first."""
    def row(s: ExecutorSpec) -> list[str]:
        st = s.settings
        if st is None:
            return [s.name, s.kind, "", "", "", "", "", "", "(built in: this machine)", "", "", "", ""]
        return [s.name, s.kind, st.partition or "(default)", str(st.gpus_per_node), str(st.cpus_per_task),
                f"{st.mem_gb:g}" if st.mem_gb else "(default)", st.time, " && ".join(st.setup),
                s.created_by or "", s.created_at, f"{st.nodes} x {st.tasks_per_node}", st.account or "(default)",
                st.qos or "(default)"]

    return [row(s) for s in list_executors(ctx.ws)]


def _count(value: Any) -> int:
    """A count from the form: empty means 1; 0 or less stays as typed (the library says what is wrong)."""
    return 1 if value is None or value == "" else int(value)


def _setup_lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def add_slurm_executor(ctx: StudioContext, request: Any, name: str | None, partition: str | None = "",
                       gpus_per_node: Any = 0, cpus_per_task: Any = 1, mem_gb: Any = 0, time: str | None = "",
                       setup: str | None = "", replace: bool = False, nodes: Any = 1, tasks_per_node: Any = 1,
                       account: str | None = "", qos: str | None = "") -> ExecutorSpec:
    """Add (admin only) a Slurm executor; ``setup`` holds one shell command per line; ``nodes`` x
    ``tasks_per_node`` are a train job's data-parallel ranks (as ``executors add`` has them)."""
    _check_role(ctx, request, ADMIN)
    settings: dict[str, Any] = {"partition": (partition or "").strip(), "gpus_per_node": int(gpus_per_node or 0),
                                "cpus_per_task": int(cpus_per_task or 1), "mem_gb": float(mem_gb or 0),
                                "setup": _setup_lines(setup), "nodes": _count(nodes),
                                "tasks_per_node": _count(tasks_per_node), "account": (account or "").strip(),
                                "qos": (qos or "").strip()}
    if (time or "").strip():
        settings["time"] = time.strip()
    by = ctx.access.user_of(request if request is not None else current_request()) or "studio"
    return add_executor(ctx.ws, (name or "").strip(), "slurm", settings, by=by, replace=bool(replace))


def remove_named_executor(ctx: StudioContext, request: Any, name: str | None) -> str:
    """Remove (admin only) an executor no queued or running job uses; returns its name."""
    _check_role(ctx, request, ADMIN)
    name = (name or "").strip()
    remove_executor(ctx.ws, name, in_use=in_use_checker(ctx.ws))
    return name


def check_named_executor(ctx: StudioContext, request: Any, name: str | None) -> str:
    """Submit the probe (admin only: it queues a job on the cluster); its sentences as markdown."""
    _check_role(ctx, request, ADMIN)
    name = (name or "").strip() or LOCAL
    problems = check_executor(ctx.ws, name)
    if not problems:
        return f"**{name}** is ready."
    return f"**{name}** is not ready:\n" + "\n".join(f"- {p}" for p in problems)


def build_executors_panel(ctx: StudioContext) -> dict[str, Any]:
    """Lay the Executors section out in the current Blocks context (the Users tab) and wire it."""
    c: dict[str, Any] = {}
    gr.Markdown("### Executors\nWhere jobs run: `local` (this machine) or a Slurm cluster. The workspace must be "
                "on a filesystem the cluster's nodes share; **Check** submits a small probe job and says what is "
                "wrong in one sentence each. Shell: `python -m medart_core executors add|list|remove|check`.")
    c["table"] = gr.Dataframe(headers=COLUMNS, datatype="str", interactive=False, elem_id="executors-table")
    with gr.Row():
        c["name"] = gr.Textbox(label="Executor name", max_length=64, elem_id="executors-name")
        c["partition"] = gr.Textbox(label="Partition (empty: the cluster's default)", elem_id="executors-partition")
        c["time"] = gr.Textbox(label="Time limit HH:MM:SS", placeholder="01:00:00", elem_id="executors-time")
    with gr.Row():
        c["gpus"] = gr.Number(0, precision=0, minimum=0, label="GPUs per node", elem_id="executors-gpus")
        c["cpus"] = gr.Number(1, precision=0, minimum=1, label="CPUs per task", elem_id="executors-cpus")
        c["mem"] = gr.Number(0, minimum=0, label="Memory GB (0: partition default)", elem_id="executors-mem")
        c["replace"] = gr.Checkbox(False, label="Replace an existing one")
    with gr.Row():
        c["nodes"] = gr.Number(1, precision=0, minimum=1, label="Nodes per job", elem_id="executors-nodes")
        c["tasks"] = gr.Number(1, precision=0, minimum=1, label="Tasks per node (a train job: one data-parallel "
                                                                 "rank each)", elem_id="executors-tasks")
        c["account"] = gr.Textbox(label="Account (empty: default)", elem_id="executors-account")
        c["qos"] = gr.Textbox(label="QoS (empty: default)", elem_id="executors-qos")
    c["setup"] = gr.Textbox(label="Setup commands on the node, one per line (module load …, source "
                                  "venv/bin/activate)", lines=2, elem_id="executors-setup")
    with gr.Row():
        c["add"] = gr.Button("Add Slurm executor", variant="primary", elem_id="executors-add")
        c["check"] = gr.Button("Check", elem_id="executors-check")
        c["remove"] = gr.Button("Remove", variant="stop", elem_id="executors-remove")
    c["notice"] = gr.Markdown(elem_id="executors-notice")
    _listen(ctx, c)
    return c


def _listen(ctx: StudioContext, c: dict[str, Any]) -> None:
    @user_errors
    def on_list():
        return executor_rows(ctx)

    @user_errors
    def on_add(request: gr.Request, name, partition, gpus, cpus, mem, time, setup, replace, nodes, tasks, account,
               qos):
        spec = add_slurm_executor(ctx, request, name, partition, gpus, cpus, mem, time, setup, replace, nodes, tasks,
                                  account, qos)
        return executor_rows(ctx), (f"Added **{spec.name}** (Slurm). Press **Check** to try it: the probe job "
                                    "shows whether the nodes see this workspace.")

    @user_errors
    def on_remove(request: gr.Request, name):
        return executor_rows(ctx), f"Removed **{remove_named_executor(ctx, request, name)}**."

    @user_errors
    def on_check(request: gr.Request, name):
        return check_named_executor(ctx, request, name)

    root = gr.context.Context.root_block
    if root is not None:
        root.load(on_list, None, c["table"], api_name="executors_list", show_progress="hidden")
    fields = [c[k] for k in ("name", "partition", "gpus", "cpus", "mem", "time", "setup", "replace", "nodes", "tasks",
                             "account", "qos")]
    c["add"].click(on_add, fields, [c["table"], c["notice"]], api_name="executors_add")
    c["remove"].click(on_remove, c["name"], [c["table"], c["notice"]], api_name="executors_remove")
    # The probe waits on the cluster (up to a minute or so): one at a time.
    c["check"].click(on_check, c["name"], c["notice"], api_name="executors_check", concurrency_limit=1)
