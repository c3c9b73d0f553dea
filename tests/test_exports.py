"""Caption exports: HF imagefolder (checked with `datasets` itself) and the Med-Art CSV layout."""
from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from medart_core.captions import ImageRecord
from medart_core.errors import ConfigError, NotFoundError
from medart_core.interchange import export_imagefolder, export_medart_csv, import_captions_report

LABELS = ("polyp", "ulcer", "normal")
TRICKY = 'Polyp, 5 mm; "sessile"\nsecond line with <script>x</script> and ünïcode'


def _make_dataset(ws, store, n_per_label: int = 4, name: str = "kv") -> list[int]:
    """Real PNGs on disk plus store records, one distinct colour per image."""
    store.create_dataset(name, modality="endoscopy")
    ws.images_dir(name).mkdir(parents=True, exist_ok=True)
    recs, drafts = [], []
    k = 0
    for label in LABELS:
        for j in range(n_per_label):
            file_name = f"images/{k:04d}.png"
            Image.new("RGB", (8, 6), (k * 20 % 256, j * 40, 7)).save(ws.dataset_dir(name) / file_name)
            recs.append(ImageRecord(None, name, file_name, label, f"{k:064x}", 8, 6, {"original_name": f"{k}.jpg"}))
            drafts.append((f"An endoscopic image of {label} #{j}", "template"))
            k += 1
    return store.add_images(name, recs, drafts=drafts)


def _approve(store, image_id: int, text: str | None = None) -> None:
    v = store.current(image_id).version
    if text is not None:
        v = store.edit(image_id, text, reviewer="amy", expected_version=v).id
    store.approve(image_id, reviewer="amy", expected_version=v)


def test_imagefolder_round_trip_with_datasets(ws, store, tmp_path):
    import datasets

    ids = _make_dataset(ws, store)
    for n, i in enumerate(ids[:-2]):              # the last two stay pending / rejected
        _approve(store, i, TRICKY if n == 0 else None)
    store.set_status(ids[-1], "rejected", reviewer="amy", expected_version=store.current(ids[-1]).version)
    out = tmp_path / "export"
    rep = export_imagefolder(store, ws, "kv", out, val_fraction=0.25, seed=3)
    assert rep.exported == len(ids) - 2
    assert rep.skipped_by_status == {"pending": 1, "rejected": 1}
    assert rep.splits["train"] + rep.splits["validation"] == rep.exported and rep.splits["validation"] >= 1
    assert "Exported 10" in rep.summary()

    expected = {s.image_id: s for s in store.states("kv", status="approved")}
    by_text = {s.text: s for s in expected.values()}
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf_cache"))
    assert set(ds) == {"train", "validation"}
    assert ds["train"].num_rows == rep.splits["train"] and ds["validation"].num_rows == rep.splits["validation"]
    seen = 0
    for split in ds.values():
        assert {"image", "text", "label", "caption_version", "status"} <= set(split.column_names)
        for row in split:
            st = by_text[row["text"]]           # every caption arrives verbatim ...
            assert row["label"] == st.label     # ... with its own label
            assert row["caption_version"] == st.caption_version and row["status"] == "approved"
            assert row["image"].size == (8, 6)
            seen += 1
    assert seen == len(expected)
    assert TRICKY in by_text
    # Stratified: every label with approved images has at least one in train.
    assert set(ds["train"]["label"]) == {s.label for s in expected.values()}


