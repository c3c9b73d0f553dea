"""Fan-out (issue 17 §3): an ablation's cells, an evaluation's checkpoints and a batch generation's prompts as
ONE Slurm job array.

**Design.** ``ablation``, ``evaluate`` and ``generate`` name a coordinator, ``fans_out`` in :mod:`medart_core.job_registry`.
Such a job on a Slurm executor is *not* handed to Slurm whole by the supervisor's Slurm bridge: it runs on
this machine as a light **coordinator**, a child of the supervisor like any local job but without the
accelerator slot (``Job.fans_out`` / ``Job.needs_gpu_slot``). The row stays the one user-visible job and the
ledger its source of truth: the coordinator writes progress, its log and its final record through its job
context as every local job does, and stop, resume and the studio's job panel work unchanged.

The coordinator (:class:`ArrayRun`):

1. prepares what every task shares, once, in the workspace (which the nodes mount at the same path): the
   ablation's fine-tuning set, domain classifier and real features, or the evaluation's real reference
   (``evaluate`` caches extractor and real features on disk), so the tasks only read those caches;
2. submits one array task per cell / checkpoint not already done with ``slurm.submit_array`` and the
   executor's ``SlurmSettings`` (the tasks call the same :func:`medart_core.ablation.run_cell_to_file` /
   ``run_evaluation`` as a local run, so cells and results land where and as a local run writes them); a
   generation's DiT batches go one task per prompt, in whole batches (:func:`generate_shards`,
   ``Generator.generate(part=...)``), into one folder, numbered as one run numbers them;
3. polls with ``slurm.poll`` (one squeue per ``MEDART_SLURM_POLL_S``, 3 s) and shows
   ``cells: 2 pending · 1 running · 3 done`` as the job's progress phase (:func:`tally`, :func:`phase_text`);
4. resubmits a task that ended without its outcome (killed, node failure, cancelled behind our back, an
   exception) ALONE, as a plain Slurm job, at most ``retries`` (1) times; a task that fails again fails the
   job once the others have ended (their cells are kept: a resume runs only what is missing);
5. merges exactly as a local run does (:func:`medart_core.ablation.merge_table`), or returns the results'
   ids in checkpoint order as the local ``evaluate`` job does, or the images in request order as the local
   ``generate`` job does.

**Stop**: the job's stop flag (ledger) makes the coordinator write a ``stop`` file in its attempt folder
(``W/jobs/<id>/attempt-<n>/``) that every task polls (a cell stops at its next training step), cancel the
tasks still pending at once, and ``scancel`` those still running after ``STOP_GRACE_S`` (below the
supervisor's SIGTERM grace). The Slurm ids of an attempt are kept in ``fanout.json`` there; a later attempt
(a resume after the coordinator died) first cancels what an earlier attempt left in the queue.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import MedArtError

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
STOP_GRACE_S = 30.0        # after the stop file, running tasks get this long before scancel
SETTLE_S = 20.0            # a COMPLETED task whose result is not visible yet (shared FS) gets this long
FANOUT_FILE, STOP_FILE = "fanout.json", "stop"


def _poll_interval() -> float:
    try:
        return float(os.environ.get("MEDART_SLURM_POLL_S", "") or 3.0)
    except ValueError:
        return 3.0


# =========================================================================================================
# Counting
# =========================================================================================================
def tally(states: Iterable[str]) -> dict[str, int]:
    """How many tasks are pending, running, done (and failed for good) from their states."""
    out = {PENDING: 0, RUNNING: 0, DONE: 0, FAILED: 0}
    for s in states:
        if s not in out:
            raise ValueError(f"unknown task state {s!r}")
        out[s] += 1
    return out


def task_state(slurm_state: str) -> str:
    """pending or running for a Slurm state still in the queue (``slurm.ACTIVE_STATES``), "" once it left."""
    from . import slurm

    state = slurm.base_state(slurm_state)
    if state in slurm.RUNNING_STATES:
        return RUNNING
    if state in slurm.WAITING_STATES:
        return PENDING
    return ""


def phase_text(counts: Mapping[str, int], what: str = "cells", retried: int = 0) -> str:
    """``cells: 2 pending · 1 running · 3 done`` (``· 1 retried``, ``· 1 failed`` when there are any)."""
    parts = [f"{counts.get(PENDING, 0)} pending", f"{counts.get(RUNNING, 0)} running", f"{counts.get(DONE, 0)} done"]
    if retried:
        parts.append(f"{retried} retried")
    if counts.get(FAILED):
        parts.append(f"{counts[FAILED]} failed")
    return f"{what}: " + " · ".join(parts)


# =========================================================================================================
# The coordinator
# =========================================================================================================
@dataclass
class Task:
    key: str                      # "hldf-s0" or the checkpoint
    args: tuple                   # the task function's arguments
    state: str = PENDING
    slurm_id: str | None = None
    tries: int = 0
    left_at: float | None = None  # when it left the queue without a visible result (settling)
    value: Any = None
    error: str = ""


@dataclass
class ArrayRun:
    """One job array of ``fn`` over ``tasks`` for the job of ``ctx``; ``run()`` returns "done" or "stopped" and
    raises ``JobFailed`` naming the tasks that failed after their retries. ``already_done``: tasks of the same
    job finished before (a resume), counted as done."""

    ctx: Any
    settings: Any                 # slurm.SlurmSettings
    fn: Callable[..., Any]
    tasks: list[Task]
    what: str = "cells"
    already_done: int = 0
    retries: int = 1
    poll_s: float = field(default_factory=_poll_interval)

    def __post_init__(self) -> None:
        from .jobs.channel import attempt_dir

        self.folder = attempt_dir(self.ctx.ws, self.ctx.job.id, self.ctx.attempt)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.slurm_folder = self.folder / "slurm"
        self.stop_file = self.folder / STOP_FILE
        self.retried = 0
        self.stopping = False

    # ---- reporting ---------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        c = tally(t.state for t in self.tasks)
        c[DONE] += self.already_done
        return c

    def report(self) -> None:
        c = self.counts()
        self.ctx.progress(step=c[DONE], total=len(self.tasks) + self.already_done,
                          phase=phase_text(c, self.what, self.retried))

    def _record(self) -> None:
        from .jobs.channel import write_json

        write_json(self.folder / FANOUT_FILE, {"tasks": [
            {"key": t.key, "slurm_id": t.slurm_id, "tries": t.tries, "state": t.state} for t in self.tasks]})

    # ---- the loop ----------------------------------------------------------------------------------------
    def run(self) -> str:
        from . import slurm
        from .jobs.runner import JobFailed

        cancel_leftovers(self.ctx, log=self.ctx.log)
        if not self.tasks:
            self.report()
            return "done"
        if self.ctx.should_stop():
            return "stopped"
        columns = list(zip(*(t.args for t in self.tasks)))
        try:
            ids, _ = slurm.submit_array(self.settings, self.slurm_folder, self.fn, *columns)
        except slurm.SlurmError as e:
            raise JobFailed(f"Slurm refused the job array of {len(self.tasks)} {self.what}: {e}") from None
        for t, sid in zip(self.tasks, ids):
            t.slurm_id, t.tries = sid, 1
        self._record()
        array = ids[0].split("_")[0]
        self.ctx.set_info(slurm_array=array)
        self.ctx.log(f"submitted {len(ids)} {self.what} to {self.ctx.job.executor} as Slurm job array {array} "
                     f"({', '.join(f'{t.key}={t.slurm_id}' for t in self.tasks)})")
        self.report()
        last = float("-inf")
        while True:
            if self.ctx.should_stop():
                return self.stop()
            if time.monotonic() - last >= self.poll_s:
                last = time.monotonic()
                self.step()
                self.report()
                open_ = [t for t in self.tasks if t.state in (PENDING, RUNNING)]
                if not open_:
                    failed = [t for t in self.tasks if t.state == FAILED]
                    if failed:
                        raise JobFailed(f"{len(failed)} of {len(self.tasks)} {self.what} failed after "
                                        f"{self.retries + 1} tries: " + "; ".join(f"{t.key}: {t.error}" for t in failed))
                    return "done"
            time.sleep(0.2)

    def step(self) -> None:
        """One poll: each open task's Slurm state; a task that left the queue is done or retried."""
        from . import slurm

        open_ = [t for t in self.tasks if t.state in (PENDING, RUNNING)]
        try:
            statuses = slurm.poll([t.slurm_id for t in open_])
        except slurm.SlurmError as e:
            self.ctx.log(f"Slurm did not answer ({e}); task states unchanged")
            return
        for t in open_:
            st = statuses[t.slurm_id]
            now = task_state(st.state)
            if now:
                t.state = now
                continue
            self._ended(t, st)
        self._record()

    def _ended(self, t: Task, st: Any) -> None:
        from . import slurm

        if slurm.has_result(self.slurm_folder, t.slurm_id):
            try:
                t.value = slurm.result(self.slurm_folder, t.slurm_id)
                t.state = DONE
                self.ctx.log(f"{t.key}: done (Slurm job {t.slurm_id})")
                return
            except slurm.SlurmError as e:
                why = str(e)
        else:
            if slurm.base_state(st.state) == "COMPLETED":
                # Slurm says it finished, its result file is not visible yet: a shared filesystem's lag
                t.left_at = t.left_at or time.monotonic()
                if time.monotonic() - t.left_at < SETTLE_S:
                    return
            _, why = slurm.map_state(st.state, st.reason, False, st.exit_code)
            tail = slurm.stderr_tail(self.slurm_folder, t.slurm_id, 3).replace("\n", " / ")
            if tail:
                why += f" (its stderr: {tail})"
        t.left_at = None
        if self.stopping:          # ended by the stop file (or cancelled by it): nothing to retry
            t.state, t.error = FAILED, "stopped"
        elif t.tries <= self.retries:
            try:
                sid, _ = slurm.submit(self.settings, self.slurm_folder, self.fn, *t.args)
            except slurm.SlurmError as e:
                t.state, t.error = FAILED, f"{why}; resubmitting it failed: {e}"
                return
            self.ctx.log(f"{t.key}: Slurm job {t.slurm_id} ended without its result ({why}); retrying it "
                         f"alone as Slurm job {sid} (try {t.tries + 1} of {self.retries + 1})")
            t.slurm_id, t.tries, t.state = sid, t.tries + 1, PENDING
            self.retried += 1
        else:
            t.state, t.error = FAILED, why
            self.ctx.log(f"{t.key}: failed for good (Slurm job {t.slurm_id}): {why}")

    def stop(self) -> str:
        """The stop file for the tasks, pending ones cancelled at once, running ones after STOP_GRACE_S."""
        from . import slurm
        from .fileio import atomic_write_text

        self.stopping = True
        atomic_write_text(self.stop_file, f"{time.time()}\n")
        self.ctx.log(f"stop requested: stop file written for the {self.what}' Slurm tasks")
        deadline = time.monotonic() + STOP_GRACE_S
        while True:
            self.step()
            for t in self.tasks:
                if t.state == PENDING:
                    _cancel(t.slurm_id, self.ctx.log)
            open_ = [t for t in self.tasks if t.state == RUNNING]
            if not open_:
                break
            if time.monotonic() > deadline:
                for t in open_:
                    self.ctx.log(f"{t.key}: still running {STOP_GRACE_S:.0f} s after the stop; scancel {t.slurm_id}")
                    _cancel(t.slurm_id, self.ctx.log)
                break
            time.sleep(max(0.2, min(self.poll_s, 2.0)))
        self.report()
        return "stopped"


