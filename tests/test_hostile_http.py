"""The hostile suite's second half: the HTTP and session layer (``studio/gate.py``), what reaches a page before
sign-in, and identity. A live studio on 127.0.0.1 with password sign-in that also answers to the host name
``studio.example.org`` (as behind a hospital's reverse proxy) and lets ``https://portal.example.org`` call it.

Each test here failed on the code before the gate: Gradio's CORS layer reflected any Origin for such a host,
its sign-in cookie was ``SameSite=None``, bodies were parsed before the 401, bcrypt ran on the event loop, a
wrong password could be tried forever, sessions outlived password changes, ``ANN`` and ``ann`` were two
reviewers, the open studio answered to any Host, the login page embedded the API schema and ``/config`` the
runs table, Gradio's temp folder served any file type and kept imported originals.
"""
from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from test_hostile import get_raw, pw

pytestmark = pytest.mark.slow

HOST = "studio.example.org"
PORTAL = "https://portal.example.org"
EVIL = "https://evil.example"
USERS = {"ann": "annotator", "tra": "trainer", "adm": "admin"}
# Workspace data with names that appear nowhere else, so a search of a page or /config finds only leaks.
DATASET, LABELS, RUN = "zqxdataset", ("zqxlabel-one", "zqxlabel-two"), "zqxrun"


@dataclass
class Server:
    url: str
    port: int
    ws: Any
    store: Any
    ctx: Any
    demo: Any
    users: Any
    ids: list[int]
    sessions: dict[str, Any] = field(default_factory=dict)

    def client(self, **headers: str) -> Any:
        import httpx

        return httpx.Client(base_url=self.url, timeout=60, headers=headers)

    def sign_in(self, user: str, password: str | None = None, **headers: str) -> Any:
        h = self.client(**headers)
        r = h.post("/login", data={"username": user, "password": password or pw(user.lower())})
        assert r.status_code == 200, (user, r.status_code, r.text)
        return h


def _launch(root: Path, port: int, users: dict[str, str], **policy_kw: Any) -> Server:
    from bench.caption_latency import build_review_dataset
    from medart_core.accounts import UserStore
    from medart_core.captions import CaptionStore
    from medart_core.workspace import Workspace
    from studio.app import build_app, configure_queue, serve_kwargs
    from studio.auth import Access
    from studio.context import StudioContext
    from studio.gate import GatePolicy

    ws = Workspace.open(root / "workspace")
    store = CaptionStore.for_workspace(ws)
    ids = build_review_dataset(ws, store, DATASET, 4, labels=LABELS, size=32)
    layout = ws.run_layout(RUN)
    layout.config.parent.mkdir(parents=True, exist_ok=True)
    layout.config.write_text(json.dumps({"dataset": DATASET, "preset": "cpu-smoke"}))
    us = UserStore.for_workspace(ws)
    for user, role in users.items():
        us.add(user, role, pw(user))
    access = Access.for_workspace(ws)
    mode = access.mode
    policy = GatePolicy.for_serving("127.0.0.1", mode, env={}, **policy_kw)
    ctx = StudioContext(ws=ws, store=store, backbone_spec="tiny", access=access)
    demo = configure_queue(build_app(ctx))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            **serve_kwargs(ctx, policy=policy))
    return Server(url.rstrip("/"), port, ws, store, ctx, demo, us, ids)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, free_port):
    s = _launch(tmp_path_factory.mktemp("gate"), free_port(), USERS, hosts=[HOST], origins=[PORTAL],
                upload_mb_per_hour=2)
    try:
        for user in USERS:
            s.sessions[user] = s.sign_in(user)
        yield s
    finally:
        for h in s.sessions.values():
            h.close()
        s.demo.close()


@pytest.fixture(autouse=True)
def _fresh_throttle(request):
    """Each test starts with no failed sign-ins from 127.0.0.1 (every test signs in from there)."""
    if "srv" in request.fixturenames:
        s = request.getfixturevalue("srv")
        s.ctx.gate.throttle._fails.clear()
    yield


