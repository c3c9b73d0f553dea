"""The Compare tab: FD/KID/PRDC of checkpoints under one recorded protocol, a side-by-side grid with the same
prompts and seeds in every column, and blind review by clinicians.

* **Metrics**: pick checkpoints and a metric profile; "Run evaluation" submits an ``evaluate`` job (the
  supervisor runs it outside the web server; a ``gr.Timer`` reads one ledger row per tick) or "Load results"
  reads ``W/evaluations/``. The table marks the best value of a column only when it lies outside every other
  comparable row's interval (``evaluate.comparison_table``); results measured with another profile are greyed
  out with the reason and never ranked. Rows are in checkpoint order, never sorted by a metric.
* **Side by side**: ``evaluate.side_by_side`` (checkpoints × (prompt, seed), the real image first), a slider
  for two columns of one row, and the grid exported as one PNG under ``W/exports/compare-grids/``.
* Roles: the tab is for trainers; the handlers a blind reviewer needs (page load, start, votes) are marked
  ``@requires(ANNOTATOR)`` so clinicians with the annotator role can review.
* **Blind review**: ``medart_core.blind``. The two images reach the browser as fresh PIL images
  (``blind.neutral_pair_images``), so Gradio serves them from its cache under a content hash: no file name,
  folder, PNG text chunk or size difference tells a checkpoint (or the real image) apart. Nothing on the
  reviewer's side names a source: the results table (which does) is shown once the reviewer has finished
  the study, or to the coordinator on request. Keyboard: Alt+← / Alt+→ vote, Alt+F focuses the tag box.

Every handler is a plain module-level function of ``(ctx, ...)`` wrapped in ``studio.errors.user_errors``
where it is wired, so tests call them directly and library errors reach the user as messages.
"""
# No ``from __future__ import annotations``: Gradio inspects the real ``gr.Request`` annotation of the
# handlers below to inject the request.
import dataclasses
import math
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import gradio as gr
import pandas as pd

from medart_core import evaluate as E
from medart_core.accounts import ANNOTATOR
from medart_core.blind import ReviewStore, neutral_pair_images
from medart_core.constants import MAX_REVIEWER_CHARS, RANDOM_LABEL
from medart_core.errors import ConfigError, NotFoundError
from medart_core.generate import list_checkpoint_refs
from medart_core.jobs import ACTIVE, DONE, QUEUED, Job, JobLedger, LocalExecutor
from medart_core.seeds import derive_seed

from .ablation_panel import build_ablation_panel
from .auth import requires
from .context import StudioContext
from .errors import user_errors
from .render import esc

POLL_S = 2.0
LOG_LINES = 8
MAX_GRID_ROWS = 48
ALL = "(all classes)"
REAL = "real"
EXTRACTORS = ("domain", "inception", "dinov2")
# (key in the comparison rows, column title, lower is better)
METRICS: list[tuple[str, str, bool]] = [("fd", "FD", True), ("kid", "KID", True), ("precision", "precision", False),
                                        ("recall", "recall", False), ("density", "density", False),
                                        ("coverage", "coverage", False)]
METRIC_LABEL = {k: t for k, t, _ in METRICS}
FORM_FIELDS = ("dataset", "extractor", "extractor_weights", "per_class", "captions", "steps", "guidance", "size",
               "seed", "n_boot", "kid_subsets", "min_samples")

# ------------------------------------------------------------------------------------------------
# Browser side: shortcuts and styles
# ------------------------------------------------------------------------------------------------
SHORTCUTS = [("Alt+←", "left is more realistic"), ("Alt+→", "right is more realistic"),
             ("Alt+F", "focus the artefact tag (a tag typed there goes with the next vote)")]

# Alt combos only; ``e.code`` (macOS Alt+F types "ƒ"). A vote fires only while its button is visible (the
# Compare tab and its Blind review sub-tab open) and enabled; a held key (e.repeat) never votes twice.
KEYBOARD_JS = r"""
(() => {
  if (window.__medartBlindKeys) return;
  window.__medartBlindKeys = true;
  const visible = (el) => el && el.offsetParent !== null;
  const button = (id) => {
    const root = document.getElementById(id);
    return root && (root.tagName === 'BUTTON' ? root : root.querySelector('button'));
  };
  document.addEventListener('keydown', (e) => {
    if (!e.altKey || e.ctrlKey || e.metaKey) return;
    let handled = false;
    if (e.code === 'ArrowLeft' || e.code === 'ArrowRight') {
      const btn = button(e.code === 'ArrowLeft' ? 'blind-left' : 'blind-right');
      if (!visible(btn)) return;
      if (!e.repeat && !btn.disabled) btn.click();
      handled = true;
    } else if (e.code === 'KeyF') {
      const box = document.querySelector('#blind-tag textarea, #blind-tag input');
      if (!visible(box)) return;
      box.focus();
      handled = true;
    }
    if (handled) { e.preventDefault(); e.stopPropagation(); }
  }, true);
})();
"""
# Collected by studio.app for the page <head>; the shortcuts' own gr.HTML installs it too (idempotent).
HEAD_JS = KEYBOARD_JS

