"""Generate tab: prompts (or a dataset class's approved captions) → images from the base model or any
checkpoint, with the seed shown, every image a lossless PNG with a sidecar; reuse or regenerate a past one.

The work is ``medart_core.generate``: one shared :class:`~medart_core.generate.Generator` per backbone keeps
the base model resident and swaps adapters, so switching checkpoints here costs an adapter load, not a model
load. A few images are sampled inside the handler with ``gr.Progress``; big grids go to a ``generate`` job
("Generate as a job", the same form values) on the "Run on" executor (this machine's supervisor or a Slurm
cluster; a trainer may pick any), followed by the shared :class:`~studio.job_panel.JobPanel`, whose images fill
the gallery once the job is done. Handlers are plain functions of ``(ctx, inputs)`` so tests call them directly; every one is wrapped in
``studio.errors.user_errors`` (a library error becomes a ``gr.Error`` message, not a traceback).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from medart_core import generate as G
from medart_core.constants import MAX_TOKENS, RANDOM_LABEL
from medart_core.errors import MedArtError
from medart_core.executors import LOCAL
from medart_core.jobs import DONE, Job
from medart_core.spaces import gpu_call

from .context import StudioContext
from .errors import user_errors
from .executors_panel import chosen_executor, run_on_dropdown, run_on_update
from .forms import as_tuple, bind, inputs_of
from .job_panel import JobPanel, only
from .render import esc

MAX_PROMPTS = 16          # lines of the prompt box sampled in one click (each line is a prompt)
MAX_IMAGES = 64           # per click; more is a job
MAX_JOB_PROMPTS = 256     # prompt lines of one generate job
MAX_JOB_IMAGES = 4096     # images of one generate job
JOB_LOG_LINES = 12
RECENT = 40               # past images offered for "reuse these settings"
# The generation form: run_generate's parameters, in their order (also the API's inputs of /generate).
FORM_FIELDS = ["prompt", "negative", "checkpoint", "strength", "steps", "guidance", "seed", "random_seed", "n",
               "resolution"]


# ---- handlers: plain functions of (ctx, inputs) ------------------------------------------------------------
def split_prompts(text: str | None) -> list[str]:
    """One prompt per non-empty line of the prompt box."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def token_counter(ctx: StudioContext, text: str | None) -> str:
    """Per prompt line: "n / 120 tokens", and what truncation would cut; names the tokenizer counting."""
    from medart_core.caption_ops import token_preview

    tok, name = ctx.prompt_tokenizer()      # made once per backbone, held by the context
    lines = split_prompts(text) or [""]
    rows = []
    for i, p in enumerate(lines[:MAX_PROMPTS]):
        pv = token_preview(tok, p.lower(), MAX_TOKENS)
        cls = "gen-tok-over" if pv.over else "gen-tok-ok"
        shown = pv.cut if len(pv.cut) <= 120 else f"{pv.cut[:80]} … {pv.cut[-36:]}"
        cut = f" — over: never seen: <i>{html.escape(shown)}</i>" if pv.over else ""
        head = f"prompt {i + 1}: " if len(lines) > 1 else ""
        rows.append(f'<div class="{cls}">{head}<b>{pv.n_tokens}</b> / {MAX_TOKENS} tokens{cut}</div>')
    return (f'<div class="gen-tokens">{"".join(rows)}<div class="gen-tok-by">counted with '
            f"{html.escape(name)}</div></div>")


def banner(ctx: StudioContext) -> str:
    if ctx.backbone_is_random:
        return (f"**Backbone** {ctx.backbone_label()} — <span class='medart-random'>⚠ {RANDOM_LABEL}: its images "
                "are noise from random weights, for trying the studio out; every image below says so.</span>")
    return f"**Backbone** {ctx.backbone_label()}"


def checkpoint_choices(ctx: StudioContext) -> list[str]:
    return G.list_checkpoint_refs(ctx.ws)


def recent_choices(ctx: StudioContext) -> list[tuple[str, str]]:
    """(label, sidecar path) of the newest generated images."""
    out = []
    for p in G.recent_sidecars(ctx.ws, RECENT):
        try:
            s = G.read_sidecar(p)
        except MedArtError:
            continue
        out.append((f"{p.parent.name}/{p.stem} · {s['checkpoint']} · seed {s['seed']} · {s['prompt'][:40]}", str(p)))
    return out


