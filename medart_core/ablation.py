"""The paper's ablation (Table 3) in miniature, on the embedded demo backbone, on two CPU cores.

``python -m medart_core ablation --preset mini`` (in the foreground, or ``--job`` to queue it as an
``ablation`` job) fine-tunes the demo backbone once per (row, seed) with the library's own trainer and
scores each result under one protocol. Finished cells are saved as they complete, so a stopped or crashed
ablation continues where it was (a half-trained cell resumes from its checkpoint).

**The fine-tuning set.** The demo backbone learnt the sample's 213 images, so a held-out subset of them has
the colour statistics it already draws and leaves the colour loss nothing to fix. The set is instead the
sample's colour-photograph classes (fundus photographs and IHC histology, 59 images) through a fixed
white-balance shift (:data:`SHIFT_GAIN`, :data:`SHIFT_OFFSET`: red down, blue up, as from another fundus
camera or stain batch). The backbone, prompted with these images' captions, draws the *unshifted* colours:
a measurable gap in channel means and spreads, which is what HLDF's colour-moment loss targets (the
paper's setting: PixArt-α's natural-image colours against endoscopy and dermoscopy).

**Captions.** No VLM runs offline, so the "VSG" rows use *measured-feature captions*, a stand-in written by
:func:`measured_caption`: the class's seed caption plus words computed from the image's pixels (brightness,
contrast, colour cast). The caption rows train on the class's seed caption only (``caption_text="class"``)
or on "" (``"empty"``); each row is evaluated with its own kind of prompt.

**Rows** (:data:`ROWS`): LoRA on DiT+T5 without HLDF; HLDF (Med-Art); HLDF without T5 LoRA; HLDF with DoRA;
HLDF with class-only captions; HLDF with empty captions; plus the demo backbone without fine-tuning as a
reference. Every row uses the same steps, data order, learning rate and seeds.

**Scores** per cell, through ``evaluate`` (the Compare tab's path), against the 59 real (shifted) images:
the cell's checkpoint (its run, or ``base``) draws ``eval_per_image`` twins per real image from the image's
prompt in the row's caption style, with ``evaluate``'s seed-matched seeds (the same for every cell), through
the shared demo-backbone generator; each extractor's result is saved under ``W/evaluations/`` with its metric
profile (also kept in the cell), so a cell's FD/KID compare with any evaluation of the same profile:

* ``color_gap``: the colour-moment loss of Med-Art between each generated image and its real image,
  ``Σ_c (μ_c(x̃) − μ_c(x))² + (σ_c(x̃) − σ_c(x))²`` in [-1, 1] units, averaged (on the saved 8-bit twins);
* ``fd_domain`` (with a bias-corrected bootstrap interval) and ``kid_domain`` (mean ± std over subsets) in
  the 64-d feature space of the domain classifier trained on the 213 unshifted sample images
  (``evaluate.domain_extractor``); the same with Inception / DINOv2 when their weights are present
  (``$MEDART_INCEPTION_WEIGHTS`` or the torch hub cache; ``$MEDART_DINOV2``, a Hub id or folder, or the
  Hugging Face cache of facebook/dinov2-large);
* ``train_s`` and ``eval_s``.

A row's figure is the mean over seeds with a 95 % t-interval over seeds (the twins' noise is the same for
every seed, so the interval is the training seeds' spread); the effects the paper claims are tested with
paired (same-seed) differences (:func:`effects`, decided by :mod:`medart_core.paired`: over seeds, or with one
seed over the cells' seed-matched images). The reference set is the fine-tuning set
itself (59 images is all there is): the scores measure fit to the target colours and features, not
generalisation to new images.
"""
from __future__ import annotations

import colorsys
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from .config import JsonConfig
from .errors import ConfigError, MedArtError, MissingWeightsError
from .fileio import atomic_write, atomic_write_text, sha256_bytes
from .workspace import Workspace

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from .evaluate import EvalSpec, RealReference

ABLATION_FORMAT = 2                      # 2: scored through evaluate (seed-matched twins, a profile per cell)
SOURCE_DATASET = "sample"
COLOUR_CLASSES = ("fundus_retina", "histology_ihc")
SHIFT_GAIN = (0.72, 1.08, 1.30)          # per RGB channel, applied to 0..255 values
SHIFT_OFFSET = (0.0, 6.0, 24.0)
SHIFT_NAME = f"white-balance shift: rgb * {list(SHIFT_GAIN)} + {list(SHIFT_OFFSET)}, clipped to 0..255"
DATASET = "ablation-shifted"
CAPTION_SOURCE = "measured"              # the drafts' source in the caption history


