"""A keyboard-only review of 5 images in headless Chromium, then the conflict panel; checks the store's events."""
from __future__ import annotations

import os
import socket

import pytest

from bench.caption_latency import build_review_dataset

SHOTS = os.environ.get("MEDART_SCREENSHOTS", "/tmp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(ws, store):
    import gradio as gr

    from studio.caption_tab import build_caption_tab
    from studio.context import StudioContext

    ids = build_review_dataset(ws, store, "kb", 8, labels=("polyps", "esophagitis"), size=64)
    ctx = StudioContext(ws=ws, store=store, backbone_spec="tiny")
    with gr.Blocks() as demo:
        with gr.Tab("Captions"):
            build_caption_tab(ctx)
    # no launch js/head: the tab installs its own shortcuts (gr.HTML js_on_load)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield url, store, ids
    demo.close()


def _at(page, n: int, total: int = 8) -> None:
    """Wait until image ``n`` of the filtered list is shown and the app is idle."""
    page.wait_for_function(
        "([n, t]) => { const p = document.querySelector('#cap-position');"
        " return p && p.innerText.includes(n + ' / ' + t + ' in filter'); }", arg=[n, total], timeout=30_000)
    page.wait_for_function("() => !document.querySelector('.pending')", timeout=30_000)


def _editor_value(page) -> str:
    return page.locator("#cap-editor textarea").input_value()


@pytest.mark.browser
@pytest.mark.slow
def test_keyboard_only_review_of_five_images(served, chromium):
    url, store, ids = served
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url)
    _at(page, 1)

    # the reviewer name is typed once and remembered by the browser (BrowserState -> localStorage)
    page.focus("#cap-reviewer textarea, #cap-reviewer input")
    page.keyboard.type("Dr Keyboard")
    page.keyboard.press("Tab")
    page.wait_for_timeout(500)
    page.reload()
    _at(page, 1)
    page.wait_for_function("() => { const e = document.querySelector('#cap-reviewer textarea, #cap-reviewer input');"
                           " return e && e.value === 'Dr Keyboard'; }", timeout=30_000)
    page.screenshot(path=f"{SHOTS}/caption_tab_start.png", full_page=True)

    kb = page.keyboard
    # 1: approve as drafted
    kb.press("Alt+a")
    _at(page, 2)
    # 2: edit at the end of the caption, then approve (the edit is saved first)
    kb.press("Alt+e")
    kb.press("End")
    kb.type(" Edited by keyboard.")
    page.wait_for_timeout(300)
    kb.press("Alt+a")
    _at(page, 3)
    # 3: reject
    kb.press("Alt+r")
    _at(page, 4)
    # 4: rewrite, save with Ctrl+S, then next with Alt+Right
    kb.press("Alt+e")
    kb.press("Control+a")
    kb.type("An endoscopic image of esophagitis with linear erosions.")
    page.wait_for_function("() => document.querySelector('#cap-tokens').innerText.includes('/ 120')")
    kb.press("Control+s")
    page.wait_for_function("() => document.querySelector('#cap-notice').innerText.includes('Saved')",
                           timeout=30_000)
    kb.press("Alt+ArrowRight")
    _at(page, 5)
    # 5: needs a second read
    kb.press("Alt+n")
    _at(page, 6)
    page.screenshot(path=f"{SHOTS}/caption_tab_after_review.png", full_page=True)
    # back, then jump to the next pending image (skips nothing decided)
    kb.press("Alt+ArrowLeft")
    _at(page, 5)
    kb.press("Alt+p")
    _at(page, 6)
    # letters without a modifier are plain typing in the editor, never shortcuts
    kb.press("Alt+e")
    kb.press("End")
    kb.type(" a r n p")
    page.wait_for_timeout(300)
    assert _editor_value(page).endswith(" a r n p")
    assert "6 / 8" in page.locator("#cap-position").inner_text()

    cur = [store.current(i) for i in ids[:5]]
    assert [c.status for c in cur] == ["approved", "approved", "rejected", "pending", "needs-second-read"]
    assert cur[1].text.endswith(" Edited by keyboard.")
    assert cur[3].text == "An endoscopic image of esophagitis with linear erosions."
    for i in ids[:5]:
        human = [e for e in store.history(i) if e.kind != "draft"]
        assert human and all(e.reviewer == "Dr Keyboard" for e in human)
    assert [e.kind for e in store.history(ids[1])] == ["draft", "edit", "status"]
    assert [e.kind for e in store.history(ids[3])] == ["draft", "edit"]
    assert store.current(ids[5]).text == store.history(ids[5])[0].text, "unsaved typing was not written"

    # a colleague saves image 6 meanwhile: Ctrl+S opens the conflict panel, nothing is overwritten
    theirs = "An endoscopic image of esophagitis, the colleague's caption."
    store.edit(ids[5], theirs, reviewer="Dr Other", expected_version=store.current(ids[5]).version)
    kb.press("Control+s")
    page.wait_for_selector("#cap-conflict", state="visible", timeout=30_000)
    assert page.locator("#cap-theirs textarea").input_value() == theirs
    assert page.locator("#cap-mine textarea").input_value().endswith(" a r n p")
    assert store.current(ids[5]).text == theirs
    page.screenshot(path=f"{SHOTS}/caption_tab_conflict.png", full_page=True)
    page.locator("#cap-keep-mine").click()
    page.wait_for_selector("#cap-conflict", state="hidden", timeout=30_000)
    assert store.current(ids[5]).text.endswith(" a r n p")
    assert [e.reviewer for e in store.history(ids[5])[-2:]] == ["Dr Other", "Dr Keyboard"]
    assert not errors, errors
    assert not dialogs, "no script from caption text may run"


@pytest.mark.browser
@pytest.mark.slow
def test_script_caption_shows_literally(served, chromium):
    url, store, ids = served
    xss = "<script>alert(1)</script> An endoscopic image of <img src=x onerror=alert(2)> polyps"
    store.edit(ids[0], xss, reviewer="<b>mallory</b>", expected_version=store.current(ids[0]).version)
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url)
    _at(page, 1)
    assert _editor_value(page) == xss
    assert "<script>alert(1)</script>" in page.locator("#cap-diff").inner_text()
    assert "<b>mallory</b>" in page.locator("#cap-position").inner_text()
    assert page.locator("#cap-diff img, #cap-position b:has-text('mallory'), #cap-diff script").count() == 0
    page.get_by_text("History of this image").click()
    page.wait_for_timeout(500)
    assert xss in page.locator("#cap-history").inner_text()
    assert page.locator("#cap-history img").count() == 0
    page.screenshot(path=f"{SHOTS}/caption_tab_xss.png", full_page=True)
    assert not dialogs
