"""Where things live on disk. Every path of the workspace is built here and nowhere else.

Layout under ``MEDART_HOME`` (default ``./workspace``)::

    captions.sqlite            caption store (images, events), WAL mode
    datasets/<name>/images/    normalised RGB PNGs, named by pixel hash
    datasets/<name>/manifest.jsonl
    datasets/<name>/prompts.json   per-dataset prompt templates (captions)
    runs/<run>/                training runs: see ``RunLayout`` (config, metrics, status, checkpoints, grids)
    jobs.sqlite, jobs/<id>/    job ledger and each job's log
    cache/                     feature caches (T5 embeddings, VAE latents), real-image features
    samples/                   generated images with JSON sidecars
    exports/                   caption exports, merged models
    tmp/                       staging for atomic writes (same filesystem as the targets)

The workspace is private to the user running the studio: ``users.sqlite`` holds password hashes, the caption
store and the images may hold patient data. :meth:`Workspace.open` makes the root folder ``0700`` (nothing
inside can then be reached by another user, whatever the files' own modes) and the SQLite databases ``0600``;
each store creates its database through :func:`private_file`, so it is private from its first byte.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

ENV_VAR = "MEDART_HOME"
DEFAULT_HOME = "workspace"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def _owner_only(path: Path) -> None:
    """Take group and other access away from ``path`` (kept as is where the filesystem has no modes or the
    path is not ours: the workspace still works, as it did before)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, mode & ~0o077)
    except OSError:
        pass


def private_file(path: str | os.PathLike) -> Path:
    """Create ``path`` empty with mode 0600, or make an existing one owner-only; returns it.

    Called before a store's first SQLite connect: SQLite gives a database's ``-wal`` and ``-shm`` files the
    database's own mode, so all three are private (an empty file is a valid empty database)."""
    path = Path(path)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    except FileExistsError:
        _owner_only(path)
    return path


def validate_name(name: str, what: str = "name") -> str:
    """Dataset and run names become folder names: keep them to a safe alphabet."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ConfigError(
            f"Invalid {what} {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit."
        )
    return name


@dataclass(frozen=True)
class RunLayout:
    """Every path inside one training run folder ``runs/<run>/``."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:          # TrainConfig as JSON, written once when the run starts
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:         # one fsynced JSON line per optimiser step / validation
        return self.root / "metrics.jsonl"

    @property
    def status(self) -> Path:          # {"status", "step", "total_steps", "error", ...}, rewritten atomically
        return self.root / "status.json"

    @property
    def validation_dir(self) -> Path:  # validation grids step_XXXXXX.png
        return self.root / "validation"

    def validation_grid(self, step: int) -> Path:
        return self.validation_dir / f"step_{int(step):06d}.png"

    @property
    def checkpoints_dir(self) -> Path:  # step_XXXXXX/ folders and the ``latest`` pointer
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{int(step):06d}"

    @property
    def latest_pointer(self) -> Path:
        return self.checkpoints_dir / "latest"

    @property
    def export_dir(self) -> Path:      # adapters/ and merged/ exported at the end of a run
        return self.root / "export"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, root: str | os.PathLike | None = None) -> "Workspace":
        """Open (and create) a workspace; ``root`` defaults to ``$MEDART_HOME`` or ``./workspace``.

        The root becomes owner-only (0700) and its SQLite files 0600, also for a workspace made before this
        rule (module docstring)."""
        if root is None:
            root = os.environ.get(ENV_VAR) or DEFAULT_HOME
        ws = cls(Path(root).expanduser().resolve())
        ws.root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        _owner_only(ws.root)
        for db in ws.root.glob("*.sqlite*"):
            _owner_only(db)
        return ws

    # --- top level -------------------------------------------------------------------------
    @property
    def captions_db(self) -> Path:
        return self.root / "captions.sqlite"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    @property
    def tmp_dir(self) -> Path:
        p = self.root / "tmp"
        p.mkdir(parents=True, exist_ok=True)
        return p

    # --- datasets --------------------------------------------------------------------------
    def dataset_dir(self, name: str) -> Path:
        return self.datasets_dir / validate_name(name, "dataset name")

    def images_dir(self, name: str) -> Path:
        return self.dataset_dir(name) / "images"

    def manifest_path(self, name: str) -> Path:
        return self.dataset_dir(name) / "manifest.jsonl"

    def prompts_path(self, name: str) -> Path:
        return self.dataset_dir(name) / "prompts.json"

    def image_path(self, dataset: str, file_name: str) -> Path:
        """Absolute path of an image given its stored relative ``file_name`` (e.g. ``images/ab12.png``)."""
        p = (self.dataset_dir(dataset) / file_name).resolve()
        if self.dataset_dir(dataset).resolve() not in p.parents:
            raise ConfigError(f"Stored file name {file_name!r} escapes the dataset folder.")
        return p

    # --- runs ------------------------------------------------------------------------------
    def run_dir(self, run: str) -> Path:
        return self.runs_dir / validate_name(run, "run name")

    def run_layout(self, run: str) -> RunLayout:
        return RunLayout(self.run_dir(run))

    # --- jobs and generated images -------------------------------------------------------------
    @property
    def jobs_db(self) -> Path:
        return self.root / "jobs.sqlite"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / validate_name(job_id, "job id")

    def feature_cache_dir(self, key: str) -> Path:
        return self.cache_dir / "features" / validate_name(key, "cache key")
