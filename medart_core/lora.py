"""LoRA on PixArt-α's DiT and T5 (Med-Art §2.2): attach, state dicts, PEFT adapter folders, merged export.

Everything but the LoRA matrices stays frozen. Adapters are injected in place with peft, so the backbone's
``transformer`` and ``text_encoder`` keep their diffusers/transformers classes and the stock pipeline runs
over them unchanged. Files are safetensors + JSON only (no pickle).

Folder layouts written here:
- ``save_adapters(bb, folder)``: ``folder/transformer/`` and ``folder/text_encoder/``, each a standard PEFT
  adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``, keys ``base_model.model.…``,
  the layout ``PeftModel.save_pretrained`` writes). Load with ``PeftModel.from_pretrained(model, sub)``
  (diffusers 0.42's PixArtTransformer2DModel has no ``load_lora_adapter``; peft is the loader for both).
- ``export_merged(bb, folder)``: a full diffusers pipeline folder (``model_index.json``) with LoRA merged,
  loadable by ``PixArtAlphaPipeline.from_pretrained(folder)``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .config import JsonConfig
from .errors import ConfigError, NotFoundError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# The paper's target lists (PixArt's LoRA recipe). Not every name exists in every model: PixArt-α has no
# proj_in, and T5 v1.1 (gated-GELU) splits ``wi`` into ``wi_0``/``wi_1``; see :func:`resolve_targets`.
PAPER_DIT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "proj", "linear", "linear_1", "linear_2")
PAPER_T5_TARGETS = ("q", "k", "v", "o", "wi", "wo")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_PARTS = {"dit": "transformer", "t5": "text_encoder"}  # state-dict key -> Backbone attribute / folder name


@dataclass
class LoRAConfig(JsonConfig):
    """LoRA hyper-parameters (defaults = the paper: rank 8 on the DiT and on T5). JSON round trip."""

    CONFIG_NAME: ClassVar[str] = "LoRA config"

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    dit_targets: list[str] = field(default_factory=lambda: list(PAPER_DIT_TARGETS))
    t5_enabled: bool = True
    t5_targets: list[str] = field(default_factory=lambda: list(PAPER_T5_TARGETS))
    t5_rank: int | None = None  # None: same as ``rank``
    use_dora: bool = False  # the paper's ablation: DoRA instead of LoRA (worse FID)

    def __post_init__(self) -> None:
        if int(self.rank) < 1 or (self.t5_rank is not None and int(self.t5_rank) < 1):
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank} / {self.t5_rank}.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if not self.dit_targets:
            raise ConfigError("dit_targets is empty: name at least one DiT layer for LoRA.")
        self.dit_targets = list(self.dit_targets)
        self.t5_targets = list(self.t5_targets)


@dataclass
class LoRAReport:
    """Which requested target names matched which layer names, per model (from :func:`attach_lora`)."""

    dit: dict[str, list[str]]  # requested name -> concrete suffixes it matched ([] = not in this model)
    t5: dict[str, list[str]]
    n_trainable: int
    n_frozen: int

    def summary(self) -> str:
        def part(d: dict[str, list[str]]) -> str:
            return ", ".join(f"{k}->{'/'.join(v)}" if v and v != [k] else (k if v else f"{k}(none)")
                             for k, v in d.items())
        t5 = part(self.t5) if self.t5 else "off"
        return (f"LoRA DiT: {part(self.dit)}; T5: {t5}; trainable {self.n_trainable:,} "
                f"of {self.n_trainable + self.n_frozen:,} parameters")


def _adaptable(module: Any) -> bool:
    import torch

    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def resolve_targets(model: Any, requested: list[str]) -> dict[str, list[str]]:
    """Map each requested target to the module-name suffixes it matches among Linear/Conv2d layers.

    A name matches a layer whose dotted name ends with it (peft's rule). When nothing ends with ``name``,
    ``name_0``, ``name_1``, … are tried, so T5's ``wi`` covers the gated ``wi_0``/``wi_1`` of T5 v1.1.
    """
    names = [n for n, m in model.named_modules() if n and _adaptable(m)]

    def hits(suffix: str) -> bool:
        return any(n == suffix or n.endswith("." + suffix) for n in names)

    out: dict[str, list[str]] = {}
    for req in requested:
        if hits(req):
            out[req] = [req]
            continue
        pat = re.compile(rf"(?:^|\.)({re.escape(req)}_\d+)$")
        out[req] = sorted({m.group(1) for n in names if (m := pat.search(n))})
    return out


def _inject(model: Any, targets: dict[str, list[str]], rank: int, cfg: LoRAConfig) -> Any:
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    suffixes = sorted({s for v in targets.values() for s in v})
    lcfg = LoraConfig(r=int(rank), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout),
                      target_modules=suffixes, use_dora=bool(cfg.use_dora), init_lora_weights=True)
    inject_adapter_in_model(lcfg, model)
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        if is_lora and p.dtype != torch.float32:
            # Optimiser maths on bf16 LoRA weights loses small updates; peft casts activations per layer.
            p.data = p.data.float()
    return lcfg


def attach_lora(backbone: Any, cfg: LoRAConfig | None = None) -> Any:
    """Inject LoRA (rank ``cfg.rank``) into the DiT and, if enabled, T5; freeze everything else.

    Raises ConfigError when no requested target exists in a model, or when LoRA is already attached.
    Returns the same backbone; the match report is ``backbone.extra["lora_report"]`` (see LoRAReport)
    and the config ``backbone.extra["lora_config"]``.
    """
    cfg = cfg or LoRAConfig()
    if "lora_config" in backbone.extra:
        raise ConfigError("LoRA is already attached to this backbone; load a fresh backbone to change it.")
    for m in (backbone.transformer, backbone.text_encoder, backbone.vae):
        m.requires_grad_(False)
    dit = resolve_targets(backbone.transformer, cfg.dit_targets)
    if not any(dit.values()):
        raise ConfigError(f"None of the DiT LoRA targets {cfg.dit_targets} matches a Linear/Conv2d layer of "
                          f"{type(backbone.transformer).__name__}; check dit_targets.")
    peft_cfgs = {"dit": _inject(backbone.transformer, dit, cfg.rank, cfg)}
    t5: dict[str, list[str]] = {}
    if cfg.t5_enabled:
        t5 = resolve_targets(backbone.text_encoder, cfg.t5_targets)
        if not any(t5.values()):
            raise ConfigError(f"None of the T5 LoRA targets {cfg.t5_targets} matches a layer of the text "
                              "encoder; check t5_targets or set t5_enabled false.")
        peft_cfgs["t5"] = _inject(backbone.text_encoder, t5, cfg.t5_rank or cfg.rank, cfg)
    n_tr = sum(p.numel() for m in (backbone.transformer, backbone.text_encoder) for p in m.parameters()
               if p.requires_grad)
    n_fr = sum(p.numel() for m in (backbone.transformer, backbone.text_encoder, backbone.vae)
               for p in m.parameters() if not p.requires_grad)
    backbone.extra["lora_config"] = cfg
    backbone.extra["peft_configs"] = peft_cfgs
    backbone.extra["lora_report"] = LoRAReport(dit=dit, t5=t5, n_trainable=n_tr, n_frozen=n_fr)
    return backbone


def trainable_parameters(backbone: Any) -> list[torch.nn.Parameter]:
    """The parameters an optimiser should see (the LoRA matrices), DiT first then T5, in a stable order."""
    return [p for m in (backbone.transformer, backbone.text_encoder) for p in m.parameters() if p.requires_grad]


def _require_lora(backbone: Any) -> dict[str, Any]:
    cfgs = backbone.extra.get("peft_configs")
    if not cfgs:
        raise ConfigError("This backbone has no LoRA attached; call attach_lora(backbone, cfg) first.")
    return cfgs


def lora_state_dict(backbone: Any) -> dict[str, dict[str, torch.Tensor]]:
    """LoRA weights as ``{"dit": {...}, "t5": {...}}`` (CPU copies; keys as peft names them, no adapter
    name). ``"t5"`` is present only when T5 has LoRA."""
    from peft import get_peft_model_state_dict

    out: dict[str, dict[str, torch.Tensor]] = {}
    for part in _require_lora(backbone):
        model = getattr(backbone, _PARTS[part])
        out[part] = {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(model).items()}
    return out


def load_lora_state_dict(backbone: Any, sd: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Load weights from :func:`lora_state_dict` into an attached backbone; every key must be used and
    every LoRA tensor covered (ConfigError otherwise, so a resume can never silently drop adapters)."""
    from peft import set_peft_model_state_dict

    cfgs = _require_lora(backbone)
    if set(sd) != set(cfgs):
        raise ConfigError(f"LoRA state has parts {sorted(sd)} but the backbone has LoRA on {sorted(cfgs)}; "
                          "attach LoRA with the same LoRAConfig as the checkpoint.")
    for part, tensors in sd.items():
        model = getattr(backbone, _PARTS[part])
        expected = {k for k in _lora_keys(model)}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
            raise ConfigError(f"LoRA state for {part} does not match the attached adapters "
                              f"(missing e.g. {missing}, unexpected e.g. {extra}); check the LoRA config.")
        res = set_peft_model_state_dict(model, dict(tensors))
        if res.unexpected_keys:
            raise ConfigError(f"LoRA state for {part} had unexpected keys {res.unexpected_keys[:3]}.")


def _lora_keys(model: Any) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model).keys())


