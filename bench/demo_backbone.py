"""Does the demo backbone draw the sample classes? Class accuracy, domain FD, memorisation and timings of
the shipped ``assets/demo_backbone`` against the random-weight ``tiny`` backbone; ``--build`` also times
the full recipe.

    python bench/demo_backbone.py [--per-class 16] [--threads 2] [--grid /tmp/demo_grid.png]
                                  [--build [--build-out assets/demo_backbone]]

Protocol: the sample dataset is built in a temporary workspace. ``--per-class`` images are generated from
each class's caption (20 DPM-Solver++ steps, CFG 4.5, negative "", seeds derived from (class, i)).
``class_accuracy``: the fraction that a classifier trained on the real images labels with the class their
prompt names (chance 0.1); the classifier is ``evaluate.train_classifier`` (seed 0, 15 epochs) on the 213
real images at 64 px with every class repeated up to the size of the largest, because the accuracy is
averaged over classes of 5 to 45 images (``class_accuracy_domain_classifier`` is the same count with the
unbalanced ``evaluate.domain_extractor`` classifier). ``fd_domain_*`` is the Fréchet distance between the
domain extractor's 64-d penultimate features of the generated images and of all 213 real images. Memorisation: for each generated image the
most similar training image, by cosine similarity of those features (``nearest_training_images``,
``nn_similarity_median``, flagged ≥ 0.95) and, in pixels, the PSNR to the nearest training image or its
mirror image (``nn_pixel_psnr_median``; a copy of a training image scores about what the VAE reconstructs,
~28 dB for the shipped build). ``load_s``: ``load_backbone("demo")`` after the imports, median of 3; ``generate_one_s``: one
64 px image (T5, 20 steps with CFG, VAE decode), median of 5.

Last line: one JSON object.
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


def generate(bb, prompts, seeds, *, batch=32):
    """uint8 [N,3,64,64] images, one per (prompt, seed), through the library's PixArt path."""
    import torch

    from medart_core import pixart
    from medart_core.extractors import images_to_uint8

    out = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i:i + batch], seeds[i:i + batch]
        emb, mask = pixart.encode_text(bb, ps)
        noise = torch.cat([pixart.initial_noise(pixart.latent_shape(bb, 1), torch.Generator().manual_seed(s))
                           for s in ss])
        lat = pixart.sample_latents(bb, emb, mask, steps=20, guidance=4.5, latents=noise)
        with torch.no_grad():
            out.append(images_to_uint8(pixart.to_pil(pixart.decode(bb.vae, lat)), bb.resolution))
    return torch.cat(out)


