"""The studio's shell: one Blocks app with a tab per task, listed in :data:`TABS`.

Each tab lives in its own module and calls the library. A tab is one line of :data:`TABS`, with the role
its handlers need (``medart_core.accounts``); its module may also define ``HEAD_JS`` (a script for the page
``<head>``) and ``LAUNCH_CSS``, which :func:`launch_kwargs` hands to Gradio at launch time (Gradio 6 takes
CSS/JS there, not in ``Blocks``).

Access control happens here, once for every tab: after a tab is built, ``studio.auth.protect`` wraps each
function it registered with a server-side role check (the tab's role, or the one a handler declared with
``studio.auth.requires``). :func:`serve_kwargs` is the rest of the serving policy: sign-in, the paths the
file route may serve, upload and pixel limits.
"""
from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import gradio as gr

from medart_core.accounts import ADMIN, ANNOTATOR, TRAINER

from .auth import SIGNED_IN, FileRouteGuard, ServeRules, lock_notice, protect, requires, session_markdown, \
    workspace_blocked_paths
from .context import StudioContext
from .gate import Gate, GateParts, GatePolicy, Sessions

log = logging.getLogger("medart.studio")

CSS = """
#ds-banner p {margin: 0.2em 0;}
.medart-random {color: #b45309; font-weight: 600;}
#medart-session p {margin: 0.2em 0;}
.medart-lock {background: #f59e0b22; border-left: 4px solid #d97706; padding: 0.2em 0.6em;}
"""

MAX_UPLOAD_MB = 50          # per file, on Gradio's upload route (HTTP 413 above it)
QUEUE_MAX_SIZE = 256        # events waiting in the queue at once; more are refused ("queue full")
DEFAULT_CONCURRENCY = 8     # per event, unless the event sets its own (expensive ones set 1; see serve_kwargs)


@dataclass(frozen=True)
class TabSpec:
    """One tab: its label, its id (``gr.Tab(id=...)``), ``"module:builder"`` (the function that lays it out
    inside the current ``gr.Tab`` given the :class:`StudioContext`), the role its handlers need, and roles for
    single endpoints that differ from it (by ``api_name`` or, for ``api_name=False`` events, function name;
    a ``@requires`` on the handler wins over both)."""

    label: str
    id: str
    builder: str
    role: str = ADMIN
    api_roles: dict[str, str] = field(default_factory=dict)

    def module(self) -> ModuleType:
        return importlib.import_module(self.builder.partition(":")[0])

    def build_fn(self) -> Callable[[StudioContext], Any]:
        return getattr(self.module(), self.builder.partition(":")[2])


TABS: list[TabSpec] = [
    TabSpec("Dataset", "dataset", "studio.dataset_tab:build_dataset_tab", role=ANNOTATOR),
    TabSpec("Captions", "captions", "studio.caption_tab:build_caption_tab", role=ANNOTATOR),
    TabSpec("Fine-tune", "finetune", "studio.finetune_tab:build_finetune_tab", role=TRAINER),
    TabSpec("Generate", "generate", "studio.generate_tab:build_generate_tab", role=TRAINER),
    TabSpec("Compare", "compare", "studio.compare_tab:build_compare_tab", role=TRAINER),
    TabSpec("Users", "users", "studio.auth:build_users_tab", role=ADMIN),
]


def build_app(ctx: StudioContext) -> gr.Blocks:
    access = ctx.access
    with gr.Blocks(title="Med-Art Studio", analytics_enabled=False) as demo:
        with gr.Row(equal_height=True):
            gr.Markdown("# Med-Art Studio\nCaption, fine-tune, generate and evaluate medical text-to-image models "
                        "(PixArt-α + HLDF). Research use only — not for diagnosis.")
            with gr.Column(scale=0, min_width=220):
                if access.mode == "oauth":
                    gr.LoginButton()
                elif access.mode == "password":
                    gr.Button("Log out", link="/logout", size="sm", elem_id="medart-logout")
        session = gr.Markdown(session_markdown(access, None), elem_id="medart-session")
        locks = []
        roles: dict[int, str] = {}
        tab_fns: dict[str, set[int]] = {}
        with gr.Tabs():
            for tab in TABS:
                before = set(demo.fns)
                with gr.Tab(tab.label, id=tab.id):
                    locks.append(gr.Markdown(visible=False, elem_classes=["medart-lock"], elem_id=f"lock-{tab.id}"))
                    tab.build_fn()(ctx)
                tab_fns[tab.id] = set(demo.fns) - before
                roles.update(protect(demo, access, tab_fns[tab.id], tab.role, tab.api_roles))

        controls = _role_controls(demo, roles)

        @requires(SIGNED_IN)
        def on_session():
            from .auth import current_request

            request = current_request()
            notes = [lock_notice(access, request, t.label, t.role, _partial_roles(demo, roles, t, tab_fns[t.id]))
                     for t in TABS]
            off = [gr.skip() if any(access.may(request, r) for r in needs) else
                   (gr.Timer(active=False) if isinstance(c, gr.Timer) else gr.Button(interactive=False))
                   for c, needs in controls]
            return (session_markdown(access, request), *(gr.Markdown(value=n, visible=bool(n)) for n in notes), *off)

        before = set(demo.fns)
        demo.load(on_session, None, [session, *locks, *(c for c, _ in controls)], api_name=False,
                  show_progress="hidden", queue=False)
        # Anything registered outside a tab needs admin unless it says otherwise (fail closed).
        roles.update(protect(demo, access, set(demo.fns) - before, ADMIN))
    demo.medart_roles = roles          # {fn id: role}: read by tests and the hostile-request suite
    return demo