CSS = """
.cmp-table {border-collapse: collapse; font-size: .92rem; width: 100%;}
.cmp-table th, .cmp-table td {border-bottom: 1px solid #9994; padding: .25rem .5rem; text-align: right;}
.cmp-table th:first-child, .cmp-table td:first-child {text-align: left;}
.cmp-table .cmp-best {font-weight: 700; background: #16a34a22;}
.cmp-table tr.cmp-other td {color: #9ca3af; font-style: italic;}
.cmp-table tr.cmp-reason td {color: #9ca3af; font-size: .82rem; text-align: left; border-bottom: 1px solid #9996;}
.cmp-legend, .cmp-note {font-size: .85rem; opacity: .85;}
.cmp-warn {background: #f59e0b2e; border-left: 4px solid #d97706; padding: .25rem .5rem; margin: .2rem 0;}
.cmp-keys {display: flex; flex-wrap: wrap; gap: .35rem .9rem; font-size: .85rem; opacity: .85;}
.cmp-keys kbd {border: 1px solid #9994; border-bottom-width: 2px; border-radius: 4px; padding: 0 .3rem;
  font-family: ui-monospace, monospace; font-size: .8rem;}
.blind-pos {font-size: 1.05rem; font-weight: 600;}
#blind-left-img img, #blind-right-img img {width: 100%; height: 100%; object-fit: contain; image-rendering: auto;}
.medart-random {color: #b45309; font-weight: 600;}
"""
LAUNCH_CSS = CSS


_LEDGERS: dict[str, JobLedger] = {}
_REVIEWS: dict[str, ReviewStore] = {}
_CACHE_LOCK = threading.Lock()


def _ledger(ctx: StudioContext) -> JobLedger:
    """One ledger per workspace and process (a tick reads one row; no schema check per tick)."""
    with _CACHE_LOCK:
        key = str(ctx.ws.root)
        if key not in _LEDGERS:
            _LEDGERS[key] = JobLedger(ctx.ws)
        return _LEDGERS[key]


def _reviews(ctx: StudioContext) -> ReviewStore:
    with _CACHE_LOCK:
        key = str(ctx.ws.root)
        if key not in _REVIEWS:
            _REVIEWS[key] = ReviewStore.for_workspace(ctx.ws)
        return _REVIEWS[key]


# ------------------------------------------------------------------------------------------------
# Metrics: profile, job, results
# ------------------------------------------------------------------------------------------------
def dataset_names(ctx: StudioContext) -> list[str]:
    return [d.name for d in ctx.store.list_datasets()]


def checkpoint_choices(ctx: StudioContext) -> list[str]:
    return list_checkpoint_refs(ctx.ws)


def _int(v: Any, name: str, lo: int) -> int:
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a whole number.") from None
    if i < lo:
        raise ConfigError(f"{name} must be at least {lo}.")
    return i


def make_spec(dataset: str | None, extractor: str, extractor_weights: str | None, per_class: Any, captions: str,
              steps: Any, guidance: Any, size: Any, seed: Any, n_boot: Any, kid_subsets: Any,
              min_samples: Any) -> E.EvalSpec:
    """The metric profile's inputs from the form (the EvalSpec the job runs)."""
    if not dataset:
        raise ConfigError("Pick a dataset to evaluate against (its real images are the reference set).")
    if extractor not in EXTRACTORS:
        raise ConfigError(f"extractor must be one of {EXTRACTORS}, got {extractor!r}.")
    if captions not in ("approved", "latest"):
        raise ConfigError("captions must be 'approved' or 'latest'.")
    return E.EvalSpec(dataset=dataset, extractor=extractor, extractor_weights=(extractor_weights or "").strip() or None,
                      per_class=_int(per_class, "Images per class", 1), captions=captions,
                      steps=_int(steps, "Steps", 1), guidance=float(guidance), size=_int(size, "Size", 16),
                      seed=_int(seed, "Seed", 0), n_boot=_int(n_boot, "Bootstrap resamples", 0),
                      kid_subsets=_int(kid_subsets, "KID subsets", 1), min_samples=_int(min_samples, "Minimum N", 1))


def submit_evaluation(ctx: StudioContext, owner: str | None, checkpoints: Sequence[str] | None, *form: Any) -> Job:
    """Queue an ``evaluate`` job (and start the supervisor if none runs). The generator's backbone is the first
    run's training backbone; for base alone, the studio's."""
    refs = [str(c) for c in (checkpoints or []) if c]
    if not refs:
        raise ConfigError("Pick at least one checkpoint to evaluate (base, or a run's step).")
    spec = make_spec(*form)
    backbone = None if any(r != "base" for r in refs) else ctx.backbone_spec
    return LocalExecutor(ctx.ws).submit("evaluate", {"spec": dataclasses.asdict(spec), "checkpoints": refs,
                                                     "backbone": backbone}, owner=owner)


def job_view(ctx: StudioContext, job_id: str | None) -> dict[str, Any]:
    """One ledger row (and the log's tail) → status line, whether to keep polling, the result ids when done."""
    if not job_id:
        return {"text": "", "log": "", "active": False, "final": False, "result_ids": None, "can_stop": False}
    job = _ledger(ctx).get(job_id)
    text = f"<b>{esc(job.id)}</b> — {esc(job.progress_text())}"
    ids = None
    if job.state == DONE:
        ids = list((job.result or {}).get("results") or [])
        text += f" — {len(ids)} result(s) loaded below"
    elif job.is_final:
        text += f"<div class='cmp-warn'>{esc(job.error or job.state)}</div>"
    return {"text": text, "log": _ledger(ctx).log_tail(job.id, LOG_LINES), "active": job.state in (QUEUED,) + ACTIVE,
            "final": job.is_final, "result_ids": ids, "can_stop": job.state in (QUEUED,) + ACTIVE}


def stop_evaluation(ctx: StudioContext, job_id: str | None) -> Job:
    if not job_id:
        raise ConfigError("No evaluation job to stop.")
    return LocalExecutor(ctx.ws).stop(job_id)


def active_job(ctx: StudioContext, owner: str | None) -> Job | None:
    """The user's queued or running evaluation (a reload re-arms the timer on it)."""
    jobs = _ledger(ctx).list(states=(QUEUED,) + ACTIVE, kind="evaluate", owner=owner, limit=1)
    return jobs[0] if jobs else None


