"""The Generate tab's "Run on" (issue 17 §1): a batch submitted as a ``generate`` job with the form's values, on
the chosen executor, followed by the shared JobPanel whose images fill the gallery once done. Handlers are
called directly (roles checked in them), the built app is read for its endpoints and /config, and one job
runs on the REAL local Slurm (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
from test_jobs import _done, _wait
from test_slurm_jobs import _cluster_executor, procs  # noqa: F401 - fixture

from medart_core.accounts import UserStore
from medart_core.errors import NotFoundError
from medart_core.executors import add_executor

PASSWORD = "correct-horse-battery"
FORM = {"prompt": "An endoscopic image of polyps\nA second prompt", "negative": "", "checkpoint": "base",
        "strength": 1.0, "steps": 2, "guidance": 4.5, "seed": 7, "random_seed": False, "n": 2, "resolution": 0}


@pytest.fixture
def ctx(ws, store):
    from medart_core.jobs import LocalExecutor
    from studio.auth import Access
    from studio.context import StudioContext

    users = UserStore.for_workspace(ws)
    for name, role in (("tom", "trainer"), ("ann", "annotator")):
        users.add(name, role, PASSWORD, by="test")
    c = StudioContext(ws=ws, store=store, access=Access("password", users), backbone_spec="tiny")
    c._executor = LocalExecutor(ws, start_supervisor=False)   # the row is checked; the slow test runs one
    yield c
    c._executor.close()


def _as(user: str | None) -> gr.Request:
    return gr.Request(username=user)


def _submit(ctx, user: str, where: str | None):
    from studio import generate_tab as tab
    from studio.executors_panel import chosen_executor

    return tab.submit_generate_job(ctx, user, dict(FORM), chosen_executor(ctx, _as(user), where))


def test_a_batch_becomes_a_generate_job_on_the_chosen_executor(ctx):
    from studio import generate_tab as tab

    add_executor(ctx.ws, "cluster")
    job = _submit(ctx, "tom", "cluster")
    assert (job.kind, job.executor, job.state, job.owner) == ("generate", "cluster", "queued", "tom")
    req = job.config["request"]
    assert req["prompts"] == ["An endoscopic image of polyps", "A second prompt"]
    assert (req["n"], req["steps"], req["seed"], req["checkpoint"], req["resolution"]) == (2, 2, 7, "base", None)
    assert job.config["backbone"] == "tiny"
    assert job.progress_text().startswith("queued on cluster")
    panel = tab.generate_job_panel(ctx)
    assert job.id in panel.view(job.id).text and tab.job_images(ctx, job) == []
    assert _submit(ctx, "tom", "").executor == "local"                 # empty: this machine

    with pytest.raises(gr.Error, match="trainer role"):
        _submit(ctx, "ann", "cluster")
    with pytest.raises(NotFoundError, match="No executor named 'nope'"):
        _submit(ctx, "tom", "nope")
    with pytest.raises(gr.Error, match="Type a prompt"):
        tab.submit_generate_job(ctx, "tom", dict(FORM, prompt="  \n"))
    with pytest.raises(gr.Error, match="per generate job"):             # a job takes more than a click
        tab.submit_generate_job(ctx, "tom", dict(FORM, prompt="\n".join(["p"] * 300)))
    assert len(tab.build_request(**dict(FORM, prompt="\n".join(["p"] * 40), n=4), job=True).prompts) == 40
    for j in ctx.executor.list():
        ctx.executor.stop(j.id)


def test_the_tab_has_run_on_from_the_page_load_and_trainer_endpoints(ctx):
    from studio.app import build_app

    add_executor(ctx.ws, "secret-cluster-9")
    demo = build_app(ctx)
    config = demo.get_config_file() if hasattr(demo, "get_config_file") else demo.config
    assert "secret-cluster-9" not in json.dumps(config, default=str), "no workspace executor in /config"
    props = [c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == "gen-run-on"]
    assert len(props) == 1 and props[0]["value"] == "local" and [c[1] for c in props[0]["choices"]] == ["local"]
    by_name = {bf.api_name: demo.medart_roles[i] for i, bf in demo.fns.items() if bf.fn is not None}
    for name in ("generate_job_run", "generate_job_status", "generate_job_stop", "generate_executors"):
        assert by_name[name] == "trainer", name


@pytest.mark.slow
def test_a_generate_job_on_slurm_reaches_done_with_its_images_on_disk(ctx, procs, slurm_cluster):  # noqa: F811
    """On a two-task executor the batch fans out as a job array of one-process tasks (the executor's two
    tasks per node are data-parallel training's), each image written once; its images fill the gallery."""
    from medart_core import generate as G
    from studio import generate_tab as tab

    _cluster_executor(ctx.ws, slurm_cluster, "cluster", tasks_per_node=2, mem_gb=2)
    job = _submit(ctx, "tom", "cluster")
    procs.supervisor()
    job = _wait(ctx.executor, job.id, _done, 150, "done", procs)
    assert job.state == "done", ctx.executor.error_report(job)
    paths = [Path(p) for p in job.result["images"]]
    assert len(paths) == 4 and all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert sorted(G.read_sidecar(p)["seed"] for p in paths) == [7, 7, 8, 8]     # seed + k per prompt

    panel = tab.generate_job_panel(ctx)
    c = {"job_panel": panel, "gallery": gr.Gallery(), "summary": gr.Markdown(), "details": gr.JSON()}
    panel.job, panel.status, panel.timer = gr.Textbox(), gr.HTML(), gr.Timer(active=False)
    out = tab.job_show(ctx, c, job.id)
    assert [item[0] for item in out[c["gallery"]]] == [str(p.resolve()) for p in paths]
    assert "4 image(s)" in out[panel.status] and "Generated (job) 4 image(s)" in out[c["summary"]]
    assert job.fans_out and job.remote_id is None and len(job.result["slurm_tasks"]) == 1   # 4 images: 1 batch
    assert sorted(x.name for x in paths[0].parent.glob("*.png")) == sorted(x.name for x in paths)
    log = ctx.executor.log_tail(job.id, 100)
    assert "1 Slurm task(s) on cluster" in log and "batches 0-0: done" in log, log
