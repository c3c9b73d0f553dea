"""The Compare tab's Side-by-side panel: ``evaluate.side_by_side`` (checkpoints × (prompt, seed), the real
image first) of the results shown in Metrics, a slider for two columns of one row, and the grid exported as
one PNG under ``W/exports/compare-grids/``. Layout (``render_side``) apart from wiring (``listen_side``).
"""
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import gradio as gr

from medart_core import evaluate as E
from medart_core.constants import RANDOM_LABEL
from medart_core.errors import ConfigError

from .context import StudioContext
from .compare_metrics import _ordered, results_by_ids
from .errors import user_errors
from .render import esc

MAX_GRID_ROWS = 48
ALL = "(all classes)"
REAL = "real"
QUIET = dict(show_progress="hidden")


def grid_for(ctx: StudioContext, ids: Sequence[str] | None) -> E.SideBySide:
    """The grid of the shown results, columns in checkpoint order; the reference's images decide the rows and
    only results made like them join."""
    results, ref = _ordered(results_by_ids(ctx, ids))
    if not results:
        return E.SideBySide([], [], [])
    return E.side_by_side(ctx.ws, ctx.store, results, reference=ref)


def grid_rows(grid: E.SideBySide, label: str | None, max_rows: Any) -> list[int]:
    n = max(1, min(MAX_GRID_ROWS, int(max_rows or MAX_GRID_ROWS)))
    return [i for i, it in enumerate(grid.items) if label in (None, "", ALL) or it.label == label][:n]


def grid_view(ctx: StudioContext, ids: Sequence[str] | None, label: str | None = ALL,
              max_rows: Any = 12) -> dict[str, Any]:
    """Gallery items (real first, then one column per checkpoint; the same (prompt, seed) across a row), the
    rows' prompts and seeds, and the slider's choices."""
    grid = grid_for(ctx, ids)
    classes = sorted({it.label for it in grid.items})
    label = label if label in classes else ALL
    rows = grid_rows(grid, label, max_rows)
    items: list[tuple[str, str]] = []
    table = []
    for r in rows:
        it = grid.items[r]
        items.append((str(it.path), f"{REAL} · {it.label}"))
        for c, ck in enumerate(grid.checkpoints):
            items.append((grid.image(r, c), f"{ck} · seed {it.seed}"))
        table.append([r + 1, it.label, it.seed, it.prompt])
    notes = []
    random = any(E.is_random_backbone(c.profile) for c in grid.columns)
    if random:
        notes.append(f"<span class='medart-random'>⚠ {RANDOM_LABEL}: the generated images are noise.</span>")
    for ck, why in grid.excluded:
        notes.append(f"{esc(ck)} is not in the grid: {esc(why)}.")
    if grid.columns:
        notes.append(f"{len(rows)} of {len(grid.items)} rows · columns: {REAL}, "
                     + ", ".join(esc(c) for c in grid.checkpoints) + ". Click an image to enlarge it.")
    return {"items": items, "columns": 1 + len(grid.columns), "table": table, "classes": classes, "label": label,
            "rows": [(f"{r + 1} · {grid.items[r].label} · seed {grid.items[r].seed}", r) for r in rows],
            "cols": [REAL] + grid.checkpoints, "note": "<br>".join(notes), "grid": grid}


def slider_images(ctx: StudioContext, ids: Sequence[str] | None, row: Any, a: str | None,
                  b: str | None) -> tuple[str, str]:
    """Two columns ("real" or a checkpoint) of one row, for the image slider."""
    grid = grid_for(ctx, ids)
    if not grid.columns:
        raise ConfigError("Load results first.")
    if row is None or not (0 <= int(row) < len(grid.items)):
        raise ConfigError("Pick a row of the grid.")
    r = int(row)

    def path(col: str | None) -> str:
        if col == REAL:
            return str(grid.items[r].path)
        if col not in grid.checkpoints:
            raise ConfigError(f"Pick two columns of the grid ({', '.join([REAL] + grid.checkpoints)}).")
        return grid.image(r, grid.checkpoints.index(col))

    return path(a), path(b)


def export_grid(ctx: StudioContext, ids: Sequence[str] | None, label: str | None, max_rows: Any) -> str:
    """The grid PNG, saved under ``W/exports/compare-grids/``; the browser gets a copy from the temp dir (Gradio
    moves it into its cache), since the shell keeps ``W/exports`` off the file route."""
    grid = grid_for(ctx, ids)
    saved = E.export_grid_png(ctx.ws, grid, grid_rows(grid, label, max_rows))
    out = Path(tempfile.mkdtemp(prefix="medart-grid-")) / saved.name
    shutil.copyfile(saved, out)
    return str(out)


