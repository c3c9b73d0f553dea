"""The Visual Symptom Generator (VSG): machine drafts of image captions, with the paper's constraints.

Med-Art (§VSG) captions each training image by asking a VLM (LLaVA-NeXT / LLaMA-3-8B) to describe it
by a list of visual features, starting from a class-seeded caption ("An endoscopic image of polyps").
Answers that do not start with the seed, or that echo the feature list, are redrawn; long answers are
shortened with T5 ("simplify:", 4 beams, 90-120 tokens). We keep that recipe with three changes the
paper's reference code needs:

* retries are capped (``max_retries``); after the cap the least-bad attempt is kept and the image is
  flagged ``needs-second-read`` for a human, with the reasons in the draft's note;
* length is counted with PixArt's own T5 tokenizer (the one the backbone loads), not LLaMA's, because
  that is the tokenizer that truncates at 120 tokens during training;
* every draft is an event in the caption store with full provenance (source, prompt, sampling
  parameters, seed), so a draft can be reproduced, and a draft never replaces a human edit or approval.

Three drafters share one interface (:class:`Drafter`): ``template`` (the seed caption itself, the
paper's "simple caption" ablation), ``vlm`` (any transformers image-text-to-text model) and ``shorten``
(any seq2seq model). :func:`caption_dataset` runs one over a dataset, resumably.

Heavy libraries (torch, transformers) are imported inside functions: the CLI imports this module at
start-up.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .constants import MAX_TOKENS, PAPER_BACKBONE
from .errors import ConfigError, ConflictError, InvalidImageError, MedArtError, MissingWeightsError
from .hub import is_offline, looks_like_hub_id
from .prompts import PromptTemplate, default_prompt, load_prompt, normalise_modality
from .seeds import derive_seed

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .captions import CaptionEvent, CaptionState, CaptionStore, ImageRecord
    from .workspace import Workspace

DEFAULT_VLM = "llava-hf/llama3-llava-next-8b-hf"
DEFAULT_SHORTENER = "t5-large"
DEFAULT_BACKBONE_SPEC = PAPER_BACKBONE  # whose T5 tokenizer counts the 120 tokens
DEFAULT_MAX_RETRIES = 5
VSG_REVIEWER = "vsg"
FLAG_STATUS = "needs-second-read"
PARROT_RUN = 4          # this many feature phrases in a bare list = parroting (see parroting_reason)
ECHO_WORDS = 8          # this many consecutive prompt words copied into the answer = parroting
MAX_DRAFT_CHARS = 4000  # the store's limit

# ------------------------------------------------------------------------------------------------
# Template captions (the seed)
# ------------------------------------------------------------------------------------------------
_TEMPLATE_SUBJECT = {
    "endoscopy": "An endoscopic image",        # the paper's seed
    "dermoscopy": "A dermoscopic image",
    "radiology": "A radiological image",
    "ct": "A CT image",
    "mr": "An MR image",
    "xray": "An X-ray image",
    "ultrasound": "An ultrasound image",
    "histology": "A histology image",
    "fundus": "A fundus photograph",
    "generic": "A medical image",
}


def humanise_label(label: str) -> str:
    """Folder-style class names read as words: ``ulcerative-colitis`` -> ``ulcerative colitis``."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", str(label))).strip()


def template_caption(label: str, modality: str | None = "generic",
                     seed_captions: dict[str, str] | None = None) -> str:
    """The class-seeded caption of an image: the dataset's own seed caption for ``label`` if it has one,
    else "<A {modality} image> of <humanised label>"."""
    if seed_captions and isinstance(seed_captions.get(label), str) and seed_captions[label].strip():
        return seed_captions[label].strip()
    return f"{_TEMPLATE_SUBJECT[normalise_modality(modality)]} of {humanise_label(label)}"


# ------------------------------------------------------------------------------------------------
# Seeds
# ------------------------------------------------------------------------------------------------
# Draft seeds are 31-bit (``seeds.derive_seed(..., bits=31)``) so they fit every VLM's RNG. An image's seed
# comes from its pixels rather than its id, so the same image gets the same draft in any dataset or order.
def attempt_seed(seed: int, attempt: int) -> int:
    """Attempt 0 uses ``seed`` itself so a stored draft seed reproduces the draft; retries derive new ones."""
    return seed if attempt == 0 else derive_seed(seed, f"retry-{attempt}", bits=31)


# ------------------------------------------------------------------------------------------------
# Constraints
# ------------------------------------------------------------------------------------------------
_SEVERITY = {"empty": 10.0, "seed": 4.0, "parrot": 3.0, "length": 2.0}
_SEPARATORS = {",", ";", ":", "/", "-", "*", "•", "·", "–", "—", ".", "(", ")", "and", "or", "&", "\n"}
_SPELLING = {"colour": "color", "colours": "colors", "haemorrhages": "hemorrhages", "haemorrhage": "hemorrhage",
             "oedema": "edema", "greyish": "grayish", "grey": "gray"}


