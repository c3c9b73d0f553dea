"""Inference from any checkpoint: batched, seeded, every image a lossless PNG with a JSON sidecar.

A :class:`Generator` holds one base backbone for its whole life. Switching checkpoints never reloads it:

* LoRA is injected once per LoRA *shape* (rank, alpha, targets, T5 on/off, DoRA) as a named peft adapter;
  a checkpoint's ``adapters.safetensors`` is copied into that adapter's tensors in place.
* On the DiT the adapter is then **merged** into the base weights (``W0 + s·ΔW``, peft's own merge maths,
  the very values ``lora.export_merged`` writes), so sampling runs plain linear layers — unmerged LoRA
  costs about +35 % per DiT call on CPU (bench/generate.py). The pristine ``W0`` of every adapted layer is
  kept (on the CPU) and copied back before the next merge, so weights never drift however often one
  switches: the same checkpoint always gives the same bits.
* On T5, which runs once per distinct prompt, the adapter stays unmerged (no copy of T5-XXL is needed).
* ``"base"`` restores ``W0`` and disables every adapter: bitwise the base backbone.

Adapter *strength* is the LoRA scale (``1.0`` = as trained, ``0`` = base, values above 1 exaggerate).
T5 embeddings are cached per prompt, keyed by the prompt text, the text encoder, and — only when the active
checkpoint has LoRA on T5 — its adapters' sha256 and strength (a T5-LoRA checkpoint changes embeddings, so
base embeddings are never served for it). Each prompt is encoded on its own non-padding tokens, so its
embedding does not depend on what else is in the batch or in the cache. Within one sampling call the DiT's
caption projection and cross-attention keys/values are computed once, not once per step
(:class:`text_work_once`, the same bits).

Precision (``precision.py``): a generator holds its backbone in one precision — ``fp32``, or ``bf16`` weights
with every DiT/T5/VAE forward under bf16 autocast (the solver stays float32) — resolved once from
``fp32|bf16|auto`` or the device default (None: bf16 on a GPU, fp32 on a CPU); the sidecar records the
precision used, and :func:`regenerate` uses the recorded one.

Seeds: a request with seed ``s`` gives image ``k`` (0-based) of *every* prompt the seed ``s + k`` (so a
request with several prompts is a seed-matched grid); ``seed=None`` draws ``s`` at random and records it.
Images are sampled in chunks of ``batch_size`` (the CFG batch is twice that); each image's noise is drawn
from its own ``torch.Generator`` on the CPU, exactly as the stock pipeline does with a list of generators.

Files: ``ws.samples_dir/<batch id>/NNN_seedS.png`` (+ ``.json``). The PNG's pixels are the raw model output
(evaluation may read them); a random-weight backbone's label is recorded in the PNG's text chunk, in the
sidecar, and shown next to the image by the studio. The PNG text holds only what determines the pixels,
so :func:`regenerate` — which re-runs the image's whole chunk (same prompts and seeds in the same order,
hence the same arithmetic) — reproduces the file byte for byte on the same machine and software.

torch / diffusers are imported inside functions: the CLI imports this module at start-up.
"""
from __future__ import annotations

import io
import json
import math
import os
import secrets
import sys
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .config import JsonConfig
from .constants import MAX_TOKENS, RANDOM_LABEL
from .errors import ConfigError, NotFoundError
from .fileio import atomic_write_bytes, atomic_write_text, fsync_dir, sha256_bytes, sha256_file
from .workspace import Workspace, validate_name

if TYPE_CHECKING:  # pragma: no cover
    import torch

BASE = "base"
SIDECAR_FORMAT = 1
SIDECAR_KIND = "medart-sample"
SAMPLER = "DPM-Solver++(2M) + classifier-free guidance (medart_core.sampling.sample_dpmpp_2m)"
SEED_RULE = "image k (0-based) of every prompt uses seed + k"
ADAPTERS_FILE = "adapters.safetensors"
PNG_TEXT_KEY = "medart"
PNG_LABEL_KEY = "medart:label"
MAX_SEED = 2 ** 63 - 1
# Progress: progress(done_steps, total_steps) across every chunk of a request.
Progress = Callable[[int, int], None]


# =========================================================================================================
# Request and result
# =========================================================================================================
@dataclass
class GenerationRequest(JsonConfig):
    """What to generate. ``n`` images per prompt; see the module docstring for the seed rule."""

    CONFIG_NAME = "generation request"

    prompts: list[str] = field(default_factory=lambda: [""])
    negative: str = ""
    checkpoint: str = BASE            # "base" | "RUN" (its latest checkpoint) | "RUN@STEP"
    steps: int = 20
    guidance: float = 4.5
    seed: int | None = None           # None: drawn at random, recorded in every sidecar
    n: int = 1
    resolution: int | None = None     # None: the checkpoint's training resolution, else the backbone's
    strength: float = 1.0             # LoRA scale
    batch_size: int = 4               # images per DiT call (twice that with CFG)

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.prompts = [str(p if p is not None else "") for p in self.prompts]
        if not self.prompts:
            raise ConfigError("Give at least one prompt.")
        self.negative = str(self.negative or "")
        self.checkpoint = str(self.checkpoint or BASE).strip() or BASE
        self.steps, self.n, self.batch_size = int(self.steps), int(self.n), int(self.batch_size)
        self.guidance, self.strength = float(self.guidance), float(self.strength)
        if not 1 <= self.steps <= 500:
            raise ConfigError(f"steps must be between 1 and 500, got {self.steps}.")
        if not 1 <= self.n <= 256:
            raise ConfigError(f"n (images per prompt) must be between 1 and 256, got {self.n}.")
        if not 1 <= self.batch_size <= 256:
            raise ConfigError(f"batch_size must be between 1 and 256, got {self.batch_size}.")
        if not (math.isfinite(self.guidance) and 0 <= self.guidance <= 50):
            raise ConfigError(f"guidance must be a number in [0, 50], got {self.guidance}.")
        if not (math.isfinite(self.strength) and 0 <= self.strength <= 4):
            raise ConfigError(f"strength (LoRA scale) must be in [0, 4], got {self.strength}.")
        if self.seed is not None:
            self.seed = int(self.seed)
            if not 0 <= self.seed <= MAX_SEED - self.n:
                raise ConfigError(f"seed must be in 0..{MAX_SEED - self.n}, got {self.seed}.")
        if self.resolution is not None:
            self.resolution = int(self.resolution)
            if self.resolution < 16 or self.resolution % 16 or self.resolution > 4096:
                raise ConfigError(f"resolution must be a multiple of 16 between 16 and 4096 (VAE ×8, DiT patch 2), "
                                  f"got {self.resolution}.")
        parse_checkpoint_ref(self.checkpoint)


