"""Benchmark one HLDF pixel-level step on the `small` random backbone, on CPU.

Variants (same LoRA weights, prompt, initial noise, M, CFG 4.5, negative prompt "", batch 1):
  ref        the reference approach: two pipelines are reloaded from disk (`from_pretrained` of every
             component; --ref-reloads) at each pixel step, the trainable DiT/T5 are plugged into the first,
             whose stock `PixArtAlphaPipeline.__call__` runs with its `no_grad` removed (the reference vendors
             diffusers for this; here `__call__.__wrapped__` is the undecorated function), and the second's
             VAE decodes; full backprop, no checkpointing.
  full       ours: `hldf.pixel_loss`, gradients through all M steps + VAE decoder + T5, checkpointing on.
  truncated  ours with grad_path="truncated", K=2.
  full_nockpt  ours, full path without checkpointing (same graph as ref, without the reloads).
  auto       ours full with ``checkpointing: auto``: the run's rule (estimate.choose_checkpointing against the
             RAM free now) picks on or off; the choice and its reason are printed.
  truncated_bf16  ours truncated K=2 with ``precision: bf16`` (frozen weights bf16, forward passes under
             bf16 autocast; LoRA, losses and the solver fp32).
  auto_bf16  ours full, checkpointing auto, bf16: what ``--precision auto`` gives on an AVX512-BF16 CPU.

Each variant lives in its own subprocess and the parent asks them for steps in turn (round-robin, so
load drift on a shared machine hits all variants alike); the best time per variant is reported. Peak memory is the largest resident-set size sampled every 2 ms
during a step minus the RSS just before it (torch allocations are invisible to tracemalloc). The gradients
of the first step of `ref` and `full` (LoRA params of DiT and T5) are compared. The last line printed is
one JSON object with the ratios and raw figures.

    python bench/hldf_step.py [--steps 20] [--repeats 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "An endoscopic image of a polyp with red mucosa"
VARIANTS = ("ref", "full", "truncated", "full_nockpt", "auto", "truncated_bf16", "auto_bf16")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak - start`` is the step's memory growth."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _setup(threads: int, bf16: bool = False):
    import torch

    torch.set_num_threads(threads)
    from medart_core import lora as L
    from medart_core.backbone import load_backbone

    bb = load_backbone("small", torch_dtype=torch.bfloat16 if bf16 else None)
    torch.manual_seed(0)
    L.attach_lora(bb)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a mid-training state: B != 0, so every LoRA matrix gets a gradient
        for p in L.trainable_parameters(bb):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    real = torch.rand(1, 3, bb.resolution, bb.resolution, generator=torch.Generator().manual_seed(2)) * 2 - 1
    noise = torch.randn(1, 4, bb.latent_size, bb.latent_size, generator=torch.Generator().manual_seed(3))
    return bb, real, noise


def _grads(bb):
    from medart_core import lora as L

    return {f"p{i}": (p.grad.detach().clone() if p.grad is not None else p.detach() * 0)
            for i, p in enumerate(L.trainable_parameters(bb))}


def _zero(bb):
    for m in (bb.transformer, bb.text_encoder):
        m.zero_grad(set_to_none=True)


def _step_ref(bb, real, noise, steps: int, folder: str, reloads: int) -> float:
    import gc

    from diffusers import PixArtAlphaPipeline

    from medart_core.hldf import color_moment_loss

    pipes = [PixArtAlphaPipeline.from_pretrained(folder, local_files_only=True)  # every component from disk
             for _ in range(max(1, reloads))]
    pipe = pipes[0]
    pipe.set_progress_bar_config(disable=True)
    pipe.register_modules(transformer=bb.transformer, text_encoder=bb.text_encoder)  # the weights being trained
    call = PixArtAlphaPipeline.__call__.__wrapped__  # the pipeline without its @torch.no_grad()
    latents = call(pipe, prompt=PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=4.5,
                   height=bb.resolution, width=bb.resolution, latents=noise.clone(), use_resolution_binning=False,
                   clean_caption=False, output_type="latent", return_dict=False)[0]
    vae = pipes[-1].vae
    image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    loss = color_moment_loss(image, real, "paper")
    loss.backward()
    del pipe, pipes, vae, image, latents
    gc.collect()
    return float(loss)


def auto_checkpointing(steps: int) -> tuple[bool, str]:
    """What a training run of this bench's setting decides for ``hldf.checkpointing: auto`` right now."""
    from medart_core.estimate import choose_checkpointing, cpu_device
    from medart_core.train_config import TrainConfig

    import torch

    cfg = TrainConfig.from_dict({"backbone": "small", "batch_size": 1,
                                 "hldf": {"sample_steps": steps, "grad_path": "full", "checkpointing": "auto"}})
    choice = choose_checkpointing(cfg, cpu_device(torch.get_num_threads()))
    return choice.checkpointing, choice.reason


def _step_ours(bb, real, noise, steps: int, variant: str, ckpt_auto: bool) -> float:
    from medart_core import hldf as H
    from medart_core.pixart import encode_prompts, tokenize_prompts
    from medart_core.precision import autocast

    truncated = variant.startswith("truncated")
    ckpt = ckpt_auto if variant.startswith("auto") else variant != "full_nockpt"
    cfg = H.HLDFConfig(sample_steps=steps, grad_path="truncated" if truncated else "full",
                       truncated_k=2, checkpointing=ckpt)
    with autocast("bf16" if variant.endswith("bf16") else "fp32", "cpu"):
        ids, mask = tokenize_prompts(bb.tokenizer, [PROMPT])
        emb, m = encode_prompts(bb, ids, mask)
        loss = H.pixel_loss(bb, emb, m, real, cfg, generator=None, noise=noise)
    loss.backward()
    return float(loss)