def result_label(r: E.EvalResult) -> str:
    p = r.profile
    return (f"{p.get('checkpoint')} · {p.get('extractor')} · N={p.get('n_real')} · steps {p.get('steps')} · "
            f"{p.get('created_at', '')} ({r.id})")


def result_choices(ctx: StudioContext, dataset: str | None = None) -> list[tuple[str, str]]:
    """Saved results, newest first, as (label, id)."""
    rs = [r for r in E.load_results(ctx.ws) if dataset is None or r.profile.get("dataset") == dataset]
    rs.sort(key=lambda r: (str(r.profile.get("created_at", "")), r.id), reverse=True)
    return [(result_label(r), r.id) for r in rs]


def results_by_ids(ctx: StudioContext, ids: Sequence[str] | None) -> list[E.EvalResult]:
    want = [str(i) for i in (ids or [])]
    have = {r.id: r for r in E.load_results(ctx.ws) if r.id in want}
    missing = [i for i in want if i not in have]
    if missing:
        raise NotFoundError(f"No saved evaluation result {missing[0]!r}; press Load results again.")
    return [have[i] for i in want]


def pick_results(ctx: StudioContext, dataset: str | None, checkpoints: Sequence[str] | None) -> list[str]:
    """Load results: one per checkpoint (see ``evaluate.select_for_comparison``); ids, in checkpoint order."""
    chosen, _ = E.select_for_comparison(E.load_results(ctx.ws), checkpoints=list(checkpoints or []) or None,
                                        dataset=dataset or None)
    if not chosen:
        where = f" for {', '.join(checkpoints)}" if checkpoints else ""
        raise NotFoundError(f"No saved evaluation results{where} on {dataset!r} yet: run an evaluation first.")
    return [r.id for r in chosen]


def _ordered(results: Sequence[E.EvalResult]) -> tuple[list[E.EvalResult], E.EvalResult | None]:
    """Results in checkpoint order, and the reference (the newest: its profile is the one compared against)."""
    if not results:
        return [], None
    ref = max(results, key=lambda r: (str(r.profile.get("created_at", "")), r.id))
    return sorted(results, key=lambda r: (E.checkpoint_order(str(r.profile.get("checkpoint"))), r.id)), ref


def _num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return esc(v)


def random_labels(profile: dict[str, Any]) -> list[str]:
    """What in a profile has random weights (each makes the numbers a smoke test)."""
    out = []
    if E.is_random_backbone(profile):
        out.append(f"{RANDOM_LABEL} ({profile.get('backbone')}) — its images are noise: numbers are a smoke test")
    if profile.get("random_weights"):
        out.append(f"random-weight {profile.get('extractor')} extractor — numbers are a smoke test")
    return out


def table_html(table: dict[str, Any], results: dict[str, E.EvalResult]) -> str:
    """Checkpoints × metrics: FD with its bootstrap CI, KID ± std, PRDC; ★ only where separated; rows of another
    profile greyed out with the reason, listed after the comparable ones and never marked."""
    if not table["rows"]:
        return "<p class='cmp-note'>No results loaded.</p>"
    best = table.get("best", {})
    suffix = {"fd": " [95% CI]", "kid": " ± std"}
    heads = ["checkpoint", "N"] + [f"{t} {'↓' if low else '↑'}{suffix.get(k, '')}" for k, t, low in METRICS]
    out = ["<table class='cmp-table' id='cmp-table-el'><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in heads)
           + "</tr></thead><tbody>"]
    rows = [r for r in table["rows"] if r["comparable"]] + [r for r in table["rows"] if not r["comparable"]]
    for r in rows:
        prof = results[r["id"]].profile
        name = esc(r["checkpoint"])
        if random_labels(prof):
            name += " <span class='medart-random' title='random weights'>(random weights)</span>"
        if r["id"] == table.get("reference"):
            name += " <small>(reference profile)</small>"
        cells = [name, _num(r.get("n"))]
        for k, _, _ in METRICS:
            v = _num(r.get(k))
            if k == "fd" and r.get("fd_ci"):
                v += f" [{_num(r['fd_ci'][0])}, {_num(r['fd_ci'][1])}]"
            if k == "kid" and r.get("kid_std") is not None:
                v += f" ± {_num(r['kid_std'], 2)}"
            cls = " class='cmp-best'" if r["comparable"] and best.get(k) == r["id"] else ""
            cells.append(f"<td{cls}>{'★ ' if cls else ''}{v}</td>")
        cells[0], cells[1] = f"<td>{cells[0]}</td>", f"<td>{cells[1]}</td>"
        tr = "cmp-row" if r["comparable"] else "cmp-other"
        out.append(f"<tr class='{tr}' data-result='{esc(r['id'])}'>" + "".join(cells) + "</tr>")
        if not r["comparable"]:
            out.append(f"<tr class='cmp-reason'><td colspan='{len(heads)}'>not comparable with the reference, not "
                       f"ranked: {esc(r['reason'])}</td></tr>")
    out.append("</tbody></table>")
    out.append("<p class='cmp-legend'>★ best in its column, marked only where its interval (FD: bootstrap 95% CI; "
               "KID: ± std over subsets) lies outside every other comparable row's; no ★ means the differences are "
               "within the noise. Rows are in checkpoint order, never sorted by a metric.</p>")
    return "".join(out)