def save_adapters(backbone: Any, folder: str | Path) -> Path:
    """Write one PEFT adapter folder per LoRA'd model: ``folder/transformer`` and ``folder/text_encoder``.

    Each holds ``adapter_model.safetensors`` (keys prefixed ``base_model.model.`` as PeftModel saves them)
    and ``adapter_config.json``; stock ``PeftModel.from_pretrained(fresh_model, subfolder)`` loads them.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    cfgs = _require_lora(backbone)
    sd = lora_state_dict(backbone)
    for part, lcfg in cfgs.items():
        sub = folder / _PARTS[part]
        sub.mkdir(parents=True, exist_ok=True)
        model = getattr(backbone, _PARTS[part])
        # Only a Hub id is worth recording: peft looks a recorded name up on the Hub when loading, and
        # "tiny" or a folder path would send it to the network for nothing.
        from .hub import looks_like_hub_id

        spec = str(backbone.spec)
        is_hub = looks_like_hub_id(spec, require_owner=True) and not Path(spec).exists()
        lcfg.base_model_name_or_path = spec if is_hub else None
        lcfg.save_pretrained(str(sub))
        tensors = {_PEFT_PREFIX + k: v.contiguous() for k, v in sd[part].items()}
        save_file(tensors, str(sub / ADAPTER_WEIGHTS), metadata={"format": "pt", "model": type(model).__name__})
    (folder / "medart_lora.json").write_text(backbone.extra["lora_config"].to_json())
    return folder


def load_adapters(backbone: Any, folder: str | Path) -> Any:
    """Attach LoRA from a :func:`save_adapters` folder to a fresh backbone (config from medart_lora.json)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = folder / "medart_lora.json"
    if not meta.is_file():
        raise NotFoundError(f"{folder} is not a Med-Art adapter folder (no medart_lora.json).")
    attach_lora(backbone, LoRAConfig.from_json(meta.read_text()))
    sd = {}
    for part in backbone.extra["peft_configs"]:
        raw = load_file(str(folder / _PARTS[part] / ADAPTER_WEIGHTS))
        sd[part] = {k.removeprefix(_PEFT_PREFIX): v for k, v in raw.items()}
    load_lora_state_dict(backbone, sd)
    return backbone


def _merged_copy(model: Any) -> Any:
    """A deep copy of ``model`` with every LoRA layer merged into its base weight and unwrapped."""
    import copy

    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, module.get_base_layer())
    merged.requires_grad_(False)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        try:
            delattr(merged, attr)
        except AttributeError:
            pass    # not set on this instance (diffusers' class default, or no adapter config recorded)
    return merged


def export_merged(backbone: Any, folder: str | Path, *, card: str | None = None) -> Path:
    """Write a full diffusers pipeline folder with LoRA merged into the DiT (and T5 when it has LoRA).

    The live backbone is not modified (merging happens on copies, so peak memory is about one extra
    copy of the LoRA'd models). ``card`` (``model_card.build_model_card``'s) is written as README.md.
    """
    from dataclasses import replace

    from .backbone import save_backbone

    cfgs = _require_lora(backbone)
    merged = replace(backbone, transformer=_merged_copy(backbone.transformer),
                     text_encoder=_merged_copy(backbone.text_encoder) if "t5" in cfgs else backbone.text_encoder,
                     extra={})
    folder = Path(folder)
    save_backbone(merged, folder)
    if card is not None:
        (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


