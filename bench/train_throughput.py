"""Training throughput: our loop (frozen T5, feature cache) vs the reference loop (T5 and the VAE encoder
run on every step), same `small` backbone (128 px, ~30 M-parameter DiT), same sample dataset, same HLDF
settings (pixel step every N=50 steps, M sampler steps), same number of steps, batch 1.

    python bench/train_throughput.py [--steps 200] [--segments 2] [--threads 1] [--sample-steps 20]

Both runs go through ``medart_core.train.train``; the config differs in ``cache_features`` and in
``trim_text_padding`` (ours computes text work on the non-padding tokens only; the reference, like the
paper's code, on all 120 positions).
The machine is shared, so the two runs are interleaved in ``--segments`` chunks (each run resumes from its
own checkpoint) and both see the same load drift. Figures: images/s over the optimiser steps (setup,
checkpoint and validation time excluded, pixel steps included) from each run's metrics.jsonl; the
median-based figure (median plain-step and pixel-step times) is printed as a load-spike-robust check.
The last line is one JSON object with ``throughput_ratio`` and the raw figures.

A third run, ``ours_bf16``, is ours with ``precision: bf16`` (frozen weights bf16, forward passes under bf16
autocast, LoRA/optimiser/losses fp32; its own bf16 feature cache): ``throughput_ratio_bf16`` is its images/s
over the fp32 reference loop's, and its per-step losses are compared with ours in fp32 (same data, same
draws) as ``bf16_loss_rel_diff`` (median and max over steps).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def config(steps: int, cached: bool, sample_steps: int, precision: str = "fp32"):
    from medart_core.train import TrainConfig

    return TrainConfig.from_dict(dict(
        backbone="small", dataset="sample", captions="latest",
        lora={"rank": 8, "alpha": 8.0, "t5_enabled": False},
        hldf={"pixel_every": 50, "sample_steps": sample_steps, "guidance": 4.5, "grad_path": "truncated",
              "truncated_k": 2, "checkpointing": False},
        batch_size=1, max_steps=steps, checkpoint_every=10_000, validate_every=10_000, validation_steps=2,
        validation_seeds=[0], val_images=1, cache_features=cached, export_merged=False, optimizer="adamw",
        precision=precision,
        # The reference computes T5 and the DiT's text attention over all 120 positions, padding included.
        trim_text_padding=cached))


def summarize(ws, run: str) -> dict:
    from medart_core.checkpoint import read_metrics

    rows = [r for r in read_metrics(ws, run) if "loss_latent" in r]
    step_s = [1.0 / r["images_per_s"] for r in rows]            # batch 1: seconds per step
    plain = [1.0 / r["images_per_s"] for r in rows if not r["pixel_step"]]
    pixel = [1.0 / r["images_per_s"] for r in rows if r["pixel_step"]]
    robust = statistics.median(plain) * len(plain) + (statistics.median(pixel) * len(pixel) if pixel else 0.0)
    return {"steps": len(rows), "pixel_steps": len(pixel), "train_s": round(sum(step_s), 3),
            "images_per_s": round(len(rows) / sum(step_s), 4),
            "median_plain_step_s": round(statistics.median(plain), 4),
            "median_pixel_step_s": round(statistics.median(pixel), 4) if pixel else None,
            "median_based_images_per_s": round(len(rows) / robust, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--segments", type=int, default=2, help="interleaved chunks per run (load-drift fairness)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 gives the steadiest figure on a shared 2-core machine)")
    ap.add_argument("--sample-steps", type=int, default=20, help="M of the pixel steps (paper: 20)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from medart_core.captions import CaptionStore
    from medart_core.data import build_sample_dataset
    from medart_core.train import train
    from medart_core.workspace import Workspace

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medart-bench-") as tmp:
        ws = Workspace.open(tmp)
        store = CaptionStore.for_workspace(ws)
        build_sample_dataset(ws, store, "sample")
        print(f"bench: small backbone, {args.steps} steps in {args.segments} interleaved segments, batch 1, N=50, "
              f"M={args.sample_steps} (truncated K=2), {args.threads} thread(s), sample dataset", flush=True)
        wall = {"reference": 0.0, "ours": 0.0, "ours_bf16": 0.0}
        cache_report = None
        for seg in range(1, args.segments + 1):
            upto = args.steps * seg // args.segments
            for name, cached, prec in (("reference", False, "fp32"), ("ours", True, "fp32"),
                                       ("ours_bf16", True, "bf16")):
                t0 = time.perf_counter()
                res = train(config(upto, cached, args.sample_steps, prec), ws, store,
                            run_name=None if seg > 1 else name, resume=name if seg > 1 else None,
                            log=lambda m, n=name: print(f"  [{n}] {m}", flush=True))
                wall[name] += time.perf_counter() - t0
                if name == "ours" and seg == 1:
                    cache_report = res.cache
                print(f"  [{name}] segment {seg}: steps -> {res.step}", flush=True)
        ref, ours, o16 = summarize(ws, "reference"), summarize(ws, "ours"), summarize(ws, "ours_bf16")
        from medart_core.checkpoint import read_metrics

        l32 = [r["loss"] for r in read_metrics(ws, "ours") if "loss_latent" in r]
        l16 = [r["loss"] for r in read_metrics(ws, "ours_bf16") if "loss_latent" in r]
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(l32, l16)]
    ratio = ours["images_per_s"] / ref["images_per_s"]
    ratio16 = o16["images_per_s"] / ref["images_per_s"]
    robust = ours["median_based_images_per_s"] / ref["median_based_images_per_s"]
    print(f"reference (T5 + VAE encoder every step): {ref['images_per_s']:.3f} images/s "
          f"(plain step {ref['median_plain_step_s']:.3f} s, pixel step {ref['median_pixel_step_s']} s)")
    print(f"ours (frozen T5, feature cache):        {ours['images_per_s']:.3f} images/s "
          f"(plain step {ours['median_plain_step_s']:.3f} s, pixel step {ours['median_pixel_step_s']} s; "
          f"cache built once in {cache_report['seconds']:.1f} s)")
    print(f"ours in bf16:                           {o16['images_per_s']:.3f} images/s "
          f"(plain step {o16['median_plain_step_s']:.3f} s, pixel step {o16['median_pixel_step_s']} s); "
          f"{ratio16:.2f}x the reference, {o16['images_per_s'] / ours['images_per_s']:.2f}x ours in fp32; "
          f"loss vs ours fp32: median relative diff {statistics.median(rel):.2e}, max {max(rel):.2e}")
    print(f"throughput ratio {ratio:.2f}x (median-based {robust:.2f}x; wall clock incl. setup and cache build "
          f"{wall['reference'] / wall['ours']:.2f}x); bench took {time.perf_counter() - t_all:.0f} s")
    print(json.dumps({"throughput_ratio": round(ratio, 3), "median_based_ratio": round(robust, 3),
                      "throughput_ratio_bf16": round(ratio16, 3),
                      "median_based_ratio_bf16": round(o16["median_based_images_per_s"]
                                                       / ref["median_based_images_per_s"], 3),
                      "bf16_over_fp32_ours": round(o16["images_per_s"] / ours["images_per_s"], 3),
                      "bf16_loss_rel_diff": {"median": statistics.median(rel), "max": max(rel)},
                      "wall_ratio_incl_setup": round(wall["reference"] / wall["ours"], 3),
                      "steps": args.steps, "segments": args.segments, "threads": args.threads, "pixel_every": 50,
                      "sample_steps": args.sample_steps, "backbone": "small", "batch_size": 1,
                      "reference": dict(ref, wall_s=round(wall["reference"], 2)),
                      "ours": dict(ours, wall_s=round(wall["ours"], 2), cache_build_s=cache_report["seconds"]),
                      "ours_bf16": dict(o16, wall_s=round(wall["ours_bf16"], 2))}))


if __name__ == "__main__":
    main()
