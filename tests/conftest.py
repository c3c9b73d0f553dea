"""Shared fixtures. Every test gets its own workspace under tmp_path; nothing touches the network."""
from __future__ import annotations

import os

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
    close = getattr(s, "close", None)
    if close:
        close()


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
