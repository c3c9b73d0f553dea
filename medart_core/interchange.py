"""Interchange formats: reading the metadata of exported captioned folders (imagefolder ``metadata.jsonl``
and the reference Med-Art ``metadata.csv``), shared by caption import and training."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class MetadataRow:
    """One line of an exported split: the image's file name within the split folder and its caption."""

    file_name: str
    text: str
    caption_version: str | None = None


def read_metadata(split_dir: Path) -> list[MetadataRow]:
    """The rows of ``split_dir/metadata.jsonl`` (preferred) or ``split_dir/metadata.csv``; [] when neither.

    A line that is not valid JSON raises ConfigError naming the file and line."""
    split_dir = Path(split_dir)
    jl, cs = split_dir / "metadata.jsonl", split_dir / "metadata.csv"
    rows: list[MetadataRow] = []
    if jl.is_file():
        for n, line in enumerate(jl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{jl}:{n} is not valid JSON ({e}).") from None
                rows.append(_row(r))
    elif cs.is_file():
        with cs.open(encoding="utf-8", newline="") as f:
            rows.extend(_row(r) for r in csv.DictReader(f))
    return rows


def _row(r: dict) -> MetadataRow:
    v = r.get("caption_version")
    return MetadataRow(file_name=str(r.get("file_name", "")), text=str(r.get("text", "")),
                       caption_version=None if v in (None, "") else str(v))