def _users_add_dep(s: Server) -> dict:
    cfg = s.sessions["adm"].get("/config").json()
    dep = next(d for d in cfg["dependencies"] if d.get("api_name") == "users_add")
    return dict(dep, defaults=["mallory", "admin", "mallory-password-long"])


def _join(h: Any, dep: dict, **headers: str) -> Any:
    payload = {"data": dep["defaults"], "fn_index": dep["id"], "session_hash": uuid.uuid4().hex[:12],
               "event_data": None, "trigger_id": None}
    return h.post("/gradio_api/queue/join", json=payload, headers=headers)


# ---- 1. cross-origin credentialed access -----------------------------------------------------------------
def test_a_foreign_origin_cannot_read_the_token_nor_drive_the_queue(srv):
    adm = srv.sessions["adm"]
    tried = 0
    # (the server speaks plain http here: https://HOST is another origin unless a proxy says X-Forwarded-Proto)
    for origin in (EVIL, "null", f"http://{HOST}.evil.example", f"http://{HOST}:8443", "http://127.0.0.1:1",
                   f"https://{HOST}"):
        r = adm.get("/gradio_api/token", headers={"Host": HOST, "Origin": origin})
        assert r.status_code == 403, (origin, r.status_code, r.text[:200])
        assert '"token"' not in r.text, origin
        for path in ("/config", "/gradio_api/info", "/"):
            r = adm.get(path, headers={"Host": HOST, "Origin": origin})
            assert r.status_code == 403 and DATASET not in r.text, (origin, path)
        r = _join(adm, _users_add_dep(srv), Host=HOST, Origin=origin)
        assert r.status_code == 403, (origin, r.status_code)
        tried += 5
    assert srv.users.get("mallory") is None, "no admin account was made from another site"
    # A state-changing request marked cross-site by the browser, with no Origin (older browsers), is refused.
    r = _join(adm, _users_add_dep(srv), Host=HOST, **{"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    # Controls: the server's own origin under its host name, and the operator's portal, still work.
    for origin, proto in ((f"http://{HOST}", "http"), (f"https://{HOST}", "https"), (PORTAL, "http")):
        r = adm.get("/gradio_api/token", headers={"Host": HOST, "Origin": origin, "X-Forwarded-Proto": proto})
        assert r.status_code == 200, (origin, r.text[:200])
    r = adm.get("/gradio_api/token", headers={"Host": HOST, "Origin": f"http://{HOST}", "X-Forwarded-Proto": "https"})
    assert r.status_code == 403, "a plain-http page is not the https studio's origin"
    r = adm.get("/config", headers={"Origin": srv.url})
    assert r.status_code == 200
    print(f"\norigins: {tried} foreign-origin requests (token, /config, /gradio_api/info, page, queue/join) "
          "refused with 403; own origin and the listed portal served")


def test_the_session_cookie_is_lax_httponly_and_secure_over_https(srv):
    h = srv.client()
    r = h.post("/login", data={"username": "ann", "password": pw("ann")})
    cookie = r.headers["set-cookie"]
    assert "SameSite=Lax" in cookie and "HttpOnly" in cookie and "None" not in cookie, cookie
    r = h.post("/login", data={"username": "ann", "password": pw("ann")}, headers={"X-Forwarded-Proto": "https"})
    cookie = r.headers["set-cookie"]
    assert "Secure" in cookie and "SameSite=Lax" in cookie and cookie.startswith("access-token-"), cookie
    assert "unsecure" not in cookie


def test_strict_samesite_and_bad_policies(tmp_path):
    from medart_core.errors import ConfigError
    from studio.gate import GatePolicy

    assert GatePolicy.for_serving("127.0.0.1", "password", samesite="strict", env={}).samesite == "strict"
    with pytest.raises(ConfigError, match="SameSite"):
        GatePolicy.for_serving("127.0.0.1", "password", samesite="none", env={})
    with pytest.raises(ConfigError, match="origin"):
        GatePolicy.for_serving("127.0.0.1", "password", origins=["portal.example.org"], env={})
    sp = GatePolicy.for_serving("0.0.0.0", "oauth", env={"SPACE_HOST": "lab-medart.hf.space"})
    assert "https://lab-medart.hf.space" in sp.allowed_origins and not sp.enforce_hosts
    assert sp.origin_allowed("https://lab-medart.hf.space", "lab-medart.hf.space")
    assert not sp.origin_allowed("https://huggingface.co", "lab-medart.hf.space")


# ---- 3. body limits before authentication ----------------------------------------------------------------
def test_request_bodies_are_limited_before_sign_in(srv):
    anon = srv.client()
    big = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    r = anon.post("/gradio_api/queue/join", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.status_code

    def chunks():
        for _ in range(32):
            yield b" " * 65536

    r = anon.post("/gradio_api/queue/join", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 401, "signed out, a POST is refused before its body is read"
    r = anon.post("/login", content=big, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    # Signed in, the limit is larger but still there; a normal event passes (control).
    adm = srv.sessions["adm"]
    r = adm.post("/gradio_api/queue/join", content=b" " * (17 * 1024 * 1024),
                 headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = adm.post("/gradio_api/queue/join", content=(b" " * 65536 for _ in range(300)),
                 headers={"content-type": "application/json"})
    assert r.status_code == 413, "a chunked body without a length is counted too"
    dep = _users_add_dep(srv)
    r = _join(adm, dict(dep, defaults=["", "annotator", ""]))
    assert r.status_code == 200


# ---- 4. sign-in does not block the event loop ------------------------------------------------------------
def test_password_checks_run_off_the_event_loop(srv, monkeypatch):
    """While one sign-in's password check is held inside bcrypt's place, another request is answered: the
    check runs in a worker thread. (On the event loop, the GET below could never be served until released.)"""
    entered, released = threading.Event(), threading.Event()
    real = srv.ctx.access.authenticate

    def held(name, password):
        entered.set()
        released.wait(30)
        return real(name, password)

    monkeypatch.setattr(srv.ctx.access, "authenticate", held)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=srv.client().post(
        "/login", data={"username": "tra", "password": pw("tra")})))
    t.start()
    try:
        assert entered.wait(30), "the sign-in never reached the password check"
        r = srv.client().get("/gradio_api/app_id", timeout=20)
        assert r.status_code == 200, "another request was served while a password check was running"
    finally:
        released.set()
        t.join(60)
    assert result["r"].status_code == 200


# ---- 5. brute force ----------------------------------------------------------------------------------------
def test_wrong_passwords_lock_the_account_are_logged_and_shown_to_admins(srv, caplog):
    from medart_core.accounts import LOCK_AFTER

    srv.users.add("victim", "annotator", pw("victim"))
    caplog.set_level(logging.WARNING, logger="medart.gate")
    h = srv.client()
    for i in range(LOCK_AFTER):
        r = h.post("/login", data={"username": "victim", "password": f"guess-{i}-long-enough"})
        assert r.status_code == 400
    r = h.post("/login", data={"username": "victim", "password": pw("victim")})
    assert r.status_code == 400 and "Too many failed sign-ins" in r.json()["detail"], "right password, 5 wrong before"
    fails = [m for m in caplog.messages if "sign-in failed for 'victim'" in m]
    assert len(fails) == LOCK_AFTER and "now locked" in fails[-1], caplog.messages
    assert any("account locked" in m for m in caplog.messages)
    # The admin sees it in the Users tab and unlocks it; the user then signs in.
    from gradio_client import Client

    adm = Client(srv.url, auth=("adm", pw("adm")), verbose=False)
    rows = adm.predict(api_name="/users_locked")
    assert any(r[0] == "victim" and "locked" in r[2] for r in rows["data"]), rows
    adm.predict("victim", api_name="/users_unlock")
    srv.sign_in("victim").close()
    assert srv.users.lockout("victim") is None, "a successful sign-in clears the count"


def test_one_client_guessing_many_names_backs_off(srv, caplog):
    caplog.set_level(logging.WARNING, logger="medart.gate")
    limit = srv.ctx.gate.policy.client_failures
    h = srv.client()
    for i in range(limit):
        r = h.post("/login", data={"username": f"nobody{i}", "password": "whatever-long-enough"})
        assert r.status_code == 400
    r = h.post("/login", data={"username": "ann", "password": pw("ann")})
    assert r.status_code == 400 and "this address" in r.json()["detail"]
    assert sum("no such account" in m for m in caplog.messages) == limit


def test_users_unlock_cli(tmp_path):
    import subprocess
    import sys

    from medart_core.accounts import LOCK_AFTER, UserStore
    from medart_core.workspace import Workspace

    ws = Workspace.open(tmp_path / "w")
    us = UserStore.for_workspace(ws)
    us.add("Bob", "annotator", pw("bob"))
    for _ in range(LOCK_AFTER):
        us.record_failure("BOB")
    assert us.lockout("bob").locked()
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "medart_core", "users", "list", "-w", str(ws.root)], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    assert "Bob: 5 failed sign-in(s) in a row, locked until" in out, out
    out = subprocess.run([sys.executable, "-m", "medart_core", "users", "unlock", "bob", "-w", str(ws.root)],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    assert "unlocked Bob" in out and us.lockout("bob") is None


# ---- 6. sessions end with any change to the user, and expire ----------------------------------------------
def test_sessions_end_when_the_user_changes(srv):
    dep = _users_add_dep(srv)
    probe = dict(dep, defaults=["", "annotator", ""])       # refused by role (annotator): 200 + "Refused"
    img = srv.ws.images_dir(DATASET) / sorted(p.name for p in srv.ws.images_dir(DATASET).iterdir())[0]
    srv.users.add("sess", "annotator", pw("sess"))
    changes = [("password", lambda: srv.users.set_password("sess", "another-password-1")),
               ("role", lambda: srv.users.set_role("sess", "trainer")),
               ("re-created", lambda: (srv.users.remove("sess"), srv.users.add("SESS", "annotator", pw("sess"))))]
    passwords = [pw("sess"), "another-password-1", "another-password-1"]
    for (what, change), password in zip(changes, passwords):
        h = srv.sign_in("sess", password)
        assert _join(h, probe).status_code == 200, what
        cookie = "; ".join(f"{k}={v}" for k, v in h.cookies.items())
        assert _file(srv, img, cookie) == 200
        change()
        assert _join(h, probe).status_code == 401, f"the session survived: {what}"
        assert _file(srv, img, cookie) == 401, f"the file route kept the session: {what}"
        h.close()


def _file(srv: Server, path: Path, cookie: str) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("GET", "/gradio_api/file=" + quote(str(path)), headers={"Cookie": cookie})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def test_sessions_expire_when_idle_and_when_old(tmp_path):
    from medart_core.accounts import UserStore
    from studio.auth import Access
    from studio.gate import GatePolicy, Sessions

    us = UserStore(tmp_path / "users.sqlite")
    u = us.add("ann", "annotator", pw("ann"))
    policy = GatePolicy(idle_s=60.0, max_age_s=600.0)
    sessions, tokens = Sessions(Access("password", us), policy), {}
    t0 = 1_000_000.0
    tok = sessions.issue(tokens, u.name, u.stamp, now=t0)
    assert sessions.valid_user(tokens, tok, now=t0 + 59) == "ann"
    assert sessions.valid_user(tokens, tok, now=t0 + 118) == "ann", "each request restarts the idle clock"
    assert sessions.valid_user(tokens, tok, now=t0 + 179) is None and tok not in tokens, "idle too long"
    tok = sessions.issue(tokens, u.name, u.stamp, now=t0)
    for k in range(1, 10):
        assert sessions.valid_user(tokens, tok, now=t0 + 59 * k) == "ann"
    assert sessions.valid_user(tokens, tok, now=t0 + 601) is None, "no session outlives max_age_s"
    assert sessions.valid_user(tokens, "forged", now=t0) is None
    tokens["gradio-made"] = "ann"
    assert sessions.valid_user(tokens, "gradio-made", now=t0) is None and "gradio-made" not in tokens


# ---- 7. one identity per account ----------------------------------------------------------------------------
def test_case_variants_are_one_identity(srv):
    from gradio_client import Client

    image_id = srv.ids[1]
    for typed in ("ANN", "Ann"):
        c = Client(srv.url, auth=(typed, pw("ann")), verbose=False)
        out = c.predict("", api_name="/caption_load")
        key = next(v for v in out if isinstance(v, str) and v.count(":") == 1 and v.split(":")[0].isdigit())
        image_id = int(key.split(":")[0])
        cur = srv.store.current(image_id)
        c.predict(cur.text + f" Seen by {typed}.", key, "", api_name="/caption_save")
        assert srv.store.history(image_id)[-1].reviewer == "ann", typed
    reviewers = {e.reviewer for e in srv.store.history(image_id) if e.reviewer}
    assert reviewers <= {"ann"} | {None}, reviewers


def test_oauth_identities_take_the_stored_spelling(tmp_path):
    from medart_core.accounts import UserStore
    from studio.auth import Access, _scope_user

    us = UserStore(tmp_path / "users.sqlite")
    us.add("DrSmith", "admin")
    acc = Access("oauth", us)
    scope = {"session": {"oauth_info": {"userinfo": {"preferred_username": "drsmith"}}}}
    assert _scope_user(acc, scope) == "DrSmith"


# ---- 8. open mode answers only to its own host ------------------------------------------------------------
def test_open_mode_refuses_foreign_hosts(tmp_path, free_port):
    s = _launch(tmp_path, free_port(), {})
    try:
        assert s.ctx.access.mode == "open"
        h = s.client()
        for host in ("evil.example", f"evil.example:{s.port}", "127.0.0.1.nip.io", "attacker.localhost.evil"):
            r = h.get("/config", headers={"Host": host})
            assert r.status_code == 421, (host, r.status_code)
            r = h.post("/gradio_api/queue/join", json={}, headers={"Host": host})
            assert r.status_code == 421
        for host in (f"127.0.0.1:{s.port}", f"localhost:{s.port}"):
            assert h.get("/config", headers={"Host": host}).status_code == 200
        r = h.get("/config", headers={"Origin": "http://evil.example", "Host": f"127.0.0.1:{s.port}"})
        assert r.status_code == 403
    finally:
        s.demo.close()


# ---- 9, 10. nothing about the workspace before sign-in or above a role -------------------------------------
def test_the_login_page_carries_no_api_schema(srv):
    r = srv.client().get("/")
    assert r.status_code == 200
    text = r.text
    assert 'window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}}' in text
    for leak in ("caption_load", "Needs the", DATASET, *LABELS, RUN):
        assert leak not in text, leak
    signed = srv.sessions["ann"].get("/").text
    assert "caption_load" in signed, "control: a signed-in page still has its API schema"


def test_config_and_pages_hold_no_workspace_data_for_any_role(srv):
    from gradio_client import Client

    for user in USERS:
        h = srv.sessions[user]
        for path in ("/config", "/", "/gradio_api/info"):
            text = h.get(path).text
            for leak in (DATASET, *LABELS, RUN, str(srv.ws.root)):
                assert leak not in text, (user, path, leak)
    # Controls: the guarded loads do hand the data to the roles that may see it.
    tra = Client(srv.url, auth=("tra", pw("tra")), verbose=False)
    assert RUN in json.dumps(tra.predict(api_name="/finetune_runs"), default=str)
    ann = Client(srv.url, auth=("ann", pw("ann")), verbose=False)
    assert DATASET in json.dumps(ann.predict("", api_name="/caption_load"), default=str)


def test_the_workspace_path_is_shown_to_admins_only(srv):
    from gradio_client import Client

    outs = {}
    for user in ("ann", "adm"):
        c = Client(srv.url, auth=(user, pw(user)), verbose=False)
        outs[user] = json.dumps(c.predict(DATASET, api_name="/dataset_refresh"), default=str)
    assert str(srv.ws.root) in outs["adm"] and str(srv.ws.root) not in outs["ann"]


# ---- 12. Gradio's temp folder ------------------------------------------------------------------------------
def test_gradio_temp_files_are_served_only_as_images(srv):
    ann = srv.sessions["ann"]
    cookie = "; ".join(f"{k}={v}" for k, v in ann.cookies.items())
    served = {}
    for name, body in (("notes.txt", b"patient 0042"), ("page.html", b"<script>1</script>"),
                       ("db.sqlite", b"SQLite format 3\0"), ("pic.png", _png())):
        r = ann.post("/gradio_api/upload", files={"files": (name, body)})
        assert r.status_code == 200, r.text
        path = r.json()[0]
        status, got = get_raw_cookie(srv, path, cookie)
        served[name] = status
        assert (status == 200) == name.endswith(".png"), (name, status, got[:40])
    print(f"\ngradio temp folder: {served}")


def get_raw_cookie(srv: Server, path: str, cookie: str) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("GET", "/gradio_api/file=" + quote(path), headers={"Cookie": cookie})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_imported_uploads_are_deleted(srv, tmp_path):
    from gradio import utils
    from gradio_client import Client, handle_file

    name = f"orig-{uuid.uuid4().hex[:8]}.png"
    local = tmp_path / name
    local.write_bytes(_png())
    adm = Client(srv.url, auth=("adm", pw("adm")), verbose=False)
    report = adm.predict([handle_file(str(local))], "uploads-gone", "x", "generic", None, api_name="/import")[0]
    assert "1" in report, report
    left = list(Path(utils.get_upload_folder()).rglob(name))
    assert not left, f"the uploaded original stayed in Gradio's temp folder: {left}"


def test_discard_uploads_touches_only_the_upload_folder(tmp_path):
    from gradio import utils

    from studio.dataset_tab import discard_uploads

    up = Path(utils.get_upload_folder()) / uuid.uuid4().hex
    up.mkdir(parents=True)
    inside = up / "a.dcm"
    inside.write_bytes(b"x")
    outside = tmp_path / "b.dcm"
    outside.write_bytes(b"y")
    assert discard_uploads([str(inside), str(outside), str(up / ".." / ".." / "etc" / "passwd")]) == 1
    assert not inside.exists() and not up.exists() and outside.exists()


# ---- smaller things ------------------------------------------------------------------------------------------
def test_anonymous_cancel_and_posts_are_refused(srv):
    anon = srv.client()
    r = anon.post("/gradio_api/cancel", json={"session_hash": "x", "fn_index": 0, "event_id": "y"})
    assert r.status_code == 401
    r = anon.post("/gradio_api/run/predict", json={"fn_index": 0, "data": []})
    assert r.status_code == 401


def test_the_file_route_says_401_to_anyone_signed_out_whatever_the_path(srv):
    img = srv.ws.images_dir(DATASET) / sorted(p.name for p in srv.ws.images_dir(DATASET).iterdir())[0]
    seen = {}
    for path in (str(img), "/etc/passwd", str(srv.ws.captions_db), str(srv.ws.root / "nope.png")):
        status, _ = get_raw(_AnonLive(srv.port), "/gradio_api/file=" + quote(path))
        seen[path] = status
    assert set(seen.values()) == {401}, seen


@dataclass
class _AnonLive:
    port: int


def test_logout_refuses_cross_site_requests(srv):
    h = srv.sign_in("tra")
    dep = _users_add_dep(srv)
    probe = dict(dep, defaults=["", "annotator", ""])
    r = h.get("/logout", headers={"Sec-Fetch-Site": "cross-site"}, follow_redirects=False)
    assert r.status_code == 403
    assert _join(h, probe).status_code == 200, "still signed in"
    r = h.get("/logout", follow_redirects=False)
    assert r.status_code == 302
    assert _join(h, probe).status_code == 401, "signed out"


def test_unexpected_errors_do_not_reach_users_as_text(srv):
    assert srv.demo.show_error is False


def test_each_user_has_an_upload_quota(srv):
    tra = srv.sign_in("tra")                   # (signing out ends every session of a user: a fresh one)
    chunk = b"\0" * (900 * 1024)
    codes = [tra.post("/gradio_api/upload", files={"files": (f"q{i}.png", chunk)}).status_code for i in range(3)]
    assert codes[:2] == [200, 200] and codes[2] == 429, codes
    r = srv.sessions["adm"].post("/gradio_api/upload", files={"files": ("other.png", b"\x89PNG")})
    assert r.status_code == 200, "the quota is per user"


def test_a_stale_token_smuggled_beside_a_valid_one_is_worth_nothing(srv):
    """A token that ended (here: its user's password changed) must not work next to a valid session cookie,
    in a second Cookie header, or behind a garbage value of the same name: Gradio and the file route read
    cookies their own way (the last of a name wins), so the gate passes on only the token it validated."""
    import http.client

    srv.users.add("stale", "trainer", pw("stale"))
    old = srv.sign_in("stale")
    name, stale = next((k, v) for k, v in old.cookies.items() if k.startswith("access-token"))
    srv.users.set_password("stale", "changed-password-1")
    sample = srv.ws.samples_dir / "base" / "000.png"
    sample.parent.mkdir(parents=True, exist_ok=True)
    sample.write_bytes(_png())
    ann = srv.sign_in("ann")
    valid = next(v for k, v in ann.cookies.items() if k == name)
    cookie_sets = [[f"{name}={valid}; {name}={stale}"], [f"{name}={valid}", f"{name}={stale}"],
                   [f"{name}=garbage; {name}={stale}"], [f"{name}={stale}"]]
    for cookies in cookie_sets:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        try:
            conn.putrequest("GET", "/gradio_api/file=" + quote(str(sample)))
            for c in cookies:
                conn.putheader("Cookie", c)
            conn.endheaders()
            r = conn.getresponse()
            r.read()
            assert r.status in (401, 403), (cookies, r.status)     # ann may not see samples; stale is dead
        finally:
            conn.close()
    dep = _users_add_dep(srv)
    h = srv.client()
    r = h.post("/gradio_api/queue/join", headers={"Cookie": f"{name}={valid}; {name}={stale}"},
               json={"data": ["mallory2", "admin", "mallory-password-long"], "fn_index": dep["id"],
                     "session_hash": "smuggle1", "event_data": None, "trigger_id": None})
    assert r.status_code == 200
    with h.stream("GET", "/gradio_api/queue/data", params={"session_hash": "smuggle1"},
                  headers={"Cookie": f"{name}={valid}; {name}={stale}"}) as st:
        for line in st.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                break
    assert srv.users.get("mallory2") is None, "the stale token acted"
    assert stale not in srv.ctx.gate.sessions._s


def test_both_framings_at_once_are_refused(srv):
    import socket

    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        body = b"5\r\nhello\r\n0\r\n\r\n"
        sock.sendall(b"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n"
                     b"Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=x\r\n\r\n" + body)
        first = sock.recv(200)
    assert first.startswith(b"HTTP/1.1 400"), first


def test_unknown_names_lock_like_accounts(srv):
    from medart_core.accounts import LOCK_AFTER

    answers = {}
    for name in ("ann", "nosuchperson"):
        h = srv.client()
        for i in range(LOCK_AFTER):
            h.post("/login", data={"username": name, "password": f"wrong-{i}-long-enough"})
        answers[name] = h.post("/login", data={"username": name, "password": "still-wrong-x"}).json()["detail"]
        srv.ctx.gate.throttle._fails.clear()
    srv.users.clear_failures("ann")
    strip = __import__("re").compile(r"\d+ s")
    assert strip.sub("N s", answers["ann"]) == strip.sub("N s", answers["nosuchperson"]), answers
    assert "ann" not in answers["ann"]


def test_signed_out_heartbeats_and_odd_hosts_are_refused(srv):
    anon = srv.client()
    assert anon.get("/gradio_api/heartbeat/abc123").status_code == 401
    from studio.gate import host_name

    assert host_name("evil@studio.example.org") == "" and host_name("127.0.0.1:1#x") == ""
    assert host_name("Studio.Example.org:8443") == "studio.example.org" and host_name("[::1]:7860") == "::1"
    r = anon.get("/config", headers={"Host": f"evil@{HOST}"})
    assert r.status_code == 421
