"""``python -m medart_core.jobs _run W ID ATTEMPT``: the job process itself, as the supervisor spawns it (rows of
existing ledgers say so). Any other arguments go to the one command line, ``python -m medart_core``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "_run":
        from medart_core.cli import main as cli_main

        return cli_main(argv)
    p = argparse.ArgumentParser(prog="python -m medart_core.jobs _run", description="run one attempt of a job")
    p.add_argument("workspace")
    p.add_argument("id")
    p.add_argument("attempt", type=int)
    args = p.parse_args(argv[1:])
    # The canonical package (not a copy named __main__), so kinds and classes are the same objects.
    from medart_core.errors import MedArtError
    from medart_core.jobs import run_job_process
    from medart_core.workspace import Workspace

    try:
        return run_job_process(Workspace.open(args.workspace), args.id, int(args.attempt))
    except MedArtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
