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


HEAVY = ("torch", "diffusers", "transformers", "gradio")
STAGES = ("train", "train_job", "vsg", "generate", "evaluate", "ablation", "demo_backbone", "accounts", "data",
          "captions", "backbone", "blind")
_HELP_PROBE = """
import contextlib, io, json, sys
from medart_core.cli import COMMANDS, build_parser

parser = build_parser()
argvs = [[c.name, "--help"] for c in COMMANDS] + [["--help"], ["jobs", "submit", "train", "--help"],
         ["jobs", "submit", "sleep", "--help"], ["jobs", "list", "--help"], ["users", "add", "--help"],
         ["demo-backbone", "build", "--help"], ["executors", "add", "--help"], ["executors", "check", "--help"],
         ["jobs", "resume", "--help"]]
codes = []
for argv in argvs:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            codes.append(e.code)
print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
"""


def test_help_imports_no_heavy_library_and_no_stage_module():
    # A stage module may import torch at its top: the parser and every `CMD --help` must not need it.
    out = subprocess.run([sys.executable, "-c", _HELP_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert set(d["codes"]) == {0}
    heavy = [m for m in d["modules"] if m.split(".")[0] in HEAVY]
    assert not heavy, f"building the parser imported {heavy[:5]}"
    stages = [m for m in d["modules"] if m in {f"medart_core.{s}" for s in STAGES}]
    assert not stages, f"building the parser imported stage modules {stages}; import them in the handlers"


def test_help_and_jobs_help_answer():
    for argv in (("--help",), ("jobs", "--help"), ("jobs", "submit", "--help")):
        out = run(*argv)
        assert out.returncode == 0 and "usage: python -m medart_core" in out.stdout, out.stderr
    assert "train" in run("jobs", "submit", "--help").stdout and "sleep" in run("jobs", "submit", "--help").stdout
    assert run("no-such-command").returncode == 2


def test_cli_mirrors_of_stage_values_agree_with_the_stages():
    from medart_core import ablation, accounts, generate, vsg
    from medart_core.commands import ablation as c_ablation
    from medart_core.commands import caption as c_caption
    from medart_core.commands import generate as c_generate
    from medart_core.commands import users as c_users

    assert (c_caption.DRAFTERS, c_caption.DEFAULT_VLM, c_caption.DEFAULT_SHORTENER, c_caption.DEFAULT_MAX_RETRIES,
            c_caption.DEFAULT_BACKBONE_SPEC) == (vsg.DRAFTERS, vsg.DEFAULT_VLM, vsg.DEFAULT_SHORTENER,
                                                 vsg.DEFAULT_MAX_RETRIES, vsg.DEFAULT_BACKBONE_SPEC)
    assert (c_generate.BASE, c_generate.SEED_RULE) == (generate.BASE, generate.SEED_RULE)
    assert (c_users.ROLES, c_users.ROLE_DOES, c_users.LOCK_AFTER) == (accounts.ROLES, accounts.ROLE_DOES,
                                                                      accounts.LOCK_AFTER)
    assert sorted(c_ablation.PRESET_NAMES) == sorted(ablation.PRESETS)
    assert c_ablation.ROW_NAMES == ablation.ROW_NAMES


def test_one_workspace_option_and_one_table():
    import argparse

    from medart_core.cli import COMMANDS, build_parser

    names = [c.name for c in COMMANDS]
    assert len(names) == len(set(names))

    def leaves(p: argparse.ArgumentParser, path=()):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, p
        for s in subs:
            for name, child in s.choices.items():
                yield from leaves(child, path + (name,))

    for path, p in leaves(build_parser()):
        ws = [a for a in p._actions if "--workspace" in a.option_strings]
        assert len(ws) == 1 and ws[0].option_strings == ["--workspace", "-w"] and ws[0].default is None, path
