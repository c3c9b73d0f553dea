"""medart_core.interchange: what an export writes is what training's read_metadata and caption import read."""
from __future__ import annotations

import pytest
from PIL import Image

from medart_core.captions import ImageRecord
from medart_core.errors import ConfigError
from medart_core.interchange import (MetadataRow, export_imagefolder, export_medart_csv, import_captions_report,
                                     read_caption_file, read_metadata)

TEXT = 'Polyp, 5 mm; "sessile"\nsecond line'


def _dataset(ws, store, n: int = 4) -> list[int]:
    store.create_dataset("kv", modality="endoscopy")
    ws.images_dir("kv").mkdir(parents=True, exist_ok=True)
    recs = []
    for k in range(n):
        Image.new("RGB", (8, 6), (k * 40, 9, 7)).save(ws.dataset_dir("kv") / f"images/{k:04d}.png")
        recs.append(ImageRecord(None, "kv", f"images/{k:04d}.png", "polyp" if k % 2 else "ulcer", f"{k:064x}", 8, 6))
    ids = store.add_images("kv", recs, drafts=[(f"draft {k}", "template") for k in range(n)])
    v = store.edit(ids[0], TEXT, reviewer="amy", expected_version=store.current(ids[0]).version).id
    store.approve(ids[0], reviewer="amy", expected_version=v)
    return ids


def test_read_metadata_reads_both_exports_back(ws, store, tmp_path):
    ids = _dataset(ws, store)
    rep = export_imagefolder(store, ws, "kv", tmp_path / "if", status="all", val_fraction=0.0)
    assert rep.splits == {"train": 4}
    rows = read_metadata(tmp_path / "if" / "train")
    assert {r.text: r.caption_version for r in rows} == {s.text: str(s.caption_version) for s in store.states("kv")}
    assert all((tmp_path / "if" / "train" / r.file_name).is_file() for r in rows)

    export_medart_csv(store, ws, "kv", tmp_path / "csv")
    assert read_metadata(tmp_path / "csv") == [MetadataRow("0000.png", TEXT)]
    assert read_metadata(tmp_path) == []
    assert store.current(ids[0]).status == "approved"


def test_read_metadata_keeps_crlf_inside_quoted_csv_fields(tmp_path):
    (tmp_path / "metadata.csv").write_bytes(b'file_name,text\r\na.png,"one\r\ntwo"\r\n')
    assert read_metadata(tmp_path) == [MetadataRow("a.png", "one\r\ntwo")]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"metadata.jsonl:2 is not valid JSON"):
        read_metadata(tmp_path)


def test_caption_file_accepts_a_bom_and_numbers_rows(ws, store, tmp_path):
    _dataset(ws, store)
    p = tmp_path / "captions.csv"
    p.write_bytes("\ufefffile_name,text\n0001.png,from a BOM file\n,\n".encode("utf-8"))
    assert [(n, r.file_name, r.text) for n, r in read_caption_file(p)] == [(1, "0001.png", "from a BOM file"),
                                                                            (2, "", "")]
    rep = import_captions_report(store, "kv", p)
    assert rep.added == 1 and rep.unmatched == [(2, "", "no image with this file name")]
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"file_name": 3, "text": "t"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1 needs string fields"):
        read_caption_file(bad)
    txt = tmp_path / "captions.txt"
    txt.write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="use a metadata.jsonl or metadata.csv"):
        read_caption_file(txt)
