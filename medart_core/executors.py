"""Named executors: where a job may run, kept as configuration in the workspace (issue 17 §1).

``local`` (this machine, the supervisor's own processes) always exists and is never stored. Every other
executor is a Slurm cluster description, a :class:`~medart_core.slurm.SlurmSettings`, stored under its name
in ``<workspace>/executors.json``::

    {"version": 1,
     "executors": {"gpu": {"kind": "slurm", "settings": {...SlurmSettings...},
                           "created_by": "cli", "created_at": "2026-12-07T16:43:02Z"}}}

The file is written atomically (a reader sees the old table or the new one) with mode 0600, and every change
is a read-modify-write under an ``flock`` on ``executors.json.lock``, so two processes adding at once both
keep their entry. It is validated on every read: a hand-edited file that is broken gives a ``ConfigError``
naming the file and the entry, never a traceback; ``remove_executor`` still works on a broken entry so the
way out is one command.

This module knows nothing of the job ledger: ``remove_executor`` asks an ``in_use`` callable (the ledger's
"does a queued or running job use it?") instead of importing :mod:`medart_core.jobs`. The CLI handlers at
the end (:func:`add_executors_arguments`, :func:`cmd_executors`) are defined here and registered by the CLI.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .clock import utc_now
from .errors import ConfigError, MedArtError, NotFoundError
from .fileio import atomic_write_text
from . import slurm
from .slurm import SlurmError, SlurmSettings
from .workspace import Workspace, private_file, validate_name

LOCAL = "local"
SLURM = "slurm"
KINDS = (LOCAL, SLURM)
FILE_NAME = "executors.json"
FORMAT_VERSION = 1
_ENTRY_KEYS = {"kind", "settings", "created_by", "created_at"}


@dataclass(frozen=True)
class ExecutorSpec:
    """One named executor. ``settings`` is None for ``local``; ``created_*`` are empty for the built-in one."""

    name: str
    kind: str
    settings: SlurmSettings | None = None
    created_by: str | None = None
    created_at: str = ""

    @property
    def builtin(self) -> bool:
        return self.name == LOCAL

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``executors list --json`` (one object per executor)."""
        return {"name": self.name, "kind": self.kind,
                "settings": self.settings.to_dict() if self.settings is not None else None,
                "created_by": self.created_by, "created_at": self.created_at}


LOCAL_SPEC = ExecutorSpec(name=LOCAL, kind=LOCAL)


def executors_path(ws: Workspace) -> Path:
    """``<workspace>/executors.json``: the table of named executors other than ``local``."""
    return ws.root / FILE_NAME


def _lock_path(ws: Workspace) -> Path:
    return ws.root / (FILE_NAME + ".lock")


@contextlib.contextmanager
def _locked(ws: Workspace) -> Iterator[None]:
    """Exclusive lock around a read-modify-write of the table (released when the process dies, too)."""
    ws.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_file(_lock_path(ws)), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the flock


def _fix_hint(path: Path, name: str) -> str:
    return (f"correct it in {path} or drop it with `python -m medart_core executors remove {name}` "
            "(then add it again)")


def _read_raw(ws: Workspace) -> dict[str, Any]:
    """The stored entries by name, checked only for the file's own shape (entries are checked by _parse)."""
    path = executors_path(ws)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"The executors file {path} cannot be read ({exc}); fix its permissions or "
                          "encoding, or move it away to start from `local` only.") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"The executors file {path} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                          f"column {exc.colno}); correct it, or move it away to start from `local` only.") from exc
    if not isinstance(data, dict) or not isinstance(data.get("executors"), dict):
        raise ConfigError(f"The executors file {path} must hold a JSON object with an \"executors\" object "
                          "(name -> executor); correct it, or move it away to start from `local` only.")
    if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ConfigError(f"The executors file {path} has format version {data.get('version')!r}; this "
                          f"Med-Art reads version {FORMAT_VERSION}: upgrade Med-Art or move the file away.")
    return dict(data["executors"])


