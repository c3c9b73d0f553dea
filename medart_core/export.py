"""Model exports of a training run: PEFT adapter folders, a merged diffusers pipeline folder and a model
card, from the live model at the end of a run or from any checkpoint. Each part is written next to its
target and renamed into place.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text
from .train_config import TrainConfig
from .workspace import Workspace


def export_from_backbone(backbone: Any, out_dir: Path, *, cfg: TrainConfig, provenance: dict[str, Any], step: int,
                         merged: bool = True, ws: Workspace | None = None,
                         evaluations: Sequence[Mapping[str, Any]] = ()) -> dict[str, str]:
    """``out_dir/adapters`` (PEFT folders per model) and, with ``merged``, ``out_dir/merged`` (diffusers
    pipeline with LoRA merged), each with the Hugging Face model card README.md (also in ``out_dir``; with
    ``ws``, the data summary counts the store's classes). Written next to the target and renamed."""
    from .lora import export_merged, save_adapters
    from .model_card import build_model_card, data_summary

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = build_model_card(cfg=cfg, provenance=provenance, step=step, is_random=bool(backbone.is_random),
                            weights=str(provenance.get("weights", "raw")),
                            data=data_summary(ws, cfg.dataset, provenance), evaluations=evaluations)
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
                 merged: bool = True, weights: str = "raw") -> dict[str, str]:
    """Export any checkpoint of a run (the latest by default): adapters + merged pipeline + model card.
    ``weights``: "raw" (default), "ema" or "ema-SIGMA" (as the ``RUN@STEP:WEIGHTS`` reference suffix)."""
    from safetensors.torch import load_file

    from .backbone import load_backbone
    from .checkpoint import find_checkpoint, load_adapter_tensors, read_checkpoint, weights_file
    from .generate import file_sha256
    from .lora import attach_lora
    from .model_card import checkpoint_evaluations

    ck = find_checkpoint(ws, run, step)
    state, tensors = read_checkpoint(ck)
    if weights != "raw":
        tensors["adapters"] = load_file(str(weights_file(ck, weights)))
    evaluations = checkpoint_evaluations(ws, file_sha256(weights_file(ck, weights)))
    cfg = TrainConfig.from_dict(state["config"])
    backbone = load_backbone(cfg.backbone)
    backbone.resolution = int(cfg.resolution or backbone.resolution)
    attach_lora(backbone, cfg.lora)
    load_adapter_tensors(backbone, tensors["adapters"])
    prov = dict(state.get("provenance", {}), checkpoint=f"{run}/{ck.name}", weights=weights)
    return export_from_backbone(backbone, Path(out_dir), cfg=cfg, provenance=prov, step=int(state["step"]),
                                merged=merged, ws=ws, evaluations=evaluations)