@dataclass
class GeneratedImage:
    """One saved image: where it is, how it was made (``settings`` is the sidecar's content)."""

    path: Path
    sidecar: Path
    prompt: str
    seed: int
    index: int                        # k: the image's number within its prompt
    checkpoint: str                   # the resolved ref: "base" or "RUN@STEP"
    sha256: str
    is_random: bool
    warnings: list[str]
    settings: dict[str, Any]

    @property
    def caption(self) -> str:
        """How the studio captions the image (random-weight backbones always say so)."""
        head = f"⚠ {RANDOM_LABEL} · " if self.is_random else ""
        return f"{head}seed {self.seed} · {self.checkpoint} · {self.prompt[:60]}"


# =========================================================================================================
# Checkpoint references
# =========================================================================================================
def split_weights(ref: str) -> tuple[str, str]:
    """``"RUN@STEP:ema"`` → ("RUN@STEP", "ema"); no ``:`` suffix → (ref, "raw"). Suffixes: ``ema`` (the EMA
    kept while training, ``--ema.decay``) and ``ema-SIGMA`` (a reconstructed post-hoc EMA, ``ema reconstruct``)."""
    from .checkpoint import parse_weights

    ref = (ref or BASE).strip()
    head, sep, weights = ref.partition(":")
    if not sep:
        return ref, "raw"
    parse_weights(weights)
    if head.strip() == BASE:
        raise ConfigError(f"Checkpoint {ref!r}: the base model has no EMA weights; name a run, e.g. RUN@500:ema.")
    return head.strip(), weights.strip()


def parse_checkpoint_ref(ref: str) -> tuple[str | None, int | None]:
    """``"base"`` → (None, None); ``"RUN"`` → (RUN, None) i.e. its latest; ``"RUN@STEP"`` → (RUN, STEP).
    A ``:ema`` / ``:ema-SIGMA`` suffix (see :func:`split_weights`) is checked and not part of the result."""
    ref, _weights = split_weights(ref)
    if ref == BASE:
        return None, None
    run, sep, step = ref.partition("@")
    validate_name(run, "run name")
    if not sep:
        return run, None
    if not step.isdigit():
        raise ConfigError(f"Checkpoint {ref!r}: the step after '@' must be a number, e.g. {run}@500.")
    return run, int(step)


def _ckpt():
    from . import checkpoint

    return checkpoint


def list_checkpoint_refs(ws: Workspace) -> list[str]:
    """``"base"`` then ``"RUN@STEP"`` for every complete checkpoint of every run (runs by name, steps up)."""
    ck = _ckpt()
    refs = [BASE]
    if ws.runs_dir.is_dir():
        for run_dir in sorted(p for p in ws.runs_dir.iterdir() if p.is_dir()):
            for p in ck.list_checkpoints(run_dir):
                refs.append(f"{run_dir.name}@{ck.checkpoint_step(p)}")
                if (p / ck.EMA_FILE).is_file():   # the raw weights stay the default, listed first
                    refs.append(f"{run_dir.name}@{ck.checkpoint_step(p)}:ema")
    return refs


@dataclass(frozen=True)
class ResolvedCheckpoint:
    ref: str                          # "RUN@STEP", or "RUN@STEP:ema" / "RUN@STEP:ema-SIGMA" for EMA weights
    path: Path
    adapters_path: Path
    sha256: str
    lora: dict[str, Any]
    backbone: str                     # the backbone the run trained on
    resolution: int | None            # its training resolution (None: the backbone's own)
    parts: tuple[str, ...]            # "dit", "t5"
    weights: str = "raw"              # "raw" | "ema" | "ema-SIGMA": which adapter weights adapters_path holds


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (memoised by path, size and mtime: checkpoints are written once)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(p)
    return _SHA_CACHE[key]


