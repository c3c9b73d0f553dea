"""Sign-in and roles in the studio: who is asking, what their role lets them do, and the guard that every
event handler of the app goes through on the server.

* **Modes** (:class:`Access`): ``open`` (no users in ``W/users.sqlite``: everyone is effectively an admin, and
  ``app.py`` serves on a loopback interface only unless ``--allow-open``), ``password`` (``launch(auth=...)``
  against the users table: the user is ``request.username``) and ``oauth`` (on a Hugging Face Space: the
  login button, the user is the OAuth profile's username; admins seeded from the ``MEDART_ADMINS`` secret).
* **Roles** (``medart_core.accounts``): annotator < trainer < admin. A tab declares the role its handlers
  need (``studio.app.TABS``); a handler that needs another one says so with :func:`requires`; after each tab
  is built, :func:`protect` wraps *every* function the tab registered (lambdas, loads and timer ticks
  included) with :func:`guard`, so a handler nobody marked still gets its tab's role, and anything registered
  outside a tab needs admin. Hiding a tab is not access control: the API is checked the same way.
* A refused call raises ``gr.Error("Refused: ...")`` before the handler runs, so it has no side effect. Page
  loads, timer ticks and change events refuse quietly (no toast: the tab's lock notice says why); clicks
  show the message.
* :class:`FileRouteGuard` (an ASGI middleware) lets ``/gradio_api/file=`` serve only images a page shows:
  dataset images (any role), generated samples (trainer) and Gradio's own cache (any role); never the
  databases, manifests, checkpoints, logs, exports, run folders, caches or ``W/tmp``, whatever
  ``allowed_paths`` say. It also keeps uploads (``/gradio_api/upload``) to users with a role: Gradio's own
  check covers password sign-in, not a Space's OAuth.

Gradio is imported inside functions only, so ``app.py`` can refuse a bad ``--host`` before it loads.
"""
from __future__ import annotations

import functools
import inspect
import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from medart_core.accounts import ADMIN, ANNOTATOR, LOCK_AFTER, ROLE_DOES, ROLES, TRAINER, UserStore, \
    admins_from_env, role_allows

log = logging.getLogger("medart.auth")

F = TypeVar("F", bound=Callable[..., Any])

