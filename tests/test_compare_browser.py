"""A blind review of 10 pairs (the tiny base against a cpu-smoke checkpoint) done with the keyboard in headless
Chromium: the page never names the checkpoints or the image paths while voting, and the votes then appear in
the results table and the store. Then the Metrics table and the side-by-side grid, for the screenshots."""
from __future__ import annotations

import os
import re
import socket
import sqlite3
from pathlib import Path

import pytest

SHOTS = os.environ.get("MEDART_SCREENSHOTS", "/tmp")
N = 10
WAIT_MS = 60_000          # generous: the CI box has 2 shared cores
# Alt+← / Alt+→ per pair; a tag typed after Alt+F on pair 3 goes with that vote.
KEYS = ["ArrowLeft", "ArrowRight", "ArrowRight", "ArrowLeft", "ArrowLeft", "ArrowRight", "ArrowLeft", "ArrowLeft",
        "ArrowRight", "ArrowRight"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import gradio as gr
    from training_data import make_dataset

    from medart_core import evaluate as E
    from medart_core.blind import ReviewStore
    from medart_core.captions import CaptionStore
    from medart_core.train import TrainConfig, train
    from medart_core.workspace import Workspace
    from studio.compare_tab import LAUNCH_CSS, build_compare_tab
    from studio.context import StudioContext

    ws = Workspace.open(tmp_path_factory.mktemp("compare-browser") / "workspace")
    store = CaptionStore.for_workspace(ws)
    make_dataset(ws, store, "mini", n=12, size=(64, 64))
    train(TrainConfig.from_preset("cpu-smoke", dataset="mini", captions="latest", max_steps=2, checkpoint_every=2,
                                  validate_every=100, export_merged=False), ws, store, run_name="r1",
          log=lambda m: None)
    spec = E.EvalSpec(dataset="mini", per_class=5, captions="latest", steps=3, n_boot=10, kid_subsets=10,
                      min_samples=2)
    base, run = E.run_evaluation(ws, store, spec, ["base", "r1@2"])
    assert len(base.images) == len(run.images) == N
    reviews = ReviewStore.for_workspace(ws)
    # the coordinator's step (the Set-up panel's /blind_create is covered through the API in test_compare_tab)
    E.create_blind_study(ws, store, reviews, "study-1", "checkpoints", base, run, seed=7, created_by="coordinator")
    ctx = StudioContext(ws=ws, store=store, backbone_spec="tiny")
    with gr.Blocks() as demo:
        with gr.Tab("Compare"):
            build_compare_tab(ctx)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                            css=LAUNCH_CSS, allowed_paths=[str(ws.datasets_dir)])
    yield url, ws, reviews, (base, run)
    demo.close()


def _secrets(ws, results) -> list[str]:
    """Strings that would tell a reviewer where the pair's images come from."""
    out = ["r1@2", str(ws.root), "samples/eval", "/datasets/", "evaluations"]
    for r in results:
        out.append(Path(r.images[0]).parent.name)              # the checkpoint's evaluation folder
        out += [Path(p).stem for p in r.images]               # the image files (prompt hash + seed)
    return out


def _assert_blind(page, secrets: list[str]) -> None:
    html = page.content()
    leaked = [s for s in secrets if s in html]
    assert not leaked, f"the page names a source while voting: {leaked}"
    text = page.locator("body").inner_text()
    assert not re.search(r"(?<![\w@-])(base|r1)(?![\w@-])", text), "a checkpoint name is on the page"
    for side in ("left", "right"):
        src = page.locator(f"#blind-{side}-img img").get_attribute("src") or ""
        assert "/gradio_api/file=" in src and src.endswith("/image.png"), src


