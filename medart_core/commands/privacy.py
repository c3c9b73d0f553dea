"""``privacy``: the privacy gauge of a checkpoint or a run (:mod:`medart_core.privacy`): copy rate against a
threshold calibrated on held-out real images, and the loss-based membership attack's AUC."""
from __future__ import annotations

import argparse

from . import add_workspace


def _cmd_privacy(args: argparse.Namespace) -> int:
    from ..privacy import cmd_privacy

    return cmd_privacy(args)


def privacy(p: argparse.ArgumentParser) -> None:
    add_workspace(p)
    p.add_argument("--checkpoint", required=True, help="base, RUN or RUN@STEP (with --curve: RUN)")
    p.add_argument("--dataset", default=None,
                   help="members: this dataset's captioned images (default: the images the run trained on)")
    p.add_argument("--held-out", default=None,
                   help="non-members: a dataset of images never trained on (default: the run's validation "
                        "hold-out, or with --dataset and --members N the rest of the dataset)")
    p.add_argument("--members", type=int, default=None, help="with --dataset: take N members, the rest held out")
    p.add_argument("--captions", default="latest", choices=("approved", "latest"))
    p.add_argument("--extractor-dataset", default=None, help="labelled dataset of the domain classifier "
                                                              "(default: --dataset, else the run's dataset)")
    p.add_argument("--no-features", action="store_true", help="pixels only (no domain classifier)")
    p.add_argument("--curve", action="store_true", help="every checkpoint of the run (and base)")
    p.add_argument("--backbone", default=None)
    p.add_argument("--per-member", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--quantile", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report (or curve) as one JSON object")
    p.set_defaults(func=_cmd_privacy)
