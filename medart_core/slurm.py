"""Slurm through submitit: settings, submission, state, cancel, logs and a pre-flight check.

A thin adapter with no knowledge of the job ledger (``medart_core.jobs`` builds its Slurm executor on it):

* ``SlurmSettings`` is what a named executor stores (JSON), validated when built.
* ``submit`` / ``submit_array`` hand a picklable function to ``submitit.AutoExecutor(cluster="slurm")``.
* ``poll`` reads states from ONE ``squeue`` call plus ``scontrol show job`` for jobs squeue no longer
  lists (finished and cancelled jobs stay visible to scontrol for ``MinJobAge``, 300 s by default). There
  is no ``sacct``: many small clusters run without the accounting daemon (submitit#1720).
* ``map_state`` is the pure translation of a Slurm state into a ledger state: the ledger stays the source
  of truth, so a job Slurm lost or killed is ``interrupted`` (resumable), never left ``running``.
* ``stderr_tail`` / ``stdout_tail`` read Slurm's own logs (submitit's paths), which hold the failures that
  happen before our code starts: a setup command, a missing Python, an unreadable folder.
* ``check`` submits a small probe job and returns the problems it finds, one sentence each.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import ConfigError, MedArtError

# Ledger states (the same strings as medart_core.jobs; repeated so this module does not import it).
QUEUED, RUNNING, FAILED, INTERRUPTED = "queued", "running", "failed", "interrupted"

_TIME = re.compile(r"^(\d{1,4}):([0-5]\d):([0-5]\d)$")
# Slurm names end up on sbatch command lines and in #SBATCH lines: plain words only.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_COMMAND_TIMEOUT_S = 60


class SlurmError(MedArtError):
    """Slurm refused or could not answer a command (sbatch, squeue, scontrol, scancel); Slurm's words follow."""


