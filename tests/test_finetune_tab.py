"""The Fine-tune tab: its handlers called directly (config from preset + overrides, estimate, metrics follower,
runs table), then a live server driven by gradio_client: a cpu-smoke run from Launch to done through the
tab's own endpoints, with the supervisor the tab starts. Every process started is killed in a finalizer."""
from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctx(ws, store):
    from studio.context import StudioContext

    return StudioContext(ws=ws, store=store, backbone_spec="tiny")


def _form(dataset="mini", captions="latest", backbone="tiny", preset="cpu-smoke", **over) -> dict:
    """The form by field name, in FORM order (``.values()`` are the API's positional inputs)."""
    from studio import finetune_tab as tab

    values = tab.preset_values(preset)
    values.update(over)
    form = dict(dataset=dataset, captions=captions, backbone=backbone, preset=preset, **values)
    return {k: form[k] for k in tab.FORM}


def _kill_everything(ws) -> None:
    from medart_core.jobs import JobLedger, process_start_token, signal_group, supervisor_pid

    pid = supervisor_pid(ws)
    if pid:
        tok = process_start_token(pid)
        signal_group(pid, tok, signal.SIGKILL)
    if ws.jobs_db.exists():
        led = JobLedger(ws)
        for job in led.list():
            signal_group(job.pid, job.pid_start, signal.SIGKILL)
        led.close()


@pytest.fixture
def one_thread(monkeypatch):
    # The supervisor and the jobs the tab starts inherit this environment.
    for k, v in dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", str(REPO))


# =========================================================================================================
# Handlers, called directly
# =========================================================================================================
def test_config_from_preset_and_overrides(ws, store):
    from training_data import make_dataset

    from medart_core.errors import ConfigError
    from studio import finetune_tab as tab

    make_dataset(ws, store)
    cfg = tab.make_config(_form(max_steps=7, rank=3, pixel_every=5, grad_path="truncated", truncated_k=1,
                                 resolution=32, t5_enabled=False, lr=5e-5))
    assert (cfg.dataset, cfg.captions, cfg.backbone, cfg.max_steps, cfg.resolution, cfg.lr) == \
        ("mini", "latest", "tiny", 7, 32, 5e-5)
    assert (cfg.lora.rank, cfg.lora.t5_enabled, cfg.hldf.pixel_every, cfg.hldf.grad_path, cfg.hldf.truncated_k) == \
        (3, False, 5, "truncated", 1)
    assert cfg.hldf.sample_steps == 3 and cfg.validate_every == 15          # untouched preset fields stay
    paper = tab.make_config(_form(preset="paper", backbone="tiny", max_steps=0, resolution=0))
    assert paper.max_steps is None and paper.resolution is None and paper.epochs == 15
    # training T5 turns the small-gpu feature cache off (a cache needs a frozen T5)
    sg = tab.make_config(_form(preset="small-gpu", t5_enabled=True))
    assert sg.lora.t5_enabled and not sg.cache_features
    with pytest.raises(ConfigError, match="batch_size"):
        tab.make_config(_form(batch_size=0))
    ctx = _ctx(ws, store)
    with pytest.raises(ConfigError, match="no approved captions"):
        tab.launch(ctx, None, None, _form(captions="approved"))
    assert "6 images, **0 approved captions**" in tab.dataset_info(ctx, "mini")


def test_estimate_names_memory_time_and_warns_when_it_will_not_fit(ws, store):
    from training_data import make_dataset

    from medart_core.estimate import GiB, cpu_device, estimate, gpu_device
    from medart_core.train import TrainConfig
    from studio import finetune_tab as tab

    make_dataset(ws, store)
    md = tab.estimate_markdown(_ctx(ws, store), _form())
    assert "Estimated peak" in md and "time per step" in md
    paper = TrainConfig.from_preset("paper")
    big = estimate(paper, gpu_device("NVIDIA H100 80GB HBM3", 80 * GiB), n_train_images=200)
    small = estimate(paper, gpu_device("Tesla T4", 16 * GiB), n_train_images=200)
    assert big.fits and not small.fits and "will probably not fit" in small.markdown()
    assert 20e6 < big.lora_params < 23e6          # PixArt-XL-2 rank 8 on DiT + T5: 21.4 M (bench/gpu_check)
    trunc = estimate(TrainConfig.from_preset("small-gpu"), gpu_device("NVIDIA H100 80GB HBM3", 80 * GiB))
    assert trunc.peak_bytes < big.peak_bytes and trunc.pixel_step_s < big.pixel_step_s
    cpu = estimate(paper, cpu_device(2, 64 * GiB))
    assert any("No GPU detected" in w for w in cpu.warnings)


