"""The sample dataset: real medical images from installed packages, deterministic, with provenance."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medart_core import data
from medart_core.data import SAMPLE_CLASSES, SAMPLE_RECIPE, build_sample_dataset, pixel_hash, sample_data_cli
from medart_core.errors import ConfigError


def _build(root: Path):
    from medart_core.captions import CaptionStore
    from medart_core.workspace import Workspace

    ws = Workspace.open(root)
    store = CaptionStore.for_workspace(ws)
    report = build_sample_dataset(ws, store)
    return ws, store, report


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build for the whole module: it is the slow part (~5 s)."""
    ws, store, report = _build(tmp_path_factory.mktemp("sample_a") / "workspace")
    yield ws, store, report
    store.close()


def _manifest(ws, name="sample") -> list[dict]:
    return [json.loads(line) for line in ws.manifest_path(name).read_text(encoding="utf-8").splitlines()]


def test_size_and_classes(built):
    ws, store, report = built
    n = store.count_images("sample")
    assert n >= 200 and n == len(report.imported)
    counts = Counter(store.get_image(i).label for _, i, _ in report.imported)
    assert len(counts) >= 5
    assert set(counts) == set(store.labels("sample")) <= set(SAMPLE_CLASSES)
    assert min(counts.values()) >= 5, counts          # no token classes
    info = store.dataset_info("sample")
    assert info.modality == "mixed"
    assert info.meta == {"seed_captions": SAMPLE_CLASSES, "builder": data.BUILDER}


def test_every_image_is_a_valid_distinct_rgb_png(built):
    ws, store, _ = built
    recs = store.list_images("sample")
    hashes = set()
    for rec in recs:
        path = ws.image_path("sample", rec.file_name)
        assert rec.file_name == f"images/{rec.pixel_hash[:16]}.png"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (rec.width, rec.height)
            assert min(im.size) >= 128
            assert pixel_hash(im) == rec.pixel_hash           # the file holds exactly the hashed pixels
            assert float(np.asarray(im.convert("L"), np.float32).std()) >= data.MIN_STD
        hashes.add(rec.pixel_hash)
    assert len(hashes) == len(recs)
    on_disk = sorted(p.name for p in ws.images_dir("sample").iterdir())
    assert on_disk == sorted(Path(r.file_name).name for r in recs)   # no stray files either way


def test_manifest_is_complete(built):
    ws, store, _ = built
    manifest = _manifest(ws)
    recs = {r.file_name: r for r in store.list_images("sample")}
    assert sorted(m["file_name"] for m in manifest) == sorted(recs)
    site = {}
    for m in manifest:
        rec = recs[m["file_name"]]
        assert m["label"] == rec.label and m["pixel_hash"] == rec.pixel_hash
        assert (m["width"], m["height"]) == (rec.width, rec.height)
        for key in ("package", "version", "source_file", "licence", "origin", "crop_box", "conversions",
                    "frame", "view", "label_basis"):
            assert m.get(key) not in (None, "", []), (key, m)
        assert m["version"] == importlib.metadata.version(m["package"])
        if m["package"] not in site:
            site[m["package"]] = Path(importlib.metadata.distribution(m["package"]).locate_file(""))
        assert (site[m["package"]] / m["source_file"]).is_file()
        if m["source_file"].endswith(".dcm"):
            assert m["windowing"] is not None or "palette" in " ".join(m["conversions"]) \
                or m["dicom"]["photometric"] in ("RGB", "YBR_FULL_422")
            assert m["dicom"]["modality"]
        left, top, right, bottom = m["crop_box"]
        assert right > left and bottom > top
        # provenance in the store matches the manifest
        assert {k: v for k, v in rec.source.items() if k != "original_name"} == \
            {k: v for k, v in m.items() if k not in ("file_name", "label", "pixel_hash", "width", "height")}
    # every recipe source contributed, and MONOCHROME1 / windowing / upscaling were recorded where they apply
    assert {m["source_file"] for m in manifest} == {s.file for s in SAMPLE_RECIPE}
    chest = [m for m in manifest if m["label"] == "xray_chest"]
    assert all("MONOCHROME1 inverted" in m["conversions"] for m in chest)
    assert any(m["windowing"]["method"] == "window (preset)" for m in manifest if m["label"] == "ct_abdomen")
    assert all(any("upscaled x2" in c for c in m["conversions"]) for m in manifest if m["label"] == "mr_head")
    assert any(m["view"] == "tile" for m in manifest) and any(m["view"] == "full" for m in manifest)


