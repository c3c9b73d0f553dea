"""The training run as data: ``TrainConfig`` with typed nested ``LoRAConfig``, ``HLDFConfig`` and ``EMAConfig``, presets,
the resume rule, and command-line flags generated from the dataclass fields.

Every field can be set from the command line without a JSON file: ``--lr 5e-5``, ``--max-steps 20``,
``--lora.rank 4``, ``--hldf.pixel-every 50``, ``--ema.decay 0.999`` (``_`` and ``-`` are both accepted; a boolean
flag alone, e.g. ``--ema.posthoc``, means true). Precedence: preset, then
``--config FILE`` (partial JSON), then flags; nested sections merge field by field.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from .errors import ConfigError
from .hldf import HLDFConfig
from .lora import LoRAConfig
from .precision import Precision, from_mixed_precision, validate_precision
from .workspace import validate_name


# What text each training image is paired with (the paper's caption ablation: VSG captions, class-only
# "simple" captions, no captions).
CAPTION_TEXTS = ("caption", "class", "empty")


@dataclass
class EMAConfig:
    """EMA of the trainable adapter weights (issue 19 §1; ``medart_core/ema.py``). Off by default.

    ``decay`` > 0 keeps a classic EMA (diffusers' warm-up with ``warmup``), stored in every checkpoint as
    ``ema.safetensors`` and named by ``RUN@STEP:ema``. ``posthoc`` tracks EDM2's power-function profiles
    ``sigma_rels`` and snapshots them into ``runs/RUN/ema/`` every ``snapshot_every`` steps (0: only at
    checkpoints; a snapshot is also written at every checkpoint) for ``python -m medart_core ema reconstruct``.
    ``validate_with`` chooses the weights of the validation grid and loss during training.
    """

    decay: float = 0.0                     # 0 = off; 0.999-0.9999 is usual
    warmup: bool = True                    # decay_t = min(decay, (1 + t) / (10 + t))
    posthoc: bool = False
    sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    snapshot_every: int = 0
    validate_with: Literal["raw", "ema"] = "raw"

    @property
    def enabled(self) -> bool:
        return float(self.decay) > 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EMAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown ema config keys {unknown}; valid keys are {sorted(known)}.")
        return cls(**data)

    def validate(self) -> None:
        from .ema import sigma_rel_to_gamma

        if not 0.0 <= float(self.decay) < 1.0:
            raise ConfigError(f"ema.decay must be in [0, 1) (0 = off), got {self.decay}; 0.999-0.9999 is usual.")
        if int(self.snapshot_every) < 0:
            raise ConfigError(f"ema.snapshot_every must be >= 0 (0 = at checkpoints), got {self.snapshot_every}.")
        if self.posthoc:
            if not self.sigma_rels or len(set(map(float, self.sigma_rels))) != len(self.sigma_rels):
                raise ConfigError(f"ema.sigma_rels must be distinct numbers, got {self.sigma_rels}.")
            for s in self.sigma_rels:
                sigma_rel_to_gamma(float(s))
        if self.validate_with not in ("raw", "ema"):
            raise ConfigError(f"ema.validate_with must be 'raw' or 'ema', got {self.validate_with!r}.")
        if self.validate_with == "ema" and not self.enabled:
            raise ConfigError("ema.validate_with 'ema' needs an EMA: set --ema.decay (e.g. 0.999).")


@dataclass
class TrainConfig:
    """One training run, as data. ``to_dict``/``from_dict`` round-trip through JSON exactly."""

    backbone: str = "tiny"                 # "tiny" | "small" | Hub id | local diffusers folder
    resolution: int | None = None          # pixels; None = the backbone's own resolution
    dataset: str = "sample"
    captions: str = "approved"             # "approved" | "latest" | path to an exported imagefolder/CSV folder
    caption_text: str = "caption"          # what each image trains with: "caption" (its own), "class" (its class's
                                           # seed caption: the paper's "simple" captions) or "empty" ("")
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    hldf: HLDFConfig = field(default_factory=HLDFConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    snr_gamma: float | None = None         # min-SNR-γ weighting of the latent loss (Hang et al. 2023); None = off
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
    precision: Precision | None = None     # "fp32" | "bf16" | "auto" (bf16 where the device runs it fast: CUDA
                                           # with bf16, CPUs with AVX512-BF16/AMX-BF16) | None (the device
                                           # default: bf16 on a GPU, fp32 on a CPU); see medart_core/precision.py
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

    def __post_init__(self) -> None:
        # Sections given as plain dicts (presets, config.json) become their dataclasses, strictly checked.
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig.from_dict(self.lora)
        if isinstance(self.hldf, dict):
            self.hldf = HLDFConfig.from_dict(self.hldf)
        if isinstance(self.ema, dict):
            self.ema = EMAConfig.from_dict(self.ema)
        self.ema.sigma_rels = [float(x) for x in self.ema.sigma_rels]
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

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
        data = dict(data)
        if "mixed_precision" in data:
            # Configs written before precision was a setting (run folders that may be resumed, old presets).
            legacy = from_mixed_precision(data.pop("mixed_precision"))
            data.setdefault("precision", legacy)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown training config keys {unknown}; valid keys are {sorted(known)}.")
        cfg = cls(**dict(data))
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """A preset with ``overrides`` on top; ``lora={...}``/``hldf={...}`` merge into the preset's sections."""
        from .presets import load_preset

        return cls.from_dict(merge_config(load_preset(name), overrides))

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
        validate_precision(self.precision)
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ConfigError(f"optimizer must be 'adamw' or 'adamw8bit', got {self.optimizer!r}.")
        if self.resolution is not None and (int(self.resolution) < 8 or int(self.resolution) % 8):
            raise ConfigError(f"resolution must be a multiple of 8 (VAE), got {self.resolution}.")
        if int(self.val_images) < 0:
            raise ConfigError(f"val_images must be >= 0, got {self.val_images}.")
        if not self.validation_seeds:
            raise ConfigError("validation_seeds must name at least one seed.")
        if self.caption_text not in CAPTION_TEXTS:
            raise ConfigError(f"caption_text must be one of {', '.join(CAPTION_TEXTS)}, got {self.caption_text!r}.")
        self.hldf.validate()
        self.ema.validate()
        if self.snr_gamma is not None and not (float(self.snr_gamma) > 0 and math.isfinite(float(self.snr_gamma))):
            raise ConfigError(f"snr_gamma must be a positive number (the paper uses 5) or none, got {self.snr_gamma}.")
        validate_name(self.dataset, "dataset name")


# Fields a resumed run may change: they decide how long/how often, never what is computed at a step.
RESUME_MUTABLE = ("epochs", "max_steps", "checkpoint_every", "keep_checkpoints", "validate_every")
SECTIONS = ("lora", "hldf", "ema")
SECTION_CLASSES: dict[str, type] = {"lora": LoRAConfig, "hldf": HLDFConfig, "ema": EMAConfig}


def merge_config(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``; the nested sections merge field by field instead of being replaced."""
    out = dict(base)
    for k, v in extra.items():
        if k in SECTIONS and isinstance(v, dict):
            cur = out.get(k) or {}
            cur = dataclasses.asdict(cur) if dataclasses.is_dataclass(cur) else dict(cur)
            out[k] = {**cur, **v}
        else:
            out[k] = v
    return out


def load_run_config(run_config_path: Path) -> TrainConfig:
    p = Path(run_config_path)
    if not p.is_file():
        raise ConfigError(f"{p.parent} has no config.json: it is not a training run that can be resumed.")
    return TrainConfig.from_json(p.read_text(encoding="utf-8"))


def merge_for_resume(saved: TrainConfig, given: TrainConfig | None) -> TrainConfig:
    """The saved config, with only RESUME_MUTABLE fields taken from ``given``; anything else that differs is
    refused (it would not continue the same run)."""
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


# =========================================================================================================
# Command-line flags generated from the dataclass fields
# =========================================================================================================
def _parse_bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser_for(tp: Any) -> tuple[Any, str]:
    """(argparse type function, metavar) for a field annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or type(tp).__name__ == "UnionType":
        inner = [a for a in args if a is not type(None)]
        fn, meta = _parser_for(inner[0])
        return (lambda s: None if s.strip().lower() in ("none", "null") else fn(s)), meta + "|none"
    if origin is Literal:
        choices = [str(a) for a in args]

        def pick(s: str) -> str:
            if s not in choices:
                raise argparse.ArgumentTypeError(f"choose one of {choices}, got {s!r}")
            return s
        return pick, "|".join(choices)
    if origin in (list, tuple):
        item = args[0] if args else str
        fn, _ = _parser_for(item)
        return (lambda s: [fn(x) for x in s.split(",") if x.strip() != ""]), "A,B,..."
    if tp is bool:
        return _parse_bool, "true|false"
    if tp in (int, float, str):
        return tp, tp.__name__.upper()
    return str, "VALUE"


def _fields_of(cls: type) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], f) for f in dataclasses.fields(cls)]


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per TrainConfig field and ``--lora.x`` / ``--hldf.x`` per nested field; flags not given
    are absent from the namespace (dest ``cfg__name`` / ``cfg__lora__x``), so ``none`` can be a value."""
    g = p.add_argument_group("training config (any TrainConfig field; overrides the preset and --config)")
    for name, tp, _ in _fields_of(TrainConfig):
        if name in SECTIONS:
            for sub, stp, _f in _fields_of(SECTION_CLASSES[name]):
                fn, meta = _parser_for(stp)
                flags = sorted({f"--{name}.{sub}", f"--{name}.{sub.replace('_', '-')}"})
                g.add_argument(*flags, dest=f"cfg__{name}__{sub}", type=fn, default=argparse.SUPPRESS, metavar=meta,
                               **_bool_const(stp))
            continue
        fn, meta = _parser_for(tp)
        flags = sorted({f"--{name}", f"--{name.replace('_', '-')}"}, key=len)
        g.add_argument(*flags, dest=f"cfg__{name}", type=fn, default=argparse.SUPPRESS, metavar=meta,
                       **_bool_const(tp))


def _bool_const(tp: Any) -> dict[str, Any]:
    """A boolean flag given alone means true (``--ema.posthoc``); ``--flag false`` still works."""
    return {"nargs": "?", "const": True} if tp is bool else {}


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, nested sections as dicts."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith("cfg__"):
            continue
        parts = key.split("__")[1:]
        if len(parts) == 2:
            out.setdefault(parts[0], {})[parts[1]] = value
        else:
            out[parts[0]] = value
    return out
