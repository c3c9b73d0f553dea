"""Caption commands: ``caption`` (draft captions with a drafter of :mod:`medart_core.vsg`) and ``review``
(bulk approval of unedited drafts)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..constants import PAPER_BACKBONE
from . import add_workspace

# Mirrors of medart_core.vsg (checked equal by tests/test_cli.py), so `caption --help` does not import it.
DRAFTERS = ("template", "vlm", "shorten")
DEFAULT_VLM = "llava-hf/llama3-llava-next-8b-hf"
DEFAULT_SHORTENER = "t5-large"
DEFAULT_MAX_RETRIES = 5
DEFAULT_BACKBONE_SPEC = PAPER_BACKBONE


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..captions import CaptionStore
    from ..workspace import Workspace

    ws = Workspace.open(args.workspace)
    return ws, CaptionStore.for_workspace(ws)


def _cmd_caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..errors import MissingWeightsError
    from ..vsg import caption_dataset, make_drafter

    ws, store = _open(args)
    kw: dict[str, Any] = dict(max_retries=args.max_retries, seed=args.seed, backbone=args.backbone)
    if args.batch_size:
        kw["batch_size"] = args.batch_size
    if args.device and args.drafter != "template":
        kw["device"] = args.device
    drafter = make_drafter(args.drafter, model=args.model, **kw)
    try:  # fail before the progress bar if the tokenizer that counts the 120 tokens is not available
        from ..backbone import load_tokenizer

        load_tokenizer(args.backbone)
    except MissingWeightsError as e:
        raise MissingWeightsError(
            f"The 120-token check counts with the T5 tokenizer of --backbone {args.backbone!r}, which is not "
            f"available here. Pass --backbone tiny (offline demo) or a local folder, or set MEDART_BACKBONE. "
            f"Details: {e}") from e
    bar = tqdm(total=store.count_images(args.dataset), unit="img", desc=f"caption {args.dataset}")

    def progress(done: int, total: int, failures: int) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix(failures=failures)
        bar.refresh()

    try:
        report = caption_dataset(ws, store, args.dataset, drafter, progress=progress,
                                 only_over_limit=args.only_over_limit)
    finally:
        bar.close()
    print(report.summary())
    for image_id, why in report.errors[:10]:
        print(f"  image {image_id}: {why}", file=sys.stderr)
    return 0


def _cmd_review(args: argparse.Namespace) -> int:
    import getpass

    from ..vsg import approve_drafts

    ws, store = _open(args)
    reviewer = args.reviewer
    if not reviewer:
        try:
            reviewer = getpass.getuser()
        except Exception:  # no user name in some containers
            reviewer = "cli"
    n = approve_drafts(store, args.dataset, reviewer=reviewer)
    print(f"Approved {n} draft caption(s) in {args.dataset} as {reviewer}.")
    return 0


def caption(p: argparse.ArgumentParser) -> None:
    p.description = ("Draft captions for every image of a dataset. Resumable: run it again to continue; images "
                     "already drafted with the same settings are skipped. Drafts never replace human edits or "
                     "approvals.")
    add_workspace(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--drafter", choices=DRAFTERS, default="template")
    p.add_argument("--model", default=None, help=f"Hub id or local folder (vlm: {DEFAULT_VLM}; "
                                                 f"shorten: {DEFAULT_SHORTENER})")
    p.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--only-over-limit", action="store_true",
                   help="only images whose caption is over the 120-token limit")
    p.add_argument("--backbone", default=os.environ.get("MEDART_BACKBONE") or DEFAULT_BACKBONE_SPEC,
                   help="backbone whose T5 tokenizer counts the 120-token limit: tiny (offline demo), a Hub id "
                        f"or a folder (default: $MEDART_BACKBONE or {DEFAULT_BACKBONE_SPEC})")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_caption)


def review(p: argparse.ArgumentParser) -> None:
    add_workspace(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--approve-drafts", action="store_true", required=True,
                   help="approve every pending image whose caption is an unedited draft")
    p.add_argument("--reviewer", default=None, help="name recorded on the approvals (default: your user name)")
    p.set_defaults(func=_cmd_review)