def _parse(path: Path, name: Any, entry: Any) -> ExecutorSpec:
    """One stored entry as an ``ExecutorSpec``; a ``ConfigError`` naming the file and the entry otherwise."""
    label = f"The executors file {path}: entry {name!r}"
    try:
        validate_name(name, "executor name")
    except ConfigError as exc:
        raise ConfigError(f"{label} has an invalid name ({str(exc).rstrip('.')}); {_fix_hint(path, name)}.") from exc
    if str(name).lower() == LOCAL:
        raise ConfigError(f"{label} redefines the built-in `local` executor; delete that entry from {path}.")
    if not isinstance(entry, dict):
        raise ConfigError(f"{label} must be a JSON object, not {type(entry).__name__}; {_fix_hint(path, name)}.")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{label} has unknown key(s) {', '.join(unknown)} (known: "
                          f"{', '.join(sorted(_ENTRY_KEYS))}); {_fix_hint(path, name)}.")
    if entry.get("kind") != SLURM:
        raise ConfigError(f"{label} has kind {entry.get('kind')!r}; stored executors are of kind \"slurm\"; "
                          f"{_fix_hint(path, name)}.")
    settings = entry.get("settings")
    if not isinstance(settings, dict):
        raise ConfigError(f"{label} must have a \"settings\" object (the Slurm settings); {_fix_hint(path, name)}.")
    try:
        slurm_settings = SlurmSettings.from_dict(settings)
    except (ConfigError, TypeError) as exc:
        why = str(exc).rstrip(".")
        raise ConfigError(f"{label} has invalid Slurm settings ({why}); {_fix_hint(path, name)}.") from exc
    created_by, created_at = entry.get("created_by"), entry.get("created_at", "")
    if (created_by is not None and not isinstance(created_by, str)) or not isinstance(created_at, str):
        raise ConfigError(f"{label}: created_by and created_at must be text; {_fix_hint(path, name)}.")
    return ExecutorSpec(name=name, kind=SLURM, settings=slurm_settings, created_by=created_by,
                        created_at=created_at)


def _load(ws: Workspace) -> dict[str, ExecutorSpec]:
    path = executors_path(ws)
    return {name: _parse(path, name, entry) for name, entry in _read_raw(ws).items()}


def _write(ws: Workspace, entries: Mapping[str, Any]) -> None:
    # mkstemp creates the temporary file 0600 and the rename keeps that mode: private from its first byte.
    body = {"version": FORMAT_VERSION, "executors": {k: entries[k] for k in sorted(entries)}}
    atomic_write_text(executors_path(ws), json.dumps(body, indent=2, sort_keys=True) + "\n")


def list_executors(ws: Workspace) -> list[ExecutorSpec]:
    """Every executor: ``local`` first, then the stored ones by name."""
    stored = _load(ws)
    return [LOCAL_SPEC, *(stored[name] for name in sorted(stored))]


def get_executor_spec(ws: Workspace, name: str) -> ExecutorSpec:
    """The executor called ``name``; ``NotFoundError`` listing the known ones when there is none."""
    if name == LOCAL:
        return LOCAL_SPEC
    stored = _load(ws)
    if name not in stored:
        known = ", ".join([LOCAL, *sorted(stored)])
        raise NotFoundError(f"No executor named {name!r} (known: {known}); add one with "
                            "`python -m medart_core executors add NAME --kind slurm …`.")
    return stored[name]


def _check_new_name(name: str) -> str:
    validate_name(name, "executor name")
    if name.lower() == LOCAL:
        raise ConfigError("`local` is built in (this machine) and cannot be redefined; choose another name.")
    return name


