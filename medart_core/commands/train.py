"""Training commands: ``train`` (in the foreground), ``export-model``, and the ``jobs submit train``
options (the same as ``train``'s)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..train_config import add_config_arguments
from . import add_workspace

if TYPE_CHECKING:  # pragma: no cover
    from ..train_config import TrainConfig


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    """The run options plus one flag per TrainConfig field (``jobs submit train`` adds ``--workspace``)."""
    p.add_argument("--preset", default=None, help="paper | small-gpu | cpu-smoke (default: cpu-smoke)")
    p.add_argument("--config", default=None, help="JSON file with TrainConfig fields; overrides the preset")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue run RUN from its latest checkpoint")
    p.add_argument("--run", default=None, metavar="NAME", help="name of a new run (default: dataset + UTC time)")
    add_config_arguments(p)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` options: where and which run, plus one flag per TrainConfig field."""
    add_workspace(p)
    add_submit_arguments(p)


def config_from_args(args: argparse.Namespace) -> "TrainConfig | None":
    """Preset (or, on resume, the run's saved config), then --config JSON (partial), then the flags.
    ``None`` when resuming with nothing to change."""
    from ..errors import ConfigError
    from ..presets import load_preset
    from ..train_config import TrainConfig, load_run_config, merge_config, overrides_from_args
    from ..workspace import Workspace

    flags = overrides_from_args(args)
    if args.resume and not args.config and args.preset is None and not flags:
        return None
    if args.resume:
        d = load_run_config(Workspace.open(args.workspace).run_layout(args.resume).config).to_dict()
    else:
        d = load_preset(args.preset or "cpu-smoke")
    if args.config:
        try:
            extra = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"Cannot read --config {args.config}: {e}") from None
        d = merge_config(d, extra)
    return TrainConfig.from_dict(merge_config(d, flags))


def submit_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``train`` job config of ``jobs submit train`` (its hook in medart_core.job_registry)."""
    cfg = config_from_args(args)
    if args.resume:
        return {"resume": args.resume, "train": cfg.to_dict() if cfg is not None else None}
    return {"train": cfg.to_dict(), "run": args.run, "preset": args.preset or "cpu-smoke"}


def main_train(argv: Sequence[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """``python -m medart_core train``: a run in the foreground; returns the exit status."""
    if args is None:
        p = argparse.ArgumentParser(prog="medart_core train")
        add_train_arguments(p)
        args = p.parse_args(argv)
    from ..captions import CaptionStore
    from ..train import train
    from ..workspace import Workspace

    ws = Workspace.open(args.workspace)
    store = CaptionStore.for_workspace(ws)
    result = train(config_from_args(args), ws, store, run_name=args.run, resume=args.resume)
    print(json.dumps({"run": result.run, "status": result.status, "step": result.step,
                      "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
                      "exports": result.exports, "over_long_captions": result.over_long_captions,
                      "train_images_per_s": result.train_images_per_s, "elapsed_s": result.elapsed_s}))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    return main_train(args=args)


def _cmd_export_model(args: argparse.Namespace) -> int:
    from ..export import export_model
    from ..workspace import Workspace

    from ..model_card import upload_commands

    ws = Workspace.open(args.workspace)
    print(json.dumps(export_model(ws, args.run, args.out, step=args.step, merged=not args.adapters_only,
                                  weights=args.weights)))
    # Publishing is the user's decision (and needs their token): print the command, never run it.
    cmds = upload_commands(Path(args.out), args.run)
    print(f"Model card: {Path(args.out) / 'README.md'}. To publish it on the Hugging Face Hub:\n  {cmds[0]}\n"
          f"  (newer huggingface_hub: {cmds[1]})")
    return 0


def train(p: argparse.ArgumentParser) -> None:
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)


def export_model(p: argparse.ArgumentParser) -> None:
    add_workspace(p)
    p.add_argument("--run", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--adapters-only", action="store_true", help="skip the merged pipeline (a full model copy)")
    p.add_argument("--weights", default="raw", metavar="raw|ema|ema-S",
                   help="which adapters: the raw trained ones (default), the EMA, or a post-hoc EMA of sigma_rel S")
    p.set_defaults(func=_cmd_export_model)
