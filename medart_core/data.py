"""Getting images in: validating and normalising user files (PNG/JPEG/TIFF/BMP, DICOM), and the sample dataset.

Every image that enters a workspace is normalised to **RGB, 8 bits per channel** and stored as a PNG named
by the hash of those pixels (``images/<pixel_hash[:16]>.png``); the conversion that got it there is
recorded next to it (``ImageRecord.source`` and the dataset's ``manifest.jsonl``), so a reviewer can tell
a windowed 12-bit CT from a composited RGBA screenshot.

An import is all or nothing. Files are decoded and written to a private staging folder under
``ws.tmp_dir``; then one caption-store transaction adds every record; only after it commits are the files
moved into ``datasets/<name>/images/``. A failure (a bad database write, Ctrl-C) before that commit
removes the staging folder and leaves the workspace as it was: no image file is ever in the final folder
without its database row. Bad *inputs* never fail an import: each is skipped with a reason in the report.

Patient-data hygiene: nothing that identifies a patient is stored, served, logged or exported unless an admin
opts in for that dataset (``import_images(..., keep_identifiers=True)``, CLI ``import --keep-identifiers``,
which creates the dataset with ``meta["keep_identifiers"] = True``). By default an import keeps only a
whitelist of technical DICOM attributes (:data:`DICOM_STORED_TAGS`: modality, body part, photometric
interpretation, bits, frames, transfer syntax and the window/LUT actually applied) and never the patient,
physician, institution, date, description or UID attributes (DICOM PS3.15 Annex E basic profile;
:data:`DICOM_IDENTIFYING_KEYWORDS` lists the ones kept with the opt-in). Nor are original file or folder
names kept: images are named by pixel hash, the provenance and manifest carry no ``original_name``, and the
folders of a DICOM tree are not used as class labels (clinical exports name them after patients). Only the
in-memory :class:`ImportReport` handed back to whoever ran the import names the files as they gave them.
A DICOM marked ``BurnedInAnnotation = YES`` is imported with ``needs_phi_review: true`` in its provenance
and manifest line, and counted in the report.

The sample dataset (``build_sample_dataset``) is cut from real medical images that ship inside installed
packages (pydicom's test files, pydicom-data, scikit-image's data) with the recipe in ``SAMPLE_RECIPE``;
``assets/sample_data/README.md`` documents it and the licences.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

from . import durable
from .errors import ConfigError, InvalidImageError, MedArtError, NotFoundError
from .interchange import csv_cell_text
from .workspace import Workspace, validate_name

if TYPE_CHECKING:
    from .captions import CaptionStore, ImageRecord

__all__ = [
    "MAX_PIXELS", "MAX_FRAMES", "MAX_FILE_BYTES", "IMAGE_SUFFIXES", "DICOM_SUFFIXES", "ALPHA_BACKGROUND",
    "SAMPLE_CLASSES", "SAMPLE_RECIPE", "SampleSource", "ImportReport",
    "pixel_hash", "load_image_file", "load_dicom", "dicom_label", "normalize_label",
    "import_images", "build_sample_dataset", "import_cli", "sample_data_cli",
    "DICOM_STORED_TAGS", "DICOM_IDENTIFYING_KEYWORDS", "dicom_identifiers", "keeps_identifiers",
    "needs_phi_review", "derive_dataset", "import_files", "MAX_ZIP_BYTES", "MAX_ZIP_MEMBERS",
    "MAX_ZIP_MEMBER_BYTES", "MAX_ZIP_RATIO",
]

# Decompression-bomb cap, checked on the header *before* any pixel is decoded. It is below Pillow's own
# limit (Image.MAX_IMAGE_PIXELS, ~89 M, which only warns up to twice that), so Pillow's warning can never
# be what lets a bomb through; Pillow's DecompressionBombError is still caught and reported as a skip.
# We leave Pillow's global setting alone because the studio runs imports in threads.
MAX_PIXELS = 50_000_000
MAX_FRAMES = 1000                 # frames per DICOM file (a cine loop or a volume); more is refused
MAX_FILE_BYTES = 2 * 1024 ** 3    # larger files are refused before being read
# A .zip is expanded (into ws.tmp_dir, then deleted) only within these limits, all checked on the central
# directory before anything is written and the byte counts again while writing (headers can lie).
MAX_ZIP_BYTES = 2 * 1024 ** 3           # uncompressed, every archive of one import together
MAX_ZIP_MEMBERS = 20_000                # entries, folders included
MAX_ZIP_MEMBER_BYTES = 512 * 1024 ** 2  # one uncompressed member
MAX_ZIP_RATIO = 200                     # uncompressed / compressed: PNG/JPEG ~1, DICOM and BMP tens, bombs 1000s
_ZIP_RATIO_FROM = 1024 ** 2             # smaller members are not ratio-checked: 1 MB of anything is no bomb
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")   # nothing else is decoded, whatever the file claims (MPO comes via JPEG)
# Transparent pixels become black: medical images are shown on dark backgrounds, and black is what an
# empty detector reads, so a white matte would invent bright borders the model would learn.
ALPHA_BACKGROUND = (0, 0, 0)
# Fixed PNG encoder settings and no text chunks: same pixels -> same bytes on every run.
PNG_SAVE_PARAMS: dict[str, Any] = {"format": "PNG", "compress_level": 3, "optimize": False}  # 3: 2.5x faster than 6, 2% larger
UNLABELED = "unlabeled"
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TEXT_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")   # captions may keep \t \n \r
_LABEL_RE = re.compile(r"^[^\W_][\w.-]{0,63}$")

# What an import keeps of a DICOM header by default: technical attributes only (how the pixels were made
# displayable). Rows/Columns become the image size; WindowCenter/Width, VOI LUT and Rescale are recorded
# only as the window actually applied.
DICOM_STORED_TAGS = ("Modality", "BodyPartExamined", "PhotometricInterpretation", "BitsStored",
                     "NumberOfFrames", "Rows", "Columns", "SamplesPerPixel", "WindowCenter", "WindowWidth",
                     "VOILUTFunction", "RescaleSlope", "RescaleIntercept", "TransferSyntaxUID")
# Attributes of DICOM PS3.15 Annex E's basic application level confidentiality profile (patient, physicians,
# operators, institution, device, dates and times, free-text descriptions and comments, instance UIDs) that
# occur at the top level of image files. None is stored by default; with the admin opt-in per dataset they
# are kept in the provenance under ``dicom.identifiers``.
DICOM_IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge", "PatientSize",
    "PatientWeight", "PatientAddress", "PatientTelephoneNumbers", "PatientComments", "EthnicGroup", "Occupation",
    "MilitaryRank", "BranchOfService", "CountryOfResidence", "RegionOfResidence", "MedicalRecordLocator",
    "AdditionalPatientHistory", "AdmittingDiagnosesDescription", "ResponsiblePerson", "ResponsibleOrganization",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingPhysician",
    "OperatorsName", "ContentCreatorName", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "StationName", "DeviceSerialNumber", "DetectorID", "GantryID", "AccessionNumber", "StudyID",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate", "OverlayDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "InstanceCreationTime", "OverlayTime",
    "AcquisitionDateTime", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedProcedureStepID", "PerformedProcedureStepDescription", "RequestedProcedureDescription",
    "ScheduledProcedureStepDescription", "StudyDescription", "SeriesDescription", "ProtocolName",
    "ImageComments", "DerivationDescription", "TimezoneOffsetFromUTC",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "InstanceCreatorUID",
    "IrradiationEventUID", "SynchronizationFrameOfReferenceUID", "StorageMediaFileSetUID",
    "ReferencedSOPInstanceUID", "UID",
)


# ------------------------------------------------------------------------------------------------
# Hashing and normalisation
# ------------------------------------------------------------------------------------------------
def pixel_hash(img: Image.Image) -> str:
    """SHA-256 (hex) of an image's normalised RGB 8-bit pixels; the size is hashed too, so a 128x256 and a
    256x128 image with the same bytes differ. File format, metadata and PNG settings do not matter."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    h = hashlib.sha256(f"RGB8:{img.width}x{img.height}:".encode("ascii"))
    h.update(img.tobytes())
    return h.hexdigest()


