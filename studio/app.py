"""The studio's shell: one Blocks app with a tab per task, listed in :data:`TABS`.

Each tab lives in its own module and calls the library. A tab is one line of :data:`TABS`; its module
may also define ``HEAD_JS`` (a script for the page ``<head>``) and ``LAUNCH_CSS``, which
:func:`launch_kwargs` hands to Gradio at launch time (Gradio 6 takes CSS/JS there, not in ``Blocks``).
"""
from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import gradio as gr

from .context import StudioContext

log = logging.getLogger("medart.studio")

CSS = """
#ds-banner p {margin: 0.2em 0;}
.medart-random {color: #b45309; font-weight: 600;}
"""


@dataclass(frozen=True)
class TabSpec:
    """One tab: its label, its id (``gr.Tab(id=...)``) and ``"module:builder"``, the function that lays it out
    inside the current ``gr.Tab`` given the :class:`StudioContext`."""

    label: str
    id: str
    builder: str

    def module(self) -> ModuleType:
        return importlib.import_module(self.builder.partition(":")[0])

    def build_fn(self) -> Callable[[StudioContext], Any]:
        return getattr(self.module(), self.builder.partition(":")[2])


TABS: list[TabSpec] = [
    TabSpec("Dataset", "dataset", "studio.dataset_tab:build_dataset_tab"),
    TabSpec("Captions", "captions", "studio.caption_tab:build_caption_tab"),
    TabSpec("Fine-tune", "finetune", "studio.finetune_tab:build_finetune_tab"),
]


def build_app(ctx: StudioContext) -> gr.Blocks:
    with gr.Blocks(title="Med-Art Studio", analytics_enabled=False) as demo:
        gr.Markdown("# Med-Art Studio\nCaption, fine-tune, generate and evaluate medical text-to-image models "
                    "(PixArt-α + HLDF). Research use only — not for diagnosis.")
        with gr.Tabs():
            for tab in TABS:
                with gr.Tab(tab.label, id=tab.id):
                    tab.build_fn()(ctx)
    return demo


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