def _role_controls(demo: gr.Blocks, roles: dict[int, str]) -> list[tuple[Any, set[str]]]:
    """Buttons and timers with the roles of the events they fire: the page disables a button (and stops a
    timer) whose every event the signed-in user would be refused. Only a courtesy: the server checks anyway."""
    by_block: dict[int, set[str]] = {}
    for i, bf in demo.fns.items():
        for target in bf.targets or []:
            if i in roles and isinstance(target, (tuple, list)) and len(target) > 1 and target[1] in ("click", "tick"):
                by_block.setdefault(target[0], set()).add(roles[i])
    out = []
    for block_id, needs in sorted(by_block.items()):
        block = demo.blocks.get(block_id)
        if isinstance(block, (gr.Button, gr.Timer)) and not isinstance(block, gr.LoginButton):
            out.append((block, needs))
    return out


def _partial_roles(demo: gr.Blocks, roles: dict[int, str], tab: TabSpec, fn_ids: set[int]) -> set[str]:
    """Roles below the tab's own that some of its endpoints need (e.g. blind review inside Compare)."""
    from medart_core.accounts import role_rank

    return {roles[i] for i in fn_ids if i in roles and 0 < role_rank(roles[i]) < role_rank(tab.role)}


def launch_kwargs() -> dict[str, Any]:
    """CSS/JS that Gradio 6 takes at launch time: the shell's CSS plus what each tab module contributes."""
    css, heads = [CSS], []
    for tab in TABS:
        mod = tab.module()
        js = getattr(mod, "HEAD_JS", None)
        if js:
            heads.append(js if js.lstrip().startswith("<script") else f"<script>{js}</script>")
        extra = getattr(mod, "LAUNCH_CSS", None)
        if extra:
            css.append(extra)
    return {"css": "\n".join(css), "head": "\n".join(heads) or None}


def configure_queue(demo: gr.Blocks) -> gr.Blocks:
    return demo.queue(default_concurrency_limit=DEFAULT_CONCURRENCY, max_size=QUEUE_MAX_SIZE)


def serve_kwargs(ctx: StudioContext, *, max_upload_mb: int = MAX_UPLOAD_MB, host: str | None = None,
                 policy: "GatePolicy | None" = None) -> dict[str, Any]:
    """Everything ``demo.launch`` needs besides host and port: sign-in, served/blocked paths, limits.

    * ``auth``: the users table's bcrypt check in password mode (OAuth on a Space is the login button);
    * ``allowed_paths``: the datasets and samples folders (the Captions/Generate tabs also add them as static
      paths);
      ``blocked_paths``: the rest of the workspace; the :class:`~studio.auth.FileRouteGuard` middleware refuses
      any other file, and any file to a user whose role may not see it;
    * ``max_file_size``: per uploaded file; Pillow's pixel limit is set to the import's own
      (``medart_core.data.MAX_PIXELS``) for any image Gradio decodes;
    * ``run_history=False``: Gradio would otherwise keep every call's inputs and outputs in the browser (and
      offer to push them to a Hub bucket): patient images do not go there;
    * ``show_error=False``: an unexpected exception (a bug) reaches the user as Gradio's generic "Error", not
      as its text (paths, SQL); messages meant for users are ``gr.Error``s and are shown anyway;
    * the :class:`~studio.gate.Gate` middleware first (hosts, origins, sessions, body limits, sign-in; its
      policy from ``policy`` or :meth:`~studio.gate.GatePolicy.for_serving` for ``host``), kept on
      ``ctx.gate``.
    """
    from PIL import Image

    from medart_core.data import MAX_PIXELS

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS      # Pillow refuses outright above twice this (decompression bombs)
    access, ws = ctx.access, ctx.ws
    rules = ServeRules.for_workspace(ws, gradio_dirs=[_gradio_cache()])
    policy = policy or GatePolicy.for_serving(host or access.host, access.mode)
    ctx.gate = GateParts(policy, Sessions(access, policy))
    kw: dict[str, Any] = {
        "allowed_paths": [str(ws.datasets_dir), str(ws.samples_dir)],
        "blocked_paths": workspace_blocked_paths(ws),
        "max_file_size": f"{int(max_upload_mb)}mb",
        "app_kwargs": {"middleware": [
            _middleware(Gate, access=access, policy=policy, sessions=ctx.gate.sessions, throttle=ctx.gate.throttle),
            _middleware(FileRouteGuard, access=access, rules=rules)]},
        "run_history": False,
        "show_error": False,
        **launch_kwargs(),
    }
    if access.mode == "password":
        kw["auth"] = access.authenticate
        kw["auth_message"] = ("Med-Art Studio: sign in with the account an admin made for you "
                              "(python -m medart_core users add NAME --role ROLE).")
    return kw


def _gradio_cache() -> str:
    from gradio import utils

    return str(utils.get_cache_folder())


def _middleware(cls: type, **kwargs: Any) -> Any:
    from starlette.middleware import Middleware

    return Middleware(cls, **kwargs)


def start_background_sample_build(ctx: StudioContext) -> threading.Thread | None:
    """On first start with an empty workspace, build the sample dataset without delaying the first page."""
    if ctx.store.list_datasets():
        return None

    def work():
        from medart_core.data import build_sample_dataset

        try:
            build_sample_dataset(ctx.ws, ctx.store, "sample")
            ctx.status["sample"] = "ready"
        except Exception as e:  # shown in the Dataset tab's banner; the studio stays usable
            log.exception("sample dataset build failed")
            ctx.status["sample"] = f"error:{e}"

    ctx.status["sample"] = "building"
    t = threading.Thread(target=work, name="sample-build", daemon=True)
    t.start()
    return t