def test_tiles_do_not_overlap(built):
    ws, _, _ = built
    by_frame: dict[tuple, list] = {}
    for m in _manifest(ws):
        if m["view"] == "tile":
            by_frame.setdefault((m["source_file"], m["frame"]), []).append(m["crop_box"])
    assert by_frame
    for boxes in by_frame.values():
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                overlap_x = min(a[2], b[2]) - max(a[0], b[0])
                overlap_y = min(a[3], b[3]) - max(a[1], b[1])
                assert overlap_x <= 0 or overlap_y <= 0, (a, b)


def test_seed_captions_are_template_drafts(built):
    ws, store, _ = built
    states = store.states("sample")
    assert len(states) == store.count_images("sample")
    for st in states:
        label = store.get_image(st.image_id).label
        assert st.text == SAMPLE_CLASSES[label]
        assert st.status == "pending" and not st.edited
        assert st.latest_draft is not None and st.latest_draft.source == "template"


def test_build_is_deterministic(built, tmp_path):
    ws_a, store_a, _ = built
    ws_b, store_b, _ = _build(tmp_path / "workspace_b")
    try:
        files_a = {p.name: p.read_bytes() for p in ws_a.images_dir("sample").iterdir()}
        files_b = {p.name: p.read_bytes() for p in ws_b.images_dir("sample").iterdir()}
        assert files_a == files_b
        assert ws_a.manifest_path("sample").read_bytes() == ws_b.manifest_path("sample").read_bytes()
        assert [(r.file_name, r.label) for r in store_a.list_images("sample")] == \
            [(r.file_name, r.label) for r in store_b.list_images("sample")]
    finally:
        store_b.close()


def test_second_build_is_refused_and_changes_nothing(built):
    ws, store, _ = built
    n = store.count_images("sample")
    manifest = ws.manifest_path("sample").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        build_sample_dataset(ws, store)
    assert store.count_images("sample") == n
    assert ws.manifest_path("sample").read_bytes() == manifest
    assert list(ws.tmp_dir.iterdir()) == []


def test_licence_statements_are_checked_against_the_packages():
    for src in SAMPLE_RECIPE:
        data._check_evidence(src)                      # every recorded statement is really there
        assert src.label in SAMPLE_CLASSES
    bogus = dataclasses.replace(SAMPLE_RECIPE[0], evidence=((data._README_EVIDENCE, "released under GPL-3"),))
    with pytest.raises(ConfigError, match="no longer in"):
        data._check_evidence(bogus)


def test_failed_sample_build_leaves_nothing(ws, store, monkeypatch):
    # Stop the build after a few images: no dataset, no files, no staging left behind.
    real = data.iter_sample_images

    def short():
        for k, item in enumerate(real()):
            if k == 3:
                raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(data, "iter_sample_images", short)
    with pytest.raises(KeyboardInterrupt):
        build_sample_dataset(ws, store, "s2")
    assert not store.has_dataset("s2")
    assert not ws.dataset_dir("s2").exists()
    assert list(ws.tmp_dir.iterdir()) == []


def test_sample_data_cli_reports_existing_dataset(built, capsys):
    ws, _, _ = built
    assert sample_data_cli(str(ws.root), "sample") == 2
    assert "already exists" in capsys.readouterr().err