@dataclass
class Violation:
    code: str          # "empty" | "seed" | "parrot" | "length"
    message: str
    severity: float


@dataclass
class CheckResult:
    ok: bool
    violations: list[Violation]
    n_tokens: int

    @property
    def reasons(self) -> list[str]:
        return [v.message for v in self.violations]

    @property
    def severity(self) -> float:
        return sum(v.severity for v in self.violations)


def _norm_ws(text: str) -> str:
    return re.sub(r"\s+", " ", text or "").strip().casefold()


def starts_with_seed(text: str, seed: str) -> bool:
    """Case- and whitespace-insensitive prefix test; the seed's closing full stop is optional."""
    seed_n = _norm_ws(seed).rstrip(".").rstrip()
    body = _norm_ws(text).lstrip("\"'“‘ ")
    if not seed_n:
        return True
    if not body.startswith(seed_n):
        return False
    rest = body[len(seed_n):]
    # "...of polyps" must not pass for "...of polypsis": the seed has to end on a word boundary.
    return not rest or not (rest[0].isalnum() and seed_n[-1].isalnum())


def _tokens(text: str) -> list[str]:
    toks = re.findall(r"[a-z0-9]+|\n|[^\sa-z0-9]", (text or "").casefold().replace("\r", ""))
    return [_SPELLING.get(t, t) for t in toks]


def _find_phrase(tokens: list[str], phrase: list[str]) -> list[tuple[int, int]]:
    n = len(phrase)
    return [(i, i + n) for i in range(len(tokens) - n + 1) if n and tokens[i:i + n] == phrase]


def parroting_reason(text: str, features: Sequence[str], prompt: str | None = None, seed: str | None = None,
                     *, min_run: int = PARROT_RUN, echo_words: int = ECHO_WORDS) -> str | None:
    """Why ``text`` parrots the prompt, or None. Two rules, both about copying rather than describing:

    1. *feature list*: ``min_run`` (default 4; all of them if the template lists only 3; the rule is off
       for templates with fewer than 3) different feature phrases of the template stand next to each
       other separated only by list punctuation or "and"/"or" (commas, semicolons, colons, bullets,
       dashes, numbering, new lines), e.g. "colour, shape, surrounding
       mucosa and surface texture". A phrase qualified by words of the answer ("reddish colour, oval
       shape") breaks the run, so a real description that mentions the features is not flagged.
       The prompt's own feature sentence, copied verbatim, is the commonest case of this rule.
    2. *prompt echo*: the answer copies ``echo_words`` (default 8) consecutive words of the prompt that
       are not part of the seed caption (e.g. "describe this endoscopic image of polyps by its visual").
    """
    toks = _tokens(text)
    feats = [f for f in dict.fromkeys(_tokens_phrase(f) for f in features) if f]
    # Two features joined by "and" is ordinary prose ("colour and border"), so short lists need all of
    # at least three before a run counts as the list itself.
    need = min(min_run, len(feats))
    if need >= 3:
        spans = sorted((s, e, k) for k, f in enumerate(feats) for s, e in _find_phrase(toks, list(f)))
        best: list[int] = []
        # Longest chain of spans where each next span starts after only separators (or numbering).
        chains: list[tuple[int, list[int]]] = []   # (end, feature ids) of chains ending at a span
        for s, e, k in spans:
            cur = [k]
            for end, ks in chains:
                if end <= s and k not in ks and all(t in _SEPARATORS or t.isdigit() for t in toks[end:s]):
                    if len(ks) + 1 > len(cur):
                        cur = ks + [k]
            chains.append((e, cur))
            if len(cur) > len(best):
                best = cur
        if len(best) >= need:
            return (f"repeats the prompt's feature list ({len(best)} features in a row: "
                    f"{', '.join(' '.join(feats[k]) for k in best)})")
    if prompt:
        ptoks = [t for t in _tokens(prompt) if t.isalnum()]
        seed_words = [t for t in _tokens(seed or "") if t.isalnum()]
        ttoks = [t for t in toks if t.isalnum()]
        seed_grams = {tuple(seed_words[i:i + echo_words]) for i in range(len(seed_words) - echo_words + 1)}
        grams = {tuple(ptoks[i:i + echo_words]) for i in range(len(ptoks) - echo_words + 1)} - seed_grams
        # A gram that merely repeats the seed (which the answer must start with) is not an echo.
        for i in range(len(ttoks) - echo_words + 1):
            g = tuple(ttoks[i:i + echo_words])
            if g in grams and not _within_seed(g, seed_words):
                return f"copies the prompt's instructions (\"{' '.join(g)}\")"
    return None