# ------------------------------------------------------------------------------------------------
# Layout and wiring
# ------------------------------------------------------------------------------------------------
def render_side(c: dict[str, Any]) -> None:
    """The grid's controls, the gallery, its rows' prompts and seeds, and the slider."""
    gr.Markdown("The results shown in **Metrics**: the real image each prompt came from, then one column "
                "per checkpoint — the same prompt and seed across a row.")
    with gr.Row():
        c["grid_class"] = gr.Dropdown([ALL], value=ALL, allow_custom_value=True, label="Class", scale=2)
        c["grid_max"] = gr.Number(12, precision=0, minimum=1, maximum=MAX_GRID_ROWS, label="Rows", scale=1)
        c["grid_refresh"] = gr.Button("Show", scale=0, elem_id="cmp-grid-show")
        c["export"] = gr.Button("Export grid as PNG", scale=0, elem_id="cmp-export")
    c["grid_note"] = gr.HTML(padding=False, elem_id="cmp-grid-note")
    c["gallery"] = gr.Gallery(label="Side by side (click to enlarge)", columns=3, format="png",
                              type="filepath", height="auto", allow_preview=True, interactive=False,
                              object_fit="contain", buttons=["fullscreen"], elem_id="cmp-gallery")
    c["export_file"] = gr.File(label="Exported grid", interactive=False, elem_id="cmp-export-file")
    with gr.Accordion("Rows: prompts and seeds", open=False):
        c["grid_table"] = gr.Dataframe(headers=["row", "class", "seed", "prompt"], interactive=False,
                                       wrap=True, elem_id="cmp-grid-table")
    with gr.Row():
        c["slider_row"] = gr.Dropdown([], allow_custom_value=True, label="Row", scale=2)
        c["slider_a"] = gr.Dropdown([], allow_custom_value=True, label="Left", scale=1)
        c["slider_b"] = gr.Dropdown([], allow_custom_value=True, label="Right", scale=1)
        c["slide"] = gr.Button("Compare in slider", scale=0)
    c["slider"] = gr.ImageSlider(type="filepath", format="png", label="Drag to compare", interactive=False,
                                 elem_id="cmp-slider")


def grid_components(c: dict[str, Any]) -> list[Any]:
    return [c[k] for k in ("gallery", "grid_table", "grid_note", "grid_class", "slider_row", "slider_a", "slider_b")]


def grid_updates(ctx: StudioContext, c: dict[str, Any], ids: Any, label: Any, max_rows: Any) -> dict[Any, Any]:
    """``{component: value}`` of the grid of the results ``ids``."""
    g = grid_view(ctx, ids, label, max_rows)
    return {c["gallery"]: gr.Gallery(value=g["items"] or None, columns=g["columns"]), c["grid_table"]: g["table"],
            c["grid_note"]: g["note"], c["grid_class"]: gr.Dropdown(choices=[ALL] + g["classes"], value=g["label"]),
            c["slider_row"]: gr.Dropdown(choices=g["rows"], value=g["rows"][0][1] if g["rows"] else None),
            c["slider_a"]: gr.Dropdown(choices=g["cols"], value=g["cols"][0] if g["cols"] else None),
            c["slider_b"]: gr.Dropdown(choices=g["cols"], value=g["cols"][1] if len(g["cols"]) > 1 else None)}


def listen_side(ctx: StudioContext, c: dict[str, Any]) -> None:
    """Show the grid (button or class), compare two columns in the slider, export the grid."""
    grid_in = [c["results"], c["grid_class"], c["grid_max"]]
    grid_out = grid_components(c)

    @user_errors
    def on_grid(ids, label, max_rows):
        return grid_updates(ctx, c, ids, label, max_rows)

    c["grid_refresh"].click(on_grid, grid_in, grid_out, api_name="compare_grid", **QUIET)
    c["grid_class"].input(on_grid, grid_in, grid_out, api_name=False, **QUIET)

    @user_errors
    def on_slide(ids, row, a, b):
        return slider_images(ctx, ids, row, a, b)

    c["slide"].click(on_slide, [c["results"], c["slider_row"], c["slider_a"], c["slider_b"]], c["slider"],
                     api_name="compare_slider")

    @user_errors
    def on_export(ids, label, max_rows):
        return export_grid(ctx, ids, label, max_rows)

    c["export"].click(on_export, grid_in, c["export_file"], api_name="compare_export")