def _cancel(slurm_id: str | None, log: Callable[[str], None]) -> None:
    from . import slurm

    if slurm_id:
        try:
            slurm.cancel(slurm_id)
        except slurm.SlurmError as e:
            log(f"scancel {slurm_id}: {e}")


def cancel_leftovers(ctx: Any, log: Callable[[str], None] = print) -> list[str]:
    """Cancel the Slurm tasks earlier attempts of this job left in the queue (their coordinator died);
    returns the ids cancelled. Their finished cells are kept, so nothing done is lost."""
    from . import slurm
    from .jobs.channel import attempt_dir, read_json

    ids = []
    for a in range(1, int(ctx.attempt)):
        rec = read_json(attempt_dir(ctx.ws, ctx.job.id, a) / FANOUT_FILE, {}) or {}
        ids += [t["slurm_id"] for t in rec.get("tasks", []) if t.get("slurm_id")]
    if not ids:
        return []
    try:
        live = [i for i, st in slurm.poll(ids).items() if task_state(st.state)]
    except slurm.SlurmError as e:
        log(f"Slurm did not answer about earlier attempts' tasks ({e})")
        return []
    for i in live:
        log(f"cancelling Slurm job {i}, left by an earlier attempt of this job")
        _cancel(i, log)
    return live


def _settings(ctx: Any):
    from . import executors

    spec = executors.get_executor_spec(ctx.ws, ctx.job.executor)
    if spec.settings is None:
        raise MedArtError(f"Executor {ctx.job.executor!r} is not a Slurm executor.")
    # One process per array task: the executor's nodes x tasks-per-node are data-parallel training's ranks;
    # a cell, a checkpoint or a shard is one process (several would write the same files).
    return dataclasses.replace(spec.settings, nodes=1, tasks_per_node=1)


