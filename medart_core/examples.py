"""Training examples: which images and caption texts a run uses, how they are split, ordered, cropped and
tokenised. Both the feature cache and the trainer read examples from here.

* ``collect_examples``: approved (or latest) captions from the store, or an exported imagefolder/CSV folder
  (read through ``interchange.read_metadata``, the same reader caption import uses);
* ``split_holdout``: the seeded validation hold-out; ``epoch_order``: the permutation of epoch e;
* ``load_pixels``: the paper's preprocessing (shorter side to R, R×R crop, [-1, 1]); ``tokenize``: ids,
  mask and untruncated lengths exactly as the pipeline tokenises.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .constants import MAX_TOKENS
from .errors import ConfigError
from .seeds import derive_seed
from .workspace import Workspace

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .train_config import TrainConfig


@dataclass(frozen=True)
class Example:
    """One training image with the caption text the run uses for it."""

    key: str                # stable id within the run ("img-<id>" for the store, the file name for folders)
    path: Path
    text: str
    caption_version: str    # the store's caption event id, or "sha256:<text hash>" for exported folders
    pixel_hash: str
    label: str = ""


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_pixel_hash(path: Path) -> str:
    """The pixel hash of an image file, computed as imports compute it (so cache keys agree)."""
    from .data import load_image_file, pixel_hash

    img, _ = load_image_file(path)
    return pixel_hash(img)


def examples_from_folder(folder: Path) -> tuple[list[Example], list[Example]]:
    """An exported imagefolder (train/ + validation/ with metadata.jsonl) or Med-Art CSV folder."""
    from .interchange import read_metadata

    def read(split_dir: Path) -> list[Example]:
        out = []
        for row in read_metadata(split_dir):
            p = (split_dir / row.file_name).resolve()
            if split_dir.resolve() not in p.parents or not p.is_file():
                raise ConfigError(f"{split_dir}: metadata names {row.file_name!r}, which is not a file in that folder.")
            if not row.text.strip():
                continue
            sha = text_sha(row.text)
            cv = f"sha256:{sha}" if row.caption_version is None else f"{row.caption_version}:{sha[:12]}"
            out.append(Example(key=f"{split_dir.name}/{row.file_name}", path=p, text=row.text, caption_version=cv,
                               pixel_hash=file_pixel_hash(p)))
        return out

    if (folder / "train").is_dir():
        train, val = read(folder / "train"), read(folder / "validation")
    else:
        train, val = read(folder), []
    if not train:
        raise ConfigError(f"{folder} has no captioned images: expected an exported imagefolder (train/"
                          "metadata.jsonl) or a Med-Art CSV folder (metadata.csv with file_name,text).")
    return train, val


def with_caption_text(examples: list[Example], mode: str, class_caption: Any = None) -> list[Example]:
    """The examples with the text ``mode`` asks for: "caption" (unchanged), "class" (``class_caption(label)``,
    the class's seed caption) or "empty" (""). The caption version records the mode, so the run's captions
    digest tells the variants apart."""
    from dataclasses import replace

    if mode == "caption":
        return examples
    if mode == "class":
        unlabelled = [e.key for e in examples if not e.label]
        if unlabelled or class_caption is None:
            raise ConfigError(f"caption_text 'class' needs each image's class, which {unlabelled[:3] or 'this source'} "
                              "lacks: train from a workspace dataset (--captions approved or latest).")
        return [replace(e, text=class_caption(e.label), caption_version=f"{e.caption_version}:class") for e in examples]
    if mode == "empty":
        return [replace(e, text="", caption_version=f"{e.caption_version}:empty") for e in examples]
    raise ConfigError(f"caption_text must be caption, class or empty, got {mode!r}.")


def collect_examples(ws: Workspace, store: Any, cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(pool, explicit validation split) for ``cfg.captions``, with the text ``cfg.caption_text`` asks for;
    the validation split is empty unless the source is an exported imagefolder that has one."""
    mode = cfg.caption_text
    source = cfg.captions
    if source not in ("approved", "latest"):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--captions must be 'approved', 'latest' or an exported dataset folder; "
                              f"{source!r} is none of them.")
        pool, val = examples_from_folder(folder)
        return with_caption_text(pool, mode), with_caption_text(val, mode)
    states = store.states(cfg.dataset, status="approved") if source == "approved" else store.states(cfg.dataset)
    states = [s for s in states if s.text and s.text.strip()]
    if not states:
        if source == "approved":
            raise ConfigError(
                f"Dataset {cfg.dataset!r} has no approved captions. Approve captions in the Captions tab "
                "(or with the caption tools) first, or train on each image's current caption whatever its "
                "status with `--captions latest`.")
        raise ConfigError(f"Dataset {cfg.dataset!r} has no images with a caption; import images and draft "
                          "captions first (e.g. `python -m medart_core sample-data`).")
    records = {r.id: r for r in store.list_images(cfg.dataset)}
    out = []
    for s in states:
        rec = records[s.image_id]
        out.append(Example(key=f"img-{s.image_id}", path=ws.image_path(cfg.dataset, rec.file_name), text=s.text,
                           caption_version=str(s.caption_version), pixel_hash=rec.pixel_hash, label=rec.label))
    return with_caption_text(out, mode, lambda label: class_seed_caption(store, cfg.dataset, label)), []


