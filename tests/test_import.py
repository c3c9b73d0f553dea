"""Importing users' images: formats and colour modes, DICOM, bad inputs, duplicates, unsafe names, atomicity."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medart_core import data
from medart_core.data import (ALPHA_BACKGROUND, ImportReport, import_cli, import_images, load_dicom,
                              load_image_file, pixel_hash)
from medart_core.errors import ConfigError, InvalidImageError, NotFoundError


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def ramp(w: int = 32, h: int = 24, seed: int = 0) -> np.ndarray:
    """A small RGB image that differs per seed (so pixel hashes differ)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 7 + seed * 31) % 256, (y * 9 + seed * 17) % 256, ((x + y) * 3 + seed) % 256],
                    axis=-1).astype(np.uint8)


def save_rgb(path: Path, seed: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ramp(seed=seed), "RGB").save(path, format=fmt)
    return path


def write_dicom(path: Path, arr: np.ndarray, *, photometric: str = "MONOCHROME2", modality: str = "CT",
                body_part: str | None = None, window: tuple[float, float] | None = None,
                rescale: tuple[float, float] | None = None, bits_stored: int = 12) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    frames = arr.shape[0] if arr.ndim == 3 else 1
    ds.Rows, ds.Columns = arr.shape[-2], arr.shape[-1]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = arr.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def snapshot(ws, store) -> tuple[dict, list]:
    """Every file under the workspace (bytes hash) and every dataset with its image count."""
    files = {}
    for p in sorted(ws.root.rglob("*")):
        if p.is_file() and not p.name.startswith("captions.sqlite"):
            files[p.relative_to(ws.root).as_posix()] = p.read_bytes()
    dirs = sorted(p.relative_to(ws.root).as_posix() for p in ws.root.rglob("*")
                  if p.is_dir() and p.name != "tmp")
    datasets = [(d.name, d.n_images) for d in store.list_datasets()]
    return {"files": files, "dirs": dirs}, datasets


def reasons(report: ImportReport) -> dict[str, str]:
    return {name: why for name, why in report.skipped}


