"""The HLDF training run: config, data, the loop, checkpoints with exact resume, validation, exports, CLI.

Read ``train()`` top to bottom: it is the whole run. Everything above it is a small helper it calls.

Determinism is by construction rather than by hope:

* the data order of epoch e is ``randperm`` from a generator seeded with (seed, e); the random crop of the
  sample at position i of epoch e is drawn from a generator seeded with (seed, e, i);
* the noise, timesteps and pixel-step sampling of optimiser step s on rank r come from a generator seeded
  with (seed, r, s);
* everything else that could draw from a global RNG (dropout in T5/LoRA) sees the python/numpy/torch
  states that the checkpoint saved and the resume restores, per rank.

So a run killed at any point and resumed from its last checkpoint replays the very same arithmetic and ends
with bitwise identical adapter weights (tests/test_resume.py kills a real subprocess with SIGKILL twice).

Nothing is pickled: adapters, optimizer tensors and RNG states are safetensors, everything else JSON.
torch/diffusers/accelerate are imported inside functions: the CLI imports this module at start-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .errors import ConfigError, NotFoundError, TrainingDivergedError
from .fileio import atomic_write_text, fsync_dir, fsync_file
from .workspace import Workspace, validate_name

if TYPE_CHECKING:  # pragma: no cover
    import torch

MAX_TOKENS = 120
CHECKPOINT_FORMAT = 1
RANDOM_LABEL = "random-weight demo backbone"
# Fixed DDPM timesteps of the deterministic validation loss: spread over the schedule so the number moves
# when either coarse structure (high t) or detail (low t) changes.
VALIDATION_TIMESTEPS = (50, 250, 500, 750, 950)


# =========================================================================================================
# Config
# =========================================================================================================
@dataclass
class TrainConfig:
    """One training run, as data. ``to_dict``/``from_dict`` round-trip through JSON exactly.

    ``lora`` holds ``LoRAConfig`` fields and ``hldf`` holds ``HLDFConfig`` fields (kept as plain dicts so a
    run's config.json is readable and diffable; they are validated by their own dataclasses).
    """

    backbone: str = "tiny"                 # "tiny" | "small" | Hub id | local diffusers folder
    resolution: int | None = None          # pixels; None = the backbone's own resolution
    dataset: str = "sample"
    captions: str = "approved"             # "approved" | "latest" | path to an exported imagefolder/CSV folder
    lora: dict[str, Any] = field(default_factory=dict)
    hldf: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-4                       # constant, as the paper
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    epochs: int = 15
    max_steps: int | None = None           # when set, wins over epochs
    seed: int = 42
    mixed_precision: str = "auto"          # "auto" (bf16 autocast on GPU, fp32 on CPU) | "bf16" | "no"
    optimizer: str = "adamw"               # "adamw" | "adamw8bit" (bitsandbytes, CUDA only; else falls back)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500
    validation_prompts: list[str] = field(default_factory=list)   # empty: captions of the held-out images
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])
    validation_steps: int = 20
    validation_guidance: float = 4.5
    val_images: int = 4                    # held out of training for the deterministic validation loss
    cache_features: bool = False           # T5 embeddings + VAE latents computed once (needs a frozen T5)
    cache_batch_size: int = 8
    trim_text_padding: bool = True         # T5 and the DiT skip the all-padding tail of the 120 text tokens
    export_merged: bool = True             # at the end: also a merged pipeline folder (a full model copy)

    # ---- JSON -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown training config keys {unknown}; valid keys are {sorted(known)}.")
        d = dict(data)
        if "betas" in d:
            d["betas"] = tuple(float(b) for b in d["betas"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        from .presets import load_preset

        d = load_preset(name)
        d.update(overrides)
        return cls.from_dict(d)

    def validate(self) -> None:
        """Raise ConfigError on the first inconsistent field (cheap checks; model-dependent ones run later)."""
        for name in ("batch_size", "grad_accum", "checkpoint_every", "validate_every", "keep_checkpoints",
                     "validation_steps", "cache_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_steps is None and int(self.epochs) < 1:
            raise ConfigError(f"epochs must be >= 1 (or set max_steps), got {self.epochs}.")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}.")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ConfigError(f"mixed_precision must be 'auto', 'bf16' or 'no' (fp16 overflows in the pixel "
                              f"loss), got {self.mixed_precision!r}.")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ConfigError(f"optimizer must be 'adamw' or 'adamw8bit', got {self.optimizer!r}.")
        if self.resolution is not None and (int(self.resolution) < 8 or int(self.resolution) % 8):
            raise ConfigError(f"resolution must be a multiple of 8 (VAE), got {self.resolution}.")
        if int(self.val_images) < 0:
            raise ConfigError(f"val_images must be >= 0, got {self.val_images}.")
        if not self.validation_seeds:
            raise ConfigError("validation_seeds must name at least one seed.")
        validate_name(self.dataset, "dataset name")

    def hldf_config(self):
        from .hldf import HLDFConfig

        return HLDFConfig.from_dict(self.hldf)

    def lora_config(self):
        from .lora import LoRAConfig

        known = {f.name for f in dataclasses.fields(LoRAConfig)}
        unknown = sorted(set(self.lora) - known)
        if unknown:
            raise ConfigError(f"Unknown LoRA config keys {unknown}; valid keys are {sorted(known)}.")
        return LoRAConfig(**self.lora)


# Fields a resumed run may change: they decide how long/how often, never what is computed at a step.
RESUME_MUTABLE = ("epochs", "max_steps", "checkpoint_every", "keep_checkpoints", "validate_every")


# =========================================================================================================
# Seeds
# =========================================================================================================
def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of parts: independent streams for (purpose, rank, step, ...)."""
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


# =========================================================================================================
# Data
# =========================================================================================================
@dataclass(frozen=True)
class Example:
    """One training image with the caption text the run uses for it."""

    key: str                # stable id within the run ("img-<id>" for the store, the file name for folders)
    path: Path
    text: str
    caption_version: str    # the store's caption event id, or "sha256:<text hash>" for exported folders
    pixel_hash: str
    label: str = ""


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_pixel_hash(path: Path) -> str:
    try:
        from .data import load_image_file, pixel_hash

        img, _ = load_image_file(path)
        return pixel_hash(img)
    except ImportError:  # data.py not present: hash the decoded RGB pixels ourselves
        from PIL import Image

        with Image.open(path) as im:
            rgb = im.convert("RGB")
            return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def _examples_from_folder(folder: Path) -> tuple[list[Example], list[Example]]:
    """An exported imagefolder (train/ + validation/ with metadata.jsonl) or Med-Art CSV folder."""
    import csv

    def read(split_dir: Path) -> list[Example]:
        rows: list[tuple[str, str, Any]] = []
        jl, cs = split_dir / "metadata.jsonl", split_dir / "metadata.csv"
        if jl.is_file():
            for n, line in enumerate(jl.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{jl}:{n} is not valid JSON ({e}).") from None
                    rows.append((str(r.get("file_name", "")), str(r.get("text", "")), r.get("caption_version")))
        elif cs.is_file():
            with cs.open(encoding="utf-8", newline="") as f:
                for r in csv.DictReader(f):
                    rows.append((str(r.get("file_name", "")), str(r.get("text", "")), r.get("caption_version")))
        else:
            return []
        out = []
        for name, text, version in rows:
            p = (split_dir / name).resolve()
            if split_dir.resolve() not in p.parents or not p.is_file():
                raise ConfigError(f"{split_dir}: metadata names {name!r}, which is not a file in that folder.")
            if not text.strip():
                continue
            cv = f"sha256:{_text_sha(text)}" if version in (None, "") else f"{version}:{_text_sha(text)[:12]}"
            out.append(Example(key=f"{split_dir.name}/{name}", path=p, text=text, caption_version=cv,
                               pixel_hash=_file_pixel_hash(p)))
        return out

    if (folder / "train").is_dir():
        train, val = read(folder / "train"), read(folder / "validation")
    else:
        train, val = read(folder), []
    if not train:
        raise ConfigError(f"{folder} has no captioned images: expected an exported imagefolder (train/"
                          "metadata.jsonl) or a Med-Art CSV folder (metadata.csv with file_name,text).")
    return train, val


def collect_examples(ws: Workspace, store: Any, cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(pool, explicit validation split) for ``cfg.captions``; the validation split is empty unless the
    source is an exported imagefolder that has one."""
    source = cfg.captions
    if source not in ("approved", "latest"):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--captions must be 'approved', 'latest' or an exported dataset folder; "
                              f"{source!r} is none of them.")
        return _examples_from_folder(folder)
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
    return out, []


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


# =========================================================================================================
# Metrics log (appended, fsynced per line)
# =========================================================================================================
class MetricsLog:
    """``runs/<run>/metrics.jsonl``: one JSON object per line, flushed and fsynced as it is written, so a
    crash loses at most the line being written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps the killed run did after its last checkpoint (they are redone)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    keep.append(line)
            except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
                continue  # a torn last line from the crash
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(ws: Workspace, run: str) -> list[dict[str, Any]]:
    """The metrics of a run (skipping a torn last line)."""
    p = ws.run_dir(run) / "metrics.jsonl"
    out = []
    if p.is_file():
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _write_status(run_dir: Path, **fields_: Any) -> None:
    p = run_dir / "status.json"
    cur: dict[str, Any] = {}
    if p.is_file():
        try:
            cur = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            cur = {}
    cur.update(fields_, updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    atomic_write_text(p, json.dumps(cur, indent=2, sort_keys=True))


# =========================================================================================================
# RNG state (python, numpy, torch CPU, CUDA) as tensors, so it can be gathered across ranks and saved
# as safetensors without pickle
# =========================================================================================================
def rng_snapshot() -> dict[str, "torch.Tensor"]:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    snap = {
        "python_state": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else gauss, 0.0 if gauss is None else 1.0],
                                     dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
        "numpy_misc": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state().clone(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["torch_cuda"] = torch.cuda.get_rng_state().clone()
    return snap


def rng_restore(snap: dict[str, "torch.Tensor"]) -> None:
    import numpy as np
    import torch

    has_gauss = bool(snap["python_gauss"][1].item())
    random.setstate((3, tuple(int(v) for v in snap["python_state"].tolist()),
                     float(snap["python_gauss"][0].item()) if has_gauss else None))
    pos, np_has_gauss = (int(v) for v in snap["numpy_misc"].tolist())
    np.random.set_state(("MT19937", snap["numpy_keys"].numpy().astype(np.uint32), pos, np_has_gauss,
                         float(snap["numpy_gauss"][0].item())))
    torch.set_rng_state(snap["torch_cpu"].to(torch.uint8).cpu())
    if "torch_cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state(snap["torch_cuda"].to(torch.uint8).cpu())


def _gather_rng(accelerator: Any) -> dict[str, "torch.Tensor"]:
    """Every rank's RNG snapshot stacked along a leading rank dimension (a collective: all ranks call it)."""
    import torch

    snap = rng_snapshot()
    if accelerator.num_processes == 1:
        return {k: v.unsqueeze(0) for k, v in snap.items()}
    out = {}
    for k in sorted(snap):
        t = snap[k].unsqueeze(0)
        # Collectives do not take uint8 everywhere: ship byte states as int64 and cast back.
        wire = t if t.dtype in (torch.int64, torch.float64) else t.to(torch.int64)
        out[k] = accelerator.gather(wire.to(accelerator.device)).cpu().to(t.dtype)
    return out


# =========================================================================================================
# Optimizer state as safetensors tensors + JSON scalars
# =========================================================================================================
def optimizer_to_tensors(opt: Any) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    import torch

    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        entry: dict[str, Any] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                name = f"state.{idx}.{k}"
                tensors[name] = v.detach().to("cpu").contiguous().clone()
                entry[k] = {"tensor": name}
            else:
                entry[k] = {"value": v}
        state_meta[str(idx)] = entry
    groups = json.loads(json.dumps(sd["param_groups"]))  # tuples -> lists; fails loudly on non-JSON values
    return tensors, {"state": state_meta, "param_groups": groups}


def optimizer_from_tensors(opt: Any, tensors: dict[str, "torch.Tensor"], meta: dict[str, Any]) -> None:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in entry.items()}
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


# =========================================================================================================
# Checkpoints: runs/<run>/checkpoints/step_XXXXXX/, written to a .tmp-<pid> folder then renamed
# =========================================================================================================
def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _is_complete(ck: Path) -> bool:
    """A checkpoint counts only when state.json is there and every file it lists has the listed size."""
    sj = ck / "state.json"
    if not sj.is_file():
        return False
    try:
        state = json.loads(sj.read_text(encoding="utf-8"))
        return all((ck / name).is_file() and (ck / name).stat().st_size == size
                   for name, size in state["files"].items())
    except (OSError, json.JSONDecodeError, KeyError, AttributeError):
        return False


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first; leftover ``.tmp-*`` folders of crashed writes are ignored."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and ".tmp" not in p.name and p.name[5:].isdigit():
            if _is_complete(p):
                found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named by the ``latest`` pointer, or (pointer missing/invalid) the newest complete one."""
    root = checkpoints_dir(run_dir)
    ptr = root / "latest"
    if ptr.is_file():
        name = ptr.read_text(encoding="utf-8").strip()
        cand = root / name
        if name.startswith("step_") and "/" not in name and _is_complete(cand):
            return cand
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def find_checkpoint(ws: Workspace, run: str, step: int | None = None) -> Path:
    run_dir = ws.run_dir(run)
    if not run_dir.is_dir():
        raise NotFoundError(f"No run {run!r} in {ws.runs_dir}; list runs with `ls {ws.runs_dir}`.")
    if step is None:
        ck = latest_checkpoint(run_dir)
        if ck is None:
            raise NotFoundError(f"Run {run!r} has no complete checkpoint yet; train longer than checkpoint_every "
                                "steps or start it again.")
        return ck
    ck = checkpoints_dir(run_dir) / _step_dir_name(step)
    if not _is_complete(ck):
        have = [int(p.name[5:]) for p in list_checkpoints(run_dir)]
        raise NotFoundError(f"Run {run!r} has no complete checkpoint at step {step}; available steps: {have}.")
    return ck


def write_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, "torch.Tensor"]],
                     state: dict[str, Any], *, keep: int) -> Path:
    """Write ``<name>.safetensors`` for each entry of ``tensors`` plus ``state.json`` (written last) into
    ``step_XXXXXX.tmp-<pid>``, fsync, rename into place, then move the ``latest`` pointer and prune to the
    newest ``keep``. A crash at any point leaves the previous checkpoint and pointer valid."""
    from safetensors.torch import save_file

    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _step_dir_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for name, tdict in tensors.items():
        p = tmp / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tdict.items()}, str(p), metadata={"format": "pt"})
        fsync_file(p)
        files[p.name] = p.stat().st_size
    state = dict(state, files=files, format=CHECKPOINT_FORMAT)
    with open(tmp / "state.json", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # a killed run wrote this step after its pointer's checkpoint: replace it whole
        old = root / f"{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(ck: Path) -> tuple[dict[str, Any], dict[str, dict[str, "torch.Tensor"]]]:
    """(state.json, {file stem: tensors}) of a complete checkpoint."""
    from safetensors.torch import load_file

    ck = Path(ck)
    if not _is_complete(ck):
        raise NotFoundError(f"{ck} is not a complete checkpoint (missing or truncated files).")
    state = json.loads((ck / "state.json").read_text(encoding="utf-8"))
    tensors = {Path(name).stem: load_file(str(ck / name)) for name in state["files"]}
    return state, tensors


def _clean_tmp_dirs(run_dir: Path) -> None:
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


# =========================================================================================================
# Adapters (LoRA weights) as flat safetensors: "dit::<peft key>", "t5::<peft key>"
# =========================================================================================================
def adapter_tensors(backbone: Any) -> dict[str, "torch.Tensor"]:
    from .lora import lora_state_dict

    return {f"{part}::{k}": v.contiguous() for part, sd in lora_state_dict(backbone).items() for k, v in sd.items()}


def load_adapter_tensors(backbone: Any, flat: dict[str, "torch.Tensor"]) -> None:
    from .lora import load_lora_state_dict

    nested: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        part, _, key = k.partition("::")
        nested.setdefault(part, {})[key] = v
    load_lora_state_dict(backbone, nested)


def t5_is_trainable(backbone: Any) -> bool:
    return any(p.requires_grad for p in backbone.text_encoder.parameters())


# =========================================================================================================
# Validation: an image grid at fixed prompts and seeds, and a deterministic latent loss
# =========================================================================================================
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without the sized default font
        return ImageFont.load_default()


def render_grid(rows: list[list[Any]], *, title: str, row_labels: list[str], is_random: bool) -> Any:
    """Rows of PIL tiles under a title; a random-weight backbone gets a red "random-weight demo backbone"."""
    from PIL import Image, ImageDraw

    tile = rows[0][0].size[0]
    cols = max(len(r) for r in rows)
    head_h = 32 if is_random else 18
    row_h = tile + 14
    grid = Image.new("RGB", (max(cols * tile, 300), head_h + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), title, fill=(0, 0, 0), font=_font(12))
    if is_random:
        draw.text((4, 16), RANDOM_LABEL, fill=(200, 0, 0), font=_font(12))
    for r, row in enumerate(rows):
        y = head_h + r * row_h
        draw.text((2, y), row_labels[r][:70], fill=(60, 60, 60), font=_font(10))
        for c, im in enumerate(row):
            grid.paste(im, (c * tile, y + 13))
    return grid


def _to_pil(images: "torch.Tensor") -> list[Any]:
    import torch
    from PIL import Image

    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def sample_validation_images(backbone: Any, embeds: "torch.Tensor", mask: "torch.Tensor", neg_embeds: "torch.Tensor",
                             neg_mask: "torch.Tensor", seeds: Sequence[int], *, steps: int, guidance: float,
                             autocast: Callable[[], Any], trim_padding: bool = True) -> list["torch.Tensor"]:
    """One [P, 3, R, R] image batch (in [-1, 1]) per seed: DPM-Solver++ from noise seeded by that seed."""
    import torch

    from .pixart import decode, sample_latents

    p = embeds.shape[0]
    out = []
    with torch.no_grad(), autocast():
        for seed in seeds:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            lat = sample_latents(backbone, embeds, mask, neg_embeds.expand(p, -1, -1), neg_mask.expand(p, -1),
                                 steps=steps, guidance=guidance, generator=gen, grad_mode="none",
                                 trim_padding=trim_padding)
            out.append(decode(backbone.vae, lat).float())
    return out


def validation_loss(backbone: Any, latents: "torch.Tensor", embeds: "torch.Tensor", mask: "torch.Tensor",
                    *, seed: int, autocast: Callable[[], Any], trim_padding: bool = True) -> float:
    """Mean ε-MSE of the held-out images at the fixed VALIDATION_TIMESTEPS with fixed noise: the same
    weights always give the same number, so curves compare across steps and runs."""
    import torch

    from .pixart import dit_eps, vae_scale_factor
    from .sampling import alphas_cumprod

    acp = alphas_cumprod(backbone.scheduler.config)
    tr = backbone.transformer
    gen = torch.Generator().manual_seed(derive_seed(seed, "validation-noise"))
    noise = torch.randn((len(VALIDATION_TIMESTEPS),) + tuple(latents.shape), generator=gen)
    total = 0.0
    with torch.no_grad(), autocast():
        for k, t_int in enumerate(VALIDATION_TIMESTEPS):
            t_int = min(t_int, acp.shape[0] - 1)
            a = float(acp[t_int])
            eps = noise[k].to(latents.device)
            noisy = math.sqrt(a) * latents.float() + math.sqrt(1 - a) * eps
            t = torch.full((latents.shape[0],), t_int, dtype=torch.int64, device=latents.device)
            out = dit_eps(tr, noisy.to(latents.dtype), t, embeds, mask,
                          latent_scale=vae_scale_factor(backbone.vae), trim_padding=trim_padding)
            total += float(torch.nn.functional.mse_loss(out.float(), eps.float()))
    return total / len(VALIDATION_TIMESTEPS)


# =========================================================================================================
# Callbacks and result
# =========================================================================================================
class TrainCallbacks:
    """Hooks the studio uses to follow and steer a run; subclass and override what you need. A plain object
    with any subset of these methods works too."""

    def on_step(self, metrics: dict[str, Any]) -> None: ...
    def on_validation(self, grid_path: Path) -> None: ...
    def on_checkpoint(self, path: Path) -> None: ...
    def should_stop(self) -> bool:
        return False


class _Hooks:
    def __init__(self, callbacks: Any):
        if callbacks is None:
            callbacks = []
        self.cbs = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]

    def _call(self, name: str, *args: Any) -> list[Any]:
        return [getattr(cb, name)(*args) for cb in self.cbs if callable(getattr(cb, name, None))]

    def on_step(self, m: dict[str, Any]) -> None:
        self._call("on_step", m)

    def on_validation(self, p: Path) -> None:
        self._call("on_validation", p)

    def on_checkpoint(self, p: Path) -> None:
        self._call("on_checkpoint", p)

    def should_stop(self) -> bool:
        return any(bool(r) for r in self._call("should_stop"))


@dataclass
class TrainResult:
    run: str
    run_dir: Path
    step: int                       # optimiser steps completed
    total_steps: int
    epoch: int
    status: str                     # "finished" | "stopped"
    last_checkpoint: Path | None
    metrics_path: Path
    validation_grids: list[Path] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)
    over_long_captions: int = 0
    cache: dict[str, Any] | None = None
    elapsed_s: float = 0.0
    train_images_per_s: float = 0.0  # images per second of the optimiser steps alone (no validation/checkpoints)
    backbone: Any = field(default=None, repr=False)   # the trained model (LoRA attached), e.g. to sample from


# =========================================================================================================
# Provenance
# =========================================================================================================
def _git_commit() -> str | None:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def captions_digest(examples: Iterable[Example]) -> str:
    """sha256 over (image key, caption version, text hash) of every caption used: two runs on the same
    reviewed captions share it; any edit or approval changes it."""
    h = hashlib.sha256()
    for e in sorted(examples, key=lambda e: e.key):
        h.update(f"{e.key}\t{e.caption_version}\t{_text_sha(e.text)}\n".encode())
    return h.hexdigest()


# =========================================================================================================
# The run
# =========================================================================================================
def _resolve_precision(cfg: TrainConfig, on_cuda: bool, log: Callable[[str], None]) -> str:
    if cfg.mixed_precision == "auto":
        return "bf16" if on_cuda else "no"
    if cfg.mixed_precision == "bf16" and not on_cuda:
        log("mixed_precision=bf16 asked on CPU: training in fp32 instead (CPU bf16 autocast is slow).")
        return "no"
    return cfg.mixed_precision


def _make_optimizer(cfg: TrainConfig, params: list[Any], on_cuda: bool, log: Callable[[str], None]) -> tuple[Any, str]:
    import torch

    if cfg.optimizer == "adamw8bit":
        if on_cuda:
            try:
                import bitsandbytes as bnb  # type: ignore[import-not-found]

                return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                           weight_decay=cfg.weight_decay), "adamw8bit"
            except ImportError:
                log("optimizer=adamw8bit: bitsandbytes is not installed; using torch AdamW (fp32 states).")
        else:
            log("optimizer=adamw8bit needs CUDA (bitsandbytes); using torch AdamW (fp32 states) on CPU.")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay), "adamw"


def _peak_mem_mb(on_cuda: bool) -> float:
    if on_cuda:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _load_run_config(run_dir: Path) -> TrainConfig:
    p = run_dir / "config.json"
    if not p.is_file():
        raise NotFoundError(f"{run_dir} has no config.json: it is not a training run that can be resumed.")
    return TrainConfig.from_json(p.read_text(encoding="utf-8"))


def _merge_for_resume(saved: TrainConfig, given: TrainConfig | None) -> TrainConfig:
    if given is None:
        return saved
    a, b = saved.to_dict(), given.to_dict()
    changed = sorted(k for k in a if a[k] != b[k] and k not in RESUME_MUTABLE)
    if changed:
        raise ConfigError(f"Cannot resume with a different {', '.join(changed)}: that would not continue the same "
                          f"run. Only {', '.join(RESUME_MUTABLE)} may change on resume; start a new run instead.")
    for k in RESUME_MUTABLE:
        a[k] = b[k]
    return TrainConfig.from_dict(a)


def train(cfg: TrainConfig | None, ws: Workspace, store: Any, *, run_name: str | None = None,
          resume: str | None = None, callbacks: Any = None, accelerator: Any = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Fine-tune LoRA adapters with HLDF; see the module docstring. ``resume=RUN`` continues run RUN from its
    latest checkpoint (``cfg`` may then be None, or differ only in RESUME_MUTABLE fields)."""
    return _train(cfg, ws, store, run_name=run_name, resume=resume, callbacks=callbacks,
                      accelerator=accelerator, log=log)


def _train(cfg: TrainConfig | None, ws: Workspace, store: Any, *, run_name: str | None,
           resume: str | None, callbacks: Any, accelerator: Any,
           log: Callable[[str], None] | None) -> TrainResult:
    import contextlib

    import numpy as np
    import torch
    from accelerate import Accelerator

    from . import hldf
    from .backbone import load_backbone
    from .cache import FeatureCache, cache_item
    from .lora import trainable_parameters

    hooks = _Hooks(callbacks)
    t_start = time.perf_counter()

    # ---- processes, device, logging ---------------------------------------------------------------------
    on_cuda = torch.cuda.is_available()
    accelerator = accelerator or Accelerator(cpu=not on_cuda)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    on_cuda = device.type == "cuda"
    say = log or (lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True))

    def log_main(msg: str) -> None:
        if main:
            say(msg)

    # ---- run folder and config --------------------------------------------------------------------------
    ck_path: Path | None = None
    if resume is not None:
        run_name = resume
        run_dir = ws.run_dir(resume)
        cfg = _merge_for_resume(_load_run_config(run_dir), cfg)
        ck_path = latest_checkpoint(run_dir)
        log_main(f"resuming run {resume} from {ck_path.name if ck_path else 'the start (no checkpoint yet)'}")
    else:
        if cfg is None:
            raise ConfigError("train() needs a TrainConfig (or resume=RUN to continue a run).")
        run_name = run_name or f"{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        run_dir = ws.run_dir(run_name)
        if (run_dir / "config.json").exists():
            raise ConfigError(f"Run {run_name!r} already exists; continue it with --resume {run_name} or choose "
                              "another --run name.")
    cfg.validate()
    from .pixart import encode_negative, encode_prompts

    trim = bool(cfg.trim_text_padding)
    hcfg = cfg.hldf_config()
    lcfg = cfg.lora_config()
    precision = _resolve_precision(cfg, on_cuda, say if main else (lambda m: None))
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    # ---- model: frozen backbone + LoRA --------------------------------------------------------------------
    backbone = load_backbone(cfg.backbone, torch_dtype=weight_dtype if precision == "bf16" else None)
    resolution = int(cfg.resolution or backbone.resolution)
    if resolution % backbone.vae_scale_factor:
        raise ConfigError(f"resolution {resolution} is not a multiple of the VAE factor {backbone.vae_scale_factor}.")
    backbone.resolution = resolution
    # Same seed on every rank so LoRA starts identical everywhere (rank 0's copy is also broadcast below).
    torch.manual_seed(cfg.seed)
    from .lora import attach_lora

    attach_lora(backbone, lcfg)
    train_t5 = t5_is_trainable(backbone)
    if cfg.cache_features and train_t5:
        raise ConfigError("cache_features needs a frozen T5 (its embeddings would change while training); set "
                          "lora.t5_enabled to false or cache_features to false.")
    for module in (backbone.text_encoder, backbone.vae, backbone.transformer):
        module.to(device)
    params = trainable_parameters(backbone)
    if world > 1:
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)
    # Per-rank global RNG streams (dropout); the checkpoint saves and restores them per rank.
    random.seed(derive_seed(cfg.seed, "python", rank))
    np.random.seed(derive_seed(cfg.seed, "numpy", rank) % 2**32)
    torch.manual_seed(derive_seed(cfg.seed, "torch", rank))

    # ---- data -------------------------------------------------------------------------------------------
    pool, explicit_val = collect_examples(ws, store, cfg)
    train_set, val_set = split_holdout(pool, explicit_val, int(cfg.val_images), cfg.seed)
    per_step = cfg.batch_size * cfg.grad_accum * world   # images per optimiser step, all ranks together
    steps_per_epoch = len(train_set) // per_step
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(train_set)} training images (after holding out {len(val_set)} for validation) "
                          f"are fewer than one step needs ({per_step} = batch_size x grad_accum x processes); "
                          "approve more captions, lower batch_size/grad_accum or val_images.")
    total_steps = int(cfg.max_steps) if cfg.max_steps else int(cfg.epochs) * steps_per_epoch
    ids, masks, lengths = tokenize(backbone.tokenizer, [e.text for e in train_set])
    over_long = [e.key for e, n in zip(train_set, lengths) if n > MAX_TOKENS]
    if over_long:
        log_main(f"{len(over_long)} of {len(train_set)} captions are longer than {MAX_TOKENS} T5 tokens and are "
                 f"truncated (e.g. {over_long[:3]}); shorten them in the Captions tab to train on all their words.")
    val_prompts = list(cfg.validation_prompts) or [e.text for e in val_set[:4]] or [train_set[0].text]

    # ---- feature cache, verified and completed before step 0 -----------------------------------------------
    cache = None
    cache_report: dict[str, Any] | None = None
    neg = encode_negative(backbone, 1, text=hcfg.negative_prompt, trim_padding=trim)
    neg = (neg[0].detach(), neg[1])
    if cfg.cache_features:
        cache = FeatureCache(ws, backbone_spec=cfg.backbone, resolution=resolution,
                             dtype="bf16" if precision == "bf16" else "fp32")
        items = [cache_item(e) for e in train_set + val_set]
        if main:
            cache_report = cache.ensure(backbone, items, batch_size=cfg.cache_batch_size, log=say).to_dict()
        accelerator.wait_for_everyone()
        if not main:
            cache_report = cache.ensure(backbone, items, build=False).to_dict()
        from .pixart import tokenize_prompts

        vp_ids, vp_mask = tokenize_prompts(backbone.tokenizer, val_prompts, max_length=MAX_TOKENS)
        with torch.no_grad():
            fixed_val_prompts = encode_prompts(backbone, vp_ids, vp_mask, trim_padding=trim)
        # T5 is not needed any more: give its memory back to the DiT.
        backbone.text_encoder.to("cpu")
        if on_cuda:
            torch.cuda.empty_cache()

    # ---- optimiser ---------------------------------------------------------------------------------------
    optimizer, opt_name = _make_optimizer(cfg, params, on_cuda, say if main else (lambda m: None))

    # ---- provenance -------------------------------------------------------------------------------------
    provenance = {
        "dataset": cfg.dataset, "captions_source": cfg.captions, "n_train_images": len(train_set),
        "n_validation_images": len(val_set), "validation_image_keys": [e.key for e in val_set],
        "captions_sha256": captions_digest(train_set + val_set), "backbone": cfg.backbone,
        "backbone_is_random": backbone.is_random, "resolution": resolution,
        "crop": "center (feature cache)" if cache else "random (seeded per sample)",
        "over_long_captions": {"count": len(over_long), "max_tokens": MAX_TOKENS, "keys": over_long[:100]},
        "optimizer": opt_name, "precision": precision, "world_size": world,
        "packages": _package_versions(), "git_commit": _git_commit(), "feature_cache": cache_report,
    }

    # ---- state: fresh or resumed -------------------------------------------------------------------------
    step, epoch, position = 0, 0, 0
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _clean_tmp_dirs(run_dir)
        if resume is None:
            atomic_write_text(run_dir / "config.json", cfg.to_json())
    if ck_path is not None:
        state, tensors = read_checkpoint(ck_path)
        load_adapter_tensors(backbone, tensors["adapters"])
        optimizer_from_tensors(optimizer, tensors["optimizer"], state["optimizer"])
        step, epoch, position = int(state["step"]), int(state["epoch"]), int(state["position"])
        if int(state.get("world_size", 1)) == world:
            rng_restore({k: v[rank] for k, v in tensors["rng"].items()})
        else:  # the data position is kept in images; RNG streams cannot be mapped to a new rank count
            position = (position * int(state["images_per_step"])) // per_step
            log_main(f"resuming with {world} processes instead of {state['world_size']}: data position kept, "
                     "but the run is no longer bitwise identical to an uninterrupted one.")
    if main:
        metrics.truncate_after(step)
        _write_status(run_dir, status="running", run=run_name, step=step, total_steps=total_steps, pid=os.getpid(),
                      error=None)
    accelerator.wait_for_everyone()
    log_main(f"run {run_name}: {len(train_set)} images, {steps_per_epoch} steps/epoch, steps {step}->{total_steps}, "
             f"{resolution}px, {opt_name}, precision {precision}, {world} process(es), device {device}, "
             f"pixel step every {hcfg.pixel_every} (M={hcfg.sample_steps}), "
             f"{'cached features' if cache else 'T5+VAE every step'}")

    # ---- helpers that need the run's state ------------------------------------------------------------------
    vae_scale = float(backbone.vae.config.scaling_factor)

    def make_batch(order_positions: list[int], order: list[int], pixel: bool, gen: "torch.Generator") -> dict:
        exs = [train_set[order[i]] for i in order_positions]
        if cache is not None:
            feats = [cache.load(cache_item(e)) for e in exs]
            mean = torch.stack([f["latent_mean"] for f in feats]).to(device, torch.float32)
            std = torch.stack([f["latent_std"] for f in feats]).to(device, torch.float32)
            # Same draw as hldf's own VAE path: a posterior sample, not the mean.
            eps = torch.randn(tuple(mean.shape), generator=gen, device=gen.device).to(device)
            p_emb = torch.stack([f["prompt_embeds"] for f in feats])
            p_mask = torch.stack([f["prompt_mask"] for f in feats])
            n_emb, n_mask = neg[0].cpu(), neg[1].cpu()
            if cfg.trim_text_padding:
                # Pad tokens are masked out of cross-attention (bias -1e4: exactly zero weight), so dropping
                # the all-pad tail computes the same thing with ~5x fewer text tokens for typical captions.
                keep = max(int(p_mask.sum(1).max()), int(n_mask.sum(1).max()))
                if not p_mask[:, keep:].any() and not n_mask[:, keep:].any():
                    p_emb, p_mask, n_emb, n_mask = p_emb[:, :keep], p_mask[:, :keep], n_emb[:, :keep], n_mask[:, :keep]
            batch = {"latents": ((mean + std * eps) * vae_scale).to(weight_dtype),
                     "prompt_embeds": p_emb.to(device, weight_dtype), "prompt_mask": p_mask.to(device),
                     "neg_embeds": n_emb.to(device, weight_dtype), "neg_mask": n_mask.to(device)}
            if pixel:
                batch["pixel_values"] = torch.stack([load_pixels(e.path, resolution, crop="center")
                                                     for e in exs]).to(device)
            return batch
        crops = [load_pixels(e.path, resolution, crop="random",
                             generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "crop", epoch, i)))
                 for e, i in zip(exs, order_positions)]
        rows = [order[i] for i in order_positions]
        batch = {"pixel_values": torch.stack(crops).to(device, weight_dtype),
                 "input_ids": ids[rows], "attention_mask": masks[rows]}
        if not train_t5:
            batch["neg_embeds"], batch["neg_mask"] = neg[0].to(device), neg[1].to(device)
        return batch

    val_latents = None
    if val_set:
        if cache is not None:
            feats = [cache.load(cache_item(e)) for e in val_set]
            val_latents = torch.stack([f["latent_mean"] for f in feats]).to(device, torch.float32) * vae_scale
            val_text = (torch.stack([f["prompt_embeds"] for f in feats]).to(device, weight_dtype),
                        torch.stack([f["prompt_mask"] for f in feats]).to(device))
        else:
            px = torch.stack([load_pixels(e.path, resolution, crop="center") for e in val_set]).to(device, weight_dtype)
            with torch.no_grad():
                val_latents = backbone.vae.encode(px).latent_dist.mean.float() * vae_scale
            val_ids, val_mask, _ = tokenize(backbone.tokenizer, [e.text for e in val_set])

    def run_validation() -> tuple[Path, float | None]:
        from .pixart import tokenize_prompts

        backbone.transformer.eval()
        backbone.text_encoder.eval()
        try:
            with torch.no_grad():
                if cache is not None:
                    p_emb, p_mask = fixed_val_prompts
                    n_emb, n_mask = neg
                    v_text = val_text if val_latents is not None else None
                else:
                    p_emb, p_mask = encode_prompts(backbone, *tokenize_prompts(
                        backbone.tokenizer, val_prompts, max_length=MAX_TOKENS), trim_padding=trim)
                    n_emb, n_mask = encode_negative(backbone, 1, text=hcfg.negative_prompt, trim_padding=trim)
                    v_text = encode_prompts(backbone, val_ids, val_mask, trim_padding=trim) if val_latents is not None else None
                dev = lambda t: t.to(device)  # noqa: E731
                images = sample_validation_images(
                    backbone, dev(p_emb).to(weight_dtype), dev(p_mask), dev(n_emb).to(weight_dtype), dev(n_mask),
                    cfg.validation_seeds, steps=cfg.validation_steps, guidance=cfg.validation_guidance,
                    autocast=autocast, trim_padding=trim)
                vloss = None
                if val_latents is not None:
                    vloss = validation_loss(backbone, val_latents.to(weight_dtype), dev(v_text[0]).to(weight_dtype),
                                            dev(v_text[1]), seed=cfg.seed, autocast=autocast, trim_padding=trim)
        finally:
            backbone.transformer.train()
            if train_t5:
                backbone.text_encoder.train()
        for s_i, batch_imgs in enumerate(images):
            if not torch.isfinite(batch_imgs).all():
                raise _diverged(step, f"the validation image for seed {cfg.validation_seeds[s_i]} has NaN/Inf pixels")
            flat = batch_imgs.flatten(1)
            if ((flat.max(dim=1).values - flat.min(dim=1).values) < 1e-6).any():
                raise _diverged(step, f"a validation image for seed {cfg.validation_seeds[s_i]} is one flat colour")
        if vloss is not None and not math.isfinite(vloss):
            raise _diverged(step, f"the validation loss is {vloss}")
        rows = [[_to_pil(batch_imgs[i:i + 1])[0] for batch_imgs in images] for i in range(len(val_prompts))]
        grid = render_grid(rows, title=f"{run_name} step {step} seeds {list(cfg.validation_seeds)}",
                           row_labels=val_prompts, is_random=backbone.is_random)
        path = run_dir / "validation" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        grid.save(tmp, format="PNG")
        os.replace(tmp, path)
        return path, vloss

    def _diverged(at_step: int, what: str) -> TrainingDivergedError:
        """``at_step``: 1-based number of the optimiser step that went wrong (as in metrics.jsonl)."""
        last = latest_checkpoint(run_dir)
        keep = (f"The last good checkpoint {last.name} is kept; resume from it" if last
                else "No checkpoint was written yet; restart")
        return TrainingDivergedError(
            f"Training diverged at step {at_step}: {what}. Likely causes: a learning rate too high "
            f"(lr={cfg.lr}; try 10x lower), fp16/bf16 overflow (try mixed_precision 'no'), a corrupt image or a bad "
            f"caption in the batch. {keep} after fixing the cause.")

    def save_checkpoint() -> Path | None:
        rng = _gather_rng(accelerator)   # collective: every rank takes part
        path = None
        if main:
            opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
            state = {"run": run_name, "step": step, "epoch": epoch, "position": position,
                     "steps_per_epoch": steps_per_epoch, "images_per_step": per_step, "total_steps": total_steps,
                     "samples_seen": step * per_step, "world_size": world,
                     "data_order": {"kind": "randperm", "seed": derive_seed(cfg.seed, "order", epoch),
                                    "epoch": epoch, "position": position},
                     "loss_generator": "per step: derive_seed(seed, 'step', rank, step)",
                     "optimizer": opt_meta, "config": cfg.to_dict(), "provenance": provenance,
                     "writer_rank": rank, "writer_pid": os.getpid(),
                     "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            path = write_checkpoint(run_dir, step, {"adapters": adapter_tensors(backbone), "optimizer": opt_tensors,
                                                    "rng": rng}, state, keep=cfg.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    # ---- the loop ----------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    backbone.transformer.train()
    if train_t5:
        backbone.text_encoder.train()
    bar = tqdm(total=total_steps, initial=step, desc=run_name, unit="step",
               disable=not (main and sys.stderr.isatty()))
    grids: list[Path] = []
    last_ck = ck_path
    stopped = False
    step_time = 0.0
    steps_timed = 0
    order = epoch_order(len(train_set), cfg.seed, epoch)
    try:
        while step < total_steps:
            if position >= steps_per_epoch:
                epoch, position = epoch + 1, 0
                order = epoch_order(len(train_set), cfg.seed, epoch)
            stop = torch.tensor([1.0 if (main and hooks.should_stop()) else 0.0], device=device)
            if world > 1:
                stop = accelerator.reduce(stop, reduction="sum")
            if float(stop) > 0:
                stopped = True
                break

            t0 = time.perf_counter()
            gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "step", rank, step))
            pixel = hldf.is_pixel_step(step, hcfg)
            logs: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                first = position * per_step + (micro * world + rank) * cfg.batch_size
                batch = make_batch(list(range(first, first + cfg.batch_size)), order, pixel, gen)
                with autocast():
                    loss, mlogs = hldf.hybrid_loss(step, backbone, batch, hcfg, generator=gen, trim_padding=trim)
                bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=device)
                if world > 1:
                    bad = accelerator.reduce(bad, reduction="sum")
                if float(bad) > 0:
                    raise _diverged(step + 1, f"the loss is {float(loss.detach())} (batch images "
                                          f"{[train_set[order[i]].key for i in range(first, first + cfg.batch_size)]})")
                (loss / cfg.grad_accum).backward()
                for k, v in mlogs.items():
                    logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
            if world > 1:  # data-parallel: average gradients over ranks (what DDP does, made explicit)
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
                offset = 0
                for p in params:
                    n = p.numel()
                    p.grad = flat[offset:offset + n].view_as(p).clone()
                    offset += n
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            if not math.isfinite(grad_norm):
                raise _diverged(step + 1, f"the gradient norm is {grad_norm}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, position = step + 1, position + 1
            dt = time.perf_counter() - t0
            step_time += dt
            steps_timed += 1

            record = {"step": step, "epoch": epoch, "loss": logs.get("loss"), "loss_latent": logs.get("loss_latent"),
                      "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                      "images_per_s": round(per_step / dt, 4), "peak_mem_mb": _peak_mem_mb(on_cuda),
                      "pixel_step": pixel}
            if "loss_color" in logs:
                record["loss_color"] = logs["loss_color"]
            if main:
                metrics.write(record)
                hooks.on_step(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")

            if step % cfg.validate_every == 0 or step == total_steps:
                if main:
                    grid, vloss = run_validation()
                    grids.append(grid)
                    metrics.write({"step": step, "epoch": epoch, "val_loss": vloss,
                                   "validation_grid": str(grid.relative_to(run_dir))})
                    hooks.on_validation(grid)
                accelerator.wait_for_everyone()
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                last_ck = save_checkpoint() or last_ck
                if main:
                    _write_status(run_dir, status="running", step=step)
                    hooks.on_checkpoint(last_ck)
        if stopped and (last_ck is None or int(last_ck.name[5:]) != step):
            last_ck = save_checkpoint() or last_ck
            if main:
                hooks.on_checkpoint(last_ck)
    except TrainingDivergedError as e:
        if main:
            _write_status(run_dir, status="diverged", step=step, error=str(e))
        raise
    except BaseException as e:
        if main:
            _write_status(run_dir, status="failed", step=step, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()

    # ---- exports ------------------------------------------------------------------------------------------
    exports: dict[str, str] = {}
    if main and not stopped and last_ck is not None:
        out = run_dir / "export"
        exports = export_from_backbone(backbone, out, cfg=cfg, provenance=provenance, step=step,
                                       merged=cfg.export_merged)
    status = "stopped" if stopped else "finished"
    if main:
        _write_status(run_dir, status=status, step=step, error=None)
    accelerator.wait_for_everyone()
    return TrainResult(run=run_name, run_dir=run_dir, step=step, total_steps=total_steps, epoch=epoch, status=status,
                       last_checkpoint=last_ck, metrics_path=metrics.path, validation_grids=grids, exports=exports,
                       over_long_captions=len(over_long), cache=cache_report,
                       elapsed_s=round(time.perf_counter() - t_start, 3),
                       train_images_per_s=round(steps_timed * per_step / step_time, 4) if step_time else 0.0,
                       backbone=backbone)


# =========================================================================================================
# Exports: PEFT adapter folders, a merged pipeline folder and a model card, from the live model or any
# checkpoint
# =========================================================================================================
def export_from_backbone(backbone: Any, out_dir: Path, *, cfg: TrainConfig, provenance: dict[str, Any], step: int,
                         merged: bool = True) -> dict[str, str]:
    """``out_dir/adapters`` (PEFT folders per model) and, with ``merged``, ``out_dir/merged`` (diffusers
    pipeline with LoRA merged), each with a README.md model card. Written next to the target and renamed."""
    from .lora import export_merged, model_card, save_adapters

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = model_card(base_model=cfg.backbone, lora=cfg.lora_config(), hldf=cfg.hldf_config(), dataset=cfg.dataset,
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
    from .lora import attach_lora

    ck = find_checkpoint(ws, run, step)
    state, tensors = read_checkpoint(ck)
    cfg = TrainConfig.from_dict(state["config"])
    backbone = load_backbone(cfg.backbone)
    backbone.resolution = int(cfg.resolution or backbone.resolution)
    attach_lora(backbone, cfg.lora_config())
    load_adapter_tensors(backbone, tensors["adapters"])
    prov = dict(state.get("provenance", {}), checkpoint=f"{run}/{ck.name}")
    return export_from_backbone(backbone, Path(out_dir), cfg=cfg, provenance=prov, step=int(state["step"]),
                                merged=merged)


# =========================================================================================================
# CLI: python -m medart_core train | export-model
# =========================================================================================================
def config_from_args(args: argparse.Namespace) -> TrainConfig | None:
    """Preset, then --config JSON (partial, overrides the preset), then the explicit flags."""
    from .presets import load_preset

    if args.resume and not args.config and args.preset is None:
        if args.max_steps is None:
            return None
    d: dict[str, Any] = {}
    if args.resume:
        from .workspace import Workspace as _W

        d = _load_run_config(_W.open(args.workspace).run_dir(args.resume)).to_dict()
    else:
        d = load_preset(args.preset or "cpu-smoke")
    if args.config:
        try:
            extra = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"Cannot read --config {args.config}: {e}") from None
        for k in ("lora", "hldf"):
            if isinstance(extra.get(k), dict):
                extra[k] = {**d.get(k, {}), **extra[k]}
        d.update(extra)
    if args.dataset and not args.resume:
        d["dataset"] = args.dataset
    if args.captions and not args.resume:
        d["captions"] = args.captions
    if args.max_steps is not None:
        d["max_steps"] = args.max_steps
    return TrainConfig.from_dict(d)


def main_train(argv: Sequence[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """Entry point of ``python -m medart_core train``; returns the exit status."""
    if args is None:
        p = argparse.ArgumentParser(prog="medart_core train")
        _train_arguments(p)
        args = p.parse_args(argv)
    from .captions import CaptionStore

    ws = Workspace.open(args.workspace)
    store = CaptionStore.for_workspace(ws)
    cfg = config_from_args(args)
    result = train(cfg, ws, store, run_name=args.run, resume=args.resume)
    print(json.dumps({"run": result.run, "status": result.status, "step": result.step,
                      "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
                      "exports": result.exports, "over_long_captions": result.over_long_captions,
                      "train_images_per_s": result.train_images_per_s, "elapsed_s": result.elapsed_s}))
    return 0


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", "-w", default=None, help="workspace folder (default: $MEDART_HOME or ./workspace)")
    p.add_argument("--dataset", default=None, help="dataset to train on (default: the preset's, 'sample')")
    p.add_argument("--preset", default=None, help="paper | small-gpu | cpu-smoke (default: cpu-smoke)")
    p.add_argument("--config", default=None, help="JSON file with TrainConfig fields; overrides the preset")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue run RUN from its latest checkpoint")
    p.add_argument("--run", default=None, metavar="NAME", help="name of a new run (default: dataset + UTC time)")
    p.add_argument("--captions", default=None,
                   help="approved (default) | latest (each image's current caption, any status) | an exported folder")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")


def _cmd_train(args: argparse.Namespace) -> int:
    return main_train(args=args)


def _cmd_export_model(args: argparse.Namespace) -> int:
    ws = Workspace.open(args.workspace)
    done = export_model(ws, args.run, args.out, step=args.step, merged=not args.adapters_only)
    print(json.dumps(done))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``train`` and ``export-model`` to the ``python -m medart_core`` parser (no heavy imports here)."""
    p = subparsers.add_parser("train", help="fine-tune LoRA adapters with HLDF (resumable)")
    _train_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("export-model", help="export a run's checkpoint: PEFT adapters + merged pipeline")
    p.add_argument("--workspace", "-w", default=None)
    p.add_argument("--run", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--adapters-only", action="store_true", help="skip the merged pipeline (a full model copy)")
    p.set_defaults(func=_cmd_export_model)
