"""Start Med-Art Studio: ``python app.py [--host H] [--port P] [--workspace DIR] [--backbone SPEC]``.

Works offline on the embedded demo backbone (``demo``, trained on the 213 sample images; ``tiny`` when a
build lacks it); point ``--backbone`` (or ``MEDART_BACKBONE``) at a Hub id or a local diffusers folder for
real weights. On a GPU Space the default is PixArt-XL-2-512 (``medart_core.spaces.default_backbone``).
With ``MEDART_DURABLE_DIR`` set (a mounted storage bucket), the workspace is restored from it at start.

Sign-in: with users in ``W/users.sqlite`` (``python -m medart_core users add NAME --role admin``) every page
and API call needs a password sign-in; on a Hugging Face Space, the Hugging Face login button (admins from
the ``MEDART_ADMINS`` secret). With no users the studio runs open, and then only on a loopback interface
unless ``--allow-open`` says otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Med-Art Studio (Gradio)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="interface to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for Spaces)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                   help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--workspace", default=None, help="workspace folder (default: $MEDART_HOME or ./workspace)")
    p.add_argument("--backbone", default=os.environ.get("MEDART_BACKBONE") or None,
                   help="demo (offline, the default off Spaces), tiny, a Hub id such as "
                        "PixArt-alpha/PixArt-XL-2-512x512, or a folder")
    p.add_argument("--no-sample", action="store_true", help="do not build the sample dataset on first start")
    p.add_argument("--allow-open", action="store_true",
                   help="serve without sign-in on a non-loopback interface (anyone who reaches it acts as admin)")
    p.add_argument("--max-upload-mb", type=int, default=None, help="largest uploaded file, in MB (default 50)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a host name the studio answers to besides the bound address (repeatable; also "
                        "$MEDART_ALLOWED_HOSTS, comma-separated); listing any turns the Host check on in every mode")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="URL",
                   help="another origin whose pages may call the studio with the user's cookie, e.g. "
                        "https://portal.example.org (repeatable; also $MEDART_ALLOWED_ORIGINS)")
    p.add_argument("--cookie-samesite", choices=("lax", "strict"), default=None,
                   help="the sign-in cookie's SameSite (default lax; also $MEDART_COOKIE_SAMESITE)")
    p.add_argument("--session-idle-minutes", type=float, default=None,
                   help="a session without a request for this long ends (default 480; $MEDART_SESSION_IDLE_MINUTES)")
    p.add_argument("--session-max-hours", type=float, default=None,
                   help="no session lasts longer than this (default 24; $MEDART_SESSION_MAX_HOURS)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = parse_args(argv)

    from medart_core.workspace import Workspace
    from studio.auth import Access, is_loopback

    from medart_core import spaces
    from medart_core.errors import MedArtError
    from medart_core.startup import prepare_workspace

    ws = Workspace.open(args.workspace)
    try:
        restored = prepare_workspace(ws)   # a no-op unless MEDART_DURABLE_DIR is set
    except MedArtError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if restored.enabled:
        print(restored.summary(), flush=True)
    access = Access.for_workspace(ws, host=args.host)
    if not access.enabled and not is_loopback(args.host) and not args.allow_open:
        print(f"error: refusing to serve on {args.host} without sign-in (no users in {access.users.path}): add one "
              "with `python -m medart_core users add NAME --role admin`, listen on 127.0.0.1, or pass --allow-open "
              "to let anyone who reaches the port act as admin", file=sys.stderr, flush=True)
        return 2
    env = spaces.environment(ws.root)
    if args.backbone is None:
        args.backbone = spaces.default_backbone(env)

    from medart_core.captions import CaptionStore
    from studio.gate import GatePolicy

    try:
        policy = GatePolicy.for_serving(args.host, access.mode, hosts=args.allowed_host, origins=args.allowed_origin,
                                        samesite=args.cookie_samesite, idle_minutes=args.session_idle_minutes,
                                        max_hours=args.session_max_hours)
    except MedArtError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    from studio.app import MAX_UPLOAD_MB, build_app, configure_queue, serve_kwargs, start_background_sample_build
    from studio.context import StudioContext

    ctx = StudioContext(ws=ws, store=CaptionStore.for_workspace(ws), backbone_spec=args.backbone, access=access,
                        environment=spaces.banner_text(env))
    if not args.no_sample:
        start_background_sample_build(ctx)
    demo = configure_queue(build_app(ctx))
    _, local_url, _ = demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                                  footer_links=["api"],
                                  **serve_kwargs(ctx, max_upload_mb=args.max_upload_mb or MAX_UPLOAD_MB,
                                                 policy=policy))
    ctx.warm_up()
    print(f"Med-Art Studio running at {local_url}  (workspace {ws.root}, backbone {ctx.backbone_label()})",
          flush=True)
    print(_sign_in_line(access), flush=True)
    print(spaces.banner_text(env), flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        _say_supervisor(ws)
    return 0


def _say_supervisor(ws) -> None:
    """The job supervisor is a process of its own (jobs survive a studio restart): say that it keeps running."""
    from medart_core.jobs import supervisor_pid

    pid = supervisor_pid(ws)
    if pid is not None:
        print(f"The job supervisor (pid {pid}) keeps running this workspace's jobs after the studio stops; "
              f"when no job needs it (`python -m medart_core jobs list`), stop it with `kill {pid}`.", flush=True)


def _sign_in_line(access) -> str:
    if access.mode == "oauth":
        return (f"Sign-in: Hugging Face OAuth; admins seeded from MEDART_ADMINS: {', '.join(access.seeded) or 'none'}"
                f" ({access.users.count()} users in {access.users.path})")
    if access.mode == "password":
        users = access.users.list()
        line = f"Sign-in: password, {len(users)} user(s) in {access.users.path}"
        if not any(u.has_password for u in users):
            line += " -- warning: none has a password; set one with `python -m medart_core users passwd NAME`"
        return line
    return ("Sign-in: none (open mode): no users configured, so everyone who can reach this server is effectively "
            "an admin; `python -m medart_core users add NAME --role admin` turns sign-in on")


if __name__ == "__main__":
    sys.exit(main())
