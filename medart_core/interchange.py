"""Interchange formats: captioned folders going out of and coming into the caption store.

* export: the Hugging Face ``imagefolder`` layout (``train/`` + ``validation/``, each with ``metadata.jsonl``)
  and the reference Med-Art layout (images + ``metadata.csv`` with ``file_name,text``);
* metadata reading, shared by training (:func:`read_metadata` of an exported split) and caption import
  (:func:`import_captions`: one ``metadata.jsonl`` / ``metadata.csv`` file added as drafts).

CSV cells are written through :func:`csv_safe_cell` (a caption ``=HYPERLINK(...)`` must not run as a formula
in the spreadsheet an admin opens the export with) and read back through :func:`csv_cell_text`, its exact
inverse, so an exported CSV imports as the captions that were exported.

Everything here works through the public :class:`~medart_core.captions.CaptionStore` API; the store
itself knows nothing about these layouts.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import ConfigError, NotFoundError

if TYPE_CHECKING:
    from .captions import CaptionState, CaptionStore

__all__ = [
    "MetadataRow", "read_metadata", "read_caption_file", "ExportReport", "export_imagefolder",
    "export_medart_csv", "CaptionImportReport", "import_captions", "import_captions_report", "csv_safe_cell",
    "csv_cell_text",
]


# ------------------------------------------------------------------------------------------------
# CSV cells: formula injection
# ------------------------------------------------------------------------------------------------
# Spreadsheets run a cell that starts with = + - @ (and, after a tab or carriage return, what follows) as a
# formula: OWASP "CSV Injection" prefixes such a cell with a single quote, which the spreadsheet shows as
# text. A cell that already starts with quotes before such a character gets one more, so that reading strips
# exactly one quote and gives back every text exactly (the escape is injective).
_FORMULA_CELL = re.compile(r"'*[=+\-@\t\r]")
_ESCAPED_CELL = re.compile(r"'+[=+\-@\t\r]")


def csv_safe_cell(text: str) -> str:
    """``text`` as a CSV cell that no spreadsheet evaluates (a leading ``'`` where it would be a formula)."""
    text = str(text)
    return "'" + text if _FORMULA_CELL.match(text) else text


def csv_cell_text(cell: str) -> str:
    """The text that :func:`csv_safe_cell` turned into ``cell`` (one leading ``'`` removed where it added one)."""
    return cell[1:] if _ESCAPED_CELL.match(cell) else cell


# ------------------------------------------------------------------------------------------------
# Reading metadata
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetadataRow:
    """One line of an exported split: the image's file name within the split folder and its caption."""

    file_name: str
    text: str
    caption_version: str | None = None


def _jsonl_objects(raw: str, bad_line: Callable[[int, json.JSONDecodeError], str]) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of each non-blank line; ConfigError(``bad_line(n, error)``) on bad JSON."""
    for n, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(bad_line(n, e)) from None


def _csv_rows(raw: str) -> csv.DictReader:
    """RFC 4180 rows keyed by the header (quoted newlines stay inside their field)."""
    return csv.DictReader(io.StringIO(raw, newline=""))


def _row(r: dict, cell: Callable[[str], str] = str) -> MetadataRow:
    """A JSON object or a CSV row (``cell=csv_cell_text`` undoes the export's formula escape) as a row."""
    v = r.get("caption_version")
    return MetadataRow(file_name=cell(str(r.get("file_name", ""))), text=cell(str(r.get("text", ""))),
                       caption_version=None if v in (None, "") else str(v))


def read_metadata(split_dir: Path) -> list[MetadataRow]:
    """The rows of ``split_dir/metadata.jsonl`` (preferred) or ``split_dir/metadata.csv``; [] when neither.

    A line that is not valid JSON raises ConfigError naming the file and line."""
    split_dir = Path(split_dir)
    jl, cs = split_dir / "metadata.jsonl", split_dir / "metadata.csv"
    if jl.is_file():
        return [_row(r) for _, r in _jsonl_objects(jl.read_text(encoding="utf-8"),
                                                   lambda n, e: f"{jl}:{n} is not valid JSON ({e}).")]
    if cs.is_file():
        with cs.open(encoding="utf-8", newline="") as f:     # newline="": CRLF inside quoted fields stays
            return [_row(r, csv_cell_text) for r in _csv_rows(f.read())]
    return []


def read_caption_file(path: str | os.PathLike) -> list[tuple[int, MetadataRow]]:
    """``(row number, row)`` of one ``*.jsonl`` or ``*.csv`` caption file (a BOM is allowed), strictly:
    each JSON line needs string ``file_name`` and ``text``, a CSV needs both columns in its header."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"Caption file {path} does not exist.")
    suffix = path.suffix.lower()
    try:
        raw = path.read_bytes().decode("utf-8-sig")   # no newline translation: a quoted "\r" stays in its field
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name} is not UTF-8 text; save it as UTF-8 and import again.") from None
    out: list[tuple[int, MetadataRow]] = []
    if suffix == ".jsonl":
        for no, obj in _jsonl_objects(
                raw, lambda n, e: f"{path.name} line {n} is not valid JSON ({e.msg}); fix it and import again."):
            if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str) \
                    or not isinstance(obj.get("text"), str):
                raise ConfigError(f"{path.name} line {no} needs string fields 'file_name' and 'text'.")
            out.append((no, _row(obj)))
    elif suffix == ".csv":
        reader = _csv_rows(raw)
        if not reader.fieldnames or "file_name" not in reader.fieldnames or "text" not in reader.fieldnames:
            raise ConfigError(f"{path.name} needs a header row with columns 'file_name' and 'text'.")
        for no, row in enumerate(reader, start=1):
            out.append((no, _row({k: v or "" for k, v in row.items()}, csv_cell_text)))
    else:
        raise ConfigError(f"Cannot read captions from {path.name}: use a metadata.jsonl or metadata.csv file.")
    return out


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    out_dir: Path
    format: str                         # "imagefolder" | "medart_csv"
    status: str                         # which captions were exported ("approved" or "all", …)
    exported: int
    skipped_by_status: dict[str, int]   # images left out, by their status
    splits: dict[str, int]              # images per split ("train"/"validation"; "all" for CSV)

    def summary(self) -> str:
        skipped = sum(self.skipped_by_status.values())
        parts = ", ".join(f"{k}: {v}" for k, v in self.splits.items())
        why = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped_by_status.items()))
        return (f"Exported {self.exported} image(s) with {self.status} captions to {self.out_dir} ({parts})"
                + (f"; left out {skipped} ({why})." if skipped else "."))


def _export_rows(store: "CaptionStore", ws, dataset: str, status: str
                 ) -> tuple[list[tuple["CaptionState", Path]], dict[str, int]]:
    if status != "all":
        store.check_status(status)
    rows, skipped = [], {}
    missing = []
    for st in store.states(dataset):
        if status != "all" and st.status != status:
            skipped[st.status] = skipped.get(st.status, 0) + 1
            continue
        path = ws.image_path(dataset, st.file_name)
        if not path.is_file():
            missing.append(st.file_name)
        rows.append((st, path))
    if missing:
        raise NotFoundError(
            f"{len(missing)} image file(s) of dataset {dataset!r} are missing on disk (first: {missing[0]}); "
            "re-import the dataset before exporting.")
    if not rows:
        raise ConfigError(f"Dataset {dataset!r} has no images with status {status!r} to export; approve some "
                          "captions first or export with status='all'.")
    return rows, skipped


def export_imagefolder(store: "CaptionStore", ws, dataset: str, out_dir: str | os.PathLike, *,
                       status: str = "approved", val_fraction: float = 0.1, seed: int = 0,
                       overwrite: bool = False) -> ExportReport:
    """Hugging Face ``imagefolder`` layout: ``train/`` and ``validation/``, each with its images and a
    ``metadata.jsonl`` (file_name, text, label, caption_version, status) that ``datasets`` picks up."""
    if not (0.0 <= float(val_fraction) < 1.0):
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    rows, skipped = _export_rows(store, ws, dataset, status)
    split_of = _split(rows, float(val_fraction), seed)
    counts = {"train": 0, "validation": 0}
    with _atomic_dir(out_dir, overwrite) as tmp:
        meta: dict[str, list[str]] = {"train": [], "validation": []}
        used: dict[str, set[str]] = {"train": set(), "validation": set()}
        for st, path in rows:
            split = split_of[st.image_id]
            folder = tmp / split
            folder.mkdir(exist_ok=True)
            name = _unique_name(path.name, st.image_id, used[split])
            shutil.copyfile(path, folder / name)
            meta[split].append(json.dumps({"file_name": name, "text": st.text, "label": st.label,
                                           "caption_version": st.caption_version, "status": st.status},
                                          ensure_ascii=False))
            counts[split] += 1
        for split, lines in meta.items():
            if lines:
                (tmp / split / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if not counts["validation"]:
        del counts["validation"]
    return ExportReport(out_dir, "imagefolder", status, len(rows), skipped, counts)


def export_medart_csv(store: "CaptionStore", ws, dataset: str, out_dir: str | os.PathLike, *,
                      status: str = "approved", overwrite: bool = False) -> ExportReport:
    """The Med-Art reference layout: images plus ``metadata.csv`` with ``file_name,text`` (RFC 4180 quoting;
    every cell through :func:`csv_safe_cell`, so a caption cannot be a spreadsheet formula)."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    rows, skipped = _export_rows(store, ws, dataset, status)
    with _atomic_dir(out_dir, overwrite) as tmp:
        used: set[str] = {"metadata.csv"}
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        # The csv module quotes a field with a "\n" (the line terminator) but not one with a lone "\r", which
        # readers take for a line break: a caption could end its row and start one of its own. Such rows are
        # written with every field quoted.
        quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
        writer.writerow(["file_name", "text"])
        for st, path in rows:
            name = _unique_name(path.name, st.image_id, used)
            shutil.copyfile(path, tmp / name)
            cells = [csv_safe_cell(name), csv_safe_cell(st.text)]
            (quoted if any("\r" in c for c in cells) else writer).writerow(cells)
        (tmp / "metadata.csv").write_text(buf.getvalue(), encoding="utf-8", newline="")
    return ExportReport(out_dir, "medart_csv", status, len(rows), skipped, {"all": len(rows)})


def _split(rows: list[tuple["CaptionState", Path]], val_fraction: float, seed: int) -> dict[int, str]:
    """Seeded split stratified by label: per-label validation quotas by largest remainder, each label
    keeps at least one training image, so every class the model sees at validation it also trained on."""
    by_label: dict[str, list[int]] = {}
    for st, _ in rows:
        by_label.setdefault(st.label or "", []).append(st.image_id)
    n = len(rows)
    target = round(n * val_fraction)
    if val_fraction > 0 and target == 0 and n >= 2:
        target = 1
    labels = sorted(by_label)
    cap = {lab: len(by_label[lab]) - 1 for lab in labels}
    exact = {lab: len(by_label[lab]) * val_fraction for lab in labels}
    quota = {lab: min(int(exact[lab]), cap[lab]) for lab in labels}
    rest = target - sum(quota.values())
    for lab in sorted(labels, key=lambda lab: (-(exact[lab] - int(exact[lab])), -len(by_label[lab]), lab)):
        if rest <= 0:
            break
        if quota[lab] < cap[lab]:
            quota[lab] += 1
            rest -= 1
    out: dict[int, str] = {}
    for lab in labels:
        ids = sorted(by_label[lab])
        random.Random(f"{seed}:{lab}").shuffle(ids)
        for k, image_id in enumerate(ids):
            out[image_id] = "validation" if k < quota[lab] else "train"
    return out


def _unique_name(name: str, image_id: int, used: set[str]) -> str:
    candidate = name
    if candidate.lower() in used:
        p = PurePosixPath(name)
        candidate = f"{p.stem}-{image_id}{p.suffix}"
    k = 1
    while candidate.lower() in used:
        p = PurePosixPath(name)
        candidate = f"{p.stem}-{image_id}-{k}{p.suffix}"
        k += 1
    used.add(candidate.lower())
    return candidate


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigError(f"Export target {out_dir} exists and is not a folder; choose another place.")
        if any(out_dir.iterdir()) and not overwrite:
            raise ConfigError(f"Export folder {out_dir} is not empty; choose an empty folder or pass overwrite=True.")


@contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Build the export in a sibling temp folder and rename it into place, so a crash or an error
    never leaves a half-written export that a training run could pick up."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            if any(out_dir.iterdir()) and not overwrite:
                raise ConfigError(f"Export folder {out_dir} filled up while exporting; nothing was changed.")
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Caption import
# ------------------------------------------------------------------------------------------------
@dataclass
class CaptionImportReport:
    dataset: str
    added: int
    batch_id: str | None
    unmatched: list[tuple[int, str, str]] = field(default_factory=list)  # (row number, file_name, why)

    def summary(self) -> str:
        s = f"Imported {self.added} caption draft(s) into {self.dataset}"
        if self.unmatched:
            s += f"; {len(self.unmatched)} row(s) not used (first: row {self.unmatched[0][0]} " \
                 f"{self.unmatched[0][1]!r}: {self.unmatched[0][2]})"
        return s + "."


def import_captions(store: "CaptionStore", dataset: str, metadata_path: str | os.PathLike, *,
                    source: str = "import") -> int:
    """Add captions from ``metadata.jsonl`` / ``metadata.csv`` (file_name, text) as drafts; returns how
    many were added. :func:`import_captions_report` also lists the rows that matched no image."""
    return import_captions_report(store, dataset, metadata_path, source=source).added


def import_captions_report(store: "CaptionStore", dataset: str, metadata_path: str | os.PathLike, *,
                           source: str = "import") -> CaptionImportReport:
    """Like :func:`import_captions`; the report names every row not used and why. One undoable batch."""
    source = store.check_source(source)
    rows = read_caption_file(metadata_path)
    # An image answers to its stored name, that name's basename and its original name (and basename).
    keys: dict[str, set[int]] = {}
    for rec in store.list_images(dataset):
        names = {rec.file_name, PurePosixPath(rec.file_name).name}
        orig = (rec.source or {}).get("original_name")
        if isinstance(orig, str) and orig:
            names |= {orig, PurePosixPath(orig.replace("\\", "/")).name}
        for n in names:
            keys.setdefault(n, set()).add(rec.id)
    report = CaptionImportReport(dataset, 0, None)
    items: list[tuple[int, str]] = []
    for row_no, row in rows:
        file_name, text = row.file_name, row.text
        ids = keys.get(file_name) or keys.get(PurePosixPath(file_name.replace("\\", "/")).name)
        if not ids:
            report.unmatched.append((row_no, file_name, "no image with this file name"))
        elif len(ids) > 1:
            report.unmatched.append((row_no, file_name, f"matches {len(ids)} images; use the stored file name"))
        elif not text.strip():
            report.unmatched.append((row_no, file_name, "empty caption"))
        else:
            try:
                items.append((next(iter(ids)), store.check_text(text)))
            except ConfigError as e:
                report.unmatched.append((row_no, file_name, str(e)))
    if items:
        report.batch_id = store.new_batch_id("import")
        store.add_drafts(items, source=source, params={"file": Path(metadata_path).name}, batch_id=report.batch_id)
        report.added = len(items)
    return report
