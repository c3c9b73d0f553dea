"""Small real training datasets for the training, cache, resume and multi-process tests."""
from __future__ import annotations

import numpy as np
from PIL import Image


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
