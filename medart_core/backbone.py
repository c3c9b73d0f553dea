"""PixArt-α parts: load them from the Hub or a folder, or build the tiny offline backbone from configs.

``load_backbone(spec)`` is the one entry point. ``spec`` is

* ``"tiny"``: a deterministic PixArt-architecture backbone with seeded random weights (64 px), built in
  process in about a second. It exists so that the studio, the tests and CI run with no download at all.
  Its images are noise: everything that shows them says "random-weight demo backbone".
* ``"small"``: the same, sized for benchmarks (~30 M-parameter DiT, 128 px).
* ``"demo"``: the embedded demo backbone in ``assets/demo_backbone`` (64 px, ~5 MB), trained on the 213 sample
  images by ``medart_core.demo_backbone``; loaded offline, labelled "demo backbone trained on 213 sample
  images — not a medical model" (``DEMO_LABEL``).
* a local folder in diffusers pipeline layout (``model_index.json``), e.g. one written by ``save_backbone``;
* a Hub id (default ``PixArt-alpha/PixArt-XL-2-512x512``), read from the Hugging Face cache or downloaded.

When the Hub is unreachable and the weights are not cached, ``MissingWeightsError`` says what to download
or set. ``HF_HUB_OFFLINE=1`` makes the loader look only at the cache, so it never waits on a network.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .constants import DEMO_LABEL, MAX_TOKENS
from .errors import ConfigError, MissingWeightsError
from .hub import hub_reachable, is_offline, looks_like_hub_id

if TYPE_CHECKING:  # heavy imports stay lazy so `python app.py` and the CLI start fast
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5TokenizerFast

DEFAULT_BACKBONE = "PixArt-alpha/PixArt-XL-2-512x512"
RANDOM_LABEL = "random-weight demo backbone"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_FILE = ASSETS / "tokenizer" / "tokenizer.json"
DEMO_SPEC = "demo"
DEMO_DIR = ASSETS / "demo_backbone"

# DPM-Solver++ as PixArt-XL-2-512x512 ships it (scheduler/scheduler_config.json on the Hub).
PIXART_SCHEDULER_CONFIG: dict[str, Any] = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "use_karras_sigmas": False,
    "euler_at_final": False,
    "variance_type": None,
    "trained_betas": None,
}


@dataclass(frozen=True)
class TinyPreset:
    """Sizes of an offline random-weight backbone. Real PixArt-XL-2: 28 blocks, 16 heads x 72, T5-XXL d=4096."""

    resolution: int
    dit_layers: int
    dit_heads: int
    dit_head_dim: int
    t5_d_model: int
    t5_layers: int
    t5_heads: int
    t5_d_ff: int
    vae_channels: tuple[int, ...]
    vae_groups: int
    seed: int = 0


PRESETS: dict[str, TinyPreset] = {
    "tiny": TinyPreset(resolution=64, dit_layers=2, dit_heads=2, dit_head_dim=16, t5_d_model=32, t5_layers=2,
                       t5_heads=4, t5_d_ff=64, vae_channels=(8, 16, 16, 16), vae_groups=4),
    # ~30 M-parameter DiT (12 blocks, hidden 384) at 128 px: large enough that step timings mean something.
    # Its T5 (~27 M) is about as large as the DiT: in PixArt-XL-2 T5 is ~8x the DiT, so a T5 of a tenth of the
    # DiT would make text encoding look free and misstate what caching and reloading cost.
    "small": TinyPreset(resolution=128, dit_layers=12, dit_heads=6, dit_head_dim=64, t5_d_model=512, t5_layers=8,
                        t5_heads=8, t5_d_ff=1536, vae_channels=(32, 64, 64, 64), vae_groups=16),
}


@dataclass
class Backbone:
    """The PixArt-α components that the library trains and samples with."""

    spec: str
    tokenizer: "T5TokenizerFast"
    text_encoder: "T5EncoderModel"
    vae: "AutoencoderKL"
    transformer: "PixArtTransformer2DModel"
    scheduler: "DPMSolverMultistepScheduler"
    resolution: int
    is_random: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How the UI names this backbone; random-weight ones always say so, the demo one says what it is."""
        if self.extra.get("label"):
            return str(self.extra["label"])
        return f"{self.spec} ({RANDOM_LABEL})" if self.is_random else self.spec

    @property
    def vae_scale_factor(self) -> int:
        from .pixart import vae_scale_factor

        return vae_scale_factor(self.vae)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def to(self, device: "torch.device | str | None" = None, dtype: "torch.dtype | None" = None) -> "Backbone":
        import torch

        for m in (self.text_encoder, self.vae, self.transformer):
            m.to(device=device, dtype=dtype)
            if dtype is not None and dtype != torch.float32:
                # Trainable adapters stay fp32 on a low-precision backbone (optimizer updates need the bits).
                for name, p in m.named_parameters():
                    if "lora_" in name:
                        p.data = p.data.float()
        return self

    def pipeline(self) -> "PixArtAlphaPipeline":
        """A stock diffusers pipeline over these very components (no copies)."""
        from diffusers import PixArtAlphaPipeline

        return PixArtAlphaPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                                   transformer=self.transformer, scheduler=self.scheduler)