def _stopper(stop_file: str) -> Callable[[], bool]:
    path = Path(stop_file)
    return lambda: path.exists()


# =========================================================================================================
# The ablation: one task per (row, seed) cell
# =========================================================================================================
def ablation_cell_task(ws_root: str, preset_json: str, row: str, seed: int, stop_file: str, threads: int) -> str:
    """One cell on a Slurm node (what the array runs): the same :func:`~medart_core.ablation.run_cell_to_file`
    as a local run, against the scoring the coordinator cached. Returns the cell file's path."""
    import torch

    from . import ablation as A
    from .captions import CaptionStore
    from .workspace import Workspace

    torch.set_num_threads(max(1, int(threads)))
    ws = Workspace.open(ws_root)
    preset = A.AblationPreset.from_json(preset_json)
    the_row = next(r for r in A.ROWS if r.name == row)
    store = CaptionStore.for_workspace(ws)
    try:
        dataset = A.prepare_dataset(ws, store, log=print)
        scoring = A.prepare_scoring(ws, store, preset, [the_row], log=print)
        path = A.run_cell_to_file(ws, store, preset, the_row, int(seed), scoring, dataset=dataset,
                                  log=lambda m: print(m, flush=True), should_stop=_stopper(stop_file))
    finally:
        store.close()
    if path is None:
        raise InterruptedError(f"cell {A.cell_name(row, seed)} stopped on request")
    return str(path)


