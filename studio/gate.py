"""The HTTP and session layer in front of Gradio: which hosts and origins may talk to the studio, how big a
request body may be, and what a sign-in session is worth.

Gradio 6.31 wraps its app in its own CORS middleware (``gradio.route_utils.CustomCORSMiddleware``, added by
``App.create_app`` *outside* the middleware a launch passes in): for any ``Host`` but localhost it reflects
any ``Origin`` with ``Access-Control-Allow-Credentials: true``, and its ``/login`` sets the session cookie
``SameSite=None``. So a page on another site could read a signed-in user's token and drive the queue. We cannot
put anything outside that middleware, so :class:`Gate` (the first of ``serve_kwargs``' middleware, just inside
it) refuses every request whose ``Origin`` is not allowed before it reaches a route: whatever headers the CORS
layer adds to a refusal, the body says only "refused", and nothing ran. Preflights are answered by Gradio's
middleware and never reach us; the request they precede is refused here.

What :class:`Gate` does, in order, for every HTTP request (and WebSocket handshake):

1. **Host** (:attr:`GatePolicy.allowed_hosts`): in open mode always, otherwise when the operator lists hosts,
   a request whose ``Host`` is not the bound address or a listed name is refused (421): DNS rebinding cannot
   make a web page the operator visits drive an open studio.
2. **Origin**: a browser's ``Origin`` must be this server's own (same host and port as ``Host``) or one the
   operator allowed; a state-changing request marked ``Sec-Fetch-Site: cross-site`` is refused too.
3. **Sessions** (password mode): the session cookie's token must be one :class:`Sessions` issued, not idle
   longer than ``idle_s``, younger than ``max_age_s``, and issued to the user as they are now (any change to
   the user — password, role, removal, re-creation under the same name — changes their stamp, see
   ``medart_core.accounts``). Otherwise the token is dropped from Gradio's table: the request goes on as
   signed out, so every route, the file route included, follows the same rule.
4. **Bodies**: at most ``anon_body_bytes`` before sign-in and ``body_bytes`` after it, read (and refused
   with 413) before any route parses them; uploads keep Gradio's own per-file limit, and each user may upload
   ``upload_bytes_per_hour`` in a sliding hour (429 above it).
5. **Sign-in and sign-out** (password mode) are ours, not Gradio's: the name is canonicalised (one identity
   per account, whatever case was typed), bcrypt runs in a worker thread (never on the event loop), failures
   are logged and back off per account (``accounts.LOCK_AFTER``) and per client, the cookie is
   ``SameSite=Lax`` (or ``Strict``) and ``Secure`` over HTTPS. ``/logout`` refuses cross-site requests.
6. **Before sign-in**, POSTs other than ``/login`` are refused (401), and the login page carries no API
   schema (``window.gradio_api_info`` is emptied): nothing about the workspace reaches an anonymous visitor.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urlsplit

from medart_core.accounts import Lockout, lock_until

from .auth import Access, is_loopback

log = logging.getLogger("medart.gate")

LOGIN_PATHS = ("/login", "/login/")
LOGOUT_PATHS = ("/logout", "/logout/")
UPLOAD_SUFFIX = "/gradio_api/upload"
HEARTBEAT_PREFIX = "/gradio_api/heartbeat"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAMESITE = ("lax", "strict")
ANON_BODY_BYTES = 64 * 1024                 # a sign-in form is a few hundred bytes
BODY_BYTES = 16 * 1024 * 1024               # event payloads carry text and file references, not files
IDLE_MINUTES = 8 * 60                       # a working day without a click ends the session
MAX_HOURS = 24                              # and no session outlives a day
UPLOAD_MB_PER_HOUR = 4096                   # per signed-in user: a sliding hour of upload bodies
CLIENT_FAILURES = 20                        # failed sign-ins from one client address within CLIENT_WINDOW_S ...
CLIENT_WINDOW_S = 600.0                     # ... make it wait until the oldest of them is that old
ENV_HOSTS, ENV_ORIGINS = "MEDART_ALLOWED_HOSTS", "MEDART_ALLOWED_ORIGINS"
ENV_UPLOAD = "MEDART_UPLOAD_MB_PER_HOUR"
ENV_SAMESITE, ENV_IDLE, ENV_MAX = "MEDART_COOKIE_SAMESITE", "MEDART_SESSION_IDLE_MINUTES", "MEDART_SESSION_MAX_HOURS"
_API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.S)
_EMPTY_API_INFO = b'window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>'


def _split_list(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").replace(";", ",").split(",") if x.strip()]


def host_name(value: str | None) -> str:
    """``"Example.org:7860"`` -> ``"example.org"``; ``"[::1]:7860"`` -> ``"::1"``; "" for nonsense."""
    v = (value or "").strip()
    if not v or any(c in v for c in "@/#?\\ "):
        return ""                # userinfo, paths and fragments are no part of a Host
    try:
        return (urlsplit("//" + v).hostname or "").lower()
    except ValueError:
        return ""


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL or origin, lower-cased (the form browsers send in ``Origin``)."""
    try:
        u = urlsplit(url.strip())
    except ValueError:
        return ""
    if not u.scheme or not u.netloc:
        return ""
    return f"{u.scheme.lower()}://{u.netloc.lower()}"


