"""Start Med-Art Studio: ``python app.py [--host H] [--port P] [--workspace DIR] [--backbone SPEC]``.

Works offline on the embedded random-weight demo backbone (``tiny``); point ``--backbone`` (or
``MEDART_BACKBONE``) at a Hub id or a local diffusers folder for real weights.
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
    p.add_argument("--backbone", default=os.environ.get("MEDART_BACKBONE", "tiny"),
                   help="tiny (offline demo), a Hub id such as PixArt-alpha/PixArt-XL-2-512x512, or a folder")
    p.add_argument("--no-sample", action="store_true", help="do not build the sample dataset on first start")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = parse_args(argv)

    from medart_core.captions import CaptionStore
    from medart_core.workspace import Workspace
    from studio.app import build_app, launch_kwargs, start_background_sample_build
    from studio.context import StudioContext

    ws = Workspace.open(args.workspace)
    ctx = StudioContext(ws=ws, store=CaptionStore.for_workspace(ws), backbone_spec=args.backbone)
    if not args.no_sample:
        start_background_sample_build(ctx)
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=8)
    _, local_url, _ = demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(ws.datasets_dir)],
                                  prevent_thread_lock=True, quiet=True, show_error=True, footer_links=["api"],
                                  **launch_kwargs())
    print(f"Med-Art Studio running at {local_url}  (workspace {ws.root}, backbone {ctx.backbone_label()})",
          flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()


if __name__ == "__main__":
    sys.exit(main())
