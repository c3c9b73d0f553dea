"""What a start does before the studio, a job or the CLI uses the workspace's stores: with
``MEDART_DURABLE_DIR`` set, bring the local workspace and the durable folder in step (restore a fresh disk
from the log; copy into the log what the local disk has that it lacks). The mechanism is
:mod:`medart_core.durable`; this module only knows which stores there are and how each is opened, so it sits
above them (not in :mod:`medart_core.spaces`, which ``jobs`` imports to ask whether training is allowed here).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from . import durable
from .errors import ConfigError, MedArtError
from .workspace import Workspace

__all__ = ["prepare_workspace", "main"]


def prepare_workspace(ws: Workspace) -> durable.StartupReport:
    """Call once at start, before the studio or a job uses the stores: with ``MEDART_DURABLE_DIR`` set, restore
    a fresh local disk from the durable log (captions, blind reviews, jobs, image files, manifests) and copy
    into the log whatever the local workspace has that the log lacks. A no-op without the variable."""
    root = durable.durable_dir()
    if root is None:
        return durable.StartupReport(enabled=False)
    t0 = time.monotonic()
    root = durable.ensure_root(root)
    wsr = Path(ws.root).resolve()
    if wsr == root.resolve() or root.resolve() in wsr.parents:
        raise ConfigError(f"The workspace {ws.root} lies inside {durable.ENV_VAR}={root}: keep the workspace (and "
                          "its SQLite databases) on local disk and point the durable folder elsewhere.")
    if wsr in root.resolve().parents:
        raise ConfigError(f"{durable.ENV_VAR}={root} is inside the workspace {ws.root}, so it is lost with it: "
                          "point it at the mounted storage bucket.")
    from .accounts import UserStore
    from .blind import ReviewStore
    from .captions import CaptionStore
    from .jobs import JobLedger

    report = durable.StartupReport(enabled=True, durable_dir=root)
    openers: dict[durable.Spec, Callable[[], Any]] = {
        durable.CAPTIONS: lambda: CaptionStore.for_workspace(ws).close(),
        durable.REVIEWS: lambda: ReviewStore.for_workspace(ws),
        durable.JOBS: lambda: JobLedger.for_workspace(ws).close()}

    def open_users() -> None:
        users = UserStore.for_workspace(ws)
        users.conn()           # creates the table
        users.close()

    openers[durable.USERS] = open_users
    for spec, open_schema in openers.items():
        if durable.has_log(spec, root) or (Path(ws.root) / spec.db_name).exists():
            open_schema()
            report.stores[spec.kind] = durable.merge_store(spec, Path(ws.root) / spec.db_name, root)
        else:
            report.stores[spec.kind] = durable.StoreMerge(spec.kind)
    if report.stores["captions"].restored:
        with CaptionStore.for_workspace(ws) as store:
            store.rebuild_state()
    if report.stores["jobs"].restored:
        ledger = JobLedger.for_workspace(ws)   # a job restored as running belonged to a process that is gone
        ledger.reconcile()
        ledger.close()
    for sync in (durable.sync_caption_files, durable.sync_review_files):
        r, s = sync(ws, root)
        report.files_restored += r
        report.files_saved += s
    report.seconds = time.monotonic() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m medart_core.startup [--workspace W]``: the restore/sync the studio runs at start."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m medart_core.startup", description=__doc__.splitlines()[0])
    p.add_argument("--workspace", "-w", default=None)
    args = p.parse_args(argv)
    try:
        print(prepare_workspace(Workspace.open(args.workspace)).summary())
    except MedArtError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
