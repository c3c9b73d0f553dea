"""The Compare tab's Metrics panel: FD/KID/PRDC of checkpoints under one recorded protocol. "Run evaluation"
submits an ``evaluate`` job through the workspace's Executor, to run on the "Run on" executor (the shared
``studio.job_panel.JobPanel`` follows it: one job row per tick) or "Load results" reads ``W/evaluations/``. The table marks the best value of a
column only when it lies outside every other comparable row's interval (``evaluate.comparison_table``);
results measured with another profile are greyed out with the reason and never ranked. Under the table, each
comparable row is compared paired with the first (``evaluate.compare_paired``): "A better than B" only where the
paired interval excludes 0, "not separated" otherwise. Rows are in checkpoint
order, never sorted by a metric.

The form (``FORM_FIELDS``) travels as one dict by field name (``form_values`` zips it, in one place).
Layout (``render_metrics``) apart from wiring (``listen_metrics``).
"""
# No ``from __future__ import annotations``: Gradio inspects the real ``gr.Request`` annotation of the
# handlers below to inject the request.
import dataclasses
import math
from typing import Any, Mapping, Sequence

import gradio as gr
import pandas as pd

from medart_core import evaluate as E
from medart_core.constants import RANDOM_LABEL
from medart_core.errors import ConfigError, NotFoundError
from medart_core.executors import LOCAL
from medart_core.generate import list_checkpoint_refs
from medart_core.jobs import DONE, Job

from .context import StudioContext
from .errors import user_errors
from .executors_panel import chosen_executor, run_on_dropdown, run_on_update
from .job_panel import JobPanel, only
from .render import esc

LOG_LINES = 8
EXTRACTORS = ("domain", "inception", "dinov2")
# (key in the comparison rows, column title, lower is better)
METRICS: list[tuple[str, str, bool]] = [("fd", "FD", True), ("kid", "KID", True), ("precision", "precision", False),
                                        ("recall", "recall", False), ("density", "density", False),
                                        ("coverage", "coverage", False)]
METRIC_LABEL = {k: t for k, t, _ in METRICS}
FORM_FIELDS = ("dataset", "extractor", "extractor_weights", "per_class", "captions", "steps", "guidance", "size",
               "seed", "n_boot", "kid_subsets", "min_samples")


def form_values(values: Sequence[Any]) -> dict[str, Any]:
    """The form's values, in ``FORM_FIELDS`` order, by name: the one place positions become names."""
    return dict(zip(FORM_FIELDS, values))


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


def make_spec(form: Mapping[str, Any]) -> E.EvalSpec:
    """The metric profile's inputs from the form, by field name (the EvalSpec the job runs)."""
    f = form
    if not f.get("dataset"):
        raise ConfigError("Pick a dataset to evaluate against (its real images are the reference set).")
    if f.get("extractor") not in EXTRACTORS:
        raise ConfigError(f"extractor must be one of {EXTRACTORS}, got {f.get('extractor')!r}.")
    if f.get("captions") not in ("approved", "latest"):
        raise ConfigError("captions must be 'approved' or 'latest'.")
    return E.EvalSpec(dataset=f["dataset"], extractor=f["extractor"],
                      extractor_weights=(f.get("extractor_weights") or "").strip() or None,
                      per_class=_int(f.get("per_class"), "Images per class", 1), captions=f["captions"],
                      steps=_int(f.get("steps"), "Steps", 1), guidance=float(f.get("guidance")),
                      size=_int(f.get("size"), "Size", 16), seed=_int(f.get("seed"), "Seed", 0),
                      n_boot=_int(f.get("n_boot"), "Bootstrap resamples", 0),
                      kid_subsets=_int(f.get("kid_subsets"), "KID subsets", 1),
                      min_samples=_int(f.get("min_samples"), "Minimum N", 1))


