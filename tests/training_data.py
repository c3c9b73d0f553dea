"""Small real training datasets, the tiny run configuration and the subprocess environment shared by the
training, cache, resume, generation and multi-process tests."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

# A run of the tiny backbone that finishes in seconds: LoRA on DiT and T5, a pixel step every 3rd step,
# checkpoints every 2 steps, no validation sampling beyond one seed and no merged export.
TINY_RUN: dict[str, Any] = {
    "backbone": "tiny", "resolution": 32, "dataset": "mini", "captions": "latest",
    "lora": {"rank": 2, "alpha": 2.0, "t5_enabled": True},
    "hldf": {"pixel_every": 3, "sample_steps": 2, "checkpointing": False},
    "batch_size": 1, "max_steps": 4, "checkpoint_every": 2, "validate_every": 100, "validation_steps": 2,
    "validation_seeds": [0], "val_images": 1, "export_merged": False,
}


def tiny_train_config(**over: Any) -> Any:
    """:data:`TINY_RUN` with ``over`` replacing whole fields (a ``lora={...}`` replaces the LoRA section)."""
    from medart_core.train import TrainConfig

    return TrainConfig.from_dict(copy.deepcopy({**TINY_RUN, **over}))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a training subprocess: this checkout importable, no hub, one thread (identical
    arithmetic in every process, and no oversubscription on a shared 2-core machine)."""
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                **extra)


def make_dataset(ws, store, name: str = "mini", n: int = 6, size: tuple[int, int] = (48, 40)) -> list[int]:
    """``n`` small real PNGs (distinct colours + noise) with template drafts, added through the store."""
    from medart_core.captions import ImageRecord
    from medart_core.data import pixel_hash

    store.create_dataset(name, modality="generic")
    ws.images_dir(name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    recs, drafts = [], []
    for i in range(n):
        arr = np.clip(rng.integers(0, 255, 3) + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        h = pixel_hash(img)
        fn = f"images/{h[:16]}.png"
        img.save(ws.dataset_dir(name) / fn)
        recs.append(ImageRecord(None, name, fn, f"class{i % 2}", h, size[0], size[1], {}))
        drafts.append((f"An image of class {i % 2} number {i}", "template"))
    return store.add_images(name, recs, drafts=drafts)