def dataset_choices(ctx: StudioContext) -> list[str]:
    return [d.name for d in ctx.store.list_datasets()]


def class_choices(ctx: StudioContext, dataset: str | None) -> list[str]:
    return list(ctx.store.labels(dataset)) if dataset else []


def caption_choices(ctx: StudioContext, dataset: str | None, label: str | None) -> list[str]:
    """The distinct approved captions of one class (what training used, so the natural test prompts)."""
    if not dataset or not label:
        return []
    texts = [s.text for s in ctx.store.states(dataset, label=label, status="approved") if s.text]
    return list(dict.fromkeys(texts))[:200]


def _gallery(imgs: list[G.GeneratedImage]) -> list[tuple[str, str]]:
    return [(str(i.path), i.caption) for i in imgs]


def _details(imgs: list[G.GeneratedImage]) -> list[dict[str, Any]]:
    return [{"path": str(i.path), "sidecar": str(i.sidecar), "prompt": i.prompt, "seed": i.seed,
             "checkpoint": i.checkpoint, "sha256": i.sha256, "is_random": i.is_random,
             "label": RANDOM_LABEL if i.is_random else None, "warnings": i.warnings} for i in imgs]


def _summary(imgs: list[G.GeneratedImage], what: str) -> str:
    if not imgs:
        return ""
    s = imgs[0].settings
    seed = f"seed **{s['request_seed']}**" + (" (drawn at random)" if s.get("seed_was_random") else "")
    lines = [f"{what} {len(imgs)} image(s) · {seed} ({G.SEED_RULE}) · checkpoint **{s['checkpoint']}**"
             f"{' · strength %g' % s['strength'] if s['checkpoint'] != G.BASE else ''} · {s['steps']} steps · "
             f"guidance {s['guidance']:g} · {s['resolution']} px · `{imgs[0].path.parent}`"]
    if imgs[0].is_random:
        lines.append(f"<span class='medart-random'>⚠ {RANDOM_LABEL}: these images are noise.</span>")
    if "matches_original" in s:
        lines.append("Byte-equal to the original." if s["matches_original"] else
                     "⚠ Not byte-equal to the original (other hardware or software versions?).")
    lines += [f"⚠ {html.escape(w)}" for w in dict.fromkeys(w for i in imgs for w in i.warnings)]
    return "\n\n".join(lines)


def _generate(ws: Any, backbone: str, req: Any, progress: Any) -> Any:
    return G.get_generator(ws, backbone).generate(req, progress=progress)


# On ZeroGPU the GPU exists only inside a spaces.GPU call (defined once, at import); elsewhere this is _generate.
_generate_on_gpu = gpu_call(_generate, duration=120)


def build_request(prompt: str, negative: str, checkpoint: str, strength: float, steps: int, guidance: float,
                  seed: int | float | None, random_seed: bool, n: int, resolution: int | float | None, *,
                  job: bool = False) -> G.GenerationRequest:
    """The form's values as a generation request; ``job``: the limits of a generate job, not of one click."""
    prompts = split_prompts(prompt)
    if not prompts:
        raise gr.Error("Type a prompt (one per line for several), or pick a class caption below.")
    if job and (len(prompts) > MAX_JOB_PROMPTS or len(prompts) * int(n) > MAX_JOB_IMAGES):
        raise gr.Error(f"At most {MAX_JOB_PROMPTS} prompts and {MAX_JOB_IMAGES} images per generate job; split "
                       "the prompts over several jobs.")
    if not job and (len(prompts) > MAX_PROMPTS or len(prompts) * int(n) > MAX_IMAGES):
        raise gr.Error(f"At most {MAX_PROMPTS} prompts and {MAX_IMAGES} images per click; use \"Generate as a job\" "
                       "for bigger grids.")
    return G.GenerationRequest(prompts=prompts, negative=negative or "", checkpoint=checkpoint or G.BASE,
                               strength=float(strength), steps=int(steps), guidance=float(guidance),
                               seed=None if random_seed or seed is None else int(seed), n=int(n),
                               resolution=int(resolution) if resolution else None)


