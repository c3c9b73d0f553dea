"""Patient-data hygiene: a DICOM full of patient tags, saved under a patient-named folder, leaves none of them
(nor its file or folder name) anywhere in the workspace (SQLite files read as bytes), the durable folder, the
logs or the exports; BurnedInAnnotation YES is flagged and counted; with the admin opt-in they are kept."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medart_core import data
from medart_core.captions import CaptionStore
from medart_core.data import (DICOM_IDENTIFYING_KEYWORDS, import_cli, import_images, keeps_identifiers, load_dicom,
                              needs_phi_review)
from medart_core.errors import ConfigError
from medart_core.interchange import export_imagefolder, export_medart_csv

PATIENT_DIR = "DOE^JOHN_12345"
DICOM_NAME = "IM_DOE_JOHN_0001.dcm"
PNG_NAME = "DOE_JOHN_12345_wound.png"
TAGS = {
    "PatientName": "Doe^Johnathan",
    "PatientID": "MRN-99887766",
    "PatientBirthDate": "19610312",
    "OtherPatientIDs": "ALT-5544332",
    "InstitutionName": "Saint Elsewhere General",
    "InstitutionAddress": "12 Harbour Road Springfield",
    "ReferringPhysicianName": "House^Gregory",
    "PerformingPhysicianName": "Quinn^Michaela",
    "OperatorsName": "Technologist^Tina",
    "StationName": "CTSCAN-ROOM7",
    "DeviceSerialNumber": "SN-4242-7171",
    "AccessionNumber": "ACC20240417X",
    "StudyID": "STUDY-8642",
    "StudyDate": "19990417",
    "SeriesDate": "19990418",
    "AcquisitionDate": "19990419",
    "ContentDate": "19990420",
    "StudyTime": "101112.131415",
    "StudyDescription": "Johnathan head trauma follow-up",
    "SeriesDescription": "Doe axial bone window",
    "StudyInstanceUID": "1.2.826.0.1.3680043.9.7777.1001",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.9.7777.1002",
    "SOPInstanceUID": "1.2.826.0.1.3680043.9.7777.1003",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.9.7777.1004",
}


def make_patient_export(root: Path) -> Path:
    """A clinical-export-like tree: a patient folder with a DICOM, and a photo named after the patient."""
    import pydicom
    import pydicom.data

    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    for k, v in TAGS.items():
        setattr(ds, k, v)
    ds.file_meta.MediaStorageSOPInstanceUID = TAGS["SOPInstanceUID"]
    ds.BurnedInAnnotation = "YES"
    (root / PATIENT_DIR).mkdir(parents=True)
    ds.save_as(root / PATIENT_DIR / DICOM_NAME)
    (root / "wound").mkdir()
    rgb = np.random.default_rng(3).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(root / "wound" / PNG_NAME)
    return root


def identifying_needles(dicom_path: Path) -> set[str]:
    """Every identifying value in the file as written (ours and CT_small's own), plus the names."""
    import pydicom

    ds = pydicom.dcmread(dicom_path)
    present = [ds[k] for k in DICOM_IDENTIFYING_KEYWORDS if k in ds and ds[k].VR != "SQ"]
    vals = {str(e.value).strip() for e in present}
    vals.add(str(ds.file_meta.MediaStorageSOPInstanceUID))
    # each component of a person name on its own: "Doe^Johnathan" -> "Johnathan"
    parts = {p for e in present if e.VR == "PN" for p in str(e.value).replace("^", " ").split()}
    names = {PATIENT_DIR, "JOHN_12345", Path(DICOM_NAME).stem, Path(PNG_NAME).stem}
    return {v for v in vals | parts | names if len(v) >= 6 and not v.isdigit() or len(v) >= 8}


def files_containing(root: Path, needles: set[str]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            blob = p.read_bytes().lower()
            found = [n for n in needles if n.lower().encode() in blob]
            if found:
                hits[str(p.relative_to(root))] = sorted(found)
    return hits


def test_no_identifier_is_stored_served_logged_or_exported(ws, tmp_path, monkeypatch, capsys, caplog):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    monkeypatch.setenv("MEDART_DURABLE_DIR", str(bucket))     # the durable copy must be clean as well
    src = make_patient_export(tmp_path / "export")
    needles = identifying_needles(src / PATIENT_DIR / DICOM_NAME)
    assert {"Doe^Johnathan", "Johnathan", "MRN-99887766", "19990417", "Saint Elsewhere General",
            TAGS["SOPInstanceUID"], PATIENT_DIR, "IM_DOE_JOHN_0001"} <= needles
    caplog.set_level(logging.DEBUG)
    # through the CLI, as an admin would run it (its output is what would land in a log)
    assert import_cli(str(src), str(ws.root), "ct") == 0
    out = capsys.readouterr()
    printed = out.out + out.err + caplog.text
    assert not [n for n in needles if n.lower() in printed.lower()], printed
    assert "1 image(s) flagged needs_phi_review" in out.out
    assert "Folder names were not used as class labels for 1 DICOM file(s)" in out.out
    store = CaptionStore.for_workspace(ws)
    try:
        recs = store.list_images("ct")
        assert sorted(r.label for r in recs) == ["ct", "wound"]     # the patient folder did not become a label
        dcm = next(r for r in recs if "dicom" in r.source)
        assert dcm.source["needs_phi_review"] is True and needs_phi_review(store, "ct") == [dcm.id]
        assert "original_name" not in dcm.source and "identifiers" not in dcm.source["dicom"]
        assert set(dcm.source["dicom"]) <= {"modality", "body_part", "photometric", "bits_stored", "transfer_syntax",
                                            "n_frames", "frame", "windowing", "conversions", "burned_in_annotation"}
        assert not keeps_identifiers(store, "ct")
        # the exports a trainer or admin could take away
        for st in store.states("ct"):
            store.edit(st.image_id, "An axial CT image of the head", reviewer="ana", expected_version=st.version)
        export_imagefolder(store, ws, "ct", tmp_path / "exp-imagefolder", status="all")
        export_medart_csv(store, ws, "ct", tmp_path / "exp-csv", status="all")
        # read while the store is open, so the SQLite WAL (not yet checkpointed) is among the files read
        assert {p.name for p in ws.root.iterdir()} >= {"captions.sqlite", "captions.sqlite-wal"}
        for where in (ws.root, bucket, tmp_path / "exp-imagefolder", tmp_path / "exp-csv"):
            files = [p for p in where.rglob("*") if p.is_file()]
            assert files, where
            assert files_containing(where, needles) == {}, where
    finally:
        store.close()
    assert files_containing(ws.root, needles) == {}          # and after the checkpoint into the main file


def test_import_report_counts_burned_in_and_lists_only_ids(ws, store, tmp_path):
    src = make_patient_export(tmp_path / "export")
    rep = import_images(ws, store, src, "ct")
    assert len(rep.phi_review) == 1 and rep.phi_review == needs_phi_review(store, "ct")
    assert rep.folder_labels_ignored == 1 and not rep.identifiers_kept
    d = rep.to_dict()
    assert d["needs_phi_review"] == rep.phi_review and d["identifiers_kept"] is False
    assert "No patient identifiers or original file names were stored" in rep.summary()
    manifest = [line for line in ws.manifest_path("ct").read_text().splitlines()]
    assert sum('"needs_phi_review": true' in line for line in manifest) == 1


def test_admin_opt_in_keeps_identifiers_per_dataset(ws, store, tmp_path):
    src = make_patient_export(tmp_path / "export")
    rep = import_images(ws, store, src, "keep", keep_identifiers=True)
    assert rep.identifiers_kept and "were KEPT" in rep.summary()
    assert keeps_identifiers(store, "keep") and store.dataset_info("keep").meta["keep_identifiers"] is True
    dcm = next(r for r in store.list_images("keep") if "dicom" in r.source)
    assert dcm.source["original_name"] == f"{PATIENT_DIR}/{DICOM_NAME}"
    ids = dcm.source["dicom"]["identifiers"]
    for k, v in TAGS.items():
        assert ids[k] == v, k
    assert ids["MediaStorageSOPInstanceUID"] == TAGS["SOPInstanceUID"]
    assert dcm.source["dicom"]["study_description"] == TAGS["StudyDescription"]
    assert dcm.source["needs_phi_review"] is True
    png = next(r for r in store.list_images("keep") if "dicom" not in r.source)
    assert png.source["original_name"] == f"wound/{PNG_NAME}"
    # the byte search of the first test does find them when they are there (a control for that test)
    hits = files_containing(ws.root, {"Doe^Johnathan", "MRN-99887766", PATIENT_DIR, TAGS["StudyInstanceUID"]})
    assert set(hits.get("captions.sqlite-wal", hits.get("captions.sqlite", []))) == {
        "Doe^Johnathan", "MRN-99887766", PATIENT_DIR, TAGS["StudyInstanceUID"]}
    # the choice is made when the dataset is created, and an import must ask for it explicitly
    import_images(ws, store, src / "wound", "plain")
    with pytest.raises(ConfigError, match="created without keeping patient identifiers"):
        import_images(ws, store, src, "plain", keep_identifiers=True)
    more = tmp_path / "more"
    more.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8) + 7, "RGB").save(more / "MRN-1234567_x.png")
    import_images(ws, store, more, "keep")                      # no opt-in on this import: names dropped
    newest = store.list_images("keep")[-1]
    assert "original_name" not in newest.source
    # and the CLI takes the flag
    assert import_cli(str(src), str(ws.root), "cli-keep", keep_identifiers=True) == 0
    assert keeps_identifiers(store, "cli-keep")


def test_load_dicom_keeps_only_the_whitelist_by_default(tmp_path):
    import pydicom.data

    path = pydicom.data.get_testdata_file("MR-SIEMENS-DICOM-WithOverlays.dcm")   # has descriptions, a name
    (_, info), = load_dicom(path)[:1]
    assert "series_description" not in info and "study_description" not in info and "identifiers" not in info
    assert info["modality"] == "MR"
    (_, kept), = load_dicom(path, keep_identifiers=True)[:1]
    assert kept["identifiers"]["PatientName"] and kept["series_description"] == "marked lesion<MPR Collection>"
    # the sample recipe goes through the same loader: no descriptions or patient tags in its provenance
    src = next(s for s in data.SAMPLE_RECIPE if s.file.endswith("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    frames = data._sample_frames(src, data._source_path(src))
    assert frames and all("series_description" not in i and "identifiers" not in i for _, i in frames)