@dataclass
class SlurmSettings:
    """Where and how big a Slurm job is. Empty partition/account/qos mean the cluster's defaults;
    ``mem_gb=0`` means the partition's default memory; ``setup`` runs in the batch script before the job
    (``module load …``, ``source venv/bin/activate``) and the job stops at the first one that fails."""

    partition: str = ""
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 0
    time: str = "01:00:00"
    account: str = ""
    qos: str = ""
    setup: list[str] = field(default_factory=list)
    nodes: int = 1
    tasks_per_node: int = 1

    def __post_init__(self) -> None:
        for name in ("partition", "account", "qos"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ConfigError(f"Slurm {name} must be text, not {value!r}.")
            if value and not _NAME.match(value):
                raise ConfigError(f"Slurm {name} {value!r} may only contain letters, digits, '_', '-' and '.' "
                                  "(no spaces or shell characters); use the name `sinfo`/`sacctmgr` shows.")
        for name, least in (("gpus_per_node", 0), ("cpus_per_task", 1), ("nodes", 1), ("tasks_per_node", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"Slurm {name} must be a whole number, not {value!r}.")
            if value < least:
                raise ConfigError(f"Slurm {name} must be at least {least}, not {value}.")
        if isinstance(self.mem_gb, bool) or not isinstance(self.mem_gb, (int, float)) or self.mem_gb < 0:
            raise ConfigError(f"Slurm mem_gb must be a number of gigabytes ≥ 0 (0 = partition default), "
                              f"not {self.mem_gb!r}.")
        m = _TIME.match(self.time) if isinstance(self.time, str) else None
        if m is None or self.seconds == 0:
            raise ConfigError(f"Slurm time {self.time!r} must be a positive HH:MM:SS, e.g. '04:00:00' for four "
                              "hours (hours may exceed 24: '48:00:00').")
        if not isinstance(self.setup, (list, tuple)) or not all(isinstance(c, str) for c in self.setup):
            raise ConfigError("Slurm setup must be a list of shell commands (text), one per line.")
        self.setup = list(self.setup)
        for command in self.setup:
            if not command.strip() or "\n" in command or "\r" in command:
                raise ConfigError(f"Slurm setup command {command!r} must be one non-empty line; give each "
                                  "command as its own list item.")

    @property
    def seconds(self) -> int:
        m = _TIME.match(self.time) if isinstance(self.time, str) else None
        if m is None:
            return 0
        h, mi, s = (int(g) for g in m.groups())
        return h * 3600 + mi * 60 + s

    @property
    def timeout_min(self) -> int:
        # submitit speaks whole minutes; round up so the job never gets less than asked.
        return -(-self.seconds // 60)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SlurmSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown Slurm setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SlurmSettings":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class SlurmStatus:
    """What Slurm says about one job. ``state`` is "" when Slurm no longer knows the job at all."""

    job_id: str
    state: str
    reason: str = ""
    exit_code: str | None = None  # "code:signal" as scontrol prints it; None while squeue lists the job


def _executor(settings: SlurmSettings, folder: Path):
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict[str, Any] = {"timeout_min": settings.timeout_min, "nodes": settings.nodes,
                              "tasks_per_node": settings.tasks_per_node, "cpus_per_task": settings.cpus_per_task}
    if settings.gpus_per_node:
        params["gpus_per_node"] = settings.gpus_per_node
    if settings.mem_gb:
        params["mem_gb"] = float(settings.mem_gb)
    if settings.partition:
        params["slurm_partition"] = settings.partition
    if settings.account:
        params["slurm_account"] = settings.account
    if settings.qos:
        params["slurm_qos"] = settings.qos
    if settings.setup:
        # submitit pastes setup lines into the batch script as they are; without `set -e` a failed
        # `source venv/bin/activate` would still start the job on the wrong Python.
        params["slurm_setup"] = ["set -e", *settings.setup]
    ex.update_parameters(**params)
    return ex


def _submission_error(exc: Exception) -> SlurmError:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if "error:" in ln] or text.splitlines()[-1:]
    return SlurmError("sbatch refused the job: " + " ".join(lines))


def submit(settings: SlurmSettings, folder: Path | str, fn: Callable[..., Any], *args: Any,
           **kwargs: Any) -> tuple[str, Path]:
    """Submit ``fn(*args, **kwargs)`` as one Slurm job; returns (Slurm job id, submitit folder)."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    folder = Path(folder).absolute()
    ex = _executor(settings, folder)
    try:
        job = ex.submit(fn, *args, **kwargs)
    except (FailedJobError, FailedSubmissionError, OSError) as exc:
        raise _submission_error(exc) from exc
    return str(job.job_id), folder


def submit_array(settings: SlurmSettings, folder: Path | str, fn: Callable[..., Any],
                 *iterables: Iterable[Any]) -> tuple[list[str], Path]:
    """Submit ``fn`` over zipped ``iterables`` as one Slurm job array; returns (["<array>_<i>", …], folder)."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    folder = Path(folder).absolute()
    ex = _executor(settings, folder)
    try:
        jobs = ex.map_array(fn, *iterables)
    except (FailedJobError, FailedSubmissionError, OSError) as exc:
        raise _submission_error(exc) from exc
    return [str(j.job_id) for j in jobs], folder


def _run(args: Sequence[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise SlurmError(f"{args[0]} is not installed on this machine; run Med-Art on a Slurm login node.") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{args[0]} did not answer within {_COMMAND_TIMEOUT_S} s; is slurmctld up?") from exc


def _unknown_job(r: subprocess.CompletedProcess) -> bool:
    return r.returncode != 0 and "Invalid job id" in r.stderr


def _scontrol_job(job_id: str) -> SlurmStatus:
    r = _run(["scontrol", "show", "job", "-o", job_id])
    if _unknown_job(r):
        return SlurmStatus(job_id, "")
    if r.returncode != 0:
        raise SlurmError(f"scontrol show job {job_id} failed: {r.stderr.strip()}")
    # `-o` prints one line per job (several for an array id); take the record of this very id.
    records = []
    for line in r.stdout.splitlines():
        rec = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if rec:
            records.append(rec)
    if not records:
        return SlurmStatus(job_id, "")
    rec = next((x for x in records if f"{x.get('ArrayJobId')}_{x.get('ArrayTaskId')}" == job_id), records[0])
    return SlurmStatus(job_id, rec.get("JobState", ""), rec.get("Reason", ""), rec.get("ExitCode"))


def poll(job_ids: Sequence[str]) -> dict[str, SlurmStatus]:
    """State of each job: one ``squeue`` call, then ``scontrol`` for the ids squeue no longer lists.

    Raises ``SlurmError`` when Slurm cannot answer: "no answer" must never read as "job gone"."""
    ids = [str(j) for j in job_ids]
    if not ids:
        return {}
    # -r lists each array task on its own line (squeue folds pending tasks into "12_[0-3]" otherwise).
    r = _run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    if r.returncode != 0 and not _unknown_job(r):
        raise SlurmError(f"squeue failed: {r.stderr.strip()}")
    listed: dict[str, SlurmStatus] = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            listed[parts[0]] = SlurmStatus(parts[0], parts[1], parts[2])
    return {j: listed[j] if j in listed else _scontrol_job(j) for j in ids}


_RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT"}
_WAITING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "STOPPED"}
ACTIVE_STATES = _RUNNING_STATES | _WAITING_STATES
RUNNING_STATES, WAITING_STATES = frozenset(_RUNNING_STATES), frozenset(_WAITING_STATES)


def base_state(slurm_state: str | None) -> str:
    """The state's name alone: squeue/sacct print "CANCELLED+" or "CANCELLED by 0" for cancelled jobs."""
    text = (slurm_state or "").strip()
    return text.split()[0].rstrip("+") if text else ""
_RESUME = "resume it to continue from its last checkpoint"
_INTERRUPTIONS = {
    "CANCELLED": "The Slurm job was cancelled outside Med-Art (scancel or an administrator) before it finished",
    "TIMEOUT": "The Slurm job reached its time limit before it finished (ask for more time if it recurs)",
    "PREEMPTED": "Slurm preempted the job to make room for another one",
    "NODE_FAIL": "The compute node running the job failed (Slurm NODE_FAIL)",
    "BOOT_FAIL": "The compute node could not boot for the job (Slurm BOOT_FAIL)",
    "DEADLINE": "Slurm removed the job because it could not finish before its deadline",
    "REVOKED": "Slurm revoked the job (it was started on another cluster of a federation)",
    "COMPLETED": "Slurm reports the job completed, but it left no final record",
    "": "Slurm no longer knows the job and it left no final record",
}
_REASONS = {
    "Priority": "waiting behind jobs with a higher priority",
    "Resources": "waiting for nodes with enough free CPUs, memory or GPUs",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is inactive",
    "PartitionConfig": "the request exceeds what the partition's nodes have (CPUs, memory, GPUs or time)",
    "PartitionTimeLimit": "the requested time exceeds the partition's limit",
    "BeginTime": "its start time has not come yet",
    "Dependency": "waiting for another job to finish",
    "JobHeldUser": "held by its user (scontrol release)",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "the nodes it needs are not available (drained, down or reserved)",
    "QOSMaxJobsPerUserLimit": "the QOS limit on jobs per user is reached",
    "AssocGrpGRES": "the account's GPU limit is reached",
}


def pending_reason_text(reason: str) -> str:
    """Slurm's pending reason in words, with the raw reason kept for searching Slurm's docs."""
    plain = _REASONS.get(reason)
    return f"{plain} (Slurm reason: {reason})" if plain else f"Slurm reason: {reason or 'None'}"


def map_state(slurm_state: str, reason: str, has_final_record: bool,
              exit_code: str | None = None) -> tuple[str | None, str]:
    """Translate a Slurm state into ``(ledger state, message)``.

    ``has_final_record``: the job wrote its own final record (done/failed/stopped), which stands as
    written: the state returned is then None. A stop asked through Med-Art is the caller's business (the
    ledger says ``stopping``); here CANCELLED means someone else cancelled the job."""
    state = base_state(slurm_state)
    if has_final_record:
        return None, "The job's own final record stands."
    if state in ("SUSPENDED", "STOPPED"):
        return QUEUED, f"Slurm suspended the job; it continues when Slurm resumes it ({pending_reason_text(reason)})."
    if state in _WAITING_STATES:
        return QUEUED, f"Waiting in the Slurm queue: {pending_reason_text(reason)}."
    if state in _RUNNING_STATES:
        return RUNNING, "Running on Slurm." if state == "RUNNING" else f"Running on Slurm ({state.lower()})."
    if state == "OUT_OF_MEMORY":
        return FAILED, ("The job ran out of memory on the compute node (Slurm OUT_OF_MEMORY); ask for more "
                        "mem_gb or lower the batch size.")
    if state in ("FAILED", "SPECIAL_EXIT"):
        code = exit_code or "unknown"
        return FAILED, (f"The Slurm job failed with exit code {code} before writing its final record; "
                        "Slurm's error log below says why.")
    if state in _INTERRUPTIONS:
        return INTERRUPTED, f"{_INTERRUPTIONS[state]}; {_RESUME}."
    return INTERRUPTED, f"Slurm reports the unknown state {state!r} and the job left no final record; {_RESUME}."


def cancel(job_id: str) -> None:
    """``scancel`` the job; a job that already ended or that Slurm forgot is not an error."""
    r = _run(["scancel", str(job_id)])
    if r.returncode != 0 and not _unknown_job(r) and "already completing or completed" not in r.stderr:
        raise SlurmError(f"scancel {job_id} failed: {r.stderr.strip()}")


def _paths(folder: Path | str, job_id: str):
    from submitit.core.utils import JobPaths

    return JobPaths(Path(folder), job_id=str(job_id), task_id=0)


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as f:
        # Logs of long jobs get big: the last 256 KiB hold far more than the lines anyone asks for.
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 256 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def stderr_tail(folder: Path | str, job_id: str, lines: int = 20) -> str:
    """The last ``lines`` of the job's Slurm stderr log (task 0), "" when there is none (yet)."""
    return _tail(_paths(folder, job_id).stderr, lines)


def stdout_tail(folder: Path | str, job_id: str, lines: int = 20) -> str:
    """The last ``lines`` of the job's Slurm stdout log (task 0), "" when there is none (yet)."""
    return _tail(_paths(folder, job_id).stdout, lines)


def has_result(folder: Path | str, job_id: str) -> bool:
    """True once submitit wrote the function's outcome (its return value or its exception)."""
    return _paths(folder, job_id).result_pickle.exists()


def result(folder: Path | str, job_id: str) -> Any:
    """The function's return value; ``SlurmError`` with the job's traceback tail when it raised or left none."""
    from submitit.core.utils import pickle_load

    path = _paths(folder, job_id).result_pickle
    if not path.exists():
        raise SlurmError(f"Slurm job {job_id} left no result in {path.parent}; its error log: "
                         f"{stderr_tail(folder, job_id, 5) or '(empty)'}")
    outcome, value = pickle_load(path)
    if outcome != "success":
        last = str(value).strip().splitlines()[-1:] or ["(no traceback)"]
        raise SlurmError(f"Slurm job {job_id} raised: {last[0]}")
    return value


# The probe is a plain `python -c` (through submitit's CommandFunction) so that a node which cannot
# import medart_core still runs it and says so, instead of failing to unpickle a medart_core function.
_PROBE = r"""
import json, os, socket, sys
token_in, token_out, want_torch, gpus = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out = {"host": socket.gethostname(), "python": sys.executable}
try:
    with open(token_in) as f:
        out["token"] = f.read().strip()
    with open(token_out, "w") as f:
        f.write(out["token"])
except OSError as e:
    out["workspace_error"] = f"{type(e).__name__}: {e}"
try:
    import medart_core
    out["medart_core"] = os.path.dirname(medart_core.__file__)
except Exception as e:
    out["medart_core_error"] = f"{type(e).__name__}: {e}"
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda_devices"] = torch.cuda.device_count() if gpus else 0
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
print("MEDART_PROBE " + json.dumps(out))
"""


def _partition_problem(settings: SlurmSettings) -> str | None:
    r = _run(["sinfo", "-h", "-o", "%P"])
    if r.returncode != 0:
        return f"Slurm's controller did not answer sinfo: {r.stderr.strip() or 'no message'}."
    names = [p.rstrip("*") for p in r.stdout.split()]
    if settings.partition and settings.partition not in names:
        return (f"Partition {settings.partition!r} does not exist on this cluster "
                f"(sinfo lists: {', '.join(names) or 'none'}).")
    if not settings.partition and not any(p.endswith("*") for p in r.stdout.split()):
        return f"This cluster has no default partition; name one of: {', '.join(names) or 'none'}."
    return None


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return ""


def _wait_probe(job_id: str, partition: str, pending_deadline_s: float, run_deadline_s: float) -> SlurmStatus | str:
    """Poll the probe until it leaves the queue; a problem sentence (and a cancelled probe) on a deadline."""
    start = time.monotonic()
    while True:
        status = poll([job_id])[job_id]
        waited = time.monotonic() - start
        if status.state not in ACTIVE_STATES:
            return status
        if status.state == "PENDING" and waited > pending_deadline_s:
            cancel(job_id)
            return (f"The probe job stayed pending for {waited:.0f} s on partition {partition!r}: "
                    f"{pending_reason_text(status.reason)}.")
        if waited > run_deadline_s:
            cancel(job_id)
            return f"The probe job did not finish within {run_deadline_s:.0f} s (Slurm state {status.state})."
        time.sleep(0.5)


def _public(version: Any) -> str:
    # "2.14.1+cu130" (torch.__version__) and "2.14.1" (the pin) are the same release.
    return str(version or "").split("+")[0]


def _probe_findings(found: Mapping[str, Any], token: str, workspace: Path, settings: SlurmSettings,
                    want_torch: str, token_out: Path) -> list[str]:
    problems = []
    host = found.get("host", "the compute node")
    if "workspace_error" in found or found.get("token") != token or not token_out.exists():
        why = found.get("workspace_error") or "the file it wrote did not come back"
        problems.append(f"The compute node {host} cannot see the workspace {workspace} ({why}); put the "
                        "workspace on a filesystem the nodes mount at the same path.")
    if "medart_core_error" in found:
        problems.append(f"The node's Python {found.get('python')} cannot import medart_core "
                        f"({found['medart_core_error']}); add a setup command that activates Med-Art's environment.")
    if "torch_error" in found:
        problems.append(f"The node's Python {found.get('python')} cannot import torch ({found['torch_error']}); "
                        f"install torch=={want_torch} there or activate the environment that has it.")
    elif want_torch and _public(found.get("torch")) != _public(want_torch):
        problems.append(f"The node's torch is {found.get('torch')} but Med-Art pins {want_torch}; "
                        "activate the same environment on the nodes.")
    gpus = int(found.get("cuda_devices") or 0)
    if settings.gpus_per_node and gpus < settings.gpus_per_node:
        problems.append(f"The probe saw {gpus} GPU(s) on {host} but gpus_per_node asks for "
                        f"{settings.gpus_per_node}; pick a GPU partition or check the node's CUDA driver.")
    return problems


def check(settings: SlurmSettings, workspace_root: Path | str, folder: Path | str | None = None,
          pending_deadline_s: float = 20.0, run_deadline_s: float = 180.0) -> list[str]:
    """Problems that would stop a Med-Art job on this Slurm, one sentence each ([] = ready).

    Submits a probe with ``settings`` (into ``folder``, by default ``<workspace>/.slurm-probe``): it reads a
    token the studio wrote into the workspace, writes one back, imports medart_core and torch and counts
    GPUs. A probe still pending after ``pending_deadline_s`` is cancelled and its reason reported."""
    problem = _partition_problem(settings)
    if problem:
        return [problem]
    workspace = Path(workspace_root).absolute()
    probe_dir = workspace / ".slurm-probe"
    folder = Path(folder).absolute() if folder is not None else probe_dir
    token = uuid.uuid4().hex
    token_in, token_out = probe_dir / f"{token}.in", probe_dir / f"{token}.out"
    probe_dir.mkdir(parents=True, exist_ok=True)
    token_in.write_text(token)
    try:
        return _run_probe(settings, workspace, folder, token, token_in, token_out,
                          pending_deadline_s, run_deadline_s)
    finally:
        for p in (token_in, token_out):
            p.unlink(missing_ok=True)


def _run_probe(settings: SlurmSettings, workspace: Path, folder: Path, token: str, token_in: Path,
               token_out: Path, pending_deadline_s: float, run_deadline_s: float) -> list[str]:
    from submitit.helpers import CommandFunction

    want_torch = _torch_version()
    probe = CommandFunction([sys.executable, "-c", _PROBE, str(token_in), str(token_out), want_torch,
                             str(settings.gpus_per_node)], verbose=False)
    try:
        job_id, folder = submit(settings, folder, probe)
    except SlurmError as exc:
        if "gres" in str(exc).lower() and settings.gpus_per_node:
            return [f"The cluster has no GPUs for gpus_per_node={settings.gpus_per_node} on partition "
                    f"{settings.partition or '(default)'} ({exc})."]
        return [f"Slurm refused the probe job: {exc}"]
    status = _wait_probe(job_id, settings.partition or "(default)", pending_deadline_s, run_deadline_s)
    if isinstance(status, str):
        return [status]
    if not has_result(folder, job_id):
        paths = _paths(folder, job_id)
        if not paths.stderr.exists() and not paths.stdout.exists():
            return [f"The compute node cannot see the folder {folder}: the probe job ended ({status.state}, "
                    f"exit code {status.exit_code}) without writing its logs there; put the workspace on a "
                    "filesystem the nodes mount at the same path."]
        last = stderr_tail(folder, job_id, 3).replace("\n", " / ") or "(empty error log)"
        return [f"The probe job ended ({status.state}, exit code {status.exit_code}) before Med-Art's code ran: {last}"]
    try:
        output = result(folder, job_id)
    except SlurmError as exc:
        return [f"The probe failed on the node: {exc}"]
    line = next((ln for ln in reversed(str(output).splitlines()) if ln.startswith("MEDART_PROBE ")), None)
    if line is None:
        return [f"The probe printed nothing Med-Art understands: {str(output).strip()[-200:]!r}."]
    found = json.loads(line[len("MEDART_PROBE "):])
    problems = _probe_findings(found, token, workspace, settings, want_torch, token_out)
    if not problems:  # a passing probe leaves nothing behind; a failing one keeps its logs to read
        paths = _paths(folder, job_id)
        # submitit also keeps a ".submission_file_<uuid>.sh" symlink to the submission file.
        links = [p for p in folder.glob(".submission_file_*.sh")
                 if p.is_symlink() and Path(os.readlink(p)) == paths.submission_file]
        for p in (*links, paths.submission_file, paths.submitted_pickle, paths.result_pickle, paths.stdout,
                  paths.stderr):
            p.unlink(missing_ok=True)
    return problems