def _tokens_phrase(phrase: str) -> tuple[str, ...]:
    return tuple(t for t in _tokens(phrase) if t != "\n")


def _within_seed(gram: tuple[str, ...], seed_words: list[str]) -> bool:
    n = len(gram)
    return any(tuple(seed_words[i:i + n]) == gram for i in range(len(seed_words) - n + 1))


def check_caption(text: str, *, seed: str, tokenizer: Any, features: Sequence[str] = (),
                  prompt: str | None = None, max_tokens: int = MAX_TOKENS) -> CheckResult:
    """The VSG's three rules on one draft: starts with the seed, does not parrot, fits PixArt's T5 budget."""
    from .backbone import count_tokens

    v: list[Violation] = []
    n = count_tokens(tokenizer, text or "")
    if not (text or "").strip():
        v.append(Violation("empty", "the answer is empty", _SEVERITY["empty"]))
    else:
        if not starts_with_seed(text, seed):
            v.append(Violation("seed", f"does not start with the seed caption {seed!r}", _SEVERITY["seed"]))
        why = parroting_reason(text, features, prompt, seed)
        if why:
            v.append(Violation("parrot", why, _SEVERITY["parrot"]))
    if n > max_tokens:
        # Slightly worse the longer it is, so among over-long attempts the shortest is kept.
        v.append(Violation("length", f"{n} T5 tokens, over PixArt's limit of {max_tokens}",
                           _SEVERITY["length"] + min(n - max_tokens, 1000) / 1000))
    return CheckResult(ok=not v, violations=v, n_tokens=n)


def clean_text(text: str) -> str:
    """Model output as a one-paragraph caption: no control characters, single spaces, no wrapping quotes."""
    text = "".join(ch if unicodedata.category(ch)[0] != "C" or ch in "\n\t" else " " for ch in text or "")
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) >= 2 and text[0] in "\"“'" and text[-1] in "\"”'":
        text = text[1:-1].strip()
    return text[:MAX_DRAFT_CHARS]


# ------------------------------------------------------------------------------------------------
# The drafter interface
# ------------------------------------------------------------------------------------------------
@dataclass
class DraftItem:
    """What a drafter needs for one image."""
    label: str
    seed_caption: str
    seed: int
    image: "Image.Image | None" = None   # drafters with needs_image
    text: str | None = None              # drafters with needs_text (the caption to rework)


@dataclass
class DraftResult:
    text: str
    prompt: str | None
    params: dict
    seed: int                 # the seed of the kept attempt: drafting again with it gives the same text
    attempts: int
    ok: bool
    reasons: list[str] = field(default_factory=list)   # why the kept attempt violates the rules (if not ok)
    source: str = ""
    note: str | None = None