def warnings_html(results: Sequence[E.EvalResult], ref: E.EvalResult | None) -> str:
    if ref is None:
        return ""
    lines: list[str] = []
    for r in [ref] + [r for r in results if r is not ref]:
        o = r.metrics.get("overall", {})
        extra = []
        if o.get("kid_subset_size") and o.get("n") and o["kid_subset_size"] >= o["n"]:
            # Stopgap until the library says so itself: a subset of all N images every time has no spread.
            extra.append(f"KID subsets of {o['kid_subset_size']} = all N images: its ± std is ~0, so a KID ★ does "
                         "not mean the difference is outside the noise")
        for w in random_labels(r.profile) + list(o.get("warnings") or []) + extra:
            if w not in lines:
                lines.append(w)
    return "".join(f"<div class='cmp-warn'>⚠ {esc(w)}</div>" for w in lines)


def metric_by_step(table: dict[str, Any], metric: str) -> pd.DataFrame:
    """Comparable rows of RUN@STEP checkpoints as (run, step, value); base is step 0 of every run (a run's
    adapters start at zero, i.e. at the base model)."""
    rows = [r for r in table["rows"] if r["comparable"] and isinstance(r.get(metric), (int, float))]
    base = next((r for r in rows if r["checkpoint"] == "base"), None)
    pts = []
    for r in rows:
        order = E.checkpoint_order(r["checkpoint"])
        if order[0] == 1:
            pts.append({"run": order[1], "step": order[2], "value": float(r[metric])})
    if base is not None:
        for run in sorted({p["run"] for p in pts}):
            pts.append({"run": run, "step": 0, "value": float(base[metric])})
    df = pd.DataFrame(pts, columns=["run", "step", "value"])
    return df.sort_values(["run", "step"]).reset_index(drop=True) if len(df) else df


