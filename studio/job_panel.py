"""One job panel for every tab that runs a job (Fine-tune, Compare → Metrics, the Ablation panel): the job's
id, a status line with progress and ETA, Stop, Resume, the log's tail and the live timer that follows the
job — all through the workspace's one Executor (``ctx.executor``), never a ledger of its own.

Layout apart from wiring, as facefusion's UI components: the ``render_*`` methods lay the pieces out where
the tab puts them (each with the tab's own element id), ``listen`` wires the timer and Stop. Handlers return
``{component: value}`` dicts, so a tab adds its own outputs (plots, result tables) to the panel's without
positional bookkeeping, while the output lists keep the order the tab declares (the API's order).

The poll is O(1) per tick: one job row and a bounded log tail.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import gradio as gr

from medart_core.errors import ConfigError
from medart_core.jobs import ACTIVE, DONE, QUEUED, RUNNING, Job

from .context import StudioContext
from .errors import user_errors
from .render import esc

LIVE = (QUEUED,) + ACTIVE          # the timer runs while the job is one of these
STOPPABLE = (QUEUED, RUNNING)      # a stopping job needs no second press
QUIET = dict(show_progress="hidden")


def status_line(job: Job) -> str:
    """``id — state · step · ETA``, with a failed or interrupted job's reason."""
    text = f"<b>{esc(job.id)}</b> — {esc(job.progress_text())}"
    if job.is_final and job.state != DONE:
        text += f" — {esc(job.error or job.state)}"
    return text


@dataclass
class JobView:
    """What the panel shows of one job (``job`` None: no job yet)."""

    job: Job | None
    text: str = ""
    log: str = ""

    @property
    def job_id(self) -> str:
        return self.job.id if self.job else ""

    @property
    def active(self) -> bool:
        return bool(self.job and self.job.state in LIVE)

    @property
    def can_stop(self) -> bool:
        return bool(self.job and self.job.state in STOPPABLE)

    @property
    def can_resume(self) -> bool:
        return bool(self.job and self.job.resumable)


def only(updates: dict[Any, Any], outputs: Sequence[Any]) -> dict[Any, Any]:
    """The updates of the components an event lists as outputs (Gradio refuses any other)."""
    ids = {o._id for o in outputs}
    return {k: v for k, v in updates.items() if k._id in ids}


