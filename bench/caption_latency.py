"""Server-side latency of the Captions tab on a 10,000-image dataset.

Times the very handler functions Gradio calls (``studio.caption_tab.go_next`` / ``save``: the review
session's decision in ``medart_core.review`` plus rendering its view as Gradio updates), so the figures are
the tab's own cost: store reads/writes, tokenising, diff, history, rendering values. Network, JSON and the
browser are not included.

    python bench/caption_latency.py [--images 10000] [--ops 200]

The last line printed is one JSON object: next_p50_ms, next_p95_ms, save_p50_ms, save_p95_ms
(targets: next p95 < 150 ms, save p95 < 50 ms).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BENCH_LABELS = ("polyps", "ulcerative-colitis", "esophagitis", "normal-cecum", "dyed-lifted-polyps")


def build_review_dataset(ws, store, name: str = "bench", n: int = 10_000, *, labels=BENCH_LABELS,
                         modality: str = "endoscopy", size: int = 32, chunk: int = 1000,
                         caption_words: int = 30) -> list[int]:
    """A deterministic dataset of ``n`` tiny real PNGs with template-style drafts, via ``store.add_images``.

    Each image's pixels encode its index (so every pixel hash differs); captions start with the class
    seed and add a few varied words, like VSG drafts.
    """
    import numpy as np
    from PIL import Image

    from medart_core.captions import ImageRecord
    from medart_core.vsg import template_caption

    store.create_dataset(name, modality=modality)
    img_dir = ws.images_dir(name)
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ("reddish", "pale", "smooth", "lobulated", "ulcerated", "mucosa", "vessels", "bleeding", "oval",
             "flat", "raised", "surface", "texture", "edematous", "granular", "whitish", "exudate", "margin")
    ids: list[int] = []
    yy, xx = np.mgrid[0:size, 0:size]
    for start in range(0, n, chunk):
        recs, drafts = [], []
        for i in range(start, min(n, start + chunk)):
            label = labels[i % len(labels)]
            base = np.stack([(xx * 7 + i) % 256, (yy * 5 + i // 256) % 256,
                             np.full_like(xx, (i * 37) % 256)], axis=-1).astype(np.uint8)
            base[0, 0] = [i % 256, (i // 256) % 256, (i // 65536) % 256]   # unique pixels per index
            img = Image.fromarray(base, "RGB")
            digest = hashlib.sha256(base.tobytes()).hexdigest()
            rel = f"images/{digest[:16]}.png"
            img.save(ws.dataset_dir(name) / rel, optimize=False, compress_level=1)
            extra = " ".join(rng.choice(words, size=int(rng.integers(5, caption_words))))
            recs.append(ImageRecord(None, name, rel, label, digest, size, size, {"bench": i}))
            drafts.append((f"{template_caption(label, modality)}, {extra}.", "template"))
        ids += store.add_images(name, recs, drafts=drafts)
    return ids


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, int(round(q * (len(xs) - 1)))))
    return xs[k]


def run(n_images: int = 10_000, n_ops: int = 200) -> dict:
    from medart_core.captions import CaptionStore
    from medart_core.workspace import Workspace
    from studio import caption_tab as tab
    from studio.context import StudioContext

    with tempfile.TemporaryDirectory(prefix="medart-bench-") as tmp:
        ws = Workspace.open(Path(tmp) / "ws")
        store = CaptionStore.for_workspace(ws)
        t0 = time.perf_counter()
        build_review_dataset(ws, store, "bench", n_images)
        print(f"built {n_images} images in {time.perf_counter() - t0:.1f} s", flush=True)
        ctx = StudioContext(ws=ws, store=store, backbone_spec="tiny")
        state = tab.CaptionSession()
        t0 = time.perf_counter()
        view = tab.open_dataset(ctx, state, "bench")
        print(f"open dataset (one states() call + first render): {(time.perf_counter() - t0) * 1000:.1f} ms "
              f"for {len(state.ids)} ids", flush=True)
        text = view["editor"].value
        for _ in range(5):   # warm the tokenizer / sqlite page cache, as a running studio would be
            text = tab.go_next(ctx, state, text, state.editor_key, "bench")["editor"].value

        nexts, saves = [], []
        for i in range(n_ops):
            t0 = time.perf_counter()
            out = tab.go_next(ctx, state, text, state.editor_key, "bench")
            nexts.append((time.perf_counter() - t0) * 1000)
            text = out["editor"].value
            edited = text + f" note {i}"
            t0 = time.perf_counter()
            out = tab.save(ctx, state, edited, state.editor_key, "bench")
            saves.append((time.perf_counter() - t0) * 1000)
            assert "Saved" in out["notice"], out["notice"]
            text = edited
        # the saves really are in the store, each with its reviewer
        assert store.current(state.image_id).text == text
        assert store.history(state.image_id)[-1].reviewer == "bench"
        # Baseline in the same run: a handler without per-session state re-derives the filtered list of
        # all images (one store.states() over the whole dataset) on every move, then renders.
        naive = []
        for _ in range(min(n_ops, 50)):
            t0 = time.perf_counter()
            store.states("bench")
            out = tab.go_next(ctx, state, text, state.editor_key, "bench")
            naive.append((time.perf_counter() - t0) * 1000)
            text = out["editor"].value
        approves = []   # approve & next also recounts the per-class progress line
        for _ in range(min(n_ops, 50)):
            t0 = time.perf_counter()
            out = tab.approve_next(ctx, state, text, state.editor_key, "bench")
            approves.append((time.perf_counter() - t0) * 1000)
            text = out["editor"].value
        store.close()

    res = {"next_p50_ms": round(statistics.median(nexts), 2), "next_p95_ms": round(_pct(nexts, 0.95), 2),
           "save_p50_ms": round(statistics.median(saves), 2), "save_p95_ms": round(_pct(saves, 0.95), 2),
           "approve_next_p95_ms": round(_pct(approves, 0.95), 2), "images": n_images, "ops": n_ops,
           "naive_next_p95_ms": round(_pct(naive, 0.95), 2)}
    res["next_speedup_vs_naive"] = round(res["naive_next_p95_ms"] / max(res["next_p95_ms"], 1e-6), 1)
    res["next_p95_over_target"] = round(res["next_p95_ms"] / 150, 4)
    res["save_p95_over_target"] = round(res["save_p95_ms"] / 50, 4)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--ops", type=int, default=200)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = run(args.images, args.ops)
    print(f"next: p50 {res['next_p50_ms']} ms, p95 {res['next_p95_ms']} ms (target p95 < 150)")
    print(f"save: p50 {res['save_p50_ms']} ms, p95 {res['save_p95_ms']} ms (target p95 < 50)")
    print(f"approve & next: p95 {res['approve_next_p95_ms']} ms")
    print(f"baseline (re-derive the list on every move): next p95 {res['naive_next_p95_ms']} ms "
          f"-> ours is {res['next_speedup_vs_naive']}x faster")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