# ------------------------------------------------------------------------------------------------
# colour modes and formats
# ------------------------------------------------------------------------------------------------
def _mode_images(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, phrase its conversion note must contain)."""
    tmp.mkdir(parents=True, exist_ok=True)
    rgb = ramp()
    out: dict[str, tuple[Path, str]] = {}

    def put(name, img, phrase, **kw):
        p = tmp / name
        img.save(p, **kw)
        out[name] = (p, phrase)

    put("rgb.png", Image.fromarray(rgb), "RGB 8-bit (unchanged)")
    put("gray.png", Image.fromarray(rgb[..., 0]), "grayscale 8-bit")
    put("bw.png", Image.fromarray(rgb[..., 0] > 128), "1-bit")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    put("rgba.png", Image.fromarray(rgba, "RGBA"), "alpha composited on black")
    put("la.png", Image.fromarray(rgba[..., [0, 3]], "LA"), "alpha composited on black")
    put("palette.png", Image.fromarray(rgb).convert("P"), "palette -> RGB")
    pt = Image.fromarray(rgb).convert("P")
    pt.info["transparency"] = 0
    put("palette_t.png", pt, "palette with transparency", transparency=0)
    put("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), "CMYK -> RGB")
    put("i16.png", Image.fromarray((rgb[..., 0].astype(np.uint16) * 200)), "16-bit")
    put("i32.tif", Image.fromarray(rgb[..., 1].astype(np.int32) * 1000 - 5000), "32-bit integer")
    put("float.tif", Image.fromarray(rgb[..., 2].astype(np.float32) / 7.0), "32-bit float")
    put("photo.jpg", Image.fromarray(rgb), "JPEG")
    put("scan.bmp", Image.fromarray(rgb), "BMP")
    put("scan.tiff", Image.fromarray(rgb), "TIFF")
    return out


def test_every_colour_mode_is_normalised_to_rgb8(tmp_path):
    for name, (path, phrase) in _mode_images(tmp_path / "modes").items():
        img, note = load_image_file(path)
        assert img.mode == "RGB", name
        assert img.size == (32, 24), name
        assert phrase in note, (name, note)


def test_mode_conversions_are_exact(tmp_path):
    # RGBA: fully transparent red must become the documented background, opaque pixels stay.
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255
    a[0, 0, 3] = 255           # one opaque red pixel
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    img, _ = load_image_file(tmp_path / "a.png")
    px = np.asarray(img)
    assert tuple(px[0, 0]) == (255, 0, 0)
    assert tuple(px[1, 1]) == ALPHA_BACKGROUND
    # 16-bit: the data range maps to 0..255 linearly.
    g = np.array([[1000, 2000], [3000, 5000]], np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    img, note = load_image_file(tmp_path / "g16.png")
    assert np.asarray(img)[..., 0].tolist() == [[0, 64], [128, 255]]
    assert "[1000, 5000]" in note
    # float with NaN is refused, not silently mapped
    f = np.array([[0.0, np.nan], [1.0, 2.0]], np.float32)
    Image.fromarray(f).save(tmp_path / "nan.tif")
    with pytest.raises(InvalidImageError, match="NaN"):
        load_image_file(tmp_path / "nan.tif")


def test_16_bit_colour_png_is_reduced_and_noted(tmp_path):
    # Pillow cannot write 16-bit RGB PNGs, so build one by hand: values v -> high byte v >> 8.
    w, h = 4, 2
    vals = (np.arange(w * 3, dtype=np.uint32) * 5000).astype(">u2")
    raw = b"".join(b"\x00" + vals.tobytes() for _ in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    (tmp_path / "rgb16.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    img, note = load_image_file(tmp_path / "rgb16.png")
    assert "16-bit colour reduced to 8 bits" in note
    assert np.asarray(img)[0].ravel().tolist() == [int(v) >> 8 for v in vals]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(ramp(16, 8))
    exif = Image.Exif()
    exif[0x0112] = 6            # "rotate 90 CW on display"
    img.save(tmp_path / "o.jpg", exif=exif.tobytes())
    out, note = load_image_file(tmp_path / "o.jpg")
    assert out.size == (8, 16)
    assert "EXIF orientation applied" in note


def test_pixel_hash_is_about_pixels_not_files(tmp_path):
    arr = ramp()
    Image.fromarray(arr).save(tmp_path / "a.png", compress_level=1)
    Image.fromarray(arr).save(tmp_path / "b.bmp")
    a, _ = load_image_file(tmp_path / "a.png")
    b, _ = load_image_file(tmp_path / "b.bmp")
    assert pixel_hash(a) == pixel_hash(b)
    # same bytes, transposed shape: different images
    flat = Image.frombytes("RGB", (24, 32), a.tobytes())
    assert pixel_hash(flat) != pixel_hash(a)


# ------------------------------------------------------------------------------------------------
# sources: folder per class, CSV, single file, DICOM
# ------------------------------------------------------------------------------------------------
def test_folder_per_class_import(ws, store, tmp_path):
    src = tmp_path / "src"
    save_rgb(src / "lung" / "a.png", 1)
    save_rgb(src / "lung" / "b.jpg", 2)
    save_rgb(src / "Skin Lesion" / "nested" / "c.png", 3)
    (src / ".hidden").mkdir()
    save_rgb(src / ".hidden" / "x.png", 4)
    (src / ".DS_Store").write_bytes(b"junk")
    rep = import_images(ws, store, src, "derm", modality="dermoscopy")
    assert rep.created and not rep.skipped
    assert sorted(lab for _, _, lab in rep.imported) == ["Skin_Lesion", "lung", "lung"]
    assert store.dataset_info("derm").modality == "dermoscopy"
    for name, image_id, label in rep.imported:
        rec = store.get_image(image_id)
        assert rec.label == label
        assert rec.file_name == f"images/{rec.pixel_hash[:16]}.png"
        assert "original_name" not in rec.source   # original names can carry patient names (issue 11)
        path = ws.image_path("derm", rec.file_name)
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (rec.width, rec.height)
            assert pixel_hash(im) == rec.pixel_hash
    manifest = [json.loads(line) for line in ws.manifest_path("derm").read_text().splitlines()]
    assert sorted(m["file_name"] for m in manifest) == sorted(
        store.get_image(i).file_name for _, i, _ in rep.imported)
    assert list(ws.tmp_dir.iterdir()) == []        # staging cleaned up
    json.loads(rep.to_json())
    assert "Imported 3 image(s)" in rep.summary()


def test_flat_folder_uses_label_argument(ws, store, tmp_path):
    save_rgb(tmp_path / "flat" / "one.png", 1)
    save_rgb(tmp_path / "flat" / "two.png", 2)
    rep = import_images(ws, store, tmp_path / "flat", "d", label="chest xray")
    assert [lab for _, _, lab in rep.imported] == ["chest_xray", "chest_xray"]
    rep = import_images(ws, store, save_rgb(tmp_path / "three.png", 3), "d")
    assert [lab for _, _, lab in rep.imported] == [data.UNLABELED]
    assert store.count_images("d") == 3
    assert len(ws.manifest_path("d").read_text().splitlines()) == 3   # manifest appended, not replaced


def test_csv_import_with_captions(ws, store, tmp_path):
    src = tmp_path / "csvsrc"
    save_rgb(src / "imgs" / "a.png", 1)
    save_rgb(src / "imgs" / "b.png", 2)
    save_rgb(src / "c.png", 3)
    (src / "list.csv").write_text(
        "file_name,label,text\n"
        'imgs/a.png,polyp,"A sessile polyp, 5 mm, in the sigmoid colon"\n'
        "imgs/b.png,normal,\n"
        "c.png,,Normal mucosa\n", encoding="utf-8")
    rep = import_images(ws, store, src / "list.csv", "endo", label="fallback")
    assert not rep.skipped
    by_name = {n: (i, lab) for n, i, lab in rep.imported}
    assert by_name["imgs/a.png"][1] == "polyp"
    assert by_name["c.png"][1] == "fallback"
    st = store.current(by_name["imgs/a.png"][0])
    assert st.text == "A sessile polyp, 5 mm, in the sigmoid colon"
    assert st.latest_draft.source == "import"
    assert store.current(by_name["imgs/b.png"][0]).latest_draft is None   # empty text: no draft
    assert store.current(by_name["c.png"][0]).text == "Normal mucosa"


def test_dicom_folder_import_labels_from_tags(ws, store, tmp_path):
    import pydicom.data

    src = tmp_path / "dicoms"
    ramp16 = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    write_dicom(src / "head.dcm", ramp16, modality="CT", body_part="HEAD", window=(1000, 2000))
    vol = np.stack([ramp16, 4095 - ramp16, ramp16.T.copy()])
    write_dicom(src / "cine", vol, modality="MR", body_part="KNEE")      # no suffix, 3 frames
    real = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    (src / "real.dcm").write_bytes(real.read_bytes())
    rep = import_images(ws, store, src, "dcm")
    assert not rep.skipped, rep.skipped
    labels = sorted(lab for _, _, lab in rep.imported)
    assert labels == ["ct", "ct_head", "mr_knee", "mr_knee", "mr_knee"]
    names = [n for n, _, _ in rep.imported]
    assert "cine [frame 2]" in names
    rec = store.get_image(dict((n, i) for n, i, _ in rep.imported)["head.dcm"])
    assert rec.source["dicom"]["windowing"]["method"] == "window (from file, first)"
    assert rec.source["dicom"]["body_part"] == "HEAD"
    # an explicit label wins over the tags
    write_dicom(tmp_path / "one" / "x.dcm", ramp16 + 1, modality="CT", body_part="HEAD")
    rep = import_images(ws, store, tmp_path / "one", "dcm", label="brain")
    assert [lab for _, _, lab in rep.imported] == ["brain"]


def test_dicom_windowing_and_monochrome1(tmp_path):
    vals = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    m2 = write_dicom(tmp_path / "m2.dcm", vals, window=(2048, 1024))
    m1 = write_dicom(tmp_path / "m1.dcm", vals, window=(2048, 1024), photometric="MONOCHROME1")
    (a, info2), = load_dicom(m2)
    (b, info1), = load_dicom(m1)
    ga, gb = np.asarray(a)[..., 0].astype(int), np.asarray(b)[..., 0].astype(int)
    assert (np.diff(ga.ravel()) >= 0).all()               # monotonic ramp survives
    assert ga.ravel()[0] == 0 and ga.ravel()[-1] == 255   # below / above the window saturate
    assert (ga + gb == 255).all()                          # MONOCHROME1 is the exact inverse
    assert "MONOCHROME1 inverted" in info1["conversions"]
    assert info2["windowing"] == {"method": "window (from file, first)", "center": 2048.0, "width": 1024.0,
                                  "function": "LINEAR"}
    # values inside the window map linearly: centre -> mid-grey
    mid = ga.ravel()[np.argmin(np.abs(vals.ravel().astype(int) - 2048))]
    assert abs(int(mid) - 128) <= 2
    # no window in the file: the percentile range is used and recorded
    (c, info3), = load_dicom(write_dicom(tmp_path / "nowin.dcm", vals))
    assert info3["windowing"]["method"].startswith("percentile")
    # a preset window overrides the file
    (d, info4), = load_dicom(m2, window=(100, 50))
    assert info4["windowing"]["method"] == "window (preset)"
    gd = np.asarray(d)[..., 0].ravel()
    assert gd[0] == 0 and gd[-1] == 255
    assert gd[5] == 26                                      # value 80 in window 75..125 -> 0.1 * 255


def test_real_palette_and_multiframe_dicom():
    import pydicom.data

    frames = load_dicom(pydicom.data.get_testdata_file("emri_small.dcm"))
    assert len(frames) == 10 and all(im.mode == "RGB" and im.size == (64, 64) for im, _ in frames)
    assert len({pixel_hash(im) for im, _ in frames}) == 10
    (pal, info), = load_dicom(pydicom.data.get_testdata_file("gdcm-US-ALOKA-16.dcm"))
    assert pal.mode == "RGB" and any("palette" in c for c in info["conversions"])
    (mono1, info), = load_dicom(pydicom.data.get_testdata_file("RG3_UNCR.dcm"))
    assert "MONOCHROME1 inverted" in info["conversions"]


# ------------------------------------------------------------------------------------------------
# bad inputs: each is skipped with a reason, the rest is imported
# ------------------------------------------------------------------------------------------------
def _png_header_bomb(path: Path, width: int, height: int) -> None:
    """A tiny, well-formed PNG whose header claims an enormous size."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def test_bad_files_are_skipped_with_reasons(ws, store, tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    save_rgb(src / "good.png", 1)
    (src / "empty.png").write_bytes(b"")
    full = (save_rgb(tmp_path / "t.png", 2)).read_bytes()
    (src / "truncated.png").write_bytes(full[: len(full) // 2])
    (src / "notes.png").write_text("this is not an image")
    (src / "readme.txt").write_text("hello")
    _png_header_bomb(src / "bomb.png", 100_000, 100_000)
    _png_header_bomb(src / "bomb_small.png", 9_000, 8_000)   # 72 M px: over our cap, under Pillow's error
    (src / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    (src / "dup.png").write_bytes((src / "good.png").read_bytes())
    save_rgb(src / "dup_other_format.bmp", 1, fmt="BMP")
    rep = import_images(ws, store, src, "d")
    why = reasons(rep)
    assert [n for n, _, _ in rep.imported] == ["dup.png"]      # first of three identical images (sorted walk)
    assert "empty file" in why["empty.png"]
    assert "truncated" in why["truncated.png"] or "cannot decode" in why["truncated.png"]
    assert "not a PNG" in why["notes.png"]
    assert "unsupported file type" in why["readme.txt"]
    assert "bomb" in why["bomb.png"]
    assert "pixel limit" in why["bomb_small.png"]
    assert "DICOM" in why["random.dcm"]
    assert "duplicate" in why["good.png"] and "duplicate" in why["dup_other_format.bmp"]
    assert len(rep.skipped) == 9
    assert store.count_images("d") == 1
    assert len(list(ws.images_dir("d").iterdir())) == 1
    text = rep.summary()
    assert "Skipped 9 file(s)" in text


def test_max_pixels_can_be_lowered(monkeypatch, tmp_path):
    save_rgb(tmp_path / "a.png")
    monkeypatch.setattr(data, "MAX_PIXELS", 100)
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        load_image_file(tmp_path / "a.png")


def test_duplicates_of_images_already_in_the_dataset(ws, store, tmp_path):
    save_rgb(tmp_path / "a" / "x.png", 1)
    save_rgb(tmp_path / "b" / "x_again.png", 1)
    save_rgb(tmp_path / "b" / "new.png", 2)
    import_images(ws, store, tmp_path / "a", "d")
    rep = import_images(ws, store, tmp_path / "b", "d")
    assert [n for n, _, _ in rep.imported] == ["new.png"]
    assert "already in dataset" in reasons(rep)["x_again.png"]
    rep = import_images(ws, store, tmp_path / "b", "d")
    assert rep.imported == [] and len(rep.skipped) == 2
    assert "Nothing was imported" in rep.summary()


def test_unsafe_csv_entries_are_skipped(ws, store, tmp_path):
    outside = save_rgb(tmp_path / "secret.png", 9)
    src = tmp_path / "proj"
    save_rgb(src / "ok.png", 1)
    save_rgb(src / "ok2.png", 2)
    (src / "link.png").symlink_to(outside)
    rows = [
        "file_name,label,text",
        "ok.png,good,fine",
        "../secret.png,x,",
        f"{outside},x,",
        "sub/../../secret.png,x,",
        "..\\secret.png,x,",
        "link.png,x,",
        "ok2.png,bad\x07label,",
        "ok\x1b[31m.png,x,",
        "ok2.png,x,\x00caption",
        "missing.png,x,",
        "ok2.png,too,many,columns",
        "ok2.png,../etc,",
        f"ok2.png,long,{'x' * 4001}",
    ]
    (src / "list.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    rep = import_images(ws, store, src / "list.csv", "d")
    assert [n for n, _, _ in rep.imported] == ["ok.png"]
    why = [r for _, r in rep.skipped]
    assert len(rep.skipped) == len(rows) - 2
    assert sum("unsafe path" in r for r in why) == 5          # ../, absolute, sub/../.., backslash, symlink
    assert sum("control characters" in r for r in why) == 3
    assert any("file not found" in r for r in why)
    assert any("more columns" in r for r in why)
    assert any("not usable as a class name" in r for r in why)
    assert any("4,001 characters" in r for r in why)
    # the summary escapes control characters instead of printing them
    assert "\x1b" not in rep.summary() and "\\x1b" in rep.summary()


def test_csv_errors_are_user_errors(ws, store, tmp_path):
    (tmp_path / "nohdr.csv").write_text("a.png,b\n")
    with pytest.raises(ConfigError, match="file_name"):
        import_images(ws, store, tmp_path / "nohdr.csv", "d")
    (tmp_path / "latin.csv").write_bytes("file_name,label\ncaf\xe9.png,x\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        import_images(ws, store, tmp_path / "latin.csv", "d")
    with pytest.raises(NotFoundError):
        import_images(ws, store, tmp_path / "nope", "d")
    with pytest.raises(ConfigError):
        import_images(ws, store, tmp_path, "../evil")
    assert store.list_datasets() == []


def test_control_characters_in_file_names(ws, store, tmp_path):
    src = tmp_path / "src"
    save_rgb(src / "fine.png", 1)
    save_rgb(src / "bad\nname.png", 2)
    rep = import_images(ws, store, src, "d")
    assert [n for n, _, _ in rep.imported] == ["fine.png"]
    assert "control characters" in reasons(rep)["bad\nname.png"]


# ------------------------------------------------------------------------------------------------
# atomicity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failed_store_write_leaves_workspace_unchanged(ws, store, tmp_path, monkeypatch, exc):
    save_rgb(tmp_path / "first" / "a.png", 1)
    import_images(ws, store, tmp_path / "first", "old")
    for i in range(2, 6):
        save_rgb(tmp_path / "more" / f"{i}.png", i)
    before = snapshot(ws, store)

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(store, "add_images", boom)
    for target in ("old", "new"):           # an existing dataset, and one the import would create
        with pytest.raises(type(exc)):
            import_images(ws, store, tmp_path / "more", target)
        assert snapshot(ws, store) == before
        assert list(ws.tmp_dir.iterdir()) == []
        assert not ws.dataset_dir("new").exists()
    monkeypatch.undo()
    rep = import_images(ws, store, tmp_path / "more", "new")    # and a retry then works
    assert len(rep.imported) == 4 and store.count_images("new") == 4


def test_interrupt_while_decoding_leaves_workspace_unchanged(ws, store, tmp_path, monkeypatch):
    for i in range(4):
        save_rgb(tmp_path / "src" / f"{i}.png", i)
    before = snapshot(ws, store)
    real = data.load_image_file
    calls = []

    def flaky(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path)
    monkeypatch.setattr(data, "load_image_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        import_images(ws, store, tmp_path / "src", "d")
    assert snapshot(ws, store) == before
    assert list(ws.tmp_dir.iterdir()) == []


def test_real_store_rejection_rolls_back_new_dataset(ws, store, tmp_path, monkeypatch):
    """A genuine failure inside the store's transaction (SQLite's UNIQUE constraint firing after some rows
    were inserted) rolls back the rows and the new dataset, and leaves no file behind."""
    from dataclasses import replace

    for i in range(3):
        save_rgb(tmp_path / "s" / f"{i}.png", i)
    before = snapshot(ws, store)
    real = store.add_images

    def with_a_clash(dataset, records, drafts=None):
        clash = replace(records[0], file_name="images/clash.png")      # same pixel hash as the first
        return real(dataset, records + [clash], drafts=None if drafts is None else drafts + [None])
    monkeypatch.setattr(store, "add_images", with_a_clash)
    with pytest.raises(ConfigError, match="same pixels"):
        import_images(ws, store, tmp_path / "s", "fresh")
    assert snapshot(ws, store) == before
    assert not store.has_dataset("fresh")


def test_import_cli(tmp_path, capsys):
    save_rgb(tmp_path / "src" / "c1" / "a.png", 1)
    rc = import_cli(str(tmp_path / "src"), str(tmp_path / "w"), "cli_ds", "generic", None)
    out = capsys.readouterr().out
    assert rc == 0 and "Imported 1 image(s)" in out
    rc = import_cli(str(tmp_path / "src"), str(tmp_path / "w"), "cli_ds", "generic", None)
    assert rc == 1 and "duplicate" in capsys.readouterr().out
    rc = import_cli(str(tmp_path / "missing"), str(tmp_path / "w"), "cli_ds", "generic", None)
    assert rc == 2 and "Nothing to import" in capsys.readouterr().err


def test_import_from_a_folder_containing_the_workspace(tmp_path, monkeypatch):
    """`import .` from a project folder that holds ./workspace must not re-import the workspace itself."""
    from medart_core.captions import CaptionStore
    from medart_core.workspace import Workspace

    proj = tmp_path / "proj"
    save_rgb(proj / "cls" / "a.png", 1)
    ws = Workspace.open(proj / "workspace")
    store = CaptionStore.for_workspace(ws)
    try:
        first = import_images(ws, store, proj, "one")
        second = import_images(ws, store, proj, "two")
        assert [n for n, _, _ in first.imported] == ["cls/a.png"]
        assert [n for n, _, _ in second.imported] == ["cls/a.png"] and not second.skipped
    finally:
        store.close()
