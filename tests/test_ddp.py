"""Data-parallel training on CPU: two processes (gloo, launched with torch.distributed.run) see different
images, average their gradients, and end with identical adapter weights; only rank 0 writes checkpoints."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from training_data import REPO, make_dataset, subprocess_env, tiny_train_config

SCRIPT = r'''
import json, sys
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from medart_core.captions import CaptionStore
from medart_core.checkpoint import adapter_tensors
from medart_core.train import TrainConfig, train
from medart_core.workspace import Workspace

ws_root, cfg_path, out = sys.argv[1:4]
ws = Workspace.open(ws_root)
res = train(TrainConfig.from_json(open(cfg_path).read()), ws, CaptionStore.for_workspace(ws), run_name="ddp")
rank = dist.get_rank() if dist.is_initialized() else 0
save_file(adapter_tensors(res.backbone), f"{out}/rank{rank}.safetensors")
print(json.dumps({"rank": rank, "world": dist.get_world_size() if dist.is_initialized() else 1,
                  "step": res.step, "pid": __import__("os").getpid()}))
'''


def run_two_ranks(ws, tmp_path, cfg, port: int):
    """``train(cfg)`` as run "ddp" in two gloo ranks (torch.distributed.run); each rank saves its adapters to
    ``out/rank<r>.safetensors`` and prints one JSON line. Returns (out, the finished process)."""
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    (tmp_path / "script.py").write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(port),
                        str(tmp_path / "script.py"), str(ws.root), str(tmp_path / "cfg.json"), str(out)],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return out, r


@pytest.mark.slow
def test_two_cpu_ranks_end_with_identical_adapters(ws, store, tmp_path, free_port):
    import torch
    from safetensors.torch import load_file

    from medart_core.checkpoint import read_checkpoint
    make_dataset(ws, store, n=7)
    cfg = tiny_train_config(lora={"rank": 2, "alpha": 2.0},
                            hldf={"pixel_every": 2, "sample_steps": 2, "checkpointing": False},
                            validate_every=4, lr=1e-2)
    out, r = run_two_ranks(ws, tmp_path, cfg, free_port())
    # The two ranks share one stdout: their lines can run together, so the (flat) reports are found anywhere
    reports = sorted((json.loads(m) for m in re.findall(r'\{"rank": [^{}]*\}', r.stdout)),
                     key=lambda d: d["rank"])
    assert [(d["rank"], d["world"], d["step"]) for d in reports] == [(0, 2, 4), (1, 2, 4)]

    a, b = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert sorted(a) == sorted(b) and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), f"ranks disagree on {k}"
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)   # they trained

    run = ws.run_dir("ddp")
    cks = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert cks == ["latest", "step_000002", "step_000004"]
    state, tensors = read_checkpoint(run / "checkpoints" / "step_000004")
    assert state["world_size"] == 2 and state["writer_rank"] == 0 and state["images_per_step"] == 2
    assert state["writer_pid"] == reports[0]["pid"]
    assert tensors["rng"]["torch_cpu"].shape[0] == 2        # both ranks' RNG streams saved
    for k in a:
        assert torch.equal(tensors["adapters"][k], a[k])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss_latent" in m] == [1, 2, 3, 4]   # one writer, no duplicates