# --------------------------------------------------------------------------------------------------------
# tokenizer


def _tiny_tokenizer() -> "T5TokenizerFast":
    from transformers import T5TokenizerFast

    if not TOKENIZER_FILE.is_file():
        raise MissingWeightsError(
            f"The tiny backbone's tokenizer {TOKENIZER_FILE} is missing. Rebuild it with "
            "`python assets/tokenizer/build_tokenizer.py` from the repository root."
        )
    return T5TokenizerFast(tokenizer_file=str(TOKENIZER_FILE), extra_ids=0, eos_token="</s>", pad_token="<pad>",
                           unk_token="<unk>", model_max_length=MAX_TOKENS)


def load_tokenizer(spec: str = "tiny") -> "T5TokenizerFast":
    """PixArt's T5 tokenizer for ``spec`` without loading any model weights (cheap)."""
    if spec in PRESETS:
        return _tiny_tokenizer()
    from transformers import AutoTokenizer

    if spec == DEMO_SPEC:
        return AutoTokenizer.from_pretrained(str(_demo_dir() / "tokenizer"), local_files_only=True)

    folder = Path(spec).expanduser()
    if folder.is_dir():
        sub = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        return AutoTokenizer.from_pretrained(str(sub))
    with _hub_errors(spec):
        return AutoTokenizer.from_pretrained(spec, subfolder="tokenizer",
                                             local_files_only=is_offline() or not hub_reachable())


def count_tokens(tokenizer: "T5TokenizerFast", text: str) -> int:
    """Number of T5 tokens PixArt would read for ``text`` (with the closing ``</s>``), before truncation."""
    return len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])


# --------------------------------------------------------------------------------------------------------
# building and loading


def _seeded(seed: int):
    """Fork the global RNG so building a model never disturbs the caller's random state."""
    import torch

    class _Ctx:
        def __enter__(self):
            self._fork = torch.random.fork_rng(devices=[])
            self._fork.__enter__()
            torch.manual_seed(seed)

        def __exit__(self, *exc):
            return self._fork.__exit__(*exc)

    return _Ctx()


