"""The privacy gauge on the demo backbone: a run made to memorise against a normal run and the base.

    python bench/privacy.py [--members 12] [--overfit-steps 600] [--normal-steps 50] [--threads 2]

Setup: the ablation's fine-tuning set (``ablation.prepare_dataset``: the sample's fundus and IHC images
through a fixed white-balance shift, 59 images the demo backbone never saw, measured-feature captions),
split by a seeded, class-stratified draw into ``--members`` members and the rest held out (non-members:
the same distribution). The members alone form the training dataset ``privacy-members``; the demo backbone
is fine-tuned on it twice with the library's ``train()`` (LoRA on DiT+T5, no pixel steps):

* normal:  ``--normal-steps`` steps of batch 4 at the paper's lr 1e-4, rank 8 (about the ablation's epochs);
* overfit: ``--overfit-steps`` steps of batch 4 at lr 1e-3, rank 32 (hundreds of epochs on a few images),
  with a checkpoint at half and at the end, for the curve over steps.

Each checkpoint (and the base) gets a privacy report (``privacy.privacy_report``): ``--per-member`` images
per member caption, the copy threshold calibrated on the held-out images (1st percentile), the loss attack
on members vs non-members. Expected: the overfit run's copy rate far above the others', its attack AUC well
above 0.5, the base's AUC near 0.5. The closest pairs (generated | nearest training image) of the three are
saved side by side to ``--pairs`` (default /tmp/privacy_pairs.png).
Last line: one JSON object with copy_rate_{base,normal,overfit}, mia_auc_{base,normal,overfit}, threshold, ...
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MEMBERS_DATASET = "privacy-members"


def members_dataset(ws, store, members) -> str:
    """The members alone as a dataset (same pixels, same captions), which a run trains on entirely."""
    from PIL import Image

    from medart_core.captions import ImageRecord

    if store.has_dataset(MEMBERS_DATASET):
        return MEMBERS_DATASET
    store.create_dataset(MEMBERS_DATASET, modality="generic")
    ws.images_dir(MEMBERS_DATASET).mkdir(parents=True, exist_ok=True)
    recs = []
    for e in members:
        fn = f"images/{e.pixel_hash[:16]}.png"
        shutil.copyfile(e.path, ws.dataset_dir(MEMBERS_DATASET) / fn)
        with Image.open(e.path) as im:
            w, h = im.size
        recs.append(ImageRecord(None, MEMBERS_DATASET, fn, e.label, e.pixel_hash, w, h, {"member_of": e.key}))
    store.add_images(MEMBERS_DATASET, recs, drafts=[(e.text, "measured") for e in members])
    return MEMBERS_DATASET


def fine_tune(ws, store, name: str, *, steps: int, lr: float, rank: int, checkpoints: int) -> float:
    """Train run ``name`` on the members (resumed if it exists); returns seconds."""
    from medart_core.ablation import ROWS, get_preset, train_config
    from medart_core.train import train

    t0 = time.perf_counter()
    status = ws.run_layout(name).status
    if status.is_file() and json.loads(status.read_text()).get("status") == "finished":
        return 0.0
    row = next(r for r in ROWS if r.name == "lora")                 # LoRA DiT+T5, no pixel steps
    cfg = train_config(get_preset("mini", steps=steps, lr=lr, rank=rank), row, 0, MEMBERS_DATASET)
    cfg.checkpoint_every = max(1, steps // checkpoints)
    cfg.keep_checkpoints = checkpoints
    cfg.validate_every = steps
    cfg.validate()
    res = train(cfg, ws, store, run_name=name, log=lambda m: None)
    assert res.status == "finished", res.status
    return round(time.perf_counter() - t0, 1)


def side_by_side(paths: list[str], labels: list[str], out: str) -> None:
    from PIL import Image, ImageDraw

    ims = [Image.open(p).convert("RGB") for p in paths]
    head = 20
    canvas = Image.new("RGB", (sum(i.width for i in ims) + 12 * (len(ims) - 1), head + max(i.height for i in ims)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, lab in zip(ims, labels):
        draw.text((x + 4, 4), lab, fill="black")
        canvas.paste(im, (x, head))
        x += im.width + 12
    canvas.save(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default=None, help="default: a temporary folder")
    ap.add_argument("--members", type=int, default=12)
    ap.add_argument("--overfit-steps", type=int, default=600)
    ap.add_argument("--normal-steps", type=int, default=50)
    ap.add_argument("--per-member", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", default="/tmp/privacy_pairs.png")
    args = ap.parse_args()

    import torch

    from medart_core import privacy as P
    from medart_core.ablation import SOURCE_DATASET, prepare_dataset
    from medart_core.captions import CaptionStore
    from medart_core.workspace import Workspace

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    ws = Workspace.open(args.workspace or tempfile.mkdtemp(prefix="privacy-bench-"))
    store = CaptionStore.for_workspace(ws)
    say = lambda m: print(m, flush=True)  # noqa: E731
    dataset = prepare_dataset(ws, store, log=say)
    members, held = P.split_members(P.dataset_examples(ws, store, dataset), args.members, seed=args.seed)
    members_dataset(ws, store, members)
    say(f"{len(members)} members ({', '.join(sorted({e.label for e in members}))}), {len(held)} held out")
    t_normal = fine_tune(ws, store, "normal", steps=args.normal_steps, lr=1e-4, rank=8, checkpoints=1)
    say(f"normal run: {args.normal_steps} steps in {t_normal} s")
    t_over = fine_tune(ws, store, "overfit", steps=args.overfit_steps, lr=1e-3, rank=32, checkpoints=2)
    say(f"overfit run: {args.overfit_steps} steps in {t_over} s")

    spec = P.PrivacySpec(seed=args.seed, per_member=args.per_member, extractor="domain",
                         extractor_dataset=SOURCE_DATASET, precision="fp32")
    exs = P.make_extractors(ws, store, spec, log=say)
    real = P.real_set(members, held, exs[0], spec, backbone=P.reference_backbone(ws, "demo", spec))
    t0 = time.perf_counter()
    reps = {name: P.privacy_report(ws, store, ref, members, held, spec=spec, backbone="demo", extractors=exs,
                                   real=real, log=say)
            for name, ref in (("base", "base"), ("normal", "normal"), ("overfit", "overfit"))}
    t_reports = time.perf_counter() - t0
    curve = P.privacy_curve(ws, store, "overfit", members, held, spec=spec, include_base=False, backbone="demo",
                            log=lambda m: None)
    side_by_side([reps[k]["pairs_image"] for k in ("base", "normal", "overfit")],
                 ["base", f"normal ({args.normal_steps} steps)", f"overfit ({args.overfit_steps} steps)"], args.pairs)
    say(f"closest pairs: {args.pairs}")

    out = {"members": len(members), "held_out": len(held), "per_member": args.per_member,
           "primary_space": reps["base"]["copy"]["primary"], "threads": torch.get_num_threads(),
           "normal_steps": args.normal_steps, "overfit_steps": args.overfit_steps,
           "train_s": {"normal": t_normal, "overfit": t_over}, "report_s": round(t_reports / 3, 1)}
    for k, r in reps.items():
        c, m = r["copy"], r["membership"]
        out[f"copy_rate_{k}"] = c["copy_rate"]
        out[f"copy_rate_{k}_ci"] = [round(x, 4) for x in c["copy_rate_ci"]]
        out[f"copy_rate_{k}_domain"] = c["spaces"]["domain"]["copy_rate"]
        out[f"mia_auc_{k}"] = round(m["auc"], 4)
        out[f"mia_auc_{k}_ci"] = [round(x, 4) for x in m["auc_ci"]]
        out[f"nn_distance_median_{k}"] = round(c["spaces"][c["primary"]]["distance_median"], 5)
    out["threshold"] = reps["base"]["copy"]["threshold"]
    out["threshold_domain"] = reps["base"]["copy"]["spaces"]["domain"]["threshold"]
    out["held_out_nn_distance_median"] = round(reps["base"]["copy"]["spaces"]["pixel"]["held_out_distance_median"], 5)
    out["curve_overfit"] = [{"step": p["step"], "copy_rate": p["copy_rate"], "auc": round(p["auc"], 4)}
                            for p in curve["points"]]
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
