"""The CLI on a real workspace, as a script would use it: sample data, import, export, caption re-import."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medart_core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_import_export_and_caption_roundtrip_through_cli(tmp_path):
    ws = tmp_path / "ws"
    src = tmp_path / "src"
    rng = np.random.default_rng(1)
    for label in ("melanoma", "nevus"):
        (src / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray((rng.random((130, 140, 3)) * 255).astype("uint8")).save(src / label / f"{label}{i}.png")
    (src / "nevus" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)

    # --keep-identifiers (the admin opt-in) keeps original file names, which the caption import below matches;
    # without it names are dropped (tests/test_hygiene.py) and captions match the exported file names.
    out = run("import", str(src), "--workspace", str(ws), "--dataset", "derm", "--modality", "dermoscopy",
              "--keep-identifiers")
    assert out.returncode == 0, out.stderr
    assert "6" in out.stdout and "broken.png" in out.stdout

    # Nothing is approved yet: an approved-only export is empty; "all" has every image.
    out = run("export", "--workspace", str(ws), "--dataset", "derm", "--format", "medart-csv", "--status", "all",
              "--out", str(tmp_path / "csv"))
    assert out.returncode == 0, out.stderr
    rows = (tmp_path / "csv" / "metadata.csv").read_text().strip().splitlines()
    assert rows[0] == "file_name,text" and len(rows) == 7

    meta = tmp_path / "metadata.jsonl"
    meta.write_text("\n".join(json.dumps({"file_name": f"melanoma{i}.png", "text": f"A dermoscopic image {i}"})
                              for i in range(3)) + "\n")
    out = run("import-captions", str(meta), "--workspace", str(ws), "--dataset", "derm")
    assert out.returncode == 0 and "Imported 3" in out.stdout, out.stdout + out.stderr

    out = run("datasets", "--workspace", str(ws))
    assert out.returncode == 0 and "derm\tdermoscopy\t6 images" in out.stdout


def test_cli_reports_user_errors_without_traceback(tmp_path):
    out = run("export", "--workspace", str(tmp_path / "ws"), "--dataset", "nope", "--format", "imagefolder",
              "--out", str(tmp_path / "o"))
    assert out.returncode == 2
    assert "error:" in out.stderr and "Traceback" not in out.stderr


def test_caption_without_backbone_weights_says_which_flag_to_set(tmp_path):
    ws = tmp_path / "ws"
    src = tmp_path / "src" / "polyps"
    src.mkdir(parents=True)
    Image.fromarray((np.random.default_rng(2).random((130, 130, 3)) * 255).astype("uint8")).save(src / "a.png")
    assert run("import", str(src.parent), "--workspace", str(ws), "--dataset", "kv").returncode == 0
    env_run = subprocess.run(
        [sys.executable, "-m", "medart_core", "caption", "--workspace", str(ws), "--dataset", "kv",
         "--drafter", "template", "--backbone", "PixArt-alpha/PixArt-XL-2-512x512"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert env_run.returncode == 2, env_run.stderr
    assert "--backbone tiny" in env_run.stderr and "Traceback" not in env_run.stderr
    ok = run("caption", "--workspace", str(ws), "--dataset", "kv", "--drafter", "template", "--backbone", "tiny")
    assert ok.returncode == 0 and "1 drafted" in ok.stdout, ok.stdout + ok.stderr
