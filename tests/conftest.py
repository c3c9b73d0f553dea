"""Shared fixtures. Every test gets its own workspace under tmp_path; nothing touches the network."""
from __future__ import annotations

import os
import socket
from typing import Callable

import pytest

# Belt and braces: no test may reach a model hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture
def ws(tmp_path, monkeypatch):
    from medart_core.workspace import Workspace

    root = tmp_path / "workspace"
    monkeypatch.setenv("MEDART_HOME", str(root))
    return Workspace.open(root)


@pytest.fixture
def store(ws):
    from medart_core.captions import CaptionStore

    s = CaptionStore.for_workspace(ws)
    yield s
    s.close()


@pytest.fixture
def ledger(ws):
    from medart_core.jobs import JobLedger

    led = JobLedger(ws)
    yield led
    led.close()


@pytest.fixture(scope="session")
def tiny_tok():
    """The tiny backbone's T5 tokenizer (no model weights)."""
    from medart_core.backbone import load_tokenizer

    return load_tokenizer("tiny")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()`` gives a TCP port free on 127.0.0.1 now, for a server or a process group a test starts."""
    return _free_port


@pytest.fixture
def one_thread():
    """torch on one thread for the test (2-core machines run two test workers), restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    import shutil

    return os.environ.get("MEDART_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium():
    """Playwright driving Debian's Chromium (``playwright install`` cannot download browsers here)."""
    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: run tests/ensure_browser.sh (the README's test command does)")
        pytest.skip("chromium not installed (tests/ensure_browser.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm (tests/slurm_cluster.py), all its files in a temp folder, stopped by pid.

    ``SLURM_CONF`` is also set in ``os.environ`` for the session: submitit and medart_core.slurm call
    sbatch/squeue with the inherited environment."""
    from slurm_cluster import start_cluster, why_unavailable

    reason = why_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm is unavailable in CI: {reason} (the README's test command runs tests/ensure_slurm.sh)")
        pytest.skip(reason)
    cluster = start_cluster()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in cluster.env.items():
            mp.setenv(key, value)
        try:
            yield cluster
        finally:
            cluster.stop()