def run_generate(ctx: StudioContext, prompt: str, negative: str, checkpoint: str, strength: float, steps: int,
                 guidance: float, seed: int | float | None, random_seed: bool, n: int, resolution: int | float | None,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate ``n`` images per prompt line; returns gallery items, the summary, the seed used, details."""
    req = build_request(prompt, negative, checkpoint, strength, steps, guidance, seed, random_seed, n, resolution)
    imgs = _generate_on_gpu(ctx.ws, ctx.backbone_spec, req, progress)
    return {"gallery": _gallery(imgs), "summary": _summary(imgs, "Generated"),
            "seed": imgs[0].settings["request_seed"], "details": _details(imgs)}


def _own_sidecar(ctx: StudioContext, sidecar: str) -> str:
    """A sidecar path from the page or an API client, accepted only inside the workspace's samples folder."""
    from medart_core.errors import ConfigError

    p = Path(sidecar).resolve()
    root = Path(ctx.ws.samples_dir).resolve()
    if p.suffix != ".json" or root not in p.parents:
        raise ConfigError("Pick a past image from the list (only the studio's own samples can be reused).")
    return str(p)


def reuse_settings(ctx: StudioContext, sidecar: str | None) -> dict[str, Any]:
    """A past image's settings, to put back into the form (seed fixed, one image)."""
    if not sidecar:
        raise gr.Error("Pick a past image first.")
    sidecar = _own_sidecar(ctx, sidecar)
    r = G.load_settings(sidecar)
    return {"prompt": r.prompts[0], "negative": r.negative, "checkpoint": r.checkpoint, "strength": r.strength,
            "steps": r.steps, "guidance": r.guidance, "seed": r.seed, "random": False, "n": 1,
            "resolution": r.resolution, "notice": f"Loaded the settings of `{Path(sidecar).name}` "
                                                 f"(seed {r.seed}, {r.checkpoint})."}


def run_regenerate(ctx: StudioContext, sidecar: str | None) -> dict[str, Any]:
    if not sidecar:
        raise gr.Error("Pick a past image first.")
    sidecar = _own_sidecar(ctx, sidecar)
    s = G.read_sidecar(sidecar)
    img = G.get_generator(ctx.ws, s["backbone"], G.sidecar_precision(s)).regenerate(sidecar)   # its precision
    return {"gallery": _gallery([img]), "summary": _summary([img], "Regenerated"), "details": _details([img])}


# ---- a batch as a ``generate`` job, on the "Run on" executor ------------------------------------------------
def submit_generate_job(ctx: StudioContext, owner: str | None, form: dict[str, Any], executor: str = LOCAL) -> Job:
    """Submit the form (FORM_FIELDS -> value) as a ``generate`` job on ``executor``, with the tab's backbone
    (what a click would use); validated at submit (an unknown checkpoint fails here, not in the queue)."""
    req = build_request(**form, job=True)
    return ctx.executor.submit("generate", {"request": req.to_dict(), "backbone": ctx.backbone_spec}, owner=owner,
                               executor=executor)


def job_images(ctx: StudioContext, job: Job | None) -> list[G.GeneratedImage]:
    """The images a finished generate job saved (read from their sidecars; only the workspace's samples)."""
    if job is None or job.state != DONE:
        return []
    root = Path(ctx.ws.samples_dir).resolve()
    out = []
    for path in (job.result or {}).get("images") or []:
        p = Path(path).resolve()
        if root not in p.parents:
            continue
        try:
            out.append(G.load_image(p))
        except (MedArtError, KeyError, ValueError):
            continue
    return out


def describe_generate_job(job: Job) -> str:
    """The status line: ``id — state · step · ETA`` with where it runs, the images once done, a failure's reason."""
    text = f"<b>{esc(job.id)}</b> — {esc(job.progress_text())}"
    if job.executor and job.executor != LOCAL and job.executor not in job.progress_text():
        text += f" · on {esc(job.executor)}"
    if job.state == DONE:
        n = len((job.result or {}).get("images") or [])
        text += f" — {n} image(s) in <code>{esc((job.result or {}).get('folder') or '')}</code>, shown above"
    elif job.is_final:
        text += f" — {esc(job.error or job.state)}"
    return text


def generate_job_panel(ctx: StudioContext) -> JobPanel:
    return JobPanel(ctx, kind="generate", api="generate_job", describe=describe_generate_job,
                    log_lines=JOB_LOG_LINES)


# ---- events: what Gradio calls, as functions of (ctx, inputs); the form arrives as {field: value} ------------
@user_errors
def on_generate(ctx: StudioContext, form: dict[str, Any], progress: Any = gr.Progress()) -> tuple:
    """``form``: FORM_FIELDS → value. Outputs: gallery, summary, seed, details, the past-image list."""
    out = run_generate(ctx, **form, progress=lambda done, total: progress((done, total), desc="sampling"))
    return (out["gallery"], out["summary"], out["seed"], out["details"],
            gr.Dropdown(choices=recent_choices(ctx), value=out["details"][0]["sidecar"]))


@user_errors
def on_regenerate(ctx: StudioContext, sidecar: str | None, progress: Any = gr.Progress()) -> tuple:
    progress(0.0, desc="regenerating")
    out = run_regenerate(ctx, sidecar)
    return out["gallery"], out["summary"], out["details"], gr.Dropdown(choices=recent_choices(ctx))


REUSE_OUT = FORM_FIELDS + ["notice", "tokens"]


@user_errors
def on_reuse(ctx: StudioContext, sidecar: str | None) -> tuple:
    """A past image's settings back into the form (REUSE_OUT: the form, the notice, the token counter)."""
    r = reuse_settings(ctx, sidecar)
    values = {**r, "random_seed": r["random"], "tokens": token_counter(ctx, r["prompt"]),
              "checkpoint": gr.Dropdown(choices=checkpoint_choices(ctx), value=r["checkpoint"])}
    return as_tuple(REUSE_OUT, values)


def refresh_checkpoints(ctx: StudioContext, current: str | None) -> Any:
    return gr.Dropdown(choices=checkpoint_choices(ctx), value=current)


def refresh_recent(ctx: StudioContext) -> Any:
    return gr.Dropdown(choices=recent_choices(ctx))


@user_errors
def on_dataset(ctx: StudioContext, dataset: str | None) -> tuple:
    return gr.Dropdown(choices=class_choices(ctx, dataset), value=None), gr.Dropdown(choices=[], value=None), ""


@user_errors
def on_class(ctx: StudioContext, dataset: str | None, label: str | None) -> tuple:
    caps = caption_choices(ctx, dataset, label)
    note = "" if caps or not label else (f"No approved captions for **{label}** yet: approve some in the "
                                          "Captions tab.")
    return gr.Dropdown(choices=caps, value=caps[0] if caps else None), note


def use_caption(ctx: StudioContext, caption: str | None, current: str | None) -> tuple:
    """The picked class caption as the prompt (the prompt kept when none is picked), and its token count."""
    return caption or current, token_counter(ctx, caption or current)


@user_errors
def on_load(ctx: StudioContext, current: str | None) -> tuple:
    datasets = dataset_choices(ctx)
    return (gr.Dropdown(choices=datasets, value=datasets[0] if datasets else None),
            gr.Dropdown(choices=checkpoint_choices(ctx), value=current or G.BASE),
            gr.Dropdown(choices=recent_choices(ctx)), token_counter(ctx, ""))


# ---- layout: components only, by name ---------------------------------------------------------------------
CSS = """
.gen-tokens {font-size: 0.9em;} .gen-tok-over {color: #b91c1c;} .gen-tok-by {color: #6b7280; font-size: 0.85em;}
"""


def _class_prompts(c: dict[str, Any]) -> None:
    with gr.Accordion("Class prompts: a dataset class's approved captions", open=False):
        with gr.Row():
            c["dataset"] = gr.Dropdown([], value=None, label="Dataset", allow_custom_value=True)
            c["class"] = gr.Dropdown([], label="Class", allow_custom_value=True)
        c["caption"] = gr.Dropdown([], label="Approved caption", allow_custom_value=False)
        c["caption_notice"] = gr.Markdown()
        c["use_caption"] = gr.Button("Use this caption as the prompt", size="sm")


def _settings(c: dict[str, Any]) -> None:
    with gr.Row():
        # Custom values: "RUN" (its latest) and checkpoints written after the page was built.
        c["checkpoint"] = gr.Dropdown([G.BASE], value=G.BASE, label="Checkpoint (base = no adapters; RUN = its "
                                      "latest)", allow_custom_value=True, scale=3)
        c["checkpoint_refresh"] = gr.Button("↻", size="sm", scale=0, min_width=40)
        c["strength"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Adapter strength (LoRA scale)", scale=3)
    with gr.Row():
        c["steps"] = gr.Slider(1, 100, value=20, step=1, label="Steps (DPM-Solver++)")
        c["guidance"] = gr.Slider(0, 15, value=4.5, step=0.5, label="Guidance (CFG)")
    with gr.Row():
        c["seed"] = gr.Number(value=0, precision=0, minimum=0, label="Seed (image k of each prompt: seed + k)")
        c["random_seed"] = gr.Checkbox(value=True, label="Random seed")
        c["n"] = gr.Slider(1, 16, value=4, step=1, label="Images per prompt")
        c["resolution"] = gr.Number(value=0, precision=0, minimum=0, step=16,
                                    label="Resolution px (0 = the checkpoint's training size)")


def _results(c: dict[str, Any], is_random: bool) -> None:
    c["gallery"] = gr.Gallery(label=f"Images{' — ' + RANDOM_LABEL if is_random else ''}", format="png",
                              type="filepath", columns=4, height="auto", interactive=False,
                              buttons=["download", "fullscreen"])
    c["summary"] = gr.Markdown()
    with gr.Accordion("Files and sidecars", open=False):
        c["details"] = gr.JSON(label="Images")
    with gr.Row():
        c["recent"] = gr.Dropdown([], label="A past image", scale=4, allow_custom_value=True)
        c["recent_refresh"] = gr.Button("↻", size="sm", scale=0, min_width=40)
    with gr.Row():
        c["reuse"] = gr.Button("Reuse these settings", size="sm")
        c["regenerate"] = gr.Button("Regenerate (byte-exact)", size="sm")
    c["reuse_notice"] = gr.Markdown()


def layout(ctx: StudioContext) -> dict[str, Any]:
    """Lay out the tab in the current Blocks context (no events); its components by name, ``form`` among them
    (FORM_FIELDS → component)."""
    gr.HTML(f"<style>{CSS}</style>", padding=False)
    gr.Markdown(banner(ctx))
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=3):
            c["prompt"] = gr.Textbox(label="Prompt (one per line for several)", lines=3,
                                     placeholder="An endoscopic image of polyps, ...")
            c["tokens"] = gr.HTML("")
            c["negative"] = gr.Textbox(label="Negative prompt", value="", placeholder='"" as in the paper')
            _class_prompts(c)
            _settings(c)
            c["go"] = gr.Button("Generate", variant="primary")
            _job(c, generate_job_panel(ctx))
        with gr.Column(scale=4):
            _results(c, ctx.backbone_is_random)
    c["form"] = {k: c[k] for k in FORM_FIELDS}
    return c


def _job(c: dict[str, Any], panel: JobPanel) -> None:
    """"Generate as a job" on the Run-on executor, and the job's panel (status, Stop, log)."""
    c["job_panel"] = panel
    with gr.Accordion("A batch as a job (this machine's queue or a Slurm cluster)", open=False):
        with gr.Row():
            c["run_on"] = run_on_dropdown("gen-run-on", scale=2)
            c["go_job"] = gr.Button("Generate as a job", elem_id="gen-job-run", scale=1)
            c["job_stop"] = panel.render_stop(elem_id="gen-job-stop", scale=0)
        with gr.Row():
            c["job"] = panel.render_job(scale=1, elem_id="gen-job")
            c["job_status"] = panel.render_status(elem_id="gen-job-status", padding=False)
        c["job_log"] = panel.render_log(elem_id="gen-job-log")
        panel.render_timer()


# ---- wiring -------------------------------------------------------------------------------------------------
def _listen_class_prompts(ctx: StudioContext, c: dict[str, Any]) -> None:
    c["dataset"].change(bind(ctx, on_dataset), c["dataset"], [c["class"], c["caption"], c["caption_notice"]],
                        api_name="generate_classes")
    c["class"].change(bind(ctx, on_class), [c["dataset"], c["class"]], [c["caption"], c["caption_notice"]],
                      api_name="generate_captions")
    c["use_caption"].click(bind(ctx, use_caption), [c["caption"], c["prompt"]], [c["prompt"], c["tokens"]],
                           api_name="generate_use_caption", queue=False)


def listen(ctx: StudioContext, c: dict[str, Any]) -> None:
    """Wire the components ``layout`` made."""
    form, recent = c["form"], c["recent"]
    c["go"].click(bind(ctx, on_generate, form=list(form)), inputs_of(form),
                  [c["gallery"], c["summary"], c["seed"], c["details"], recent], api_name="generate",
                  concurrency_limit=1)
    c["regenerate"].click(bind(ctx, on_regenerate), recent, [c["gallery"], c["summary"], c["details"], recent],
                          api_name="generate_regenerate", concurrency_limit=1)
    c["reuse"].click(bind(ctx, on_reuse), recent, inputs_of(form, c["reuse_notice"], c["tokens"]),
                     api_name="generate_reuse")
    c["prompt"].input(bind(ctx, token_counter), c["prompt"], c["tokens"], api_name="generate_tokens",
                      show_progress="hidden", trigger_mode="always_last", queue=False)
    c["checkpoint_refresh"].click(bind(ctx, refresh_checkpoints), c["checkpoint"], c["checkpoint"],
                                  api_name="generate_checkpoints", queue=False)
    c["recent_refresh"].click(bind(ctx, refresh_recent), None, recent, api_name="generate_recent", queue=False)
    _listen_class_prompts(ctx, c)
    _listen_job(ctx, c)
    root = gr.context.Context.root_block
    if root is not None:
        root.load(bind(ctx, on_load), c["checkpoint"], [c["dataset"], c["checkpoint"], recent, c["tokens"]],
                  api_name="generate_load", show_progress="hidden")


def job_show(ctx: StudioContext, c: dict[str, Any], job_id: str | None) -> dict[Any, Any]:
    """The panel's view of the job and, once it is done, its images in the gallery (summary, details)."""
    panel: JobPanel = c["job_panel"]
    v = panel.view(job_id)
    out = panel.updates(v)
    imgs = job_images(ctx, v.job)
    if imgs:
        out.update({c["gallery"]: _gallery(imgs), c["summary"]: _summary(imgs, "Generated (job)"),
                    c["details"]: _details(imgs)})
    return out


def _listen_job(ctx: StudioContext, c: dict[str, Any]) -> None:
    panel: JobPanel = c["job_panel"]
    form = c["form"]
    outs = [*panel.outputs, c["gallery"], c["summary"], c["details"]]

    # "Run on" is the last input (an API client may leave it out: local).
    @user_errors
    def on_job(request: gr.Request, *values: Any) -> dict[Any, Any]:
        *vals, where = values if len(values) > len(form) else (*values, LOCAL)
        job = submit_generate_job(ctx, ctx.reviewer_for(request, None), dict(zip(form, vals)),
                                  chosen_executor(ctx, request, where))
        return only(panel.updates(panel.view(job)), panel.outputs)

    c["go_job"].click(on_job, [*inputs_of(form), c["run_on"]], panel.outputs, api_name="generate_job_run",
                      concurrency_limit=4)
    panel.listen(lambda job_id: job_show(ctx, c, job_id), outputs=outs)
    root = gr.context.Context.root_block
    if root is not None:   # the executors with the page (the tab's trainer role), never at build time
        root.load(user_errors(lambda cur: run_on_update(ctx, cur)), c["run_on"], c["run_on"],
                  api_name="generate_executors", show_progress="hidden")


def build_generate_tab(ctx: StudioContext) -> dict[str, Any]:
    """Build the Generate tab inside the caller's ``gr.Tab``; returns its components by name."""
    ctx.ws.samples_dir.mkdir(parents=True, exist_ok=True)
    # Only generated samples are served from here (PNG paths, never re-encoded to webp).
    gr.set_static_paths([str(ctx.ws.samples_dir)])
    # Nothing from the workspace at build time (it would reach /config for every role) and nothing slow (the
    # studio must start fast): datasets, checkpoints, past images and the token counter come with the guarded
    # page load.
    c = layout(ctx)
    listen(ctx, c)
    return c