def class_seed_caption(store: Any, dataset: str, label: str) -> str:
    """The class-only caption of ``label`` in ``dataset``: its seed caption (the dataset's own, else the
    modality template), the text a VSG draft starts from."""
    from .vsg import template_caption

    info = store.dataset_info(dataset)
    seeds = (info.meta or {}).get("seed_captions")
    return template_caption(label, info.modality, seeds if isinstance(seeds, dict) else None)


def split_holdout(pool: list[Example], explicit_val: list[Example], n_val: int, seed: int
                  ) -> tuple[list[Example], list[Example]]:
    """Hold ``n_val`` images out of training for the validation loss: the exported validation split when
    there is one, else a seeded pick from the pool (same pick for every run with this seed and data)."""
    import torch

    if n_val == 0:
        return pool, []
    if explicit_val:
        return pool, explicit_val[:n_val]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(derive_seed(seed, "holdout")))
    held = set(order[:n_val].tolist())
    return [e for i, e in enumerate(pool) if i not in held], [e for i, e in enumerate(pool) if i in held]


def load_pixels(path: Path, resolution: int, *, crop: str = "random",
                generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """The paper's preprocessing: shorter side to R (bicubic), an R×R crop, to [-1, 1]; [3, R, R] float32.

    ``crop="random"`` draws the offset from ``generator`` (seeded per sample by the caller, so the crop is
    reproducible); ``crop="center"`` is what the feature cache uses.
    """
    import numpy as np
    import torch
    from PIL import Image

    from .errors import InvalidImageError

    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidImageError(f"Cannot read training image {path} ({e}); re-import the dataset or remove "
                                "the image.") from None
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    if crop == "center":
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left = int(torch.randint(0, nw - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, nh - resolution + 1, (1,), generator=generator))
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation that depends only on (seed, epoch)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch))).tolist()


def tokenize(tokenizer: Any, texts: Sequence[str]) -> tuple["torch.Tensor", "torch.Tensor", list[int]]:
    """Token ids and mask padded/truncated to 120 tokens exactly as the PixArt pipeline makes them
    (lower-cased), plus each text's untruncated length (to count over-long captions)."""
    from .pixart import tokenize_prompts

    ids, mask = tokenize_prompts(tokenizer, list(texts), max_length=MAX_TOKENS)
    lengths = [len(tokenizer(t.lower().strip(), add_special_tokens=True, truncation=False)["input_ids"])
               for t in texts]
    return ids, mask, lengths


def captions_digest(examples: Iterable[Example]) -> str:
    """sha256 over (image key, caption version, text hash) of every caption used: two runs on the same
    reviewed captions share it; any edit or approval changes it."""
    h = hashlib.sha256()
    for e in sorted(examples, key=lambda e: e.key):
        h.update(f"{e.key}\t{e.caption_version}\t{text_sha(e.text)}\n".encode())
    return h.hexdigest()