def test_imagefolder_split_is_deterministic_and_copies_files(ws, store, tmp_path):
    ids = _make_dataset(ws, store, n_per_label=5)
    for i in ids:
        _approve(store, i)

    def split_names(out):
        return {split: sorted(json.loads(line)["file_name"] for line in
                              (out / split / "metadata.jsonl").read_text().splitlines())
                for split in ("train", "validation")}

    a = export_imagefolder(store, ws, "kv", tmp_path / "a", val_fraction=0.2, seed=1)
    b = export_imagefolder(store, ws, "kv", tmp_path / "b", val_fraction=0.2, seed=1)
    assert split_names(tmp_path / "a") == split_names(tmp_path / "b")
    assert a.splits == b.splits == {"train": 12, "validation": 3}
    # Stratified: one validation image per label (5 each x 0.2).
    val_labels = [json.loads(line)["label"] for line in (tmp_path / "a/validation/metadata.jsonl").read_text().splitlines()]
    assert sorted(val_labels) == sorted(LABELS)
    for split, names in split_names(tmp_path / "a").items():
        for n in names:
            assert (tmp_path / "a" / split / n).is_file()
    # The export is a copy: deleting it leaves the dataset alone.
    assert all(ws.image_path("kv", store.get_image(i).file_name).is_file() for i in ids)
    c = export_imagefolder(store, ws, "kv", tmp_path / "c", val_fraction=0.2, seed=2)
    assert c.splits == a.splits
    assert split_names(tmp_path / "c") != split_names(tmp_path / "a")   # the seed matters


def test_imagefolder_small_dataset_keeps_train(ws, store, tmp_path):
    ids = _make_dataset(ws, store, n_per_label=1)
    _approve(store, ids[0])
    rep = export_imagefolder(store, ws, "kv", tmp_path / "one", val_fraction=0.5)
    assert rep.splits == {"train": 1}
    assert not (tmp_path / "one" / "validation").exists()
    rep_all = export_imagefolder(store, ws, "kv", tmp_path / "all", status="all", val_fraction=0.5)
    assert rep_all.exported == 3 and rep_all.splits["train"] >= 1 and rep_all.skipped_by_status == {}


def test_export_refuses_nonempty_dir_and_is_atomic(ws, store, tmp_path):
    ids = _make_dataset(ws, store, n_per_label=2)
    for i in ids:
        _approve(store, i)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_medart_csv(store, ws, "kv", out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    rep = export_medart_csv(store, ws, "kv", out, overwrite=True)
    assert rep.exported == len(ids) and not (out / "keep.txt").exists()
    # A missing image file aborts the export and leaves neither a partial export nor temp folders.
    ws.image_path("kv", store.get_image(ids[0]).file_name).unlink()
    with pytest.raises(NotFoundError, match="missing"):
        export_imagefolder(store, ws, "kv", tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "workspace"]
    with pytest.raises(ConfigError):
        export_imagefolder(store, ws, "kv", tmp_path / "x", val_fraction=1.0)
    with pytest.raises(ConfigError):
        export_imagefolder(store, ws, "kv", tmp_path / "x", status="done")


def test_export_without_approved_captions_explains(ws, store, tmp_path):
    _make_dataset(ws, store, n_per_label=1)
    with pytest.raises(ConfigError, match="approve"):
        export_imagefolder(store, ws, "kv", tmp_path / "none")


def test_medart_csv_quoting_round_trip(ws, store, tmp_path):
    ids = _make_dataset(ws, store, n_per_label=2)
    texts = {ids[0]: TRICKY, ids[1]: "plain", ids[2]: 'only "quotes"', ids[3]: "a,b,c", ids[4]: ""}
    for i, t in texts.items():
        _approve(store, i, t)
    out = tmp_path / "csv"
    rep = export_medart_csv(store, ws, "kv", out)
    assert rep.exported == 5 and rep.skipped_by_status == {"pending": 1}
    with (out / "metadata.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [list(r) for r in rows[:1]] == [["file_name", "text"]]
    got = {r["file_name"]: r["text"] for r in rows}
    want = {store.get_image(i).file_name.split("/")[-1]: t for i, t in texts.items()}
    assert got == want
    for name in got:
        with Image.open(out / name) as im:
            assert im.size == (8, 6)
    # The export reads back in as captions (file names match the stored basenames).
    assert import_captions_report(store, "kv", out / "metadata.csv").added == 4   # the empty caption is skipped