def resolve_checkpoint(ws: Workspace, ref: str) -> ResolvedCheckpoint | None:
    """The checkpoint a ref names (None for "base"); NotFoundError lists what exists."""
    run, step = parse_checkpoint_ref(ref)
    if run is None:
        return None
    weights = split_weights(ref)[1]
    ck = _ckpt()
    if not ws.run_dir(run).is_dir():
        have = list_checkpoint_refs(ws)[1:]
        raise NotFoundError(f"No run {run!r} in {ws.runs_dir}. Available checkpoints: "
                            f"{', '.join(have) if have else 'none yet (train a run first)'}; or use 'base'.")
    path = ck.find_checkpoint(ws, run, step)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    adapters = path / ADAPTERS_FILE
    if not adapters.is_file():
        raise NotFoundError(f"Checkpoint {run}@{ck.checkpoint_step(path)} has no {ADAPTERS_FILE}.")
    if weights != "raw":
        adapters = ck.weights_file(path, weights)
    cfg = state.get("config") or {}
    from safetensors import safe_open

    with safe_open(str(adapters), framework="pt") as f:
        parts = tuple(sorted({k.partition("::")[0] for k in f.keys()}))
    suffix = "" if weights == "raw" else f":{weights}"
    return ResolvedCheckpoint(ref=f"{run}@{ck.checkpoint_step(path)}{suffix}", path=path, adapters_path=adapters,
                              sha256=file_sha256(adapters), lora=dict(cfg.get("lora") or {}),
                              backbone=str(cfg.get("backbone") or ""),
                              resolution=int(cfg["resolution"]) if cfg.get("resolution") else None, parts=parts,
                              weights=weights)


# =========================================================================================================
# Small helpers
# =========================================================================================================
def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "diffusers", "transformers", "peft", "safetensors", "pillow", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def new_batch_id() -> str:
    """``YYYYMMDD-HHMMSS-xxxxxx`` (UTC): sorts by time, unique across processes."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def png_bytes(image: Any, text: dict[str, str]) -> bytes:
    """Lossless PNG with text chunks; the same pixels and text always give the same bytes."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()


def truncation_warning(tokenizer: Any, prompt: str, number: int, tokenizer_name: str) -> str | None:
    """A sentence when ``prompt`` (as PixArt lower-cases it) is over 120 T5 tokens, naming what is dropped."""
    from .caption_ops import token_preview

    p = token_preview(tokenizer, (prompt or "").lower().strip(), MAX_TOKENS)
    if not p.over:
        return None
    cut = p.cut.strip()
    cut = cut if len(cut) <= 80 else cut[:77] + "..."
    return (f"Prompt {number} is {p.n_tokens} tokens ({tokenizer_name}); PixArt reads {MAX_TOKENS}, so it was "
            f"truncated and the text encoder never saw: \u201c{cut}\u201d.")


def _lora_shape_name(lora: dict[str, Any]) -> tuple[str, Any]:
    """A peft adapter name per LoRA shape (dropout does not change the tensors, so it is left out)."""
    from .lora import LoRAConfig

    cfg = LoRAConfig.from_dict(lora)
    d = cfg.to_dict()
    d.pop("dropout", None)
    digest = sha256_bytes(json.dumps(d, sort_keys=True).encode())[:12]
    return f"medart_{digest}", cfg


