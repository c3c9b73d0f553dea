"""The studio's shell: one Blocks app with a tab per task. Tabs live in their own modules and call the library."""
from __future__ import annotations

import logging
import threading
from typing import Any

import gradio as gr

from .context import StudioContext
from .dataset_tab import build_dataset_tab

log = logging.getLogger("medart.studio")

CSS = """
#ds-banner p {margin: 0.2em 0;}
.medart-random {color: #b45309; font-weight: 600;}
"""


def _optional_tab(module: str, builder: str):
    """A tab whose module is optional in this build; the shell runs without it."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None, None
        raise
    return getattr(mod, builder), mod


def build_app(ctx: StudioContext) -> gr.Blocks:
    with gr.Blocks(title="Med-Art Studio", analytics_enabled=False) as demo:
        gr.Markdown("# Med-Art Studio\nCaption, fine-tune, generate and evaluate medical text-to-image models "
                    "(PixArt-α + HLDF). Research use only — not for diagnosis.")
        with gr.Tabs():
            with gr.Tab("Dataset", id="dataset"):
                build_dataset_tab(ctx)
            build_caption_tab, _ = _optional_tab("studio.caption_tab", "build_caption_tab")
            if build_caption_tab is not None:
                with gr.Tab("Captions", id="captions"):
                    build_caption_tab(ctx)
    return demo


def launch_kwargs() -> dict[str, Any]:
    """CSS/JS that Gradio 6 takes at launch time (keyboard shortcuts of the caption tab among them)."""
    head = ""
    _, mod = _optional_tab("studio.caption_tab", "build_caption_tab")
    js = getattr(mod, "KEYBOARD_JS", None) if mod is not None else None
    if js:
        head = js if js.lstrip().startswith("<script") else f"<script>{js}</script>"
    return {"css": CSS, "head": head or None}


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
