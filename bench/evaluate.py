"""Evaluating a second checkpoint: with the caches (real features and the domain classifier kept from the
first evaluation) vs recomputing everything, CPU, the sample dataset, the tiny backbone.

    python bench/evaluate.py [--steps 20] [--per-class 16] [--extractor domain] [--threads 2]

Setup: the sample dataset, a short cpu-smoke run with two checkpoints, and a first evaluation of the base
model (this fills the caches). Then the second checkpoint is evaluated twice, both times generating its
evaluation images from scratch (its image folder is deleted before each):

* ours:     caches kept: only its images are generated and their features extracted;
* baseline: every cache deleted first (real features, domain classifier), as a tool without caches
            would run: classifier trained, real features extracted, images generated, features extracted.

Both give identical metrics (checked); the shared generator is warmed on the second checkpoint first.

bf16: a first evaluation of two checkpoints (no evaluation image of either exists; the real-feature and
classifier caches, which do not depend on the generation precision, are kept) with ``precision: fp32`` and then
with ``precision: bf16``; ``bf16_speedup`` is the fp32 time over the bf16 time, and each bf16 FD must fall inside
the fp32 result's bootstrap interval (``bf16_within_fp32_interval``; KID's relative difference is reported: with
N = subset size its std is 0). By default on the ``tiny`` run's r@2, r@4; ``--bf16-backbone small`` trains a
4-step cpu-smoke run on ``small`` (128 px) and evaluates its s@2, s@4 with ``--bf16-per-class`` real images per
class (the tiny backbone's 32-wide matmuls are too small for bf16 to pay).
Last line: one JSON object with ``second_checkpoint_speedup`` and ``bf16_speedup``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="sampler steps of the evaluation images")
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--extractor", default="domain", choices=("domain", "inception"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16-backbone", default="tiny", choices=("tiny", "small"),
                    help="backbone of the bf16-vs-fp32 part (small: a 4-step run on it is trained first)")
    ap.add_argument("--bf16-per-class", type=int, default=None, help="real images per class there (default --per-class)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from medart_core import evaluate as E
    from medart_core.captions import CaptionStore
    from medart_core.data import build_sample_dataset
    from medart_core.train import TrainConfig, train
    from medart_core.workspace import Workspace

    root = Path(tempfile.mkdtemp(prefix="medart-bench-eval-"))
    try:
        ws = Workspace.open(root)
        store = CaptionStore.for_workspace(ws)
        build_sample_dataset(ws, store, "sample")
        t0 = time.perf_counter()
        train(TrainConfig.from_preset("cpu-smoke", captions="latest", max_steps=4, checkpoint_every=2,
                                      validate_every=100, export_merged=False), ws, store, run_name="r",
              log=lambda m: None)
        print(f"cpu-smoke run with checkpoints r@2, r@4: {time.perf_counter() - t0:.1f} s", flush=True)
        weights = None
        if args.extractor == "inception":
            from medart_core.extractors import write_random_inception_weights

            weights = str(write_random_inception_weights(root / "random-inception.pth"))
            print("inception: RANDOM weights of the exact architecture (timing only)")
        spec = E.EvalSpec(dataset="sample", per_class=args.per_class, captions="latest", extractor=args.extractor,
                          extractor_weights=weights, steps=args.steps, n_boot=20, kid_subsets=50)

        def evaluate(ref: str):
            t = time.perf_counter()
            (res,) = E.run_evaluation(ws, store, spec, [ref], backbone="tiny")
            return res, time.perf_counter() - t

        bf16_bb = args.bf16_backbone
        bf16_refs = ["r@2", "r@4"]

        def first_of_two(precision: str):
            """Both checkpoints, none of their evaluation images existing yet, in ``precision``."""
            import dataclasses

            sp = dataclasses.replace(spec, precision=precision, per_class=args.bf16_per_class or spec.per_class)
            get_generator(ws, bf16_bb, precision).sample(["warm-up"], [0], steps=2, guidance=4.5)
            t = time.perf_counter()
            res = E.run_evaluation(ws, store, sp, bf16_refs, backbone=bf16_bb)
            dt = time.perf_counter() - t
            for r in res:
                drop_images(r)
            return res, dt

        first, t_first = evaluate("base")
        print(f"first evaluation (base, fills the caches): {t_first:.2f} s, N={first.profile['n_real']}", flush=True)

        # Warm the shared generator on the second checkpoint (adapter attach, first-call allocations), so both
        # timed evaluations below see the same warm model and differ only in what they recompute.
        from medart_core.generate import get_generator

        gen = get_generator(ws, "tiny")
        gen.use("r@4")
        gen.sample(["warm-up"], [0], steps=2, guidance=4.5)

        def drop_images(res) -> None:
            shutil.rmtree(Path(res.images[0]).parent, ignore_errors=True)

        ours, t_ours = evaluate("r@4")
        print(f"ours (caches kept): {t_ours:.2f} s  {ours.timings}", flush=True)
        drop_images(ours)
        for sub in ("real-features", "domain-classifier"):
            shutil.rmtree(ws.cache_dir / sub, ignore_errors=True)
        base, t_base = evaluate("r@4")
        print(f"baseline (everything recomputed): {t_base:.2f} s  {base.timings}", flush=True)
        same = ours.metrics["overall"]["fd"] == base.metrics["overall"]["fd"]
        print(f"identical FD: {same} ({ours.metrics['overall']['fd']:.6g})")
        drop_images(base)

        if bf16_bb != "tiny":
            train(TrainConfig.from_preset("cpu-smoke", backbone=bf16_bb, resolution=None, captions="latest",
                                          max_steps=4, checkpoint_every=2, validate_every=100, export_merged=False),
                  ws, store, run_name="s", log=lambda m: None)
            bf16_refs = ["s@2", "s@4"]
        r32, t32 = first_of_two("fp32")
        r16, t16 = first_of_two("bf16")
        within = []
        for a, b in zip(r32, r16):
            oa, ob = a.metrics["overall"], b.metrics["overall"]
            lo, hi = oa["fd_ci"]
            ok = lo <= ob["fd"] <= hi
            within.append(ok)
            print(f"{a.profile['checkpoint']}: fp32 FD {oa['fd']:.4g} [{lo:.4g}, {hi:.4g}] KID {oa['kid']:.4g} | "
                  f"bf16 FD {ob['fd']:.4g} KID {ob['kid']:.4g} (relative {abs(ob['kid'] - oa['kid']) / abs(oa['kid']):.2e})"
                  f" -> FD within the fp32 interval: {ok}", flush=True)
        print(f"first evaluation of two checkpoints: fp32 {t32:.2f} s, bf16 {t16:.2f} s -> {t32 / t16:.2f}x "
              f"(bf16 profile precision {r16[0].profile.get('precision')})", flush=True)
        out = {"second_checkpoint_speedup": round(t_base / t_ours, 3), "target": 3.0, "ours_s": round(t_ours, 3),
               "baseline_s": round(t_base, 3), "first_s": round(t_first, 3), "n_real": first.profile["n_real"],
               "extractor": args.extractor, "sampler_steps": args.steps, "threads": args.threads,
               "identical_metrics": same,
               "bf16_speedup": round(t32 / t16, 3), "bf16_target": 2.0, "bf16_backbone": bf16_bb,
               "bf16_n_real": r32[0].profile["n_real"], "fp32_two_s": round(t32, 3),
               "bf16_two_s": round(t16, 3), "bf16_within_fp32_interval": all(within),
               "fd_fp32": [round(r.metrics["overall"]["fd"], 4) for r in r32],
               "fd_fp32_ci": [[round(x, 4) for x in r.metrics["overall"]["fd_ci"]] for r in r32],
               "fd_bf16": [round(r.metrics["overall"]["fd"], 4) for r in r16],
               "kid_fp32": [r.metrics["overall"]["kid"] for r in r32],
               "kid_bf16": [r.metrics["overall"]["kid"] for r in r16]}
        print(json.dumps(out))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