def build_random_backbone(preset: str = "tiny") -> Backbone:
    """A PixArt-architecture backbone from configs with seeded random weights (same weights every call)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    if preset not in PRESETS:
        raise ConfigError(f"Unknown random backbone preset {preset!r}; choose one of {sorted(PRESETS)}.")
    p = PRESETS[preset]
    tokenizer = _tiny_tokenizer()
    with _seeded(p.seed):
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=p.t5_d_model, d_kv=p.t5_d_model // p.t5_heads, d_ff=p.t5_d_ff,
            num_layers=p.t5_layers, num_heads=p.t5_heads, relative_attention_num_buckets=8,
            relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
            is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            tie_word_embeddings=False,
        ))
    with _seeded(p.seed + 1):
        n = len(p.vae_channels)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=p.vae_channels, layers_per_block=1,
            latent_channels=4, norm_num_groups=p.vae_groups, sample_size=p.resolution, scaling_factor=0.18215,
        )
    with _seeded(p.seed + 2):
        hidden = p.dit_heads * p.dit_head_dim
        transformer = PixArtTransformer2DModel(
            num_attention_heads=p.dit_heads, attention_head_dim=p.dit_head_dim, in_channels=4, out_channels=8,
            num_layers=p.dit_layers, cross_attention_dim=hidden, caption_channels=p.t5_d_model,
            sample_size=p.resolution // 2 ** (n - 1), patch_size=2, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, use_additional_conditions=False,
        )
    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER_CONFIG)
    for m in (t5, vae, transformer):
        m.eval().requires_grad_(False)
    return Backbone(spec=preset, tokenizer=tokenizer, text_encoder=t5.to(torch.float32), vae=vae,
                    transformer=transformer, scheduler=scheduler, resolution=p.resolution, is_random=True)


class _hub_errors:
    """Turn the many ways a Hub load fails without weights into one MissingWeightsError with advice."""

    def __init__(self, spec: str):
        self.spec = spec

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, MissingWeightsError):
            return False
        if isinstance(exc, (OSError, ValueError, EnvironmentError)) or type(exc).__name__ in {
            "LocalEntryNotFoundError", "RepositoryNotFoundError", "HfHubHTTPError", "GatedRepoError",
            "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "EntryNotFoundError",
        }:
            raise MissingWeightsError(
                f"Could not load weights for {self.spec!r}: they are not in a local folder or the Hugging Face "
                f"cache, and the Hub could not be reached ({type(exc).__name__}). Either download them on a "
                f"machine with network access (`huggingface-cli download {self.spec}`) and copy the cache "
                "(HF_HOME) here, or pass a local folder in diffusers layout (with model_index.json) instead of a "
                "Hub id, or use the offline demo backbone `tiny`. Set HF_HUB_OFFLINE=1 to fail fast without a "
                "network."
            ) from exc
        return False


def load_backbone(spec: str = DEFAULT_BACKBONE, *, torch_dtype: "torch.dtype | None" = None,
                  local_files_only: bool | None = None) -> Backbone:
    """Return PixArt-α's tokenizer, T5 encoder, VAE, DiT and scheduler for ``spec`` (see module docstring)."""
    import torch

    if spec in PRESETS:
        bb = build_random_backbone(spec)
        return bb.to(dtype=torch_dtype) if torch_dtype is not None else bb
    if spec == DEMO_SPEC:
        return load_demo_backbone(torch_dtype=torch_dtype)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise MissingWeightsError(
                f"{folder} is not a diffusers pipeline folder (no model_index.json). Point to a folder saved with "
                "`save_backbone`/`save_pretrained`, or to a Hub id such as PixArt-alpha/PixArt-XL-2-512x512."
            )
        return _load_pipeline_parts(str(folder), spec, torch_dtype or torch.float32, local_files_only=True)
    if not looks_like_hub_id(spec, require_owner=True):  # a backbone's Hub id is always owner/name
        raise MissingWeightsError(
            f"Backbone {spec!r} is neither 'tiny', 'small', an existing folder, nor a Hub id (owner/name). "
            "Check the path, or set MEDART_BACKBONE / --backbone."
        )
    if local_files_only is None:
        local_files_only = is_offline() or not hub_reachable()
    with _hub_errors(spec):
        return _load_pipeline_parts(spec, spec, torch_dtype or torch.float32, local_files_only=local_files_only)


def _demo_dir() -> Path:
    if not (DEMO_DIR / "model_index.json").is_file():
        raise MissingWeightsError(
            f"The demo backbone is missing from {DEMO_DIR}. Rebuild it (about 20 minutes on 2 CPU cores) with "
            "`python -m medart_core demo-backbone build --out assets/demo_backbone` from the repository root, "
            "or use the random-weight backbone `tiny`."
        )
    return DEMO_DIR


def load_demo_backbone(*, torch_dtype: "torch.dtype | None" = None) -> Backbone:
    """The embedded demo backbone (``assets/demo_backbone``), offline, with its label and manifest path."""
    import torch

    folder = _demo_dir()
    bb = _load_pipeline_parts(str(folder), DEMO_SPEC, torch_dtype or torch.float32, local_files_only=True)
    bb.is_random = False
    bb.extra.update({"label": DEMO_LABEL, "manifest": str(folder / "MANIFEST.json"), "folder": str(folder)})
    return bb


def _load_pipeline_parts(source: str, spec: str, dtype: "torch.dtype", *, local_files_only: bool) -> Backbone:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    kw = dict(local_files_only=local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    text_encoder = T5EncoderModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kw)
    transformer = PixArtTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype, **kw)
    scheduler = DPMSolverMultistepScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    for m in (text_encoder, vae, transformer):
        m.eval().requires_grad_(False)
    from .pixart import vae_scale_factor

    resolution = int(transformer.config.sample_size) * vae_scale_factor(vae)
    is_random = False
    meta = Path(source) / "medart_backbone.json"
    if meta.is_file():  # a saved tiny/small backbone keeps its label
        import json

        is_random = bool(json.loads(meta.read_text()).get("is_random", False))
    return Backbone(spec=spec, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                    scheduler=scheduler, resolution=resolution, is_random=is_random)


def save_backbone(backbone: Backbone, folder: str | os.PathLike) -> Path:
    """Write the backbone in diffusers pipeline layout (safetensors), loadable by stock PixArtAlphaPipeline."""
    import json

    folder = Path(folder)
    backbone.pipeline().save_pretrained(str(folder), safe_serialization=True)
    (folder / "medart_backbone.json").write_text(json.dumps(
        {"spec": backbone.spec, "is_random": backbone.is_random, "resolution": backbone.resolution}, indent=2))
    return folder
