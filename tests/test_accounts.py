"""Accounts and roles: the users table and its CLI, bcrypt hashing, role order, the three sign-in modes, the
server-side guard, the file-route rules, and app.py refusing a non-loopback interface without sign-in."""
from __future__ import annotations

import inspect
import os
import socket
import sqlite3
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medart_core", "users", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


# ---- hashing and roles ----------------------------------------------------------------------------------
def test_passwords_are_bcrypt_hashes_and_verify(ws):
    from medart_core.accounts import UserStore
    from medart_core.errors import ConfigError

    users = UserStore.for_workspace(ws)
    assert not users.exists() and users.list() == [] and users.count() == 0
    assert not users.exists(), "reading an empty workspace must not create users.sqlite (open mode stays open)"
    users.add("alice", "annotator", "correct horse battery")
    row = sqlite3.connect(users.path).execute("SELECT password_hash FROM users WHERE name='alice'").fetchone()[0]
    assert row != "correct horse battery" and "correct horse" not in row
    assert row.startswith("$2b$12$"), row          # bcrypt, cost 12
    assert users.verify("alice", "correct horse battery")
    assert users.verify("ALICE", "correct horse battery"), "names are case-insensitive"
    assert not users.verify("alice", "correct horse batterY")
    assert not users.verify("alice", "")
    assert not users.verify("mallory", "correct horse battery")
    raw = users.path.read_bytes()
    assert b"correct horse" not in raw
    with pytest.raises(ConfigError, match="too short"):
        users.add("bob", "annotator", "short")
    with pytest.raises(ConfigError, match="too long"):
        users.add("bob", "annotator", "x" * 73)
    assert users.get("bob") is None, "a refused add writes nothing"
    with pytest.raises(ConfigError, match="exists already"):
        users.add("Alice", "admin", "another password")
    for bad in ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "a b", "", "-x", "x" * 65, "é\u202e"):
        with pytest.raises(ConfigError, match="Invalid user name"):
            users.add(bad, "annotator", "long enough password")


def test_role_order():
    from medart_core.accounts import ROLES, role_allows, role_rank, validate_role
    from medart_core.errors import ConfigError

    assert ROLES == ("annotator", "trainer", "admin")
    allowed = {(have, need) for have in ROLES for need in ROLES if role_allows(have, need)}
    assert allowed == {("annotator", "annotator"), ("trainer", "annotator"), ("trainer", "trainer"),
                       ("admin", "annotator"), ("admin", "trainer"), ("admin", "admin")}
    assert not any(role_allows(None, r) for r in ROLES) and role_rank(None) == 0
    with pytest.raises(ConfigError):
        validate_role("root")


def test_last_admin_is_protected_and_seeding_promotes(ws):
    from medart_core.accounts import UserStore
    from medart_core.errors import ConfigError, NotFoundError

    users = UserStore.for_workspace(ws)
    users.add("root", "admin", "long enough password")
    users.add("ann", "annotator", "long enough password")
    with pytest.raises(ConfigError, match="last admin"):
        users.set_role("root", "trainer")
    with pytest.raises(ConfigError, match="last admin"):
        users.remove("root")
    with pytest.raises(NotFoundError):
        users.set_role("nobody", "admin")
    assert users.seed_admins(["ann", " hf-user ", ""]) == ["ann", "hf-user"]
    assert users.role_of("ann") == "admin" and users.role_of("hf-user") == "admin"
    assert not users.get("hf-user").has_password and users.get("hf-user").created_by == "MEDART_ADMINS"
    assert not users.verify("hf-user", ""), "a user without a password never signs in with one"
    users.set_role("root", "trainer")        # other admins exist now
    users.remove("ann")
    assert [u.name for u in users.list()] == ["hf-user", "root"]


