"""Named training presets: plain JSON files next to this module, each a partial ``TrainConfig``.

``paper``      the Med-Art setting (PixArt-XL-2-512x512, 512 px, rank-8 LoRA on DiT and T5, HLDF N=500, M=20).
``small-gpu``  the same model for a 24 GB card: T5 frozen (its features cached once), truncated pixel-loss
               gradients, activation checkpointing.
``cpu-smoke``  the offline tiny backbone at 64 px: a few dozen steps with a pixel step every 10, so the
               whole pipeline runs end to end on two CPU cores in well under two minutes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent


def list_presets() -> list[str]:
    """Names of the shipped presets (file stems)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset's fields as a dict (feed it to ``TrainConfig.from_dict``); ConfigError if unknown."""
    path = PRESETS_DIR / f"{name}.json"
    if not name or "/" in name or "\\" in name or not path.is_file():
        raise ConfigError(f"Unknown training preset {name!r}; choose one of {list_presets()} "
                          "or pass a JSON file with --config.")
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("_comment", None)
    return data
