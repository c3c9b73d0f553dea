"""Generation speed on CPU, `small` backbone: ours (``medart_core.generate.Generator``) against the stock
``PixArtAlphaPipeline`` on the same components, steps, guidance and seeds.

(a) single — one batch of 4 prompts, seeds 0..3, 20 steps, CFG 4.5 (negative ""), 128 px.
    stock: ``pipe(prompts, generator=[4 generators])`` over the very components ours holds;
    ours:  ``Generator.sample`` with its prompt-embedding cache emptied before every call, so only per-call
           levers count: T5 and the DiT's text attention on the non-padding tokens, the negative prompt encoded
           once for the batch, the caption projection and cross-attention keys/values computed once per call
           instead of once per step. One warm-up each, then ``--repeats`` calls interleaved; the median.
(b) grid — 4 prompts × 4 seeds × 3 checkpoints (the paper's LoRA, rank 8 on DiT and T5, filled with seeded random
    values, written as Med-Art checkpoints and exported merged with ``lora.export_merged``).
    stock: per checkpoint ``PixArtAlphaPipeline.from_pretrained(merged_folder)`` then one call with
           ``num_images_per_prompt=4`` and 16 generators (the stock user's fastest way);
    ours:  one Generator with the base resident: ``use(checkpoint)`` swaps the adapters in place (merged into
           the DiT, unmerged on T5), prompt embeddings cached (per checkpoint, since T5 has LoRA), 16 images.
    The page cache is warmed by one untimed load of the first merged folder; ours' base model is already
    resident (it is in the studio), and the figure with its one load counted is printed too.
Equality: max |stock − ours| over every [0, 1] image of (a) and (b); must be <= 1e-4.

bf16 (``--precision bf16`` of the library): (a) and (b) are also run with ours in bf16 (frozen weights bf16, every
DiT/T5/VAE forward under bf16 autocast, the DPM-Solver++ state fp32) and with the stock pipeline in bf16
(``torch_dtype=torch.bfloat16``), interleaved with the fp32 runs. ``single_ratio_bf16`` / ``grid_ratio_bf16``
are stock fp32 over ours bf16; ``*_vs_stock_bf16`` stock bf16 over ours bf16; ``bf16_max_abs_diff`` is the largest
|ours fp32 − ours bf16| over the [0, 1] images from the same seeds.
(c) quality, on the demo backbone (64 px, trained on the sample images): ``--fd-per-class`` images per class
from each class's caption in fp32 with seeds A, in bf16 with seeds A, and in fp32 with seeds B; the domain FD
(``evaluate.domain_extractor``) between fp32-A and bf16-A must lie within the seed-to-seed spread, the FD between
fp32-A and fp32-B (``fd_bf16_within_seed_spread``).

    python bench/generate.py [--threads 1] [--repeats 3] [--steps 20] [--fd-per-class 16]

The last line printed is one JSON object.
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

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "An endoscopic image of polyps, a raised pink lesion with a smooth surface on normal mucosa",
    "An endoscopic image of esophagitis, red inflamed mucosa with linear erosions and no bleeding",
    "An endoscopic image of ulcerative colitis, friable mucosa with loss of vascular pattern and ulcers",
    "An endoscopic image of the normal cecum, pale pink mucosa with visible vessels and folds",
]
SEEDS = [0, 1, 2, 3]
CHECKPOINTS = 3


def say(msg: str) -> None:
    print(msg, flush=True)


class Clock:
    """Wall-clock and this process's CPU time of a block. With one thread the CPU time is the work itself;
    on a shared machine it does not grow with other processes' load the way wall time does."""

    def __enter__(self) -> "Clock":
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0


def stock_call(pipe, prompts, generators, steps, guidance, res, **kw):
    import torch

    with torch.inference_mode():
        return pipe(prompts, generator=generators, num_inference_steps=steps, guidance_scale=guidance, height=res,
                    width=res, use_resolution_binning=False, clean_caption=False, output_type="pt", **kw).images


def make_checkpoints(ws, n: int) -> list[tuple[str, Path]]:
    """``n`` runs with one checkpoint each (seeded random LoRA values) and their merged exports."""
    import torch

    from medart_core.backbone import load_backbone
    from medart_core.checkpoint import adapter_tensors, write_checkpoint
    from medart_core.lora import LoRAConfig, attach_lora, export_merged

    maker = load_backbone("small")
    cfg = LoRAConfig()
    attach_lora(maker, cfg)
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in maker.transformer.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            for name, p in maker.text_encoder.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        run = f"bench{i}"
        state = {"config": {"backbone": "small", "resolution": 128, "lora": cfg.to_dict()}, "step": 100}
        write_checkpoint(ws.run_dir(run), 100, {"adapters": adapter_tensors(maker)}, state, keep=1)
        merged = export_merged(maker, ws.exports_dir / f"{run}-merged")
        out.append((f"{run}@100", merged))
    return out