def worker(variant: str, steps: int, threads: int, folder: str, reloads: int) -> None:
    """Serve commands from stdin, one JSON line back per command: `step` or `grads PATH`."""
    import gc

    from safetensors.torch import save_file

    bb, real, noise = _setup(threads, bf16=variant.endswith("bf16"))
    ckpt_auto, reason = auto_checkpointing(steps)
    print(json.dumps({"ready": variant, "auto_checkpointing": ckpt_auto, "reason": reason}), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "step":
            _zero(bb)
            gc.collect()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                if variant == "ref":
                    loss = _step_ref(bb, real, noise, steps, folder, reloads)
                else:
                    loss = _step_ours(bb, real, noise, steps, variant, ckpt_auto)
                dt = time.perf_counter() - t0
            print(json.dumps({"time_s": dt, "peak_rss_growth_mb": mem.growth_mb, "loss": loss}), flush=True)
        elif cmd == "grads":
            save_file(_grads(bb), arg)
            print(json.dumps({"saved": arg}), flush=True)
        else:
            return


def _ask(proc: subprocess.Popen, command: str) -> dict:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"bench worker died: {proc.stderr.read()[-2000:]}")
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="M, sampling steps (paper: 20)")
    ap.add_argument("--repeats", type=int, default=2, help="timed pixel steps per variant (best is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--ref-reloads", type=int, default=2, help="pipelines the reference reloads per pixel step")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        worker(args.worker, args.steps, args.threads, args.folder, args.ref_reloads)
        return

    import torch
    from safetensors.torch import load_file

    from medart_core.backbone import load_backbone, save_backbone

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hldf_bench_") as tmp:
        folder = str(Path(tmp) / "small")
        save_backbone(load_backbone("small"), folder)  # once, as the reference's training script starts
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
        procs = {}
        try:
            for v in VARIANTS:  # one process per variant: its RSS measures only that variant
                procs[v] = subprocess.Popen(
                    [sys.executable, __file__, "--worker", v, "--steps", str(args.steps), "--threads",
                     str(args.threads), "--folder", folder, "--ref-reloads", str(args.ref_reloads)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                line = procs[v].stdout.readline()
                if not line:
                    raise RuntimeError(f"bench worker {v} failed: {procs[v].stderr.read()[-2000:]}")
                ready = json.loads(line)
            runs = {v: [] for v in VARIANTS}
            # Round-robin, one variant at a time: load drift on a shared machine hits all variants alike.
            for r in range(args.repeats):
                for v in VARIANTS:
                    runs[v].append(_ask(procs[v], "step"))
                    if r == 0 and v in ("ref", "full"):
                        _ask(procs[v], f"grads {Path(tmp) / (v + '.safetensors')}")
            ga, gb = load_file(str(Path(tmp) / "ref.safetensors")), load_file(str(Path(tmp) / "full.safetensors"))
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.stdin.write("quit\n")
                    p.stdin.flush()
                    p.wait(timeout=60)
        key = lambda s: int(s[1:])
        flat_a = torch.cat([ga[k].flatten() for k in sorted(ga, key=key)])
        flat_b = torch.cat([gb[k].flatten() for k in sorted(gb, key=key)])
        rel = float((flat_a - flat_b).abs().max() / flat_a.abs().max().clamp_min(1e-30))

    t = {v: min(x["time_s"] for x in runs[v]) for v in VARIANTS}
    m = {v: max(x["peak_rss_growth_mb"] for x in runs[v]) for v in VARIANTS}
    for v in VARIANTS:
        print(f"{v:>11}: step {t[v]:7.2f} s (runs {', '.join(format(x['time_s'], '.2f') for x in runs[v])}), "
              f"peak RSS growth {m[v]:7.1f} MB, loss {runs[v][0]['loss']:.6f}")
    print(f"M={args.steps} sampling steps, CFG 4.5, batch 1, {args.threads} thread(s); "
          f"gradients full vs ref: max relative difference {rel:.2e}")
    print(f"checkpointing auto chose {'on' if ready['auto_checkpointing'] else 'off'}: {ready['reason']}")
    loss_diff = {v: abs(runs[v][0]["loss"] - runs[base][0]["loss"])
                 for v, base in (("truncated_bf16", "truncated"), ("auto_bf16", "full"))}
    print(f"bf16 vs fp32 pixel loss: |diff| {loss_diff}")
    summary = {
        "backbone": "small", "device": "cpu", "threads": args.threads, "sample_steps": args.steps,
        "guidance": 4.5, "batch": 1, "truncated_k": 2, "repeats": args.repeats, "ref_reloads": args.ref_reloads,
        "time_ratio_ref_over_full": t["ref"] / t["full"],
        "time_ratio_ref_over_truncated": t["ref"] / t["truncated"],
        "time_ratio_ref_over_full_nockpt": t["ref"] / t["full_nockpt"],
        "time_ratio_ref_over_auto": t["ref"] / t["auto"],
        "time_ratio_ref_over_truncated_bf16": t["ref"] / t["truncated_bf16"],
        "time_ratio_ref_over_auto_bf16": t["ref"] / t["auto_bf16"],
        "auto_checkpointing": "on" if ready["auto_checkpointing"] else "off",
        "bf16_loss_abs_diff": loss_diff,
        "mem_ratio_truncated_over_ref": m["truncated"] / m["ref"],
        "mem_ratio_full_over_ref": m["full"] / m["ref"],
        "grad_max_rel_diff_full_vs_ref": rel,
        "grad_max_abs_ref": float(flat_a.abs().max()),
        "time_s": t, "peak_rss_growth_mb": m, "loss": {v: runs[v][0]["loss"] for v in VARIANTS},
        "bench_wall_s": time.perf_counter() - t_all,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
