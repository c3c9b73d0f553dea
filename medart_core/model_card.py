"""The Hugging Face model card (``README.md``) of a model export: YAML front matter the Hub reads
(``base_model`` only for a real Hub id, ``library_name``, ``pipeline_tag``, ``tags``, ``license``), then the
training config, HLDF settings, a data summary without identifiers (no file names, patient ids or caption
text), the stored evaluation figures of the exported weights, and how to load it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

OFFLINE_BASE = "tiny/demo (random or demo weights, not a real model)"
TAGS = ("text-to-image", "diffusers", "lora", "pixart-alpha", "medical", "med-art", "hldf")
RESEARCH_ONLY = "**Research use only, not for diagnosis or clinical decisions.**"
# The licences the sample data's sources state (assets/sample_data/LICENSES.md); tiny/demo weights are the
# project's own, trained (demo) on those images only.
SAMPLE_DATA_LICENCES = ("MIT (pydicom, pydicom-data), GDCM's BSD-style notice (two pydicom-data files), "
                        "CC0 / no known copyright restrictions (scikit-image sample images)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_base_model(backbone: str) -> str | None:
    """The backbone's Hub id, or None when it is an offline one (tiny, small, demo, a local folder)."""
    if backbone in ("tiny", "small", "demo") or Path(backbone).expanduser().exists():
        return None
    return backbone if _HUB_ID.match(backbone) else None


def base_licence(base: str | None) -> tuple[str, str]:
    """(``license`` front-matter value, one sentence for the body)."""
    if base is None:
        return "other", (f"the project's tiny/demo weights; the demo backbone was trained on the sample data, "
                         f"whose sources state: {SAMPLE_DATA_LICENCES} (assets/sample_data/LICENSES.md)")
    if "pixart" in base.lower():
        return "openrail++", f"the base model's licence (PixArt-α, `{base}`): CreativeML Open RAIL++-M"
    return "other", f"the base model's licence: see `{base}` on the Hub"