@dataclass(frozen=True)
class GatePolicy:
    """Who may talk to the studio over HTTP, and for how long a sign-in lasts. Made by :meth:`for_serving`
    from the bound address, the operator's lists (flags or ``MEDART_ALLOWED_HOSTS``/``MEDART_ALLOWED_ORIGINS``)
    and the Space's own domain (``SPACE_HOST``)."""

    allowed_hosts: frozenset[str] = frozenset()   # host names; checked only when enforce_hosts
    enforce_hosts: bool = False
    allowed_origins: frozenset[str] = frozenset()  # extra origins besides the server's own
    samesite: str = "lax"
    idle_s: float = IDLE_MINUTES * 60.0
    max_age_s: float = MAX_HOURS * 3600.0
    anon_body_bytes: int = ANON_BODY_BYTES
    body_bytes: int = BODY_BYTES
    client_failures: int = CLIENT_FAILURES
    client_window_s: float = CLIENT_WINDOW_S
    upload_bytes_per_hour: int = UPLOAD_MB_PER_HOUR * 1024 * 1024

    @classmethod
    def for_serving(cls, bind: str, mode: str, *, hosts: Iterable[str] = (), origins: Iterable[str] = (),
                    samesite: str | None = None, idle_minutes: float | None = None,
                    max_hours: float | None = None, upload_mb_per_hour: float | None = None,
                    env: dict[str, str] | None = None) -> "GatePolicy":
        from medart_core.errors import ConfigError

        env = os.environ if env is None else env
        listed = {host_name(h) or h.strip().lower() for h in [*hosts, *_split_list(env.get(ENV_HOSTS))]}
        listed.discard("")
        extra_origins = {origin_of(o) for o in [*origins, *_split_list(env.get(ENV_ORIGINS))]}
        if "" in extra_origins:
            raise ConfigError(f"An allowed origin must look like https://studio.example.org; got one that does not "
                              f"({ENV_ORIGINS} or --allowed-origin).")
        space_host = env.get("SPACE_HOST", "").strip().lower()
        if space_host:                           # the Space's own domain (the iframe's origin)
            listed.add(host_name(space_host))
            extra_origins.add(f"https://{space_host}")
        bound = host_name(bind) or bind.strip().lower()
        names = set(listed)
        if bound in ("0.0.0.0", "::", ""):
            names |= {"localhost", "127.0.0.1", "::1", socket.gethostname().lower(), socket.getfqdn().lower()}
        else:
            names.add(bound)
            if is_loopback(bound):
                names |= {"localhost", "127.0.0.1", "::1"}
        samesite = (samesite or env.get(ENV_SAMESITE) or "lax").strip().lower()
        if samesite not in SAMESITE:
            raise ConfigError(f"Cookie SameSite must be one of {', '.join(SAMESITE)} (got {samesite!r}); "
                              "'None' would let other sites send the session cookie.")
        idle = float(idle_minutes if idle_minutes is not None else env.get(ENV_IDLE) or IDLE_MINUTES)
        max_h = float(max_hours if max_hours is not None else env.get(ENV_MAX) or MAX_HOURS)
        if idle <= 0 or max_h <= 0:
            raise ConfigError("Session expiry must be positive (minutes idle, hours at most).")
        quota = float(upload_mb_per_hour if upload_mb_per_hour is not None
                      else env.get(ENV_UPLOAD) or UPLOAD_MB_PER_HOUR)
        return cls(frozenset(names), mode == "open" or bool(listed - {host_name(space_host)}),
                   frozenset(extra_origins), samesite, idle * 60.0, max_h * 3600.0,
                   upload_bytes_per_hour=int(quota * 1024 * 1024))

    def host_allowed(self, host_header: str | None) -> bool:
        return not self.enforce_hosts or host_name(host_header) in self.allowed_hosts

    def origin_allowed(self, origin: str, host_header: str | None, scheme: str = "http") -> bool:
        """The server's own origin (the request's scheme, and the same host and port as its ``Host``) or a
        listed one. Behind a TLS proxy the scheme comes from ``X-Forwarded-Proto``: without it, list the
        public origin (``--allowed-origin https://...``)."""
        o = origin_of(origin)
        if not o:
            return False                          # "null" (sandboxed frames, file: pages) and garbage
        if o in self.allowed_origins:
            return True
        scheme_o, netloc = o.split("://", 1)
        if scheme_o != scheme:
            return False                          # http://host is not https://host's origin
        default = {"http": 80, "https": 443}.get(scheme)
        mine, theirs = _host_port(host_header or "", default), _host_port(netloc, default)
        return mine[0] != "" and mine == theirs and self.host_allowed(host_header)


