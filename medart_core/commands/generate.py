"""Generation commands: ``generate`` (from the base model or a run's checkpoint) and ``regenerate`` (reproduce
an image from its JSON sidecar)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from ..constants import RANDOM_LABEL
from . import add_workspace

if TYPE_CHECKING:  # pragma: no cover
    from ..generate import GeneratedImage

# Mirrors of medart_core.generate (checked equal by tests/test_cli.py), so `generate --help` does not import it.
BASE = "base"
SEED_RULE = "image k (0-based) of every prompt uses seed + k"


def _image_json(img: "GeneratedImage") -> dict[str, Any]:
    return {"path": str(img.path), "sidecar": str(img.sidecar), "prompt": img.prompt, "seed": img.seed,
            "checkpoint": img.checkpoint, "sha256": img.sha256, "is_random": img.is_random,
            "label": RANDOM_LABEL if img.is_random else None, "warnings": img.warnings,
            **({"matches_original": img.settings["matches_original"]} if "matches_original" in img.settings
               else {})}


def _print_images(imgs: "list[GeneratedImage]", as_json: bool) -> None:
    if as_json:
        print(json.dumps([_image_json(i) for i in imgs]))
        return
    if imgs and imgs[0].is_random:
        print(f"NOTE: {RANDOM_LABEL}: these images are noise from random weights.")
    for i in imgs:
        extra = ""
        if "matches_original" in i.settings:
            same = i.settings["matches_original"]
            extra = " (byte-equal to the original)" if same else " (DIFFERS from the original)"
        print(f"{i.path}\tseed {i.seed}\t{i.checkpoint}{extra}")
        for w in i.warnings:
            print(f"warning: {w}", file=sys.stderr)


def _cmd_generate(args: argparse.Namespace) -> int:
    from ..generate import GenerationRequest, generate
    from ..workspace import Workspace

    ws = Workspace.open(args.workspace)
    req = GenerationRequest(prompts=args.prompt or [""], negative=args.negative, checkpoint=args.checkpoint,
                            steps=args.steps, guidance=args.guidance, seed=args.seed, n=args.n,
                            resolution=args.resolution, strength=args.strength, batch_size=args.batch_size)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if not args.json and (time.monotonic() - last[0] > 2 or done == total):
            last[0] = time.monotonic()
            print(f"step {done}/{total}", file=sys.stderr)

    imgs = generate(req, ws=ws, backbone=args.backbone, progress=progress, precision=args.precision)
    _print_images(imgs, args.json)
    return 0


def _cmd_regenerate(args: argparse.Namespace) -> int:
    from ..generate import regenerate
    from ..workspace import Workspace

    img = regenerate(args.sidecar, ws=Workspace.open(args.workspace))
    _print_images([img], args.json)
    return 0 if img.settings.get("matches_original") else 1


def generate(p: argparse.ArgumentParser) -> None:
    add_workspace(p)
    p.add_argument("--prompt", "-p", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--negative", default="", help='negative prompt (default: "", as the paper)')
    p.add_argument("--checkpoint", "-c", default=BASE, help="base | RUN (its latest checkpoint) | RUN@STEP")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps (default 20)")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")
    p.add_argument("--seed", type=int, default=None, help=f"seed (default: random, recorded); {SEED_RULE}")
    p.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--resolution", type=int, default=None,
                   help="pixels (default: the checkpoint's training resolution, else the backbone's)")
    p.add_argument("--backbone", default=None,
                   help="tiny | small | Hub id | folder (default: the checkpoint's, else $MEDART_BACKBONE or tiny)")
    p.add_argument("--strength", type=float, default=1.0, help="adapter strength, the LoRA scale (default 1.0)")
    p.add_argument("--batch-size", type=int, default=4, help="images per DiT call (default 4)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=None,
                   help="fp32 | bf16 | auto: bf16 where the device runs it fast (CUDA; CPUs with AVX512-BF16 or "
                        "AMX-BF16). Default: bf16 on a GPU, fp32 on a CPU (bitwise equal to stock diffusers)")
    p.add_argument("--json", action="store_true", help="print one JSON list of the images")
    p.set_defaults(func=_cmd_generate)


def regenerate(p: argparse.ArgumentParser) -> None:
    p.add_argument("sidecar", help="the .json next to a generated PNG (or the PNG)")
    add_workspace(p)
    p.add_argument("--json", action="store_true", help="print one JSON list with the image")
    p.set_defaults(func=_cmd_regenerate)