def _at(page, n: int) -> None:
    """Wait until pair ``n`` is on screen and the app is idle (on timeout: what the page shows, and a shot)."""
    try:
        page.wait_for_function("(n) => { const p = document.querySelector('#blind-pos-text');"
                               " return p && p.innerText.includes('pair ' + n + ' / 10'); }", arg=n, timeout=WAIT_MS)
        page.wait_for_function("() => !document.querySelector('.pending') && document.querySelector('#blind-left-img "
                               "img') && !document.querySelector('#blind-left button[disabled], #blind-left[disabled]')",
                               timeout=WAIT_MS)
    except Exception:
        page.screenshot(path=f"{SHOTS}/compare_failure.png", full_page=True)
        pos = page.locator("#blind-pos").inner_text()
        raise AssertionError(f"pair {n} not shown; the page says {pos!r} and "
                             f"{page.locator('#blind-notice').inner_text()!r}") from None


@pytest.mark.browser
@pytest.mark.slow
def test_keyboard_blind_review_of_ten_pairs_hides_sources_and_votes_appear(served, chromium):
    url, ws, reviews, results = served
    secrets = _secrets(ws, results)
    page = chromium.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.get_by_role("tab", name="Blind review").click()
    page.fill("#blind-reviewer textarea, #blind-reviewer input", "Dr Keyboard")
    page.locator("#blind-study input").click()
    page.get_by_role("option", name="study-1").click()
    page.locator("#blind-start").click()
    _at(page, 1)

    kb = page.keyboard
    for i, key in enumerate(KEYS):
        _assert_blind(page, secrets)
        if i == 2:
            kb.press("Alt+f")
            page.wait_for_function("() => document.activeElement && document.activeElement.closest('#blind-tag')")
            kb.type("banding")
            page.screenshot(path=f"{SHOTS}/compare_blind_pair.png", full_page=True)
        kb.press(f"Alt+{key}")
        if i + 1 < N:
            _at(page, i + 2)
    page.wait_for_function("() => document.querySelector('#blind-pos-text').innerText.includes('Done')",
                           timeout=WAIT_MS)
    page.wait_for_selector("#blind-results-table", timeout=WAIT_MS)
    page.screenshot(path=f"{SHOTS}/compare_blind_done.png", full_page=True)

    # the store has the ten votes, by this reviewer, in the keys' order; the page shows the same counts
    with sqlite3.connect(ws.root / "reviews.sqlite") as con:
        shown = [r[0] for r in con.execute("SELECT shown_choice FROM votes ORDER BY id")]
        tags = [r[0] for r in con.execute("SELECT tag FROM votes ORDER BY id")]
    assert shown == ["left" if k == "ArrowLeft" else "right" for k in KEYS]
    assert tags == [None, None, "banding"] + [None] * 7
    res = reviews.results("study-1")
    assert res["votes"] == N and res["reviewers"] == ["Dr Keyboard"]
    table = page.locator("#blind-results-table").inner_text()
    for row in res["rows"]:
        assert re.search(rf"{re.escape(row['source'])}\s+{row['wins']}\s", table), (row, table)
    assert "banding" in table and sum(r["wins"] for r in res["rows"]) == N

    # the Metrics table and the side-by-side grid (screenshots)
    page.get_by_role("tab", name="Metrics").click()
    page.locator("#cmp-load").click()
    page.wait_for_selector("#cmp-table-el", timeout=WAIT_MS)
    page.wait_for_timeout(1500)                                  # the plots draw
    page.screenshot(path=f"{SHOTS}/compare_table.png", full_page=True)
    # positive control: the same check does see the sources once the Metrics table names them
    assert any(x in page.content() for x in secrets) and "r1@2" in page.content()
    rows = page.locator("#cmp-table-el tbody tr.cmp-row")
    assert rows.count() == 2 and "base" in rows.nth(0).inner_text() and "r1@2" in rows.nth(1).inner_text()
    page.get_by_role("tab", name="Side by side").click()
    page.wait_for_function("() => document.querySelectorAll('#cmp-gallery img').length >= 6", timeout=WAIT_MS)
    page.wait_for_timeout(500)
    page.screenshot(path=f"{SHOTS}/compare_side_by_side.png", full_page=True)
    page.locator("#cmp-gallery img").first.click()              # click to enlarge
    page.wait_for_timeout(800)
    page.screenshot(path=f"{SHOTS}/compare_side_enlarged.png")
    assert not errors, errors