def _printable(name: str) -> str:
    """A file name as it can be shown in a terminal or a web page: control characters escaped."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", name)


def normalize_label(label: str) -> str:
    """Class labels become folder names in exports: whitespace -> '_', 1-64 word characters, '.', '-'.

    Raises ConfigError for anything else (control characters, slashes, '..', empty)."""
    if not isinstance(label, str):
        raise ConfigError(f"Label must be text, got {type(label).__name__}.")
    if _CONTROL_RE.search(label):
        raise ConfigError(f"Label {_printable(label)!r} contains control characters.")
    cleaned = re.sub(r"\s+", "_", label.strip())
    if not _LABEL_RE.match(cleaned) or ".." in cleaned:
        raise ConfigError(
            f"Label {_printable(label)!r} is not usable as a class name: use 1-64 letters, digits, '_', '-' "
            "or '.', starting with a letter or digit."
        )
    return cleaned


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except OSError as e:
        raise InvalidImageError(f"cannot read file: {e.strerror or e}") from None
    if not path.is_file():
        raise InvalidImageError("not a regular file")
    if st.st_size == 0:
        raise InvalidImageError("empty file (0 bytes)")
    if st.st_size > MAX_FILE_BYTES:
        raise InvalidImageError(f"file is {st.st_size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit")


def _check_pixels(width: int, height: int, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{what} has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise InvalidImageError(
            f"{what} is {width}x{height} = {width * height:,} pixels, over the {MAX_PIXELS:,}-pixel limit "
            "(possible decompression bomb); downscale or tile it before importing"
        )


def _rescale_to_uint8(arr: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Linear map of the data range onto 0..255 (a constant image becomes black)."""
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8), lo, hi
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8), lo, hi


def _composite(im: Image.Image) -> tuple[Image.Image, str]:
    rgba = im.convert("RGBA")
    alpha = rgba.getchannel("A")
    lo, _ = alpha.getextrema()
    if lo == 255:
        return rgba.convert("RGB"), f"{im.mode} -> RGB (alpha fully opaque, dropped)"
    bg = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    out = Image.alpha_composite(bg, rgba).convert("RGB")
    return out, f"{im.mode} -> RGB (alpha composited on black {ALPHA_BACKGROUND})"


def _to_rgb8(im: Image.Image) -> tuple[Image.Image, str]:
    """Any Pillow mode -> RGB 8-bit, with a note saying how."""
    mode = im.mode
    if mode == "RGB":
        return im.copy(), "RGB 8-bit (unchanged)"
    if mode == "L":
        return im.convert("RGB"), "grayscale 8-bit -> RGB (channel replicated)"
    if mode == "1":
        return im.convert("L").convert("RGB"), "1-bit -> RGB"
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite(im)
    if mode == "P":
        if "transparency" in im.info:
            out, note = _composite(im.convert("RGBA"))
            return out, "palette with transparency -> " + note.split(" -> ", 1)[1]
        return im.convert("RGB"), "palette -> RGB"
    if mode == "CMYK":
        # Pillow's conversion is the naive 255-(C+K) formula; an embedded ICC profile is ignored.
        return im.convert("RGB"), "CMYK -> RGB (naive conversion, no ICC colour management)"
    if mode in ("YCbCr", "LAB", "HSV"):
        return im.convert("RGB"), f"{mode} -> RGB"
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InvalidImageError("floating-point image contains NaN or infinite values")
        g, lo, hi = _rescale_to_uint8(arr)
        depth = {"I": "32-bit integer", "F": "32-bit float"}.get(mode, "16-bit")
        note = (f"{mode} ({depth} grayscale) -> RGB: data range [{lo:g}, {hi:g}] mapped linearly to [0, 255]"
                if hi > lo else f"{mode} ({depth} grayscale, constant {lo:g}) -> black RGB")
        return Image.fromarray(np.stack([g, g, g], axis=-1), "RGB"), note
    try:
        return im.convert("RGB"), f"{mode} -> RGB (Pillow conversion)"
    except Exception as e:  # an exotic mode Pillow cannot convert
        raise InvalidImageError(f"unsupported pixel mode {mode!r}: {e}") from None


def load_image_file(path: str | os.PathLike) -> tuple[Image.Image, str]:
    """Open a PNG/JPEG/TIFF/BMP file and return it as RGB 8-bit plus a note on the conversion.

    Raises InvalidImageError (message = the reason) for empty, truncated, oversized or non-image files.
    EXIF orientation is applied; of a multi-page TIFF only the first page is used (and the note says so).
    """
    p = Path(path)
    _check_file(p)
    try:
        with Image.open(p, formats=PIL_FORMATS) as im:
            _check_pixels(*im.size)
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            fmt = im.format or "?"
            # Pillow has no 16-bit colour mode: it keeps the high byte of 16-bit RGB(A) samples (a
            # full-range linear scaling). Only the decoder's raw mode, read before load(), tells.
            raw16 = im.mode in ("RGB", "RGBA") and any(";16" in str(t.args or "") for t in im.tile)
            im.load()
            # Cameras and some scanners store "rotate on display" in EXIF; a reviewer sees it rotated.
            turned = fmt in ("JPEG", "MPO", "TIFF") and im.getexif().get(0x0112, 1) in range(2, 9)
            rgb, note = _to_rgb8(ImageOps.exif_transpose(im) if turned else im)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as e:
        raise InvalidImageError(f"refused as a possible decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise InvalidImageError("not a PNG, JPEG, TIFF or BMP image (content not recognised)") from None
    except MemoryError:
        raise InvalidImageError("not enough memory to decode this image") from None
    except Exception as e:  # any decoder failure (truncated data, bad chunk, CRC) means the file is unusable
        raise InvalidImageError(f"cannot decode {p.suffix or 'file'}: {e}") from None
    notes = [f"{fmt} {note}"]
    if raw16:
        notes.append("16-bit colour reduced to 8 bits by keeping the high byte (full-range scaling)")
    if turned:
        notes.append("EXIF orientation applied")
    if n_frames > 1:
        notes.append(f"first of {n_frames} pages used")
    return rgb, "; ".join(notes)


# ------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------
def _dicom_str(ds: Any, keyword: str) -> str | None:
    v = ds.get(keyword)
    if v is None:
        return None
    s = str(v).strip()
    return s or None


Window = tuple[float, float] | str | None   # (centre, width), "auto" (percentiles) or None (the file's own)


def _window_to_unit(values: np.ndarray, ds: Any, window: Window) -> tuple[np.ndarray, dict]:
    """Modality values -> [0, 1] display values, and a record of the window used.

    Order of preference: an explicit window (C, W) from the caller; the file's VOI LUT or first
    Window Center/Width (applied by pydicom); the 0.5-99.5 percentile range of the frame
    (also used when the caller passes ``window="auto"``)."""
    from pydicom.pixels import apply_voi_lut

    if isinstance(window, str):
        if window != "auto":
            raise ConfigError(f"Window must be (centre, width) or 'auto', got {window!r}.")
    elif window is not None:
        c, w = float(window[0]), float(window[1])
        if w <= 0:
            raise ConfigError(f"Window width must be positive, got {w}.")
        unit = np.clip((values - (c - w / 2)) / w, 0.0, 1.0)
        return unit, {"method": "window (preset)", "center": c, "width": w}
    has_lut = "VOILUTSequence" in ds
    if window is None and (has_lut or ("WindowCenter" in ds and "WindowWidth" in ds)):
        try:
            out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
            # The display range pydicom maps onto depends on bit depth, rescale and LUT descriptor;
            # pushing two extreme values through the same function reads it off exactly.
            y_lo, y_hi = (float(v) for v in apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0, prefer_lut=True))
            if y_hi != y_lo:
                unit = np.clip((out - y_lo) / (y_hi - y_lo), 0.0, 1.0)
                if has_lut:
                    return unit, {"method": "VOI LUT (from file, first)"}
                c, w = ds["WindowCenter"], ds["WindowWidth"]
                cv = float(c.value[0] if c.VM > 1 else c.value)
                wv = float(w.value[0] if w.VM > 1 else w.value)
                return unit, {"method": "window (from file, first)", "center": cv, "width": wv,
                              "function": str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")}
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            pass  # malformed VOI attributes: fall back to the data range
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape), {"method": "constant frame", "value": lo}
    unit = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    why = "auto" if window == "auto" else "file has no window"
    return unit, {"method": f"percentile 0.5-99.5 ({why})", "low": round(lo, 4), "high": round(hi, 4)}


def _dicom_frame_to_rgb8(arr: np.ndarray, ds: Any, window: Window) -> tuple[np.ndarray, dict]:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    pi = str(ds.get("PhotometricInterpretation", "") or "").upper()
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    conversions: list[str] = []
    info: dict[str, Any] = {}
    if spp == 1 and pi in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_modality_lut(arr, ds).astype(np.float64)
        if "ModalityLUTSequence" in ds or "RescaleSlope" in ds:
            conversions.append("modality LUT / rescale applied")
        unit, info["windowing"] = _window_to_unit(values, ds, window)
        g = np.rint(unit * 255.0).astype(np.uint8)
        if pi == "MONOCHROME1":
            # MONOCHROME1 means "low values are white": invert after windowing so bone is bright.
            g = 255 - g
            conversions.append("MONOCHROME1 inverted")
        conversions.append(f"{int(ds.get('BitsStored', 8) or 8)}-bit grayscale -> 8-bit RGB")
        rgb = np.stack([g, g, g], axis=-1)
    elif spp == 1 and pi == "PALETTE COLOR":
        lut = apply_color_lut(arr, ds)
        if lut.dtype != np.uint8:
            desc = ds.get("RedPaletteColorLookupTableDescriptor")
            bits = int(desc[2]) if desc is not None and int(desc[2]) in (8, 16) else 16
            lut = np.rint(lut.astype(np.float64) * (255.0 / (2 ** bits - 1)))
            conversions.append(f"palette colour LUT ({bits}-bit) -> 8-bit RGB")
        else:
            conversions.append("palette colour LUT -> RGB")
        rgb = np.clip(lut, 0, 255).astype(np.uint8)
    elif spp == 3 and arr.ndim == 3:
        if pi.startswith("YBR"):
            conversions.append(f"{pi} -> RGB (pydicom)")
        if arr.dtype == np.uint8:
            rgb = arr
        else:
            bits = int(ds.get("BitsStored", 16) or 16)
            rgb = np.rint(np.clip(arr.astype(np.float64), 0, None) * (255.0 / (2 ** bits - 1)))
            rgb = np.clip(rgb, 0, 255).astype(np.uint8)
            conversions.append(f"{bits}-bit RGB -> 8-bit RGB")
    else:
        raise InvalidImageError(f"unsupported DICOM photometric interpretation {pi or '?'} with {spp} sample(s)")
    info["conversions"] = conversions
    return np.ascontiguousarray(rgb), info


