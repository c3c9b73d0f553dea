"""Precision as a setting (fp32 | bf16 | auto, resolved by one function) and activation checkpointing only
when memory needs it: the resolution rules with injected hardware facts, the float32 solver under bf16,
training and generation in bf16 against fp32 within stated tolerances, and what runs record."""
from __future__ import annotations

import json

import pytest
from training_data import make_dataset

from medart_core.errors import ConfigError
from medart_core.precision import (autocast, cpu_bf16_support, cpu_flags, from_mixed_precision, of_dtype,
                                   resolve_precision, validate_precision)

BF16_CPU = frozenset({"fpu", "avx512f", "avx512_bf16"})
AMX_CPU = frozenset({"fpu", "amx_bf16", "amx_tile"})
PLAIN_CPU = frozenset({"fpu", "avx2", "avx512f"})

# bf16 training against fp32 on the same steps: per-step losses agree to this relative tolerance (measured:
# ≤ 0.3 % on the tiny backbone; bf16 keeps 8 mantissa bits, the LoRA weights and the losses stay fp32).
LOSS_RTOL = 0.02


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- resolution -------------------------------------------------------------------------------------------
def test_auto_is_bf16_only_where_the_device_runs_it_fast():
    assert resolve_precision("auto", "cpu", cpu_flags_override=BF16_CPU)[0] == "bf16"
    assert resolve_precision("auto", "cpu", cpu_flags_override=AMX_CPU)[0] == "bf16"
    name, why = resolve_precision("auto", "cpu", cpu_flags_override=PLAIN_CPU)
    assert name == "fp32" and "neither AVX512-BF16 nor AMX-BF16" in why
    assert resolve_precision("auto", "cpu", cpu_flags_override=frozenset())[0] == "fp32"   # flags unreadable
    assert resolve_precision("auto", "cuda", cuda_bf16=True)[0] == "bf16"
    assert resolve_precision("auto", "cuda", cuda_bf16=False)[0] == "fp32"
    assert resolve_precision("auto", "mps")[0] == "fp32"


def test_explicit_choices_and_the_device_default():
    assert resolve_precision("fp32", "cuda", cuda_bf16=True) == ("fp32", "fp32 as asked")
    name, why = resolve_precision("bf16", "cpu", cpu_flags_override=PLAIN_CPU)
    assert name == "bf16" and "slower" in why                   # honoured, with the reason it may be slow
    # None: what every version before precision was a setting did (bf16 on a GPU, fp32 on a CPU).
    assert resolve_precision(None, "cuda", cuda_bf16=True)[0] == "bf16"
    assert resolve_precision(None, "cpu", cpu_flags_override=BF16_CPU)[0] == "fp32"
    with pytest.raises(ConfigError, match="fp16 overflows"):
        validate_precision("fp16")
    with pytest.raises(ConfigError):
        resolve_precision("half", "cpu")


def test_cpu_flags_are_read_from_cpuinfo_not_the_model_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some Xeon with bf16 in its name\n"
                    "flags\t\t: fpu sse avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu avx512_bf16\n")
    flags = cpu_flags(str(info))
    assert "avx512f" in flags and "avx512_bf16" not in flags     # the first processor's line only
    assert cpu_bf16_support(flags)[0] is False
    assert cpu_bf16_support(BF16_CPU) == (True, "the CPU has AVX512-BF16")