# =========================================================================================================
# The generator
# =========================================================================================================
class text_work_once:
    """Within one sampling call the text embeddings are fixed, so PixArt's caption projection and every
    cross-attention key/value projection of them give the same result at each of the M steps: compute them
    at the first step and reuse them (exactly the same bits) for the rest, instead of M times.

    A scoped memo on those modules' ``forward`` (keyed by the input tensor's storage, shape and version,
    holding the input alive), removed on exit: nothing is kept between calls.
    """

    def __init__(self, transformer: Any):
        # (a PixArt transformer without caption channels, or a block without cross-attention, has None here)
        mods = [transformer.caption_projection]
        for blk in transformer.transformer_blocks:
            if blk.attn2 is not None:
                mods += [blk.attn2.to_k, blk.attn2.to_v]
        self.modules = [m for m in mods if m is not None]

    def __enter__(self) -> "text_work_once":
        for m in self.modules:
            m.forward = self._memo(m.forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.modules:
            m.__dict__.pop("forward", None)

    @staticmethod
    def _memo(forward: Callable[..., Any]) -> Callable[..., Any]:
        memo: dict[tuple, tuple[Any, Any]] = {}

        def call(x: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs:
                return forward(x, *args, **kwargs)
            # (inference tensors carry no version counter; nothing writes into the embeddings mid-call)
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device,
                   0 if x.is_inference() else x._version)
            hit = memo.get(key)
            if hit is None:
                hit = memo[key] = (x, forward(x))
            return hit[1]

        return call


class _Unwrapped:
    """A model's modules as they were before LoRA: a second LoRA shape resolves its targets like the first."""

    def __init__(self, model: Any):
        self.model = model

    def named_modules(self):
        from peft.tuners.lora import LoraLayer

        for n, m in self.model.named_modules():
            if ".lora_" in n or isinstance(m, LoraLayer):
                continue
            yield (n[: -len(".base_layer")] if n.endswith(".base_layer") else n), m


@dataclass
class _Shape:
    name: str
    parts: tuple[str, ...]


class Generator:
    """The base backbone, kept resident, with checkpoints' adapters swapped in place (module docstring).

    Thread-safe: one generation at a time per instance (a lock), so a studio shares one per backbone.
    ``stats`` counts backbone loads, LoRA injections, adapter loads and embedding-cache hits/misses.
    """

    def __init__(self, ws: Workspace, backbone: str | Any = "tiny", *, device: Any = None, dtype: Any = None,
                 embed_cache_size: int = 256, merge_dit: bool = True, precision: str | None = None):
        from .precision import validate_precision

        self.ws = ws
        self._bb = None if isinstance(backbone, str) else backbone
        self.spec = backbone if isinstance(backbone, str) else str(backbone.spec)
        self._device, self._dtype = device, dtype
        self._precision_requested = validate_precision(precision)
        self._precision: tuple[str, str] | None = None
        self.merge_dit = bool(merge_dit)
        self.lock = threading.RLock()
        self._shapes: dict[str, _Shape] = {}
        self._pristine: dict[str, Any] = {}          # DiT layer name -> W0 (CPU copy)
        self._active: tuple[str, str, float] = (BASE, BASE, 1.0)   # (ref, adapters sha or "base", strength)
        self._active_parts: tuple[str, ...] = ()
        self._embeds: OrderedDict[tuple, Any] = OrderedDict()
        self._embed_cache_size = int(embed_cache_size)
        self.stats = {"backbone_loads": 0, "lora_injections": 0, "adapter_loads": 0, "embed_hits": 0,
                      "embed_misses": 0}

    # ---- the backbone ----------------------------------------------------------------------------------
    @property
    def backbone(self) -> Any:
        """The base backbone, loaded on first use (MissingWeightsError says what to download or set)."""
        if self._bb is not None:
            return self._bb
        with self.lock:
            if self._bb is not None:
                return self._bb
            import torch

            from .backbone import load_backbone
            from .precision import torch_dtype

            device = torch.device(self._device or ("cuda" if torch.cuda.is_available() else "cpu"))
            dtype = self._dtype or torch_dtype(self.resolved_precision(device)[0])
            bb = load_backbone(self.spec, torch_dtype=None if dtype == torch.float32 else dtype)
            if device.type != "cpu":
                bb.to(device=device)
            self._bb = bb
            self.stats["backbone_loads"] += 1
            return bb

    def resolved_precision(self, device: Any = None) -> tuple[str, str]:
        """(precision used, why): from the requested one on this generator's device; a backbone handed in,
        or an explicit ``dtype``, is taken as it is."""
        if self._precision is None:
            from .precision import of_dtype, resolve_precision

            if self._bb is not None or self._dtype is not None:
                dt = self._dtype if self._dtype is not None else self._bb.transformer.dtype
                name = of_dtype(dt)
                self._precision = (name, f"the backbone's weights are {name}")
            else:
                import torch

                dev = device or torch.device(self._device or ("cuda" if torch.cuda.is_available() else "cpu"))
                self._precision = resolve_precision(self._precision_requested, dev)
        return self._precision

    @property
    def precision(self) -> str:
        """``"fp32"`` or ``"bf16"``: what the forward passes compute in."""
        self.backbone
        return self.resolved_precision()[0]

    def autocast(self) -> Any:
        from .precision import autocast

        return autocast(self.precision, self.device)

    def clear_cache(self) -> None:
        """Forget every cached prompt embedding."""
        with self.lock:
            self._embeds.clear()

    @property
    def device(self) -> Any:
        return self.backbone.transformer.device

    @property
    def dtype(self) -> Any:
        return self.backbone.transformer.dtype

    @property
    def is_random(self) -> bool:
        return bool(self.backbone.is_random)

    @property
    def tokenizer_name(self) -> str:
        """Which tokenizer counts prompt tokens (the tiny backbones use the project's own small vocabulary)."""
        return tokenizer_label(self.spec)

    @property
    def active(self) -> str:
        return self._active[0]

    # ---- adapters ------------------------------------------------------------------------------------
    def _lora_layers(self, model: Any) -> list[tuple[str, Any]]:
        from peft.tuners.lora import LoraLayer

        return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]

    def _ensure_shape(self, lora: dict[str, Any]) -> _Shape:
        """Inject the LoRA layers of this shape once (a named peft adapter on DiT and, if enabled, T5)."""
        name, cfg = _lora_shape_name(lora)
        if name in self._shapes:
            return self._shapes[name]
        from peft import LoraConfig, inject_adapter_in_model

        from .lora import resolve_targets

        bb = self.backbone
        self._restore_dit()
        parts: list[str] = []
        plan = [("dit", bb.transformer, cfg.dit_targets, cfg.rank)]
        if cfg.t5_enabled:
            plan.append(("t5", bb.text_encoder, cfg.t5_targets, cfg.t5_rank or cfg.rank))
        for part, model, requested, rank in plan:
            targets = sorted({s for v in resolve_targets(_Unwrapped(model), requested).values() for s in v})
            if not targets:
                raise ConfigError(f"The checkpoint's LoRA targets {requested} match no layer of this backbone's "
                                  f"{part}; was it trained on another backbone?")
            lcfg = LoraConfig(r=int(rank), lora_alpha=float(cfg.alpha), lora_dropout=0.0, target_modules=targets,
                              use_dora=bool(cfg.use_dora), init_lora_weights=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # peft warns when a model gets a second named adapter
                inject_adapter_in_model(lcfg, model, adapter_name=name)
            model.eval().requires_grad_(False)
            parts.append(part)
        for lname, layer in self._lora_layers(bb.transformer):
            if lname not in self._pristine:
                self._pristine[lname] = layer.get_base_layer().weight.detach().to("cpu", copy=True)
        self.stats["lora_injections"] += 1
        shape = self._shapes[name] = _Shape(name, tuple(parts))
        return shape

    def _restore_dit(self) -> None:
        """Copy the pristine base weights back into every merged DiT layer (exact: no subtraction)."""
        if self._bb is None:
            return
        for lname, layer in self._lora_layers(self._bb.transformer):
            if layer.merged_adapters:
                layer.get_base_layer().weight.data.copy_(self._pristine[lname])
                layer.merged_adapters.clear()

    def _set_layers(self, model: Any, name: str | None, *, merge: bool, strength: float) -> None:
        for _, layer in self._lora_layers(model):
            if name is None or name not in layer.lora_A:
                layer.enable_adapters(False)
                continue
            layer.enable_adapters(True)
            layer.set_adapter(name, inference_mode=True)
            layer.set_scale(name, strength)
            if merge:
                layer.merge(adapter_names=[name])
        model.requires_grad_(False)

    def use(self, ref: str = BASE, strength: float = 1.0) -> ResolvedCheckpoint | None:
        """Make ``ref`` the active checkpoint at ``strength``; the base model stays loaded. Returns it."""
        import torch
        from safetensors.torch import load_file

        with self.lock:
            ck = resolve_checkpoint(self.ws, ref)
            if ck is not None and ck.backbone and not _same_backbone(ck.backbone, self.spec):
                raise ConfigError(f"Checkpoint {ck.ref} was trained on backbone {ck.backbone!r}, but this generator "
                                  f"holds {self.spec!r}; generate with --backbone {ck.backbone}.")
            bb = self.backbone
            strength = float(strength)
            key = (BASE, BASE, 1.0) if ck is None else (ck.ref, ck.sha256, strength)
            if key == self._active:
                return ck
            self._restore_dit()
            self._active, self._active_parts = ("", "", -1.0), ()   # half-switched until the end: retried
            if ck is None:
                self._set_layers(bb.transformer, None, merge=False, strength=1.0)
                self._set_layers(bb.text_encoder, None, merge=False, strength=1.0)
                self._active, self._active_parts = key, ()
                return None
            shape = self._ensure_shape(ck.lora)
            flat = load_file(str(ck.adapters_path))
            nested: dict[str, dict[str, Any]] = {}
            for k, v in flat.items():
                part, _, key_ = k.partition("::")
                nested.setdefault(part, {})[key_] = v
            if set(nested) != set(shape.parts):
                raise ConfigError(f"Checkpoint {ck.ref} has adapters for {sorted(nested)} but its config says "
                                  f"{sorted(shape.parts)}; the checkpoint is inconsistent.")
            from peft import get_peft_model_state_dict, set_peft_model_state_dict

            with torch.no_grad():
                for part, tensors in nested.items():
                    model = bb.transformer if part == "dit" else bb.text_encoder
                    # Every tensor of the adapter must come from this checkpoint: a missing key would
                    # silently keep the previous checkpoint's values.
                    expected = set(get_peft_model_state_dict(model, adapter_name=shape.name))
                    if set(tensors) != expected:
                        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
                        raise ConfigError(f"Checkpoint {ck.ref}: its {part} adapters do not match its LoRA config "
                                          f"(missing e.g. {missing}, unexpected e.g. {extra}).")
                    res = set_peft_model_state_dict(model, tensors, adapter_name=shape.name)
                    if res.unexpected_keys:
                        raise ConfigError(f"Checkpoint {ck.ref}: adapter keys {res.unexpected_keys[:3]} match no "
                                          "LoRA layer.")
            self._set_layers(bb.transformer, shape.name, merge=self.merge_dit, strength=strength)
            self._set_layers(bb.text_encoder, shape.name if "t5" in shape.parts else None, merge=False,
                             strength=strength)
            self.stats["adapter_loads"] += 1
            self._active, self._active_parts = key, shape.parts
            return ck

    # ---- prompts -------------------------------------------------------------------------------------
    def _t5_state(self) -> str:
        ref, sha, strength = self._active
        return f"{sha}@{strength!r}" if "t5" in self._active_parts else BASE

    def prompt_embedding(self, prompt: str) -> Any:
        """T5 hidden states of one prompt on its own non-padding tokens ([n_tokens, d]), from the cache."""
        import torch

        from .pixart import run_text_encoder, tokenize_prompts

        bb = self.backbone
        te = bb.text_encoder
        key = (self.spec, id(te), str(te.dtype), self._t5_state(), prompt.lower().strip())
        hit = self._embeds.get(key)
        if hit is not None:
            self._embeds.move_to_end(key)
            self.stats["embed_hits"] += 1
            return hit
        ids, mask = tokenize_prompts(bb.tokenizer, [prompt])
        n_tok = int(mask.sum())
        with torch.inference_mode(), self.autocast():
            emb = run_text_encoder(te, ids.to(te.device), mask.to(te.device), trim_padding=True)
        emb = emb[0, :n_tok].clone()
        self._embeds[key] = emb
        self.stats["embed_misses"] += 1
        while len(self._embeds) > self._embed_cache_size:
            self._embeds.popitem(last=False)
        return emb

    def embed_batch(self, prompts: Sequence[str]) -> tuple[Any, Any]:
        """[B, 120, d] embeddings (zeros past each prompt's tokens) and the [B, 120] mask, as the pipeline
        shapes them; each distinct prompt is encoded once."""
        import torch

        unique = {p: self.prompt_embedding(p) for p in dict.fromkeys(prompts)}
        rows = [unique[p] for p in prompts]
        d = rows[0].shape[-1]
        emb = torch.zeros((len(rows), MAX_TOKENS, d), dtype=rows[0].dtype, device=rows[0].device)
        mask = torch.zeros((len(rows), MAX_TOKENS), dtype=torch.int64, device=rows[0].device)
        for i, r in enumerate(rows):
            emb[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        return emb, mask

    # ---- sampling ------------------------------------------------------------------------------------
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], *, negative: str = "", steps: int = 20,
               guidance: float = 4.5, resolution: int | None = None,
               callback: Callable[[int, int, Any], None] | None = None) -> Any:
        """Images in [-1, 1] ([B, 3, R, R]) of one chunk with the active checkpoint (no files written)."""
        import torch

        from .pixart import decode, initial_noise, latent_shape, sample_latents

        bb = self.backbone
        if len(prompts) != len(seeds):
            raise ConfigError(f"{len(prompts)} prompts but {len(seeds)} seeds.")
        with torch.inference_mode():
            emb, mask = self.embed_batch(prompts)
            neg, nmask = self.embed_batch([negative] * len(prompts))
            shape = (1,) + latent_shape(bb, 1, resolution or bb.resolution)[1:]
            noise = torch.cat([initial_noise(shape, torch.Generator("cpu").manual_seed(int(s))) for s in seeds])
            # The solver's latents stay float32; under bf16 only the DiT and VAE forwards are bf16.
            with text_work_once(bb.transformer), self.autocast():
                lat = sample_latents(bb, emb.to(self.dtype), mask, neg.to(self.dtype), nmask, steps=steps,
                                     guidance=guidance, latents=noise.to(self.device), callback=callback)
                return decode(bb.vae, lat).float()

    def generate(self, request: GenerationRequest, *, progress: Progress | None = None,
                 out_dir: str | os.PathLike | None = None,
                 part: tuple[int, int] | None = None) -> list[GeneratedImage]:
        """Sample every image of ``request``, save PNG + sidecar for each, return them in request order
        (prompt by prompt, ``n`` each). ``part=(a, b)``: only the DiT batches a..b-1 of the request (one shard
        of a job array, :mod:`medart_core.fanout`; it needs ``request.seed``), numbered as in the whole run,
        so the shards of one request together write exactly the files one run writes."""
        if part is not None and request.seed is None:
            raise ConfigError("A part of a generation needs the request's seed (each part must use the same one).")
        with self.lock:
            ck = self.use(request.checkpoint, request.strength)
            seed = request.seed if request.seed is not None else secrets.randbelow(2 ** 31)
            resolution = request.resolution or (ck.resolution if ck else None) or self.backbone.resolution
            warns = {i: w for i, p in enumerate(request.prompts)
                     if (w := truncation_warning(self.backbone.tokenizer, p, i + 1, self.tokenizer_name))}
            items = [(i, k, p, seed + k) for i, p in enumerate(request.prompts) for k in range(request.n)]
            chunks = [items[j: j + request.batch_size] for j in range(0, len(items), request.batch_size)]
            first = 0
            if part is not None:
                first = part[0] * request.batch_size
                chunks = chunks[part[0]: part[1]]
            folder = Path(out_dir) if out_dir else self.ws.samples_dir / new_batch_id()
            folder.mkdir(parents=True, exist_ok=True)
            total, done = len(chunks) * request.steps, [0]

            def on_step(i: int, n: int, x: Any) -> None:
                done[0] += 1
                if progress is not None:
                    progress(done[0], total)

            common = self._common_settings(request, ck, seed, resolution)
            out: list[GeneratedImage] = []
            from .pixart import to_pil

            for chunk in chunks:
                prompts, seeds = [c[2] for c in chunk], [c[3] for c in chunk]
                images = to_pil(self.sample(prompts, seeds, negative=request.negative, steps=request.steps,
                                            guidance=request.guidance, resolution=resolution, callback=on_step))
                for pos, ((i, k, prompt, s), img) in enumerate(zip(chunk, images)):
                    settings = dict(common, prompt=prompt, prompt_number=i + 1, index=k, seed=s,
                                    batch={"prompts": prompts, "seeds": seeds, "position": pos},
                                    warnings=[warns[i]] if i in warns else [])
                    out.append(self._save(folder, first + len(out), img, settings))
            fsync_dir(folder)
            return out

    def _common_settings(self, request: GenerationRequest, ck: ResolvedCheckpoint | None, seed: int,
                         resolution: int) -> dict[str, Any]:
        import torch

        bb = self.backbone
        return {
            "format": SIDECAR_FORMAT, "kind": SIDECAR_KIND, "negative": request.negative,
            "checkpoint": ck.ref if ck else BASE, "checkpoint_requested": request.checkpoint,
            "adapters_sha256": ck.sha256 if ck else BASE, "weights": ck.weights if ck else BASE,
            "lora": ck.lora if ck else None,
            "strength": request.strength if ck else 1.0, "backbone": self.spec, "backbone_label": bb.label,
            "is_random": bool(bb.is_random), "label": RANDOM_LABEL if bb.is_random else None,
            "resolution": int(resolution), "steps": request.steps, "guidance": request.guidance,
            "sampler": SAMPLER, "seed_rule": SEED_RULE, "request_seed": seed,
            "seed_was_random": request.seed is None, "n": request.n, "batch_size": request.batch_size,
            "trim_text_padding": True, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "precision": self.precision, "precision_reason": self.resolved_precision()[1],
            "torch_threads": torch.get_num_threads(), "versions": _versions(),
        }

    def _save(self, folder: Path, number: int, img: Any, settings: dict[str, Any]) -> GeneratedImage:
        stem = f"{number:03d}_seed{settings['seed']}"
        path, sidecar = folder / f"{stem}.png", folder / f"{stem}.json"
        png_text = {PNG_TEXT_KEY: json.dumps(_png_params(settings), sort_keys=True, ensure_ascii=False)}
        if settings["is_random"]:
            png_text[PNG_LABEL_KEY] = RANDOM_LABEL
        data = png_bytes(img, png_text)
        atomic_write_bytes(path, data)
        sha = sha256_bytes(data)
        settings = dict(settings, file=path.name, png_sha256=sha, png_text=png_text,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        atomic_write_text(sidecar, json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False))
        return _image_from(path, sidecar, settings)

    # ---- regenerate ----------------------------------------------------------------------------------
    def regenerate(self, sidecar: str | os.PathLike, *, out_dir: str | os.PathLike | None = None) -> GeneratedImage:
        """Re-run the image's chunk with its recorded settings and save the image again (a new folder);
        on the same machine and software the PNG is byte-equal (``settings["matches_original"]``)."""
        s = read_sidecar(sidecar)
        if s["backbone"] != self.spec:
            raise ConfigError(f"{Path(sidecar).name} was made with backbone {s['backbone']!r}; this generator "
                              f"holds {self.spec!r}.")
        if sidecar_precision(s) != self.precision:
            raise ConfigError(f"{Path(sidecar).name} was made in {sidecar_precision(s)}; this generator computes in "
                              f"{self.precision}: regenerate with precision {sidecar_precision(s)}.")
        with self.lock:
            ck = self.use(s["checkpoint"], s["strength"])
            sha = ck.sha256 if ck else BASE
            if sha != s["adapters_sha256"]:
                raise ConfigError(f"The adapters of checkpoint {s['checkpoint']} changed since this image was made "
                                  f"(sha256 {sha[:12]}… now, {str(s['adapters_sha256'])[:12]}… then).")
            b = s["batch"]
            images = self.sample(b["prompts"], b["seeds"], negative=s["negative"], steps=s["steps"],
                                 guidance=s["guidance"], resolution=s["resolution"])
            from .pixart import to_pil

            img = to_pil(images[b["position"]: b["position"] + 1])[0]
            folder = Path(out_dir) if out_dir else self.ws.samples_dir / new_batch_id()
            folder.mkdir(parents=True, exist_ok=True)
            data = png_bytes(img, dict(s["png_text"]))
            name = Path(s["file"]).name
            path, side = folder / name, folder / (Path(name).stem + ".json")
            atomic_write_bytes(path, data)
            sha_png = sha256_bytes(data)
            settings = dict(s, png_sha256=sha_png, regenerated_from=str(Path(sidecar)),
                            matches_original=sha_png == s["png_sha256"], torch_threads=_threads(),
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            atomic_write_text(side, json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False))
            fsync_dir(folder)
            return _image_from(path, side, settings)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _same_backbone(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _png_params(s: dict[str, Any]) -> dict[str, Any]:
    """What the PNG's own text chunk records: only what determines the pixels (no time, no path)."""
    keys = ("prompt", "negative", "seed", "checkpoint", "adapters_sha256", "strength", "backbone", "is_random",
            "resolution", "steps", "guidance", "sampler")
    return {k: s[k] for k in keys}


def load_image(path: str | os.PathLike) -> GeneratedImage:
    """A saved image (``NNN_seedS.png``) with its sidecar, as :meth:`Generator.generate` returned it."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    return _image_from(path, sidecar, read_sidecar(sidecar))


def _image_from(path: Path, sidecar: Path, s: dict[str, Any]) -> GeneratedImage:
    return GeneratedImage(path=path, sidecar=sidecar, prompt=s["prompt"], seed=int(s["seed"]), index=int(s["index"]),
                          checkpoint=s["checkpoint"], sha256=s["png_sha256"], is_random=bool(s["is_random"]),
                          warnings=list(s.get("warnings") or []), settings=s)


def tokenizer_label(spec: str) -> str:
    """Name of the tokenizer prompts are counted with, as the UI shows it."""
    from .backbone import PRESETS

    if spec in PRESETS:
        return "the project's tiny Unigram tokenizer of the random-weight backbone, not T5's"
    return f"PixArt's T5 tokenizer ({spec})"


# =========================================================================================================
# Sidecars: read, reuse, list
# =========================================================================================================
_REQUIRED_SIDECAR = ("format", "kind", "prompt", "negative", "seed", "checkpoint", "adapters_sha256", "strength",
                     "backbone", "resolution", "steps", "guidance", "batch", "png_text", "png_sha256", "file")


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """A sample's sidecar (the ``.json`` next to it; a ``.png`` path is accepted too)."""
    p = Path(path)
    if p.suffix.lower() == ".png":
        p = p.with_suffix(".json")
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"No sidecar {p}: pick an image generated by Med-Art (its .json lies next to it).") \
            from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"Cannot read sidecar {p}: {e}") from None
    missing = [k for k in _REQUIRED_SIDECAR if k not in s] if isinstance(s, dict) else list(_REQUIRED_SIDECAR)
    if missing or s.get("kind") != SIDECAR_KIND:
        raise ConfigError(f"{p} is not a Med-Art sample sidecar (missing {missing[:4]}).")
    if int(s["format"]) > SIDECAR_FORMAT:
        raise ConfigError(f"{p} has sidecar format {s['format']}; this version reads up to {SIDECAR_FORMAT}.")
    return s


