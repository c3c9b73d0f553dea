"""Model exports of a training run: PEFT adapter folders, a merged diffusers pipeline folder and a model
card, from the live model at the end of a run or from any checkpoint. Each part is written next to its
target and renamed into place.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text
from .train_config import TrainConfig
from .workspace import Workspace


def export_from_backbone(backbone: Any, out_dir: Path, *, cfg: TrainConfig, provenance: dict[str, Any], step: int,
                         merged: bool = True) -> dict[str, str]:
    """``out_dir/adapters`` (PEFT folders per model) and, with ``merged``, ``out_dir/merged`` (diffusers
    pipeline with LoRA merged), each with a README.md model card. Written next to the target and renamed."""
    from .lora import export_merged, model_card, save_adapters

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = model_card(base_model=cfg.backbone, lora=cfg.lora, hldf=cfg.hldf, dataset=cfg.dataset,
                      provenance=provenance, steps=step, is_random=bool(backbone.is_random))
    done: dict[str, str] = {}
    parts = [("adapters", lambda d: save_adapters(backbone, d))]
    if merged:
        parts.append(("merged", lambda d: export_merged(backbone, d)))
    for name, write in parts:
        final, tmp = out_dir / name, out_dir / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done[name] = str(final)
    atomic_write_text(out_dir / "README.md", card)
    return done


def export_model(ws: Workspace, run: str, out_dir: str | os.PathLike, *, step: int | None = None,
                 merged: bool = True) -> dict[str, str]:
    """Export any checkpoint of a run (the latest by default): adapters + merged pipeline + model card."""
    from .backbone import load_backbone
    from .checkpoint import find_checkpoint, load_adapter_tensors, read_checkpoint
    from .lora import attach_lora

    ck = find_checkpoint(ws, run, step)
    state, tensors = read_checkpoint(ck)
    cfg = TrainConfig.from_dict(state["config"])
    backbone = load_backbone(cfg.backbone)
    backbone.resolution = int(cfg.resolution or backbone.resolution)
    attach_lora(backbone, cfg.lora)
    load_adapter_tensors(backbone, tensors["adapters"])
    prov = dict(state.get("provenance", {}), checkpoint=f"{run}/{ck.name}")
    return export_from_backbone(backbone, Path(out_dir), cfg=cfg, provenance=prov, step=int(state["step"]),
                                merged=merged)