def submit_evaluation(ctx: StudioContext, owner: str | None, checkpoints: Sequence[str] | None,
                      form: Mapping[str, Any], executor: str = LOCAL) -> Job:
    """Queue an ``evaluate`` job through the Executor (which starts the supervisor if none runs) to run on
    ``executor``. The generator's backbone is the first run's training backbone; for base alone, the studio's."""
    refs = [str(c) for c in (checkpoints or []) if c]
    if not refs:
        raise ConfigError("Pick at least one checkpoint to evaluate (base, or a run's step).")
    spec = make_spec(form)
    backbone = None if any(r != "base" for r in refs) else ctx.backbone_spec
    return ctx.executor.submit("evaluate", {"spec": dataclasses.asdict(spec), "checkpoints": refs,
                                            "backbone": backbone}, owner=owner, executor=executor)


def result_ids(job: Job | None) -> list[str] | None:
    """The saved results of a finished evaluation job (None until it is done)."""
    if job is None or job.state != DONE:
        return None
    return list((job.result or {}).get("results") or [])


def describe_evaluation(job: Job) -> str:
    """The status line: ``id — state · step · ETA``, the results once done, a failure's reason."""
    text = f"<b>{esc(job.id)}</b> — {esc(job.progress_text())}"
    if job.state == DONE:
        text += f" — {len(result_ids(job))} result(s) loaded below"
    elif job.is_final:
        text += f"<div class='cmp-warn'>{esc(job.error or job.state)}</div>"
    return text


def evaluation_panel(ctx: StudioContext) -> JobPanel:
    return JobPanel(ctx, kind="evaluate", api="compare", describe=describe_evaluation, log_lines=LOG_LINES)


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


def paired_figures(ctx: StudioContext, table: dict[str, Any], results: dict[str, E.EvalResult]
                   ) -> list[dict[str, Any]]:
    """Each comparable row against the first comparable one (the base, in checkpoint order), paired
    (``evaluate.compare_paired``); a pair that cannot be paired carries the reason instead."""
    comp = [r for r in table["rows"] if r["comparable"]]
    out = []
    for r in comp[1:]:
        try:
            out.append(E.compare_paired(ctx.ws, results[r["id"]], results[comp[0]["id"]]))
        except (ConfigError, NotFoundError) as e:
            out.append({"a": r["checkpoint"], "b": comp[0]["checkpoint"], "result_a": r["id"],
                        "result_b": comp[0]["id"], "error": str(e)})
    return out


def paired_html(pairs: Sequence[dict[str, Any]]) -> str:
    """One line per pair under the table: "A better than B" only where the paired 95 % interval of the
    difference excludes 0, "not separated" otherwise."""
    from medart_core.paired import describe

    if not pairs:
        return ""
    out = ["<div class='cmp-paired' id='cmp-paired'><p class='cmp-legend'>Paired against the first row (same "
           "real images, seed-matched generated images; A − B with a 95 % interval: paired bootstrap for FD and "
           "KID, paired t for the per-image colour gap):</p><ul>"]
    for p in pairs:
        head = f"{esc(p['a'])} vs {esc(p['b'])}"
        if "error" in p:
            out.append(f"<li class='cmp-paired-row' data-result='{esc(p['result_a'])}'>{head}: not paired — "
                       f"{esc(p['error'])}</li>")
            continue
        parts = []
        for key, label in (("fd", "FD"), ("kid", "KID"), ("color_gap", "colour gap")):
            f = p.get(key)
            if not f:
                continue
            ci = f" [{_num(f['ci'][0])}, {_num(f['ci'][1])}]" if f.get("ci") else ""
            parts.append(f"{label} Δ {_num(f['diff'])}{ci}: <b>{esc(describe(f['verdict'], p['a'], p['b']))}</b>")
        out.append(f"<li class='cmp-paired-row' data-result='{esc(p['result_a'])}'>{head} (N={p['n_real']}): "
                   + "; ".join(parts) + "</li>")
    out.append("</ul></div>")
    return "".join(out)


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
    # The paired verdicts live under the table (its columns and the ★ rule unchanged).
    table["paired"] = paired_figures(ctx, table, by_id) if results else []
    return {"table_html": table_html(table, by_id) + paired_html(table["paired"]), "table": table,
            "warnings": warnings_html(results, ref),
            "line": metric_by_step(table, metric), "bar": per_class_frame(results, table, metric),
            "metric_label": METRIC_LABEL[metric]}