def load_settings(sidecar: str | os.PathLike) -> GenerationRequest:
    """"Reuse these settings": the request that makes this image's prompt with the same checkpoint, strength,
    seed, steps, guidance, negative and resolution (one image; :func:`regenerate` is the byte-exact path,
    since it also re-runs the original chunk's other images)."""
    s = read_sidecar(sidecar)
    return GenerationRequest(prompts=[s["prompt"]], negative=s["negative"], checkpoint=s["checkpoint"],
                             steps=int(s["steps"]), guidance=float(s["guidance"]), seed=int(s["seed"]), n=1,
                             resolution=int(s["resolution"]), strength=float(s["strength"]),
                             batch_size=int(s.get("batch_size") or 4))


def recent_sidecars(ws: Workspace, limit: int = 50) -> list[Path]:
    """The newest ``limit`` sample sidecars of the workspace (by batch folder name, then file name)."""
    root = ws.samples_dir
    if not root.is_dir():
        return []
    out: list[Path] = []
    for batch in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True):
        out += sorted(batch.glob("*.json"), reverse=True)
        if len(out) >= limit:
            break
    return out[:limit]


# =========================================================================================================
# Module-level faces: one shared generator per (workspace, backbone)
# =========================================================================================================
_GENERATORS: dict[tuple[str, str], Generator] = {}
_GEN_LOCK = threading.Lock()


