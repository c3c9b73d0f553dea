"""The embedded demo backbone: it loads offline and fast, stock diffusers loads it, its manifest tells the
truth about its files, and its recipe (shortened) reproduces bit for bit."""
from __future__ import annotations

import json

import pytest
import torch

from medart_core.backbone import DEMO_DIR, load_backbone, load_tokenizer
from medart_core.constants import DEMO_LABEL
from medart_core.demo_backbone import MANIFEST, build_demo_backbone, file_hashes, sha256_file

PROMPT = "An axial CT image of the head"


def _library_image(bb, prompt: str, seed: int) -> torch.Tensor:
    from medart_core import pixart

    emb, mask = pixart.encode_text(bb, [prompt])
    lat = pixart.sample_latents(bb, emb, mask, steps=20, guidance=4.5, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pixart.decode(bb.vae, lat)


def test_demo_loads_offline_and_is_labelled(monkeypatch):
    import diffusers  # noqa: F401  (import time is not load time: tiny pays it too)
    import transformers  # noqa: F401

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Its load time is a speed goal, measured in bench/demo_backbone.py (load_s), not timed here.
    bb = load_backbone("demo")
    assert bb.label == DEMO_LABEL and not bb.is_random and bb.spec == "demo"
    assert bb.resolution == 64 and bb.latent_size == 16   # the VAE downsamples 4x (DemoArchitecture)
    assert bb.transformer.dtype == torch.float32 and not any(p.requires_grad for p in bb.transformer.parameters())
    assert load_tokenizer("demo")("an ultrasound image").input_ids == bb.tokenizer("an ultrasound image").input_ids


def test_demo_generates_a_64px_image_through_the_library():
    bb = load_backbone("demo")
    img = _library_image(bb, PROMPT, seed=0)
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()
    assert img.std() > 0.05, "a trained backbone draws structure, not a flat image"
    assert torch.equal(img, _library_image(bb, PROMPT, seed=0))


def test_stock_pipeline_loads_the_folder_and_matches_the_library():
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(str(DEMO_DIR), local_files_only=True)
    out = pipe(PROMPT, num_inference_steps=20, guidance_scale=4.5, generator=torch.Generator().manual_seed(0),
               output_type="pt", use_resolution_binning=False, clean_caption=False, height=64, width=64).images
    assert out.shape == (1, 3, 64, 64)
    ours = (_library_image(load_backbone("demo"), PROMPT, seed=0) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(out, ours, atol=2e-3), float((out - ours).abs().max())


def test_manifest_matches_the_files_and_weights_fit_5_mb():
    manifest = json.loads((DEMO_DIR / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["label"] == DEMO_LABEL
    assert manifest["recipe"].startswith("python -m medart_core demo-backbone build --out")
    assert manifest["schedule_name"] == "full" and manifest["seed"] == 0 and manifest["versions"]["torch"]
    assert manifest["training_data"]["images"] == 213 and len(manifest["training_data"]["classes"]) == 10
    licences = manifest["training_data"]["licences"]
    assert sum(p["images"] for p in licences.values()) == 213
    assert all(f["licence"] for p in licences.values() for f in p["files"].values())
    on_disk = file_hashes(DEMO_DIR)
    assert set(on_disk) == set(manifest["files"]), "every shipped file is listed, and only those"
    for rel, rec in manifest["files"].items():
        assert sha256_file(DEMO_DIR / rel) == rec["sha256"], rel
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total <= 5 * 1024 * 1024, f"{total} bytes"
    for part in ("model_index.json", "tokenizer", "text_encoder", "vae", "transformer", "scheduler"):
        assert (DEMO_DIR / part).exists(), part
    assert not list(DEMO_DIR.rglob("*.bin")), "weights are safetensors only"


@pytest.mark.slow  # two short builds: ~50 s on 2 busy cores
def test_short_recipe_runs_end_to_end_and_reproduces(tmp_path, ws):
    """Two short builds of the same recipe write identical files (the manifest differs only in timings)."""
    logs: list[str] = []
    a = build_demo_backbone(tmp_path / "a", workspace=ws, schedule="short", seed=0, log=logs.append)
    b = build_demo_backbone(tmp_path / "b", workspace=ws, schedule="short", seed=0)
    assert a["files"] == b["files"] and a["files"] == file_hashes(tmp_path / "a")
    assert a["schedule_name"] == "short" and a["recipe"].endswith("--short")
    assert any("vae step" in m for m in logs) and any("dit step" in m for m in logs)
    assert a["total_bytes"] < 5 * 1024 * 1024
    bb = load_backbone(str(tmp_path / "a"))
    assert not bb.is_random and bb.resolution == 64
    img = _library_image(bb, PROMPT, seed=0)
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


def test_seed_decides_the_initial_weights_and_the_global_rng_is_left_alone():
    from medart_core.demo_backbone import DemoArchitecture, build_components

    torch.manual_seed(5)
    before = torch.rand(2)
    torch.manual_seed(5)
    a, b = build_components(DemoArchitecture(), 0), build_components(DemoArchitecture(), 1)
    assert torch.equal(torch.rand(2), before)
    pa, pb = a.transformer.state_dict(), b.transformer.state_dict()
    assert any(not torch.equal(pa[k], pb[k]) for k in pa)
    again = build_components(DemoArchitecture(), 0).transformer.state_dict()
    assert all(torch.equal(pa[k], again[k]) for k in pa)


def test_out_dir_that_is_not_a_demo_build_is_refused(tmp_path, ws):
    from medart_core.errors import ConfigError

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a demo backbone folder"):
        build_demo_backbone(tmp_path / "x", workspace=ws, schedule="short")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
