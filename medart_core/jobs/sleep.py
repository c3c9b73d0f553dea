"""The ``sleep`` kind: a cheap diagnostic job (``steps`` ticks over ``seconds``) that checks the queue, stop,
the SIGTERM/SIGKILL escalation (``ignore_stop``), failures (``fail``) and resume without training anything."""
from __future__ import annotations

import time
from typing import Any

from ..errors import ConfigError
from ..workspace import Workspace
from .runner import JobContext, JobFailed


def prepare_sleep(ws: Workspace, config: dict[str, Any]) -> tuple[dict[str, Any], None]:
    """Validate a ``sleep`` job's config: seconds, steps, ignore_stop, fail."""
    unknown = sorted(set(config) - {"seconds", "steps", "ignore_stop", "fail"})
    if unknown:
        raise ConfigError(f"Unknown sleep job keys {unknown}.")
    c = {"seconds": float(config.get("seconds", 1.0)), "steps": int(config.get("steps", 10)),
         "ignore_stop": bool(config.get("ignore_stop", False)), "fail": bool(config.get("fail", False))}
    if c["steps"] < 1 or c["seconds"] < 0:
        raise ConfigError("sleep needs steps >= 1 and seconds >= 0.")
    return c, None


def run_sleep_job(ctx: JobContext) -> dict[str, Any]:
    """The ``sleep`` kind: ``steps`` ticks over ``seconds``, with progress; a cheap check of the queue, stop
    (``ignore_stop`` exercises the SIGTERM/SIGKILL escalation) and resume (continues at the reported step)."""
    c = ctx.config
    step = int(ctx.job.progress_info.get("step") or 0) if ctx.resumed else 0
    ctx.progress(step=step, total=c["steps"])
    while step < c["steps"]:
        if ctx.should_stop() and not c["ignore_stop"]:
            return {"status": "stopped", "step": step}
        time.sleep(c["seconds"] / c["steps"])
        step += 1
        ctx.progress(step=step)
        if c["fail"] and step == c["steps"] // 2:
            raise JobFailed(f"sleep job failed on purpose at step {step}.")
    return {"status": "finished", "step": step}
