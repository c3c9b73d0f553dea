"""The Compare tab's Ablation panel on a live server through gradio_client: a saved ablation's table and
sample strips, a refused unknown name, and an ``ablation`` job queued from the panel (then stopped)."""
from __future__ import annotations

import re
import time

import pytest

from test_compare_tab import REPO, _free_port, _kill_everything


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import gradio as gr

    from medart_core import ablation as A
    from medart_core.captions import CaptionStore
    from medart_core.workspace import Workspace
    from studio.ablation_panel import build_ablation_panel
    from studio.context import StudioContext

    mp = pytest.MonkeyPatch()
    for k, v in dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)).items():
        mp.setenv(k, v)
    root = tmp_path_factory.mktemp("ablation-panel") / "workspace"
    mp.setenv("MEDART_HOME", str(root))
    ws = Workspace.open(root)
    store = CaptionStore.for_workspace(ws)
    preset = A.get_preset("smoke", rows=("base", "hldf"))
    A.run_ablation(ws, store, preset, log=lambda m: None)
    ctx = StudioContext(ws=ws, store=store, backbone_spec="demo")
    with gr.Blocks() as demo:
        build_ablation_panel(ctx)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url, ctx, A.ablation_dir(ws, preset).name
    finally:
        demo.close()
        _kill_everything(ws)
        store.close()
        mp.undo()


def test_saved_ablation_table_and_strips(served):
    from gradio_client import Client

    url, ctx, name = served
    client = Client(url, verbose=False)
    which, md, overview, gallery = client.predict(None, api_name="/ablation_list")
    assert which["value"] == name and which["choices"] == [[f"{name} (finished)", name]]
    assert "HLDF (Med-Art)" in md and "demo backbone, no fine-tuning" in md and "verdict" not in md.split("|")[0]
    assert [re.sub(r":.*", "", g["caption"]) for g in gallery] == ["base-s0", "hldf-s0"]
    from PIL import Image

    with Image.open(overview) as im:                       # real on top, then one generated row per table row
        assert im.size == (180 + 8 * 64, 3 * 64)
    md2, overview2, gallery2 = client.predict(name, api_name="/ablation_show")
    assert md2 == md and len(gallery2) == 2 and overview2
    # The dropdown's choices come with the page (no workspace data at build time), so the server's own check
    # refuses a name it does not list:
    with pytest.raises(Exception, match="No ablation '../../etc'"):
        client.predict("../../etc", api_name="/ablation_show")
    from medart_core.ablation import load_ablation
    from medart_core.errors import NotFoundError

    with pytest.raises(NotFoundError, match="No ablation"):                 # and so does the library
        load_ablation(ctx.ws, "../../etc")


def test_run_queues_an_ablation_job_that_shows_progress(served):
    from gradio_client import Client

    from medart_core.jobs import JobLedger, LocalExecutor

    url, ctx, _ = served
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="not in the list of choices"):
        client.predict("huge", api_name="/ablation_run")
    job_id, status = client.predict("smoke", api_name="/ablation_run")[:2]
    assert job_id.startswith("ablation-") and job_id in status
    led = JobLedger(ctx.ws)
    try:
        assert led.get(job_id).config == {"preset": "smoke", "overrides": {}}
        deadline = time.monotonic() + 120
        while led.get(job_id).state != "running":
            assert time.monotonic() < deadline, led.get(job_id)
            time.sleep(0.5)
        text = client.predict(job_id, None, api_name="/ablation_status")[0]
        assert job_id in text and "running" in text
        LocalExecutor(ctx.ws).stop(job_id)
    finally:
        led.close()