def default_backbone(ws: Workspace, checkpoint: str = BASE) -> str:
    """The checkpoint's training backbone when one is named, else ``$MEDART_BACKBONE``, else ``tiny``."""
    ck = resolve_checkpoint(ws, checkpoint) if checkpoint and checkpoint != BASE else None
    return (ck.backbone if ck and ck.backbone else None) or os.environ.get("MEDART_BACKBONE") or "tiny"


def get_generator(ws: Workspace, backbone: str, precision: str | None = None) -> Generator:
    """The process's generator for this workspace, backbone and *resolved* precision (created once; the model
    loads on first use). ``precision``: fp32 | bf16 | auto | None (the device default)."""
    import torch

    from .precision import resolve_precision

    resolved = resolve_precision(precision, "cuda" if torch.cuda.is_available() else "cpu")[0]
    key = (str(ws.root), str(backbone), resolved)
    with _GEN_LOCK:
        gen = _GENERATORS.get(key)
        if gen is None:
            gen = _GENERATORS[key] = Generator(ws, backbone, precision=precision)
        return gen


def generate(request: GenerationRequest, *, ws: Workspace | None = None, backbone: str | None = None,
             progress: Progress | None = None, precision: str | None = None) -> list[GeneratedImage]:
    """Generate with the shared generator of ``backbone`` (default: see :func:`default_backbone`) in
    ``precision`` (fp32 | bf16 | auto; None: the device default)."""
    ws = ws or Workspace.open()
    spec = backbone or default_backbone(ws, request.checkpoint)
    return get_generator(ws, spec, precision).generate(request, progress=progress)