# ---- the CLI --------------------------------------------------------------------------------------------
def test_users_cli_add_list_set_role_remove(tmp_path):
    w = str(tmp_path / "w")
    t0 = time.monotonic()
    # the password goes through stdin, never argv (which `ps` shows to every user of the machine)
    out = _cli("add", "alice", "--role", "annotator", "--password-stdin", "-w", w, stdin="s3cret-password\n")
    assert out.returncode == 0, out.stderr
    assert "added alice (annotator, signs in with password)" in out.stdout
    assert "s3cret" not in out.stdout + out.stderr
    cli_s = time.monotonic() - t0

    from medart_core.cli import main

    def run(*args: str) -> int:
        return main(["users", *args, "-w", w])

    assert run("add", "hf-bob", "--role", "trainer", "--no-password") == 0
    listing = subprocess.run([sys.executable, "-m", "medart_core", "users", "list", "-w", w], cwd=ROOT,
                             capture_output=True, text=True, timeout=60).stdout
    assert "alice" in listing and "annotator" in listing and "password" in listing
    assert "hf-bob" in listing and "Hugging Face" in listing
    assert "$2b$" not in listing and "s3cret" not in listing, "list never shows hashes or passwords"

    from medart_core.accounts import UserStore

    users = UserStore(Path(w) / "users.sqlite")
    assert users.verify("alice", "s3cret-password")
    assert run("set-role", "alice", "trainer") == 0 and users.role_of("alice") == "trainer"
    with pytest.raises(SystemExit):          # argparse choices: an unknown role never reaches the table
        run("set-role", "alice", "root")
    assert run("remove", "hf-bob") == 0 and users.get("hf-bob") is None
    assert run("remove", "hf-bob") == 2, "removing an unknown user is an error with a message"

    # no terminal and no --password-stdin: refused with what to do, nothing written
    out = _cli("add", "carol", "--role", "admin", "-w", w, stdin="")
    assert out.returncode == 2 and "--password-stdin" in out.stderr
    out = _cli("add", "<img src=x onerror=alert(1)>", "--role", "admin", "--password-stdin", "-w", w,
               stdin="long enough password\n")
    assert out.returncode == 2 and "Invalid user name" in out.stderr
    assert {u.name for u in users.list()} == {"alice"}

    helptext = _cli("add", "--help").stdout
    assert "--password-stdin" in helptext and "--password " not in helptext.replace("--password-stdin", "")
    print(f"users add through a real subprocess: {cli_s:.2f} s")


# ---- modes, who is asking, the guard --------------------------------------------------------------------
def _starlette_request(session: dict | None):
    import gradio as gr
    from starlette.requests import Request

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    if session is not None:
        scope["session"] = session
    return gr.Request(request=Request(scope))