def run_ablation_array(ctx: Any, preset: Any) -> dict[str, Any]:
    """The ``ablation`` job on a Slurm executor: shared preparation here, the cells as a job array, the
    table merged here exactly as :func:`medart_core.ablation.run_ablation` does."""
    from . import ablation as A
    from .captions import CaptionStore

    t0 = time.perf_counter()
    settings = _settings(ctx)
    store = CaptionStore.for_workspace(ctx.ws)
    try:
        dataset, rows, scoring, cells = A.start_ablation(ctx.ws, store, preset, log=ctx.log)
    finally:
        store.close()
    todo = [(r, s) for r, s in cells if not A.cell_path(ctx.ws, preset, r.name, s).is_file()]
    threads = settings.cpus_per_task
    run = ArrayRun(ctx, settings, ablation_cell_task, [], what="cells", already_done=len(cells) - len(todo))
    run.tasks = [Task(A.cell_name(r.name, s), (str(ctx.ws.root), preset.to_json(), r.name, int(s),
                                               str(run.stop_file), threads)) for r, s in todo]
    ctx.log(f"ablation {A.ablation_dir(ctx.ws, preset).name}: {len(cells)} cells ({len(todo)} to run) as a Slurm "
            f"job array on {ctx.job.executor}, {threads} thread(s) each")
    if run.run() == "stopped":
        return {"status": "stopped"}
    A.merge_table(ctx.ws, preset, rows, absent=scoring.absent, threads=threads, t0=t0, log=ctx.log)
    return {"status": "finished", "table": str(A.ablation_dir(ctx.ws, preset) / "table.md"),
            "slurm_tasks": {t.key: t.slurm_id for t in run.tasks}}