class Drafter(ABC):
    """Drafts captions for images. Subclasses implement :meth:`_generate` for a list of items at one attempt;
    the retry/cap/best-attempt logic lives here so all drafters obey the same rules."""

    kind: str = ""
    needs_image: bool = True
    needs_text: bool = False
    deterministic: bool = False   # redrawing gives the same answer: don't retry

    def __init__(self, *, tokenizer: Any = None, backbone: str = DEFAULT_BACKBONE_SPEC,
                 max_retries: int = DEFAULT_MAX_RETRIES, seed: int = 0, max_tokens: int = MAX_TOKENS,
                 batch_size: int = 1, modality: str | None = None, prompt: PromptTemplate | None = None,
                 seed_captions: dict[str, str] | None = None):
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be a non-negative integer, got {max_retries!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self._tokenizer = tokenizer
        self.backbone = backbone
        self.max_retries = max_retries
        self.seed = int(seed)
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.modality = normalise_modality(modality) if modality else None
        self.prompt = prompt.validate() if prompt is not None else None
        self._explicit_prompt = prompt is not None
        self.seed_captions = dict(seed_captions or {})

    # --- identity ---------------------------------------------------------------------------
    @property
    @abstractmethod
    def source(self) -> str:
        """Provenance string stored with each draft ("template", "vlm:<model>", "shorten:<model>")."""

    def config(self) -> dict:
        """Everything that changes what this drafter writes; hashed into :attr:`config_key`."""
        tok = self._tokenizer
        return {
            "kind": self.kind, "source": self.source, "max_retries": self.max_retries, "seed": self.seed,
            "max_tokens": self.max_tokens,
            "tokenizer": self.backbone if tok is None else
            f"{tok.name_or_path or type(tok).__name__}:{len(tok)}",
            "modality": self.modality,
            "prompt": self.prompt.to_dict() if self.prompt else None,
            "seed_captions": dict(sorted(self.seed_captions.items())),
        }

    @property
    def config_key(self) -> str:
        """Stable hash of :meth:`config`: same key = same drafter configuration (used to resume runs)."""
        blob = json.dumps(self.config(), sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # --- setup ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from .backbone import load_tokenizer

            self._tokenizer = load_tokenizer(self.backbone)
        return self._tokenizer

    def prepare(self, ws: "Workspace", store: "CaptionStore", dataset: str) -> None:
        """Take the dataset's modality, seed captions and (unless one was given) its prompt template."""
        info = store.dataset_info(dataset)
        self.modality = normalise_modality(info.modality)
        seeds = (info.meta or {}).get("seed_captions") or {}
        self.seed_captions = {str(k): str(v) for k, v in seeds.items()} if isinstance(seeds, dict) else {}
        if not self._explicit_prompt:
            self.prompt = load_prompt(ws, dataset, self.modality)

    def seed_caption(self, label: str) -> str:
        return template_caption(label, self.modality or "generic", self.seed_captions)

    @property
    def features(self) -> list[str]:
        return list(self.prompt.features) if self.prompt else []

    # --- drafting ---------------------------------------------------------------------------
    @abstractmethod
    def _generate(self, items: Sequence[DraftItem], seeds: Sequence[int]) -> list[tuple[str, str | None]]:
        """One attempt per item with the given seeds: ``(text, prompt)`` per item."""

    def _params(self) -> dict:
        """Generation parameters stored with each draft."""
        return {}

    def draft(self, image: "Image.Image | None", label: str, seed_caption: str | None = None, *,
              seed: int, text: str | None = None) -> DraftResult:
        """Draft one caption (with retries); see :meth:`draft_many`."""
        sc = seed_caption if seed_caption is not None else self.seed_caption(label)
        return self.draft_many([DraftItem(label, sc, int(seed), image, text)])[0]

    def draft_many(self, items: Sequence[DraftItem]) -> list[DraftResult]:
        """Draft every item; redraw failures with new seeds up to ``max_retries`` times, batching the redraws.

        After the cap the attempt with the least severe violations is kept (earliest on a tie) and the
        result says why it is not ok. Never loops more than ``max_retries + 1`` rounds."""
        if self.prompt is None:
            self.prompt = default_prompt(self.modality)
        for it in items:
            if self.needs_image and it.image is None:
                raise ConfigError(f"The {self.kind} drafter needs the image of each item.")
            if self.needs_text and it.text is None:
                raise ConfigError(f"The {self.kind} drafter needs the current caption of each item.")
        rounds = 1 if self.deterministic else self.max_retries + 1
        tried: list[list[tuple[int, str, str | None, CheckResult]]] = [[] for _ in items]
        pending = list(range(len(items)))
        for attempt in range(rounds):
            if not pending:
                break
            seeds = [attempt_seed(items[i].seed, attempt) for i in pending]
            outs = self._generate([items[i] for i in pending], seeds)
            still = []
            for i, s, (txt, prompt) in zip(pending, seeds, outs):
                txt = clean_text(txt)
                chk = check_caption(txt, seed=items[i].seed_caption, tokenizer=self.tokenizer,
                                    features=self.features, prompt=prompt, max_tokens=self.max_tokens)
                tried[i].append((s, txt, prompt, chk))
                if not chk.ok:
                    still.append(i)
            pending = still
        results = []
        for it, att in zip(items, tried):
            k = min(range(len(att)), key=lambda j: (att[j][3].severity, j))
            s, txt, prompt, chk = att[k]
            params = {**self._params(), "base_seed": it.seed, "attempt": k + 1, "attempts": len(att),
                      "max_retries": self.max_retries, "n_tokens": chk.n_tokens, "ok": chk.ok,
                      "violations": [v.code for v in chk.violations]}
            note = None
            if not chk.ok:
                note = (f"VSG: no attempt met the rules after {len(att)} attempt(s); kept attempt {k + 1} "
                        f"(seed {s}), which {'; '.join(chk.reasons)}. Needs a second read.")
            elif len(att) > 1:
                earlier = "; ".join(f"attempt {j + 1}: {', '.join(a[3].reasons)}" for j, a in enumerate(att[:-1]))
                note = f"VSG: redrawn {len(att) - 1} time(s) ({earlier})."
            results.append(DraftResult(text=txt, prompt=prompt, params=params, seed=s, attempts=len(att),
                                       ok=chk.ok, reasons=chk.reasons, source=self.source, note=note))
        return results


# ------------------------------------------------------------------------------------------------
# template
# ------------------------------------------------------------------------------------------------
class TemplateDrafter(Drafter):
    """The class-seeded caption itself (the paper's "simple caption" ablation; no model)."""

    kind = "template"
    needs_image = False
    deterministic = True

    def __init__(self, **common: Any):
        common.setdefault("batch_size", 64)
        super().__init__(**common)

    @property
    def source(self) -> str:
        return "template"

    def config(self) -> dict:
        c = super().config()
        c.pop("prompt")   # the template drafter uses no prompt: editing prompts must not redo its drafts
        return c

    @property
    def features(self) -> list[str]:
        return []

    def _generate(self, items: Sequence[DraftItem], seeds: Sequence[int]) -> list[tuple[str, str | None]]:
        return [(it.seed_caption, None) for it in items]


# ------------------------------------------------------------------------------------------------
# model loading (shared by vlm and shorten)
# ------------------------------------------------------------------------------------------------
def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (``./x``, ``/abs``, ``a/b/c``, ``~``) is a folder."""
    return not looks_like_hub_id(spec) or Path(spec).expanduser().exists()


def resolve_model(spec: str) -> tuple[str, bool]:
    """``(where to load from, local_files_only)``; a missing folder is a ``MissingWeightsError`` up front."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("Name a model: a Hugging Face Hub id (owner/name) or a local folder.")
    p = Path(spec).expanduser()
    if p.is_dir():
        return str(p.resolve()), True
    if _looks_like_path(spec):
        raise MissingWeightsError(
            f"Model folder {spec} does not exist. Pass the folder that holds config.json and the weights "
            "(saved with save_pretrained), or a Hugging Face Hub id.")
    return spec, is_offline()


def _load_error(spec: str, what: str, exc: BaseException) -> MissingWeightsError:
    local = Path(spec).expanduser().is_dir()
    if local:
        msg = (f"Could not load the {what} from folder {spec} ({type(exc).__name__}: {exc}). The folder must "
               "hold a complete transformers checkpoint (config.json, weights, processor/tokenizer files) as "
               "written by save_pretrained.")
    else:
        msg = (f"Could not load the {what} {spec!r}: its weights are not in the Hugging Face cache"
               f"{' and HF_HUB_OFFLINE=1 forbids downloading' if is_offline() else ' and the Hub could not be reached'}"
               f" ({type(exc).__name__}). Download it on a machine with network access "
               f"(`huggingface-cli download {spec}`) and copy the cache (HF_HOME) here, or pass a local folder "
               "with --model.")
    return MissingWeightsError(msg)


_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError)


def _from_pretrained(loader: Any, spec: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(spec, **kwargs)``; a missing or incomplete checkpoint raises MissingWeightsError."""
    try:
        return loader.from_pretrained(spec, **kwargs)
    except _LOAD_ERRORS as e:
        raise _load_error(spec, what, e) from e


def _device_dtype(device: str | None, dtype: Any) -> tuple[Any, Any]:
    import torch

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        # bf16 halves memory on GPU (an 8B VLM fits one card); CPU bf16 matmuls are slow and lossy: fp32.
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    return dev, dtype


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


class _RowSampler:
    """Top-k/top-p sampling with one RNG per batch row, as a logits processor for greedy ``generate``.

    transformers samples a whole batch from the global RNG, so a row's text would depend on its batch
    neighbours. Here each row draws from its own ``torch.Generator`` seeded with that image's seed, and
    the chosen token is the only finite logit, so greedy decoding picks it. An image's draft thus depends
    on its own seed only (up to float noise from padding)."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int, top_p: float):
        import torch

        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids, scores):
        import torch

        logits = scores.float() / max(self.temperature, 1e-5)
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            # Drop tokens once the mass *before* them reaches top_p; the first token is always kept.
            drop = (cum - sorted_logits.softmax(-1)) >= self.top_p
            logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
        probs = logits.softmax(-1).cpu()
        out = torch.full_like(scores, float("-inf"))
        for row, g in enumerate(self.gens):
            tok = torch.multinomial(probs[row], 1, generator=g).item()
            out[row, tok] = 0.0
        return out


# ------------------------------------------------------------------------------------------------
# vlm
# ------------------------------------------------------------------------------------------------
class VLMDrafter(Drafter):
    """Drafts from any transformers image-text-to-text model (LLaVA-NeXT as in the paper)."""

    kind = "vlm"

    def __init__(self, model: str = DEFAULT_VLM, *, temperature: float = 0.8, top_k: int = 50, top_p: float = 0.9,
                 max_new_tokens: int = 150, device: str | None = None, dtype: Any = None, **common: Any):
        common.setdefault("batch_size", 4)
        super().__init__(**common)
        self.model_spec, self.local_only = resolve_model(model)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.max_new_tokens = int(max_new_tokens)
        self.device_name, self.dtype_arg = device, dtype
        self._model = None
        self._processor = None

    @property
    def source(self) -> str:
        return f"vlm:{self.model_spec}"

    def _params(self) -> dict:
        return {"model": self.model_spec, "do_sample": True, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                "dtype": _dtype_name(self._dtype) if self._model is not None else None}

    def config(self) -> dict:
        c = super().config()
        c.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                 max_new_tokens=self.max_new_tokens)
        return c

    def load(self) -> None:
        """Load processor and model (once). ``MissingWeightsError`` when they are not available offline."""
        if self._model is not None:
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self._device, self._dtype = _device_dtype(self.device_name, self.dtype_arg)
        processor = _from_pretrained(AutoProcessor, self.model_spec, "VLM processor", local_files_only=self.local_only)
        model = _from_pretrained(AutoModelForImageTextToText, self.model_spec, "VLM", dtype=self._dtype,
                                 local_files_only=self.local_only)
        tok = getattr(processor, "tokenizer", None)
        if tok is None:
            raise ConfigError(f"{self.model_spec} has no tokenizer in its processor; it is not a chat VLM.")
        tok.padding_side = "left"   # decoder-only batches must be left-padded so answers start together
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self._processor, self._model = processor, model.to(self._device).eval()

    def _chat_text(self, prompt: str) -> str:
        proc = self._processor
        if proc.chat_template or proc.tokenizer.chat_template:
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        token = getattr(proc, "image_token", None) or "<image>"
        return f"{token}\n{prompt}"

    def _generate(self, items: Sequence[DraftItem], seeds: Sequence[int]) -> list[tuple[str, str | None]]:
        import copy

        import torch
        from transformers import LogitsProcessorList

        self.load()
        model, proc = self._model, self._processor
        prompts = [self.prompt.render(it.seed_caption, humanise_label(it.label)) for it in items]
        out: list[tuple[str, str | None]] = []
        for start in range(0, len(items), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            texts = [self._chat_text(p) for p in prompts[chunk]]
            images = [it.image.convert("RGB") for it in items[chunk]]
            inputs = proc(images=images, text=texts, return_tensors="pt", padding=True)
            inputs = {k: (v.to(self._device, self._dtype) if v.is_floating_point() else v.to(self._device))
                      for k, v in inputs.items() if hasattr(v, "to")}
            gen = copy.deepcopy(model.generation_config)
            gen.do_sample, gen.num_beams, gen.max_new_tokens = False, 1, self.max_new_tokens
            gen.temperature = gen.top_k = gen.top_p = None
            if gen.pad_token_id is None:
                gen.pad_token_id = proc.tokenizer.pad_token_id
            sampler = _RowSampler(seeds[chunk], self.temperature, self.top_k, self.top_p)
            with torch.inference_mode():
                ids = model.generate(**inputs, generation_config=gen,
                                     logits_processor=LogitsProcessorList([sampler]))
            answers = proc.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            out.extend(zip(answers, prompts[chunk]))
        return out


# ------------------------------------------------------------------------------------------------
# shorten
# ------------------------------------------------------------------------------------------------
class ShortenDrafter(Drafter):
    """Rewrites over-long captions with a seq2seq model (the paper: T5-large, "simplify:", 4 beams, 90-120).

    Attempt 1 is plain beam search (deterministic); redraws use seeded beam *sampling*, since beam search
    would only return the same answer again."""

    kind = "shorten"
    needs_image = False
    needs_text = True

    def __init__(self, model: str = DEFAULT_SHORTENER, *, prefix: str = "simplify: ", num_beams: int = 4,
                 min_new_tokens: int = 90, max_new_tokens: int = 120, temperature: float = 0.8, top_k: int = 50,
                 top_p: float = 0.9, device: str | None = None, dtype: Any = None, **common: Any):
        super().__init__(**common)
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ConfigError("min_new_tokens must be between 0 and max_new_tokens.")
        self.model_spec, self.local_only = resolve_model(model)
        self.prefix, self.num_beams = prefix, int(num_beams)
        self.min_new_tokens, self.max_new_tokens = int(min_new_tokens), int(max_new_tokens)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.device_name, self.dtype_arg = device, dtype
        self._model = None
        self._tok = None

    @property
    def source(self) -> str:
        return f"shorten:{self.model_spec}"

    @property
    def features(self) -> list[str]:
        # The input already passed through the VSG prompt; parroting is judged on the features anyway.
        return list(self.prompt.features) if self.prompt else []

    def config(self) -> dict:
        c = super().config()
        c.update(prefix=self.prefix, num_beams=self.num_beams, min_new_tokens=self.min_new_tokens,
                 max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                 top_p=self.top_p)
        return c

    def _params(self) -> dict:
        return {"model": self.model_spec, "prefix": self.prefix, "num_beams": self.num_beams,
                "min_new_tokens": self.min_new_tokens, "max_new_tokens": self.max_new_tokens,
                "redraw_sampling": {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}}

    def load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self._device, self._dtype = _device_dtype(self.device_name, self.dtype_arg)
        tok = _from_pretrained(AutoTokenizer, self.model_spec, "shortening tokenizer", local_files_only=self.local_only)
        model = _from_pretrained(AutoModelForSeq2SeqLM, self.model_spec, "shortening model", dtype=self._dtype,
                                 local_files_only=self.local_only)
        self._tok, self._model = tok, model.to(self._device).eval()

    def _generate(self, items: Sequence[DraftItem], seeds: Sequence[int]) -> list[tuple[str, str | None]]:
        import torch

        self.load()
        out: list[tuple[str, str | None]] = []
        for it, s in zip(items, seeds):
            prompt = self.prefix + (it.text or "")
            enc = self._tok(prompt, return_tensors="pt", truncation=True, max_length=512).to(self._device)
            redraw = s != it.seed
            kw: dict[str, Any] = dict(num_beams=self.num_beams, min_new_tokens=self.min_new_tokens,
                                      max_new_tokens=self.max_new_tokens, early_stopping=True)
            if redraw:
                kw.update(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
            else:
                kw.update(do_sample=False)
            # Beam sampling draws from the global RNG: fork it so seeding here leaves the caller's untouched.
            with torch.random.fork_rng(devices=[self._device] if self._device.type == "cuda" else []), \
                    torch.inference_mode():
                torch.manual_seed(int(s))
                ids = self._model.generate(**enc, **kw)
            out.append((self._tok.decode(ids[0], skip_special_tokens=True), prompt))
        return out


# ------------------------------------------------------------------------------------------------
# Factory
# ------------------------------------------------------------------------------------------------
DRAFTERS = ("template", "vlm", "shorten")


def make_drafter(kind: str, *, model: str | None = None, **kw: Any) -> Drafter:
    """Build a drafter by name; ``model`` is the Hub id or folder for ``vlm``/``shorten``."""
    if kind == "template":
        if model:
            raise ConfigError("The template drafter uses no model; drop --model or pick --drafter vlm/shorten.")
        return TemplateDrafter(**kw)
    if kind == "vlm":
        return VLMDrafter(model or DEFAULT_VLM, **kw)
    if kind == "shorten":
        return ShortenDrafter(model or DEFAULT_SHORTENER, **kw)
    raise ConfigError(f"Unknown drafter {kind!r}; choose one of {', '.join(DRAFTERS)}.")


# ------------------------------------------------------------------------------------------------
# Captioning a dataset
# ------------------------------------------------------------------------------------------------
@dataclass
class CaptionRunReport:
    done: int                 # images dealt with in this run (drafted, skipped or failed to load)
    total: int                # images in the dataset
    failures: int             # drafts that broke the rules after all retries (flagged) + unreadable images
    skipped: int              # already drafted by this configuration, or not over the token limit
    drafted: int = 0          # new draft events written
    flagged: list[int] = field(default_factory=list)             # image ids marked needs-second-read
    errors: list[tuple[int, str]] = field(default_factory=list)  # (image id, why no draft)
    stopped: bool = False     # should_stop asked to stop before the end
    config_key: str = ""
    batch_id: str | None = None

    def summary(self) -> str:
        s = (f"{self.drafted} drafted, {self.skipped} skipped, {self.failures} failed "
             f"({self.done}/{self.total} images)")
        if self.flagged:
            s += f"; {len(self.flagged)} flagged {FLAG_STATUS}"
        if self.stopped:
            s += "; stopped early (run again to resume)"
        return s + "."


def _sha(text: str) -> str:
    return hashlib.sha256((text or "").encode()).hexdigest()[:16]


def _already_done(history: list["CaptionEvent"], key: str, state: "CaptionState", needs_text: bool) -> bool:
    for ev in history:
        if ev.kind != "draft" or not ev.params or ev.params.get("config_key") != key:
            continue
        if not needs_text:
            return True
        # A text rework is done for *this* text: its output is the current caption, or its input was.
        if ev.id == state.caption_version or ev.params.get("input_sha") == _sha(state.text):
            return True
    return False


def _flag(store: "CaptionStore", image_id: int, note: str) -> bool:
    """Mark an image for a second read unless a human has moved it on (edited, approved, rejected)."""
    state = store.current(image_id)
    if state.edited or state.status != "pending":
        return state.status == FLAG_STATUS
    try:
        store.set_status(image_id, FLAG_STATUS, reviewer=VSG_REVIEWER, expected_version=state.version, note=note)
        return True
    except ConflictError:
        return False   # someone acted on the image meanwhile; the draft's note still says why


def _unflag(store: "CaptionStore", image_id: int, event: "CaptionEvent") -> None:
    """A good redraft lifts a flag that the VSG itself set (never one a human set)."""
    state = store.current(image_id)
    if state.status == FLAG_STATUS and state.reviewer == VSG_REVIEWER and not state.edited \
            and state.caption_version == event.id:
        try:
            store.set_status(image_id, "pending", reviewer=VSG_REVIEWER, expected_version=state.version,
                             note="VSG: a new draft meets the rules")
        except ConflictError:
            pass


def caption_dataset(ws: "Workspace", store: "CaptionStore", dataset: str, drafter: Drafter, *,
                    progress: Callable[[int, int, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    only_over_limit: bool = False) -> CaptionRunReport:
    """Draft captions for every image of ``dataset`` with ``drafter``; safe to stop and run again.

    * resumable: an image that already has a draft from the same drafter configuration
      (``params.config_key``) is skipped, so a rerun only does what is missing;
    * each draft is committed as soon as its batch is done, and ``should_stop()`` is checked between
      batches, so stopping loses at most the batch in flight;
    * ``progress(done, total, failures)`` after each batch (and once at the start);
    * ``only_over_limit`` (always on for text reworking drafters such as ``shorten``): only images whose
      current caption is over ``drafter.max_tokens`` PixArt T5 tokens.
    """
    from .backbone import count_tokens

    drafter.prepare(ws, store, dataset)
    key = drafter.config_key
    records = store.list_images(dataset)
    batch_id = store.new_batch_id("caption")
    report = CaptionRunReport(done=0, total=len(records), failures=0, skipped=0, config_key=key, batch_id=batch_id)
    over_only = only_over_limit or drafter.needs_text

    def emit() -> None:
        if progress is not None:
            progress(report.done, report.total, report.failures)

    def run_batch(batch: list[tuple["ImageRecord", "CaptionState"]]) -> None:
        items: list[tuple["ImageRecord", "CaptionState", DraftItem]] = []
        for rec, state in batch:
            image = None
            if drafter.needs_image:
                try:
                    image = _open_image(ws, rec)
                except MedArtError as e:
                    report.errors.append((rec.id, str(e)))
                    report.failures += 1
                    report.done += 1
                    continue
            items.append((rec, state, DraftItem(label=rec.label, seed_caption=drafter.seed_caption(rec.label),
                                                seed=derive_seed(drafter.seed, rec.pixel_hash, bits=31), image=image,
                                                text=state.text if drafter.needs_text else None)))
        results = drafter.draft_many([it for _, _, it in items]) if items else []
        for (rec, state, item), res in zip(items, results):
            params = {**res.params, "config_key": key}
            if drafter.needs_text:
                params.update(input_sha=_sha(state.text), input_version=state.caption_version,
                              input_tokens=count_tokens(drafter.tokenizer, state.text))
            ev = store.add_draft(rec.id, res.text, source=res.source, prompt=res.prompt, params=params,
                                 seed=res.seed, note=res.note, batch_id=batch_id)
            report.drafted += 1
            if res.ok:
                _unflag(store, rec.id, ev)
            else:
                report.failures += 1
                if _flag(store, rec.id, res.note or "; ".join(res.reasons)):
                    report.flagged.append(rec.id)
            report.done += 1

    emit()
    batch: list[tuple["ImageRecord", "CaptionState"]] = []
    for rec in records:
        if should_stop is not None and not batch and should_stop():
            report.stopped = True
            break
        state = store.current(rec.id)
        if _already_done(store.history(rec.id), key, state, drafter.needs_text) or (
                over_only and count_tokens(drafter.tokenizer, state.text) <= drafter.max_tokens):
            report.skipped += 1
            report.done += 1
            continue
        batch.append((rec, state))
        if len(batch) >= drafter.batch_size:
            run_batch(batch)
            batch = []
            emit()
    if batch and not report.stopped:
        run_batch(batch)
    emit()
    return report


def _open_image(ws: "Workspace", rec: "ImageRecord") -> "Image.Image":
    from PIL import Image, UnidentifiedImageError

    path = ws.image_path(rec.dataset, rec.file_name)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise InvalidImageError(f"Image file {path} is missing; re-import the dataset.") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidImageError(f"Image file {path} cannot be read ({e}); re-import it.") from None


# ------------------------------------------------------------------------------------------------
# Review helper
# ------------------------------------------------------------------------------------------------
def approve_drafts(store: "CaptionStore", dataset: str, *, reviewer: str) -> int:
    """Approve every *pending* image whose current text is an untouched machine draft; returns the count.

    Images a human has edited or already judged, and images that change under us, are left alone."""
    n = 0
    for st in store.states(dataset, status="pending"):
        if st.edited or not st.text.strip() or st.latest_draft is None:
            continue
        if st.caption_version != st.latest_draft.id and not any(
                e.id == st.caption_version and e.kind == "draft" for e in store.history(st.image_id)):
            continue
        try:
            store.approve(st.image_id, reviewer=reviewer, expected_version=st.version)
            n += 1
        except ConflictError:
            continue
    return n