# ------------------------------------------------------------------------------------------------
# Layout and wiring
# ------------------------------------------------------------------------------------------------
def render_metrics(c: dict[str, Any], panel: JobPanel) -> None:
    """Checkpoints and dataset, the metric profile (``c["form"]``, by field name), the job panel, the results
    table and its plots."""
    with gr.Row():
        # Choices arrive on page load; custom values: checkpoints written after the page was built.
        c["checkpoints"] = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True, scale=4,
                                       elem_id="cmp-checkpoints", label="Checkpoints (base = no adapters; RUN@STEP)")
        c["ck_refresh"] = gr.Button("↻", size="sm", scale=0, min_width=40)
        c["dataset"] = gr.Dropdown([], value=None, allow_custom_value=True, label="Dataset (real images)",
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
    c["form"] = {k: c[k] for k in FORM_FIELDS}
    _render_job(c, panel)
    _render_results(c)


def _render_job(c: dict[str, Any], panel: JobPanel) -> None:
    with gr.Row():
        c["run_on"] = run_on_dropdown("cmp-run-on", scale=1)
        c["run"] = gr.Button("Run evaluation (as a job)", variant="primary", elem_id="cmp-run")
        c["stop"] = panel.render_stop(elem_id="cmp-stop", scale=0)
        c["load"] = gr.Button("Load results", elem_id="cmp-load")
    with gr.Row():
        c["job"] = panel.render_job(scale=1, elem_id="cmp-job")
        c["status"] = panel.render_status(elem_id="cmp-status", padding=False)
    with gr.Accordion("Job log", open=False):
        c["log"] = panel.render_log(elem_id="cmp-log")


def _render_results(c: dict[str, Any]) -> None:
    c["results"] = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                               label="Results shown (one per checkpoint; the newest sets the reference profile)",
                               elem_id="cmp-results")
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


def view_components(c: dict[str, Any]) -> list[Any]:
    return [c[k] for k in ("table_html", "table", "warnings", "line", "bar")]


def view_updates(ctx: StudioContext, c: dict[str, Any], ids: Any, metric: Any) -> dict[Any, Any]:
    """``{component: value}`` of the table, warnings and plots of the results ``ids``."""
    v = compare_view(ctx, ids, metric)
    lab = v["metric_label"]
    return {c["table_html"]: v["table_html"], c["table"]: v["table"], c["warnings"]: v["warnings"],
            c["line"]: gr.LinePlot(value=v["line"], y_title=lab),
            c["bar"]: gr.BarPlot(value=v["bar"], y_title=f"{lab} per class")}


def listen_metrics(ctx: StudioContext, c: dict[str, Any], panel: JobPanel) -> None:
    """Refresh the checkpoints, run an evaluation as a job, re-plot another metric. (The job's tick and the
    result loading fill the Side-by-side panel too: ``compare_tab`` wires them.)"""
    c["ck_refresh"].click(lambda cur: gr.Dropdown(choices=checkpoint_choices(ctx), value=cur), c["checkpoints"],
                          c["checkpoints"], api_name="compare_checkpoints", queue=False)
    run_out = [c["job"], c["status"], c["log"], panel.timer, c["stop"]]

    # "Run on" is the last input (an API client may leave it out: local).
    @user_errors
    def on_run(request: gr.Request, checkpoints, *values):
        *form, where = values
        job = submit_evaluation(ctx, ctx.reviewer_for(request, None), checkpoints, form_values(form),
                                chosen_executor(ctx, request, where))
        return only(panel.updates(panel.view(job)), run_out)

    c["run"].click(on_run, [c["checkpoints"], *c["form"].values(), c["run_on"]], run_out, api_name="compare_run",
                   concurrency_limit=4)
    root = gr.context.Context.root_block
    if root is not None:   # the executors with the page (trainer role, the tab's), never at build time
        root.load(user_errors(lambda cur: run_on_update(ctx, cur)), c["run_on"], c["run_on"],
                  api_name="compare_executors", show_progress="hidden")

    @user_errors
    def on_metric(ids, metric):
        return view_updates(ctx, c, ids, metric)

    c["metric"].input(on_metric, [c["results"], c["metric"]], view_components(c), api_name="compare_metric",
                      show_progress="hidden")
