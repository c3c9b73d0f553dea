"""Data commands: ``sample-data``, ``import``, ``export``, ``import-captions``, ``datasets``."""
from __future__ import annotations

import argparse

from . import add_workspace


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from ..data import sample_data_cli

    return sample_data_cli(args.workspace, args.name)


def _cmd_import(args: argparse.Namespace) -> int:
    from ..data import import_cli

    return import_cli(args.src, args.workspace, args.dataset, args.modality, args.label,
                      keep_identifiers=args.keep_identifiers)


def _cmd_export(args: argparse.Namespace) -> int:
    from ..captions import CaptionStore
    from ..interchange import export_imagefolder, export_medart_csv
    from ..workspace import Workspace

    ws = Workspace.open(args.workspace)
    store = CaptionStore.for_workspace(ws)
    export = export_imagefolder if args.format == "imagefolder" else export_medart_csv
    report = export(store, ws, args.dataset, args.out, status=args.status, overwrite=args.overwrite)
    print(report.summary())
    return 0


def _cmd_import_captions(args: argparse.Namespace) -> int:
    from ..captions import CaptionStore
    from ..interchange import import_captions_report
    from ..workspace import Workspace

    store = CaptionStore.for_workspace(Workspace.open(args.workspace))
    report = import_captions_report(store, args.dataset, args.metadata)
    print(report.summary())
    return 0 if report.added else 1


def _cmd_datasets(args: argparse.Namespace) -> int:
    from ..captions import CaptionStore
    from ..workspace import Workspace

    store = CaptionStore.for_workspace(Workspace.open(args.workspace))
    for d in store.list_datasets():
        print(f"{d.name}\t{d.modality}\t{d.n_images} images")
    return 0


def sample_data(p: argparse.ArgumentParser) -> None:
    add_workspace(p)
    p.add_argument("--name", default="sample", help="dataset name (default: sample)")
    p.set_defaults(func=_cmd_sample_data)


def import_(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a folder, a CSV file (file_name,label[,text]) or an image/DICOM file")
    add_workspace(p)
    p.add_argument("--dataset", default="imported", help="dataset name (created if missing)")
    p.add_argument("--modality", default="generic",
                   help="endoscopy, dermoscopy, radiology, histology, fundus or generic (prompt templates)")
    p.add_argument("--label", default=None, help="class label for files that have none (single files, DICOM)")
    p.add_argument("--keep-identifiers", action="store_true",
                   help="admin opt-in for a NEW dataset: keep DICOM patient tags and original file names")
    p.set_defaults(func=_cmd_import)


def export(p: argparse.ArgumentParser) -> None:
    add_workspace(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--format", choices=("imagefolder", "medart-csv"), required=True)
    p.add_argument("--status", choices=("approved", "all"), default="approved")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_export)


def import_captions(p: argparse.ArgumentParser) -> None:
    p.add_argument("metadata", help="metadata.jsonl (file_name, text) or metadata.csv (file_name,text)")
    add_workspace(p)
    p.add_argument("--dataset", required=True)
    p.set_defaults(func=_cmd_import_captions)


def datasets(p: argparse.ArgumentParser) -> None:
    add_workspace(p)
    p.set_defaults(func=_cmd_datasets)