def sidecar_precision(s: dict[str, Any]) -> str:
    """The precision a sidecar's image was made in (older sidecars record only the weights' dtype)."""
    from .precision import of_dtype

    return str(s.get("precision") or of_dtype(s.get("dtype", "float32")))


def regenerate(sidecar: str | os.PathLike, *, ws: Workspace | None = None) -> GeneratedImage:
    """Reproduce a saved image from its sidecar (byte-equal PNG on the same machine and software), in the
    precision it was made in."""
    ws = ws or Workspace.open()
    s = read_sidecar(sidecar)
    return get_generator(ws, s["backbone"], sidecar_precision(s)).regenerate(sidecar)


# =========================================================================================================
# Job kind (for long grids; registered by jobs.py)
# =========================================================================================================
def prepare_generate_job(ws: Workspace, config: dict[str, Any]) -> tuple[dict[str, Any], None]:
    """Validate a ``generate`` job's config: ``{"request": GenerationRequest fields, "backbone": spec|None,
    "precision": fp32|bf16|auto|None}``."""
    from .precision import validate_precision

    unknown = sorted(set(config) - {"request", "backbone", "precision"})
    if unknown:
        raise ConfigError(f"Unknown generate job keys {unknown}; use 'request', 'backbone' and 'precision'.")
    req = GenerationRequest.from_dict(dict(config.get("request") or {}))
    resolve_checkpoint(ws, req.checkpoint)
    return {"request": req.to_dict(), "backbone": config.get("backbone"),
            "precision": validate_precision(config.get("precision"))}, None