SIGNED_IN = "signed-in"     # any signed-in user, with a role or not (the shell's "who am I"; nothing else)
REFUSED = "Refused:"        # every refusal message starts so (the hostile-request suite looks for it)
# Events the browser fires by itself: their refusals are quiet (no toast); the tab's lock notice explains.
QUIET_TRIGGERS = frozenset({"load", "tick", "change", "unload"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")
UPLOAD_ROUTE = "/gradio_api/upload"      # a role is needed to upload at all (Gradio checks only sign-in)
OPEN_MODE_NOTE = "everyone who can reach this server is effectively an admin"


def is_spaces() -> bool:
    """Running on a Hugging Face Space (``SPACE_ID`` set and ``SYSTEM=spaces``): ``medart_core.spaces`` decides,
    the one place the studio reads the Spaces environment."""
    from medart_core.spaces import on_spaces

    return on_spaces()


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for 0.0.0.0, "" and any other name or address."""
    h = (host or "").strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


# =========================================================================================================
# Who is asking
# =========================================================================================================
def oauth_username(request: Any) -> str | None:
    """The Hugging Face username of a signed-in Space visitor, from the session Gradio's OAuth keeps."""
    if request is None:
        return None
    try:
        from gradio.helpers import _session_from_request
        from gradio.oauth import _get_valid_oauth_info_from_session

        info = _get_valid_oauth_info_from_session(_session_from_request(request))
    except Exception:  # no session middleware, or a Gradio without these helpers: nobody
        session = getattr(request, "session", None)
        info = session.get("oauth_info") if isinstance(session, dict) else None
    user = ((info or {}).get("userinfo") or {}).get("preferred_username")
    return str(user) if user else None


def current_request() -> Any:
    """The ``gr.Request`` of the event being handled (None outside an event, and for some API paths)."""
    from gradio.context import LocalContext

    return LocalContext.request.get(None)


class Refused(Exception):
    """A call the caller's role does not allow; its message starts with :data:`REFUSED` and says what to do."""


@dataclass
class Access:
    """How the studio knows who is asking, and their role."""

    mode: str = "open"                         # "open" | "password" | "oauth"
    users: UserStore | None = None
    host: str = "127.0.0.1"
    seeded: list[str] = field(default_factory=list)

    @classmethod
    def for_workspace(cls, ws: Any, *, host: str = "127.0.0.1", spaces: bool | None = None,
                      admins: str | None = None) -> "Access":
        """``oauth`` on a Space (``MEDART_ADMINS`` seeded as admins), else ``password`` when the workspace has
        users, else ``open``."""
        users = UserStore.for_workspace(ws)
        if is_spaces() if spaces is None else spaces:
            seeded = users.seed_admins(admins_from_env(os.environ.get("MEDART_ADMINS") if admins is None else admins))
            return cls("oauth", users, host, seeded)
        return cls("password" if users.count() else "open", users, host)

    @property
    def enabled(self) -> bool:
        return self.mode != "open"

    def user_of(self, request: Any) -> str | None:
        """The signed-in user, spelled as the account is stored (``ANN`` and ``ann`` are one identity in events,
        votes, jobs and banners); None when signed out or in open mode."""
        if self.mode == "password":
            user = getattr(request, "username", None) if request is not None else None
        elif self.mode == "oauth":
            user = oauth_username(request)
        else:
            return None
        if not user:
            return None
        return (self.users.canonical(str(user)) if self.users is not None else None) or str(user)

    def role_of(self, user: str | None) -> str | None:
        if not self.enabled:
            return ADMIN
        if not user or self.users is None:
            return None
        return self.users.role_of(user)

    def authenticate(self, username: str, password: str) -> bool:
        """``launch(auth=...)``: the users table's bcrypt check."""
        return self.users is not None and self.users.verify(username, password)

    def check(self, request: Any, needed: str) -> tuple[str | None, str | None]:
        """(user, role) when ``needed`` is allowed; raises :class:`Refused` otherwise."""
        if not self.enabled:
            return None, ADMIN
        user = self.user_of(request)
        if not user:
            how = ("Sign in with Hugging Face first (the button at the top of the page)." if self.mode == "oauth"
                   else "Sign in first.")
            raise Refused(f"{REFUSED} not signed in. {how}")
        role = self.role_of(user)
        if needed == SIGNED_IN:
            return user, role
        if role is None:
            raise Refused(f"{REFUSED} {user} has no role in this studio. Ask an admin to add you "
                          f"(Users tab, or: python -m medart_core users add {user} --role annotator).")
        if not role_allows(role, needed):
            raise Refused(f"{REFUSED} this needs the {needed} role ({ROLE_DOES[needed]}); {user} is {_a(role)}. "
                          f"Ask an admin (Users tab, or: python -m medart_core users set-role {user} {needed}).")
        return user, role

    def may(self, request: Any, needed: str) -> bool:
        try:
            self.check(request, needed)
            return True
        except Refused:
            return False


def _a(role: str) -> str:
    return ("an " if role[0] in "aeiou" else "a ") + role


# =========================================================================================================
# The guard
# =========================================================================================================
def requires(role: str) -> Callable[[F], F]:
    """Declare the role a handler needs when it differs from its tab's (``studio.app.TABS``), e.g.::

        @requires(ANNOTATOR)      # blind review inside the trainer-only Compare tab
        @user_errors
        def on_vote(...): ...

    It only marks the function; :func:`protect` (run by ``build_app`` on every tab) enforces it on the
    server, for the browser and API clients alike. Works on lambdas too: ``requires(ADMIN)(lambda x: ...)``.
    """
    if role not in ROLES and role != SIGNED_IN:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)} or {SIGNED_IN!r}")

    def mark(fn: F) -> F:
        fn.__medart_role__ = role  # type: ignore[attr-defined]
        return fn

    return mark