# =========================================================================================================
# The fine-tuning set
# =========================================================================================================
def colour_shift(img: "Image.Image") -> "Image.Image":
    """The fixed white-balance shift of the ablation's fine-tuning set (RGB in, RGB out)."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    out = arr * np.asarray(SHIFT_GAIN, dtype=np.float32) + np.asarray(SHIFT_OFFSET, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


_HUES = ((15, "red"), (45, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"), (260, "blue"),
         (300, "purple"), (345, "magenta"), (360, "red"))


def measured_caption(img: "Image.Image", seed_caption: str) -> str:
    """``seed_caption`` plus words measured from the pixels: brightness, contrast and colour cast, e.g.
    "A colour fundus photograph of the retina, mid-toned with moderate contrast and a magenta cast".
    A stand-in for the VLM's visual-symptom captions (deterministic; no weights needed)."""
    import numpy as np

    x = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    lum = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    m, s = float(lum.mean()), float(lum.std())
    bright = "dark" if m < 0.3 else "mid-toned" if m < 0.55 else "bright"
    contrast = "low" if s < 0.12 else "moderate" if s < 0.22 else "high"
    h, sat, _ = colorsys.rgb_to_hsv(*x.reshape(-1, 3).mean(axis=0))
    if sat < 0.12:
        cast = "a neutral grey tone"
    else:
        hue = next(name for limit, name in _HUES if h * 360.0 < limit)
        cast = f"{'an' if hue[0] in 'aeiou' else 'a'} {hue} cast"
    return f"{seed_caption.rstrip('. ')}, {bright} with {contrast} contrast and {cast}"


def prepare_dataset(ws: Workspace, store: Any, *, log: Callable[[str], None] = print) -> str:
    """The shifted fine-tuning set (built once from the sample dataset, which is built first if missing);
    returns its name. An existing dataset of that name made another way is refused, never overwritten."""
    from .data import build_sample_dataset, derive_dataset
    from .examples import class_seed_caption

    if not store.has_dataset(SOURCE_DATASET):
        log("building the sample dataset")
        build_sample_dataset(ws, store, SOURCE_DATASET)
    if store.has_dataset(DATASET):
        meta = store.dataset_info(DATASET).meta or {}
        if meta.get("transform") != SHIFT_NAME or meta.get("derived_from") != SOURCE_DATASET:
            raise ConfigError(f"Dataset {DATASET!r} exists but was not made by this ablation ({meta.get('transform')!r}); "
                              "rename or remove it, or run the ablation in another workspace.")
        return DATASET
    seeds = {c: class_seed_caption(store, SOURCE_DATASET, c) for c in COLOUR_CLASSES}
    rep = derive_dataset(ws, store, SOURCE_DATASET, DATASET, transform=colour_shift, transform_name=SHIFT_NAME,
                         classes=list(COLOUR_CLASSES), caption=lambda img, label: measured_caption(img, seeds[label]),
                         caption_source=CAPTION_SOURCE)
    log(f"fine-tuning set {DATASET!r}: {len(rep.imported)} colour-shifted images of {', '.join(COLOUR_CLASSES)}")
    return DATASET


# =========================================================================================================
# Rows and presets
# =========================================================================================================
@dataclass(frozen=True)
class AblationRow:
    name: str
    label: str
    paper: str                      # the paper's figure for this row (Kvasir FID, Table 3 / §4)
    lora: dict[str, Any]            # overrides on the preset's LoRA section
    hldf: bool                      # pixel-level steps on (every preset.pixel_every) or off
    caption_text: str               # TrainConfig.caption_text
    train: bool = True              # False: the backbone as it is (the reference row)


ROWS: tuple[AblationRow, ...] = (
    AblationRow("base", "demo backbone, no fine-tuning", "-", {}, False, "caption", train=False),
    AblationRow("lora", "LoRA DiT+T5, no HLDF", "72.86", {}, False, "caption"),
    AblationRow("hldf", "HLDF (Med-Art)", "51.99", {}, True, "caption"),
    AblationRow("hldf-no-t5", "HLDF, no T5 LoRA", "63.10", {"t5_enabled": False}, True, "caption"),
    AblationRow("hldf-dora", "HLDF with DoRA", "55.88", {"use_dora": True}, True, "caption"),
    AblationRow("hldf-class", "HLDF, class-only captions", "55.44", {}, True, "class"),
    AblationRow("hldf-empty", "HLDF, empty captions", "59.12", {}, True, "empty"),
)
ROW_NAMES = tuple(r.name for r in ROWS)


@dataclass(frozen=True)
class AblationPreset(JsonConfig):
    """How long each cell trains and how it is scored (the same for every row)."""

    CONFIG_NAME: ClassVar[str] = "ablation preset"

    name: str
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    rows: tuple[str, ...] = ROW_NAMES
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-4                # the paper's (constant)
    rank: int = 8
    pixel_every: int = 10           # the paper's N=500 is 1/240 of its 120k steps; 200 steps need a denser N
    sample_steps: int = 10          # M of the pixel-level generation (the paper's 20 would double its cost)
    guidance: float = 4.5
    eval_per_image: int = 2         # generated images per real image
    eval_steps: int = 20
    eval_guidance: float = 4.5
    extractor_epochs: int = 15
    kid_subsets: int = 50
    n_boot: int = 50
    extra_extractors: tuple[str, ...] = ("inception", "dinov2")

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "extra_extractors", tuple(self.extra_extractors))
        unknown = sorted(set(self.rows) - set(ROW_NAMES))
        if unknown:
            raise ConfigError(f"Unknown ablation rows {unknown}; choose from {list(ROW_NAMES)}.")
        for k in ("steps", "batch_size", "rank", "pixel_every", "sample_steps", "eval_per_image", "eval_steps",
                  "extractor_epochs", "kid_subsets"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"ablation {k} must be >= 1, got {getattr(self, k)}.")
        if not self.seeds:
            raise ConfigError("an ablation needs at least one seed.")

    def digest(self) -> str:
        d = self.to_dict()
        d.pop("name")
        return sha256_bytes(json.dumps([d, ABLATION_FORMAT], sort_keys=True).encode())[:10]