def fd_check(per_class: int, steps: int, guidance: float) -> dict:
    """(c): domain FD fp32-vs-bf16 (same seeds) against fp32-vs-fp32 (other seeds) on the demo backbone."""
    import torch

    from medart_core.captions import CaptionStore
    from medart_core.data import build_sample_dataset
    from medart_core.evaluate import domain_extractor
    from medart_core.extractors import images_to_uint8
    from medart_core.generate import Generator
    from medart_core.metrics import frechet_distance
    from medart_core.pixart import to_pil
    from medart_core.seeds import derive_seed

    with tempfile.TemporaryDirectory(prefix="medart-bench-fd-") as root:
        from medart_core.workspace import Workspace

        ws = Workspace.open(root)
        store = CaptionStore.for_workspace(ws)
        build_sample_dataset(ws, store, "sample")
        text = {st.image_id: st.text for st in store.states("sample")}
        recs = sorted(store.list_images("sample"), key=lambda r: r.id)
        captions = {}
        for r in recs:
            captions.setdefault(r.label, text[r.id])
        t0 = time.perf_counter()
        ex = domain_extractor(ws, store, "sample", size=64, seed=0)
        clf_s = time.perf_counter() - t0
        prompts = [captions[lab] for lab in ex.classes for _ in range(per_class)]
        seeds_a = [derive_seed("bench-gen-bf16-a", lab, i, bits=31) for lab in ex.classes for i in range(per_class)]
        seeds_b = [derive_seed("bench-gen-bf16-b", lab, i, bits=31) for lab in ex.classes for i in range(per_class)]
        gens = {p: Generator(ws, "demo", precision=p) for p in ("fp32", "bf16")}

        def images(prec: str, seeds: list[int]) -> tuple[torch.Tensor, float]:
            t = time.perf_counter()
            out = []
            for j in range(0, len(prompts), 16):
                out.append(gens[prec].sample(prompts[j:j + 16], seeds[j:j + 16], steps=steps, guidance=guidance))
            x = torch.cat(out)
            return x, time.perf_counter() - t

        a32, t32 = images("fp32", seeds_a)
        a16, t16 = images("bf16", seeds_a)
        b32, _ = images("fp32", seeds_b)
        feats = {k: ex.features(images_to_uint8(to_pil(v), 64)) for k, v in (("a32", a32), ("a16", a16), ("b32", b32))}
    fd_prec = frechet_distance(feats["a32"], feats["a16"])
    fd_seed = frechet_distance(feats["a32"], feats["b32"])
    return {"fd_fp32_vs_bf16_same_seeds": round(fd_prec, 3), "fd_fp32_seed_a_vs_seed_b": round(fd_seed, 3),
            "fd_bf16_within_seed_spread": fd_prec <= fd_seed,
            "demo_max_abs_diff_01": float(f"{float(((a32 - a16).abs() / 2).max()):.3g}"),
            "demo_mean_abs_diff_01": float(f"{float(((a32 - a16).abs() / 2).mean()):.3g}"),
            "demo_generate_s": {"fp32": round(t32, 2), "bf16": round(t16, 2)},
            "fd_images_per_set": len(prompts), "domain_classifier_s": round(clf_s, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core box two threads stall each other)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--fd-per-class", type=int, default=16, help="(c) images per class and set (0: skip (c))")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from diffusers import PixArtAlphaPipeline
    from diffusers.utils import logging as dlog

    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()

    from medart_core.generate import Generator
    from medart_core.workspace import Workspace

    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    say(f"torch {torch.__version__}, threads {torch.get_num_threads()}, steps {args.steps}, guidance {args.guidance}, "
        f"repeats {args.repeats}, load average {load0:.2f} on {os.cpu_count()} cores")
    tmp = tempfile.TemporaryDirectory(prefix="medart-bench-gen-")
    ws = Workspace.open(Path(tmp.name) / "ws")
    gen = Generator(ws, "small", precision="fp32")
    gen16 = Generator(ws, "small", precision="bf16")
    bb = gen.backbone
    res = bb.resolution
    n_tok = [int(bb.tokenizer(p.lower(), return_tensors="pt").input_ids.shape[1]) for p in PROMPTS]
    n_dit, n_t5 = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (bb.transformer, bb.text_encoder))
    say(f"backbone small ({bb.label}), {res} px; DiT {n_dit:.1f} M, T5 {n_t5:.1f} M parameters; prompt tokens {n_tok} "
        f"of 120 (tiny tokenizer)")

    def gens(seeds):
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def ours_single():
        gen.clear_cache()                       # no embedding cache across calls for the single figure
        return (gen.sample(PROMPTS, SEEDS, steps=args.steps, guidance=args.guidance) / 2 + 0.5).clamp(0, 1)

    pipe = bb.pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe16 = gen16.backbone.pipeline()          # the stock pipeline over the same components in bf16
    pipe16.set_progress_bar_config(disable=True)

    def stock_single():
        return stock_call(pipe, PROMPTS, gens(SEEDS), args.steps, args.guidance, res)

    def stock16_single():
        return stock_call(pipe16, PROMPTS, gens(SEEDS), args.steps, args.guidance, res).float()

    def ours16_single():
        gen16.clear_cache()
        return (gen16.sample(PROMPTS, SEEDS, steps=args.steps, guidance=args.guidance) / 2 + 0.5).clamp(0, 1)

    # ---- (a) single batch ---------------------------------------------------------------------------
    say("(a) single: warm-up")
    first_ours = ours_single()
    diffs = [float((stock_single() - first_ours).abs().max())]
    bf16_diffs = [float((ours16_single() - first_ours).abs().max())]
    stock16_single()
    variants = [("stock", stock_single), ("ours", ours_single), ("stock_bf16", stock16_single),
                ("ours_bf16", ours16_single)]
    times: dict[str, list[float]] = {k: [] for k, _ in variants}
    cpu: dict[str, list[float]] = {k: [] for k, _ in variants}
    for r in range(args.repeats):
        for name, fn in (variants if r % 2 == 0 else variants[::-1]):
            with Clock() as c:
                fn()
            times[name].append(c.wall)
            cpu[name].append(c.cpu)
        say(f"  repeat {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f} s (cpu {cpu[k][-1]:.2f})" for k, _ in variants))
    med = {k: statistics.median(v) for k, v in times.items()}
    single_stock, single_ours = med["stock"], med["ours"]
    single_cpu = statistics.median(cpu["stock"]) / statistics.median(cpu["ours"])
    say(f"(a) median stock {single_stock:.2f} s, ours {single_ours:.2f} s -> {single_stock / single_ours:.2f}x "
        f"(cpu time {single_cpu:.2f}x); max|diff| {diffs[0]:.2e}")
    say(f"(a) bf16: ours {med['ours_bf16']:.2f} s -> {single_stock / med['ours_bf16']:.2f}x stock fp32, "
        f"{med['stock_bf16'] / med['ours_bf16']:.2f}x stock bf16 ({med['stock_bf16']:.2f} s); "
        f"max|ours fp32 - ours bf16| {bf16_diffs[0]:.3g}")

    # ---- (b) grid over checkpoints ----------------------------------------------------------------------
    say(f"(b) grid: writing {CHECKPOINTS} checkpoints with seeded random LoRA (rank 8, DiT + T5) and their merged "
        "exports (not timed)")
    cks = make_checkpoints(ws, CHECKPOINTS)
    grid_prompts = [p for p in PROMPTS for _ in SEEDS]
    grid_seeds = [s for _ in PROMPTS for s in SEEDS]
    PixArtAlphaPipeline.from_pretrained(str(cks[0][1]))       # warm the page cache (untimed)

    stock_load, stock_gen, ours_swap, ours_gen = [], [], [], []
    grid16 = {"stock_bf16": [], "ours_bf16": []}
    for k, (ref, folder) in enumerate(cks):
        def stock16_part():
            with Clock() as c:
                p2 = PixArtAlphaPipeline.from_pretrained(str(folder), torch_dtype=torch.bfloat16)
                p2.set_progress_bar_config(disable=True)
                imgs = stock_call(p2, PROMPTS, gens(grid_seeds), args.steps, args.guidance, res,
                                  num_images_per_prompt=len(SEEDS)).float()
            grid16["stock_bf16"].append(c)
            return imgs

        def ours16_part():
            with Clock() as c:
                gen16.use(ref)
                imgs = gen16.sample(grid_prompts, grid_seeds, steps=args.steps, guidance=args.guidance)
            grid16["ours_bf16"].append(c)
            return (imgs / 2 + 0.5).clamp(0, 1)

        def stock_part():
            with Clock() as c_load:
                p2 = PixArtAlphaPipeline.from_pretrained(str(folder))
                p2.set_progress_bar_config(disable=True)
            with Clock() as c_gen:
                imgs = stock_call(p2, PROMPTS, gens(grid_seeds), args.steps, args.guidance, res,
                                  num_images_per_prompt=len(SEEDS))
            stock_load.append(c_load)
            stock_gen.append(c_gen)
            return imgs

        def ours_part():
            with Clock() as c_swap:
                gen.use(ref)
            with Clock() as c_gen:
                imgs = gen.sample(grid_prompts, grid_seeds, steps=args.steps, guidance=args.guidance)
            ours_swap.append(c_swap)
            ours_gen.append(c_gen)
            return (imgs / 2 + 0.5).clamp(0, 1)

        if k % 2 == 0:      # alternate who goes first, so load drift hits both alike
            ref_imgs, ours = stock_part(), ours_part()
            ours16, _ = ours16_part(), stock16_part()
        else:
            _, ours16 = stock16_part(), ours16_part()
            ours, ref_imgs = ours_part(), stock_part()
        diffs.append(float((ref_imgs - ours).abs().max()))
        bf16_diffs.append(float((ours16 - ours).abs().max()))
        say(f"  {ref}: stock load {stock_load[-1].wall:.2f} s + 16 images {stock_gen[-1].wall:.2f} s "
            f"(cpu {stock_load[-1].cpu + stock_gen[-1].cpu:.2f}) | ours swap {ours_swap[-1].wall:.2f} s + 16 images "
            f"{ours_gen[-1].wall:.2f} s (cpu {ours_swap[-1].cpu + ours_gen[-1].cpu:.2f}); max|diff| {diffs[-1]:.2e}")
    grid_stock = sum(c.wall for c in stock_load + stock_gen)
    grid_ours = sum(c.wall for c in ours_swap + ours_gen)
    grid_cpu = sum(c.cpu for c in stock_load + stock_gen) / sum(c.cpu for c in ours_swap + ours_gen)
    with Clock() as c_base:
        Generator(ws, "small").backbone                        # what ours pays once per session
    base_load = c_base.wall
    say(f"(b) stock {grid_stock:.2f} s, ours {grid_ours:.2f} s -> {grid_stock / grid_ours:.2f}x (cpu time "
        f"{grid_cpu:.2f}x; {grid_stock / (grid_ours + base_load):.2f}x counting ours' one base load of "
        f"{base_load:.2f} s)")

    g16 = {k: sum(c.wall for c in v) for k, v in grid16.items()}
    say(f"(b) bf16: ours {g16['ours_bf16']:.2f} s -> {grid_stock / g16['ours_bf16']:.2f}x stock fp32, "
        f"{g16['stock_bf16'] / g16['ours_bf16']:.2f}x stock bf16 ({g16['stock_bf16']:.2f} s)")
    fd = {}
    if args.fd_per_class > 0:
        say(f"(c) quality: demo backbone, {args.fd_per_class} images per class per set")
        fd = fd_check(args.fd_per_class, args.steps, args.guidance)
        say(f"(c) domain FD fp32-A vs bf16-A {fd['fd_fp32_vs_bf16_same_seeds']}, fp32-A vs fp32-B "
            f"{fd['fd_fp32_seed_a_vs_seed_b']} -> within the seed spread: {fd['fd_bf16_within_seed_spread']}")

    max_diff = max(diffs)
    out = {
        "single_ratio_bf16": round(single_stock / med["ours_bf16"], 3),
        "grid_ratio_bf16": round(grid_stock / g16["ours_bf16"], 3),
        "single_ratio_bf16_vs_stock_bf16": round(med["stock_bf16"] / med["ours_bf16"], 3),
        "grid_ratio_bf16_vs_stock_bf16": round(g16["stock_bf16"] / g16["ours_bf16"], 3),
        "bf16_max_abs_diff": float(f"{max(bf16_diffs):.3g}"),
        **fd,
        "single_bf16_s": {k: round(med[k], 3) for k in ("stock_bf16", "ours_bf16")},
        "grid_bf16_s": {k: round(v, 3) for k, v in g16.items()},
        "single_ratio": round(single_stock / single_ours, 3),
        "grid_ratio": round(grid_stock / grid_ours, 3),
        "max_abs_diff": float(f"{max_diff:.3g}"),
        "equal_within_1e-4": max_diff <= 1e-4,
        "single_ratio_cpu": round(single_cpu, 3), "grid_ratio_cpu": round(grid_cpu, 3),
        "single_stock_s": round(single_stock, 3), "single_ours_s": round(single_ours, 3),
        "single_times_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "single_cpu_s": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
        "grid_stock_s": round(grid_stock, 3), "grid_ours_s": round(grid_ours, 3),
        "grid_stock_load_s": round(sum(c.wall for c in stock_load), 3),
        "grid_ours_swap_s": round(sum(c.wall for c in ours_swap), 3),
        "grid_ratio_incl_base_load": round(grid_stock / (grid_ours + base_load), 3), "base_load_s": round(base_load, 3),
        "images_single": len(PROMPTS), "images_grid": len(grid_prompts) * len(cks), "checkpoints": len(cks),
        "steps": args.steps, "guidance": args.guidance, "resolution": res, "threads": torch.get_num_threads(),
        "prompt_tokens": n_tok, "embed_cache": {k: gen.stats[k] for k in ("embed_hits", "embed_misses")},
        "adapter_loads": gen.stats["adapter_loads"], "backbone_loads": gen.stats["backbone_loads"],
        "loadavg_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    tmp.cleanup()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
