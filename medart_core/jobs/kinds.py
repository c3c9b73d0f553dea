"""The kind registry: ``register_kind`` makes a kind submittable, ``job_kinds`` lists them, and
``resolve_target`` turns a row's ``"module:function"`` into the function (importing its module then).

The kinds of the stages are read from :mod:`medart_core.job_registry` (names only), so this package imports
no stage module. A kind may bring hooks through its registration: ``resume_hint`` (how an interrupted
job's message ends) and ``add_submit_arguments``/``submit_config`` (its ``jobs submit KIND`` command).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ConfigError
from ..workspace import Workspace, validate_name

if TYPE_CHECKING:  # pragma: no cover
    from .records import Job
    from .runner import JobContext

Prepare = Callable[[Workspace, dict], "tuple[dict, str | None]"]


@dataclass(frozen=True)
class JobKind:
    name: str
    target: str                     # "module:qualname" of run_fn(ctx: JobContext) -> dict
    uses_gpu: bool
    prepare: Prepare | None = None  # validate -> (config, run)
    resume_hint: Callable[["Job"], str] | None = None
    add_submit_arguments: Callable[..., Any] | str | None = None   # (parser) -> None
    submit_config: Callable[..., Any] | str | None = None          # (args) -> config dict
    submit_help: str | None = None
    fans_out: str | None = None     # "module:function" run instead of target on a Slurm executor: a local
                                    # coordinator of a Slurm job array (§3)

    def hook(self, name: str) -> Callable[..., Any] | None:
        """The hook ``name`` as a function (its module imported now), or None when the kind has none."""
        h = getattr(self, name)
        return resolve_target(h) if isinstance(h, str) else h


_KINDS: dict[str, JobKind] = {}


def _target_name(name: str, fn: Callable[..., Any] | str, what: str) -> str:
    """``module:qualname`` of a module-level function (or the name itself, checked)."""
    if isinstance(fn, str):
        module, _, qual = fn.partition(":")
        if not module or not qual:
            raise ConfigError(f"Job kind {name!r}: a {what} name must read 'module:function', got {fn!r}.")
    else:
        qual = getattr(fn, "__qualname__", "")
        if "<" in qual or not getattr(fn, "__module__", None):
            raise ConfigError(f"Job kind {name!r}: {what} must be a module-level function (got {qual!r}).")
        module = fn.__module__
    if module == "__main__":
        raise ConfigError(f"Job kind {name!r}: {what} must live in an importable module, not __main__.")
    return f"{module}:{qual}"


def _lazy(target: str) -> Callable[..., Any]:
    """A function that imports ``target`` on its first call (so registering imports nothing)."""
    def call(*args: Any, _target: str = target, **kw: Any) -> Any:
        return resolve_target(_target)(*args, **kw)

    call.__qualname__ = call.__name__ = target.partition(":")[2]
    return call


def register_kind(name: str, run_fn: Callable[["JobContext"], dict | None] | str, uses_gpu: bool = True, *,
                  prepare: Prepare | str | None = None, resume_hint: Callable[["Job"], str] | str | None = None,
                  add_submit_arguments: Callable[..., Any] | str | None = None,
                  submit_config: Callable[..., Any] | str | None = None,
                  submit_help: str | None = None, fans_out: Callable[..., Any] | str | None = None) -> JobKind:
    """Make ``name`` submittable. ``run_fn(ctx)`` runs in the job process and returns a JSON-able dict
    (``{"status": "stopped"}`` when it stopped early on ``ctx.should_stop()``); it must be a module-level
    function (the job process imports it by name), or its ``"module:function"`` name, which registers a kind
    without importing its module. ``prepare(ws, config) -> (config, run)`` (a function or its name) validates
    and normalises the config at submit time, in the submitter, so mistakes fail before anything is queued.
    ``resume_hint(job) -> str`` ends the message of an interrupted job (default: "; resume starts a new
    attempt."); ``add_submit_arguments(parser)`` with ``submit_config(args) -> config`` give the kind a
    ``jobs submit NAME`` command. ``fans_out(ctx)`` (a module-level function or its name): on a Slurm executor the
    job runs it instead of ``run_fn``, on this machine, as a light coordinator (no accelerator slot) that
    submits its work as a Slurm job array (``Job.fans_out``)."""
    validate_name(name, "job kind")
    target = _target_name(name, run_fn, "run_fn")
    if isinstance(prepare, str):
        prepare = _lazy(_target_name(name, prepare, "prepare"))
    if isinstance(resume_hint, str):
        resume_hint = _lazy(_target_name(name, resume_hint, "resume_hint"))
    if (add_submit_arguments is None) != (submit_config is None):
        raise ConfigError(f"Job kind {name!r}: give add_submit_arguments and submit_config together.")
    kind = JobKind(name, target, bool(uses_gpu), prepare, resume_hint, add_submit_arguments, submit_config,
                   submit_help, None if fans_out is None else _target_name(name, fans_out, "fans_out"))
    _KINDS[name] = kind
    return kind


def job_kinds() -> dict[str, JobKind]:
    return dict(_KINDS)


def get_kind(name: str) -> JobKind:
    """The registered kind ``name`` (ConfigError naming the known ones otherwise)."""
    if name not in _KINDS:
        raise ConfigError(f"Unknown job kind {name!r}; known kinds are {sorted(_KINDS)}.")
    return _KINDS[name]


def resolve_target(target: str) -> Callable[..., Any]:
    """The function a ``"module:qualname"`` names; names of older versions map to the function's new home."""
    from ..job_registry import LEGACY_TARGETS

    module, _, qual = LEGACY_TARGETS.get(target, target).partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def resume_hint(job: "Job") -> str:
    """The clause an interrupted job's message ends with: the kind's own hook, else a new attempt."""
    kind = _KINDS.get(job.kind)
    if kind is not None and kind.resume_hint is not None:
        return kind.resume_hint(job)
    return "; resume starts a new attempt."


def _register_builtins() -> None:
    from ..job_registry import KINDS

    for entry in KINDS:
        e = dict(entry)
        register_kind(str(e.pop("name")), str(e.pop("run")), bool(e.pop("uses_gpu")), **e)  # type: ignore[arg-type]


_register_builtins()