def run_generate_job(ctx: Any) -> dict[str, Any]:
    """The ``generate`` job kind: the request's images with progress; stops between chunks when asked."""
    req = GenerationRequest.from_dict(ctx.config["request"])
    spec = ctx.config.get("backbone") or default_backbone(ctx.ws, req.checkpoint)

    class _Stop(Exception):
        pass

    def progress(done: int, total: int) -> None:
        ctx.progress(step=done, total=total)
        if ctx.should_stop():
            raise _Stop()

    try:
        imgs = get_generator(ctx.ws, spec, ctx.config.get("precision")).generate(req, progress=progress)
    except _Stop:
        return {"status": "stopped"}
    return {"status": "finished", "images": [str(i.path) for i in imgs],
            "folder": str(imgs[0].path.parent) if imgs else None}


__all__ = [
    "BASE", "SEED_RULE", "SAMPLER", "GenerationRequest", "GeneratedImage", "Generator", "ResolvedCheckpoint",
    "parse_checkpoint_ref", "list_checkpoint_refs", "resolve_checkpoint", "file_sha256", "truncation_warning",
    "tokenizer_label", "read_sidecar", "load_image", "load_settings", "recent_sidecars", "default_backbone", "get_generator",
    "generate", "regenerate", "sidecar_precision", "png_bytes", "new_batch_id", "prepare_generate_job", "run_generate_job",
]
