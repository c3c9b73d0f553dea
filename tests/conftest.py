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