def test_runs_without_a_validation_loss_are_listed(tmp_path):
    """A run with val_images=0 (e.g. the ablation's cells) logs its validation grids with val_loss null: the
    follower keeps the grid and plots no validation point (it once stopped the studio from starting)."""
    from studio.finetune_tab import METRICS, loss_frames

    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"step": 1, "loss": 0.5, "loss_latent": 0.5}) + "\n" +
                 json.dumps({"step": 1, "val_loss": None, "validation_grid": "validation/step_000001.png"}) + "\n")
    s = METRICS.get(p)
    assert s.val == [] and s.last["val_loss"] is None and s.last["validation_grid"].endswith("000001.png")
    lat, _ = loss_frames(s)
    assert lat[lat.series == "validation"].loss.isna().all()           # only the undrawn placeholder point


def test_metrics_follower_reads_only_new_lines_and_restarts_on_rewrite(tmp_path):
    from medart_core.fileio import atomic_write_text
    from studio.finetune_tab import MAX_POINTS, METRICS, loss_frames

    p = tmp_path / "metrics.jsonl"
    with open(p, "w") as f:
        for s in range(1, 1001):
            r = {"step": s, "loss": 1.0 / s, "loss_latent": 1.0 / s, "images_per_s": 2.0, "peak_mem_mb": 10}
            if s % 10 == 0:
                r["loss_color"] = 0.5
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({"step": 1000, "val_loss": 0.3, "validation_grid": "validation/step_001000.png"}) + "\n")
        f.write('{"step": 1001, "loss_lat')                    # torn line: not read yet
    s = METRICS.get(p)
    v = s.version
    assert len(s.step) == 1000 and s.last["val_loss"] == 0.3 and len(s.color) == 100
    assert METRICS.get(p).version == v                         # nothing new: no work, same version
    lat, col = loss_frames(s)
    assert len(lat[lat.series == "train (latent)"]) <= MAX_POINTS and lat.step.max() == 1000
    assert set(lat.series) == {"train (latent)", "validation"} and len(col) == 100
    with open(p, "a") as f:
        f.write('ent": 0.1}\n')
    assert METRICS.get(p).step[-1] == 1001
    atomic_write_text(p, json.dumps({"step": 1, "loss_latent": 0.9}) + "\n")   # a resume rewrites the file
    s = METRICS.get(p)
    assert s.step == [1] and s.version > v


def test_a_tick_is_cheap_on_a_long_run(ws, store):
    """What a Timer tick costs with a 20,000-step metrics log: the first read parses it, later ticks only stat
    it and read the job row and the log's end (ten open tabs = ten of these every 2 s)."""
    from studio import finetune_tab as tab

    layout = ws.run_layout("long")
    layout.root.mkdir(parents=True)
    layout.config.write_text("{}")
    with open(layout.metrics, "w") as f:
        for s in range(1, 20_001):
            f.write(json.dumps({"step": s, "loss": 1.0, "loss_latent": 1.0, "images_per_s": 3.0}) + "\n")
    ctx = _ctx(ws, store)
    first = tab.status(ctx, None, "long", None)
    assert first["plots"] is not None and len(first["plots"][0]) <= tab.MAX_POINTS + 1
    # Later ticks only stat the log: count the opens of the metrics file (a re-parse would open it).
    import builtins

    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *a, **k):
        if str(file) == str(layout.metrics):
            opened.append(str(file))
        return real_open(file, *a, **k)

    builtins.open = counting_open
    try:
        for _ in range(50):
            view = tab.status(ctx, None, "long", first["seen"])
    finally:
        builtins.open = real_open
    assert view["plots"] is None, "unchanged metrics must not re-send the plots"
    assert opened == [], f"{len(opened)} of 50 unchanged ticks re-read the 20,000-line metrics log"
    with open(layout.metrics, "a") as f:                  # one new line: read from the old end only
        f.write(json.dumps({"step": 20_001, "loss": 0.5, "loss_latent": 0.5, "images_per_s": 3.0}) + "\n")
    view = tab.status(ctx, None, "long", first["seen"])
    assert view["plots"] is not None and tab.METRICS.get(layout.metrics).step[-1] == 20_001


@pytest.mark.slow
def test_runs_table_lists_runs_with_state_preset_steps_and_checkpoints(ws, store):
    from training_data import make_dataset

    from medart_core.train import train
    from studio import finetune_tab as tab

    make_dataset(ws, store)
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tab.make_config(_form(max_steps=4, resolution=32, sample_steps=2, pixel_every=2))
        cfg.validate_every, cfg.checkpoint_every, cfg.export_merged = 2, 2, False
        train(cfg, ws, store, run_name="cli-run")
    finally:
        torch.set_num_threads(n)
    rows = tab.runs_rows(_ctx(ws, store))
    assert len(rows) == 1
    run, state, preset, started, steps, val, cks = rows[0]
    assert (run, state, preset, steps) == ("cli-run", "finished", "cpu-smoke (modified)", "4/4")
    assert float(val) > 0 and cks.startswith("2 (latest step_000004")
    text, grids = tab.run_details(_ctx(ws, store), "cli-run")
    assert json.loads(text)["max_steps"] == 4 and [Path(g).name for g in grids] == ["step_000002.png",
                                                                                   "step_000004.png"]
    view = tab.status(_ctx(ws, store), None, "cli-run", None)
    assert view["job_id"] == "" and view["plots"] is not None and len(view["plots"][0]) >= 4
    assert view["grid"].endswith("step_000004.png") and not view["active"]


