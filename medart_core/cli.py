"""``python -m medart_core``: the command-line face of the library (the studio is the other one).

The data commands (sample data, import, export, caption import, datasets) are defined here; each module of
:data:`SUBCOMMAND_MODULES` adds its own through ``register_cli(subparsers)`` and keeps its heavy imports
inside the handlers, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import MedArtError

# Modules that add sub-commands of their own: captioning, training, out-of-process jobs, users. Each must exist
# and define ``register_cli(subparsers)``.
SUBCOMMAND_MODULES = ("medart_core.vsg", "medart_core.train", "medart_core.jobs", "medart_core.generate",
                      "medart_core.evaluate", "medart_core.accounts", "medart_core.demo_backbone",
                      "medart_core.ablation")


def _add_workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", "-w", default=None,
                   help="workspace folder (default: $MEDART_HOME or ./workspace)")


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from .data import sample_data_cli

    return sample_data_cli(args.workspace, args.name)


def _cmd_import(args: argparse.Namespace) -> int:
    from .data import import_cli

    return import_cli(args.src, args.workspace, args.dataset, args.modality, args.label,
                      keep_identifiers=args.keep_identifiers)


def _cmd_export(args: argparse.Namespace) -> int:
    from .captions import CaptionStore
    from .interchange import export_imagefolder, export_medart_csv
    from .workspace import Workspace

    ws = Workspace.open(args.workspace)
    store = CaptionStore.for_workspace(ws)
    export = export_imagefolder if args.format == "imagefolder" else export_medart_csv
    report = export(store, ws, args.dataset, args.out, status=args.status, overwrite=args.overwrite)
    print(report.summary())
    return 0


def _cmd_import_captions(args: argparse.Namespace) -> int:
    from .captions import CaptionStore
    from .interchange import import_captions_report
    from .workspace import Workspace

    store = CaptionStore.for_workspace(Workspace.open(args.workspace))
    report = import_captions_report(store, args.dataset, args.metadata)
    print(report.summary())
    return 0 if report.added else 1


def _cmd_datasets(args: argparse.Namespace) -> int:
    from .captions import CaptionStore
    from .workspace import Workspace

    store = CaptionStore.for_workspace(Workspace.open(args.workspace))
    for d in store.list_datasets():
        print(f"{d.name}\t{d.modality}\t{d.n_images} images")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medart_core",
                                     description="Med-Art: captions, HLDF fine-tuning, generation, evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sample-data", help="build the real medical sample dataset (no downloads)")
    _add_workspace(p)
    p.add_argument("--name", default="sample", help="dataset name (default: sample)")
    p.set_defaults(func=_cmd_sample_data)

    p = sub.add_parser("import", help="import images (folder-per-class, CSV, DICOM, PNG/JPEG/TIFF)")
    p.add_argument("src", help="a folder, a CSV file (file_name,label[,text]) or an image/DICOM file")
    _add_workspace(p)
    p.add_argument("--dataset", default="imported", help="dataset name (created if missing)")
    p.add_argument("--modality", default="generic",
                   help="endoscopy, dermoscopy, radiology, histology, fundus or generic (prompt templates)")
    p.add_argument("--label", default=None, help="class label for files that have none (single files, DICOM)")
    p.add_argument("--keep-identifiers", action="store_true",
                   help="admin opt-in for a NEW dataset: keep DICOM patient tags and original file names")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("export", help="export captions: Hugging Face imagefolder or the reference metadata.csv")
    _add_workspace(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--format", choices=("imagefolder", "medart-csv"), required=True)
    p.add_argument("--status", choices=("approved", "all"), default="approved")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import-captions", help="add captions from a metadata.jsonl or metadata.csv as drafts")
    p.add_argument("metadata", help="metadata.jsonl (file_name, text) or metadata.csv (file_name,text)")
    _add_workspace(p)
    p.add_argument("--dataset", required=True)
    p.set_defaults(func=_cmd_import_captions)

    p = sub.add_parser("datasets", help="list the datasets of a workspace")
    _add_workspace(p)
    p.set_defaults(func=_cmd_datasets)

    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
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
