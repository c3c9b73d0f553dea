"""Exact resume: a real training subprocess killed with SIGKILL at a random step, resumed, killed again and
resumed to the end, finishes with adapter (and optimizer) tensors bitwise identical to an uninterrupted run,
pixel-level HLDF steps after the resumes included."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_data import REPO, TINY_RUN, make_dataset, subprocess_env

MAX_STEPS = 12

CONFIG = dict(TINY_RUN, max_steps=MAX_STEPS, checkpoint_every=1, keep_checkpoints=2)


def _train_cmd(ws, *args: str) -> list[str]:
    return [sys.executable, "-m", "medart_core", "train", "--workspace", str(ws.root), *args]


def _max_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    best = 0
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            best = max(best, int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, ValueError):
            pass
    return best


def _run_and_kill(cmd: list[str], metrics: Path, kill_at: int, log: Path) -> int:
    """Start ``cmd``, SIGKILL it once the metrics log reaches ``kill_at``; returns the step seen at the kill."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        try:
            while _max_step(metrics) < kill_at:
                if proc.poll() is not None:
                    raise AssertionError(f"training exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError("training did not reach the kill step in time")
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return _max_step(metrics)


def _final_tensors(ws, run: str) -> dict[str, dict]:
    from safetensors.torch import load_file

    ck = ws.run_dir(run) / "checkpoints" / f"step_{MAX_STEPS:06d}"
    return {name: load_file(str(ck / f"{name}.safetensors")) for name in ("adapters", "optimizer")}


@pytest.mark.slow
def test_sigkill_twice_then_resume_is_bitwise_identical(ws, store, tmp_path):
    import torch

    make_dataset(ws, store)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    seed = int(time.time())
    rnd = random.Random(seed)
    k1 = rnd.randint(2, 5)
    log = tmp_path / "train.log"

    full = subprocess.run(_train_cmd(ws, "--config", str(cfg), "--run", "full"), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    metrics = ws.run_dir("cut") / "metrics.jsonl"
    seen1 = _run_and_kill(_train_cmd(ws, "--config", str(cfg), "--run", "cut"), metrics, k1, log)
    k2 = min(rnd.randint(seen1 + 2, max(seen1 + 2, 9)), MAX_STEPS - 2)   # past the first kill point
    print(f"kill steps {k1} (seen {seen1}), {k2} (seed {seed})")
    seen2 = _run_and_kill(_train_cmd(ws, "--resume", "cut"), metrics, k2, log)
    assert seen2 >= k2 > seen1 >= k1
    last = subprocess.run(_train_cmd(ws, "--resume", "cut"), cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert last.returncode == 0, last.stderr[-3000:]
    assert json.loads(last.stdout.strip().splitlines()[-1])["step"] == MAX_STEPS

    a, b = _final_tensors(ws, "full"), _final_tensors(ws, "cut")
    for part in ("adapters", "optimizer"):
        assert sorted(a[part]) == sorted(b[part])
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part} tensor {k} differs after resume"
    # The adapters really trained (not a trivially-equal pair of untouched initialisations).
    init_b = [v for k, v in a["adapters"].items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in init_b)

    # The resumed run's log has each step exactly once, and pixel steps happened after the second resume.
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train_rows = [r for r in rows if "loss_latent" in r]
    assert [r["step"] for r in train_rows] == list(range(1, MAX_STEPS + 1))
    pixel_steps = [r["step"] for r in train_rows if "loss_color" in r]
    assert pixel_steps == [3, 6, 9, 12]
    assert any(s > seen2 for s in pixel_steps)
    # The uninterrupted and resumed runs logged the same losses, step for step.
    full_rows = [json.loads(line) for line in (ws.run_dir("full") / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in full_rows if "loss_latent" in r] == [r["loss"] for r in train_rows]


def test_bf16_resume_from_a_checkpoint_is_bitwise_identical(ws, store, one_thread):
    """Exact resume holds within one precision: a bf16 run stopped at a checkpoint and resumed (in process,
    no kill) ends with the same adapter and optimiser bits as an uninterrupted bf16 run, pixel steps included;
    the resumed run keeps the precision its checkpoint records."""
    import torch
    from safetensors.torch import load_file

    from medart_core.train import TrainConfig, train

    make_dataset(ws, store)
    steps = 6
    cfg = dict(CONFIG, max_steps=steps, precision="bf16")
    train(TrainConfig.from_dict(cfg), ws, store, run_name="full16")
    train(TrainConfig.from_dict(dict(cfg, max_steps=4)), ws, store, run_name="cut16")
    res = train(TrainConfig.from_dict(cfg), ws, store, resume="cut16")
    assert res.step == steps
    final = f"checkpoints/step_{steps:06d}"
    for name in ("adapters", "optimizer"):
        a = load_file(str(ws.run_dir("full16") / final / f"{name}.safetensors"))
        b = load_file(str(ws.run_dir("cut16") / final / f"{name}.safetensors"))
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after a bf16 resume"
    prov = json.loads((ws.run_dir("cut16") / final / "state.json").read_text())["provenance"]
    assert prov["precision"] == "bf16" and prov["precision_reason"] == "kept from the checkpoint being resumed"
    full = [json.loads(x) for x in (ws.run_dir("full16") / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(x) for x in (ws.run_dir("cut16") / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in full if "loss_latent" in r] == [r["loss"] for r in cut if "loss_latent" in r]
