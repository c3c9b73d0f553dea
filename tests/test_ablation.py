"""The ablation in miniature (medart_core/ablation.py): its fine-tuning set, its caption variants, the table
and verdict logic, and the shortened preset end to end (in-process and as a job)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from medart_core import ablation as A
from medart_core.errors import ConfigError
from test_jobs import procs  # noqa: F401  (fixture: job supervisors killed at teardown; the ledger is conftest's)


# ---- the fine-tuning set ------------------------------------------------------------------------------------
def test_colour_shift_is_the_documented_affine_map():
    img = Image.fromarray(np.array([[[100, 100, 100], [250, 10, 240]]], dtype=np.uint8), "RGB")
    out = np.asarray(A.colour_shift(img)).astype(int)
    assert out[0, 0].tolist() == [72, 114, 154]                 # 100*gain + offset, rounded
    assert out[0, 1].tolist() == [180, 17, 255]                 # clipped at 255


def test_measured_caption_starts_with_the_seed_and_reads_the_pixels():
    seed = "A colour fundus photograph of the retina"
    warm = Image.fromarray(np.full((8, 8, 3), (200, 90, 40), np.uint8), "RGB")
    grey = Image.fromarray(np.full((8, 8, 3), 30, np.uint8), "RGB")
    a, b = A.measured_caption(warm, seed), A.measured_caption(grey, seed)
    assert a.startswith(seed + ", ") and b.startswith(seed + ", ")
    assert a.endswith("mid-toned with low contrast and an orange cast")
    assert b.endswith("dark with low contrast and a neutral grey tone")
    red = Image.fromarray(np.full((8, 8, 3), (200, 40, 60), np.uint8), "RGB")
    assert A.measured_caption(red, seed).endswith("a red cast")
    assert A.measured_caption(A.colour_shift(red), seed).endswith("a magenta cast")   # the shift changes the words


def test_derive_dataset_copies_labels_and_provenance_and_is_all_or_nothing(ws, store):
    from medart_core.data import build_sample_dataset, derive_dataset

    build_sample_dataset(ws, store)
    name = A.prepare_dataset(ws, store, log=lambda m: None)
    recs = store.list_images(name)
    assert len(recs) == 59 and {r.label for r in recs} == set(A.COLOUR_CLASSES)
    r = recs[0]
    src = store.get_image(r.source["derived_from"]["image_id"])
    assert src.dataset == "sample" and src.label == r.label and r.source["transform"] == A.SHIFT_NAME
    with Image.open(ws.image_path("sample", src.file_name)) as im:
        expected = np.asarray(A.colour_shift(im.convert("RGB")))
    with Image.open(ws.image_path(name, r.file_name)) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), expected)
    state = store.current(r.id)
    assert state.text.startswith(store.dataset_info("sample").meta["seed_captions"][r.label] + ", ")
    assert store.history(r.id)[0].source == A.CAPTION_SOURCE
    assert A.prepare_dataset(ws, store, log=lambda m: None) == name      # idempotent
    with pytest.raises(ConfigError, match="already exists"):
        derive_dataset(ws, store, "sample", name, transform=A.colour_shift, transform_name="x")

    calls = []

    def failing(img):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return img

    with pytest.raises(RuntimeError):
        derive_dataset(ws, store, "sample", "half", transform=failing, transform_name="y")
    assert not store.has_dataset("half") and not ws.images_dir("half").exists()


# ---- caption variants in the trainer -----------------------------------------------------------------------
def test_caption_text_class_and_empty(ws, store):
    from medart_core.data import build_sample_dataset
    from medart_core.examples import captions_digest, collect_examples
    from medart_core.train_config import TrainConfig

    build_sample_dataset(ws, store)
    A.prepare_dataset(ws, store, log=lambda m: None)
    base = dict(dataset=A.DATASET, captions="latest")
    own, _ = collect_examples(ws, store, TrainConfig(**base))
    cls, _ = collect_examples(ws, store, TrainConfig(**base, caption_text="class"))
    empty, _ = collect_examples(ws, store, TrainConfig(**base, caption_text="empty"))
    seeds = store.dataset_info(A.DATASET).meta["seed_captions"]
    assert [e.key for e in own] == [e.key for e in cls] == [e.key for e in empty]
    assert all(e.text != seeds[e.label] for e in own)
    assert all(e.text == seeds[e.label] for e in cls)
    assert all(e.text == "" for e in empty)
    assert len({captions_digest(own), captions_digest(cls), captions_digest(empty)}) == 3
    with pytest.raises(ConfigError, match="caption_text"):
        TrainConfig(**base, caption_text="vsg").validate()


# ---- the table and the verdicts ------------------------------------------------------------------------------
def test_mean_ci_and_paired_verdicts():
    m = A.mean_ci([1.0, 2.0, 3.0])
    assert m["mean"] == 2.0 and m["ci"] == pytest.approx([2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5])
    assert A.mean_ci([5.0])["ci"] is None
    cells = {}
    for s, (lora, hldf, no_t5) in enumerate([(1.0, 0.5, 0.4), (1.2, 0.6, 0.9), (1.1, 0.55, 0.5)]):
        cells[("lora", s)] = {"color_gap": lora}
        cells[("hldf", s)] = {"color_gap": hldf}
        cells[("hldf-no-t5", s)] = {"color_gap": no_t5}
    ef = {e["effect"]: e for e in A.effects(cells, [0, 1, 2], ["color_gap"])}
    assert ef["HLDF beats plain LoRA"]["verdict"] == "reproduced"
    assert ef["HLDF beats plain LoRA"]["diff"]["mean"] == pytest.approx(0.55)
    assert ef["T5 LoRA helps"]["verdict"] == "same direction, not significant"   # -0.1, +0.3, -0.05
    assert "LoRA beats DoRA" not in ef                                         # no DoRA cells


def test_single_seed_verdicts_use_the_per_image_paired_comparison():
    """With one seed there is no interval over seeds: cells that recorded results of one profile are decided
    by the per-image paired comparison (``evaluate.compare_paired``, passed in); others keep the old rule."""
    cells = {("lora", 0): {"color_gap": 1.0, "fd_domain": 9.0, "evaluations": {"domain": "ev-lora"},
                           "profiles": {"domain": {"p": 1}}},
             ("hldf", 0): {"color_gap": 0.5, "fd_domain": 8.0, "evaluations": {"domain": "ev-hldf"},
                           "profiles": {"domain": {"p": 1}}},
             ("hldf-no-t5", 0): {"color_gap": 0.6, "fd_domain": 8.5}}      # an older cell: no results recorded
    calls = []

    def paired(worse, better):
        calls.append((worse, better))
        return {"color_gap": {"diff": 0.5, "ci": [0.3, 0.7]}, "fd": {"diff": 1.0, "ci": [-0.5, 2.5]}}

    ef = {(e["effect"], e["metric"]): e for e in A.effects(cells, [0], ["color_gap", "fd_domain"], paired=paired)}
    assert calls and set(calls) == {("ev-lora", "ev-hldf")}
    gap = ef[("HLDF beats plain LoRA", "color_gap")]
    assert gap["verdict"] == "reproduced" and gap["paired_over"] == "images" and gap["diff"]["ci"] == [0.3, 0.7]
    assert gap["diff"]["mean"] == pytest.approx(0.5)                          # the cells' own difference
    fd = ef[("HLDF beats plain LoRA", "fd_domain")]
    assert fd["verdict"] == "same direction, not significant"                 # the paired interval holds 0
    t5 = ef[("T5 LoRA helps", "color_gap")]
    assert t5["paired_over"] == "seeds" and t5["diff"]["ci"] is None
    assert t5["verdict"] == "same direction, not significant"
    # Without the paired comparison, one seed never decides "reproduced".
    plain = {(e["effect"], e["metric"]): e for e in A.effects(cells, [0], ["color_gap"])}
    assert plain[("HLDF beats plain LoRA", "color_gap")]["verdict"] == "same direction, not significant"


def test_presets_are_validated():
    with pytest.raises(ConfigError, match="Unknown ablation rows"):
        A.get_preset("smoke", rows=("hldf", "nonsense"))
    with pytest.raises(ConfigError, match="preset"):
        A.get_preset("huge")
    mini = A.get_preset("mini")
    assert len(mini.seeds) >= 3 and set(mini.rows) == set(A.ROW_NAMES)
    assert A.get_preset("mini", steps=10).digest() != mini.digest()


def test_train_config_of_each_row():
    p = A.get_preset("mini")
    rows = {r.name: r for r in A.ROWS}
    lora = A.train_config(p, rows["lora"], 0, A.DATASET)
    hldf = A.train_config(p, rows["hldf"], 1, A.DATASET)
    assert lora.hldf.pixel_every > lora.max_steps and hldf.hldf.pixel_every == p.pixel_every
    assert hldf.seed == 1 and hldf.backbone == "demo" and hldf.lora.t5_enabled
    assert not A.train_config(p, rows["hldf-no-t5"], 0, A.DATASET).lora.t5_enabled
    assert A.train_config(p, rows["hldf-dora"], 0, A.DATASET).lora.use_dora
    assert A.train_config(p, rows["hldf-empty"], 0, A.DATASET).caption_text == "empty"
    # Only the row's switches differ from the paper's method.
    a, b = hldf.to_dict(), A.train_config(p, rows["hldf-class"], 1, A.DATASET).to_dict()
    assert {k for k in a if a[k] != b[k]} == {"caption_text"}


# ---- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~1-2 min on 2 cores: every row trained and scored, then rerun from the saved cells
def test_smoke_ablation_end_to_end_and_rerun_skips_done_cells(ws, store):
    logs: list[str] = []
    p = A.get_preset("smoke")
    table = A.run_ablation(ws, store, p, log=logs.append)
    out = A.ablation_dir(ws, p)
    rows = {r["row"]: r for r in table["rows"]}
    assert list(rows) == list(A.ROW_NAMES)
    assert rows["base"]["pixel_steps"] == 0 and rows["lora"]["pixel_steps"] == 0
    assert all(rows[r]["pixel_steps"] == p.steps // p.pixel_every for r in A.ROW_NAMES if r.startswith("hldf"))
    for r in rows.values():
        for m in ("color_gap", "fd_domain", "kid_domain"):
            assert np.isfinite(r[m]["mean"]), (r["row"], m)
    assert table["dataset"]["n_real"] == 59 and table["dataset"]["n_generated_per_cell"] == 59
    assert {e["effect"] for e in table["effects"]} == {e[0] for e in A.EFFECTS}
    md = (out / "table.md").read_text(encoding="utf-8")
    assert "HLDF (Med-Art)" in md and "51.99" in md and "verdict" in md
    assert json.loads((out / "table.json").read_text(encoding="utf-8"))["digest"] == p.digest()
    for r in A.ROW_NAMES:
        assert (out / "samples" / f"{r}-s0.png").is_file()
    runs = sorted(x.name for x in ws.runs_dir.iterdir())
    assert len(runs) == len(A.ROW_NAMES) - 1                  # the reference row trains nothing

    t = time.perf_counter()
    again = A.run_ablation(ws, store, p, log=lambda m: None)
    assert time.perf_counter() - t < 60
    assert sorted(x.name for x in ws.runs_dir.iterdir()) == runs
    assert [r["color_gap"] for r in again["rows"]] == [r["color_gap"] for r in table["rows"]]


@pytest.mark.slow  # ~30 s on 2 cores: one cell trained and scored, then evaluated again through evaluate
def test_a_cell_is_an_evaluation_the_compare_tab_reproduces(ws, store):
    """A cell's FD/KID are an ``evaluate`` result with its profile: evaluating the cell's checkpoint again
    through ``run_evaluation`` (the Compare tab's path; its twins regenerated from the saved checkpoint) under
    the cell's profile gives the same figures, and the two results are comparable."""
    import shutil

    from medart_core import evaluate as E

    p = A.get_preset("smoke", rows=("hldf",))
    A.run_ablation(ws, store, p, log=lambda m: None)
    cell = A.read_cell(ws, p, "hldf", 0)        # the figures and their provenance (ids, profiles)
    assert not set(A.PROVENANCE_KEYS) & set(json.loads(A.cell_path(ws, p, "hldf", 0).read_text(encoding="utf-8")))
    assert cell["checkpoint"] == A.run_name(p, "hldf", 0)
    profile = cell["profiles"]["domain"]
    saved = {r.id: r for r in E.load_results(ws)}[cell["evaluations"]["domain"]]
    assert saved.profile == profile and saved.metrics["overall"]["fd"] == cell["fd_domain"]
    assert profile["checkpoint"] == cell["checkpoint"] and profile["n_generated"] == cell["n_generated"] == 59
    assert profile["extractor_dataset"] == A.SOURCE_DATASET and profile["backbone"] == "demo"

    shutil.rmtree(ws.samples_dir / "eval")          # the Compare tab's run draws its own twins
    (res,) = E.run_evaluation(ws, store, E.spec_from_profile(profile), [cell["checkpoint"]], backbone="demo")
    assert E.profile_mismatch(profile, res.profile) == []
    o = res.metrics["overall"]
    assert (o["fd"], o["fd_ci"], o["kid"], o["kid_std"]) == \
        (cell["fd_domain"], cell["fd_domain_ci"], cell["kid_domain"], cell["kid_domain_std"])
    table = E.comparison_table([saved, res])
    assert [r["comparable"] for r in table["rows"]] == [True, True]


@pytest.mark.slow
def test_ablation_runs_as_a_job(ws, store, procs, ledger):
    from test_jobs import _wait

    with pytest.raises(ConfigError, match="Unknown ablation rows"):
        ledger.submit("ablation", {"preset": "smoke", "overrides": {"rows": ["bogus"]}})
    procs.supervisor()
    job = ledger.submit("ablation", {"preset": "smoke", "overrides": {"rows": ["base", "hldf"]}})
    done = _wait(ledger, job.id, lambda j: j.is_final, timeout=400, what="ablation job", procs=procs)
    assert done.state == "done", ledger.log_tail(job.id, 40)
    p = A.get_preset("smoke", rows=("base", "hldf"))
    assert done.result["table"] == str(A.ablation_dir(ws, p) / "table.md")
    assert len(list((A.ablation_dir(ws, p) / "cells").glob("*.json"))) == 2
