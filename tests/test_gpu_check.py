"""bench/gpu_check: the one-GPU HLDF check, proven on CPU with the tiny sizes (same code path as XL/cuda)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SHELL = ROOT / "bench" / "gpu_check.sh"
FAST_TINY = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--repeats", "0", "--latent-iters", "1",
             "--latent-batches", "1", "--dtype", "fp32", "--threads", "1"]
TOP_KEYS = {"size", "device", "device_name", "torch", "diffusers", "transformers", "peft", "dtype", "steps",
            "guidance", "truncated_k", "lora_rank", "memory_metric", "params", "build_s", "save_s", "pixel_step",
            "latent_step", "generation", "goals", "wall_s"}


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gc_mod():
    return _load()


def test_goal_verdicts_follow_the_figures(gc_mod):
    limits = {"full": 80.0, "truncated": 24.0}
    g = gc_mod.goals({"full": {"status": "ok", "peak_gb": 79.9}, "truncated": {"status": "ok", "peak_gb": 24.0}},
                     limits)
    assert g["full_peak_lt_80gb"]["verdict"] == "PASS"
    assert g["truncated_peak_lt_24gb"]["verdict"] == "FAIL"  # strictly below the limit
    g = gc_mod.goals({"full": {"status": "OOM", "peak_gb": None}}, limits)
    assert g["full_peak_lt_80gb"]["verdict"] == "FAIL"
    assert g["truncated_peak_lt_24gb"]["verdict"] == "NOT MEASURED"  # missing: no figure to judge
    g = gc_mod.goals({"full": {"status": "error: RuntimeError: x", "peak_gb": None},
                      "truncated": {"status": "ok", "peak_gb": 3.0}}, {"full": 80.0, "truncated": 2.5})
    assert g["full_peak_lt_80gb"]["verdict"] == "NOT MEASURED"
    assert g["truncated_peak_lt_2.5gb"] == {"verdict": "FAIL", "peak_gb": 3.0, "limit_gb": 2.5, "status": "ok"}


def test_measure_reports_oom_instead_of_raising(gc_mod):
    import torch

    calls = []

    def boom():
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    r = gc_mod.measure("x", boom, runs=3, device="cpu", log=lambda s: None)
    assert r["status"] == "OOM" and r["time_s"] is None and r["peak_gb"] is None
    assert len(calls) == 1  # no retries after an OOM
    r = gc_mod.measure("y", lambda: (_ for _ in ()).throw(ValueError("bad")), runs=1, device="cpu",
                       log=lambda s: None)
    assert r["status"].startswith("error: ValueError")
    r = gc_mod.measure("z", lambda: {"k": 1.0}, runs=3, device="cpu", log=lambda s: None)
    assert r["status"] == "ok" and len(r["times_s"]) == 3 and r["k"] == [1.0, 1.0, 1.0]
    assert r["time_s"] == min(r["times_s"][1:])  # the first run is the warm-up
    assert r["peak_gb"] > 0


@pytest.mark.slow  # ~8 s of diffusers/transformers imports, more on a busy machine
def test_dry_run_xl_has_the_paper_sizes(gc_mod, capsys):
    plan = gc_mod.dry_run(gc_mod.parse_args(["--size", "xl", "--dry-run"]))
    p = plan["params"]
    assert 0.55e9 < p["dit"] < 0.65e9  # PixArt-XL-2: ~0.6 B
    assert 4.6e9 < p["t5"] < 4.9e9  # T5 v1.1 XXL encoder: ~4.7 B
    assert 80e6 < p["vae"] < 90e6  # the SD VAE (encoder + decoder)
    assert plan["latent_size"] == 64 and plan["dit_tokens_per_image"] == 1024
    # rank-8 LoRA on every targeted layer: DiT and T5 (wi -> the gated wi_0/wi_1 of T5 v1.1)
    assert plan["lora_targets"]["t5"]["wi"] == ["wi_0", "wi_1"]
    assert 1e6 < p["lora_dit"] < 2e7 and 1e6 < p["lora_t5"] < 5e7
    assert plan["weights_gb"]["t5"] == pytest.approx(p["t5"] * 2 / 1e9)  # bf16
    assert plan["resident_gb"] < 24  # weights alone leave room for the truncated goal
    out = capsys.readouterr().out
    assert "T5" in out and "goals: full peak < 80 GB, truncated peak < 24 GB" in out


@pytest.mark.slow
def test_dry_run_cli_prints_json_last(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--dry-run"], check=False,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["size"] == "tiny" and plan["params"]["dit"] < 1e6


@pytest.mark.slow
def test_cpu_tiny_through_the_shell_entry_point(tmp_path):
    """bench/gpu_check.sh end to end on CPU: a fake nvidia-smi lets it past the GPU check, the extra
    arguments switch the run to tiny/cpu; log, JSON file and the last stdout line must agree."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "nvidia-smi").write_text("#!/bin/sh\necho 'name, memory.total [MiB]'\necho 'Fake GPU, 81559 MiB'\n")
    (shim / "nvidia-smi").chmod(0o755)
    out_dir, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "OUT": str(out_dir), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SHELL), *FAST_TINY, "--tmp-dir", str(work)], check=False,
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "== gpu_check exit code 0" in proc.stderr
    s = json.loads(lines[-1])  # stdout ends with the JSON object
    assert TOP_KEYS <= set(s)
    assert s["size"] == "tiny" and s["device"] == "cpu" and s["steps"] == 2
    px = s["pixel_step"]
    for v in ("ref", "full", "truncated"):
        assert px[v]["status"] == "ok" and px[v]["time_s"] > 0 and px[v]["peak_gb"] > 0, v
    # The reference and ours compute the same loss and (fp32) the same LoRA gradients.
    assert px["ref"]["loss"][0] == pytest.approx(px["full"]["loss"][0], rel=1e-4)
    assert px["grad_cosine_full_vs_ref"] > 0.999
    assert px["ref"]["reloaded_parts"] == ["transformer", "vae"] and px["ref"]["reload_time_s"] > 0
    assert s["t5_reload_s"] > 0
    lat = s["latent_step"]
    assert lat["ref_b1"]["images_per_s"] > 0 and lat["ours_cached_b1"]["images_per_s"] > 0
    assert lat["speedup_b1"] == pytest.approx(lat["ours_cached_b1"]["images_per_s"] / lat["ref_b1"]["images_per_s"])
    gen = s["generation"]
    assert gen["ours"]["s_per_image"] > 0 and gen["pipeline"]["s_per_image"] > 0
    assert gen["max_abs_diff_ours_vs_pipeline"] < 1e-3  # our sampler reproduces the stock pipeline
    for key, variant, limit in (("full_peak_lt_80gb", "full", 80.0), ("truncated_peak_lt_24gb", "truncated", 24.0)):
        g = s["goals"][key]
        assert g["peak_gb"] == px[variant]["peak_gb"] and g["limit_gb"] == limit
        assert g["verdict"] == ("PASS" if px[variant]["peak_gb"] < limit else "FAIL")
    assert f"GOAL full_peak_lt_80gb: {s['goals']['full_peak_lt_80gb']['verdict']}" in proc.stdout
    saved = json.loads((out_dir / "gpu_check.json").read_text())
    assert saved["pixel_step"]["full"]["peak_gb"] == px["full"]["peak_gb"]
    assert lines[-1] in (out_dir / "gpu_check.log").read_text()
    assert list(work.iterdir()) == []  # the reload folder is removed


