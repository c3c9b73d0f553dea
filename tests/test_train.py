"""The HLDF training run: config/presets, data sources, the CLI end to end, guard rails, atomic
checkpoints and exports that stock diffusers/peft load."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from training_data import REPO, make_dataset, subprocess_env, tiny_train_config

from medart_core.errors import ConfigError, TrainingDivergedError

# Tiny models: threads only add contention on a shared 2-core machine (and 10-30x slowdowns).
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- config -------------------------------------------------------------------------------------------
def test_config_round_trip_presets_and_validation():
    from medart_core.presets import list_presets
    from medart_core.train import TrainConfig

    assert {"paper", "small-gpu", "cpu-smoke"} <= set(list_presets())
    for name in ("paper", "small-gpu", "cpu-smoke"):
        cfg = TrainConfig.from_preset(name)
        assert TrainConfig.from_json(cfg.to_json()) == cfg
        from medart_core.hldf import HLDFConfig
        from medart_core.lora import LoRAConfig

        assert isinstance(cfg.lora, LoRAConfig) and isinstance(cfg.hldf, HLDFConfig)  # typed sections
    paper = TrainConfig.from_preset("paper")
    h, lo = paper.hldf, paper.lora
    assert (paper.backbone, paper.resolution, paper.lr, paper.batch_size, paper.epochs, paper.seed) == \
        ("PixArt-alpha/PixArt-XL-2-512x512", 512, 1e-4, 1, 15, 42)
    assert (h.pixel_every, h.sample_steps, h.guidance, h.grad_path) == (500, 20, 4.5, "full")
    assert (lo.rank, lo.t5_enabled) == (8, True)
    small = TrainConfig.from_preset("small-gpu")
    assert small.cache_features and not small.lora.t5_enabled
    assert small.hldf.grad_path == "truncated"
    smoke = TrainConfig.from_preset("cpu-smoke")
    assert (smoke.backbone, smoke.resolution) == ("tiny", 64) and smoke.max_steps <= 60
    assert smoke.hldf.pixel_every <= 10
    with pytest.raises(ConfigError, match="Unknown training config keys"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainConfig.from_dict({"mixed_precision": "fp16"})
    with pytest.raises(ConfigError, match="Unknown training preset"):
        TrainConfig.from_preset("nope")


# ---- data ---------------------------------------------------------------------------------------------
def test_approved_by_default_latest_on_request_and_overlong_counted(ws, store):
    from medart_core.examples import collect_examples
    from medart_core.train import train

    ids = make_dataset(ws, store, n=6)
    with pytest.raises(ConfigError, match="--captions latest"):
        collect_examples(ws, store, tiny_train_config(captions="approved"))
    long_text = " ".join(f"word{i}" for i in range(200))
    store.edit(ids[0], long_text, reviewer="r", expected_version=store.current(ids[0]).version)
    for i in ids[:4]:
        store.approve(i, reviewer="r", expected_version=store.current(i).version)

    approved, _ = collect_examples(ws, store, tiny_train_config(captions="approved"))
    latest, _ = collect_examples(ws, store, tiny_train_config(captions="latest"))
    assert sorted(e.key for e in approved) == sorted(f"img-{i}" for i in ids[:4])
    assert sorted(e.key for e in latest) == sorted(f"img-{i}" for i in ids)
    assert next(e for e in approved if e.key == f"img-{ids[0]}").text == long_text

    msgs: list[str] = []
    res = train(tiny_train_config(captions="approved", max_steps=1, val_images=0, optimizer="adamw8bit"), ws, store,
                run_name="appr", log=msgs.append)
    assert any("adamw8bit" in m and "AdamW" in m for m in msgs)       # CPU: falls back, and says so
    assert any("longer than 120 T5 tokens" in m for m in msgs)
    state = json.loads((res.last_checkpoint / "state.json").read_text())
    prov = state["provenance"]
    assert prov["n_train_images"] == 4 and prov["captions_source"] == "approved" and prov["optimizer"] == "adamw"
    assert prov["over_long_captions"]["count"] == 1 == res.over_long_captions
    assert len(prov["captions_sha256"]) == 64 and prov["backbone"] == "tiny"
    assert "torch" in prov["packages"]


def test_exported_imagefolder_as_caption_source(ws, store, tmp_path):
    from medart_core.examples import collect_examples
    from medart_core.interchange import export_imagefolder

    ids = make_dataset(ws, store, n=6)
    for i in ids[:5]:
        store.approve(i, reviewer="r", expected_version=store.current(i).version)
    export_imagefolder(store, ws, "mini", tmp_path / "exp", val_fraction=0.2, seed=0)
    pool, val = collect_examples(ws, store, tiny_train_config(captions=str(tmp_path / "exp")))
    assert len(pool) + len(val) == 5 and len(val) >= 1
    assert all(e.path.is_file() and e.text.startswith("An image of class") for e in pool + val)
    with pytest.raises(ConfigError):
        collect_examples(ws, store, tiny_train_config(captions=str(tmp_path / "missing")))


def test_preprocessing_shorter_side_seeded_random_crop_range(tmp_path):
    import torch

    from medart_core.examples import epoch_order, load_pixels

    arr = np.zeros((40, 100, 3), np.uint8)
    arr[:, :, 0] = np.linspace(0, 255, 100, dtype=np.uint8)[None, :]
    p = tmp_path / "wide.png"
    Image.fromarray(arr).save(p)
    a = load_pixels(p, 32, crop="random", generator=torch.Generator().manual_seed(1))
    b = load_pixels(p, 32, crop="random", generator=torch.Generator().manual_seed(1))
    c = load_pixels(p, 32, crop="center")
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert -1.0 <= float(a.min()) and float(a.max()) <= 1.0
    offsets = {float(load_pixels(p, 32, generator=torch.Generator().manual_seed(s))[0, 0, 0]) for s in range(8)}
    assert len(offsets) > 1 and c.shape == (3, 32, 32)
    assert epoch_order(10, 42, 0) == epoch_order(10, 42, 0) != epoch_order(10, 42, 1)
    assert sorted(epoch_order(10, 42, 3)) == list(range(10))


# ---- CLI end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_cpu_smoke_preset_through_cli_on_sample_dataset(ws, store, tmp_path):
    from medart_core.data import build_sample_dataset

    build_sample_dataset(ws, store, "sample")
    r = subprocess.run([sys.executable, "-m", "medart_core", "train", "--workspace", str(ws.root), "--dataset",
                        "sample", "--preset", "cpu-smoke", "--captions", "latest", "--run", "smoke"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == "finished" and out["step"] == 30
    run = ws.run_dir("smoke")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss_latent" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("epoch", "loss_latent", "lr", "images_per_s", "peak_mem_mb"):
        assert all(key in r for r in steps), key
    assert [r["step"] for r in steps if "loss_color" in r] == [10, 20, 30]
    assert all(np.isfinite(r["loss"]) for r in steps)
    vals = [r for r in rows if "val_loss" in r]
    assert [v["step"] for v in vals] == [15, 30] and all(np.isfinite(v["val_loss"]) for v in vals)
    grid = run / "validation" / "step_000030.png"
    assert grid.is_file() and Image.open(grid).size[0] >= 128
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000030"
    assert (run / "export" / "adapters" / "transformer" / "adapter_model.safetensors").is_file()
    assert (run / "export" / "merged" / "model_index.json").is_file()
    assert "random-weight demo backbone" in (run / "export" / "README.md").read_text().lower()
    assert json.loads((run / "status.json").read_text())["status"] == "finished"

    # export-model from an earlier checkpoint, through the CLI.
    r = subprocess.run([sys.executable, "-m", "medart_core", "export-model", "--workspace", str(ws.root), "--run",
                        "smoke", "--step", "20", "--out", str(tmp_path / "exp20"), "--adapters-only"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "exp20" / "adapters" / "text_encoder" / "adapter_config.json").is_file()


def test_validation_grid_labels_random_backbone():
    from medart_core.constants import RANDOM_LABEL
    from medart_core.validation import render_grid

    tile = Image.new("RGB", (32, 32), (10, 200, 30))
    labelled = render_grid([[tile]], title="t", row_labels=["p"], is_random=True)
    plain = render_grid([[tile]], title="t", row_labels=["p"], is_random=False)
    red = np.asarray(labelled)[..., 0].astype(int) - np.asarray(labelled)[..., 1].astype(int)
    assert RANDOM_LABEL == "random-weight demo backbone"
    assert (red > 100).sum() > 20          # the red label was drawn
    assert labelled.size[1] > plain.size[1]


# ---- guard rails ----------------------------------------------------------------------------------------
def test_nan_loss_stops_with_diverged_error_and_keeps_last_checkpoint(ws, store, monkeypatch):
    import torch

    from medart_core import hldf
    from medart_core.checkpoint import latest_checkpoint, read_checkpoint
    from medart_core.train import train

    make_dataset(ws, store, n=6)
    real = hldf.hybrid_loss

    def nan_at_3(step, backbone, batch, cfg, **kw):
        loss, logs = real(step, backbone, batch, cfg, **kw)
        return (loss * float("nan"), logs) if step == 3 else (loss, logs)

    monkeypatch.setattr(hldf, "hybrid_loss", nan_at_3)
    with pytest.raises(TrainingDivergedError) as ei:
        train(tiny_train_config(max_steps=6, checkpoint_every=2), ws, store, run_name="nan")
    msg = str(ei.value)
    assert "step 4" in msg and "learning rate" in msg and "step_000002" in msg
    run = ws.run_dir("nan")
    ck = latest_checkpoint(run)
    assert ck.name == "step_000002"
    state, tensors = read_checkpoint(ck)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in tensors["adapters"].values())
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "diverged" and "step 4" in status["error"]


def test_flat_validation_image_stops_the_run(ws, store, monkeypatch):
    import torch

    from medart_core import pixart
    from medart_core.train import train

    make_dataset(ws, store, n=6)
    monkeypatch.setattr(pixart, "decode", lambda vae, lat, **kw: torch.zeros(lat.shape[0], 3, 32, 32))
    with pytest.raises(TrainingDivergedError, match="flat colour"):
        train(tiny_train_config(max_steps=3, validate_every=2), ws, store, run_name="flat")


# ---- atomic checkpoints -----------------------------------------------------------------------------------
def test_crash_mid_checkpoint_write_leaves_previous_checkpoint_valid(ws, store, monkeypatch):
    import safetensors.torch as st

    from medart_core.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
    from medart_core.train import train

    make_dataset(ws, store, n=6)
    res = train(tiny_train_config(max_steps=2, checkpoint_every=2), ws, store, run_name="crash")
    run = res.run_dir
    assert latest_checkpoint(run).name == "step_000002"

    # 1) a leftover half-written folder from a process killed mid-write is ignored ...
    tmp = run / "checkpoints" / "step_000004.tmp-999999"
    tmp.mkdir()
    (tmp / "adapters.safetensors").write_bytes(b"\x00" * 10)
    # ... and so is a folder whose files do not match its state.json (truncated after the fact)
    bad = run / "checkpoints" / "step_000003"
    bad.mkdir()
    (bad / "state.json").write_text(json.dumps({"files": {"adapters.safetensors": 999}, "step": 3}))
    (bad / "adapters.safetensors").write_bytes(b"\x00" * 5)
    assert latest_checkpoint(run).name == "step_000002"
    assert [p.name for p in list_checkpoints(run)] == ["step_000002"]
    read_checkpoint(latest_checkpoint(run))

    # 2) a crash inside the writer (after the first file) keeps the pointer on the previous checkpoint.
    real_save = st.save_file
    calls = {"n": 0}

    def dying_save(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", dying_save)
    with pytest.raises(OSError, match="simulated"):
        train(tiny_train_config(max_steps=4, checkpoint_every=2), ws, store, resume="crash")
    monkeypatch.setattr(st, "save_file", real_save)
    assert latest_checkpoint(run).name == "step_000002"
    state, _ = read_checkpoint(latest_checkpoint(run))
    assert state["step"] == 2

    # 3) resuming cleans the leftovers and continues from step 2 to the end.
    res = train(tiny_train_config(max_steps=4, checkpoint_every=2), ws, store, resume="crash")
    assert res.step == 4 and latest_checkpoint(run).name == "step_000004"
    assert not list((run / "checkpoints").glob("*.tmp-*"))


def test_resume_refuses_a_changed_config(ws, store):
    from medart_core.train import train

    make_dataset(ws, store, n=6)
    train(tiny_train_config(max_steps=2), ws, store, run_name="r1")
    with pytest.raises(ConfigError, match="lr"):
        train(tiny_train_config(max_steps=2, lr=1e-3), ws, store, resume="r1")
    with pytest.raises(ConfigError, match="already exists"):
        train(tiny_train_config(max_steps=2), ws, store, run_name="r1")


# ---- callbacks ------------------------------------------------------------------------------------------
def test_callbacks_follow_and_stop_the_run(ws, store):
    from medart_core.checkpoint import latest_checkpoint
    from medart_core.train import TrainCallbacks, train

    make_dataset(ws, store, n=6)

    class Rec(TrainCallbacks):
        def __init__(self):
            self.steps, self.grids, self.cks = [], [], []

        def on_step(self, m):
            self.steps.append(m["step"])

        def on_validation(self, p):
            self.grids.append(p)

        def on_checkpoint(self, p):
            self.cks.append(p)

        def should_stop(self):
            return len(self.steps) >= 3

    rec = Rec()
    res = train(tiny_train_config(max_steps=10, checkpoint_every=2, validate_every=2), ws, store, run_name="cb",
                callbacks=rec)
    assert res.status == "stopped" and res.step == 3 and rec.steps == [1, 2, 3]
    assert [p.name for p in rec.grids] == ["step_000002.png"] and rec.grids[0].is_file()
    assert [p.name for p in rec.cks] == ["step_000002", "step_000003"]
    assert latest_checkpoint(res.run_dir).name == "step_000003"


# ---- exports ---------------------------------------------------------------------------------------------
def test_exports_load_with_stock_diffusers_and_peft(ws, store, tmp_path):
    import torch
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
    from peft import PeftModel

    from medart_core.backbone import load_backbone
    from medart_core.export import export_model
    from medart_core.train import train

    make_dataset(ws, store, n=6)
    res = train(tiny_train_config(max_steps=2, lr=1e-2), ws, store, run_name="exp")
    out = export_model(ws, "exp", tmp_path / "out")
    merged_dir, adapters_dir = Path(out["merged"]), Path(out["adapters"])
    assert (merged_dir / "README.md").is_file() and (adapters_dir / "README.md").is_file()

    pipe = PixArtAlphaPipeline.from_pretrained(str(merged_dir))
    img = pipe("an image of class 1", num_inference_steps=2, height=32, width=32, output_type="np",
               clean_caption=False, use_resolution_binning=False, generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()

    # PEFT adapters on a fresh base == the merged transformer == the live trained one.
    base = load_backbone("tiny")
    peft_dit = PeftModel.from_pretrained(base.transformer, str(adapters_dir / "transformer")).eval()
    merged_dit = PixArtTransformer2DModel.from_pretrained(str(merged_dir / "transformer")).eval()
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    emb = torch.randn(1, 8, base.text_encoder.config.d_model, generator=torch.Generator().manual_seed(2))
    kw = dict(encoder_hidden_states=emb, encoder_attention_mask=torch.ones(1, 8, dtype=torch.long),
              timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
              return_dict=False)
    with torch.no_grad():
        a, b = peft_dit(x, **kw)[0], merged_dit(x, **kw)[0]
        res.backbone.transformer.eval()
        c = res.backbone.transformer(x, **kw)[0]
        plain = load_backbone("tiny").transformer(x, **kw)[0]
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    assert not torch.allclose(a, plain, atol=1e-5)   # the adapters changed the model