# =========================================================================================================
# The evaluation: one task per checkpoint
# =========================================================================================================
def evaluate_checkpoint_task(ws_root: str, spec: dict[str, Any], checkpoint: str, backbone: str, stop_file: str,
                             threads: int) -> str:
    """One checkpoint on a Slurm node: ``run_evaluation`` of it alone (the real reference is read from the
    cache the coordinator filled); the result is saved under ``W/evaluations/``. Returns its id."""
    import torch

    from .captions import CaptionStore
    from .evaluate import EvalSpec, run_evaluation
    from .workspace import Workspace

    torch.set_num_threads(max(1, int(threads)))
    ws = Workspace.open(ws_root)
    store = CaptionStore.for_workspace(ws)
    try:
        (res,) = run_evaluation(ws, store, EvalSpec(**spec), [checkpoint], backbone=backbone,
                                log=lambda m: print(m, flush=True), should_stop=_stopper(stop_file))
    finally:
        store.close()
    return res.id


def run_evaluate_array(ctx: Any, spec: Any, checkpoints: Sequence[str], backbone: str | None) -> dict[str, Any]:
    """The ``evaluate`` job on a Slurm executor: the real reference prepared (and cached) once here, one
    array task per checkpoint; the result ids in checkpoint order, as the local job returns them."""
    from .captions import CaptionStore
    from .evaluate import prepare_reference
    from .generate import default_backbone

    settings = _settings(ctx)
    bb = backbone or default_backbone(ctx.ws, next((c for c in checkpoints if c != "base"), "base"))
    store = CaptionStore.for_workspace(ctx.ws)
    try:
        ref = prepare_reference(ctx.ws, store, spec)      # extractor + real features, cached on disk
    finally:
        store.close()
    ctx.log(f"eval set: {len(ref.eval_set.items)} real images; {len(checkpoints)} checkpoint(s) as a Slurm job "
            f"array on {ctx.job.executor} (backbone {bb})")
    run = ArrayRun(ctx, settings, evaluate_checkpoint_task, [], what="checkpoints")
    run.tasks = [Task(ck, (str(ctx.ws.root), dataclasses.asdict(spec), ck, bb, str(run.stop_file),
                           settings.cpus_per_task)) for ck in checkpoints]
    if run.run() == "stopped":
        return {"status": "stopped"}
    return {"results": [t.value for t in run.tasks], "slurm_tasks": {t.key: t.slurm_id for t in run.tasks}}


# =========================================================================================================
# A batch generation: one task per prompt, in whole DiT batches
# =========================================================================================================
MAX_GENERATE_TASKS = 64