PRESETS: dict[str, AblationPreset] = {
    # Table 3 in miniature: 6 rows x 4 seeds (+ the reference) in ~25 min on 2 CPU cores (bench/RESULTS.md).
    "mini": AblationPreset("mini"),
    # The same code in about a minute: the test suite's version.
    "smoke": AblationPreset("smoke", seeds=(0,), steps=4, batch_size=2, pixel_every=2, sample_steps=2,
                            eval_per_image=1, eval_steps=4, extractor_epochs=1, kid_subsets=5, n_boot=5,
                            extra_extractors=()),
}


def get_preset(name: str, **overrides: Any) -> AblationPreset:
    if name not in PRESETS:
        raise ConfigError(f"Unknown ablation preset {name!r}; choose one of {sorted(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def train_config(preset: AblationPreset, row: AblationRow, seed: int, dataset: str) -> Any:
    """The TrainConfig of one cell: the demo backbone, the preset's schedule, the row's switches."""
    from .train_config import TrainConfig

    steps = int(preset.steps)
    return TrainConfig.from_dict({
        "backbone": "demo", "dataset": dataset, "captions": "latest", "caption_text": row.caption_text,
        "lora": {"rank": preset.rank, "alpha": float(preset.rank), "t5_enabled": True, "use_dora": False,
                 **row.lora},
        # Without HLDF the pixel step never comes: N beyond the last step.
        "hldf": {"pixel_every": preset.pixel_every if row.hldf else steps + 1, "sample_steps": preset.sample_steps,
                 "guidance": preset.guidance, "checkpointing": False},
        "lr": preset.lr, "batch_size": preset.batch_size, "max_steps": steps, "seed": int(seed),
        "checkpoint_every": steps, "keep_checkpoints": 1, "validate_every": steps, "validation_seeds": [0],
        "validation_steps": 4, "val_images": 0, "export_merged": False,
    })


# =========================================================================================================
# Scoring
# =========================================================================================================
# Every image of each colour class is scored (the classes have fewer than this).
ALL_IMAGES = 10_000
EVAL_SIZE = 64


def eval_spec(preset: AblationPreset, caption_text: str, extractor: str = "domain") -> "EvalSpec":
    """The evaluation protocol of every cell of a row with prompts of kind ``caption_text``: all real images,
    ``eval_per_image`` twins each, the same seeds for every cell (``evaluate``'s seed-matched twins), the
    domain classifier of the unshifted sample dataset."""
    from .evaluate import EvalSpec

    weights = (os.environ.get("MEDART_DINOV2") or None) if extractor == "dinov2" else None
    return EvalSpec(dataset=DATASET, per_class=ALL_IMAGES, captions="latest", caption_text=caption_text,
                    per_image=preset.eval_per_image, extractor=extractor, extractor_weights=weights,
                    extractor_dataset=SOURCE_DATASET, extractor_epochs=preset.extractor_epochs, size=EVAL_SIZE,
                    seed=0, steps=preset.eval_steps, guidance=preset.eval_guidance, kid_subsets=preset.kid_subsets,
                    n_boot=preset.n_boot, precision="fp32")


@dataclass
class Scoring:
    """What every cell is scored against, prepared once per ablation: per prompt kind and extractor the real
    reference of ``evaluate`` (eval set, extractor, cached real features), and the real pixels for the
    colour gap."""

    refs: dict[str, dict[str, "RealReference"]]   # caption_text -> extractor name -> reference
    pixels: "torch.Tensor"                         # float [N,3,S,S] in [-1, 1], in eval-set order
    absent: dict[str, str] = field(default_factory=dict)   # extractor name -> why it is not used

    @property
    def n_real(self) -> int:
        return int(self.pixels.shape[0])


def _short_reason(message: str) -> str:
    """The first sentence of a missing-weights message, for the table ("… are not at PATH.")."""
    return message.split(". ")[0].split(" (")[0].rstrip(".") + "."


def prepare_scoring(ws: Workspace, store: Any, preset: AblationPreset, rows: Sequence[AblationRow], *,
                    log: Callable[[str], None] = print) -> Scoring:
    """The domain extractor and any extra one whose weights are present (built once, shared by all prompt
    kinds), and the real references of the rows' prompt kinds."""
    from .evaluate import load_images, make_extractor, prepare_reference
    from .extractors import images_to_uint8

    extractors: dict[str, Any] = {}
    absent: dict[str, str] = {}
    for name in ("domain", *preset.extra_extractors):
        try:
            extractors[name] = make_extractor(ws, store, eval_spec(preset, "caption", name))
        except MedArtError as e:
            if name == "domain":
                raise
            absent[name] = _short_reason(str(e))
            log(f"{name}: not used ({absent[name]})")
    refs = {kind: {name: prepare_reference(ws, store, eval_spec(preset, kind, name), extractor=ex)
                   for name, ex in extractors.items()}
            for kind in dict.fromkeys(r.caption_text for r in rows)}
    items = next(iter(next(iter(refs.values())).values())).eval_set.items
    u8 = images_to_uint8(load_images([it.path for it in items]), EVAL_SIZE)
    return Scoring(refs=refs, pixels=u8.float() / 127.5 - 1.0, absent=absent)


def score_cell(ws: Workspace, scoring: Scoring, row: AblationRow, checkpoint: str, *,
               should_stop: Callable[[], bool] = lambda: False) -> tuple[dict[str, Any], "torch.Tensor", list[int]]:
    """One cell's checkpoint ("base" or its run) through ``evaluate``: its twins from the shared demo-backbone
    generator (PNG + sidecar, reused on a rerun), FD/KID per extractor under a recorded profile (the results
    are saved with the Compare tab's), and the colour gap on the same twins. Returns the cell's scores, the
    twins (float [-1, 1]) and the index of the real image of each."""
    import torch

    from .evaluate import checkpoint_sha256, evaluate_checkpoint, generator_source, load_images
    from .extractors import images_to_uint8
    from .generate import get_generator
    from .hldf import color_moment_loss

    gen = get_generator(ws, "demo", "fp32")
    sha = checkpoint_sha256(ws, checkpoint)
    out: dict[str, Any] = {"checkpoint": checkpoint, "n_real": scoring.n_real, "evaluations": {}, "profiles": {}}
    paths: list[str] = []
    owner: list[int] = []
    for name, ref in scoring.refs[row.caption_text].items():
        source = generator_source(ws, gen, ref.spec, should_stop=should_stop)
        res = evaluate_checkpoint(ws, ref, checkpoint, images_for=source, checkpoint_sha256=sha, backbone="demo",
                                  precision=gen.precision)
        o = res.metrics["overall"]
        out[f"fd_{name}"], out[f"fd_{name}_ci"] = o["fd"], o["fd_ci"]
        out[f"kid_{name}"], out[f"kid_{name}_std"], out[f"kid_{name}_subset"] = o["kid"], o["kid_std"], o["kid_subset_size"]
        out["evaluations"][name], out["profiles"][name] = res.id, res.profile
        paths, owner = res.images, [i for i, _, _ in ref.plan]
    fake = images_to_uint8(load_images([Path(p) for p in paths]), EVAL_SIZE).float() / 127.5 - 1.0
    out["n_generated"] = int(fake.shape[0])
    out["color_gap"] = float(color_moment_loss(fake, scoring.pixels[torch.as_tensor(owner)]))
    return out, fake, owner


# =========================================================================================================
# Running the cells
# =========================================================================================================
def ablation_dir(ws: Workspace, preset: AblationPreset) -> Path:
    return ablations_root(ws) / f"{preset.name}-{preset.digest()}"


def cell_name(row: str, seed: int) -> str:
    return f"{row}-s{seed}"


def run_name(preset: AblationPreset, row: str, seed: int) -> str:
    return f"ablation-{preset.name}-{preset.digest()}-{cell_name(row, seed)}"


class _StopCallbacks:
    def __init__(self, should_stop: Callable[[], bool]):
        self._stop = should_stop

    def should_stop(self) -> bool:
        return bool(self._stop())


def run_cell(ws: Workspace, store: Any, preset: AblationPreset, row: AblationRow, seed: int, scoring: Scoring, *,
             dataset: str, log: Callable[[str], None] = print,
             should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
    """Train (unless the reference row) and score one cell (:func:`score_cell`); None when stopped midway. A
    run of this cell left by an earlier attempt is resumed from its checkpoint, not retrained."""
    from .train import train

    t0 = time.perf_counter()
    info: dict[str, Any] = {"row": row.name, "seed": int(seed)}
    if row.train:
        name = run_name(preset, row.name, seed)
        cfg = train_config(preset, row, seed, dataset)
        resume = name if ws.run_layout(name).config.exists() else None
        res = train(None if resume else cfg, ws, store, run_name=None if resume else name, resume=resume,
                    callbacks=_StopCallbacks(should_stop), log=lambda m: None)
        if res.status != "finished":
            return None
        pixel_steps = sum(1 for line in Path(res.metrics_path).read_text(encoding="utf-8").splitlines()
                          if line.strip() and json.loads(line).get("pixel_step"))
        info.update(run=name, pixel_steps=pixel_steps, train_s=round(time.perf_counter() - t0, 2))
    else:
        info.update(run=None, pixel_steps=0, train_s=0.0)
    if should_stop():
        return None
    t1 = time.perf_counter()
    try:
        scores, fake, owner = score_cell(ws, scoring, row, info["run"] or "base", should_stop=should_stop)
    except InterruptedError:
        return None
    info.update(scores)
    info["eval_s"] = round(time.perf_counter() - t1, 2)
    info["sample_grid"] = _save_strip(ablation_dir(ws, preset) / "samples" / f"{cell_name(row.name, seed)}.png",
                                      fake, owner, scoring.pixels)
    log(f"{cell_name(row.name, seed)}: colour gap {info['color_gap']:.4f}, FD(domain) {info['fd_domain']:.2f}, "
        f"KID(domain) {info['kid_domain']:.4f}, {info['train_s']:.0f} s train + {info['eval_s']:.0f} s eval")
    return info


def _save_strip(path: Path, fake: "torch.Tensor", owner: list[int], real_pixels: "torch.Tensor", n: int = 8) -> str:
    """Real images (top) above the first generated image of each (bottom): the cell at a glance."""
    from PIL import Image

    from .pixart import to_pil

    firsts: dict[int, int] = {}
    for j, i in enumerate(owner):
        firsts.setdefault(i, j)
    picks = sorted(firsts.items())[:: max(1, len(firsts) // n)][:n]
    real = to_pil(real_pixels[[i for i, _ in picks]])
    gen = to_pil(fake[[j for _, j in picks]])
    s = real[0].width
    canvas = Image.new("RGB", (s * len(picks), 2 * s))
    for k, (a, b) in enumerate(zip(real, gen)):
        canvas.paste(a, (k * s, 0))
        canvas.paste(b, (k * s, s))
    atomic_write(path, lambda f: canvas.save(f, format="PNG"), binary=True)
    return str(path)


def start_ablation(ws: Workspace, store: Any, preset: AblationPreset, *, log: Callable[[str], None] = print
                   ) -> tuple[str, list[AblationRow], Scoring, list[tuple[AblationRow, int]]]:
    """What every cell needs, made once: the ablation folder and ``preset.json``, the fine-tuning set, the
    scoring (extractors and real features, cached on disk) and the cells in table order. Returns
    (dataset, rows, scoring, cells)."""
    out = ablation_dir(ws, preset)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "preset.json", preset.to_json())
    dataset = prepare_dataset(ws, store, log=log)
    rows = [r for r in ROWS if r.name in preset.rows]
    scoring = prepare_scoring(ws, store, preset, rows, log=log)
    return dataset, rows, scoring, [(r, s) for r in rows for s in preset.seeds]


# What differs between any two runs of one cell (wall times; the ids and profiles, with their creation times,
# of the evaluations it saved): kept beside the cell, in <ablation>/provenance/, so that the cell file itself
# is the same bytes whoever runs it with the same seeds (here or as a Slurm array task).
PROVENANCE_KEYS = ("train_s", "eval_s", "evaluations", "profiles")


def cell_path(ws: Workspace, preset: AblationPreset, row: str, seed: int) -> Path:
    """``<ablation>/cells/<row>-s<seed>.json``: one finished cell's figures (its presence means done)."""
    return ablation_dir(ws, preset) / "cells" / f"{cell_name(row, seed)}.json"


def provenance_path(ws: Workspace, preset: AblationPreset, row: str, seed: int) -> Path:
    """``<ablation>/provenance/<row>-s<seed>.json``: the cell's :data:`PROVENANCE_KEYS`."""
    return ablation_dir(ws, preset) / "provenance" / f"{cell_name(row, seed)}.json"


def read_cell(ws: Workspace, preset: AblationPreset, row: str, seed: int) -> dict[str, Any]:
    """A finished cell with its provenance (a cell of an older version holds both in one file)."""
    cell = json.loads(cell_path(ws, preset, row, seed).read_text(encoding="utf-8"))
    prov = provenance_path(ws, preset, row, seed)
    if prov.is_file():
        cell.update(json.loads(prov.read_text(encoding="utf-8")))
    return cell


def run_cell_to_file(ws: Workspace, store: Any, preset: AblationPreset, row: AblationRow, seed: int,
                     scoring: Scoring, *, dataset: str, log: Callable[[str], None] = print,
                     should_stop: Callable[[], bool] = lambda: False) -> Path | None:
    """:func:`run_cell` and its JSON written atomically to :func:`cell_path` (the one writer of cell files,
    on this machine or in a Slurm array task); None when stopped midway."""
    info = run_cell(ws, store, preset, row, seed, scoring, dataset=dataset, log=log, should_stop=should_stop)
    if info is None:
        return None
    out = ablation_dir(ws, preset)
    prov = {k: info.pop(k) for k in PROVENANCE_KEYS if k in info}
    info["sample_grid"] = Path(info["sample_grid"]).relative_to(out).as_posix()   # no workspace path
    prov_path = provenance_path(ws, preset, row.name, seed)
    prov_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(prov_path, json.dumps(prov, indent=1, sort_keys=True))   # first: a cell file means both
    path = cell_path(ws, preset, row.name, seed)
    atomic_write_text(path, json.dumps(info, indent=1, sort_keys=True))
    return path


def merge_table(ws: Workspace, preset: AblationPreset, rows: Sequence[AblationRow], *, absent: dict[str, str],
                threads: int, t0: float, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The table of the finished cells (``table.json``, ``table.md``): the same merge whoever ran the cells."""
    out = ablation_dir(ws, preset)
    results = [read_cell(ws, preset, r.name, s) for r in rows for s in preset.seeds]
    from functools import lru_cache

    from .evaluate import compare_paired

    @lru_cache(maxsize=None)   # one paired comparison per pair of results, whichever metrics read it
    def paired(worse: str, better: str) -> dict[str, Any]:
        # At least 200 replicates: a verdict's percentile interval needs them, whatever the FD CI used.
        return compare_paired(ws, worse, better, n_boot=max(200, preset.n_boot))

    table = make_table(preset, rows, results, absent=absent, threads=threads,
                       wall_s=round(time.perf_counter() - t0, 1), paired=paired)
    atomic_write_text(out / "table.json", json.dumps(table, indent=1, sort_keys=True))
    atomic_write_text(out / "table.md", format_table(table))
    log(f"table: {out / 'table.md'}")
    return table


def run_ablation(ws: Workspace, store: Any, preset: AblationPreset, *, log: Callable[[str], None] = print,
                 progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
    """Every (row, seed) cell of ``preset`` not already done, then the table (``table.json``, ``table.md``
    in :func:`ablation_dir`). Returns the table, or None when stopped (finished cells are kept). On a Slurm
    executor the ablation job runs the cells as a job array instead (:func:`medart_core.fanout.run_ablation_array`),
    through the same :func:`run_cell_to_file` and :func:`merge_table`."""
    import torch

    t0 = time.perf_counter()
    dataset, rows, scoring, cells = start_ablation(ws, store, preset, log=log)
    threads = torch.get_num_threads()
    log(f"ablation {ablation_dir(ws, preset).name}: {len(rows)} rows x {len(preset.seeds)} seeds, {preset.steps} "
        f"steps each, {scoring.n_real} real images, {threads} threads")
    for k, (row, seed) in enumerate(cells):
        if progress is not None:
            progress(k, len(cells))
        if cell_path(ws, preset, row.name, seed).is_file():
            continue
        if should_stop():
            return None
        if run_cell_to_file(ws, store, preset, row, seed, scoring, dataset=dataset, log=log,
                            should_stop=should_stop) is None:
            return None
    if progress is not None:
        progress(len(cells), len(cells))
    return merge_table(ws, preset, rows, absent=scoring.absent, threads=threads, t0=t0, log=log)


# =========================================================================================================
# The table and the paper's effects
# =========================================================================================================
# Two-sided 95 % Student t quantiles by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean with a 95 % t-interval over the values (seeds); no interval from a single value."""
    v = [float(x) for x in values]
    m = statistics.fmean(v)
    if len(v) < 2:
        return {"mean": m, "ci": None, "n": len(v)}
    half = _T95.get(len(v) - 1, 1.96) * statistics.stdev(v) / math.sqrt(len(v))
    return {"mean": m, "ci": [m - half, m + half], "n": len(v)}


METRICS = ("color_gap", "fd_domain", "kid_domain")
# (effect, better row, worse row): the paper's claims, each as "the first row scores lower than the second".
EFFECTS = (
    ("HLDF beats plain LoRA", "hldf", "lora"),
    ("T5 LoRA helps", "hldf", "hldf-no-t5"),
    ("LoRA beats DoRA", "hldf", "hldf-dora"),
    ("VSG-style captions beat class-only", "hldf", "hldf-class"),
    ("class-only captions beat empty", "hldf-class", "hldf-empty"),
)


# A paired comparison of two saved evaluation results (worse, better) -> ``evaluate.compare_paired``'s figures.
PairedCompare = Callable[[str, str], dict[str, Any]]


def _paired_key(metric: str) -> tuple[str, str] | None:
    """(extractor whose result holds it, key in ``compare_paired``'s output) of a table metric."""
    if metric == "color_gap":
        return "domain", "color_gap"
    kind, _, extractor = metric.partition("_")
    return (extractor, kind) if kind in ("fd", "kid") and extractor else None


def _image_paired(worse: dict[str, Any], better: dict[str, Any], metric: str,
                  paired: PairedCompare | None) -> dict[str, Any] | None:
    """The per-image paired comparison (worse − better) of one seed's two cells, when both recorded a result
    of one profile for the metric's extractor; None otherwise (older cells, another profile)."""
    from .errors import MedArtError

    key = _paired_key(metric)
    if paired is None or key is None:
        return None
    ids = [(c.get("evaluations") or {}).get(key[0]) for c in (worse, better)]
    profiles = [(c.get("profiles") or {}).get(key[0]) for c in (worse, better)]
    if not all(ids) or not all(profiles):
        return None
    try:
        return paired(str(ids[0]), str(ids[1]))[key[1]]
    except MedArtError:   # measured differently or no per-image features kept: fall back to the seeds
        return None


def effects(by_cell: dict[tuple[str, int], dict[str, Any]], seeds: Sequence[int], metrics: Sequence[str],
            *, paired: PairedCompare | None = None) -> list[dict[str, Any]]:
    """Each claim of :data:`EFFECTS` per metric: the paired (same-seed) difference worse − better. Whether it
    is significant is decided by the paired code of :mod:`medart_core.paired`: with two or more seeds the
    seeds' paired t-interval (``paired_mean_test``); with one seed, where ``paired`` is given and both cells
    share a profile, the per-image paired comparison of their seed-matched images (``compare_paired``: a
    paired bootstrap for FD/KID, a paired t-interval for the colour gap). "reproduced" when the interval lies
    above 0, "same direction, not significant" when only the mean does, "not reproduced" otherwise."""
    from .paired import paired_mean_test

    out = []
    for label, better, worse in EFFECTS:
        for m in metrics:
            pairs = [(by_cell[(worse, s)], by_cell[(better, s)]) for s in seeds
                     if (worse, s) in by_cell and (better, s) in by_cell and m in by_cell[(worse, s)]]
            if not pairs:
                continue
            d = mean_ci([w[m] - b[m] for w, b in pairs])
            test = paired_mean_test([w[m] for w, _ in pairs], [b[m] for _, b in pairs])
            ci, basis = test["ci"], "seeds"
            if ci is not None:
                d = {**d, "ci": ci}   # the interval shown is the one that decides (scipy's exact t quantile)
            if ci is None:
                img = _image_paired(*pairs[0], m, paired)
                if img is not None and img.get("ci") is not None:
                    ci, basis = list(img["ci"]), "images"
                    d = {**d, "ci": ci}
            if ci is not None and ci[0] > 0:
                verdict = "reproduced"
            elif d["mean"] > 0:
                verdict = "same direction, not significant"
            else:
                verdict = "not reproduced"
            out.append({"effect": label, "metric": m, "better": better, "worse": worse, "diff": d, "verdict": verdict,
                        "paired_over": basis})
    return out


def make_table(preset: AblationPreset, rows: Sequence[AblationRow], results: Sequence[dict[str, Any]], *,
               absent: dict[str, str], threads: int, wall_s: float,
               paired: PairedCompare | None = None) -> dict[str, Any]:
    metrics = [m for m in results[0] if (m.startswith("fd_") and not m.endswith("_ci")) or
               (m.startswith("kid_") and not m.endswith(("_std", "_subset"))) or m == "color_gap"]
    by_cell = {(r["row"], r["seed"]): r for r in results}
    table_rows = []
    for row in rows:
        cells = [by_cell[(row.name, s)] for s in preset.seeds]
        table_rows.append({
            "row": row.name, "label": row.label, "paper_kvasir_fid": row.paper,
            "pixel_steps": cells[0]["pixel_steps"],
            **{m: mean_ci([c[m] for c in cells]) for m in metrics},
            "train_s_per_seed": round(statistics.fmean(c["train_s"] for c in cells), 1),
            "eval_s_per_seed": round(statistics.fmean(c["eval_s"] for c in cells), 1),
            "row_s": round(sum(c["train_s"] + c["eval_s"] for c in cells), 1),
        })
    return {"format": ABLATION_FORMAT, "preset": preset.to_dict(), "digest": preset.digest(),
            "dataset": {"name": DATASET, "classes": list(COLOUR_CLASSES), "transform": SHIFT_NAME,
                        "n_real": results[0]["n_real"], "n_generated_per_cell": results[0]["n_generated"]},
            "metrics": metrics, "rows": table_rows, "effects": effects(by_cell, preset.seeds, metrics, paired=paired),
            "extractors_absent": absent, "threads": threads, "wall_s": wall_s, "cells": list(results)}


def _num(x: float, spec: str) -> str:
    return f"{x:.0f}" if spec == ".4g" and abs(x) >= 1000 else format(x, spec)


def _fmt(v: dict[str, Any], spec: str) -> str:
    s = _num(v["mean"], spec)
    if v.get("ci"):
        s += f" [{_num(v['ci'][0], spec)}, {_num(v['ci'][1], spec)}]"
    return s


def format_table(table: dict[str, Any]) -> str:
    p = table["preset"]
    # The colour gap in [-1, 1] units; FD and KID in the extractor's own units (the domain classifier's
    # unnormalised features make them large numbers), to 4 significant digits.
    spec = {"color_gap": ".4f"}
    head = ["row", "paper FID", "pixel steps"] + [m.replace("_", " ") for m in table["metrics"]] + ["s/seed"]
    lines = [f"Ablation `{p['name']}` ({table['digest']}): {len(p['seeds'])} seeds, {p['steps']} steps of batch "
             f"{p['batch_size']}, lr {p['lr']}, rank {p['rank']}; HLDF every {p['pixel_every']} steps with M="
             f"{p['sample_steps']}; {table['dataset']['n_generated_per_cell']} generated vs "
             f"{table['dataset']['n_real']} real images per cell; mean [95 % t-interval over seeds]; "
             f"{table['wall_s']:.0f} s on {table['threads']} threads.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        cells = [r["label"], r["paper_kvasir_fid"], str(r["pixel_steps"])]
        cells += [_fmt(r[m], spec.get(m, ".4g")) for m in table["metrics"]]
        cells.append(f"{r['train_s_per_seed'] + r['eval_s_per_seed']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| paper's claim | metric | worse − better (paired) | verdict |", "|---|---|---|---|"]
    for e in table["effects"]:
        lines.append(f"| {e['effect']} | {e['metric'].replace('_', ' ')} | {_fmt(e['diff'], spec.get(e['metric'], '.4g'))} "
                     f"| {e['verdict']} |")
    if table["extractors_absent"]:
        lines += ["", "Not measured: " + "; ".join(f"{k} ({_short_reason(v)})"
                                                 for k, v in sorted(table["extractors_absent"].items()))]
    return "\n".join(lines) + "\n"


# =========================================================================================================
# Saved ablations, as the studio lists and shows them
# =========================================================================================================
def ablations_root(ws: Workspace) -> Path:
    return ws.root / "ablations"


def list_ablations(ws: Workspace) -> list[dict[str, Any]]:
    """Every ablation folder of the workspace, newest first: name, preset, cells done of all, table or not."""
    out = []
    for f in ablations_root(ws).glob("*/preset.json"):
        try:
            preset = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        n_cells = len(preset.get("rows") or ()) * len(preset.get("seeds") or ())
        out.append({"name": f.parent.name, "preset": preset, "cells_done": len(list((f.parent / "cells").glob("*.json"))),
                    "cells": n_cells, "finished": (f.parent / "table.json").is_file(),
                    "mtime": f.parent.stat().st_mtime})
    return sorted(out, key=lambda d: -d["mtime"])


def load_ablation(ws: Workspace, name: str) -> dict[str, Any]:
    """One saved ablation: its table (JSON and markdown) when finished, and its cells' sample strips
    (path, "row-sS") in row order. Only names :func:`list_ablations` gives are accepted."""
    from .errors import NotFoundError

    known = {d["name"]: d for d in list_ablations(ws)}
    if name not in known:
        raise NotFoundError(f"No ablation {name!r} in this workspace; run one with `python -m medart_core ablation`.")
    folder = ablations_root(ws) / name
    info = known[name]
    order = {r: i for i, r in enumerate(ROW_NAMES)}
    strips = sorted(folder.glob("samples/*.png"),
                    key=lambda p: (order.get(p.stem.rsplit("-s", 1)[0], 99), p.stem))
    table = json.loads((folder / "table.json").read_text(encoding="utf-8")) if info["finished"] else None
    return {**info, "table": table, "table_md": format_table(table) if table else None,
            "strips": [(str(p), p.stem) for p in strips]}


def overview_image(strips: Sequence[tuple[str, str]], *, label_width: int = 180) -> "Image.Image | None":
    """One picture of an ablation: the real images once on top, then the generated row of each cell's strip
    (from :func:`load_ablation`), first seed of each row only, each labelled with its row."""
    from PIL import Image, ImageDraw

    firsts: dict[str, str] = {}
    for path, stem in strips:
        firsts.setdefault(stem.rsplit("-s", 1)[0], path)
    if not firsts:
        return None
    ims = [Image.open(p).convert("RGB") for p in firsts.values()]
    w, h = ims[0].size
    half = h // 2
    canvas = Image.new("RGB", (label_width + w, half * (len(ims) + 1)), "white")
    draw = ImageDraw.Draw(canvas)
    canvas.paste(ims[0].crop((0, 0, w, half)), (label_width, 0))
    draw.text((6, half // 2 - 6), "real (shifted)", fill="black")
    labels = {r.name: r.label for r in ROWS}
    for k, (row, im) in enumerate(zip(firsts, ims), start=1):
        canvas.paste(im.crop((0, half, w, 2 * half)), (label_width, k * half))
        draw.text((6, k * half + half // 2 - 6), labels.get(row, row)[:29], fill="black")
    return canvas


# =========================================================================================================
# As a job (the `ablation` command is in medart_core/commands/ablation.py)
# =========================================================================================================
def preset_from_config(config: dict[str, Any]) -> AblationPreset:
    unknown = sorted(set(config) - {"preset", "overrides"})
    if unknown:
        raise ConfigError(f"Unknown ablation job keys {unknown}; use 'preset' and 'overrides'.")
    try:
        return get_preset(str(config.get("preset") or "mini"), **dict(config.get("overrides") or {}))
    except TypeError as e:
        raise ConfigError(f"Invalid ablation overrides: {e}") from None


def prepare_ablation_job(ws: Workspace, config: dict[str, Any]) -> tuple[dict[str, Any], None]:
    """Validate an ``ablation`` job's config at submit time: {"preset": name, "overrides": {field: value}}."""
    preset_from_config(config)
    return {"preset": config.get("preset") or "mini", "overrides": dict(config.get("overrides") or {})}, None


def run_ablation_job(ctx: Any) -> dict[str, Any]:
    """The ``ablation`` job kind; a resumed job skips the cells already done. On a Slurm executor the job
    runs :func:`medart_core.fanout.run_ablation_job_array` instead (one array task per cell)."""
    from .captions import CaptionStore

    preset = preset_from_config(ctx.config)
    store = CaptionStore.for_workspace(ctx.ws)
    try:
        table = run_ablation(ctx.ws, store, preset, log=ctx.log, should_stop=ctx.should_stop,
                             progress=lambda d, t: ctx.progress(step=d, total=t))
    finally:
        store.close()
    if table is None:
        return {"status": "stopped"}
    return {"status": "finished", "table": str(ablation_dir(ctx.ws, preset) / "table.md")}


__all__ = ["AblationPreset", "AblationRow", "PRESETS", "ROWS", "colour_shift", "measured_caption",
           "prepare_dataset", "eval_spec", "prepare_scoring", "score_cell", "run_ablation", "run_cell",
           "start_ablation", "cell_path", "provenance_path", "read_cell", "PROVENANCE_KEYS", "run_cell_to_file", "merge_table", "preset_from_config",
           "make_table", "format_table", "effects", "mean_ci",
           "ablation_dir", "run_ablation_job", "prepare_ablation_job", "list_ablations", "load_ablation", "overview_image"]