def data_summary(ws: Any, dataset: str, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Dataset name, image counts, classes with their counts, modality and caption status: counts only,
    never a file name, key or caption (the store's view at export time; training counts from provenance)."""
    out: dict[str, Any] = {"dataset": dataset, "n_train_images": provenance.get("n_train_images"),
                           "n_validation_images": provenance.get("n_validation_images")}
    src = str(provenance.get("captions_source") or "")
    out["captions"] = src if src in ("approved", "latest") else ("an exported caption folder" if src else None)
    if ws is None:
        return out
    from .captions import CaptionStore

    store = CaptionStore.for_workspace(ws)
    if not store.has_dataset(dataset):
        return out
    info = store.dataset_info(dataset)
    out.update(modality=info.modality, n_images=info.n_images, caption_status=dict(info.status_counts),
               classes={c: store.count_images(dataset, label=c) for c in store.labels(dataset)})
    return out


def checkpoint_evaluations(ws: Any, adapters_sha256: str) -> list[dict[str, Any]]:
    """The stored evaluations (W/evaluations/) of exactly these weights (matched by the adapters file's
    sha256, so ``RUN``, ``RUN@STEP`` and ``:ema`` references all find theirs), newest per profile."""
    if ws is None:
        return []
    from .evaluate import PER_RESULT, load_results

    newest: dict[str, Any] = {}
    for r in load_results(ws):
        if r.profile.get("checkpoint_sha256") != adapters_sha256:
            continue
        pid = profile_id(r.profile, PER_RESULT)
        if pid not in newest or str(r.profile.get("created_at", "")) > str(newest[pid].profile.get("created_at", "")):
            newest[pid] = r
    return [{"id": r.id, "profile_id": pid, "profile": r.profile, "overall": r.metrics.get("overall", {})}
            for pid, r in sorted(newest.items())]


def profile_id(profile: Mapping[str, Any], per_result: Sequence[str]) -> str:
    """A short id of an evaluation protocol: sha256 of the profile without its per-result fields."""
    from .fileio import sha256_bytes

    body = {k: v for k, v in profile.items() if k not in per_result}
    return sha256_bytes(json.dumps(body, sort_keys=True, default=str).encode())[:12]


def front_matter(meta: Mapping[str, Any]) -> list[str]:
    """Flat YAML (``key: value`` and ``- item`` lists), values JSON-quoted so any YAML reader agrees."""
    lines = ["---"]
    for k, v in meta.items():
        if isinstance(v, (list, tuple)):
            lines += [f"{k}:"] + [f"- {json.dumps(str(x))}" for x in v]
        else:
            lines.append(f"{k}: {json.dumps(str(v))}")
    return lines + ["---"]


def _fmt(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def _evaluation_lines(evaluations: Sequence[Mapping[str, Any]]) -> list[str]:
    if not evaluations:
        return ["No stored evaluation of these weights (run `python -m medart_core evaluate` and export again).", ""]
    lines = ["| FD (95 % bootstrap CI) | KID ± std | extractor | real / generated | profile | evaluation |",
             "|---|---|---|---|---|---|"]
    for e in evaluations:
        o, p = e["overall"], e["profile"]
        ci = o.get("fd_ci")
        fd = _fmt(o.get("fd")) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
        lines.append(f"| {fd} | {_fmt(o.get('kid'))} ± {_fmt(o.get('kid_std'))} | {p.get('extractor', '?')} | "
                     f"{p.get('n_real', '?')} / {p.get('n_generated', '?')} | `{e['profile_id']}` | `{e['id']}` |")
    return lines + ["", "Figures on the workspace's evaluation set (small sets give wide intervals).", ""]


def _config_lines(cfg: Any, provenance: Mapping[str, Any], weights: str) -> list[str]:
    lo, h, ema = cfg.lora, cfg.hldf, cfg.ema
    t5 = (f"rank {lo.t5_rank or lo.rank} on {', '.join(lo.t5_targets)}" if lo.t5_enabled else "frozen")
    cw = h.color_weight if h.color_weight is not None else f"1/M = {1 / max(1, int(h.sample_steps)):.4g}"
    ema_txt = (f"decay {ema.decay}, warm-up {ema.warmup}" if ema.decay else "off")
    if ema.posthoc:
        ema_txt += f"; post-hoc EMA σ_rel {', '.join(str(s) for s in ema.sigma_rels)}"
    grad = h.grad_path + (f" (last {h.truncated_k} steps)" if h.grad_path == "truncated" else "")
    return [f"- Adapter: {'DoRA' if lo.use_dora else 'LoRA'} rank {lo.rank}, alpha {lo.alpha}, dropout {lo.dropout} "
            f"on the DiT ({', '.join(lo.dit_targets)}); T5: {t5}",
            f"- HLDF: a pixel-level step every {h.pixel_every} steps (N), {h.sample_steps} DPM-Solver++ sample steps "
            f"(M), guidance {h.guidance}, gradient path {grad}; loss = latent ε-loss + {cw} × colour-moment loss "
            f"({h.color_variant})",
            f"- Optimiser {provenance.get('optimizer', cfg.optimizer)}, lr {cfg.lr}, batch {cfg.batch_size} × "
            f"accumulation {cfg.grad_accum}, resolution {provenance.get('resolution', cfg.resolution)} px, seed {cfg.seed}"
            + (f", min-SNR-γ {cfg.snr_gamma}" if cfg.snr_gamma else ""),
            f"- Precision: {provenance.get('precision') or cfg.precision or 'default'}",
            f"- EMA: {ema_txt}. **Exported weights: {weights}**"
            + (" (the raw trained adapters)" if weights == "raw" else " (the averaged adapters)"), ""]


def _data_lines(data: Mapping[str, Any]) -> list[str]:
    lines = [f"- Dataset: `{data['dataset']}`" + (f", modality {data['modality']}" if data.get("modality") else "")]
    if data.get("n_images") is not None:
        lines.append(f"- Images in the dataset: {data['n_images']}")
    lines.append(f"- Used in training: {_fmt(data.get('n_train_images'))} train, "
                 f"{_fmt(data.get('n_validation_images'))} held out for validation")
    if data.get("classes"):
        lines.append("- Classes: " + ", ".join(f"{c} ({n})" for c, n in sorted(data["classes"].items())))
    if data.get("captions"):
        lines.append(f"- Captions trained on: {data['captions']}")
    if data.get("caption_status"):
        lines.append("- Caption review status: " + ", ".join(f"{k} {v}" for k, v in sorted(data["caption_status"].items())))
    return lines + ["- No file names, patient identifiers or caption texts are included in this card.", ""]


def _usage_lines(base: str | None) -> list[str]:
    src = base or "<the base pipeline folder>"
    return ["```python", "import torch", "from diffusers import PixArtAlphaPipeline", "from peft import PeftModel", "",
            "# merged pipeline (folder `merged/`):", 'pipe = PixArtAlphaPipeline.from_pretrained("<this repo>", '
            'subfolder="merged")', "# or the PEFT adapters on the base model (folder `adapters/`):",
            f'pipe = PixArtAlphaPipeline.from_pretrained("{src}")',
            'pipe.transformer = PeftModel.from_pretrained(pipe.transformer, "<this repo>", '
            'subfolder="adapters/transformer")',
            'image = pipe("an endoscopic image of a polyp", num_inference_steps=20).images[0]', "```", ""]


def build_model_card(*, cfg: Any, provenance: Mapping[str, Any], step: int, is_random: bool,
                     weights: str = "raw", data: Mapping[str, Any] | None = None,
                     evaluations: Sequence[Mapping[str, Any]] = ()) -> str:
    """The README.md of an export (see the module docstring)."""
    base = hub_base_model(cfg.backbone)
    licence, licence_text = base_licence(base)
    meta: dict[str, Any] = {"base_model": base} if base else {}
    meta.update(library_name="diffusers", pipeline_tag="text-to-image", tags=list(TAGS), license=licence)
    if base is None:
        meta["license_name"] = "med-art-demo-and-sample-data"
    base_txt = f"`{base}`" if base else OFFLINE_BASE
    lines = front_matter(meta) + ["", f"# Med-Art fine-tune of {base_txt}", "", RESEARCH_ONLY, ""]
    if is_random:
        lines += ["> **Random-weight demo backbone.** Trained on top of randomly initialised weights for "
                  "testing; its images are noise and carry no meaning.", ""]
    elif base is None:
        lines += [f"> Base: `{cfg.backbone}`, an offline backbone ({OFFLINE_BASE}); not a released model.", ""]
    lines += ["## What it is", "",
              ("LoRA adapters (and a merged diffusers pipeline) for PixArt-α, fine-tuned with Med-Art's Hybrid-Level "
               "Diffusion Fine-tuning (latent ε-loss plus a pixel-level colour-moment loss; arXiv 2506.20449) for "
               "research on generating medical images. Generated images may show plausible but false findings "
               "and must never be presented as real patient data."), "",
              f"- Checkpoint: `{provenance.get('checkpoint', '?')}`, {step} optimiser steps", "",
              "## Training configuration", ""] + _config_lines(cfg, provenance, weights)
    lines += ["## Data", ""] + _data_lines(data or {"dataset": cfg.dataset})
    lines += ["## Evaluation", ""] + _evaluation_lines(evaluations)
    lines += ["## How to load", ""] + _usage_lines(base)
    lines += ["## Licence", "", f"`{licence}`: {licence_text}.", ""]
    return "\n".join(lines)


def upload_commands(folder: str | Path, name: str) -> list[str]:
    """The commands that publish an export folder (printed, never run): older and newer Hub CLIs."""
    return [f"huggingface-cli upload <your-namespace>/{name} {folder} .", f"hf upload <your-namespace>/{name} {folder} ."]
