"""Dataset tab: pick a dataset, page through its images, see one image with class, provenance and caption.

Only the current page's thumbnails go to the browser (``PAGE_SIZE`` at a time), so an 8,000-image dataset
costs the same to browse as a 24-image one. Every event handler goes through ``studio.errors.user_errors``:
a library error (unknown dataset, bad import) is shown as a ``gr.Error`` message, not a traceback.

Browsing needs the annotator role (the tab's, in ``studio.app.TABS``); importing needs admin (``@requires``).
Dataset names and class labels are restricted to a safe alphabet by the library, so they never carry markup;
anything else from outside (an error text, the workspace path) is escaped before it reaches Markdown.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import gradio as gr

from medart_core.accounts import ADMIN
from medart_core.errors import ConfigError

from .auth import requires
from .context import StudioContext
from .errors import user_errors
from .forms import bind, inputs_of

PAGE_SIZE = 24
ALL_CLASSES = "(all classes)"


# ---- handlers: plain functions of (ctx, inputs) so tests and benchmarks call them directly -------------

def dataset_choices(ctx: StudioContext) -> list[str]:
    return [d.name for d in ctx.store.list_datasets()]


def workspace_banner(ctx: StudioContext) -> str:
    build = ctx.status.get("sample")
    from .auth import current_request

    # The absolute path says where patient data lives on the server: admins only.
    where = (f"**Workspace** `{html.escape(str(ctx.ws.root))}` · " if ctx.access.may(current_request(), ADMIN)
             else "")
    lines = [f"{where}**Backbone** {html.escape(ctx.backbone_label())}",
             html.escape(ctx.environment_line())]
    if build == "building":
        lines.append("⏳ Building the sample dataset from images shipped in pip packages (first start only)…")
    elif isinstance(build, str) and build.startswith("error"):
        lines.append(f"⚠️ Sample dataset could not be built: {html.escape(build[6:])}")
    return "\n\n".join(lines)


def class_choices(ctx: StudioContext, dataset: str | None) -> list[str]:
    if not dataset:
        return [ALL_CLASSES]
    return [ALL_CLASSES] + list(ctx.store.labels(dataset))


def page_view(ctx: StudioContext, dataset: str | None, label: str | None, page: int | float | None
              ) -> tuple[list[tuple[str, str]], list[int], str, int]:
    """Thumbnails (path, caption) and image ids of one page, a summary line, and the clamped page number."""
    if not dataset:
        return [], [], "No dataset yet: build the sample dataset or import images.", 1
    lab = None if not label or label == ALL_CLASSES else label
    total = ctx.store.count_images(dataset, label=lab)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = min(max(1, int(page or 1)), pages)
    records = ctx.store.list_images(dataset, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE, label=lab)
    items = [(str(ctx.ws.image_path(dataset, r.file_name)), f"#{r.id} · {r.label}") for r in records]
    info = ctx.store.dataset_info(dataset)
    n_classes = len(ctx.store.labels(dataset))
    scope = f"class **{lab}**: {total} images" if lab else f"{info.n_images} images in {n_classes} classes"
    summary = f"Dataset **{dataset}** ({info.modality}) — {scope} · page {page} of {pages}"
    return items, [r.id for r in records], summary, page


def image_detail(ctx: StudioContext, image_id: int | None) -> tuple[str | None, str, str, str, str]:
    """Large image path, a class/status line, the current caption (plain text), provenance JSON, history."""
    if image_id is None:
        return None, "", "", "", ""
    rec = ctx.store.get_image(int(image_id))
    state = ctx.store.current(int(image_id))
    path = str(ctx.ws.image_path(rec.dataset, rec.file_name))
    head = (f"**Image #{rec.id}** · class **{rec.label}** · {rec.width}×{rec.height} px · status "
            f"**{state.status}** · caption version {state.caption_version}")
    provenance = json.dumps({"file_name": rec.file_name, "pixel_hash": rec.pixel_hash, **(rec.source or {})},
                            indent=2, ensure_ascii=False, default=str)
    events = ctx.store.history(int(image_id))
    hist = "\n".join(
        f"{e.created_at[:19]}  {e.kind:<7} {(e.source or e.reviewer or ''):<14} "
        f"{(e.status or '') if e.kind == 'status' else _one_line(e.text)}" for e in events)
    return path, head, state.text, provenance, hist


def import_uploads(ctx: StudioContext, paths: list[str], dataset: str, *, modality: str, label: str | None):
    """Import uploaded files (Gradio's temp copies; ``.zip`` archives expanded) as one batch."""
    from medart_core.data import import_files

    return import_files(ctx.ws, ctx.store, paths, dataset, modality=modality, label=label)


def _one_line(text: str | None, n: int = 90) -> str:
    t = " ".join((text or "").split())
    return t if len(t) <= n else t[: n - 1] + "…"


# ---- events: what Gradio calls, as functions of (ctx, inputs) ------------------------------------------------

def refresh_all(ctx: StudioContext, current: str | None) -> tuple:
    """Banner, dataset list (``current`` kept if it still exists), classes and the first page (REFRESH_OUT)."""
    choices = dataset_choices(ctx)
    value = current if current in choices else (choices[0] if choices else None)
    items, page_ids, text, p = page_view(ctx, value, ALL_CLASSES, 1)
    return (workspace_banner(ctx), gr.Dropdown(choices=choices, value=value),
            gr.Dropdown(choices=class_choices(ctx, value), value=ALL_CLASSES), p, items, page_ids, text)


# The outputs of refresh_all, and of a page change (PAGE_OUT) and an image's detail (DETAIL_OUT), by name.
REFRESH_OUT = ["banner", "dataset", "class", "page", "gallery", "ids", "summary"]
PAGE_OUT = ["page", "gallery", "ids", "summary"]
DETAIL_OUT = ["image", "head", "caption", "provenance", "history"]


@user_errors
def on_refresh(ctx: StudioContext, current: str | None) -> tuple:
    return refresh_all(ctx, current)


@user_errors
def on_dataset(ctx: StudioContext, dataset: str | None) -> tuple:
    items, page_ids, text, p = page_view(ctx, dataset, ALL_CLASSES, 1)
    return gr.Dropdown(choices=class_choices(ctx, dataset), value=ALL_CLASSES), p, items, page_ids, text


@user_errors
def on_page(ctx: StudioContext, dataset: str | None, label: str | None, p: int | float | None,
            delta: int = 0) -> tuple:
    items, page_ids, text, p = page_view(ctx, dataset, label, int(p or 1) + delta)
    return p, items, page_ids, text


@user_errors
def on_select(ctx: StudioContext, page_ids: list[int], evt: gr.SelectData) -> tuple:
    idx = evt.index if isinstance(evt.index, int) else (evt.index[0] if evt.index else None)
    if idx is None or idx >= len(page_ids):
        return None, "", "", "", ""
    return image_detail(ctx, page_ids[idx])


@user_errors
def on_class(ctx: StudioContext, dataset: str | None, label: str | None) -> tuple:
    return on_page(ctx, dataset, label, 1)


@user_errors
def on_prev(ctx: StudioContext, dataset: str | None, label: str | None, p: int | float | None) -> tuple:
    return on_page(ctx, dataset, label, p, -1)


@user_errors
def on_next(ctx: StudioContext, dataset: str | None, label: str | None, p: int | float | None) -> tuple:
    return on_page(ctx, dataset, label, p, +1)


@requires(ADMIN)
@user_errors
def on_import(ctx: StudioContext, form: dict[str, Any], current: str | None) -> tuple:
    """``form``: the import form (files, name, label, modality). Outputs: the report, then REFRESH_OUT."""
    if not form["files"]:
        raise ConfigError("Choose one or more files to import first.")
    paths = [getattr(f, "name", f) for f in form["files"]]
    name = (form["name"] or "").strip()
    try:
        report = import_uploads(ctx, paths, name, modality=form["modality"],
                                label=(form["label"] or "").strip() or None)
    finally:
        discard_uploads(paths)      # originals (DICOMs under their own names) never stay in Gradio's cache
    return (report.summary(),) + refresh_all(ctx, name if report.imported else current)


@user_errors
def on_image_id(ctx: StudioContext, image_id: int | None) -> tuple:
    return image_detail(ctx, image_id)


@user_errors
def on_poll(ctx: StudioContext, current: str | None) -> tuple:
    # Until background work (first-start sample build) ends, keep the listing fresh; then stop polling.
    busy = ctx.status.get("sample") == "building"
    return refresh_all(ctx, current) + (gr.Timer(active=busy),)


# ---- layout: components only, by name ---------------------------------------------------------------------

def _browser(c: dict[str, Any]) -> None:
    with gr.Row():
        # Choices change at run time (imports, first-start build), so API callers may name any dataset;
        # the handlers check it against the store and answer with a clear message.
        c["dataset"] = gr.Dropdown(label="Dataset", choices=[], value=None, interactive=True, elem_id="ds-dataset",
                                   scale=2, allow_custom_value=True)
        c["class"] = gr.Dropdown(label="Class", choices=[ALL_CLASSES], value=ALL_CLASSES, interactive=True,
                                 elem_id="ds-class", scale=2, allow_custom_value=True)
        c["page"] = gr.Number(label="Page", value=1, precision=0, minimum=1, elem_id="ds-page", scale=1)
        c["prev"] = gr.Button("◀ Previous", elem_id="ds-prev", scale=1)
        c["next"] = gr.Button("Next ▶", elem_id="ds-next", scale=1)
    c["summary"] = gr.Markdown(elem_id="ds-summary")
    c["ids"] = gr.State([])
    with gr.Row():
        with gr.Column(scale=3):
            c["gallery"] = gr.Gallery(label="Images (this page only)", columns=6, height=520, allow_preview=False,
                                      object_fit="cover", elem_id="ds-gallery")
        with gr.Column(scale=2):
            c["image"] = gr.Image(label="Selected image", type="filepath", interactive=False, height=300,
                                  elem_id="ds-image")
            c["head"] = gr.Markdown(elem_id="ds-head")
            c["caption"] = gr.Textbox(label="Current caption (edit it in the Captions tab)", interactive=False,
                                      lines=3, elem_id="ds-caption",
                                      placeholder="No caption yet: draft one in the Captions tab.")
            with gr.Accordion("Provenance", open=False):
                c["provenance"] = gr.Code(language="json", label="Source, licence, conversion",
                                          elem_id="ds-provenance")
            with gr.Accordion("Caption history", open=False):
                c["history"] = gr.Textbox(lines=6, interactive=False, show_label=False, elem_id="ds-history")


def _importer(c: dict[str, Any]) -> None:
    """The import accordion; ``import_form`` is on_import's form."""
    with gr.Accordion("Import images", open=False):
        gr.Markdown("A folder-per-class tree as a `.zip` (its folder names are the class labels), CSV "
                    "`file_name,label[,text]` with its images, DICOM, PNG/JPEG/TIFF. Bad files are skipped with a "
                    "reason; an unsafe archive (paths outside it, links, a zip bomb) is refused whole; nothing "
                    "already stored is changed.")
        with gr.Row():
            files = gr.File(file_count="multiple", label="Files", elem_id="ds-upload")
            with gr.Column():
                name = gr.Textbox(label="Dataset name", value="imported", elem_id="ds-import-name")
                label = gr.Textbox(label="Class label (for files without one)", value="", elem_id="ds-import-label")
                modality = gr.Dropdown(label="Modality", value="generic", elem_id="ds-import-modality",
                                       choices=["generic", "endoscopy", "dermoscopy", "radiology", "histology",
                                                "fundus"])
                c["import"] = gr.Button("Import", variant="primary", elem_id="ds-import")
        c["import_report"] = gr.Textbox(label="Import report", lines=6, interactive=False,
                                        elem_id="ds-import-report")
    c["import_form"] = {"files": files, "name": name, "label": label, "modality": modality}


def layout() -> dict[str, Any]:
    """Lay out the tab in the current Blocks context (no events); its components by name."""
    c: dict[str, Any] = {"banner": gr.Markdown(elem_id="ds-banner")}      # filled by the guarded page load
    _browser(c)
    _importer(c)
    c["image_id"] = gr.Number(visible=False, precision=0, elem_id="ds-image-id")
    c["timer"] = gr.Timer(2.0, active=True)
    return c


# ---- wiring -------------------------------------------------------------------------------------------------

def listen(ctx: StudioContext, c: dict[str, Any]) -> None:
    """Wire the components ``layout`` made."""
    ds, cls, page = c["dataset"], c["class"], c["page"]
    refresh_out, page_out = [c[k] for k in REFRESH_OUT], [c[k] for k in PAGE_OUT]
    detail_out = [c[k] for k in DETAIL_OUT]
    ds.change(bind(ctx, on_dataset), ds, [cls] + page_out, api_name="dataset_select")
    cls.change(bind(ctx, on_class), [ds, cls], page_out, api_name="dataset_class")
    page.submit(bind(ctx, on_page), [ds, cls, page], page_out, api_name="dataset_page")
    c["prev"].click(bind(ctx, on_prev), [ds, cls, page], page_out, api_name="dataset_prev")
    c["next"].click(bind(ctx, on_next), [ds, cls, page], page_out, api_name="dataset_next")
    c["gallery"].select(bind(ctx, on_select), c["ids"], detail_out, api_name=False)
    # One import at a time: it decodes and hashes every uploaded image.
    form = c["import_form"]
    c["import"].click(bind(ctx, on_import, form=list(form)), inputs_of(form, ds), [c["import_report"]] + refresh_out,
                      api_name="import", concurrency_limit=1)
    c["image_id"].change(bind(ctx, on_image_id), c["image_id"], detail_out, api_name="image_detail")
    root = gr.context.Context.root_block
    if root is not None:      # the banner, datasets and first page come with the (guarded) page load
        root.load(bind(ctx, on_refresh), ds, refresh_out, api_name="dataset_refresh", show_progress="hidden")
    c["timer"].tick(bind(ctx, on_poll), ds, refresh_out + [c["timer"]], api_name=False, show_progress="hidden")


def build_dataset_tab(ctx: StudioContext) -> dict[str, Any]:
    """Lay out the tab inside the current ``gr.Tab`` context and wire its events."""
    c = layout()
    listen(ctx, c)
    return {"dataset": c["dataset"], "refresh": lambda: refresh_all(ctx, None), "outputs": [c[k] for k in REFRESH_OUT]}


def discard_uploads(paths: list[str]) -> int:
    """Delete uploaded files once imported (or refused): only files inside Gradio's upload cache, never a path
    elsewhere. Returns how many were deleted."""
    from gradio import utils

    cache = Path(utils.get_upload_folder()).resolve()
    n = 0
    for raw in paths:
        p = Path(str(raw)).resolve()
        if cache in p.parents and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
            try:
                p.parent.rmdir()        # Gradio keeps each upload in a folder of its own
            except OSError:
                pass
    return n


def thumbnail_paths(items: list[tuple[str, str]]) -> list[Path]:
    return [Path(p) for p, _ in items]
