"""Prompt templates for the Visual Symptom Generator, one per imaging modality.

A template is plain ``str.format`` text with two placeholders: ``{seed}`` (the class-seeded caption the
answer must start with) and ``{class}`` (the humanised class name). Each template also lists the visual
*feature phrases* it asks about; the VSG uses that list to reject answers that merely echo it back
(Med-Art's VSG redraws such answers).

The user can edit the templates of a dataset; they live at ``ws.prompts_path(dataset)`` as JSON::

    {"version": 1, "templates": {"endoscopy": {"template": "...", "features": ["...", ...]}, ...}}

Modalities absent from the file fall back to the built-in defaults, and a missing file means "all
defaults". A file that exists but is broken raises ``ConfigError`` rather than silently falling back,
so an edit that went wrong is never mistaken for the defaults.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .fileio import atomic_write_text

PROMPTS_FILE_VERSION = 1
KNOWN_PLACEHOLDERS = ("seed", "class")
MAX_TEMPLATE_CHARS = 4000

# Imaging modalities the studio knows about. Anything else is treated as "generic".
MODALITIES = ("endoscopy", "dermoscopy", "radiology", "ct", "mr", "xray", "ultrasound", "histology",
              "fundus", "generic")
# CT, MR, X-ray and ultrasound share the radiology prompt: the visual vocabulary (density/intensity,
# margins, location) is the same across cross-sectional and projection imaging.
_PROMPT_FAMILY = {"ct": "radiology", "mr": "radiology", "xray": "radiology", "ultrasound": "radiology"}


@dataclass
class PromptTemplate:
    """One editable prompt: ``template`` with ``{seed}``/``{class}``, and the feature phrases it asks about."""

    modality: str
    template: str
    features: list[str] = field(default_factory=list)

    def validate(self) -> "PromptTemplate":
        """Raise ``ConfigError`` unless the template is usable; returns self for chaining."""
        if not isinstance(self.template, str) or not self.template.strip():
            raise ConfigError(f"The {self.modality} prompt template is empty: write the instruction for the VLM, "
                              "including {seed}.")
        if len(self.template) > MAX_TEMPLATE_CHARS:
            raise ConfigError(f"The {self.modality} prompt template is {len(self.template)} characters; keep it "
                              f"under {MAX_TEMPLATE_CHARS}.")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as e:  # unbalanced braces
            raise ConfigError(f"The {self.modality} prompt template has unbalanced braces ({e}); write literal "
                              "braces as '{{' and '}}'.") from None
        unknown = sorted({f for f in fields if f not in KNOWN_PLACEHOLDERS})
        if unknown:
            raise ConfigError(
                f"The {self.modality} prompt template uses unknown placeholder(s) "
                f"{', '.join('{' + u + '}' for u in unknown)}; only {{seed}} and {{class}} are filled in.")
        if "seed" not in fields:
            raise ConfigError(f"The {self.modality} prompt template must contain {{seed}}: the answer has to "
                              "start with the seed caption, so the VLM must be shown it.")
        if not isinstance(self.features, list) or not all(isinstance(f, str) and f.strip() for f in self.features):
            raise ConfigError(f"The {self.modality} prompt's features must be a list of non-empty phrases.")
        return self

    def render(self, seed: str, class_name: str) -> str:
        return self.template.format(**{"seed": seed, "class": class_name})

    def to_dict(self) -> dict:
        return {"template": self.template, "features": list(self.features)}


def _features_sentence(features: list[str]) -> str:
    return ", ".join(features[:-1]) + ", and " + features[-1] if len(features) > 1 else features[0]


def _make(modality: str, subject: str, features: list[str]) -> PromptTemplate:
    # Our own wording of the paper's structure: seed first, then the feature request, then the two rules
    # (start with the seed, stay under 100 words) the VSG checks afterwards.
    text = (
        "{seed}\n"
        f"Describe this {subject} of {{class}} by its visual features: {_features_sentence(features)}. "
        "Write one short paragraph in plain sentences, not a list. Your answer must begin with exactly "
        "\"{seed}\" and be no longer than 100 words."
    )
    return PromptTemplate(modality, text, list(features))


_DEFAULTS: dict[str, PromptTemplate] = {
    "endoscopy": _make("endoscopy", "endoscopic image",
                       ["specific colour", "shape", "surrounding mucosa", "surface texture",
                        "bleeding condition", "other relevant details"]),
    "dermoscopy": _make("dermoscopy", "dermoscopic image",
                        ["colour", "border", "asymmetry", "texture", "structures such as dots, globules or "
                         "streaks", "surrounding skin", "other relevant details"]),
    "radiology": _make("radiology", "radiological image",
                       ["anatomical location", "shape", "size", "density or intensity", "margins",
                        "surrounding tissue", "other relevant details"]),
    "histology": _make("histology", "histology image",
                       ["tissue architecture", "cell shape", "nuclear features", "staining pattern",
                        "texture", "other relevant details"]),
    "fundus": _make("fundus", "fundus photograph",
                    ["optic disc", "blood vessels", "macula", "lesions such as haemorrhages or exudates",
                     "colour", "other relevant details"]),
    "generic": _make("generic", "medical image",
                     ["colour", "shape", "texture", "location", "surrounding tissue", "other relevant details"]),
}


def normalise_modality(modality: str | None) -> str:
    m = (modality or "generic").strip().lower()
    return m if m in MODALITIES else "generic"


def default_prompt(modality: str | None) -> PromptTemplate:
    """The built-in template for a modality (a fresh copy, safe to edit)."""
    m = normalise_modality(modality)
    base = _DEFAULTS[_PROMPT_FAMILY.get(m, m)]
    return PromptTemplate(m, base.template, list(base.features))


def default_prompts() -> dict[str, PromptTemplate]:
    return {m: default_prompt(m) for m in MODALITIES}


def _parse_file(path: Path) -> dict[str, PromptTemplate]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"Cannot read the prompt templates at {path} ({e}); fix the JSON or delete the file "
                          "to go back to the defaults.") from None
    templates = raw.get("templates") if isinstance(raw, dict) else None
    if not isinstance(templates, dict):
        raise ConfigError(f"{path} must hold {{\"templates\": {{modality: {{\"template\": ..., \"features\": "
                          "[...]}}}}}; fix it or delete the file to go back to the defaults.")
    out: dict[str, PromptTemplate] = {}
    for modality, entry in templates.items():
        if normalise_modality(modality) != modality:
            raise ConfigError(f"{path}: unknown modality {modality!r}; use one of {', '.join(MODALITIES)}.")
        if not isinstance(entry, dict) or "template" not in entry:
            raise ConfigError(f"{path}: the {modality} entry needs a \"template\" string.")
        out[modality] = PromptTemplate(modality, entry["template"], list(entry.get("features", []))).validate()
    return out


def load_prompts(ws, dataset: str) -> dict[str, PromptTemplate]:
    """All templates for a dataset: the defaults, overridden by the dataset's prompts file if there is one."""
    prompts = default_prompts()
    path = ws.prompts_path(dataset)
    if path.exists():
        prompts.update(_parse_file(path))
    return prompts


