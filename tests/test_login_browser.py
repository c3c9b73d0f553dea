"""Headless Chromium signs in to the studio as an annotator and as a trainer and shows what each may do.

The annotator reviews captions (the signed-in name is the reviewer, a hostile caption and reviewer name
render as text), and finds the Fine-tune tab locked: its buttons are disabled, and a Launch click forced
through anyway is refused on the server with a clear message and writes no job. The trainer launches a run (the job carries ``owner="tra"``) and finds
the Users tab refused. Screenshots go to ``$MEDART_SCREENSHOTS`` (default /tmp) as ``login_*.png``.
"""
from __future__ import annotations

import os

import pytest

SHOTS = os.environ.get("MEDART_SCREENSHOTS", "/tmp")
XSS_CAPTION = 'An image of polyps <script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
XSS_REVIEWER = "<img src=x onerror=window.__xss=3>"
USERS = {"ann": ("annotator", "annotator-password"), "tra": ("trainer", "trainer-password")}


@pytest.fixture
def served(ws, store, monkeypatch, free_port):
    from bench.caption_latency import build_review_dataset
    from medart_core.accounts import UserStore
    from studio.app import build_app, configure_queue, serve_kwargs
    from studio.auth import Access
    from studio.context import StudioContext

    ids = build_review_dataset(ws, store, "kb", 6, labels=("polyps", "esophagitis"), size=64)
    # A caption and a reviewer name with markup, as an open-mode reviewer could have typed them.
    store.edit(ids[0], XSS_CAPTION, reviewer=XSS_REVIEWER, expected_version=store.current(ids[0]).version)
    store.set_status(ids[1], "approved", reviewer="seed", expected_version=store.current(ids[1]).version)
    users = UserStore.for_workspace(ws)
    for name, (role, password) in USERS.items():
        users.add(name, role, password)
    ctx = StudioContext(ws=ws, store=store, backbone_spec="tiny", access=Access.for_workspace(ws))
    # Launch queues the job; no supervisor process trains it here.
    monkeypatch.setattr(ctx.executor, "start_supervisor", False)
    assert ctx.access.mode == "password"
    demo = configure_queue(build_app(ctx))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            **serve_kwargs(ctx))
    yield url, ws, store, ids
    demo.close()


def _watch(page) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {"errors": [], "dialogs": []}
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    return seen


def _sign_in(page, url: str, user: str, password: str) -> None:
    page.goto(url)
    page.wait_for_selector("input[data-testid='password']", timeout=30_000)
    page.fill("input[data-testid='textbox']", user)
    page.fill("input[data-testid='password']", password)
    page.get_by_role("button", name="Login").click()
    page.wait_for_function("(u) => { const s = document.querySelector('#medart-session');"
                           " return s && s.innerText.includes('Signed in as ' + u); }", arg=user, timeout=60_000)


def _tab(page, label: str) -> None:
    page.get_by_role("tab", name=label).click()
    page.wait_for_timeout(400)


def _toast(page, text: str) -> str:
    loc = page.locator(".toast-body", has_text=text).first
    loc.wait_for(state="visible", timeout=30_000)
    return loc.inner_text()


@pytest.mark.browser
@pytest.mark.slow
def test_login_page_refuses_a_wrong_password(served, chromium):
    url = served[0]
    page = chromium.new_page(viewport={"width": 1200, "height": 700})
    page.goto(url)
    page.wait_for_selector("input[data-testid='password']", timeout=30_000)
    page.fill("input[data-testid='textbox']", "ann")
    page.fill("input[data-testid='password']", "not-the-password")
    page.get_by_role("button", name="Login").click()
    page.wait_for_function("() => document.body.innerText.includes('Incorrect Credentials')", timeout=30_000)
    assert page.locator("#medart-session").count() == 0, "no page behind the login without a session"
    page.screenshot(path=f"{SHOTS}/login_page_wrong_password.png")