def add_executor(ws: Workspace, name: str, kind: str = SLURM,
                 settings: SlurmSettings | Mapping[str, Any] | None = None, *, by: str | None = None,
                 replace: bool = False) -> ExecutorSpec:
    """Store executor ``name`` (``settings`` None = the cluster's defaults); returns what was stored.

    An existing name is a ``ConfigError`` unless ``replace`` (its ``created_*`` then become the new ones)."""
    _check_new_name(name)
    if kind != SLURM:
        raise ConfigError(f"Unknown executor kind {kind!r}: only \"slurm\" executors are added; `local` is built in.")
    if settings is None:
        settings = SlurmSettings()
    elif not isinstance(settings, SlurmSettings):
        settings = SlurmSettings.from_dict(settings)
    spec = ExecutorSpec(name=name, kind=SLURM, settings=settings, created_by=by, created_at=utc_now())
    with _locked(ws):
        stored = _load(ws)  # also refuses to rewrite a table that has a broken entry
        if name in stored and not replace:
            raise ConfigError(f"Executor {name!r} exists already: pass --replace (replace=True) to redefine it, "
                              "or remove it first.")
        entries = {n: {k: v for k, v in s.to_dict().items() if k != "name"} for n, s in stored.items()}
        entries[name] = {k: v for k, v in spec.to_dict().items() if k != "name"}
        _write(ws, entries)
    return spec


def remove_executor(ws: Workspace, name: str, *, in_use: Callable[[str], bool] | None = None) -> None:
    """Forget executor ``name``. Refuses ``local``, and a name ``in_use(name)`` says a queued or running job
    uses. Works on an entry a hand edit broke (the others are kept as they are)."""
    if name == LOCAL:
        raise ConfigError("`local` is built in (this machine) and cannot be removed.")
    with _locked(ws):
        raw = _read_raw(ws)
        if name not in raw:
            known = ", ".join([LOCAL, *sorted(raw)])
            raise NotFoundError(f"No executor named {name!r} (known: {known}); nothing was removed.")
        if in_use is not None and in_use(name):
            raise ConfigError(f"Executor {name!r} is used by a queued or running job: stop those jobs (or "
                              "let them finish) before removing it.")
        del raw[name]
        _write(ws, raw)


def check_executor(ws: Workspace, name: str) -> list[str]:
    """Problems that would stop a job on executor ``name``, one sentence each ([] = ready).

    ``local`` has none to find here; a Slurm executor submits the probe of :func:`medart_core.slurm.check`."""
    spec = get_executor_spec(ws, name)
    if spec.settings is None:
        return []
    try:
        problems = slurm.check(spec.settings, ws.root)
    except SlurmError as exc:  # no sbatch/sinfo here, or the controller did not answer
        problems = [str(exc)]
    # Slurm's own messages span lines; the CLI prints one problem per line.
    return [" ".join(p.split()) for p in problems]


# ---------------------------------------------------------------------------------------------- CLI

_WORKSPACE_HELP = "workspace folder (default: $MEDART_HOME or ./workspace)"
# CLI flag -> SlurmSettings field; only flags that were given are passed, the rest keep their defaults.
_SETTING_FLAGS = ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "time", "account", "qos", "setup",
                  "nodes", "tasks_per_node")


def _add_workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", "-w", default=None, help=_WORKSPACE_HELP)