def declared_role(fn: Any) -> str | None:
    return getattr(fn, "__medart_role__", None)


def guard(access: Access, needed: str, fn: F, *, quiet: bool = False, what: str = "") -> F:
    """``fn`` behind a role check on the server; the wrapper keeps its kind (sync, async, generator) and its
    signature, so Gradio still injects ``gr.Request``/``gr.Progress``/``gr.SelectData``."""
    def check() -> None:
        try:
            access.check(current_request(), needed)
        except Refused as e:
            import gradio as gr

            log.log(logging.INFO if quiet else logging.WARNING, "refused %s: %s",
                    what or getattr(fn, "__name__", "handler"), e)
            raise gr.Error(str(e), visible=not quiet, print_exception=False) from None

    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            check()
            async for item in fn(*args, **kwargs):
                yield item
    elif inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check()
            return (yield from fn(*args, **kwargs))
    elif inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            check()
            return await fn(*args, **kwargs)
    else:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check()
            return fn(*args, **kwargs)

    wrapper.__medart_role__ = needed  # type: ignore[attr-defined]
    wrapper.__medart_guarded__ = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def protect(demo: Any, access: Access, fn_ids: Iterable[int], default_role: str,
            api_roles: dict[str, str] | None = None) -> dict[int, str]:
    """Wrap every function ``fn_ids`` names in ``demo.fns`` with :func:`guard`: the role it declared
    (:func:`requires`), else ``api_roles[api_name]``, else ``default_role``. Returns {fn id: role}."""
    out = {}
    for i in sorted(fn_ids):
        bf = demo.fns[i]
        if bf.fn is None:
            continue
        if getattr(bf.fn, "__medart_guarded__", False):
            out[i] = bf.fn.__medart_role__
            continue
        roles = api_roles or {}
        needed = declared_role(bf.fn) or roles.get(bf.api_name or "") or roles.get(bf.name or "") or default_role
        triggers = {t[1] for t in (bf.targets or []) if isinstance(t, (tuple, list)) and len(t) > 1}
        quiet = bool(triggers) and triggers <= QUIET_TRIGGERS
        bf.fn = guard(access, needed, bf.fn, quiet=quiet, what=bf.api_name or bf.name or f"fn {i}")
        if bf.api_description is not False:
            bf.api_description = f"Needs the {needed} role. " + (bf.api_description or _doc_line(bf.fn))
        out[i] = needed
    return out