def test_modes_open_password_and_spaces_oauth(ws, store, monkeypatch):
    import gradio as gr

    from medart_core.accounts import UserStore
    from studio.auth import REFUSED, Access, Refused, is_spaces
    from studio.context import StudioContext

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("SYSTEM", raising=False)
    assert not is_spaces()
    a = Access.for_workspace(ws)
    assert a.mode == "open" and not a.enabled and a.role_of(None) == "admin"
    assert a.check(None, "admin") == (None, "admin")
    assert not (ws.root / "users.sqlite").exists()

    UserStore.for_workspace(ws).add("ann", "annotator", "long enough password")
    a = Access.for_workspace(ws)
    assert a.mode == "password" and a.enabled
    assert a.authenticate("ann", "long enough password") and not a.authenticate("ann", "wrong password!")
    assert a.check(gr.Request(username="ann"), "annotator") == ("ann", "annotator")
    for req in (None, gr.Request()):          # request can be None on some API paths: that is "no user"
        with pytest.raises(Refused, match="not signed in"):
            a.check(req, "annotator")
    with pytest.raises(Refused) as e:
        a.check(gr.Request(username="ann"), "trainer")
    assert str(e.value).startswith(REFUSED) and "users set-role ann trainer" in str(e.value)
    with pytest.raises(Refused, match="no role"):
        a.check(gr.Request(username="ghost"), "annotator")
    ctx = StudioContext(ws=ws, store=store, access=a)
    assert ctx.auth_enabled
    assert ctx.reviewer_for(gr.Request(username="ann"), "typed mallory") == "ann"
    assert ctx.reviewer_for(gr.Request(), "typed mallory") is None, "with sign-in on a typed name never counts"

    # On a Space: Hugging Face OAuth, admins seeded from the MEDART_ADMINS secret, the profile is the user.
    monkeypatch.setenv("SPACE_ID", "org/med-art")
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("MEDART_ADMINS", "Dr-Admin, ann")
    assert is_spaces()
    a = Access.for_workspace(ws)
    assert a.mode == "oauth" and a.seeded == ["Dr-Admin", "ann"]
    assert a.users.role_of("dr-admin") == "admin" and a.users.role_of("ann") == "admin"
    signed = _starlette_request({"oauth_info": {"userinfo": {"preferred_username": "Dr-Admin"},
                                                "expires_at": time.time() + 3600}})
    assert a.check(signed, "admin") == ("Dr-Admin", "admin")
    expired = _starlette_request({"oauth_info": {"userinfo": {"preferred_username": "Dr-Admin"},
                                                 "expires_at": time.time() - 1}})
    for req in (expired, _starlette_request({}), _starlette_request(None), None):
        with pytest.raises(Refused, match="Sign in with Hugging Face"):
            a.check(req, "annotator")
    stranger = _starlette_request({"oauth_info": {"userinfo": {"preferred_username": "someone-else"}}})
    with pytest.raises(Refused, match="no role"):
        a.check(stranger, "annotator")
    ctx = StudioContext(ws=ws, store=store, access=a)
    assert ctx.reviewer_for(signed, "typed") == "Dr-Admin", "votes and captions carry the HF username"


def test_guard_refuses_before_the_handler_and_keeps_kind_and_signature(ws):
    import asyncio

    import gradio as gr
    from gradio.context import LocalContext

    from medart_core.accounts import UserStore
    from studio.auth import Access, declared_role, guard, requires

    UserStore.for_workspace(ws).add("ann", "annotator", "long enough password")
    access = Access.for_workspace(ws)
    calls: list[str] = []

    def handler(text: str, request: gr.Request, progress=gr.Progress()):
        calls.append(text)
        return text

    def gen(text: str):
        calls.append(text)
        yield text

    async def coro(text: str):
        calls.append(text)
        return text

    g = guard(access, "trainer", handler)
    assert inspect.signature(g) == inspect.signature(handler)
    # Gradio injects gr.Request by the annotation: the wrapper's hints resolve like the handler's own
    assert typing.get_type_hints(g, localns={"gr": gr})["request"] is gr.Request
    assert inspect.isgeneratorfunction(guard(access, "trainer", gen))
    assert inspect.iscoroutinefunction(guard(access, "trainer", coro))

    def as_user(user: str | None, fn, *args):
        token = LocalContext.request.set(gr.Request(username=user) if user else None)
        try:
            out = fn(*args)
            if inspect.isgenerator(out):
                out = list(out)
            elif inspect.iscoroutine(out):
                out = asyncio.run(out)
            return out
        finally:
            LocalContext.request.reset(token)

    for user in (None, "ann", "ghost"):
        for fn, args in ((g, ("x", gr.Request(username=user))), (guard(access, "trainer", gen), ("x",)),
                         (guard(access, "trainer", coro), ("x",))):
            with pytest.raises(gr.Error, match="Refused"):
                as_user(user, fn, *args)
    assert calls == [], "a refused call never reaches the handler"
    assert as_user("ann", guard(access, "annotator", gen), "ok") == ["ok"] and calls == ["ok"]

    quiet = guard(access, "admin", handler, quiet=True)
    with pytest.raises(gr.Error) as e:
        as_user("ann", quiet, "x", None)
    assert e.value.visible is False, "page loads and ticks refuse without a toast"
    marked = requires("annotator")(lambda: 1)
    assert declared_role(marked) == "annotator"
    with pytest.raises(ValueError):
        requires("root")