def _host_port(netloc: str, default: int | None) -> tuple[str, int | None]:
    try:
        u = urlsplit("//" + netloc.strip())
        return (u.hostname or "").lower(), u.port if u.port is not None else default
    except ValueError:
        return "", None


# =========================================================================================================
# Sessions
# =========================================================================================================
@dataclass
class Session:
    user: str
    stamp: str
    created: float
    seen: float


class Sessions:
    """The sign-in sessions this server issued: token -> (canonical user, the user's stamp then, times).
    Gradio's own token table (``App.tokens``) is kept in step: a token we drop is dropped there too."""

    def __init__(self, access: Access, policy: GatePolicy):
        self.access = access
        self.policy = policy
        self._s: dict[str, Session] = {}
        self._lock = threading.Lock()

    def issue(self, tokens: dict[str, str], user: str, stamp: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._s[token] = Session(user, stamp, now, now)
            tokens[token] = user
            self._sweep(tokens, now)
        return token

    def valid_user(self, tokens: dict[str, str], token: str | None, now: float | None = None) -> str | None:
        """The canonical user of a live session (its idle clock restarted), else None with the token dropped
        from both tables."""
        if not token:
            return None
        now = time.time() if now is None else now
        with self._lock:
            s = self._s.get(token)
        why = None
        if s is None:
            why = "not issued by this server" if token in tokens else None
        elif now - s.seen > self.policy.idle_s:
            why = "idle too long"
        elif now - s.created > self.policy.max_age_s:
            why = "too old"
        else:
            u = self.access.users.get(s.user) if self.access.users is not None else None
            if u is None:
                why = "user removed"
            elif u.stamp != s.stamp or u.name != s.user:
                why = "user changed since sign-in"
        if why is not None or s is None:
            self.end(tokens, token)
            if why and s is not None:
                log.info("session of %s ended: %s", s.user, why)
            return None
        s.seen = now
        return s.user

    def end(self, tokens: dict[str, str], token: str) -> None:
        with self._lock:
            self._s.pop(token, None)
            tokens.pop(token, None)

    def end_user(self, tokens: dict[str, str], user: str) -> int:
        with self._lock:
            mine = [t for t, s in self._s.items() if s.user == user] + [t for t, u in tokens.items() if u == user]
            for t in set(mine):
                self._s.pop(t, None)
                tokens.pop(t, None)
        return len(set(mine))

    def count(self) -> int:
        with self._lock:
            return len(self._s)

    def _sweep(self, tokens: dict[str, str], now: float) -> None:
        dead = [t for t, s in self._s.items()
                if now - s.seen > self.policy.idle_s or now - s.created > self.policy.max_age_s]
        for t in dead:
            self._s.pop(t, None)
            tokens.pop(t, None)


class ClientThrottle:
    """Failed sign-ins per client address in a sliding window (in memory; bounded)."""

    MAX_CLIENTS = 10_000

    def __init__(self, policy: GatePolicy):
        self.policy = policy
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _window(self, client: str, now: float) -> deque[float]:
        q = self._fails.setdefault(client, deque())
        while q and now - q[0] > self.policy.client_window_s:
            q.popleft()
        return q

    def wait_s(self, client: str, now: float | None = None) -> float:
        """Seconds this client must wait before its next try (0: go ahead)."""
        now = time.time() if now is None else now
        with self._lock:
            q = self._window(client, now)
            if len(q) < self.policy.client_failures:
                return 0.0
            return max(0.0, self.policy.client_window_s - (now - q[0]))

    def fail(self, client: str, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._lock:
            if len(self._fails) >= self.MAX_CLIENTS and client not in self._fails:
                self._fails.pop(next(iter(self._fails)))
            q = self._window(client, now)
            q.append(now)
            return len(q)


class UnknownNames:
    """Failed sign-ins under names that are no account, counted and locked as accounts are (in memory,
    bounded): a locked answer must not tell that a name exists."""

    MAX_NAMES = 10_000

    def __init__(self) -> None:
        self._f: dict[str, Lockout] = {}
        self._lock = threading.Lock()

    def lockout(self, name: str) -> Lockout | None:
        with self._lock:
            return self._f.get(name.strip().lower())

    def record_failure(self, name: str, now: float | None = None) -> Lockout:
        now = time.time() if now is None else now
        key = name.strip().lower()
        with self._lock:
            if len(self._f) >= self.MAX_NAMES and key not in self._f:
                self._f.pop(next(iter(self._f)))
            failures = (self._f[key].failures if key in self._f else 0) + 1
            self._f[key] = Lockout(key, failures, lock_until(failures, now), now)
            return self._f[key]


class UploadQuota:
    """Bytes each signed-in user uploaded in the last hour (in memory): one account cannot fill the disk."""

    WINDOW_S = 3600.0

    def __init__(self, policy: GatePolicy):
        self.policy = policy
        self._used: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def take(self, user: str, n: int, now: float | None = None) -> bool:
        """Count ``n`` bytes for ``user``; False (and nothing counted) when that would exceed the quota."""
        now = time.time() if now is None else now
        with self._lock:
            q = self._used.setdefault(user, deque())
            while q and now - q[0][0] > self.WINDOW_S:
                q.popleft()
            if sum(b for _, b in q) + n > self.policy.upload_bytes_per_hour:
                return False
            q.append((now, n))
            return True


# =========================================================================================================
# The middleware
# =========================================================================================================
_BCRYPT_LIMIT: Any = None


def _bcrypt_limiter() -> Any:
    """At most two bcrypt checks at once, in worker threads: a sign-in flood cannot take every thread."""
    global _BCRYPT_LIMIT
    if _BCRYPT_LIMIT is None:
        import anyio

        _BCRYPT_LIMIT = anyio.CapacityLimiter(2)
    return _BCRYPT_LIMIT


def _headers(scope: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers") or []:
        out.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    return out


def _is_https(scope: dict, headers: dict[str, str]) -> bool:
    return scope.get("scheme") in ("https", "wss") or headers.get("x-forwarded-proto", "").lower() == "https"


def _client(scope: dict) -> str:
    c = scope.get("client")
    return str(c[0]) if c else "unknown"


async def _respond(send: Any, status: int, body: bytes | str, *, content_type: str = "text/plain; charset=utf-8",
                   headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = body.encode() if isinstance(body, str) else body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode()),
                            (b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"), *headers]})
    await send({"type": "http.response.body", "body": data})


async def _json(send: Any, status: int, obj: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    await _respond(send, status, json.dumps(obj), content_type="application/json", headers=headers)


class BodyTooLarge(Exception):
    pass


async def _read_body(receive: Any, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise BodyTooLarge("client went away")
        part = msg.get("body", b"")
        size += len(part)
        if size > limit:
            raise BodyTooLarge(f"{size} > {limit}")
        chunks.append(part)
        if not msg.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def again() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


class Gate:
    """ASGI middleware: hosts, origins, sessions, body limits, sign-in and sign-out (see the module doc)."""

    def __init__(self, app: Any, access: Access, policy: GatePolicy, sessions: Sessions,
                 throttle: ClientThrottle | None = None):
        self.app = app
        self.access = access
        self.policy = policy
        self.sessions = sessions
        self.throttle = throttle or ClientThrottle(policy)
        self.quota = UploadQuota(policy)
        self.unknown = UnknownNames()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        h = _headers(scope)
        refusal = self._refusal(scope, h)
        if refusal is not None:
            log.warning("refused %s %s from %s: %s", scope.get("method", "WS"), scope.get("path"), _client(scope),
                        refusal[1])
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await _respond(send, *refusal)
            return
        if kind == "websocket":
            await self.app(scope, receive, send)
            return
        user = self._session_user(scope, h)
        path = scope.get("path") or ""
        method = scope.get("method", "GET")
        password = self.access.mode == "password"
        if password and path in LOGOUT_PATHS:
            await self._logout(scope, h, send, user)
            return
        if "transfer-encoding" in h and "content-length" in h:
            await _respond(send, 400, "Send either Content-Length or Transfer-Encoding, not both.")
            return
        upload = path.rstrip("/").endswith(UPLOAD_SUFFIX)
        if password and not user and path.startswith(HEARTBEAT_PREFIX):
            await _respond(send, 401, "Not authenticated: sign in first.")   # it can close others' events
            return
        limit = self.policy.body_bytes if user else self.policy.anon_body_bytes
        length = h.get("content-length")
        if length is not None and (not length.isdigit() or (int(length) > limit and not (upload and user))):
            await _respond(send, 413, f"Request body too large (at most {limit} bytes here).")
            return
        if upload and user and method == "POST":
            if length is None:
                await _respond(send, 411, "Uploads need a Content-Length.")
                return
            if not self.quota.take(user, int(length)):
                mb = self.policy.upload_bytes_per_hour // (1024 * 1024)
                log.warning("upload refused for %s: over the quota of %d MB per hour", user, mb)
                await _respond(send, 429, f"Upload quota reached ({mb} MB per hour per user): try again later, "
                                          f"or ask an operator to raise {ENV_UPLOAD}.")
                return
        if method not in SAFE_METHODS or length not in (None, "0"):
            if password and not user and path not in LOGIN_PATHS:
                await _respond(send, 401, "Not authenticated: sign in first.")
                return
            if not (upload and user):
                try:
                    body = await _read_body(receive, limit)
                except BodyTooLarge:
                    await _respond(send, 413, f"Request body too large (at most {limit} bytes here).")
                    return
                receive = _replay(body, receive)
        if password and path in LOGIN_PATHS and method == "POST":
            await self._login(scope, receive, send, h)
            return
        if self.access.enabled and not user and method in ("GET", "HEAD") and self._is_page(scope, path):
            await self.app(scope, receive, _strip_api_info(send))
            return
        await self.app(scope, receive, send)

    # ---- checks ----------------------------------------------------------------------------------
    def _refusal(self, scope: dict, h: dict[str, str]) -> tuple[int, str] | None:
        host = h.get("host")
        if not self.policy.host_allowed(host):
            return 421, ("Host not allowed: this studio answers only to its own address. Operators: add the name "
                         f"with --allowed-host or {ENV_HOSTS}.")
        origin = h.get("origin")
        scheme = "https" if _is_https(scope, h) else "http"
        if origin is not None and not self.policy.origin_allowed(origin, host, scheme):
            return 403, ("Cross-origin request refused. Operators: allow an origin with --allowed-origin or "
                         f"{ENV_ORIGINS}.")
        if (h.get("sec-fetch-site") == "cross-site" and scope.get("method", "GET") not in SAFE_METHODS):
            return 403, "Cross-site request refused."
        return None

    def _session_user(self, scope: dict, h: dict[str, str]) -> str | None:
        """The signed-in user of this request after the session rules (password mode); the OAuth user on a
        Space; None when signed out.

        Every session cookie of every ``Cookie`` header is checked (an invalid token is removed from Gradio's
        table), and the request's headers are rewritten to carry at most the one valid token: Gradio and the
        file route parse cookies their own way (the last of a repeated name wins there), so a stale token
        smuggled beside a valid one, or in a second header, must never reach them. Two valid tokens of
        different users: signed out."""
        if self.access.mode == "oauth":
            from .auth import _scope_user

            return _scope_user(self.access, scope)
        if self.access.mode != "password":
            return None
        app = scope.get("app")
        tokens = getattr(app, "tokens", None)
        if tokens is None:
            return None
        cookie_id = getattr(app, "cookie_id", "")
        names = (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}")
        kept_parts: list[str] = []
        found: list[tuple[str, str]] = []
        for k, v in scope.get("headers") or []:
            if k.lower() != b"cookie":
                continue
            for part in v.decode("latin-1").split(";"):
                name, sep, value = part.strip().partition("=")
                if sep and name in names:
                    found.append((name, value.strip().strip('"')))
                elif part.strip():
                    kept_parts.append(part.strip())
        if not found:
            return None
        valid = {(n, t): self.sessions.valid_user(tokens, t) for n, t in dict.fromkeys(found)}
        users = {u for u in valid.values() if u}
        user = users.pop() if len(users) == 1 else None
        if user:
            name, token = next((n, t) for (n, t), u in valid.items() if u == user)
            kept_parts.append(f"{name}={token}")
        headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() != b"cookie"]
        if kept_parts:
            headers.append((b"cookie", "; ".join(kept_parts).encode("latin-1")))
        scope["headers"] = headers
        return user

    def _is_page(self, scope: dict, path: str) -> bool:
        app = scope.get("app")
        pages = [""]
        try:
            pages = [p for p, *_ in app.get_blocks().pages] or [""]
        except Exception:
            pass
        return path.rstrip("/") in {f"/{p}".rstrip("/") for p in pages} or path in ("", "/")

    # ---- sign-in / sign-out ----------------------------------------------------------------------
    async def _login(self, scope: dict, receive: Any, send: Any, h: dict[str, str]) -> None:
        import anyio
        from starlette.requests import Request

        client = _client(scope)
        try:
            form = await Request(scope, receive).form(max_files=0, max_fields=8)
            typed = str(form.get("username") or "").strip()[:128]
            password = str(form.get("password") or "")
        except Exception:
            await _json(send, 400, {"detail": "Send a username and a password as a form."})
            return
        wait = self.throttle.wait_s(client)
        if wait > 0:
            log.warning("sign-in refused for %r from %s: client backing off (%.0f s left)", typed, client, wait)
            await _json(send, 400, {"detail": f"Too many failed sign-ins from this address: try again in "
                                              f"{int(wait) + 1} s."})
            return
        users = self.access.users
        canonical = users.canonical(typed) if users is not None else None
        lock = users.lockout(canonical) if canonical else self.unknown.lockout(typed)
        if lock is not None and lock.locked():
            log.warning("sign-in refused for %r from %s: %s locked after %d failures (until %s)", typed, client,
                        "account" if canonical else "unknown name", lock.failures,
                        time.strftime("%H:%M:%SZ", time.gmtime(lock.locked_until)))
            # The same words for unknown names (they lock the same way): the answer tells no name exists.
            await _json(send, 400, {"detail": f"Too many failed sign-ins for this name: try again in "
                                              f"{int(lock.locked_until - time.time()) + 1} s, or ask an admin to "
                                              "unlock it (Users tab, or python -m medart_core users unlock NAME)."})
            return
        ok = await anyio.to_thread.run_sync(self.access.authenticate, canonical or typed, password,
                                            limiter=_bcrypt_limiter())
        if not ok:
            n_client = self.throttle.fail(client)
            lk = await anyio.to_thread.run_sync(users.record_failure, typed) if users is not None and canonical \
                else self.unknown.record_failure(typed)
            log.warning("sign-in failed for %r from %s (%s; %d from this address in %d s)", typed, client,
                        ("" if canonical else "no such account, ") + f"{lk.failures} in a row" +
                        (", now locked" if lk.locked() else ""), n_client, int(self.policy.client_window_s))
            await _json(send, 400, {"detail": "Incorrect credentials."})
            return
        u = users.get(canonical)
        users.clear_failures(u.name)
        app = scope["app"]
        token = self.sessions.issue(app.tokens, u.name, u.stamp)
        log.info("%s signed in from %s", u.name, client)
        await _json(send, 200, {"success": True}, headers=self._set_cookies(app, token, _is_https(scope, h)))

    def _set_cookies(self, app: Any, token: str, https: bool) -> list[tuple[bytes, bytes]]:
        from http.cookies import SimpleCookie

        jar: SimpleCookie = SimpleCookie()
        name = f"access-token-{app.cookie_id}" if https else f"access-token-unsecure-{app.cookie_id}"
        jar[name] = token
        jar[name]["httponly"] = True
        jar[name]["samesite"] = self.policy.samesite.capitalize()
        jar[name]["path"] = "/"
        jar[name]["max-age"] = str(int(self.policy.max_age_s))
        if https:
            jar[name]["secure"] = True
        return [(b"set-cookie", jar[name].OutputString().encode("latin-1"))]

    async def _logout(self, scope: dict, h: dict[str, str], send: Any, user: str | None) -> None:
        if h.get("sec-fetch-site") == "cross-site":
            await _respond(send, 403, "Cross-site sign-out refused.")
            return
        app = scope["app"]
        if user:
            n = self.sessions.end_user(app.tokens, user)
            log.info("%s signed out (%d session(s) ended)", user, n)
        expired = []
        for name in (f"access-token-{app.cookie_id}", f"access-token-unsecure-{app.cookie_id}"):
            expired.append((b"set-cookie", f"{name}=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax".encode()))
        await _respond(send, 302, "", headers=[(b"location", b"./"), *expired])


def _strip_api_info(send: Any) -> Any:
    """A ``send`` that buffers an HTML page and replaces its embedded API schema with an empty one."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def wrapped(msg: dict) -> None:
        nonlocal start
        if msg["type"] == "http.response.start":
            start = msg
            return
        if msg["type"] != "http.response.body" or start is None:
            await send(msg)
            return
        chunks.append(msg.get("body", b""))
        if msg.get("more_body"):
            return
        body = b"".join(chunks)
        ctype = dict((k.lower(), v) for k, v in start.get("headers") or []).get(b"content-type", b"")
        if b"text/html" in ctype:
            body = _API_INFO.sub(lambda _: _EMPTY_API_INFO, body)
        headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


@dataclass
class GateParts:
    """What ``serve_kwargs`` makes once per server: the policy and the session table (tests read both)."""

    policy: GatePolicy
    sessions: Sessions
    throttle: ClientThrottle = field(init=False)

    def __post_init__(self) -> None:
        self.throttle = ClientThrottle(self.policy)