@pytest.mark.slow
def test_oom_and_limits_turn_goals_to_fail(gc_mod, tmp_path, capsys):
    rc = gc_mod.main([*FAST_TINY, "--tmp-dir", str(tmp_path), "--simulate-oom", "full,latent_ref",
                      "--goal-truncated-gb", "1e-6", "--t5-reload", "skip"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    px = s["pixel_step"]
    assert px["full"]["status"] == "OOM" and px["ref"]["status"] == "ok" and px["truncated"]["status"] == "ok"
    assert s["goals"]["full_peak_lt_80gb"]["verdict"] == "FAIL"
    assert s["goals"]["truncated_peak_lt_1e-06gb"]["verdict"] == "FAIL"  # a real peak above a tiny limit
    assert s["latent_step"]["ref_b1"]["status"] == "OOM" and "speedup_b1" not in s["latent_step"]
    assert "grad_cosine_full_vs_ref" not in px and "t5_reload_s" not in s
    assert list(tmp_path.iterdir()) == []


def test_failed_setup_still_ends_with_json(gc_mod, tmp_path, capsys):
    rc = gc_mod.main([*FAST_TINY, "--tmp-dir", str(tmp_path / "missing" / "dir")])
    assert rc == 1
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "setup" in s["errors"] and "pixel_step" not in s
    assert {g["verdict"] for g in s["goals"].values()} == {"NOT MEASURED"}


def test_sh_refuses_without_nvidia_smi(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    proc = subprocess.run(["bash", str(SHELL)], check=False, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 3 and "nvidia-smi not found" in proc.stderr