def test_every_handler_of_the_app_is_guarded_with_the_policy_roles(ws, store):
    from studio.app import TABS, build_app
    from studio.context import StudioContext

    demo = build_app(StudioContext(ws=ws, store=store, backbone_spec="tiny"))
    roles = demo.medart_roles
    with_fn = {i: bf for i, bf in demo.fns.items() if bf.fn is not None}
    assert set(roles) == set(with_fn), "every function of the app has a role"
    assert all(getattr(bf.fn, "__medart_guarded__", False) for bf in with_fn.values())
    by_name = {bf.api_name: roles[i] for i, bf in with_fn.items()}
    # What a blind reviewer needs inside the trainers' Compare tab is open to annotators; setting up a study
    # and reading its unblinded results is not.
    blind_review = {"compare_page_load", "blind_start", "blind_vote_left", "blind_vote_right", "blind_flag"}
    for name, role in by_name.items():
        if name in ("import", "caption_export_imagefolder", "caption_export_csv") or name.startswith("users_"):
            assert role == "admin", name
        elif name in blind_review or name.startswith(("caption_", "dataset_")) or name == "image_detail":
            assert role == "annotator", name
        elif name.startswith(("finetune_", "generate", "compare_", "blind_")):
            assert role == "trainer", name
    assert {t.id for t in TABS} >= {"dataset", "captions", "finetune", "users"}
    assert all(t.role in ("annotator", "trainer", "admin") for t in TABS)
    limits = {bf.api_name: bf.concurrency_limit for bf in with_fn.values()}
    assert limits["finetune_launch"] == limits["finetune_calibrate"] == limits["finetune_resume"] == 1
    assert limits["import"] == 1
    for name, lim in limits.items():      # generation / evaluation, when their tabs are registered
        if name in ("generate", "generate_regenerate", "compare_run"):
            assert lim is not None and lim <= 4, (name, lim)


# ---- the file route's rules -------------------------------------------------------------------------------
def test_file_rules_serve_images_a_page_shows_and_nothing_else(ws, tmp_path):
    from studio.auth import ServeRules, workspace_blocked_paths

    cache = tmp_path / "gradio-cache"
    rules = ServeRules.for_workspace(ws, gradio_dirs=[cache])
    img = ws.images_dir("kb") / "ab.png"
    img.parent.mkdir(parents=True)
    img.write_bytes(b"png")
    assert rules.role_for(str(img)) == "annotator"
    assert rules.role_for(str(ws.samples_dir / "base" / "x.png")) == "trainer"
    assert rules.role_for(str(cache / "hash" / "image.webp")) == "annotator"
    never = [ws.captions_db, ws.root / "users.sqlite", ws.jobs_db, ws.root / "captions.sqlite-wal",
             ws.manifest_path("kb"), ws.prompts_path("kb"), ws.dataset_dir("kb") / "x.png",
             ws.runs_dir / "r" / "validation" / "step_000010.png", ws.runs_dir / "r" / "checkpoints" / "a.png",
             ws.cache_dir / "f.png", ws.exports_dir / "e" / "a.png", ws.tmp_dir / "t.png", ws.jobs_dir / "j" / "log.png",
             ws.samples_dir / "x.json", Path("/etc/passwd"), ROOT / "app.py"]
    for p in never:
        assert rules.role_for(str(p)) is None, p
    for t in (f"{img.parent}/../../../captions.sqlite", f"{img.parent}/../manifest.jsonl", "workspace/captions.sqlite",
              "../../etc/passwd", "http://127.0.0.1:7860/config", "https://example.org/x.png", "file:///etc/passwd",
              "data:image/png;base64,AAAA"):
        assert rules.role_for(t) is None, t
    link = ws.images_dir("kb") / "db.png"
    link.symlink_to(ws.captions_db)
    assert rules.role_for(str(link)) is None, "a symlink is judged by what it points to"
    blocked = workspace_blocked_paths(ws)
    for p in (ws.captions_db, ws.root / "users.sqlite", ws.jobs_db, ws.runs_dir, ws.cache_dir, ws.exports_dir,
              ws.tmp_dir, ws.jobs_dir, ws.manifest_path("kb").parent / "manifest.jsonl"):
        assert str(p) in blocked, p
    assert str(ws.datasets_dir) not in blocked and str(ws.images_dir("kb")) not in blocked