# =========================================================================================================
# Live server + gradio_client
# =========================================================================================================
@pytest.fixture
def served(ws, store, one_thread):
    import gradio as gr

    from medart_core.data import build_sample_dataset
    from studio.finetune_tab import LAUNCH_CSS, build_finetune_tab

    build_sample_dataset(ws, store, "sample")
    ctx = _ctx(ws, store)
    with gr.Blocks() as demo:
        with gr.Tab("Fine-tune"):
            build_finetune_tab(ctx)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                            css=LAUNCH_CSS)
    try:
        yield url, ctx
    finally:
        demo.close()
        _kill_everything(ws)


@pytest.mark.slow
def test_cpu_smoke_run_from_launch_to_done_through_the_api(served, ws):
    from gradio_client import Client

    from medart_core.jobs import supervisor_pid

    url, ctx = served
    client = Client(url, verbose=False)
    est = client.predict(*_form(dataset="sample").values(), api_name="/finetune_estimate")
    assert "Estimated peak" in est
    out = client.predict("smoke", *_form(dataset="sample").values(), api_name="/finetune_launch")
    job_id, run = out[0], out[1]
    assert run == "smoke" and job_id.startswith("train-")
    assert supervisor_pid(ws) is not None, "Launch starts the supervisor"

    deadline = time.monotonic() + 240
    states, steps = [], []
    while True:
        res = client.predict(job_id, run, api_name="/finetune_status")
        job = res[7]
        states.append(job["state"])
        if job.get("step"):
            steps.append(job["step"])
        if job["state"] in ("done", "failed", "interrupted", "stopped"):
            break
        assert time.monotonic() < deadline, f"run not done in time: {job}"
        time.sleep(1.0)
    assert job["state"] == "done", res[6]
    assert "running" in states and steps and steps[-1] == 30
    sel = client.predict("smoke", api_name="/finetune_select_run")       # selecting a run re-sends its plots
    latent = [r for r in sel[3]["data"] if r[2] == "train (latent)"]
    assert [r[0] for r in latent] == list(range(1, 31))
    assert {r[2] for r in sel[3]["data"]} == {"train (latent)", "validation"}
    assert [r[0] for r in sel[4]["data"]] == [10, 20, 30]                  # colour loss on the pixel steps
    from PIL import Image

    assert sel[5] and Image.open(sel[5]).format == "PNG"                  # latest validation grid, lossless
    assert [g["caption"] for g in sel[-1]] == ["step_000015", "step_000030"]
    assert all(Image.open(g["image"]).format == "PNG" for g in sel[-1])
    assert json.loads(sel[-2])["max_steps"] == 30
    layout = ws.run_layout("smoke")
    assert (layout.checkpoint(30) / "adapters.safetensors").is_file()
    assert (layout.export_dir / "adapters").is_dir()
    runs = client.predict(api_name="/finetune_runs")
    rows = runs["data"] if isinstance(runs, dict) else runs
    assert rows[0][:3] == ["smoke", "done", "cpu-smoke"] and rows[0][4] == "30/30"

    # Calibrate: 4 real steps as a short job; the measured figures replace the "calibrating" note.
    out = client.predict(*_form(dataset="sample").values(), api_name="/finetune_calibrate")
    cal_job, cal_run = out[0], out[1]
    assert cal_run.startswith("calibrate-") and "Calibrating" in out[-2]   # (buttons, timer, state: not in API results)
    deadline = time.monotonic() + 240
    while True:
        res = client.predict(cal_job, cal_run, api_name="/finetune_status")
        if res[7]["state"] in ("done", "failed", "interrupted", "stopped"):
            break
        assert time.monotonic() < deadline
        time.sleep(1.0)
    assert res[7]["state"] == "done", res[6]
    assert res[-2].startswith("**Measured** (4 steps): latent step") and "estimate:" in res[-2]


def test_the_form_sets_precision_checkpointing_ema_and_min_snr():
    """The issue-19/20 options reach the TrainConfig from the form; the preset's own values by default."""
    from studio import finetune_tab as tab

    default = tab.make_config(_form())
    assert (default.precision, default.ema.decay, default.ema.posthoc, default.snr_gamma) == (None, 0.0, False, None)
    assert default.hldf.checkpointing == tab.preset_values("cpu-smoke")["checkpointing"]
    cfg = tab.make_config(_form(precision="bf16", checkpointing="on", ema_decay=0.999, ema_posthoc=True,
                                snr_gamma=5))
    assert (cfg.precision, cfg.hldf.checkpointing, cfg.ema.decay, cfg.ema.posthoc, cfg.snr_gamma) == \
        ("bf16", "on", 0.999, True, 5.0)
    assert tab.make_config(_form(precision="device default")).precision is None