def add_executors_arguments(parser_or_subparsers: Any) -> argparse.ArgumentParser:
    """Define ``executors add|list|remove|check`` on the ``executors`` parser, or add that parser to a
    subparsers action; sets ``func`` to :func:`cmd_executors` and returns the ``executors`` parser."""
    if isinstance(parser_or_subparsers, argparse._SubParsersAction):
        p = parser_or_subparsers.add_parser("executors", help="named executors: where jobs run (local, Slurm)")
    else:
        p = parser_or_subparsers
    p.set_defaults(func=cmd_executors)
    sub = p.add_subparsers(dest="executors_command", required=True, metavar="ACTION")

    add = sub.add_parser("add", help="add (or with --replace redefine) a Slurm executor")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--kind", choices=(SLURM,), default=SLURM, help="executor kind (local is built in)")
    add.add_argument("--partition", help="Slurm partition (default: the cluster's default partition)")
    add.add_argument("--gpus-per-node", type=int, dest="gpus_per_node")
    add.add_argument("--cpus-per-task", type=int, dest="cpus_per_task")
    add.add_argument("--mem-gb", type=float, dest="mem_gb", help="memory per node in GB (0 = partition default)")
    add.add_argument("--time", help="time limit HH:MM:SS (default 01:00:00)")
    add.add_argument("--account")
    add.add_argument("--qos")
    add.add_argument("--setup", action="append", metavar="CMD",
                     help="shell command run before the job on the node (repeat for several)")
    add.add_argument("--nodes", type=int, help="nodes per job (default 1); a train job runs data parallel on "
                                               "nodes x tasks-per-node processes")
    add.add_argument("--tasks-per-node", type=int, dest="tasks_per_node",
                     help="Slurm tasks (processes) per node (default 1; e.g. one per GPU); a train job runs one "
                          "data-parallel rank per task, other jobs run on task 0 alone")
    add.add_argument("--replace", action="store_true", help="redefine an executor that exists")
    _add_workspace(add)

    lst = sub.add_parser("list", help="list the executors (local first)")
    lst.add_argument("--json", action="store_true", help="print a JSON list")
    _add_workspace(lst)

    rm = sub.add_parser("remove", help="remove an executor no queued or running job uses")
    rm.add_argument("name", metavar="NAME")
    _add_workspace(rm)

    chk = sub.add_parser("check", help="submit a probe job; exit 1 with one sentence per problem")
    chk.add_argument("name", metavar="NAME")
    _add_workspace(chk)
    return p


def _describe(spec: ExecutorSpec) -> str:
    s = spec.settings
    if s is None:
        return "this machine"
    parts = [f"partition={s.partition or '(default)'}", f"time={s.time}", f"cpus/task={s.cpus_per_task}"]
    if s.gpus_per_node:
        parts.append(f"gpus/node={s.gpus_per_node}")
    if s.nodes != 1 or s.tasks_per_node != 1:
        parts.append(f"nodes={s.nodes} tasks/node={s.tasks_per_node} (train: {s.nodes * s.tasks_per_node} ranks)")
    return " ".join(parts)


def _cmd_add(args: argparse.Namespace, ws: Workspace) -> int:
    given = {k: getattr(args, k) for k in _SETTING_FLAGS if getattr(args, k, None) is not None}
    spec = add_executor(ws, args.name, args.kind, SlurmSettings(**given), by="cli", replace=args.replace)
    print(f"added executor {spec.name} ({spec.kind}: {_describe(spec)}); "
          f"`python -m medart_core executors check {spec.name}` tries it")
    return 0


def _cmd_list(args: argparse.Namespace, ws: Workspace) -> int:
    specs = list_executors(ws)
    if args.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
        return 0
    width = max(len(s.name) for s in specs)
    for s in specs:
        print(f"{s.name:<{width}}  {s.kind:<5}  {_describe(s)}")
    return 0


def cmd_executors(args: argparse.Namespace, *, in_use: Callable[[str], bool] | None = None) -> int:
    """Run ``executors ACTION``; ``in_use`` is the ledger's check that ``remove`` refuses on."""
    ws = Workspace.open(args.workspace)
    action = args.executors_command
    if action == "add":
        return _cmd_add(args, ws)
    if action == "list":
        return _cmd_list(args, ws)
    if action == "remove":
        remove_executor(ws, args.name, in_use=in_use)
        print(f"removed executor {args.name}")
        return 0
    if action == "check":
        problems = check_executor(ws, args.name)
        for problem in problems:
            print(problem)
        if not problems:
            print(f"executor {args.name} is ready")
        return 1 if problems else 0
    raise MedArtError(f"Unknown executors action {action!r}: use add, list, remove or check.")  # pragma: no cover


__all__ = ["ExecutorSpec", "LOCAL", "LOCAL_SPEC", "KINDS", "executors_path", "list_executors",
           "get_executor_spec", "add_executor", "remove_executor", "check_executor", "add_executors_arguments",
           "cmd_executors"]