def per_class_frame(results: Sequence[E.EvalResult], table: dict[str, Any], metric: str) -> pd.DataFrame:
    """Per-class values of the comparable results, one bar per (class, checkpoint): never stacked."""
    comparable = {r["id"] for r in table["rows"] if r["comparable"]}
    pts = []
    for r in results:
        if r.id not in comparable:
            continue
        for cls, m in sorted((r.metrics.get("per_class") or {}).items()):
            v = m.get(metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                pts.append({"bar": f"{cls} · {r.profile['checkpoint']}", "class": cls,
                            "checkpoint": str(r.profile["checkpoint"]), "value": float(v)})
    return pd.DataFrame(pts, columns=["bar", "class", "checkpoint", "value"])


def compare_view(ctx: StudioContext, ids: Sequence[str] | None, metric: str = "fd") -> dict[str, Any]:
    """Everything the Metrics sub-tab shows for a set of saved results."""
    metric = metric if metric in METRIC_LABEL else "fd"
    results, ref = _ordered(results_by_ids(ctx, ids))
    table = E.comparison_table(results, reference=ref) if results else {"rows": [], "best": {}, "reference": None}
    by_id = {r.id: r for r in results}
    return {"table_html": table_html(table, by_id), "table": table, "warnings": warnings_html(results, ref),
            "line": metric_by_step(table, metric), "bar": per_class_frame(results, table, metric),
            "metric_label": METRIC_LABEL[metric]}


# ------------------------------------------------------------------------------------------------
# Side by side
# ------------------------------------------------------------------------------------------------
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
# Blind review
# ------------------------------------------------------------------------------------------------
def study_names(ctx: StudioContext) -> list[str]:
    return [s["name"] for s in _reviews(ctx).studies()]


def next_study_name(ctx: StudioContext) -> str:
    names = set(study_names(ctx))
    n = len(names) + 1
    while f"study-{n}" in names:
        n += 1
    return f"study-{n}"


def create_study(ctx: StudioContext, creator: str | None, name: str | None, kind: str, a_id: str | None,
                 b_id: str | None) -> tuple[str, str]:
    """A study from one result (real vs synthetic) or two (checkpoint A vs B); returns (name, message)."""
    if not a_id:
        raise ConfigError("Pick result A (press “List results” first).")
    a = results_by_ids(ctx, [a_id])[0]
    b = results_by_ids(ctx, [b_id])[0] if kind == "checkpoints" and b_id else None
    name = (name or "").strip() or next_study_name(ctx)
    E.create_blind_study(ctx.ws, ctx.store, _reviews(ctx), name, kind, a, b, seed=derive_seed(name, "blind"),
                         created_by=creator)
    n = len(a.images)
    return name, f"Study “{name}” created: {n} pairs ({kind}). Reviewers pick it by name below."


def _pos_html(text: str) -> str:
    return f"<div class='blind-pos' id='blind-pos-text'>{esc(text)}</div>"


def blind_view(ctx: StudioContext, study: str | None, reviewer: str | None, notice: str = "") -> dict[str, Any]:
    """The reviewer's next pair (two neutral images, left and right) or, when the study is done, its results."""
    empty = {"state": {"study": study, "pair_id": None}, "left": None, "right": None, "prompt": "",
             "enabled": False, "results": "", "notice": notice}
    if not study:
        return {**empty, "position": _pos_html("Pick a study.")}
    if not reviewer:
        return {**empty, "position": _pos_html("Enter your name to start: every vote is stored with it.")}
    rs = _reviews(ctx)
    pair = rs.next_pair(study, reviewer)
    if pair is None:
        res = rs.results(study)
        return {**empty, "position": _pos_html(f"Done: all {res['pairs']} pairs of this study reviewed. Thank you."),
                "results": blind_results_html(res)}
    left, right = neutral_pair_images(pair.left, pair.right)
    prompt = f"<div class='cmp-note'>Prompt of both images: {esc(pair.prompt)}</div>" if pair.prompt else ""
    return {"state": {"study": study, "pair_id": pair.pair_id, "shown_to": pair.reviewer}, "left": left,
            "right": right, "prompt": prompt,
            "enabled": True, "notice": notice, "position": _pos_html(f"pair {pair.position + 1} / {pair.total}"),
            "results": "<p class='cmp-note'>The results (which name the sources) appear when you have reviewed every "
                       "pair of this study.</p>"}


def blind_vote(ctx: StudioContext, state: dict[str, Any] | None, reviewer: str | None, choice: str | None,
               tag: str | None) -> dict[str, Any]:
    """Record the vote on the pair on screen, then show the next one."""
    state = state or {}
    study, pair_id = state.get("study"), state.get("pair_id")
    if not study or pair_id is None:
        raise ConfigError("No pair on screen: pick a study and press Start.")
    if not reviewer:
        raise ConfigError("Enter your name (or log in) before voting: every vote is stored with its reviewer.")
    # The left/right order is the reviewer's own: "left" is resolved against the name the pair was shown to.
    _reviews(ctx).vote(study, int(pair_id), reviewer, choice, tag, shown_to=state.get("shown_to"))
    what = {"left": "left", "right": "right", None: "artefact flagged"}[choice]
    if tag and tag.strip():
        what += f", tag “{tag.strip()}”"
    return blind_view(ctx, study, reviewer, notice=f"Saved ({what}).")


def blind_results_html(res: dict[str, Any]) -> str:
    """Win rates with 95 % Wilson intervals; for real vs synthetic how often the synthetic image was taken for
    the real one; artefact tags per source."""
    head = (f"<p><b>{esc(res['study'])}</b> ({esc(res['kind'])}): {res['pairs']} pairs, {res['votes']} votes, "
            f"{res['preferences']} preferences by {len(res['reviewers'])} reviewer(s)</p>")

    def tags(src: str) -> str:
        return esc(", ".join(f"{t} ×{n}" for t, n in sorted(res["artefact_tags"].get(src, {}).items())))

    rows = "".join(
        f"<tr><td>{esc(r['source'])}</td><td>{r['wins']}</td><td>{_num(r['win_rate'], 3)}</td>"
        f"<td>[{_num(r['ci'][0], 3)}, {_num(r['ci'][1], 3)}]</td><td>{tags(r['source'])}</td></tr>"
        for r in res["rows"])
    out = (head + "<table class='cmp-table' id='blind-results-table'><thead><tr><th>source</th><th>wins</th>"
           "<th>win rate</th><th>95% CI (Wilson)</th><th>artefact tags</th></tr></thead><tbody>" + rows
           + "</tbody></table>")
    if "synthetic_taken_for_real" in res:
        f = res["synthetic_taken_for_real"]
        out += (f"<p id='blind-fooled'>Synthetic taken for real: <b>{f['count']}</b> of {res['preferences']} "
                f"({_num(f['rate'], 3)}, 95% CI [{_num(f['ci'][0], 3)}, {_num(f['ci'][1], 3)}])</p>")
    return out


def coordinator_results(ctx: StudioContext, study: str | None) -> str:
    if not study:
        raise ConfigError("Pick a study.")
    return blind_results_html(_reviews(ctx).results(study))


# ------------------------------------------------------------------------------------------------
# UI
# ------------------------------------------------------------------------------------------------
def _shortcuts_html() -> str:
    keys = " ".join(f"<span><kbd>{esc(k)}</kbd> {esc(a)}</span>" for k, a in SHORTCUTS)
    return f"<div class='cmp-keys' id='blind-keys'>{keys}</div>"


def build_compare_tab(ctx: StudioContext) -> dict[str, Any]:
    """Build the Compare tab inside the caller's ``gr.Tab`` (or any Blocks); returns its components by name."""
    # The grid shows real images (datasets) and evaluation images (samples) as they are on disk; blind-review
    # images never come from these folders (they are fresh PIL images, served from Gradio's cache).
    ctx.ws.samples_dir.mkdir(parents=True, exist_ok=True)
    gr.set_static_paths([str(ctx.ws.datasets_dir), str(ctx.ws.samples_dir)])
    # No workspace data at build time: the dataset list comes with the guarded page load (on_load).
    quiet = dict(show_progress="hidden")
    c: dict[str, Any] = {}

    # The styles also come with LAUNCH_CSS; inline too, so the tab looks right in any Blocks.
    gr.HTML(f"<style>{CSS}</style>", padding=False)
    with gr.Tabs():
        # ---- Metrics ------------------------------------------------------------------------------------
        with gr.Tab("Metrics", id="cmp-metrics"):
            with gr.Row():
                # Choices arrive on page load; custom values: checkpoints written after the page was built.
                c["checkpoints"] = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True, scale=4,
                                               elem_id="cmp-checkpoints",
                                               label="Checkpoints (base = no adapters; RUN@STEP)")
                c["ck_refresh"] = gr.Button("↻", size="sm", scale=0, min_width=40)
                c["dataset"] = gr.Dropdown([], value=None, allow_custom_value=True,
                                           label="Dataset (real images)",
                                           scale=2, elem_id="cmp-dataset")
            with gr.Row():
                c["extractor"] = gr.Dropdown(list(EXTRACTORS), value="domain", label="Feature extractor",
                                             info="domain: a classifier trained on the dataset's labelled images; "
                                                  "inception: FID; dinov2: FD_DINOv2")
                c["extractor_weights"] = gr.Textbox(label="Extractor weights (Inception file, DINOv2 Hub id/folder)",
                                                    placeholder="default: the torch hub cache / settings")
                c["per_class"] = gr.Number(16, precision=0, minimum=1, label="Real images per class (N)")
                c["captions"] = gr.Radio(["approved", "latest"], value="approved", label="Prompts from captions")
            with gr.Row():
                c["steps"] = gr.Slider(1, 100, value=20, step=1, label="Sampling steps")
                c["guidance"] = gr.Slider(0, 15, value=4.5, step=0.5, label="Guidance (CFG)")
                c["size"] = gr.Number(64, precision=0, minimum=16, label="Preparation size S (px)")
                c["seed"] = gr.Number(0, precision=0, minimum=0, label="Seed (eval set and per-prompt seeds)")
            with gr.Accordion("Statistics", open=False):
                with gr.Row():
                    c["n_boot"] = gr.Number(50, precision=0, minimum=0, label="Bootstrap resamples (FD CI)")
                    c["kid_subsets"] = gr.Number(100, precision=0, minimum=1, label="KID subsets")
                    c["min_samples"] = gr.Number(50, precision=0, minimum=1, label="Warn below N =")
            with gr.Row():
                c["run"] = gr.Button("Run evaluation (as a job)", variant="primary", elem_id="cmp-run")
                c["stop"] = gr.Button("Stop", variant="stop", interactive=False, elem_id="cmp-stop", scale=0)
                c["load"] = gr.Button("Load results", elem_id="cmp-load")
            with gr.Row():
                c["job"] = gr.Textbox(label="Job", interactive=False, scale=1, elem_id="cmp-job")
                c["status"] = gr.HTML(elem_id="cmp-status", padding=False)
            with gr.Accordion("Job log", open=False):
                c["log"] = gr.Code(language=None, lines=LOG_LINES, interactive=False, elem_id="cmp-log")
            c["results"] = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                       label="Results shown (one per checkpoint; the newest sets the reference "
                                             "profile)", elem_id="cmp-results")
            c["warnings"] = gr.HTML(elem_id="cmp-warnings", padding=False)
            c["table_html"] = gr.HTML(elem_id="cmp-table", padding=False)
            with gr.Accordion("Table data (JSON)", open=False):
                c["table"] = gr.JSON(elem_id="cmp-table-json")
            c["metric"] = gr.Dropdown([(t, k) for k, t, _ in METRICS], value="fd", label="Plotted metric", scale=0)
            with gr.Row():
                c["line"] = gr.LinePlot(x="step", y="value", color="run", title="Metric vs training step (per run)",
                                        y_title="FD", height=280, elem_id="cmp-line")
                c["bar"] = gr.BarPlot(x="bar", y="value", color="checkpoint", title="Per class",
                                      y_title="FD", x_label_angle=-40, height=280, elem_id="cmp-bar", sort="x")
        # ---- Side by side -------------------------------------------------------------------------------
        with gr.Tab("Side by side", id="cmp-side"):
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
        # ---- Blind review -------------------------------------------------------------------------------
        with gr.Tab("Blind review", id="cmp-blind"):
            gr.HTML(_shortcuts_html(), js_on_load=KEYBOARD_JS, elem_id="blind-shortcuts", padding=False)
            with gr.Accordion("Set up a study (coordinator — this part names the sources)", open=False):
                with gr.Row():
                    c["b_kind"] = gr.Radio(["checkpoints", "real-vs-synthetic"], value="checkpoints", label="Pairs",
                                           info="checkpoints: image i of A vs image i of B; real-vs-synthetic: "
                                                "real image i vs generated image i of A")
                    c["b_name"] = gr.Textbox(label="Study name (shown to reviewers: don't name a source)",
                                             placeholder="study-1", elem_id="blind-new-name")
                with gr.Row():
                    c["b_a"] = gr.Dropdown([], allow_custom_value=True, label="Result A", scale=3, elem_id="blind-a")
                    c["b_b"] = gr.Dropdown([], allow_custom_value=True, label="Result B (checkpoints only)", scale=3,
                                           elem_id="blind-b")
                    c["b_list"] = gr.Button("List results", scale=0, elem_id="blind-list")
                c["b_create"] = gr.Button("Create study", variant="primary", elem_id="blind-create")
                c["b_setup_note"] = gr.HTML(padding=False, elem_id="blind-setup-note")
                with gr.Row():
                    c["b_show_results"] = gr.Button("Show results of the study picked below (reveals the sources)",
                                                    elem_id="blind-coord-results")
                c["b_coord"] = gr.HTML(padding=False, elem_id="blind-coord")
            saved_name = gr.BrowserState("", storage_key="medart_reviewer")
            c["b_state"] = gr.State({"study": None, "pair_id": None})
            with gr.Row():
                c["b_reviewer"] = gr.Textbox(label="Reviewer (your name; remembered in this browser)",
                                             max_length=MAX_REVIEWER_CHARS, elem_id="blind-reviewer", scale=2)
                c["b_study"] = gr.Dropdown([], allow_custom_value=True, label="Study", scale=2, elem_id="blind-study")
                c["b_start"] = gr.Button("Start / resume", variant="primary", scale=0, elem_id="blind-start")
            c["b_pos"] = gr.HTML(_pos_html("Pick a study."), padding=False, elem_id="blind-pos")
            c["b_prompt"] = gr.HTML(padding=False, elem_id="blind-prompt")
            with gr.Row():
                c["b_left"] = gr.Image(type="pil", format="png", label="Left", interactive=False, height=420,
                                       buttons=[], elem_id="blind-left-img")
                c["b_right"] = gr.Image(type="pil", format="png", label="Right", interactive=False, height=420,
                                        buttons=[], elem_id="blind-right-img")
            with gr.Row():
                c["b_vote_left"] = gr.Button("◀ Left is more realistic (Alt+←)", interactive=False,
                                             elem_id="blind-left")
                c["b_vote_right"] = gr.Button("Right is more realistic (Alt+→) ▶", interactive=False,
                                              elem_id="blind-right")
            with gr.Row():
                c["b_tag"] = gr.Textbox(label="Artefact tag (Alt+F; goes with your vote, on the image you did not "
                                              "pick)", max_length=40, scale=4, elem_id="blind-tag")
                c["b_flag"] = gr.Button("Flag artefact (no preference)", interactive=False, scale=1,
                                        elem_id="blind-flag")
            c["b_notice"] = gr.HTML(padding=False, elem_id="blind-notice")
            c["b_results"] = gr.HTML(padding=False, elem_id="blind-results")
        with gr.Tab("Ablation", id="cmp-ablation") as ablation_tab:
            c["ablation"] = build_ablation_panel(ctx, ablation_tab)
    timer = gr.Timer(POLL_S, active=False)

    form = [c[f] for f in FORM_FIELDS]
    view_out = [c[k] for k in ("table_html", "table", "warnings", "line", "bar")]
    grid_out = [c[k] for k in ("gallery", "grid_table", "grid_note", "grid_class", "slider_row", "slider_a",
                               "slider_b")]
    grid_in = [c["results"], c["grid_class"], c["grid_max"]]

    def compare_outputs(ids, metric) -> tuple:
        v = compare_view(ctx, ids, metric)
        lab = v["metric_label"]
        return (v["table_html"], v["table"], v["warnings"], gr.LinePlot(value=v["line"], y_title=lab),
                gr.BarPlot(value=v["bar"], y_title=f"{lab} per class"))

    def grid_outputs(ids, label, max_rows) -> tuple:
        g = grid_view(ctx, ids, label, max_rows)
        return (gr.Gallery(value=g["items"] or None, columns=g["columns"]), g["table"], g["note"],
                gr.Dropdown(choices=[ALL] + g["classes"], value=g["label"]),
                gr.Dropdown(choices=g["rows"], value=g["rows"][0][1] if g["rows"] else None),
                gr.Dropdown(choices=g["cols"], value=g["cols"][0] if g["cols"] else None),
                gr.Dropdown(choices=g["cols"], value=g["cols"][1] if len(g["cols"]) > 1 else None))

    def all_outputs(ids, metric, label, max_rows, dataset) -> tuple:
        choices = result_choices(ctx, dataset or None)
        return (gr.Dropdown(choices=choices, value=list(ids)), *compare_outputs(ids, metric),
                *grid_outputs(ids, label, max_rows))

    # -- page load: choices, reviewer, and the user's running evaluation (re-arms the timer) -----------
    # The tab is for trainers (studio.app.TABS); what a blind reviewer needs is open to annotators.
    @requires(ANNOTATOR)
    @user_errors
    def on_load(remembered: str, request: gr.Request):
        owner = ctx.reviewer_for(request, None)
        ds = dataset_names(ctx)
        job = active_job(ctx, owner)
        jv = job_view(ctx, job.id if job else None)
        # No remembered name: leave the field alone, or a name typed while the page loads would be wiped.
        rev = (gr.Textbox(value=owner, interactive=False) if owner else
               gr.Textbox(value=remembered) if remembered else gr.Textbox())
        return (gr.Dropdown(choices=checkpoint_choices(ctx)), gr.Dropdown(choices=ds, value=ds[0] if ds else None),
                gr.Dropdown(choices=study_names(ctx)), rev, job.id if job else "", jv["text"],
                gr.Timer(active=jv["active"]), gr.Button(interactive=jv["can_stop"]))

    root = gr.context.Context.root_block
    if root is not None:
        root.load(on_load, [saved_name], [c["checkpoints"], c["dataset"], c["b_study"], c["b_reviewer"], c["job"],
                                          c["status"], timer, c["stop"]], api_name="compare_page_load", **quiet)

    c["ck_refresh"].click(lambda cur: gr.Dropdown(choices=checkpoint_choices(ctx), value=cur), c["checkpoints"],
                          c["checkpoints"], api_name="compare_checkpoints", queue=False)

    # -- run / poll / stop ---------------------------------------------------------------------------------
    @user_errors
    def on_run(request: gr.Request, checkpoints, *f):
        job = submit_evaluation(ctx, ctx.reviewer_for(request, None), checkpoints, *f)
        jv = job_view(ctx, job.id)
        return job.id, jv["text"], jv["log"], gr.Timer(active=True), gr.Button(interactive=True)

    c["run"].click(on_run, [c["checkpoints"], *form], [c["job"], c["status"], c["log"], timer, c["stop"]],
                   api_name="compare_run", concurrency_limit=4)

    status_out = [c["status"], c["log"], timer, c["stop"], c["results"], *view_out, *grid_out]

    @user_errors
    def on_status(job_id, metric, label, max_rows, dataset):
        jv = job_view(ctx, job_id)
        head = (jv["text"], jv["log"], gr.Timer(active=jv["active"]), gr.Button(interactive=jv["can_stop"]))
        if jv["result_ids"]:
            return head + all_outputs(jv["result_ids"], metric, label, max_rows, dataset)
        return head + (gr.skip(),) * (1 + len(view_out) + len(grid_out))

    # O(1) per tick (one ledger row, a bounded log tail); views are built once, when the job is done.
    timer.tick(on_status, [c["job"], c["metric"], c["grid_class"], c["grid_max"], c["dataset"]], status_out,
               api_name="compare_status", concurrency_limit=None, **quiet)

    @user_errors
    def on_stop(job_id):
        stop_evaluation(ctx, job_id)
        jv = job_view(ctx, job_id)
        return jv["text"], gr.Button(interactive=jv["can_stop"])

    c["stop"].click(on_stop, c["job"], [c["status"], c["stop"]], api_name="compare_stop", concurrency_limit=None,
                    **quiet)

    # -- load / show -----------------------------------------------------------------------------------------
    load_out = [c["results"], *view_out, *grid_out]

    @user_errors
    def on_load_results(dataset, checkpoints, metric, label, max_rows):
        return all_outputs(pick_results(ctx, dataset, checkpoints), metric, label, max_rows, dataset)

    c["load"].click(on_load_results, [c["dataset"], c["checkpoints"], c["metric"], c["grid_class"], c["grid_max"]],
                    load_out, api_name="compare_load")

    @user_errors
    def on_show(ids, metric, label, max_rows):
        return (*compare_outputs(ids, metric), *grid_outputs(ids, label, max_rows))

    c["results"].input(on_show, [c["results"], c["metric"], c["grid_class"], c["grid_max"]], view_out + grid_out,
                       api_name="compare_show", **quiet)

    @user_errors
    def on_metric(ids, metric):
        return compare_outputs(ids, metric)

    c["metric"].input(on_metric, [c["results"], c["metric"]], view_out, api_name="compare_metric", **quiet)

    @user_errors
    def on_grid(ids, label, max_rows):
        return grid_outputs(ids, label, max_rows)

    c["grid_refresh"].click(on_grid, grid_in, grid_out, api_name="compare_grid", **quiet)
    c["grid_class"].input(on_grid, grid_in, grid_out, api_name=False, **quiet)

    @user_errors
    def on_slide(ids, row, a, b):
        return slider_images(ctx, ids, row, a, b)

    c["slide"].click(on_slide, [c["results"], c["slider_row"], c["slider_a"], c["slider_b"]], c["slider"],
                     api_name="compare_slider")

    @user_errors
    def on_export(ids, label, max_rows):
        return export_grid(ctx, ids, label, max_rows)

    c["export"].click(on_export, grid_in, c["export_file"], api_name="compare_export")

    # -- blind review: coordinator ---------------------------------------------------------------------------
    @user_errors
    def on_list(dataset):
        ch = result_choices(ctx, dataset or None)
        return gr.Dropdown(choices=ch, value=None), gr.Dropdown(choices=ch, value=None), next_study_name(ctx)

    c["b_list"].click(on_list, c["dataset"], [c["b_a"], c["b_b"], c["b_name"]], api_name="blind_list_results",
                      **quiet)

    @user_errors
    def on_create(name, kind, a_id, b_id, request: gr.Request):
        created, msg = create_study(ctx, ctx.reviewer_for(request, None), name, kind, a_id, b_id)
        # The source pickers are cleared so the page no longer names the sources.
        return (f"<p class='cmp-note'>{esc(msg)}</p>", gr.Dropdown(choices=[], value=None),
                gr.Dropdown(choices=[], value=None), "", gr.Dropdown(choices=study_names(ctx), value=created))

    c["b_create"].click(on_create, [c["b_name"], c["b_kind"], c["b_a"], c["b_b"]],
                        [c["b_setup_note"], c["b_a"], c["b_b"], c["b_name"], c["b_study"]],
                        api_name="blind_create")

    @user_errors
    def on_coord(study):
        return coordinator_results(ctx, study)

    c["b_show_results"].click(on_coord, c["b_study"], c["b_coord"], api_name="blind_results")

    # -- blind review: reviewer --------------------------------------------------------------------------------
    b_out = [c["b_state"], c["b_pos"], c["b_prompt"], c["b_left"], c["b_right"], c["b_vote_left"],
             c["b_vote_right"], c["b_flag"], c["b_notice"], c["b_results"], c["b_tag"]]

    def b_outputs(v: dict[str, Any], clear_tag: bool) -> tuple:
        on = gr.Button(interactive=v["enabled"])
        notice = f"<div class='cmp-note'>{esc(v['notice'])}</div>" if v["notice"] else ""
        return (v["state"], v["position"], v["prompt"], v["left"], v["right"], on, on, on, notice, v["results"],
                "" if clear_tag else gr.skip())

    def keep(message, *args, **kwargs):
        return (gr.skip(),) * 8 + (f"<div class='cmp-warn'>{esc(message)}</div>", gr.skip(), gr.skip())

    @requires(ANNOTATOR)
    @user_errors(keep=keep)
    def on_start(study, typed, request: gr.Request):
        return b_outputs(blind_view(ctx, study, ctx.reviewer_for(request, typed)), clear_tag=True)

    fast = dict(show_progress="hidden", trigger_mode="once")
    c["b_start"].click(on_start, [c["b_study"], c["b_reviewer"]], b_out, api_name="blind_start", **fast)
    c["b_study"].input(on_start, [c["b_study"], c["b_reviewer"]], b_out, api_name=False, **fast)

    def voter(choice: Optional[str]):
        @requires(ANNOTATOR)
        @user_errors(keep=keep)
        def on_vote(state, typed, tag, request: gr.Request):
            return b_outputs(blind_vote(ctx, state, ctx.reviewer_for(request, typed), choice, tag), clear_tag=True)
        return on_vote

    vote_in = [c["b_state"], c["b_reviewer"], c["b_tag"]]
    c["b_vote_left"].click(voter("left"), vote_in, b_out, api_name="blind_vote_left", **fast)
    c["b_vote_right"].click(voter("right"), vote_in, b_out, api_name="blind_vote_right", **fast)
    c["b_flag"].click(voter(None), vote_in, b_out, api_name="blind_flag", **fast)

    @requires(ANNOTATOR)
    @user_errors
    def on_reviewer(name):
        return (name or "").strip()[:MAX_REVIEWER_CHARS]

    c["b_reviewer"].change(on_reviewer, c["b_reviewer"], saved_name, api_name=False, queue=False, **quiet)
    c["timer"] = timer
    return c