def _doc_line(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


# =========================================================================================================
# What the page says about the session
# =========================================================================================================
def session_markdown(access: Access, request: Any) -> str:
    """The banner line: open mode (and what it means), or who is signed in with which role."""
    from html import escape

    if not access.enabled:
        where = ("listening on 127.0.0.1 only" if is_loopback(access.host) else
                 f"⚠️ listening on **{escape(access.host)}**, started with `--allow-open`: anyone on the network")
        return (f"🔓 **Open mode**: no users are configured, so {OPEN_MODE_NOTE} ({where}). "
                "To require sign-in, add one: `python -m medart_core users add NAME --role admin`.")
    user = access.user_of(request)
    if not user:
        return ("🔒 **Sign in with Hugging Face** (the button above) to use the studio." if access.mode == "oauth"
                else "🔒 Not signed in.")
    role = access.role_of(user)
    who = f"Signed in{' with Hugging Face' if access.mode == 'oauth' else ''} as **{escape(user)}**"
    if role is None:
        return (f"{who} · **no role yet**: ask an admin to add you (Users tab, or "
                f"`python -m medart_core users add {escape(user)} --role annotator`).")
    return f"{who} · role **{role}** ({ROLE_DOES[role]})"


def lock_notice(access: Access, request: Any, label: str, role: str, partly: Iterable[str] = ()) -> str:
    """"" when the user may use the tab; otherwise one line saying which role it needs and how to get it."""
    if access.may(request, role):
        return ""
    user = access.user_of(request)
    mine = access.role_of(user) if user else None
    if any(access.may(request, r) for r in partly):
        return (f"🔒 Parts of **{label}** need the **{role}** role ({ROLE_DOES[role]}); the parts open to "
                f"{'you' if mine is None else _a(mine)} work as usual.")
    if not user:
        return f"🔒 **{label}** needs a signed-in user with the **{role}** role."
    you = f"you ({user}) have no role yet" if mine is None else f"you ({user}) are {_a(mine)}"
    return (f"🔒 **{label}** needs the **{role}** role ({ROLE_DOES[role]}); {you}. Its buttons are refused on the "
            f"server. Ask an admin: `python -m medart_core users set-role {user} {role}`.")


# =========================================================================================================
# The file route
# =========================================================================================================
@dataclass(frozen=True)
class ServeRules:
    """What ``/gradio_api/file=`` may serve: images under ``datasets/<name>/images/`` (annotator), images under
    ``samples/`` (trainer) and Gradio's own upload/cache folders (annotator). Nothing else, ever."""

    datasets_dir: Path
    samples_dir: Path
    gradio_dirs: tuple[Path, ...] = ()

    @classmethod
    def for_workspace(cls, ws: Any, gradio_dirs: Iterable[str | Path] = ()) -> "ServeRules":
        return cls(Path(ws.datasets_dir).resolve(), Path(ws.samples_dir).resolve(),
                   tuple(Path(p).resolve() for p in gradio_dirs))

    def role_for(self, target: str, extra_gradio_dirs: Iterable[str | Path] = ()) -> str | None:
        """The role needed to read ``target`` (the path after ``file=``), or None: never served."""
        if "://" in target or target.lower().startswith(("http:", "https:", "data:", "file:")):
            return None
        try:
            p = Path(os.path.abspath(target)).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            return None           # Gradio's own folders too: uploads of any type must not be served back
        for d in (*self.gradio_dirs, *(Path(x).resolve() for x in extra_gradio_dirs)):
            if _inside(p, d):
                return ANNOTATOR
        if _inside(p, self.datasets_dir):
            rel = p.relative_to(self.datasets_dir).parts
            return ANNOTATOR if len(rel) >= 3 and rel[1] == "images" else None
        if _inside(p, self.samples_dir):
            return TRAINER
        return None


def _inside(p: Path, d: Path) -> bool:
    try:
        p.relative_to(d)
        return p != d
    except ValueError:
        return False


def workspace_blocked_paths(ws: Any) -> list[str]:
    """``launch(blocked_paths=...)``: everything of the workspace but dataset images and samples, as Gradio's
    own (exact-path) block list; :class:`FileRouteGuard` refuses whatever appears later."""
    root = Path(ws.root)
    names = {"runs", "jobs", "cache", "exports", "tmp", "evaluations", "logs", "studies", "reviews", "mirror"}
    for db in ("captions", "jobs", "users", "reviews", "blind"):
        for suffix in ("", "-wal", "-shm", "-journal"):
            names.add(f"{db}.sqlite{suffix}")
    if root.is_dir():
        names |= {p.name for p in root.iterdir() if p.name not in ("datasets", "samples")}
    out = [str(root / n) for n in sorted(names)]
    ddir = Path(ws.datasets_dir)
    if ddir.is_dir():
        for d in sorted(ddir.iterdir()):
            if d.is_dir():
                names = {"manifest.jsonl", "prompts.json"} | {x.name for x in d.iterdir() if x.name != "images"}
                out += [str(d / n) for n in sorted(names)]
    return out


class FileRouteGuard:
    """ASGI middleware in front of Gradio's file routes: a path :class:`ServeRules` does not allow is a 403,
    and so is a user without the role it needs (unsigned visitors of a Space included: Gradio's own login
    check does not cover OAuth)."""

    def __init__(self, app: Any, access: Access, rules: ServeRules):
        self.app = app
        self.access = access
        self.rules = rules

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            path = scope.get("path") or ""
            hit = next((path.find(r) + len(r) for r in FILE_ROUTES if r in path), -1)
            status, text = 200, ""
            if hit >= 0:
                status, text = self.decide(scope, path[hit:])
            elif path.rstrip("/").endswith(UPLOAD_ROUTE):
                status, text = self.decide(scope, None)
            if status != 200:
                await _plain(send, status, text)
                return
        await self.app(scope, receive, send)

    def decide(self, scope: dict, target: str | None) -> tuple[int, str]:
        """(200, "") to pass the request on to Gradio, else the refusal. ``target=None``: an upload. Sign-in is
        checked before the path, so a signed-out visitor learns nothing about which paths exist (always 401)."""
        user = _scope_user(self.access, scope) if self.access.enabled else None
        if self.access.enabled and not user:
            return 401, "Not authenticated."
        if target is None:
            needed = ANNOTATOR
        else:
            app = scope.get("app")
            extra = [getattr(app, "uploaded_file_dir", None)] if getattr(app, "uploaded_file_dir", None) else []
            needed = self.rules.role_for(target, extra)
        if needed is None:
            return 403, "File not allowed."
        if not self.access.enabled:
            return 200, ""
        role = self.access.role_of(user)
        if not role_allows(role, needed):
            return 403, "Not allowed for your role."
        return 200, ""


def _scope_user(access: Access, scope: dict) -> str | None:
    if access.mode == "oauth":
        info = (scope.get("session") or {}).get("oauth_info") or {}
        import time

        if info.get("expires_at") is not None and info["expires_at"] < time.time():
            return None
        user = ((info.get("userinfo") or {}).get("preferred_username")) or None
        return ((access.users.canonical(user) if access.users is not None else None) or user) if user else None
    app = scope.get("app")
    tokens = getattr(app, "tokens", None) or {}
    cookie_id = getattr(app, "cookie_id", "")
    from http.cookies import SimpleCookie

    jar: SimpleCookie = SimpleCookie()
    for k, v in scope.get("headers") or []:
        if k == b"cookie":
            try:
                jar.load(v.decode("latin-1"))
            except Exception:
                continue
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        if name in jar and jar[name].value in tokens:
            return tokens[jar[name].value]
    return None


async def _plain(send: Any, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": body})


# =========================================================================================================
# The Users tab (admin)
# =========================================================================================================
USER_COLUMNS = ["name", "role", "sign-in", "created", "updated", "added by"]
LOCK_COLUMNS = ["name", "failed sign-ins in a row", "state", "last failure"]


def lockout_rows(access: Access) -> list[list[str]]:
    if access.users is None:
        return []

    def ts(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    return [[lk.name, str(lk.failures), f"locked until {ts(lk.locked_until)}" if lk.locked() else "not locked",
             ts(lk.last_failure)] for lk in access.users.lockouts()]


def users_rows(access: Access) -> list[list[str]]:
    if access.users is None:
        return []
    return [[u.name, u.role, u.sign_in, u.created_at, u.updated_at, u.created_by or ""] for u in access.users.list()]


def build_users_tab(ctx: Any) -> None:
    """List users, add one (with a password, or none for Hugging Face sign-in on a Space), change a role,
    set a password, remove one; then the Executors section (``studio.executors_panel``). Every handler needs
    admin (the tab's role in ``studio.app.TABS``)."""
    import gradio as gr

    from .errors import user_errors

    access: Access = ctx.access
    if access.users is None:
        access.users = UserStore.for_workspace(ctx.ws)
    note = ("Users added here turn sign-in on at the next start of the studio." if not access.enabled else
            "Role changes and removals take effect on the user's next click.")
    gr.Markdown(f"Roles: **annotator** ({ROLE_DOES[ANNOTATOR]}), **trainer** ({ROLE_DOES[TRAINER]}), **admin** "
                f"({ROLE_DOES[ADMIN]}). {note} The same from a shell: `python -m medart_core users add|list|"
                "set-role|passwd|remove`.")
    table = gr.Dataframe(headers=USER_COLUMNS, datatype="str", interactive=False, elem_id="users-table")
    with gr.Row():
        name = gr.Textbox(label="User name", max_length=64, elem_id="users-name")
        role = gr.Dropdown(list(ROLES), value=ANNOTATOR, label="Role", elem_id="users-role")
        password = gr.Textbox(label="Password (empty: signs in with Hugging Face on a Space)", type="password",
                              max_length=72, elem_id="users-password")
    with gr.Row():
        add_b = gr.Button("Add user", variant="primary", elem_id="users-add")
        role_b = gr.Button("Set role", elem_id="users-set-role")
        pw_b = gr.Button("Set password", elem_id="users-set-password")
        rm_b = gr.Button("Remove user", variant="stop", elem_id="users-remove")
    notice = gr.Textbox(label="", interactive=False, show_label=False, elem_id="users-notice")

    def me() -> str:
        return access.user_of(current_request()) or "studio"

    @user_errors
    def on_list():
        return users_rows(access)

    @user_errors
    def on_add(n, r, pw):
        u = access.users.add(n, r, pw or None, by=me())
        return users_rows(access), f"Added {u.name} ({u.role}, signs in with {u.sign_in}).", ""

    @user_errors
    def on_role(n, r):
        if (n or "").strip().lower() == me().lower() and r != ADMIN:
            raise gr.Error("You cannot demote yourself: ask another admin.")
        u = access.users.set_role(n, r)
        return users_rows(access), f"{u.name} is now {u.role}."

    @user_errors
    def on_password(n, pw):
        u = access.users.set_password(n, pw or None)
        return users_rows(access), f"{u.name} now signs in with {u.sign_in}.", ""

    @user_errors
    def on_remove(n):
        if (n or "").strip().lower() == me().lower():
            raise gr.Error("You cannot remove yourself: ask another admin.")
        access.users.remove(n)
        return users_rows(access), f"Removed {(n or '').strip()}."

    gr.Markdown(f"**Failed sign-ins.** An account locks after {LOCK_AFTER} wrong passwords in a row (for a minute, "
                "doubling with each further failure, at most an hour); unlocking, a new password or a successful "
                "sign-in clears it. Shell: `python -m medart_core users list|unlock NAME`.")
    locked = gr.Dataframe(headers=LOCK_COLUMNS, datatype="str", interactive=False, elem_id="users-locked")
    unlock_b = gr.Button("Unlock user", elem_id="users-unlock", size="sm")

    @user_errors
    def on_locked():
        return lockout_rows(access)

    @user_errors
    def on_unlock(n):
        from medart_core.errors import NotFoundError

        name = access.users.canonical(n)
        if name is None:
            raise NotFoundError(f"No user named {(n or '').strip()!r}.")
        done = access.users.clear_failures(name)
        return lockout_rows(access), f"Unlocked {name}." if done else f"{name} was not locked."

    root = gr.context.Context.root_block
    if root is not None:
        root.load(on_list, None, table, api_name="users_list", show_progress="hidden")
        root.load(on_locked, None, locked, api_name="users_locked", show_progress="hidden")
    unlock_b.click(on_unlock, name, [locked, notice], api_name="users_unlock")
    add_b.click(on_add, [name, role, password], [table, notice, password], api_name="users_add")
    role_b.click(on_role, [name, role], [table, notice], api_name="users_set_role")
    pw_b.click(on_password, [name, password], [table, notice, password], api_name="users_set_password")
    rm_b.click(on_remove, name, [table, notice], api_name="users_remove")

    from .executors_panel import build_executors_panel

    build_executors_panel(ctx)       # admin too: adding or removing where jobs run (the tab's role guards it)