def generate_one_s(bb, prompt: str) -> float:
    import torch

    from medart_core import pixart

    times = []
    for k in range(6):
        t = time.perf_counter()
        emb, mask = pixart.encode_text(bb, [prompt])
        lat = pixart.sample_latents(bb, emb, mask, steps=20, guidance=4.5, generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            pixart.to_pil(pixart.decode(bb.vae, lat))
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def nn_pixel_psnr(fake, real):
    """PSNR (dB, 8-bit) of each generated image to its nearest training image or mirror image."""
    import torch

    r = torch.cat([real, real.flip(-1)]).flatten(1).float()
    f = fake.flatten(1).float()
    d = torch.cdist(f, r).pow(2) / f.shape[1]
    mse = d.min(dim=1).values.clamp_min(1e-6)
    return (10 * torch.log10(255.0 ** 2 / mse)).tolist()


def balanced_classifier(real_u8, labels, classes, *, epochs=15):
    """``train_classifier`` on the real images with every class repeated up to the largest class's count."""
    import torch

    from medart_core.evaluate import train_classifier

    y = torch.tensor([classes.index(lab) for lab in labels])
    counts = torch.bincount(y, minlength=len(classes))
    top = int(counts.max())
    idx = torch.cat([torch.nonzero(y == c).flatten().repeat(top // int(counts[c]) + 1)[:top]
                     for c in range(len(classes))])
    return train_classifier(real_u8[idx], y[idx].tolist(), len(classes), seed=0, epochs=epochs)


def score(name, bb, ex, clf, classes, captions, real_u8, real_feats, per_class):
    import torch

    from medart_core.evaluate import nearest_training_images
    from medart_core.metrics import frechet_distance
    from medart_core.seeds import derive_seed

    prompts, seeds, target = [], [], []
    for c, lab in enumerate(classes):
        for i in range(per_class):
            prompts.append(captions[lab])
            seeds.append(derive_seed("bench-demo-backbone", lab, i, bits=31))
            target.append(c)
    t = time.perf_counter()
    imgs = generate(bb, prompts, seeds)
    gen_s = time.perf_counter() - t
    with torch.no_grad():
        pred = clf(imgs.float() / 255.0).argmax(1)
        pred_domain = ex.classifier(imgs.float() / 255.0).argmax(1)
    y = torch.tensor(target)
    feats = ex.features(imgs)
    mem = nearest_training_images(feats, real_feats)
    psnr = nn_pixel_psnr(imgs, real_u8)
    res = {
        "class_accuracy": float((pred == y).float().mean()),
        "class_accuracy_domain_classifier": float((pred_domain == y).float().mean()),
        "per_class_accuracy": {lab: float((pred[y == c] == c).float().mean()) for c, lab in enumerate(classes)},
        "fd_domain": frechet_distance(real_feats, feats),
        "nn_similarity_median": mem["median"],
        "nn_flagged_ge_095": len(mem["flagged"]),
        "nn_pixel_psnr_median": statistics.median(psnr),
        "n_generated": len(prompts),
        "generation_s": gen_s,
    }
    print(f"{name}: accuracy {res['class_accuracy']:.3f}, FD {res['fd_domain']:.2f}, nn-sim median "
          f"{res['nn_similarity_median']:.3f} ({res['nn_flagged_ge_095']}/{len(prompts)} >= 0.95), nn-pixel PSNR "
          f"median {res['nn_pixel_psnr_median']:.1f} dB, {len(prompts)} images in {gen_s:.1f} s", flush=True)
    return res, imgs


def write_grid(path, classes, demo_imgs, tiny_imgs, real_u8, real_labels, per_class):
    """Rows: one real image per class, one demo image per class (first seed), one tiny image per class."""
    from PIL import Image

    s = real_u8.shape[-1]
    grid = Image.new("RGB", (s * len(classes), s * 3), "black")
    for c, lab in enumerate(classes):
        r = real_u8[real_labels.index(lab)]
        for row, img in enumerate((r, demo_imgs[c * per_class], tiny_imgs[c * per_class])):
            grid.paste(Image.fromarray(img.permute(1, 2, 0).numpy()), (c * s, row * s))
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST)
    grid.save(path)
    print(f"grid (rows: real, demo, tiny; columns: {', '.join(classes)}): {path}", flush=True)


def time_build(threads: int, out: str | None) -> dict:
    """Run the full recipe into ``out`` (default: a temporary folder) and compare its files with the
    manifest of the shipped folder as it was before the build."""
    import shutil

    from medart_core.backbone import DEMO_DIR
    from medart_core.demo_backbone import MANIFEST, build_demo_backbone

    ref = DEMO_DIR / MANIFEST
    shipped = json.loads(ref.read_text(encoding="utf-8"))["files"] if ref.is_file() else {}
    tmp = None if out else Path(tempfile.mkdtemp(prefix="medart-bench-demo-build-"))
    target = Path(out) if out else tmp / "demo_backbone"
    try:
        t = time.perf_counter()
        m = build_demo_backbone(target, schedule="full", seed=0, log=lambda s: print(s, flush=True))
        wall = time.perf_counter() - t
        same = {k: shipped.get(k, {}).get("sha256") == v["sha256"] for k, v in m["files"].items()}
        return {"build_s": wall, "build_seconds": m["build_seconds"], "build_threads": threads,
                "build_total_bytes": m["total_bytes"], "build_metrics": m["metrics"],
                "build_matches_previous": bool(shipped) and all(same.values()) and set(shipped) == set(same),
                "build_files_differing": sorted(k for k, ok in same.items() if not ok)}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", default="/tmp/demo_grid.png")
    ap.add_argument("--build", action="store_true", help="also time the full recipe (~20-40 min on 2 cores)")
    ap.add_argument("--build-out", default=None,
                    help="where --build writes (default: a temporary folder; assets/demo_backbone rebuilds the "
                         "shipped weights, compared with the files they replace)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import diffusers  # noqa: F401  (imports are not part of load_s)
    import transformers  # noqa: F401
    from PIL import Image

    from medart_core.backbone import load_backbone
    from medart_core.captions import CaptionStore
    from medart_core.data import build_sample_dataset
    from medart_core.evaluate import domain_extractor
    from medart_core.extractors import images_to_uint8
    from medart_core.workspace import Workspace

    result: dict = {}
    if args.build:
        result.update(time_build(args.threads, args.build_out))
        print(f"full recipe: {result['build_s']:.0f} s wall, {result['build_seconds'].get('cpu_s', 0):.0f} CPU s; "
              f"same files as the previous build: {result['build_matches_previous']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="medart-bench-demo-") as root:
        ws = Workspace.open(root)
        store = CaptionStore.for_workspace(ws)
        build_sample_dataset(ws, store, "sample")
        recs = sorted(store.list_images("sample"), key=lambda r: r.id)
        text = {s.image_id: s.text for s in store.states("sample")}
        t = time.perf_counter()
        ex = domain_extractor(ws, store, "sample", size=64, seed=0)
        clf_s = time.perf_counter() - t
        classes = list(ex.classes)
        captions = {r.label: text[r.id] for r in recs}
        real_labels = [r.label for r in recs]
        imgs = []
        for r in recs:
            with Image.open(ws.image_path("sample", r.file_name)) as im:
                imgs.append(im.convert("RGB"))
        real_u8 = images_to_uint8(imgs, 64)
        real_feats = ex.features(real_u8)
        t = time.perf_counter()
        clf = balanced_classifier(real_u8, real_labels, classes)
        bal_s = time.perf_counter() - t
        y_real = torch.tensor([classes.index(lab) for lab in real_labels])

        def per_class_mean(net):
            with torch.no_grad():
                p = net(real_u8.float() / 255.0).argmax(1)
            return sum(float((p[y_real == c] == c).float().mean()) for c in range(len(classes))) / len(classes)

        train_acc, train_acc_domain = per_class_mean(clf), per_class_mean(ex.classifier)
        print(f"classifiers: balanced {bal_s:.1f} s, domain {clf_s:.1f} s; class-averaged accuracy on their own "
              f"training images {train_acc:.3f} and {train_acc_domain:.3f}", flush=True)
        store.close()

    load_backbone("demo")
    load_times = []
    for _ in range(3):
        t = time.perf_counter()
        demo = load_backbone("demo")
        load_times.append(time.perf_counter() - t)
    tiny = load_backbone("tiny")
    one = generate_one_s(demo, captions[classes[0]])
    print(f"load_backbone('demo'): {statistics.median(load_times):.3f} s; one 64 px image (20 steps, CFG 4.5): "
          f"{one:.3f} s ({args.threads} threads)", flush=True)

    d, demo_imgs = score("demo", demo, ex, clf, classes, captions, real_u8, real_feats, args.per_class)
    tn, tiny_imgs = score("tiny", tiny, ex, clf, classes, captions, real_u8, real_feats, args.per_class)
    if args.grid:
        write_grid(args.grid, classes, demo_imgs, tiny_imgs, real_u8, real_labels, args.per_class)
    result.update({
        "class_accuracy": d["class_accuracy"], "chance": 1.0 / len(classes),
        "class_accuracy_tiny": tn["class_accuracy"],
        "class_accuracy_domain_classifier": d["class_accuracy_domain_classifier"],
        "class_accuracy_domain_classifier_tiny": tn["class_accuracy_domain_classifier"],
        "fd_domain_demo": d["fd_domain"], "fd_domain_tiny": tn["fd_domain"],
        "nn_similarity_median": d["nn_similarity_median"], "nn_similarity_median_tiny": tn["nn_similarity_median"],
        "nn_flagged_ge_095": d["nn_flagged_ge_095"], "nn_pixel_psnr_median": d["nn_pixel_psnr_median"],
        "per_class_accuracy": d["per_class_accuracy"],
        "classifier_train_accuracy": train_acc, "domain_classifier_train_accuracy": train_acc_domain, "n_generated_per_backbone": d["n_generated"],
        "load_s": statistics.median(load_times), "generate_one_s": one, "threads": args.threads,
    })
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