class JobPanel:
    """A reusable job display for jobs of one ``kind``; ``api`` prefixes its endpoints (``<api>_status``,
    ``<api>_stop``). ``describe`` turns a job into the status line; ``log_lines`` 0 shows no log."""

    def __init__(self, ctx: StudioContext, *, kind: str, api: str, describe: Callable[[Job], str] = status_line,
                 log_lines: int = 0, poll_s: float = 2.0) -> None:
        self.ctx, self.kind, self.api, self.describe = ctx, kind, api, describe
        self.log_lines, self.poll_s = log_lines, poll_s
        self.job: gr.Textbox | None = None
        self.status: gr.HTML | None = None
        self.log: gr.Code | None = None
        self.stop: gr.Button | None = None
        self.resume: gr.Button | None = None
        self.timer: gr.Timer | None = None

    # ---- layout ------------------------------------------------------------------------------------------
    def render_job(self, **kw: Any) -> gr.Textbox:
        self.job = gr.Textbox(**{"label": "Job", "interactive": False, **kw})
        return self.job

    def render_status(self, **kw: Any) -> gr.HTML:
        self.status = gr.HTML(**kw)
        return self.status

    def render_stop(self, **kw: Any) -> gr.Button:
        self.stop = gr.Button("Stop", **{"variant": "stop", "interactive": False, **kw})
        return self.stop

    def render_resume(self, **kw: Any) -> gr.Button:
        self.resume = gr.Button("Resume", **{"interactive": False, **kw})
        return self.resume

    def render_log(self, **kw: Any) -> gr.Code:
        self.log = gr.Code(**{"language": None, "lines": self.log_lines, "interactive": False, **kw})
        return self.log

    def render_timer(self) -> gr.Timer:
        self.timer = gr.Timer(self.poll_s, active=False)
        return self.timer

    def render(self, *, show_job: bool = True, stop: bool = False) -> "JobPanel":
        """The plain layout: the job beside its status line (or a hidden job id above it), Stop if asked,
        the log if it has lines, and the timer."""
        if show_job:
            with gr.Row():
                self.render_job(scale=1)
                self.render_status(padding=False)
        else:
            self.render_job(visible=False)
            self.render_status()
        if stop:
            self.render_stop()
        if self.log_lines:
            self.render_log()
        self.render_timer()
        return self

    @property
    def outputs(self) -> list[Any]:
        """The panel's own components that an update sets, in a fixed order."""
        return [c for c in (self.job, self.status, self.log, self.timer, self.stop, self.resume) if c is not None]

    # ---- reading and steering (through the Executor) --------------------------------------------------------
    def view(self, job: Job | str | None, text: str | None = None) -> JobView:
        """One job row (and the log's tail) as the panel shows it; ``text`` replaces the status line."""
        if isinstance(job, str):
            job = self.ctx.executor.get(job) if job else None
        if job is None:
            return JobView(None, text or "")
        log = self.ctx.executor.log_tail(job.id, self.log_lines) if self.log_lines else ""
        return JobView(job, self.describe(job) if text is None else text, log)

    def updates(self, v: JobView) -> dict[Any, Any]:
        """``{component: value}`` for the panel's pieces that exist."""
        out: dict[Any, Any] = {self.job: v.job_id, self.status: v.text, self.timer: gr.Timer(active=v.active)}
        if self.log is not None:
            out[self.log] = v.log
        if self.stop is not None:
            out[self.stop] = gr.Button(interactive=v.can_stop)
        if self.resume is not None:
            out[self.resume] = gr.Button(interactive=v.can_resume)
        return {k: x for k, x in out.items() if k is not None}

    def show(self, job_id: str | None, *_: Any) -> dict[Any, Any]:
        return self.updates(self.view(job_id))

    def submit(self, config: dict[str, Any], owner: str | None) -> Job:
        return self.ctx.executor.submit(self.kind, config, owner=owner)

    def stop_job(self, job_id: str | None) -> Job:
        if not job_id:
            raise ConfigError("No job to stop: launch or select one first.")
        return self.ctx.executor.stop(job_id)

    def active_job(self, owner: str | None) -> Job | None:
        """The user's queued or running job of this kind (a reload re-arms the timer on it)."""
        jobs = self.ctx.executor.list(states=LIVE, kind=self.kind, owner=owner, limit=1)
        return jobs[0] if jobs else None

    # ---- wiring ---------------------------------------------------------------------------------------------
    def listen(self, show: Callable[..., dict[Any, Any]] | None = None, inputs: Sequence[Any] = (),
               outputs: Sequence[Any] | None = None, *, stop_inputs: Sequence[Any] = (),
               stop_outputs: Sequence[Any] | None = None, stop_show: Callable[..., dict[Any, Any]] | None = None,
               tick: dict[str, Any] | None = None) -> None:
        """The timer's tick: ``show(job_id, *inputs)`` (default: the panel alone) onto ``outputs``; Stop: the
        job stopped, then ``stop_show(job_id, *stop_inputs)`` (default ``show``) onto ``stop_outputs``."""
        show = show or self.show
        outputs = list(outputs or self.outputs)

        @user_errors
        def on_tick(job_id: str, *extra: Any) -> dict[Any, Any]:
            return only(show(job_id, *extra), outputs)

        # O(1) per tick; no concurrency limit: a tick must never wait behind a long submit.
        self.timer.tick(on_tick, [self.job, *inputs], outputs, api_name=f"{self.api}_status",
                        **{"concurrency_limit": None, **(tick or {})}, **QUIET)
        if self.stop is None:
            return
        s_out = list(stop_outputs or outputs)
        s_show = stop_show or show

        @user_errors
        def on_stop(job_id: str, *extra: Any) -> dict[Any, Any]:
            self.stop_job(job_id)
            return only(s_show(job_id, *extra), s_out)

        self.stop.click(on_stop, [self.job, *stop_inputs], s_out, api_name=f"{self.api}_stop",
                        concurrency_limit=None, **QUIET)
