"""The hostile-request suite: a live studio on 127.0.0.1 with password sign-in and a user of each role.

* Every endpoint the running app has (its ``/config`` dependencies, public and private, cross-checked with
  ``gradio_client``'s ``view_api``) is called without a session (the HTTP layer answers 401) and with every
  role too weak for it (the raw queue/run protocol a browser speaks, and ``gradio_client`` for the public
  ones): each call is refused with a "Refused: ..." message and the databases and the workspace's files are
  the same afterwards. A "removed" user (signed in, then deleted from the users table) stands for a valid
  session with no role. Tabs registered later are covered without touching this file.
* The file route: path traversal (plain, URL-encoded, double-encoded), absolute and relative paths, URLs,
  symlinks, and every kind of workspace file that is not an image a page shows are refused.
* Oversized uploads (HTTP 413), uploads without a role, and a pixel bomb through the import are refused.
* Captions, reviewer names, dataset names, labels and run names carrying HTML/JS come back as text.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import re
import sqlite3
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

pytestmark = pytest.mark.slow

USERS = {"ann": "annotator", "tra": "trainer", "adm": "admin", "gone": "annotator"}
WEAK = {"gone": None, "ann": "annotator", "tra": "trainer"}   # "gone" is removed after signing in: session ended
XSS_CAPTION = 'An image of polyps <script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
XSS_REVIEWER = "<img src=x onerror=alert(1)>"
SECRET = "patient-john-doe-0042"
EVENT_DATA = {"index": 0, "value": None, "row_value": None, "col_value": None, "selected": True}


def pw(user: str) -> str:
    return f"pw-{user}-long-enough"


@dataclass
class Live:
    url: str
    port: int
    ws: Any
    store: Any
    demo: Any
    ids: list[int]
    ctx: Any = None
    sessions: dict[str, Any] = field(default_factory=dict)     # user -> httpx.Client with the sign-in cookie
    clients: dict[str, Any] = field(default_factory=dict)      # user -> gradio_client.Client(auth=...)
    probes: dict[str, Path] = field(default_factory=dict)

    def cookie(self, user: str) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.sessions[user].cookies.items())


@pytest.fixture(scope="module")
def live(tmp_path_factory, free_port):
    import httpx
    import numpy as np
    from gradio_client import Client
    from PIL import Image

    from bench.caption_latency import build_review_dataset
    from medart_core.accounts import UserStore
    from medart_core.captions import CaptionStore
    from medart_core.jobs import JobLedger
    from medart_core.workspace import Workspace
    from studio.app import build_app, configure_queue, serve_kwargs
    from studio.auth import Access
    from studio.context import StudioContext

    root = tmp_path_factory.mktemp("hostile")
    ws = Workspace.open(root / "workspace")
    store = CaptionStore.for_workspace(ws)
    ids = build_review_dataset(ws, store, "kb", 6, labels=("polyps", "esophagitis"), size=64)
    # Hostile text as an open-mode reviewer could have typed it before sign-in was turned on.
    store.edit(ids[0], XSS_CAPTION, reviewer=XSS_REVIEWER, expected_version=store.current(ids[0]).caption_version)
    JobLedger(ws)                                              # jobs.sqlite exists and is compared too
    # What a workspace holds besides dataset images: none of it may be served.
    png = ws.images_dir("kb") / sorted(p.name for p in ws.images_dir("kb").iterdir())[0]
    probes = {"image": png}
    for name, path, data in [
        ("manifest", ws.manifest_path("kb"), json.dumps({"file_name": f"{SECRET}.png"}) + "\n"),
        ("prompts", ws.prompts_path("kb"), json.dumps({"note": SECRET})),
        ("run_config", ws.run_layout("r1").config, json.dumps({"dataset": SECRET})),
        ("run_grid", ws.run_layout("r1").validation_grid(1), None),
        ("checkpoint", ws.run_layout("r1").checkpoint(1) / "adapter.png", None),
        ("job_log", ws.jobs_dir / "j1" / "log.txt", SECRET),
        ("cache", ws.cache_dir / "features" / "k" / "x.png", None),
        ("export", ws.exports_dir / "kb-csv" / "metadata.csv", f"file_name,text\n{SECRET}.png,x\n"),
        ("tmp", ws.tmp_dir / "staging.png", None),
        ("sample_json", ws.samples_dir / "base" / "000.json", json.dumps({"prompt": SECRET})),
        ("sample", ws.samples_dir / "base" / "000.png", None),
    ]:
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            Image.fromarray((np.ones((8, 8, 3)) * 200).astype("uint8")).save(path)
        else:
            path.write_text(data)
        probes[name] = path
    link = ws.images_dir("kb") / "zz-link.png"
    link.symlink_to(ws.captions_db)
    probes["symlink"] = link

    users = UserStore.for_workspace(ws)
    for user, role in USERS.items():
        users.add(user, role, pw(user))
    access = Access.for_workspace(ws)
    assert access.mode == "password"
    ctx = StudioContext(ws=ws, store=store, backbone_spec="tiny", access=access)
    demo = configure_queue(build_app(ctx))
    port = free_port()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            **serve_kwargs(ctx))
    lv = Live(url.rstrip("/"), port, ws, store, demo, ids, ctx=ctx, probes=probes)
    try:
        for user in USERS:
            h = httpx.Client(base_url=lv.url, timeout=60)
            r = h.post("/login", data={"username": user, "password": pw(user)})
            assert r.status_code == 200, (user, r.text)
            lv.sessions[user] = h
            lv.clients[user] = Client(url, auth=(user, pw(user)), verbose=False)
        users.remove("gone")                  # its sessions stay signed in, with no role from now on
        yield lv
    finally:
        for h in lv.sessions.values():
            h.close()
        demo.close()


# ---- helpers ---------------------------------------------------------------------------------------------
def snapshot(ws) -> dict[str, Any]:
    """Every SQLite database as SQL text, and every other file's size, mtime and hash (WAL/SHM files are
    left out: their bytes move with checkpoints; the dumps say what is in the database)."""
    dbs, files = {}, {}
    for p in sorted(ws.root.rglob("*")):
        rel = str(p.relative_to(ws.root))
        if p.is_symlink() or not p.is_file():
            files[rel] = "dir" if p.is_dir() else "link"
            continue
        if ".sqlite" in p.name:
            if p.name.endswith(".sqlite"):
                con = sqlite3.connect(p)
                try:
                    dbs[rel] = list(con.iterdump())
                finally:
                    con.close()
            continue
        st = p.stat()
        files[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    assert {"captions.sqlite", "jobs.sqlite", "users.sqlite"} <= set(dbs), sorted(dbs)
    return {"dbs": dbs, "files": files}


def assert_same(before: dict, after: dict) -> None:
    assert set(before["dbs"]) == set(after["dbs"]), "a database appeared or vanished"
    for name in before["dbs"]:
        b, a = before["dbs"][name], after["dbs"][name]
        assert b == a, f"{name} changed: {sorted(set(a) ^ set(b))[:5]}"
    added = set(after["files"]) - set(before["files"])
    gone = set(before["files"]) - set(after["files"])
    changed = {k for k in set(before["files"]) & set(after["files"]) if before["files"][k] != after["files"][k]}
    assert not (added or gone or changed), (sorted(added)[:5], sorted(gone)[:5], sorted(changed)[:5])


def endpoints(live: Live) -> tuple[list[dict], dict[str, dict]]:
    """The running app's dependencies with a server function (from /config), and its API info
    (gradio_client's view_api), checked against each other."""
    cfg = live.sessions["adm"].get("/config").json()
    values = {c["id"]: (c.get("props") or {}).get("value") for c in cfg["components"]}
    deps = [dict(d, defaults=[values.get(i) for i in d["inputs"]]) for d in cfg["dependencies"] if d.get("backend_fn")]
    info = live.clients["adm"].view_api(return_format="dict", print_info=False)["named_endpoints"]
    public = {"/" + d["api_name"] for d in deps if d.get("api_visibility") == "public"}
    assert set(info) == public, (set(info) ^ public)
    return deps, info


def raw_call(h, dep: dict) -> dict:
    """Call one dependency as the browser does (queue/join + queue/data, or run/predict for queue=False), with
    each input component's value as the page starts (so that Gradio's preprocessing passes and the call reaches
    the server function)."""
    sh = uuid.uuid4().hex[:12]
    payload = {"data": dep["defaults"], "fn_index": dep["id"], "session_hash": sh,
               "event_data": EVENT_DATA, "trigger_id": None}
    if dep.get("queue") is False:
        r = h.post("/gradio_api/run/predict", json=payload)
        if r.status_code != 200:
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            return {"status": r.status_code, "success": False, "error": body.get("error") or r.text}
        return {"status": 200, "success": True, "error": None}
    r = h.post("/gradio_api/queue/join", json=payload)
    if r.status_code != 200:
        return {"status": r.status_code, "success": False, "error": r.text}
    event = r.json()["event_id"]
    with h.stream("GET", "/gradio_api/queue/data", params={"session_hash": sh}) as s:
        for line in s.iter_lines():
            if not line.startswith("data:"):
                continue
            m = json.loads(line[5:])
            if m.get("event_id") == event and m.get("msg") == "process_completed":
                out = m.get("output") or {}
                return {"status": 200, "success": bool(m.get("success")), "error": out.get("error")}
    raise AssertionError(f"no result for {dep['api_name']}")


def client_args(info: dict) -> list[Any]:
    return [p["parameter_default"] if p.get("parameter_has_default") else None for p in info["parameters"]]


def is_refusal(res: dict) -> bool:
    return not res["success"] and str(res["error"] or "").startswith("Refused:")


def get_raw(live: Live, path: str, user: str | None = None) -> tuple[int, bytes]:
    """GET exactly ``path`` (no client-side normalisation of '..' or percent-escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Cookie": live.cookie(user)} if user else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# ---- the suite -------------------------------------------------------------------------------------------
def test_every_endpoint_is_refused_without_a_session(live):
    import httpx
    from gradio_client import Client

    deps, info = endpoints(live)
    before = snapshot(live.ws)
    anon = httpx.Client(base_url=live.url, timeout=30)
    tried = Counter()
    for dep in deps:
        res = raw_call(anon, dep)
        assert res["status"] == 401 and not res["success"], (dep["api_name"], res)
        tried["raw protocol"] += 1
        if dep.get("api_visibility") == "public":
            r = anon.post(f"/gradio_api/call/{dep['api_name']}", json={"data": []})
            assert r.status_code == 401, (dep["api_name"], r.status_code)
            tried["/gradio_api/call"] += 1
    for path in ("/config", "/gradio_api/info", "/gradio_api/openapi.json", "/gradio_api/upload"):
        r = anon.post(path, files={"files": ("a.png", b"x")}) if path.endswith("upload") else anon.get(path)
        assert r.status_code == 401, (path, r.status_code)
    status, _ = get_raw(live, "/gradio_api/file=" + quote(str(live.probes["image"])))
    assert status == 401
    with pytest.raises(Exception):
        Client(live.url, verbose=False)           # gradio_client without auth cannot even read the API
    assert_same(before, snapshot(live.ws))
    # A wrong password changes one thing only: the account's count of failed sign-ins (the back-off).
    with pytest.raises(Exception):
        Client(live.url, auth=("ann", "wrong password!"), verbose=False)
    from medart_core.accounts import UserStore

    users = UserStore.for_workspace(live.ws)
    assert users.lockout("ann").failures == 1
    users.clear_failures("ann")
    n = len(deps)
    print(f"\nanonymous: {n} endpoints ({len(info)} public, {n - len(info)} private) x 1 (no session): "
          f"{tried['raw protocol']} raw + {tried['/gradio_api/call']} /call tries, all HTTP 401")
    assert tried["raw protocol"] == n


def test_every_endpoint_is_refused_for_every_too_weak_role_with_no_side_effect(live):
    from gradio_client.exceptions import AppError

    from medart_core.accounts import role_allows
    from studio.auth import SIGNED_IN

    deps, info = endpoints(live)
    roles = live.demo.medart_roles
    missing = [d["api_name"] for d in deps if d["id"] not in roles]
    assert not missing, f"endpoints without a role: {missing}"
    for d in deps:
        if d.get("api_visibility") == "public":
            desc = info["/" + d["api_name"]].get("description", "")
            assert desc.startswith(f"Needs the {roles[d['id']]} role."), (d["api_name"], desc)
    before = snapshot(live.ws)
    tried, refused, by_user = Counter(), Counter(), Counter()
    failures = []
    for dep in deps:
        need = roles[dep["id"]]
        if need == SIGNED_IN:
            continue                       # the shell's "who am I": any signed-in user, by design
        for user, role in WEAK.items():
            if role is not None and role_allows(role, need):
                continue
            res = raw_call(live.sessions[user], dep)
            tried["raw"] += 1
            by_user[user] += 1
            # A removed user's session ended with the removal: the HTTP layer answers 401 before any handler.
            if is_refusal(res) if role is not None else (res["status"] == 401 and not res["success"]):
                refused["raw"] += 1
            else:
                failures.append((dep["api_name"], user, res))
            if dep.get("api_visibility") == "public":
                tried["gradio_client"] += 1
                by_user[user] += 1
                try:
                    live.clients[user].predict(*client_args(info["/" + dep["api_name"]]),
                                               api_name="/" + dep["api_name"])
                    failures.append((dep["api_name"], user, "gradio_client call succeeded"))
                except AppError as e:
                    if str(e).startswith("Refused:") and role is not None:
                        refused["gradio_client"] += 1
                    else:
                        failures.append((dep["api_name"], user, str(e)))
                except Exception as e:                       # httpx.HTTPStatusError
                    if role is None and "401" in str(e):
                        refused["gradio_client"] += 1
                    else:
                        failures.append((dep["api_name"], user, repr(e)))
    after = snapshot(live.ws)
    assert not failures, failures[:10]
    assert_same(before, after)
    need_counts = Counter(roles[d["id"]] for d in deps)
    print(f"\ntoo-weak roles: {len(deps)} endpoints (by role needed: {dict(need_counts)}); tried "
          f"{tried['raw']} raw-protocol calls + {tried['gradio_client']} gradio_client calls "
          f"(by caller: {dict(by_user)}); refused {refused['raw']} + {refused['gradio_client']}; "
          f"databases and files unchanged")
    assert refused == tried and tried["raw"] > 0
    # every endpoint (but the "who am I") was tried at least with the no-role session
    assert tried["raw"] >= len(deps) - need_counts[SIGNED_IN]


def test_allowed_roles_still_work(live):
    """The control: the same sessions reach what their role allows."""
    ann, tra, adm = live.clients["ann"], live.clients["tra"], live.clients["adm"]
    out = ann.predict("", api_name="/caption_load")
    assert "kb" in json.dumps(out, default=str)
    assert tra.predict(api_name="/finetune_runs") is not None
    rows = adm.predict(api_name="/users_list")
    assert {r[0] for r in rows["data"]} == {"ann", "tra", "adm"}
    assert all("$2b$" not in json.dumps(r) for r in rows["data"]), "hashes never leave the users table"


def test_file_route_serves_only_images_a_page_shows(live):
    ws, p = live.ws, live.probes
    img = p["image"]
    status, body = get_raw(live, "/gradio_api/file=" + quote(str(img)), "ann")
    assert status == 200 and body == img.read_bytes(), "control: the dataset image a page shows"
    status, _ = get_raw(live, "/gradio_api/file=" + quote(str(p["sample"])), "ann")
    assert status == 403, "samples need the trainer role"
    status, _ = get_raw(live, "/gradio_api/file=" + quote(str(p["sample"])), "tra")
    assert status == 200
    status, _ = get_raw(live, "/gradio_api/file=" + quote(str(img)), "gone")
    assert status == 401, "a removed user's session ended: no image"

    d = str(img.parent)
    targets = [str(ws.captions_db), str(ws.root / "users.sqlite"), str(ws.jobs_db)]
    targets += [str(x) for x in ws.root.glob("*.sqlite-*")]
    targets += [str(p[k]) for k in ("manifest", "prompts", "run_config", "run_grid", "checkpoint", "job_log",
                                    "cache", "export", "tmp", "sample_json", "symlink")]
    targets += [str(ws.root), str(ws.datasets_dir), "/etc/passwd", "/proc/self/environ",
                str(Path(__file__).resolve().parent.parent / "app.py"), "app.py", "workspace/captions.sqlite",
                "../../../../../../etc/passwd", "//etc/passwd", "~/.bashrc",
                f"http://127.0.0.1:{live.port}/config", "https://huggingface.co/robots.txt", "file:///etc/passwd",
                f"{d}/../../../captions.sqlite", f"{d}/../manifest.jsonl", f"{d}/./../../../users.sqlite"]
    paths = []
    for t in targets:
        paths.append("/gradio_api/file=" + quote(t, safe="/:~"))         # plain
        paths.append("/gradio_api/file=" + quote(t, safe=""))            # every '/' and '.' that can be, escaped
        paths.append("/gradio_api/file/" + quote(t, safe="/"))           # the deprecated route
    # URL-encoded and double-encoded traversal, spelled out
    paths += [f"/gradio_api/file={d}/%2e%2e/%2e%2e/%2e%2e/captions.sqlite",
              f"/gradio_api/file={d}/%2E%2E%2F%2E%2E%2F%2E%2E%2Fcaptions.sqlite",
              f"/gradio_api/file={d}/%252e%252e/%252e%252e/%252e%252e/captions.sqlite",
              f"/gradio_api/file={d}/..%2f..%2f..%2fusers.sqlite",
              f"/gradio_api/file={d}/..%5c..%5c..%5ccaptions.sqlite",
              f"/gradio_api/file={d}/%c0%ae%c0%ae/%c0%ae%c0%ae/captions.sqlite"]
    seen = Counter()
    for path in paths:
        for user in ("ann", "adm"):
            status, body = get_raw(live, path, user)
            assert status in (400, 403, 404), (path, user, status, body[:80])
            assert b"SQLite format" not in body and SECRET.encode() not in body, path
            seen[status] += 1
    print(f"\nfile route: {len(paths)} hostile paths x 2 roles refused: {dict(seen)}")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_uploads_are_limited_and_need_a_role(live):
    from gradio_client import handle_file
    from PIL import Image

    before = snapshot(live.ws)
    adm, gone = live.sessions["adm"], live.sessions["gone"]
    big = b"\0" * (51 * 1024 * 1024)
    r = adm.post("/gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert r.status_code == 413, (r.status_code, r.text[:200])
    r = gone.post("/gradio_api/upload", files={"files": ("a.png", b"\x89PNG", "image/png")})
    assert r.status_code == 401, "a removed user's session ended"
    r = adm.post("/gradio_api/upload", files={"files": ("ok.png", b"\x89PNG", "image/png")})
    assert r.status_code == 200, "control: a small upload by a user with a role"
    assert_same(before, snapshot(live.ws))

    # A pixel bomb: a few kB of PNG that decodes to 60 M pixels. The import refuses it; nothing is stored.
    bomb = live.ws.root.parent / "bomb.png"
    Image.new("1", (10_000, 6_000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 1_000_000
    n_before = len(live.store.list_datasets())
    report = live.clients["adm"].predict([handle_file(str(bomb))], "bombs", "x", "generic", None,
                                         api_name="/import")[0]
    assert "pixel" in report.lower() and "limit" in report.lower(), report
    assert all(live.store.count_images(d.name) == 0 for d in live.store.list_datasets() if d.name == "bombs")
    assert len(live.store.list_datasets()) <= n_before + 1


def test_user_text_comes_back_as_text(live):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from medart_core.jobs import JobLedger

    _, info = endpoints(live)
    ann = live.clients["ann"]
    out = ann.predict("", api_name="/caption_load")
    kinds = [r["component"].lower() for r in info["/caption_load"]["returns"]]
    html_out = [v for v, k in zip(out, kinds) if k in ("html", "markdown") and isinstance(v, str)]
    assert html_out and any("&lt;script&gt;" in v for v in html_out), "the hostile caption is shown, escaped"
    for v in html_out:
        low = v.lower()
        assert "<script" not in low and "<img src=x" not in low and "onerror=\"window" not in low, v[:300]
    hist = json.dumps([v for v, k in zip(out, kinds) if k == "dataframe"])
    assert "onerror" in hist, "the reviewer name is in the history table, as data (the browser test renders it)"

    adm, tra = live.clients["adm"], live.clients["tra"]
    names_before = {d.name for d in live.store.list_datasets()}
    for bad in ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>"):
        with pytest.raises(AppError, match="Invalid dataset name"):
            adm.predict([handle_file(str(live.probes["image"]))], bad, "x", "generic", None, api_name="/import")

    with pytest.raises(AppError, match="not usable as a class name"):
        adm.predict([handle_file(str(live.probes["image"]))], "labels", "<img src=x onerror=alert(1)>", "generic",
                    None, api_name="/import")
    assert {d.name for d in live.store.list_datasets()} - names_before <= {"labels"}
    assert not any("<" in lab for d in live.store.list_datasets() for lab in live.store.labels(d.name))

    jobs_before = len(JobLedger(live.ws).list())
    form = ["kb", "latest", "tiny", "cpu-smoke"] + [None] * 14
    with pytest.raises(AppError, match="Invalid run name"):
        tra.predict("<script>alert(1)</script>", *form, api_name="/finetune_launch")
    assert len(JobLedger(live.ws).list()) == jobs_before


def test_the_signed_in_user_is_who_did_it(live, monkeypatch):
    """Caption events carry the signed-in user (a typed name is ignored); job submissions carry owner=."""
    from medart_core.jobs import JobLedger

    ann = live.clients["ann"]
    out = ann.predict("", api_name="/caption_load")
    returns = endpoints(live)[1]["/caption_load"]["returns"]
    editor = next(i for i, r in enumerate(returns) if (r["label"] or "").startswith("Caption"))
    text = out[editor]["value"] if isinstance(out[editor], dict) else out[editor]
    key = next(v for v in out if isinstance(v, str) and re.fullmatch(r"\d+:\d+", v))   # the editor's image:version
    image_id = live.ids[0]
    n = len(live.store.history(image_id))
    ann.predict(text + " Checked.", key, "mallory", api_name="/caption_save")
    hist = live.store.history(image_id)
    assert len(hist) == n + 1 and hist[-1].reviewer == "ann", [(e.kind, e.reviewer) for e in hist[-2:]]

    monkeypatch.setattr(live.ctx.executor, "start_supervisor", False)      # Launch queues; nothing trains it
    form = ["kb", "latest", "tiny", "cpu-smoke"] + [None] * 14
    live.clients["tra"].predict("owner-check", *form, api_name="/finetune_launch")
    ledger = JobLedger(live.ws)
    job = ledger.list(run="owner-check", limit=1)[0]
    assert job.owner == "tra"
    ledger.request_stop(job.id)
