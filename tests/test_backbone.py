"""The tiny offline backbone: deterministic, PixArt-shaped, loadable by stock diffusers; clear missing-weights errors."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from medart_core.backbone import (MAX_TOKENS, RANDOM_LABEL, count_tokens, load_backbone, load_tokenizer,
                                  save_backbone)
from medart_core.errors import MissingWeightsError

PROMPT = "An endoscopic image of polyps, showing a red oval area with a smooth surface."


def _generate(pipe, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = pipe(PROMPT, num_inference_steps=20, guidance_scale=4.5, generator=g, output_type="pt",
               use_resolution_binning=False, height=64, width=64)
    return out.images


def test_tiny_is_pixart_shaped_and_labelled():
    bb = load_backbone("tiny")
    assert bb.is_random and RANDOM_LABEL in bb.label
    assert bb.transformer.config.out_channels == 8 and bb.transformer.config.in_channels == 4
    assert bb.vae_scale_factor == 8 and bb.latent_size * 8 == bb.resolution == 64
    assert bb.vae.config.scaling_factor == pytest.approx(0.18215)
    assert bb.transformer.config.caption_channels == bb.text_encoder.config.d_model
    sc = bb.scheduler.config
    assert (sc.algorithm_type, sc.solver_order, sc.beta_schedule, sc.prediction_type) == (
        "dpmsolver++", 2, "linear", "epsilon")
    assert not any(p.requires_grad for p in bb.transformer.parameters())


def test_tiny_weights_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_backbone("tiny")
    after = torch.rand(3)
    assert torch.equal(before, after), "building the backbone must not consume the caller's RNG"
    b = load_backbone("tiny")
    for (na, pa), (nb, pb) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_save_reload_and_20_step_generation_is_reproducible(tmp_path):
    from diffusers import PixArtAlphaPipeline

    bb = load_backbone("tiny")
    img1 = _generate(bb.pipeline(), seed=7)
    img2 = _generate(bb.pipeline(), seed=7)
    assert torch.equal(img1, img2)
    assert img1.std() > 0.01, "generation must not be constant"
    assert not torch.equal(img1, _generate(bb.pipeline(), seed=8))

    folder = save_backbone(bb, tmp_path / "tiny")
    assert (folder / "model_index.json").is_file()
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    stock = PixArtAlphaPipeline.from_pretrained(str(folder), local_files_only=True)
    assert torch.allclose(_generate(stock, seed=7), img1, atol=1e-6)
    again = load_backbone(str(folder))
    assert again.is_random, "a saved random backbone keeps its label"


def test_token_counting_uses_t5_conventions():
    tok = load_tokenizer("tiny")
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    n = count_tokens(tok, PROMPT)
    assert n == len(tok(PROMPT).input_ids) and tok(PROMPT).input_ids[-1] == tok.eos_token_id
    long = " ".join([PROMPT] * 20)
    assert count_tokens(tok, long) > MAX_TOKENS
    enc = tok(long, padding="max_length", max_length=MAX_TOKENS, truncation=True)
    assert len(enc.input_ids) == MAX_TOKENS


def test_unknown_hub_id_offline_raises_missing_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(MissingWeightsError) as e:
        load_backbone("nobody-here/not-a-real-model")
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "tiny" in msg and "local folder" in msg


def test_default_hub_id_without_network_does_not_hang():
    # A fresh interpreter without HF_HUB_OFFLINE: the reachability probe must make it fail fast, not retry.
    code = ("from medart_core.backbone import load_backbone\n"
            "from medart_core.errors import MissingWeightsError\n"
            "try:\n    load_backbone('PixArt-alpha/PixArt-XL-2-512x512')\n"
            "except MissingWeightsError as e:\n    print('MISSING', e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a closed port on this machine: never the real Hub
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "MISSING" in out.stdout, out.stderr[-2000:]


def test_folder_without_model_index_is_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="model_index.json"):
        load_backbone(str(tmp_path))
    with pytest.raises(MissingWeightsError, match="neither"):
        load_backbone("not a spec at all")