def test_autocast_context_and_legacy_names():
    import torch

    with autocast("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
        assert y.dtype == torch.bfloat16
    assert [from_mixed_precision(v) for v in ("no", "auto", "bf16")] == ["fp32", None, None]
    assert of_dtype(torch.bfloat16) == "bf16" and of_dtype("float32") == "fp32"


def test_old_configs_with_mixed_precision_still_load():
    from medart_core.train import TrainConfig

    assert TrainConfig.from_dict({"mixed_precision": "no"}).precision == "fp32"
    assert TrainConfig.from_dict({"mixed_precision": "auto"}).precision is None
    assert TrainConfig.from_dict({"precision": "auto"}).precision == "auto"
    cfg = TrainConfig.from_preset("paper")
    assert (cfg.precision, cfg.hldf.checkpointing) == ("auto", "auto")
    assert TrainConfig.from_json(cfg.to_json()) == cfg


# ---- checkpointing only when memory needs it --------------------------------------------------------------
def test_checkpointing_auto_decides_from_the_memory_budget():
    from medart_core.estimate import GiB, choose_checkpointing, cpu_device
    from medart_core.hldf import HLDFConfig
    from medart_core.train import TrainConfig

    assert HLDFConfig(checkpointing=True).checkpointing == "on"          # older configs' booleans
    assert HLDFConfig(checkpointing=False).checkpointing == "off"
    assert HLDFConfig().checkpointing == "auto" and HLDFConfig().use_checkpointing   # unresolved: safe side
    with pytest.raises(ConfigError, match="checkpointing"):
        HLDFConfig(checkpointing="sometimes")

    cfg = TrainConfig.from_dict({"backbone": "small", "resolution": 128, "batch_size": 1,
                                 "hldf": {"sample_steps": 20, "checkpointing": "auto"}})
    dev = cpu_device(2, 64 * GiB)
    roomy = choose_checkpointing(cfg, dev, budget_bytes=32 * GiB)
    tight = choose_checkpointing(cfg, dev, budget_bytes=0.5 * GiB)
    assert roomy.checkpointing is False and "checkpointing is off" in roomy.reason
    assert tight.checkpointing is True and "checkpointing is on" in tight.reason
    assert roomy.need_bytes == tight.need_bytes and 0.5 * GiB < roomy.need_bytes < 32 * 0.75 * GiB
    assert roomy.to_dict()["checkpointing"] == "off" and tight.to_dict()["budget_gib"] == 0.5
    for mode, on in (("on", True), ("off", False)):
        explicit = TrainConfig.from_dict({"hldf": {"checkpointing": mode}})
        assert choose_checkpointing(explicit, dev, budget_bytes=1.0).checkpointing is on   # budget not asked


# ---- the solver stays float32 -----------------------------------------------------------------------------
def test_bf16_backbone_samples_with_a_float32_solver_state():
    import torch

    from medart_core.backbone import load_backbone
    from medart_core.pixart import decode, encode_text, sample_latents

    bb = load_backbone("tiny", torch_dtype=torch.bfloat16)
    seen = []
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        emb, mask = encode_text(bb, ["a prompt"])
        lat = sample_latents(bb, emb, mask, steps=3, generator=torch.Generator().manual_seed(0),
                             callback=lambda i, n, x: seen.append(x.dtype))
        img = decode(bb.vae, lat)
    assert emb.dtype == torch.bfloat16 and lat.dtype == torch.float32 and img.dtype == torch.float32
    assert seen == [torch.float32] * 3


# ---- training: bf16 against fp32 on a cpu-smoke run -------------------------------------------------------
def _losses(path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss_latent" in r]


def test_bf16_training_tracks_fp32_on_a_cpu_smoke_run(ws, store):
    from medart_core.train import TrainConfig, train

    make_dataset(ws, store)
    base = dict(dataset="mini", captions="latest", max_steps=10, checkpoint_every=10, validate_every=100,
                validation_steps=2, validation_seeds=[0], val_images=2, export_merged=False,
                hldf={"checkpointing": "auto"})
    runs = {}
    for prec in ("fp32", "bf16"):
        res = train(TrainConfig.from_preset("cpu-smoke", precision=prec, **base), ws, store, run_name=prec)
        runs[prec] = res
    a, b = _losses(runs["fp32"].metrics_path), _losses(runs["bf16"].metrics_path)
    assert len(a) == len(b) == 10
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= LOSS_RTOL * abs(x) + 1e-4, f"step {step}: fp32 {x} vs bf16 {y}"
    assert a != b, "bf16 really ran (the losses are not bitwise the fp32 ones)"
    state = json.loads((runs["bf16"].last_checkpoint / "state.json").read_text())
    prov = state["provenance"]
    assert (prov["precision"], prov["precision_requested"]) == ("bf16", "bf16")
    assert prov["checkpointing"]["requested"] == "auto" and prov["checkpointing"]["checkpointing"] == "off"
    assert "un-checkpointed peak" in prov["checkpointing"]["reason"]
    assert state["config"]["hldf"]["checkpointing"] == "auto"      # the config keeps what was asked


# ---- generation -------------------------------------------------------------------------------------------
def test_bf16_generation_is_recorded_and_regenerates_byte_equal(ws):
    import numpy as np
    from PIL import Image

    from medart_core.generate import GenerationRequest, Generator, get_generator, regenerate

    req = GenerationRequest(prompts=["An axial CT image of the head"], seed=3, n=2, steps=3)
    g32, g16 = Generator(ws, "tiny", precision="fp32"), Generator(ws, "tiny", precision="bf16")
    im32, im16 = g32.generate(req), g16.generate(req)
    assert im16[0].settings["precision"] == "bf16" and im32[0].settings["precision"] == "fp32"
    assert im16[0].settings["dtype"] == "bfloat16"
    a = np.asarray(Image.open(im32[0].path), dtype=np.int16)
    b = np.asarray(Image.open(im16[0].path), dtype=np.int16)
    assert a.shape == b.shape
    again = regenerate(im16[1].sidecar, ws=ws)                  # picks the bf16 generator from the sidecar
    assert again.settings["matches_original"] is True
    assert get_generator(ws, "tiny", "bf16").precision == "bf16"
    with pytest.raises(ConfigError, match="made in bf16"):
        g32.regenerate(im16[0].sidecar)