def _read_dicom(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no 128-byte preamble: old files (ACR-NEMA style) are read with force=True below
    except Exception as e:
        raise InvalidImageError(f"unreadable DICOM: {e}") from None
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:
        raise InvalidImageError(f"not a readable DICOM file: {e}") from None
    if "PixelData" not in ds or "Rows" not in ds:
        raise InvalidImageError("not a DICOM image (no DICOM header and no pixel data)")
    if "TransferSyntaxUID" not in ds.file_meta:
        # force=True datasets have no transfer syntax; headerless files are implicit VR little endian.
        from pydicom.uid import ImplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def dicom_identifiers(ds: Any) -> dict[str, str]:
    """The identifying attributes of a DICOM dataset that are present (:data:`DICOM_IDENTIFYING_KEYWORDS`, top
    level and file meta), as text. Only ever stored for a dataset whose admin opted in."""
    out: dict[str, str] = {}
    for keyword in DICOM_IDENTIFYING_KEYWORDS:
        try:
            elem = ds[keyword] if keyword in ds else None
        except (KeyError, ValueError):
            continue
        if elem is not None and elem.VR != "SQ" and elem.value is not None:
            text = str(elem.value).strip()
            if text:
                out[keyword] = text
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("MediaStorageSOPInstanceUID") if meta is not None else None
    if uid:
        out["MediaStorageSOPInstanceUID"] = str(uid)
    return out


def _burned_in(ds: Any) -> bool:
    return str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"


def load_dicom(path: str | os.PathLike, *, window: tuple[float, float] | str | None = None,
               frames: list[int] | None = None, keep_identifiers: bool = False) -> list[tuple[Image.Image, dict]]:
    """Decode a DICOM file into RGB 8-bit images, one per frame, each with a provenance dict.

    Grayscale: modality LUT/rescale, then the VOI LUT or first window of the file (or ``window=(C, W)``,
    or the 0.5-99.5 percentile range, also with ``window="auto"``), MONOCHROME1 inverted; palette colour via its LUT; 16/32-bit
    colour scaled to 8 bits. ``frames`` picks frame indices (default all, at most MAX_FRAMES).
    The provenance holds only :data:`DICOM_STORED_TAGS` (plus ``burned_in_annotation: True`` when the file says
    so); ``keep_identifiers`` adds the descriptions and :func:`dicom_identifiers` (the admin opt-in).
    Raises InvalidImageError for unreadable files, files without pixel data, or undecodable compression.
    """
    from pydicom.pixels import pixel_array

    p = Path(path)
    _check_file(p)
    ds = _read_dicom(p)
    if "PixelData" not in ds:
        raise InvalidImageError("DICOM file has no image (no Pixel Data: a report, plan or structure set?)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as e:
        raise InvalidImageError(f"DICOM image attributes are missing or invalid: {e}") from None
    _check_pixels(cols, rows, "DICOM frame")
    if n_frames < 1 or n_frames > MAX_FRAMES:
        raise InvalidImageError(f"DICOM file has {n_frames} frames; at most {MAX_FRAMES} are imported per file")
    indices = list(range(n_frames)) if frames is None else [i for i in frames if 0 <= i < n_frames]
    ts = ds.file_meta.get("TransferSyntaxUID")   # a file with a preamble may still lack one
    meta: dict[str, Any] = {
        "modality": _dicom_str(ds, "Modality"),
        "body_part": _dicom_str(ds, "BodyPartExamined"),
        "photometric": _dicom_str(ds, "PhotometricInterpretation"),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "transfer_syntax": str(ts.name) if ts is not None else None,
        "n_frames": n_frames,
    }
    if _burned_in(ds):
        meta["burned_in_annotation"] = True
    if keep_identifiers:
        meta["series_description"] = _dicom_str(ds, "SeriesDescription")
        meta["study_description"] = _dicom_str(ds, "StudyDescription")
        meta["identifiers"] = dicom_identifiers(ds)
    out: list[tuple[Image.Image, dict]] = []
    for i in indices:
        try:
            arr = pixel_array(ds, index=i if n_frames > 1 else None)
        except MemoryError:
            raise InvalidImageError("not enough memory to decode this DICOM frame") from None
        except Exception as e:
            raise InvalidImageError(
                f"cannot decode DICOM pixel data ({meta['transfer_syntax'] or 'unknown transfer syntax'}): {e}. "
                "Install a decoder plugin (e.g. pylibjpeg with pylibjpeg-libjpeg/-openjpeg) or convert the "
                "file to an uncompressed transfer syntax"
            ) from None
        try:
            rgb, info = _dicom_frame_to_rgb8(arr, ds, window)
        except (InvalidImageError, ConfigError):
            raise
        except Exception as e:
            raise InvalidImageError(f"cannot convert DICOM pixels to RGB: {e}") from None
        info = {**meta, "frame": i, **info}
        out.append((Image.fromarray(rgb, "RGB"), info))
    return out


_MODALITY_NAMES = {"CR": "xray", "DX": "xray", "RG": "xray", "MG": "mammography", "US": "ultrasound",
                   "CT": "ct", "MR": "mr", "NM": "nm", "PT": "pet", "XA": "angiography", "RF": "fluoroscopy",
                   "OP": "fundus", "SM": "histology", "ES": "endoscopy", "IO": "dental", "OT": "other"}


def dicom_label(info: dict) -> str:
    """A class label from DICOM tags: modality (CR/DX -> 'xray', ...) plus body part, e.g. 'ct_head'."""
    mod = (info.get("modality") or "").upper()
    parts = [_MODALITY_NAMES.get(mod, mod.lower() or "dicom")]
    if info.get("body_part"):
        parts.append(info["body_part"].lower())
    raw = re.sub(r"[^\w]+", "_", "_".join(parts)).strip("_")[:64]
    try:
        return normalize_label(raw)
    except ConfigError:
        return "dicom"


def _sniff(path: Path) -> str | None:
    """'dicom', 'image' or None, from the first bytes (suffixes lie; contents decide)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")):
        return "image"
    return None


def _kind(path: Path) -> str | None:
    sniffed = _sniff(path)
    if sniffed == "dicom":
        return "dicom"
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"   # even if the content is wrong: Pillow then says why
    if suffix in DICOM_SUFFIXES or (suffix == "" and sniffed is None):
        return "dicom"   # headerless DICOM files often have no suffix at all
    return sniffed


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    dataset: str
    imported: list[tuple[str, int, str]] = field(default_factory=list)   # (original name, image id, label)
    skipped: list[tuple[str, str]] = field(default_factory=list)         # (original name, reason)
    created: bool = False       # this import created the dataset
    seconds: float = 0.0
    # The names above are the caller's own (the report is handed back, never stored); what follows is safe.
    phi_review: list[int] = field(default_factory=list)   # image ids imported with needs_phi_review
    folder_labels_ignored: int = 0   # DICOM files whose class folder was not used as a label
    identifiers_kept: bool = False   # the dataset's admin opted in: identifiers and names were stored

    def label_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, _, label in self.imported:
            counts[label] = counts.get(label, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self, max_skipped: int = 20) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in self.label_counts().items())
        head = f"Imported {len(self.imported)} image(s) into dataset {self.dataset!r}"
        if self.imported:
            head += f" ({counts})"
        if self.created:
            head += "; created the dataset"
        lines = [head + f" in {self.seconds:.1f} s."]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} file(s):")
            for name, reason in self.skipped[:max_skipped]:
                lines.append(f"  {_printable(name)}: {_printable(reason)}")
            if len(self.skipped) > max_skipped:
                lines.append(f"  ... and {len(self.skipped) - max_skipped} more")
        if self.phi_review:
            lines.append(f"{len(self.phi_review)} image(s) flagged needs_phi_review: their DICOM says "
                         "BurnedInAnnotation YES (names, dates or IDs may be burned into the pixels); review them "
                         "before training on or exporting this dataset.")
        if self.folder_labels_ignored:
            lines.append(f"Folder names were not used as class labels for {self.folder_labels_ignored} DICOM "
                         "file(s) (clinical exports name folders after patients): labels come from the DICOM "
                         "tags. Set them with --label or a CSV (file_name,label).")
        if self.imported:
            lines.append("Patient identifiers, DICOM descriptions and original file names were KEPT (this "
                         "dataset's admin opted in)." if self.identifiers_kept else
                         "No patient identifiers or original file names were stored (DICOM technical tags only).")
        if not self.imported:
            lines.append("Nothing was imported: check the reasons above and the accepted formats "
                         "(PNG, JPEG, TIFF, BMP, DICOM).")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "created": self.created, "seconds": round(self.seconds, 3),
                "imported": [{"name": n, "image_id": i, "label": lab} for n, i, lab in self.imported],
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
                "label_counts": self.label_counts(), "needs_phi_review": list(self.phi_review),
                "folder_labels_ignored": self.folder_labels_ignored, "identifiers_kept": self.identifiers_kept}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)


# ------------------------------------------------------------------------------------------------
# Staging and the one commit
# ------------------------------------------------------------------------------------------------
def _drop_empty_dataset(store: "CaptionStore", name: str) -> None:
    """Undo a ``create_dataset`` whose ``add_images`` failed, so a failed import leaves no trace."""
    store.drop_empty_dataset(name)


class _Staging:
    """Images decoded for one import, waiting in ws.tmp_dir for the single store transaction."""

    def __init__(self, ws: Workspace, store: "CaptionStore", dataset: str, report: ImportReport, *,
                 keep_identifiers: bool = False):
        self.ws, self.store, self.dataset, self.report = ws, store, dataset, report
        self.keep_identifiers = keep_identifiers
        self.dir = Path(tempfile.mkdtemp(prefix=f"import-{dataset}-", dir=ws.tmp_dir))
        self.records: list[ImageRecord] = []
        self.drafts: list[tuple[str, str] | None] = []
        self.names: list[str] = []
        self.manifest: list[dict] = []
        self.seen: dict[str, str] = {}       # pixel hash -> name of the first file that had it
        self.used_files: set[str] = set()

    def add(self, name: str, img: Image.Image, label: str, source: dict,
            draft: tuple[str, str] | None = None, manifest_extra: dict | None = None) -> bool:
        """Stage one image; returns False (and records why) for a duplicate."""
        from .captions import ImageRecord

        h = pixel_hash(img)
        if h in self.seen:
            self.report.skipped.append((name, f"duplicate: same pixels as {self.seen[h]} in this import"))
            return False
        if self.store.has_pixel_hash(self.dataset, h):
            self.report.skipped.append((name, f"duplicate: already in dataset {self.dataset!r}"))
            return False
        file_name = f"{h[:16]}.png"
        # 64 bits of prefix make a clash practically impossible, but a clash must never overwrite an image.
        if file_name in self.used_files or (self.ws.images_dir(self.dataset) / file_name).exists():
            file_name = f"{h}.png"
        img.save(self.dir / file_name, **PNG_SAVE_PARAMS)
        self.seen[h] = name
        self.used_files.add(file_name)
        rel = f"images/{file_name}"
        self.records.append(ImageRecord(None, self.dataset, rel, label, h, img.width, img.height, source))
        self.drafts.append(draft)
        self.names.append(name)
        self.manifest.append({"file_name": rel, "label": label, "pixel_hash": h,
                              "width": img.width, "height": img.height, **(manifest_extra or source)})
        return True

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self, *, create: dict | None) -> None:
        """One store transaction (plus the dataset row when new), then move files into place. With a durable
        folder the PNGs and the new manifest are copied there first, so a logged row never lacks its file."""
        self._save_durable()
        created = False
        try:
            if create is not None:
                try:
                    self.store.create_dataset(self.dataset, **create)
                    created = True
                except ConfigError:
                    if not self.store.has_dataset(self.dataset):
                        raise
                    # another import created it since we looked: add to it instead
                    if self.keep_identifiers and not keeps_identifiers(self.store, self.dataset):
                        raise ConfigError(f"Dataset {self.dataset!r} was just created by another import without "
                                          "keeping identifiers; import into a new dataset to keep them.") from None
            ids = self.store.add_images(self.dataset, self.records,
                                        drafts=self.drafts if any(d is not None for d in self.drafts) else None)
        except BaseException:
            # An interrupt can land between the store's COMMIT and our next line; staged hashes were
            # absent from the dataset, so finding the last one there means the rows are in: publish.
            if self.records and self.store.has_pixel_hash(self.dataset, self.records[-1].pixel_hash):
                self._publish()
                raise
            if created:
                _drop_empty_dataset(self.store, self.dataset)
            self.discard()
            raise
        self.report.created = created
        self.report.imported.extend(
            (n, int(i), r.label) for n, i, r in zip(self.names, ids, self.records))
        self.report.phi_review.extend(int(i) for i, r in zip(ids, self.records) if r.source.get("needs_phi_review"))
        self._publish()

    def _publish(self) -> None:
        # The rows are committed: from here every file must land, so an interrupt is held until the
        # moves are done (they are renames within one filesystem, milliseconds each).
        images_dir = self.ws.images_dir(self.dataset)
        interrupted: BaseException | None = None
        failures: list[str] = []
        while True:
            try:
                images_dir.mkdir(parents=True, exist_ok=True)
                break
            except KeyboardInterrupt as e:
                interrupted = e
        for rec in self.records:
            name = PurePosixPath(rec.file_name).name
            src, dst = self.dir / name, images_dir / name
            while True:
                try:
                    os.replace(src, dst)
                    break
                except KeyboardInterrupt as e:
                    interrupted = e
                except OSError as e:
                    if not src.exists() and dst.exists():
                        break   # the rename completed just before an interrupt; the retry finds it done
                    failures.append(f"{name}: {e}")
                    break
        while True:
            try:
                self._append_manifest()
                break
            except KeyboardInterrupt as e:
                interrupted = e
            except OSError as e:
                failures.append(f"manifest: {e}")
                break
        if failures:
            raise MedArtError(
                f"{len(failures)} file(s) were recorded in the caption store but could not be moved into "
                f"{images_dir} (first: {failures[0]}); they are kept in {self.dir}: move them there by hand."
            )
        self.discard()
        if interrupted is not None:
            raise interrupted

    def _manifest_bytes(self) -> bytes:
        target = self.ws.manifest_path(self.dataset)
        old = target.read_bytes() if target.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        lines = "".join(json.dumps(m, sort_keys=True, ensure_ascii=False) + "\n" for m in self.manifest)
        return old + lines.encode("utf-8")

    def _append_manifest(self) -> None:
        staged = self.dir / "manifest.jsonl"
        staged.write_bytes(self._manifest_bytes())
        os.replace(staged, self.ws.manifest_path(self.dataset))

    def _save_durable(self) -> None:
        if not durable.enabled() or not self.records:
            return
        rel = self.ws.dataset_dir(self.dataset).relative_to(self.ws.root).as_posix()
        durable.save_files((self.dir / PurePosixPath(r.file_name).name, f"{rel}/{r.file_name}") for r in self.records)
        staged = self.dir / "manifest.durable.jsonl"
        staged.write_bytes(self._manifest_bytes())
        durable.save_files([(staged, f"{rel}/{PurePosixPath(self.ws.manifest_path(self.dataset).name)}")],
                           overwrite=True)


# ------------------------------------------------------------------------------------------------
# Import of users' images
# ------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    path: Path
    name: str                   # as the user knows it (relative to the source), used in the report
    label: str | None           # from a CSV column or a class folder
    text: str | None = None     # caption from a CSV
    from_folder: bool = False   # the label is a folder name (not used for DICOM without the opt-in)


def _tree_items(root: Path, report: ImportReport, exclude: Path | None = None) -> Iterator[_Item]:
    """Files under ``root`` in sorted order; files in ``root/<class>/...`` get label ``<class>``.

    Hidden files and folders (".DS_Store", ".git") are ignored; symlinked folders are not followed;
    ``exclude`` (the workspace, when it lies inside ``root``) is never entered, so an import cannot
    swallow its own staging folder or another dataset's images."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (Path(dirpath) / d).resolve() != exclude))
        rel_dir = Path(dirpath).relative_to(root)
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            rel = (rel_dir / fn).as_posix()
            if _CONTROL_RE.search(rel):
                report.skipped.append((rel, "unsafe file name (control characters)"))
                continue
            label: str | None = None
            if rel_dir.parts:
                try:
                    label = normalize_label(rel_dir.parts[0])
                except ConfigError as e:
                    if _kind(Path(dirpath) / fn) != "dicom":   # DICOM labels come from the tags anyway
                        report.skipped.append((rel, f"class folder name is not a usable label: {e}"))
                        continue
            yield _Item(Path(dirpath) / fn, rel, label, from_folder=bool(rel_dir.parts))


def _csv_items(csv_path: Path, report: ImportReport) -> Iterator[_Item]:
    """Rows of ``file_name,label[,text]`` (header required; paths relative to the CSV's folder)."""
    from .captions import MAX_CAPTION_CHARS

    try:
        raw = csv_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{csv_path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from None
    except OSError as e:
        raise NotFoundError(f"Cannot read {csv_path}: {e.strerror or e}") from None
    # Python's csv module aborts on NUL; mapping it to another control character lets the
    # per-row check below skip just the affected row.
    reader = csv.reader(io.StringIO(raw.replace("\x00", "\x1a"), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ConfigError(f"{csv_path} is empty; expected a header 'file_name,label[,text]'.") from None
    except csv.Error as e:
        raise ConfigError(f"{csv_path} is not valid CSV: {e}") from None
    cols = [h.strip().lower() for h in header]
    if "file_name" not in cols:
        raise ConfigError(f"{csv_path} needs a header row with a 'file_name' column "
                          f"(got {', '.join(map(repr, header))}); expected 'file_name,label[,text]'.")
    i_file = cols.index("file_name")
    i_label = cols.index("label") if "label" in cols else None
    i_text = cols.index("text") if "text" in cols else None
    base = csv_path.parent.resolve()
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            report.skipped.append((f"{csv_path.name} line {reader.line_num}", f"malformed CSV row: {e}"))
            continue
        where = f"{csv_path.name} line {reader.line_num}"
        if not any(c.strip() for c in row):
            continue
        if len(row) > len(cols):
            report.skipped.append((where, "more columns than the header (quote captions that contain commas)"))
            continue
        row = row + [""] * (len(cols) - len(row))
        name = row[i_file].strip()
        label = row[i_label].strip() if i_label is not None else ""
        text = csv_cell_text(row[i_text]) if i_text is not None else ""    # a Med-Art CSV export's escape
        shown = name or where
        if not name:
            report.skipped.append((where, "empty file_name"))
            continue
        if _CONTROL_RE.search(name) or _CONTROL_RE.search(label):
            report.skipped.append((shown, "unsafe entry: control characters in file name or label"))
            continue
        if _TEXT_CONTROL_RE.search(text):
            report.skipped.append((shown, "unsafe entry: control characters in caption text"))
            continue
        rel = name.replace("\\", "/")
        if (PurePosixPath(rel).is_absolute() or PureWindowsPath(name).drive or rel.startswith("~")
                or ".." in PurePosixPath(rel).parts):
            report.skipped.append((shown, "unsafe path: absolute or containing '..'; use paths relative to "
                                          "the CSV's folder"))
            continue
        target = (csv_path.parent / rel).resolve()
        if base != target and base not in target.parents:
            report.skipped.append((shown, "unsafe path: resolves outside the CSV's folder"))
            continue
        if not target.exists():
            report.skipped.append((shown, "file not found"))
            continue
        if label:
            try:
                label = normalize_label(label)
            except ConfigError as e:
                report.skipped.append((shown, str(e)))
                continue
        text = text.replace("\r\n", "\n").strip()
        if len(text) > MAX_CAPTION_CHARS:
            report.skipped.append((shown, f"caption is {len(text):,} characters; at most {MAX_CAPTION_CHARS:,}"))
            continue
        yield _Item(target, rel, label or None, text or None)


def keeps_identifiers(store: "CaptionStore", dataset: str) -> bool:
    """Whether an admin opted ``dataset`` in to keeping patient identifiers and original names."""
    return store.has_dataset(dataset) and bool(store.dataset_info(dataset).meta.get("keep_identifiers"))


def needs_phi_review(store: "CaptionStore", dataset: str) -> list[int]:
    """Ids of the images of ``dataset`` imported from DICOMs marked BurnedInAnnotation YES."""
    return [r.id for r in store.list_images(dataset) if (r.source or {}).get("needs_phi_review")]


def import_images(ws: Workspace, store: "CaptionStore", src: str | os.PathLike, dataset: str, *,
                  modality: str = "generic", label: str | None = None,
                  progress: Callable[[int, str], None] | None = None,
                  keep_identifiers: bool = False) -> ImportReport:
    """Import images into ``dataset`` (created when missing) as one all-or-nothing batch.

    ``src`` is a folder (files directly inside, or ``src/<class>/...`` folder-per-class), a ``.zip`` of such a
    folder (expanded within the ``MAX_ZIP_*`` limits into ``ws.tmp_dir``, removed afterwards; a hostile archive
    is refused whole with ConfigError), a CSV (``file_name,label[,text]``, paths relative to the CSV; ``text``
    becomes a draft of source "import"), or a single image or DICOM file. The label of an image is, in order:
    the CSV's label / the class folder (not for DICOM: see below); ``label``; for DICOM, modality + body part
    from the tags; else "unlabeled".
    Patient-data hygiene (module docstring): no original file/folder name and no identifying DICOM attribute
    is stored, and a DICOM tree's folders are not labels, unless ``keep_identifiers`` (the admin opt-in; the
    studio offers it to admins only), which creates the dataset with ``meta["keep_identifiers"] = True`` and is
    refused for an existing dataset created without it. A dataset that opted in still drops identifiers
    from an import made without ``keep_identifiers``.
    Every bad input is skipped with its reason in the report; an exception (store failure, Ctrl-C)
    leaves the workspace exactly as it was.
    """
    t0 = time.monotonic()
    validate_name(dataset, "dataset name")
    src_path = Path(src).expanduser()
    if not src_path.exists():
        raise NotFoundError(f"Nothing to import at {src_path}: give a folder, a CSV file or an image file.")
    default_label = normalize_label(label) if label else None
    keep = bool(keep_identifiers)
    exists = store.has_dataset(dataset)
    if keep and exists and not keeps_identifiers(store, dataset):
        raise ConfigError(f"Dataset {dataset!r} was created without keeping patient identifiers, and that is "
                          "decided per dataset when it is created: import into a new dataset to keep them.")
    report = ImportReport(dataset, identifiers_kept=keep)
    create = None if exists else {"modality": modality, "meta": {"keep_identifiers": True} if keep else {}}
    staging = _Staging(ws, store, dataset, report, keep_identifiers=keep)
    unzipped: Path | None = None
    try:
        if src_path.is_dir():
            items: Iterator[_Item] = _tree_items(src_path, report, exclude=ws.root.resolve())
        elif src_path.suffix.lower() == ".zip":
            unzipped = Path(tempfile.mkdtemp(prefix="unzip-", dir=ws.tmp_dir))
            items = _tree_items(_expand_zip(src_path, unzipped, _ZipBudget()), report)
        elif src_path.suffix.lower() == ".csv":
            items = _csv_items(src_path, report)
        else:
            items = iter([_Item(src_path, src_path.name, None)])
        for n, item in enumerate(items):
            if progress is not None:
                progress(n, item.name)
            _import_one(staging, item, default_label)
        if not staging.records:
            staging.discard()
            report.seconds = time.monotonic() - t0
            return report
        staging.commit(create=create)
    except BaseException:
        staging.discard()
        raise
    finally:
        if unzipped is not None:
            shutil.rmtree(unzipped, ignore_errors=True)
    report.seconds = time.monotonic() - t0
    return report


def import_files(ws: Workspace, store: "CaptionStore", paths: list[str | os.PathLike], dataset: str, *,
                 modality: str = "generic", label: str | None = None,
                 progress: Callable[[int, str], None] | None = None,
                 keep_identifiers: bool = False) -> ImportReport:
    """Import several files (the studio's uploads) as one :func:`import_images` batch.

    The files are gathered in one folder under ``ws.tmp_dir`` (removed afterwards): loose files at its top
    (two uploads with one name both kept), each ``.zip`` expanded into it as a folder-per-class tree within
    the ``MAX_ZIP_*`` limits shared by all archives of the call (class folders of several archives merge)."""
    validate_name(dataset, "dataset name")
    budget = _ZipBudget()
    with tempfile.TemporaryDirectory(prefix="upload-", dir=ws.tmp_dir) as tmp:
        gather = Path(tmp) / "files"
        gather.mkdir()
        for i, p in enumerate(paths):
            src = Path(p)
            if src.suffix.lower() == ".zip":
                tree = _expand_zip(src, Path(tmp) / f"zip{i}", budget)
                for f in sorted(q for q in tree.rglob("*") if q.is_file()):
                    dst = gather / f.relative_to(tree)
                    if dst.exists():
                        dst = dst.with_name(f"{i}_{dst.name}")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, dst)
                continue
            # Keep the uploaded name (import_images vets it) but never let two uploads collide.
            dst = gather / (src.name if not (gather / src.name).exists() else f"{i}_{src.name}")
            shutil.copyfile(src, dst)
        return import_images(ws, store, gather, dataset, modality=modality, label=label, progress=progress,
                             keep_identifiers=keep_identifiers)


# ------------------------------------------------------------------------------------------------
# Zip archives
# ------------------------------------------------------------------------------------------------
@dataclass
class _ZipBudget:
    """What the archives of one import may still expand to (bytes, entries)."""

    bytes_left: int = field(default_factory=lambda: MAX_ZIP_BYTES)
    members_left: int = field(default_factory=lambda: MAX_ZIP_MEMBERS)


def _zip_member_path(info: zipfile.ZipInfo, archive: str) -> PurePosixPath | None:
    """The member's relative path, None for entries to leave out (macOS resource forks), or ConfigError
    for a name or a type that could write outside the staging folder or is not a plain file/folder."""
    raw = info.filename
    shown = _printable(raw)
    if _CONTROL_RE.search(raw):
        raise ConfigError(f"{archive} has an entry with control characters in its name ({shown!r}); "
                          "nothing was imported.")
    name = raw.replace("\\", "/")
    rel = PurePosixPath(name)
    if rel.is_absolute() or PureWindowsPath(raw).drive or name.startswith("~"):
        raise ConfigError(f"{archive} has an entry with an absolute path ({shown!r}); nothing was imported. "
                          "Zip the folder with relative paths.")
    if ".." in rel.parts:
        raise ConfigError(f"{archive} has an entry that points outside the archive ({shown!r}, '..'); "
                          "nothing was imported.")
    kind = stat.S_IFMT(info.external_attr >> 16)     # Unix mode of the entry; 0 from DOS/Windows tools
    if kind == stat.S_IFLNK:
        raise ConfigError(f"{archive} contains a symbolic link ({shown!r}); nothing was imported. Zip the "
                          "files themselves (zip without --symlinks).")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ConfigError(f"{archive} contains a device, pipe or socket entry ({shown!r}); nothing was imported.")
    if info.flag_bits & 0x1:
        raise ConfigError(f"{archive} is encrypted ({shown!r}); zip it without a password.")
    if not rel.parts or rel.parts[0] == "__MACOSX":
        return None
    return rel


def _expand_zip(archive: Path, dest: Path, budget: _ZipBudget) -> Path:
    """Expand ``archive`` into ``dest`` (a fresh folder of ours) and return the root of its tree: ``dest``, or
    its one top folder when the archive is a zipped folder-per-class tree (``data/<class>/...``).

    Every entry is vetted (names, types, counts, sizes, ratios) before the first byte is written, and the
    bytes are counted again while writing; any refusal is a ConfigError and ``dest`` is the caller's to remove."""
    shown = _printable(archive.name)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ConfigError(f"{shown} is not a readable zip archive ({e}); nothing was imported.") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > budget.members_left:
            raise ConfigError(f"{shown} has {len(infos):,} entries; an import takes at most {MAX_ZIP_MEMBERS:,}. "
                              "Split it into several imports.")
        budget.members_left -= len(infos)
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        total = 0
        for info in infos:
            rel = _zip_member_path(info, shown)
            if info.file_size > MAX_ZIP_MEMBER_BYTES:
                raise ConfigError(f"{shown}: {_printable(info.filename)!r} expands to {info.file_size:,} bytes; "
                                  f"one file may be at most {MAX_ZIP_MEMBER_BYTES:,}.")
            if info.file_size >= _ZIP_RATIO_FROM and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
                raise ConfigError(f"{shown}: {_printable(info.filename)!r} is compressed more than {MAX_ZIP_RATIO}:1 "
                                  "(a zip bomb, or not an image); nothing was imported.")
            total += info.file_size
            if rel is not None:
                plan.append((info, rel))
        if total > budget.bytes_left:
            raise ConfigError(f"{shown} expands to {total:,} bytes; an import takes at most {MAX_ZIP_BYTES:,} "
                              "bytes of archives. Split it into several imports.")
        dest.mkdir(parents=True, exist_ok=True)
        for info, rel in plan:
            target = dest.joinpath(*rel.parts)
            try:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as out:
                    written = 0
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        written += len(chunk)
                        if written > info.file_size or written > budget.bytes_left:
                            raise ConfigError(f"{shown}: {_printable(info.filename)!r} holds more bytes than it "
                                              "declares; nothing was imported.")
                        out.write(chunk)
                    budget.bytes_left -= written
            except FileExistsError:
                raise ConfigError(f"{shown} has {_printable(info.filename)!r} twice (or a file and a folder of one "
                                  "name); nothing was imported.") from None
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, OSError) as e:
                raise ConfigError(f"{shown}: cannot expand {_printable(info.filename)!r} ({e}); nothing was "
                                  "imported.") from None
    tops = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(tops) == 1 and tops[0].is_dir() and any(q.is_dir() and not q.name.startswith(".")
                                                     for q in tops[0].iterdir()):
        return tops[0]      # "zip -r data.zip data/": the class folders are one level down
    return dest


def _import_one(staging: _Staging, item: _Item, default_label: str | None) -> None:
    report = staging.report
    keep = staging.keep_identifiers
    kind = _kind(item.path)
    if kind is None:
        report.skipped.append((item.name, "unsupported file type (accepted: PNG, JPEG, TIFF, BMP, DICOM)"))
        return
    draft = (item.text, "import") if item.text else None
    try:
        if kind == "dicom":
            frames = load_dicom(item.path, keep_identifiers=keep)
        else:
            img, note = load_image_file(item.path)
    except InvalidImageError as e:
        report.skipped.append((item.name, str(e)))
        return
    named = {"original_name": item.name} if keep else {}
    if kind == "image":
        lab = item.label or default_label or UNLABELED
        staging.add(item.name, img, lab, {**named, "conversion": note}, draft)
        return
    item_label = item.label
    if item.from_folder and not keep:
        item_label = None
        report.folder_labels_ignored += 1
    for img, info in frames:
        lab = item_label or default_label or dicom_label(info)
        name = item.name if len(frames) == 1 else f"{item.name} [frame {info['frame']}]"
        flag = {"needs_phi_review": True} if info.get("burned_in_annotation") else {}
        staging.add(name, img, lab, {**named, "dicom": info, **flag}, draft)


def import_cli(src: str, workspace: str | None, dataset: str, modality: str = "generic",
               label: str | None = None, keep_identifiers: bool = False) -> int:
    """``python -m medart_core import SRC --dataset D [--keep-identifiers]``: prints the report; 0 when anything
    was imported."""
    from .captions import CaptionStore

    try:
        ws = Workspace.open(workspace)
        store = CaptionStore.for_workspace(ws)
        try:
            report = import_images(ws, store, src, dataset, modality=modality, label=label,
                                   keep_identifiers=keep_identifiers)
        finally:
            store.close()
    except MedArtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.imported else 1


# ------------------------------------------------------------------------------------------------
# The sample dataset
# ------------------------------------------------------------------------------------------------
SAMPLE_CLASSES: dict[str, str] = {
    "ct_head": "An axial CT image of the head",
    "ct_abdomen": "An axial CT image of the abdomen",
    "mr_abdomen": "An axial MR image of the abdomen",
    "mr_head": "An MR image of the head",
    "mr_shoulder": "A coronal MR image of the shoulder",
    "xray_chest": "A chest X-ray radiograph",
    "xray_leg": "An X-ray radiograph of the lower leg",
    "ultrasound": "An ultrasound image",
    "fundus_retina": "A colour fundus photograph of the retina",
    "histology_ihc": "A histology image of colonic tissue with immunohistochemical staining",
}

FULL_VIEW_MAX = 512      # whole-frame views are downscaled so their longer side is at most this
MIN_SIDE = 128           # every sample image is at least this large
MIN_STD = 5.0            # images flatter than this (background, air) carry nothing to learn
MIN_CONTENT = 0.4        # a tile needs at least this fraction of pixels that are neither black nor white
BUILDER = "medart sample v1"

# Licence statements, quoted from files inside the installed packages (checked at build time).
_PYDICOM_DATA_LICENCE = ("MIT (the pydicom-data package licence, LICENSE: 'MIT License, Copyright (c) 2020 "
                         "Dicom in Python')")
_PYDICOM_TEST_LICENCE = ("pydicom test file, shipped in the MIT-licensed pydicom package; "
                         "pydicom/data/test_files/README.txt: 'I believe there is no restriction on using any "
                         "of these files in this manner'")
_GDCM_NOTE = ("originally from GDCM; pydicom/data/test_files/README.txt: 'The datasets from GDCM "
              "(github.com/malaterre/GDCM) are used under the following license' (BSD-style, reproduced there)")
_NEMA_NOTE = "originally from the NEMA WG04 compression test set (per pydicom/data/test_files/README.txt)"


@dataclass(frozen=True)
class SampleSource:
    """One source file of the sample dataset and how 2-D samples are cut from it."""

    label: str
    distribution: str          # pip distribution, for the version: "pydicom", "pydicom-data", "scikit-image"
    file: str                  # path inside site-packages, e.g. "data_store/data/RG1_UNCR.dcm"
    licence: str
    origin: str
    evidence: tuple[tuple[str, str], ...] = ()   # (file in site-packages or "dist:<name>:<file>", phrase)
    anatomy_note: str = ""     # how the label was decided when the tags do not say
    frames: tuple[int, ...] | None = None         # DICOM frames to use (None: all)
    window: tuple[float, float] | str | None = None   # preset (centre, width) or "auto" (percentiles)
    us_region: bool = False    # crop to the first region of SequenceOfUltrasoundRegions (drops UI text)
    full_view: bool = True     # the whole frame, downscaled to FULL_VIEW_MAX
    tile: int | None = None    # plus non-overlapping native-resolution tiles of this size
    upscale: int = 1           # integer upscale for sources smaller than MIN_SIDE


_README_EVIDENCE = "pydicom/data/test_files/README.txt"
_DATA_LICENCE_EVIDENCE = ("dist:pydicom-data:LICENSE", "MIT License")
_TEST_LICENCE_EVIDENCE = (_README_EVIDENCE, "I believe there is no restriction on using any of these files")

SAMPLE_RECIPE: tuple[SampleSource, ...] = (
    SampleSource("ct_head", "pydicom-data", "data_store/data/693_UNCR.dcm", _PYDICOM_DATA_LICENCE,
                 "pydicom regression dataset for issue #693",
                 (_DATA_LICENCE_EVIDENCE, (_README_EVIDENCE, "Regression datasets for issue #693")),
                 anatomy_note="Modality CT, no BodyPartExamined; axial slice through the skull (visual check)",
                 tile=128),
    SampleSource("ct_head", "pydicom", "pydicom/data/test_files/J2K_pixelrep_mismatch.dcm", _PYDICOM_TEST_LICENCE,
                 "pydicom test file, 'Dataset from issue 1149'",
                 (_TEST_LICENCE_EVIDENCE, (_README_EVIDENCE, "Dataset from issue 1149")),
                 anatomy_note="Modality CT, BodyPartExamined HEAD", tile=128),
    SampleSource("ct_abdomen", "pydicom-data", "data_store/data/explicit_VR-UN.dcm",
                 _PYDICOM_DATA_LICENCE + "; original image from The Cancer Imaging Archive, 'freely available "
                 "de-identified datasets' (pydicom/data/test_files/README.txt)",
                 "TCIA (www.cancerimagingarchive.net), via pydicom issue #968",
                 (_DATA_LICENCE_EVIDENCE, (_README_EVIDENCE, "freely available de-identified datasets")),
                 anatomy_note="Modality CT, BodyPartExamined PANCREAS", window=(40.0, 400.0), tile=128),
    SampleSource("mr_abdomen", "pydicom-data", "data_store/data/MR-SIEMENS-DICOM-WithOverlays.dcm",
                 _PYDICOM_DATA_LICENCE + "; " + _GDCM_NOTE, "GDCM test data",
                 (_DATA_LICENCE_EVIDENCE, (_README_EVIDENCE, "MR-SIEMENS-DICOM-WithOverlays.dcm (from GDCM)")),
                 anatomy_note="Modality MR, BodyPartExamined ABDOMEN, StudyDescription abdomen^liver", tile=128),
    SampleSource("mr_shoulder", "pydicom-data", "data_store/data/MR2_UNCR.dcm",
                 _PYDICOM_DATA_LICENCE + "; " + _NEMA_NOTE, "NEMA WG04 'MR2'",
                 (_DATA_LICENCE_EVIDENCE, (_README_EVIDENCE, "MR2_*.dcm")),
                 anatomy_note="Modality MR, StudyDescription SHOULDER", tile=192),
    SampleSource("mr_head", "pydicom-data", "data_store/data/emri_small.dcm", _PYDICOM_DATA_LICENCE,
                 "pydicom-data enhanced MR test file (origin not documented in the package)",
                 (_DATA_LICENCE_EVIDENCE,),
                 anatomy_note="Modality MR, BodyPartExamined HEAD; 10 frames of 64x64", upscale=2),
    SampleSource("xray_chest", "pydicom-data", "data_store/data/RG1_UNCR.dcm",
                 _PYDICOM_DATA_LICENCE + "; " + _NEMA_NOTE, "NEMA WG04 'RG1'",
                 (_DATA_LICENCE_EVIDENCE, (_README_EVIDENCE, "RG1_*.dcm")),
                 anatomy_note="Modality CR, BodyPartExamined CHEST, StudyDescription THORAX; the file's window "
                              "(C 15000, W 30000) spans the whole 15-bit range and shows the lungs washed out, "
                              "so the frame's own 0.5-99.5 percentile range is used", window="auto", tile=256),
    SampleSource("xray_leg", "pydicom-data", "data_store/data/RG3_UNCR.dcm",
                 _PYDICOM_DATA_LICENCE + "; " + _NEMA_NOTE, "NEMA WG04 'RG3'",
                 (_DATA_LICENCE_EVIDENCE, (_README_EVIDENCE, "RG3_*.dcm")),
                 anatomy_note="Modality CR, BodyPartExamined EXTREMITY, StudyDescription 'Non-ossifying "
                              "fibroma of distal tibia'", tile=352),
    SampleSource("ultrasound", "pydicom-data", "data_store/data/color3d_jpeg_baseline.dcm", _PYDICOM_DATA_LICENCE,
                 "pydicom-data multi-frame ultrasound (SonoSite; origin not documented in the package)",
                 (_DATA_LICENCE_EVIDENCE,),
                 anatomy_note="Modality US, echocardiography cine loop; every 3rd of 120 frames",
                 frames=tuple(range(0, 120, 3)), us_region=True),
    SampleSource("ultrasound", "pydicom-data", "data_store/data/US1_UNCR.dcm",
                 _PYDICOM_DATA_LICENCE + "; " + _NEMA_NOTE, "NEMA WG04 'US1'",
                 (_DATA_LICENCE_EVIDENCE, (_README_EVIDENCE, "US1_*.dcm")),
                 anatomy_note="Modality US, ImageType SMALL PARTS (lymph node, colour Doppler)"),
    SampleSource("ultrasound", "pydicom-data", "data_store/data/gdcm-US-ALOKA-16.dcm",
                 _PYDICOM_DATA_LICENCE + "; " + _GDCM_NOTE, "GDCM test data",
                 (_DATA_LICENCE_EVIDENCE, (_README_EVIDENCE, "gdcm-US-ALOKA-16.dcm (from GDCM)")),
                 anatomy_note="Modality US, ImageType ABDOM/RAD, 16-bit palette colour"),
    SampleSource("ultrasound", "pydicom-data", "data_store/data/color-pl.dcm", _PYDICOM_DATA_LICENCE,
                 "pydicom-data colour test file (origin not documented in the package)",
                 (_DATA_LICENCE_EVIDENCE,),
                 anatomy_note="Modality US, SeriesDescription 'Transesophageal Echocardiogram'; 120x256",
                 upscale=2),
    SampleSource("fundus_retina", "scikit-image", "skimage/data/retina.jpg",
                 "CC0 1.0 Universal Public Domain Dedication (skimage.data.retina docstring)",
                 "Wikimedia Commons 'Fundus photograph of normal left eye' (Mikael Häggström)",
                 (("skimage/data/_fetchers.py", "Creative Commons CC0 1.0 Universal"),),
                 anatomy_note="skimage.data.retina: human retina (fundus photograph)", tile=192),
    SampleSource("fundus_retina", "scikit-image", "skimage/data/microaneurysms.png",
                 "No copyright restrictions, CC0 given by owner (skimage.data.microaneurysms docstring)",
                 "High-Resolution Fundus (HRF) Image Database, crop of 07_dr.JPG (green channel)",
                 (("skimage/data/_fetchers.py", "CC0 given by owner (Andreas Maier)"),),
                 anatomy_note="skimage.data.microaneurysms: retina with lesions; 102x102", upscale=2),
    SampleSource("histology_ihc", "scikit-image", "skimage/data/ihc.png",
                 "No known copyright restrictions (skimage.data.immunohistochemistry docstring)",
                 "Center for Microscopy And Molecular Imaging (CMMI); colonic glands, FHL2 IHC with DAB",
                 (("skimage/data/_fetchers.py", "Center for Microscopy And Molecular Imaging"),),
                 anatomy_note="skimage.data.immunohistochemistry: colonic glands", tile=128),
)


def _site_root(distribution: str) -> Path:
    """The folder the distribution's files are relative to (site-packages)."""
    dist = importlib.metadata.distribution(distribution)
    return Path(dist.locate_file("")).resolve()


def _source_path(src: SampleSource) -> Path:
    p = _site_root(src.distribution) / src.file
    if not p.is_file():
        raise NotFoundError(
            f"Sample source {src.file} is missing from the installed {src.distribution} package; "
            f"reinstall it (pip install {src.distribution})."
        )
    return p


def _check_evidence(src: SampleSource) -> None:
    for where, phrase in src.evidence:
        if where.startswith("dist:"):
            _, dist, fname = where.split(":", 2)
            text = importlib.metadata.distribution(dist).read_text(fname) or ""
        else:
            path = _site_root(src.distribution) / where
            text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
        if phrase not in text:
            raise ConfigError(
                f"The licence/origin statement recorded for {src.file} ({phrase!r}) is no longer in {where}; "
                "the installed package changed: review the sample recipe in medart_core/data.py."
            )


def _us_region_box(ds: Any) -> tuple[int, int, int, int] | None:
    seq = ds.get("SequenceOfUltrasoundRegions")
    if not seq:
        return None
    r = seq[0]
    return (int(r.RegionLocationMinX0), int(r.RegionLocationMinY0),
            int(r.RegionLocationMaxX1) + 1, int(r.RegionLocationMaxY1) + 1)


def _tiles(width: int, height: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    """A centred grid of non-overlapping size x size boxes, row by row."""
    nx, ny = width // size, height // size
    ox, oy = (width - nx * size) // 2, (height - ny * size) // 2
    for j in range(ny):
        for i in range(nx):
            x, y = ox + i * size, oy + j * size
            yield (x, y, x + size, y + size)


def _sample_frames(src: SampleSource, path: Path) -> list[tuple[Image.Image, dict]]:
    if path.suffix.lower() == ".dcm":
        frames = load_dicom(path, window=src.window, frames=list(src.frames) if src.frames else None)
        if src.us_region:
            import pydicom
            box = _us_region_box(pydicom.dcmread(path, stop_before_pixels=True))
            if box is not None:
                frames = [(img.crop(box), {**info, "region_crop": list(box),
                                           "conversions": info["conversions"] +
                                           [f"cropped to the ultrasound region {list(box)} "
                                            "(SequenceOfUltrasoundRegions)"]})
                          for img, info in frames]
        return frames
    img, note = load_image_file(path)
    return [(img, {"frame": 0, "conversions": [note]})]


def _sample_views(src: SampleSource, img: Image.Image, info: dict) -> Iterator[tuple[Image.Image, dict]]:
    """The full view and the tiles of one frame, each with its crop box and conversions."""
    base_conv = list(info.get("conversions", []))
    if src.upscale > 1:
        w, h = img.size
        img = img.resize((w * src.upscale, h * src.upscale), Image.Resampling.BICUBIC)
        base_conv.append(f"upscaled x{src.upscale} from {w}x{h} to {img.width}x{img.height} (bicubic): "
                         f"the source is smaller than {MIN_SIDE} px")
    if src.full_view:
        view, conv = img, list(base_conv)
        if max(img.size) > FULL_VIEW_MAX:
            s = FULL_VIEW_MAX / max(img.size)
            size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
            view = img.resize(size, Image.Resampling.LANCZOS)
            conv.append(f"full view downscaled from {img.width}x{img.height} to {size[0]}x{size[1]} (Lanczos)")
        yield view, {"view": "full", "crop_box": [0, 0, img.width, img.height], "conversions": conv}
    if src.tile:
        for box in _tiles(img.width, img.height, src.tile):
            yield img.crop(box), {"view": "tile", "crop_box": list(box),
                                  "conversions": base_conv + [f"{src.tile}x{src.tile} tile, native resolution"]}


def _informative(img: Image.Image, *, tile: bool) -> bool:
    """Near-constant images, and tiles that are mostly air, background or collimator, are left out."""
    luma = np.asarray(img.convert("L"), dtype=np.float32)
    if float(luma.std()) < MIN_STD:
        return False
    return not tile or float(((luma >= 12) & (luma <= 243)).mean()) >= MIN_CONTENT


def iter_sample_images() -> Iterator[tuple[Image.Image, str, dict]]:
    """(image, label, provenance) for every sample image, in a fixed order; no store, no disk writes.

    Tiles that are near-constant (std < MIN_STD) and repeats of earlier pixels are left out here."""
    seen: set[str] = set()
    for src in SAMPLE_RECIPE:
        _check_evidence(src)
        path = _source_path(src)
        version = importlib.metadata.version(src.distribution)
        for frame_img, info in _sample_frames(src, path):
            for img, view in _sample_views(src, frame_img, info):
                if min(img.size) < MIN_SIDE:
                    continue
                if not _informative(img, tile=view["view"] == "tile"):
                    continue
                h = pixel_hash(img)
                if h in seen:
                    continue
                seen.add(h)
                windowing = info.get("windowing")
                dicom = {k: info[k] for k in ("modality", "body_part", "photometric", "bits_stored",
                                              "transfer_syntax", "n_frames") if info.get(k) is not None}
                yield img, src.label, {
                    "package": src.distribution,
                    "version": version,
                    "source_file": src.file,
                    "frame": info.get("frame", 0),
                    "view": view["view"],
                    "crop_box": view["crop_box"],
                    "windowing": windowing,
                    "conversions": view["conversions"],
                    "licence": src.licence,
                    "origin": src.origin,
                    "label_basis": src.anatomy_note,
                    **({"dicom": dicom} if dicom else {}),
                    **({"needs_phi_review": True} if info.get("burned_in_annotation") else {}),
                }


def build_sample_dataset(ws: Workspace, store: "CaptionStore", name: str = "sample") -> ImportReport:
    """Build the sample dataset (>= 200 real medical images, 10 classes) into the workspace.

    Deterministic: the same installed packages give the same PNG bytes and manifest on every run.
    Each image gets its class's seed caption (SAMPLE_CLASSES) as a draft of source "template".
    Raises ConfigError if a dataset called ``name`` already exists.
    """
    t0 = time.monotonic()
    validate_name(name, "dataset name")
    if store.has_dataset(name):
        raise ConfigError(f"Dataset {name!r} already exists ({store.count_images(name)} images); "
                          "build the sample under another name (--name).")
    report = ImportReport(name)
    staging = _Staging(ws, store, name, report)
    try:
        for img, label, source in iter_sample_images():
            shown = f"{source['source_file']} frame {source['frame']} {source['view']} {source['crop_box']}"
            # The provenance names the package file, frame, view and crop box already; no extra "original name"
            # (the same rule as users' imports, though these pip-shipped test files are no patient's).
            staging.add(shown, img, label, dict(source), draft=(SAMPLE_CLASSES[label], "template"),
                        manifest_extra=source)
        staging.commit(create={"modality": "mixed",
                               "meta": {"seed_captions": dict(SAMPLE_CLASSES), "builder": BUILDER}})
    except BaseException:
        staging.discard()
        raise
    report.seconds = time.monotonic() - t0
    return report


def sample_data_cli(workspace: str | None, name: str = "sample") -> int:
    """``python -m medart_core sample-data``: build the sample dataset and print what was made."""
    from .captions import CaptionStore

    try:
        ws = Workspace.open(workspace)
        store = CaptionStore.for_workspace(ws)
        try:
            report = build_sample_dataset(ws, store, name)
        finally:
            store.close()
    except MedArtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary(max_skipped=5))
    print(f"Images: {ws.images_dir(name)}\nManifest: {ws.manifest_path(name)}")
    return 0 if report.imported else 1


# =========================================================================================================
# Derived datasets (e.g. the ablation's colour-shifted fine-tuning set)
# =========================================================================================================
def derive_dataset(ws: Workspace, store: "CaptionStore", source: str, name: str, *,
                   transform: Callable[[Image.Image], Image.Image], transform_name: str,
                   classes: list[str] | None = None,
                   caption: Callable[[Image.Image, str], str] | None = None,
                   caption_source: str = "derived") -> ImportReport:
    """A new dataset ``name`` holding ``transform(image)`` of each image of ``source`` (only ``classes`` when
    given), in one all-or-nothing batch like an import. Each image keeps its label and its source's provenance,
    plus ``derived_from`` (dataset, image id, pixel hash) and ``transform``; its draft is ``caption(new_image,
    label)`` when given, else none. The dataset's modality and seed captions are the source's.
    Raises ConfigError if ``name`` exists, NotFoundError if ``source`` has no image of ``classes``."""
    t0 = time.monotonic()
    validate_name(name, "dataset name")
    if store.has_dataset(name):
        raise ConfigError(f"Dataset {name!r} already exists ({store.count_images(name)} images); derive into "
                          "another name.")
    info = store.dataset_info(source)
    recs = [r for r in sorted(store.list_images(source), key=lambda r: r.id)
            if classes is None or r.label in classes]
    if not recs:
        raise NotFoundError(f"Dataset {source!r} has no images of class(es) {classes}.")
    report = ImportReport(name)
    staging = _Staging(ws, store, name, report)
    try:
        for r in recs:
            with Image.open(ws.image_path(source, r.file_name)) as im:
                img = transform(im.convert("RGB"))
            prov = {**dict(r.source or {}), "derived_from": {"dataset": source, "image_id": r.id,
                                                              "pixel_hash": r.pixel_hash},
                    "transform": transform_name}
            draft = (caption(img, r.label), caption_source) if caption is not None else None
            staging.add(f"{source}#{r.id}", img, r.label, prov, draft=draft)
        meta = {k: v for k, v in (info.meta or {}).items() if k in ("seed_captions", "keep_identifiers")}
        staging.commit(create={"modality": info.modality,
                               "meta": {**meta, "derived_from": source, "transform": transform_name}})
    except BaseException:
        staging.discard()
        raise
    report.seconds = time.monotonic() - t0
    return report
