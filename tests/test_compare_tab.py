"""The Compare tab on a live server, driven by gradio_client: the tiny base and a cpu-smoke checkpoint
evaluated by an ``evaluate`` job (the supervisor the tab starts), the table against the saved results, a
result of another profile greyed out, the side-by-side grid (same prompts and seeds per column), the slider,
the PNG export, and a real-vs-synthetic blind study through the API. Every process started is killed at the
end."""
from __future__ import annotations

import json
import re
import signal
import socket
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The "mini" dataset: 12 real 64 px images in 2 classes, so the domain classifier trains in a second; 5 per
# class gives 10 evaluation images per checkpoint.
SPEC = dict(per_class=5, steps=4, n_boot=10, kid_subsets=10, min_samples=2)
N = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_everything(ws) -> None:
    from medart_core.jobs import JobLedger, process_start_token, signal_group, supervisor_pid

    pid = supervisor_pid(ws)
    if pid:
        signal_group(pid, process_start_token(pid), signal.SIGKILL)
    if ws.jobs_db.exists():
        led = JobLedger(ws)
        for job in led.list():
            signal_group(job.pid, job.pid_start, signal.SIGKILL)
        led.close()


def _form(**over):
    """The Compare form in FORM_FIELDS order."""
    v = dict(dataset="mini", extractor="domain", extractor_weights="", per_class=SPEC["per_class"],
             captions="latest", steps=SPEC["steps"], guidance=4.5, size=64, seed=0, n_boot=SPEC["n_boot"],
             kid_subsets=SPEC["kid_subsets"], min_samples=SPEC["min_samples"])
    v.update(over)
    from studio.compare_tab import FORM_FIELDS

    return [v[k] for k in FORM_FIELDS]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A workspace with a small real dataset and a 2-step cpu-smoke run, served by a Blocks with the tab."""
    import gradio as gr

    from medart_core.captions import CaptionStore
    from training_data import make_dataset

    from medart_core.train import TrainConfig, train
    from medart_core.workspace import Workspace
    from studio.compare_tab import LAUNCH_CSS, build_compare_tab
    from studio.context import StudioContext

    mp = pytest.MonkeyPatch()
    # The supervisor and the job processes inherit this environment.
    for k, v in dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)).items():
        mp.setenv(k, v)
    root = tmp_path_factory.mktemp("compare") / "workspace"
    mp.setenv("MEDART_HOME", str(root))
    ws = Workspace.open(root)
    store = CaptionStore.for_workspace(ws)
    make_dataset(ws, store, "mini", n=12, size=(64, 64))
    train(TrainConfig.from_preset("cpu-smoke", dataset="mini", captions="latest", max_steps=2, checkpoint_every=2,
                                  validate_every=100, export_merged=False), ws, store, run_name="r1",
          log=lambda m: None)
    ctx = StudioContext(ws=ws, store=store, backbone_spec="tiny")
    with gr.Blocks() as demo:
        with gr.Tab("Compare"):
            build_compare_tab(ctx)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                            css=LAUNCH_CSS, allowed_paths=[str(ws.datasets_dir)])
    try:
        yield url, ctx
    finally:
        demo.close()
        _kill_everything(ws)
        mp.undo()


@pytest.fixture(scope="module")
def evaluated(served):
    """base and r1@2 evaluated through the tab's own job path: /compare_run, then the Timer's /compare_status."""
    from gradio_client import Client

    from medart_core.jobs import supervisor_pid

    url, ctx = served
    client = Client(url, verbose=False)
    assert client.predict(["base"], api_name="/compare_checkpoints") is not None
    job_id, status, *_ = client.predict(["base", "r1@2"], *_form(), api_name="/compare_run")
    assert job_id.startswith("evaluate-") and job_id in status
    assert supervisor_pid(ctx.ws) is not None, "Run evaluation starts the supervisor"
    deadline = time.monotonic() + 240
    states = []
    while True:
        out = client.predict(job_id, "fd", "(all classes)", 12, "mini", api_name="/compare_status")
        states.append(re.sub(r"<[^>]+>", "", out[0]))
        if " — done" in out[0]:
            break
        assert not any(s in out[0] for s in ("failed", "interrupted", "stopped")), (out[0], out[1])
        assert time.monotonic() < deadline, states[-3:]
        time.sleep(1.0)
    return client, job_id, out, states


def _names(out: list) -> dict:
    """Outputs of /compare_load, or of /compare_status after its 3 job outputs (status, log, stop; the Timer
    is not an API output), by name."""
    keys = ["results", "table_html", "table", "warnings", "line", "bar", "gallery", "grid_table", "grid_note",
            "grid_class", "slider_row", "slider_a", "slider_b"]
    return dict(zip(keys, out))


@pytest.mark.slow
def test_job_evaluates_base_and_checkpoint_and_table_matches_saved_results(served, evaluated):
    from medart_core import evaluate as E
    from medart_core.jobs import JobLedger

    url, ctx = served
    client, job_id, out, states = evaluated
    job = JobLedger(ctx.ws).get(job_id)
    assert job.state == "done" and len(job.result["results"]) == 2
    saved = {r.id: r for r in E.load_results(ctx.ws)}
    ids = job.result["results"]
    assert [saved[i].profile["checkpoint"] for i in ids] == ["base", "r1@2"]
    v = _names(out[3:])
    rows = v["table"]["rows"]
    assert [r["checkpoint"] for r in rows] == ["base", "r1@2"] and all(r["comparable"] for r in rows)
    for r in rows:
        o = saved[r["id"]].metrics["overall"]
        assert r["fd"] == pytest.approx(o["fd"]) and r["kid"] == pytest.approx(o["kid"])
        assert r["fd_ci"] == pytest.approx(o["fd_ci"]) and r["n"] == o["n"] == N
        for k in ("precision", "recall", "density", "coverage"):
            assert r[k] == pytest.approx(o[k])
        # the HTML table shows the same numbers, to 4 significant digits
        assert f"{o['fd']:.4g}" in v["table_html"] and f"{o['kid']:.4g}" in v["table_html"]
    assert v["table_html"].count("class='cmp-row'") == 2 and "cmp-other" not in v["table_html"]
    # any ★ is exactly the library's "best": marked only when separated
    assert v["table_html"].count("class='cmp-best'") == len(v["table"]["best"])
    assert "random-weight demo backbone (tiny)" in v["warnings"] and "smoke test" in v["warnings"]
    assert "below the feature dimension" in v["warnings"]                     # small-N warning shown
    assert f"KID subsets of {N} = all N images" in v["warnings"]
    line = v["line"]["value"]                     # the plot: base is step 0 of run r1, then step 2
    assert [(d[0], d[1]) for d in line["data"]] == [("r1", 0), ("r1", 2)]
    by_ck = {r["checkpoint"]: r for r in rows}
    assert [d[2] for d in line["data"]] == pytest.approx([by_ck["base"]["fd"], by_ck["r1@2"]["fd"]])
    bars = v["bar"]["value"]["data"]              # per class: one bar per (class, checkpoint)
    assert sorted(d[0] for d in bars) == ["class0 · base", "class0 · r1@2", "class1 · base", "class1 · r1@2"]
    assert states[-1].startswith(job_id) and "done" in states[-1] and "2 result(s)" in states[-1]


@pytest.mark.slow
def test_side_by_side_grid_same_prompts_and_seeds_slider_and_png_export(served, evaluated):
    from PIL import Image

    from medart_core import evaluate as E

    url, ctx = served
    client, job_id, out, _ = evaluated
    ids = json.loads(json.dumps(out[3]["value"]))
    v = _names(client.predict("mini", [], "fd", "(all classes)", 48, api_name="/compare_load"))
    assert {r["checkpoint"] for r in v["table"]["rows"]} == {"base", "r1@2"}
    gallery = v["gallery"]["value"]
    assert len(gallery) == 3 * N                               # real + 2 checkpoints, N rows
    captions = [g["caption"] for g in gallery]
    for i in range(N):
        real, a, b = captions[3 * i: 3 * i + 3]
        assert real.startswith("real · ")
        seed_a, seed_b = a.split(" · seed ")[1], b.split(" · seed ")[1]
        assert a.startswith("base · ") and b.startswith("r1@2 · ") and seed_a == seed_b
        assert int(seed_a) == v["grid_table"]["data"][i][2]
    # the library's grid: same (prompt, seed) file per row in every column, the real twin first
    results = sorted((r for r in E.load_results(ctx.ws) if r.id in ids),
                     key=lambda r: E.checkpoint_order(r.profile["checkpoint"]))
    grid = E.side_by_side(ctx.ws, ctx.store, results)
    assert grid.checkpoints == ["base", "r1@2"] and not grid.excluded
    for i, it in enumerate(grid.items):
        assert Path(grid.image(i, 0)).name == Path(grid.image(i, 1)).name
        side = json.loads(Path(grid.image(i, 1)).with_suffix(".json").read_text())
        assert (side["prompt"], side["seed"]) == (it.prompt, it.seed) and it.path.is_file()
    assert [row[3] for row in v["grid_table"]["data"]] == [it.prompt for it in grid.items]

    a, b = client.predict(ids, 3, "real", "r1@2", api_name="/compare_slider")
    assert Path(a).is_file() and Path(b).is_file()

    f = client.predict(ids, "(all classes)", 4, api_name="/compare_export")
    exported = sorted((ctx.ws.exports_dir / "compare-grids").glob("grid-*.png"))
    assert exported and Path(f).is_file()
    with Image.open(exported[-1]) as im:
        w, h = im.size
    assert w > 3 * 160 and h > 4 * 160


@pytest.mark.slow
def test_result_of_another_profile_is_greyed_out_with_the_reason(served, evaluated):
    from gradio_client import Client

    from medart_core import evaluate as E

    url, ctx = served
    # The same images measured at another preparation size (images reused: only features are computed).
    (other,) = E.run_evaluation(ctx.ws, ctx.store, E.EvalSpec(dataset="mini", captions="latest", size=32, **SPEC),
                                ["base"])
    client = Client(url, verbose=False)
    v = _names(client.predict("mini", [], "fd", "(all classes)", 4, api_name="/compare_load"))
    rows = {r["checkpoint"]: r for r in v["table"]["rows"]}
    assert v["table"]["reference"] == other.id and rows["base"]["id"] == other.id
    assert rows["base"]["comparable"] and not rows["r1@2"]["comparable"]
    assert "size: 32 vs 64" in rows["r1@2"]["reason"] or "size: 64 vs 32" in rows["r1@2"]["reason"]
    assert "class='cmp-other'" in v["table_html"] and "not comparable with the reference, not ranked" in v["table_html"]
    assert not v["table"]["best"], "one comparable row: nothing is ranked"
    # the grid still pairs both: their images were made the same way
    assert len(v["gallery"]["value"]) == 3 * 4


@pytest.mark.slow
def test_real_vs_synthetic_study_through_the_api(served, evaluated):
    from gradio_client.exceptions import AppError

    from medart_core.blind import ReviewStore

    url, ctx = served
    client, job_id, out, _ = evaluated
    ids = out[3]["value"]
    r1 = ids[1]
    a_choices = client.predict("mini", api_name="/blind_list_results")
    assert a_choices[2].startswith("study-")
    with pytest.raises(AppError, match="must not name a source"):
        client.predict("r1 check", "real-vs-synthetic", r1, None, api_name="/blind_create")
    note, *_ = client.predict("", "real-vs-synthetic", r1, None, api_name="/blind_create")
    assert f"{N} pairs" in note
    study = ReviewStore.for_workspace(ctx.ws).studies()[-1]["name"]
    # The session's gr.State holds the pair on screen (API outputs: position, prompt, left, right, notice,
    # results, tag; State and buttons are not API values).
    res = client.predict(study, "", api_name="/blind_start")
    assert "Enter your name" in res[0] and res[2] is None
    res = client.predict(study, "Dr API", api_name="/blind_start")
    bad = client.predict("", "", api_name="/blind_vote_left")          # no name: refused inline, nothing stored
    assert "Enter your name" in bad[4] and ReviewStore.for_workspace(ctx.ws).results(study)["votes"] == 0
    for i in range(N):
        assert f"pair {i + 1} / {N}" in res[0]
        # served from Gradio's cache under a content hash, named image.png: nothing names the source
        assert Path(res[2]).name == Path(res[3]).name == "image.png"
        assert "r1@2" not in json.dumps(res) and str(ctx.ws.root) not in json.dumps(res)
        assert "results (which name the sources) appear" in res[5]
        api = "/blind_vote_left" if i % 2 else "/blind_vote_right"
        res = client.predict("Dr API", "blurry" if i == 0 else "", api_name=api)
    assert "Done" in res[0]
    assert "Synthetic taken for real" in res[5] and "r1@2" in res[5] and "blurry" in res[5]
    r = ReviewStore.for_workspace(ctx.ws).results(study)
    assert r["votes"] == N and r["reviewers"] == ["Dr API"]
    assert r["rows"][0]["wins"] + r["rows"][1]["wins"] == N
    assert client.predict(study, api_name="/blind_results") == res[5]


def test_handlers_refuse_bad_input_and_blind_images_are_neutral(tmp_path):
    import numpy as np
    from PIL import Image, PngImagePlugin

    from medart_core.blind import neutral_pair_images
    from medart_core.errors import ConfigError
    from studio import compare_tab as tab

    def spec_of(*values):          # the form by field name, as the tab hands it over
        return tab.make_spec(tab.form_values(values))

    with pytest.raises(ConfigError, match="dataset"):
        spec_of(None, "domain", "", 4, "latest", 4, 4.5, 64, 0, 10, 10, 2)
    with pytest.raises(ConfigError, match="extractor"):
        spec_of("sample", "fid", "", 4, "latest", 4, 4.5, 64, 0, 10, 10, 2)
    with pytest.raises(ConfigError, match="Images per class"):
        spec_of("sample", "domain", "", 0, "latest", 4, 4.5, 64, 0, 10, 10, 2)
    spec = spec_of("sample", "inception", " /w.pth ", "8", "approved", 10, 3, 64, 1, 5, 5, 5)
    assert (spec.extractor_weights, spec.per_class, spec.steps, spec.guidance) == ("/w.pth", 8, 10, 3.0)

    # a "real" 96x64 PNG carrying a text chunk and a "generated" 64x64 one: both come out 64x64, no metadata
    info = PngImagePlugin.PngInfo()
    info.add_text("checkpoint", "r1@2")
    real, fake = tmp_path / "datasets-real.png", tmp_path / "r1@2-fake.png"
    Image.fromarray(np.full((64, 96, 3), 200, np.uint8)).save(real, pnginfo=info)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(fake, pnginfo=info)
    a, b = neutral_pair_images(real, fake)
    assert a.size == b.size == (64, 64) and not a.info and not b.info and a.mode == b.mode == "RGB"

    from medart_core.evaluate import checkpoint_order

    refs = ["r2@10", "base", "r1@10", "r1@2", "odd"]
    assert sorted(refs, key=checkpoint_order) == ["base", "r1@2", "r1@10", "r2@10", "odd"]


def test_metric_frames_plot_base_as_step_zero_and_never_stack_classes():
    from studio import compare_tab as tab

    table = {"rows": [
        {"id": "a", "checkpoint": "base", "comparable": True, "fd": 9.0},
        {"id": "b", "checkpoint": "r1@4", "comparable": True, "fd": 5.0},
        {"id": "c", "checkpoint": "r1@2", "comparable": True, "fd": 7.0},
        {"id": "d", "checkpoint": "r2@2", "comparable": False, "fd": 1.0},    # another profile: not plotted
    ], "best": {}, "reference": "a"}
    df = tab.metric_by_step(table, "fd")
    assert df.to_dict("records") == [{"run": "r1", "step": 0, "value": 9.0}, {"run": "r1", "step": 2, "value": 7.0},
                                     {"run": "r1", "step": 4, "value": 5.0}]

    class R:
        def __init__(self, i, ck, per):
            self.id, self.profile, self.metrics = i, {"checkpoint": ck}, {"per_class": per}

    bars = tab.per_class_frame([R("a", "base", {"x": {"fd": 1.0}, "y": {"skipped": "n"}}),
                                R("b", "r1@4", {"x": {"fd": 2.0}, "y": {"fd": 3.0}}),
                                R("d", "r2@2", {"x": {"fd": 0.1}})], table, "fd")
    assert list(bars["bar"]) == ["x · base", "x · r1@4", "y · r1@4"]        # one bar per (class, checkpoint)