def generate_shards(n_prompts: int, n_batches: int, most: int = MAX_GENERATE_TASKS) -> list[tuple[int, int]]:
    """The DiT-batch ranges ``(a, b)`` of the tasks: one per prompt (at most ``most``, never more than there
    are batches), each of whole batches, contiguous, covering all of them, as even as they can be. Whole
    batches keep every image's batch exactly as one run has it, so each image equals the local run's."""
    k = max(1, min(int(n_prompts), int(n_batches), int(most)))
    cuts = [round(j * n_batches / k) for j in range(k + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def generate_shard_task(ws_root: str, request: dict[str, Any], backbone: str, precision: str | None, folder: str,
                        part: tuple[int, int], stop_file: str, threads: int) -> list[str]:
    """One shard on a Slurm node: :meth:`~medart_core.generate.Generator.generate` of the batches ``part``
    into the job's folder, numbered as in one run. Returns the images' paths."""
    import torch

    from .generate import GenerationRequest, get_generator
    from .workspace import Workspace

    torch.set_num_threads(max(1, int(threads)))
    ws = Workspace.open(ws_root)
    stop = _stopper(stop_file)

    def progress(done: int, total: int) -> None:
        if stop():
            raise InterruptedError(f"generation shard {tuple(part)} stopped on request")

    imgs = get_generator(ws, backbone, precision).generate(GenerationRequest.from_dict(request), progress=progress,
                                                          out_dir=folder, part=(int(part[0]), int(part[1])))
    return [str(i.path) for i in imgs]


def run_generate_array(ctx: Any) -> dict[str, Any]:
    """The ``generate`` job on a Slurm executor: the seed drawn and the folder made here, the request's DiT
    batches sharded by prompt over a job array; the images in request order, as the local job returns them."""
    import math
    import secrets

    from .generate import GenerationRequest, default_backbone, new_batch_id

    settings = _settings(ctx)
    req = GenerationRequest.from_dict(ctx.config["request"])
    if req.seed is None:      # every shard must use the same seed: drawn once, here (as one run draws it)
        req = GenerationRequest.from_dict(dict(req.to_dict(), seed=secrets.randbelow(2 ** 31)))
    bb = ctx.config.get("backbone") or default_backbone(ctx.ws, req.checkpoint)
    folder = ctx.ws.samples_dir / new_batch_id()
    folder.mkdir(parents=True, exist_ok=True)
    shards = generate_shards(len(req.prompts), math.ceil(len(req.prompts) * req.n / req.batch_size))
    ctx.log(f"{len(req.prompts)} prompt(s) x {req.n} image(s), seed {req.seed}: {len(shards)} Slurm task(s) on "
            f"{ctx.job.executor} (whole batches of {req.batch_size} each) into {folder}")
    run = ArrayRun(ctx, settings, generate_shard_task, [], what="prompt shards")
    run.tasks = [Task(f"batches {a}-{b - 1}", (str(ctx.ws.root), req.to_dict(), bb, ctx.config.get("precision"),
                                               str(folder), (a, b), str(run.stop_file), settings.cpus_per_task))
                 for a, b in shards]
    if run.run() == "stopped":
        return {"status": "stopped"}
    return {"status": "finished", "images": [p for t in run.tasks for p in t.value], "folder": str(folder),
            "seed": req.seed, "slurm_tasks": {t.key: t.slurm_id for t in run.tasks}}


# =========================================================================================================
# The kinds' coordinators (``fans_out`` in medart_core.job_registry: run instead of ``run`` on Slurm)
# =========================================================================================================
def run_ablation_job_array(ctx: Any) -> dict[str, Any]:
    """The ``ablation`` job on a Slurm executor."""
    from .ablation import preset_from_config

    return run_ablation_array(ctx, preset_from_config(ctx.config))


def run_evaluate_job_array(ctx: Any) -> dict[str, Any]:
    """The ``evaluate`` job on a Slurm executor (config as :func:`medart_core.evaluate.run_evaluate_job`)."""
    from .evaluate import EvalSpec

    return run_evaluate_array(ctx, EvalSpec(**ctx.config.get("spec", {})), list(ctx.config["checkpoints"]),
                              ctx.config.get("backbone"))


def run_generate_job_array(ctx: Any) -> dict[str, Any]:
    """The ``generate`` job on a Slurm executor (config as :func:`medart_core.generate.run_generate_job`)."""
    return run_generate_array(ctx)


__all__ = ["run_ablation_job_array", "run_evaluate_job_array", "run_generate_job_array", "generate_shards",
           "generate_shard_task", "run_generate_array", "tally", "phase_text", "task_state", "ArrayRun", "Task", "cancel_leftovers", "ablation_cell_task",
           "run_ablation_array", "evaluate_checkpoint_task", "run_evaluate_array"]