def test_is_loopback():
    from studio.auth import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "", "::", "192.168.1.10", "myhost", None))


# ---- app.py and the network ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_app_refuses_a_non_loopback_interface_without_sign_in_unless_allow_open(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    for k in ("SPACE_ID", "SYSTEM", "GRADIO_SERVER_NAME"):
        env.pop(k, None)
    w = tmp_path / "w"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "app.py", "--host", "0.0.0.0", "--workspace", str(w), "--no-sample"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    refuse_s = time.monotonic() - t0
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: refusing to serve on 0.0.0.0 without sign-in"), lines
    assert "users add NAME --role admin" in lines[0] and "--allow-open" in lines[0]
    assert refuse_s < 10, refuse_s
    assert not (w / "users.sqlite").exists()

    port = _free_port()
    log = tmp_path / "open.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "app.py", "--host", "0.0.0.0", "--port", str(port), "--workspace",
                                 str(w), "--no-sample", "--allow-open"], cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
        try:
            t0 = time.monotonic()
            # The sign-in line is printed after "running at" (a separate write): wait for both lines
            while time.monotonic() - t0 < 90 and not ("running at" in (t := log.read_text()) and "Sign-in:" in t):
                assert proc.poll() is None, log.read_text()
                time.sleep(0.3)
            text = log.read_text()
            assert "running at" in text and "open mode" in text and "effectively an admin" in text, text
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                assert r.status == 200
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"refusal in {refuse_s:.2f} s")


def test_file_route_guard_on_a_space_needs_a_signed_in_user_with_a_role(ws, monkeypatch):
    """On a Space Gradio's own login check does not cover OAuth: the guard reads the session itself."""
    from medart_core.accounts import UserStore
    from studio.auth import Access, FileRouteGuard, ServeRules

    monkeypatch.setenv("SPACE_ID", "org/med-art")
    monkeypatch.setenv("SYSTEM", "spaces")
    UserStore.for_workspace(ws).add("ann", "annotator", None)
    access = Access.for_workspace(ws, admins="")
    guard = FileRouteGuard(None, access, ServeRules.for_workspace(ws))
    img = str(ws.images_dir("kb") / "a.png")
    sample = str(ws.samples_dir / "a.png")

    def scope(user: str | None, expires: float = time.time() + 60) -> dict:
        session = {"oauth_info": {"userinfo": {"preferred_username": user}, "expires_at": expires}} if user else {}
        return {"type": "http", "session": session, "headers": []}

    assert guard.decide(scope(None), img)[0] == 401
    assert guard.decide(scope("ann", time.time() - 1), img)[0] == 401, "an expired sign-in is no sign-in"
    assert guard.decide(scope("stranger"), img)[0] == 403, "signed in with Hugging Face, but no role here"
    assert guard.decide(scope("ann"), img)[0] == 200
    assert guard.decide(scope("ann"), sample)[0] == 403, "samples need the trainer role"
    assert guard.decide(scope("ann"), str(ws.captions_db))[0] == 403
    assert guard.decide(scope(None), None)[0] == 401 and guard.decide(scope("ann"), None)[0] == 200   # uploads