def load_prompt(ws, dataset: str, modality: str | None) -> PromptTemplate:
    return load_prompts(ws, dataset)[normalise_modality(modality)]


def save_prompts(ws, dataset: str, prompts: dict[str, PromptTemplate] | list[PromptTemplate]) -> Path:
    """Validate and store templates for a dataset (merged over what the file already holds)."""
    items = list(prompts.values()) if isinstance(prompts, dict) else list(prompts)
    for p in items:
        if normalise_modality(p.modality) != p.modality:
            raise ConfigError(f"Unknown modality {p.modality!r}; use one of {', '.join(MODALITIES)}.")
        p.validate()
    path = ws.prompts_path(dataset)
    stored = _parse_file(path) if path.exists() else {}
    stored.update({p.modality: p for p in items})
    body = {"version": PROMPTS_FILE_VERSION,
            "templates": {m: p.to_dict() for m, p in sorted(stored.items())}}
    atomic_write_text(path, json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    return path


def save_prompt(ws, dataset: str, prompt: PromptTemplate) -> Path:
    return save_prompts(ws, dataset, [prompt])


def reset_prompt(ws, dataset: str, modality: str) -> Path | None:
    """Drop a dataset's override for one modality (back to the default); returns the file path or None."""
    path = ws.prompts_path(dataset)
    if not path.exists():
        return None
    stored = _parse_file(path)
    stored.pop(normalise_modality(modality), None)
    body = {"version": PROMPTS_FILE_VERSION,
            "templates": {m: p.to_dict() for m, p in sorted(stored.items())}}
    atomic_write_text(path, json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    return path
