"""The command line's commands, one light module per area (data, captions, training, jobs, generation,
evaluation, users, demo backbone, ablation); :mod:`medart_core.cli` lists them in one table.

Each module defines, per command, a function that adds the command's arguments to its parser and sets its
handler (``func(args) -> int``). Handlers import the library's stage modules when they run, never at import,
so ``python -m medart_core --help`` and ``python -m medart_core CMD --help`` import no torch, diffusers,
transformers or gradio. Choices that a stage module owns are mirrored here as plain values;
``tests/test_cli.py`` checks that they agree.
"""
from __future__ import annotations

import argparse

WORKSPACE_HELP = "workspace folder (default: $MEDART_HOME or ./workspace)"


def add_workspace(p: argparse.ArgumentParser, help: str = WORKSPACE_HELP) -> None:
    """The one ``--workspace/-w`` option every command that opens a workspace has."""
    p.add_argument("--workspace", "-w", default=None, help=help)
