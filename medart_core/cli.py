"""``python -m medart_core``: the command-line face of the library (the studio is the other one).

One parser, one table of commands (:data:`COMMANDS`): each row names the command, its one-line help and the
function of :mod:`medart_core.commands` that adds its arguments and handler. Handlers import the stage modules
when they run, so ``--help`` answers at once and imports no torch, diffusers, transformers or gradio.
Exit codes: 0 done, 1 a command's own "not done" (e.g. ``regenerate`` differs), 2 a user error (the message on
stderr, no traceback), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple, Sequence

from .commands import ablation, caption, data, demo, ema, evaluate, executors, generate, jobs, privacy, train, users
from .errors import MedArtError


class Command(NamedTuple):
    name: str
    define: Callable[[argparse.ArgumentParser], None]   # adds the arguments and sets func(args) -> int
    help: str


COMMANDS: tuple[Command, ...] = (
    Command("sample-data", data.sample_data, "build the real medical sample dataset (no downloads)"),
    Command("import", data.import_, "import images (folder-per-class, CSV, DICOM, PNG/JPEG/TIFF)"),
    Command("export", data.export, "export captions: Hugging Face imagefolder or the reference metadata.csv"),
    Command("import-captions", data.import_captions, "add captions from a metadata.jsonl or metadata.csv as drafts"),
    Command("datasets", data.datasets, "list the datasets of a workspace"),
    Command("caption", caption.caption, "Draft captions for a dataset (template, VLM or T5 shortening)."),
    Command("review", caption.review, "Bulk review actions on a dataset's captions."),
    Command("train", train.train, "fine-tune LoRA adapters with HLDF (resumable)"),
    Command("export-model", train.export_model, "export a run's checkpoint: PEFT adapters + merged pipeline"),
    Command("worker", jobs.worker, "run the job supervisor in the foreground (owns the accelerator)"),
    Command("jobs", jobs.jobs, "submit, list, show, stop, resume jobs and read their logs"),
    Command("executors", executors.executors, "named executors, where jobs run: add (Slurm), list, remove, check"),
    Command("generate", generate.generate, "generate images from the base model or a run's checkpoint"),
    Command("regenerate", generate.regenerate, "reproduce a generated image from its JSON sidecar"),
    Command("evaluate", evaluate.evaluate, "FD/KID/PRDC of checkpoints under one recorded protocol"),
    Command("ema", ema.ema, "post-hoc EMA: reconstruct any EMA length of a run, or sweep lengths by FD"),
    Command("privacy", privacy.privacy, "privacy gauge: copy rate (calibrated threshold) and membership-attack AUC"),
    Command("review-results", evaluate.review_results, "print the comparison and blind-review tables"),
    Command("users", users.users, "who may sign in to the studio, and with which role"),
    Command("demo-backbone", demo.demo_backbone, "the embedded demo backbone trained on the sample images"),
    Command("ablation", ablation.ablation, "the paper's ablation table in miniature on the demo backbone"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medart_core",
                                     description="Med-Art: captions, HLDF fine-tuning, generation, evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        cmd.define(sub.add_parser(cmd.name, help=cmd.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedArtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: work done so far is saved", file=sys.stderr)
        return 130