@pytest.mark.browser
@pytest.mark.slow
def test_annotator_reviews_captions_and_is_refused_fine_tuning(served, chromium):
    from medart_core.jobs import JobLedger

    url, ws, store, ids = served
    page = chromium.new_page(viewport={"width": 1400, "height": 1100})
    seen = _watch(page)
    _sign_in(page, url, "ann", USERS["ann"][1])
    assert "role annotator" in page.locator("#medart-session").inner_text()

    _tab(page, "Captions")
    page.wait_for_function("() => { const p = document.querySelector('#cap-position');"
                           " return p && p.innerText.includes('1 / 6 in filter'); }", timeout=30_000)
    # The reviewer box shows the signed-in user and cannot be changed.
    rev = page.locator("#cap-reviewer textarea, #cap-reviewer input").first
    assert rev.input_value() == "ann" and not rev.is_editable()
    # Hostile caption and reviewer name: shown as text, never run.
    assert page.locator("#cap-editor textarea").input_value() == XSS_CAPTION
    assert XSS_REVIEWER in page.locator("#cap-position").inner_text()
    page.get_by_text("History of this image").click()
    page.wait_for_function("(r) => { const h = document.querySelector('#cap-history');"
                           " return h && h.innerText.includes(r); }", arg=XSS_REVIEWER, timeout=30_000)
    assert page.evaluate("() => window.__xss") is None
    assert page.evaluate("() => document.querySelectorAll('img[src=\"x\"]').length") == 0
    page.screenshot(path=f"{SHOTS}/login_annotator_captions.png", full_page=True)

    page.locator("#cap-approve").click()
    page.wait_for_function("() => document.querySelector('#cap-position').innerText.includes('2 / 6 in filter')",
                           timeout=30_000)
    st = store.current(ids[0])
    assert st.status == "approved" and store.history(ids[0])[-1].reviewer == "ann"

    _tab(page, "Fine-tune")
    lock = page.locator("#lock-finetune")
    lock.wait_for(state="visible", timeout=30_000)
    assert "needs the trainer role" in lock.inner_text() and "you (ann) are an annotator" in lock.inner_text()
    jobs_before = len(JobLedger(ws).list())
    launch = page.locator("#ft-launch")
    assert launch.is_disabled(), "the page disables what the role may not do"
    # A courtesy only: force the button back on in the page and click it; the server refuses the call.
    page.evaluate("() => document.querySelector('#ft-launch').removeAttribute('disabled')")
    launch.click()
    msg = _toast(page, "Refused")
    assert "needs the trainer role" in msg and "set-role ann trainer" in msg, msg
    page.wait_for_timeout(800)             # the toast slides in
    page.screenshot(path=f"{SHOTS}/login_annotator_finetune.png", full_page=False)
    assert len(JobLedger(ws).list()) == jobs_before, "a refused launch writes no job"

    _tab(page, "Compare")
    lock = page.locator("#lock-compare")
    lock.wait_for(state="visible", timeout=30_000)
    assert "Parts of" in lock.inner_text(), "blind review stays open to annotators"
    page.wait_for_timeout(500)
    page.screenshot(path=f"{SHOTS}/login_annotator_compare.png", full_page=False)

    _tab(page, "Users")
    assert "needs the admin role" in page.locator("#lock-users").inner_text()
    assert page.locator("#users-table").inner_text().count("annotator") == 0, "the user list stays empty"
    assert not seen["dialogs"] and not seen["errors"], seen


@pytest.mark.browser
@pytest.mark.slow
def test_trainer_launches_a_run_and_is_refused_user_management(served, chromium):
    from medart_core.accounts import UserStore
    from medart_core.jobs import JobLedger

    url, ws, store, ids = served
    page = chromium.new_page(viewport={"width": 1400, "height": 1100})
    seen = _watch(page)
    _sign_in(page, url, "tra", USERS["tra"][1])
    assert "role trainer" in page.locator("#medart-session").inner_text()

    _tab(page, "Fine-tune")
    assert not page.locator("#lock-finetune").is_visible()
    assert page.locator("#ft-launch").is_enabled()
    page.fill("#ft-run-name textarea, #ft-run-name input", "browser-run")
    page.locator("#ft-launch").click()
    page.wait_for_function("() => { const j = document.querySelector('#ft-job textarea, #ft-job input');"
                           " return j && j.value.startsWith('train-'); }", timeout=120_000)
    job = JobLedger(ws).list(run="browser-run", limit=1)[0]
    assert job.owner == "tra" and job.state == "queued"
    page.wait_for_timeout(800)
    page.screenshot(path=f"{SHOTS}/login_trainer_finetune.png", full_page=False)

    _tab(page, "Users")
    lock = page.locator("#lock-users")
    assert lock.is_visible() and "needs the admin role" in lock.inner_text()
    page.fill("#users-name textarea, #users-name input", "mallory")
    assert page.locator("#users-add").is_disabled()
    page.evaluate("() => document.querySelector('#users-add').removeAttribute('disabled')")
    page.locator("#users-add").click()
    msg = _toast(page, "Refused")
    assert "needs the admin role" in msg, msg
    assert UserStore.for_workspace(ws).get("mallory") is None
    page.wait_for_timeout(800)
    page.screenshot(path=f"{SHOTS}/login_trainer_users.png", full_page=False)
    JobLedger(ws).request_stop(job.id)
    assert not seen["dialogs"] and not seen["errors"], seen
