"""Caption review operations: filters, word diffs, the 120-token preview, rule badges, and batch edits
(preview -> apply as one ``batch_id`` -> undo as one unit).

Everything here is plain library code over a :class:`~medart_core.captions.CaptionStore` and returns
plain data (diff segments, :class:`TokenPreview`, :class:`Badge`); the studio renders it
(``studio/render.py``) and :mod:`medart_core.review` strings it into the review session.
"""
from __future__ import annotations

import difflib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .captions import BatchConflict, BatchResult
from .constants import MAX_TOKENS   # PixArt-alpha reads 120 T5 tokens, the closing </s> included
from .errors import ConfigError, ConflictError
from .userregex import compile_user_regex

if TYPE_CHECKING:
    from .captions import CaptionState, CaptionStore

# A fast (Rust) tokenizer is not safe to call from several threads at once ("Already borrowed"), and
# Gradio runs different events of the tab in different worker threads.
_TOKENIZER_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------
# Filters
# ------------------------------------------------------------------------------------------------
@dataclass
class CaptionFilter:
    """What the reviewer wants to see. ``None`` / empty means "any"."""

    label: str | None = None
    status: str | None = None
    reviewer: str | None = None
    edited: bool | None = None          # True: a human changed the text; False: still the draft
    over_limit: bool = False            # only captions longer than ``MAX_TOKENS`` T5 tokens
    search: str = ""
    regex: bool = False
    case_sensitive: bool = False


def compile_search(pattern: str, *, regex: bool = False, case_sensitive: bool = False) -> Callable[[str], bool] | None:
    """A predicate for caption text, or ``None`` when there is nothing to search for.

    Raises ConfigError (not ``regex.error``) for an invalid regex, so the UI can show a warning. A regex runs
    under :mod:`medart_core.userregex`'s budget: one predicate is one request, and a pattern that backtracks
    past the budget raises ConfigError instead of freezing the server.
    """
    if not pattern:
        return None
    if regex:
        return compile_user_regex(pattern, case_sensitive=case_sensitive,
                                  hint="Fix it or untick 'regex'.").search
    if case_sensitive:
        return lambda text: pattern in (text or "")
    needle = pattern.casefold()
    return lambda text: needle in (text or "").casefold()


class TokenCounter:
    """Counts T5 tokens (incl. ``</s>``, no truncation), memoised by text.

    Filtering 10,000 captions by "over the limit" must not re-tokenise them on every click; captions
    change one at a time, so a text-keyed cache is nearly always hit.
    """

    def __init__(self, tokenizer: Any, max_entries: int = 50_000):
        self.tokenizer = tokenizer
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._max = max_entries

    def _put(self, text: str, n: int) -> None:
        self._cache[text] = n
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)

    def count(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            with _TOKENIZER_LOCK:
                ids = self.tokenizer(text or "", add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
            n = len(ids)
            self._put(text, n)
        return n

    def count_many(self, texts: Sequence[str]) -> list[int]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            with _TOKENIZER_LOCK:
                enc = self.tokenizer([t or "" for t in missing], add_special_tokens=True, truncation=False,
                                     verbose=False)["input_ids"]
            for t, ids in zip(missing, enc):
                self._put(t, len(ids))
        return [self._cache[t] if t in self._cache else self.count(t) for t in texts]


def _store_states(store: "CaptionStore", dataset: str, flt: "CaptionFilter") -> list["CaptionState"]:
    # SQLite narrows by class/status/edited; the text predicates run in Python so the UI can offer
    # case-(in)sensitive substring and regex search with one code path.
    return list(store.states(dataset, label=flt.label or None, status=flt.status or None,
                             edited=flt.edited))


def filter_states(store: "CaptionStore", dataset: str, flt: CaptionFilter | None = None, *,
                  counter: TokenCounter | None = None) -> list["CaptionState"]:
    """Caption states of ``dataset`` matching ``flt``, in the store's (image id) order.

    One ``store.states`` call; the remaining predicates run in Python over the small state records.
    """
    flt = flt or CaptionFilter()
    match = compile_search(flt.search, regex=flt.regex, case_sensitive=flt.case_sensitive)  # fail before any I/O
    states = _store_states(store, dataset, flt)
    if flt.reviewer:
        who = flt.reviewer.strip().casefold()
        states = [s for s in states if (s.reviewer or "").casefold() == who]
    if match is not None:
        states = [s for s in states if match(s.text)]
    if flt.over_limit:
        if counter is None:
            raise ConfigError("Filtering by token count needs a tokenizer (TokenCounter).")
        counts = counter.count_many([s.text for s in states])
        states = [s for s, n in zip(states, counts) if n > MAX_TOKENS]
    return states


def progress_by_class(store: "CaptionStore", dataset: str) -> list[tuple[str, int, int]]:
    """``(label, approved, total)`` per class, from SQL counts (no per-image work)."""
    out = []
    for label in store.labels(dataset):
        out.append((label, store.count_images(dataset, label=label, status="approved"),
                    store.count_images(dataset, label=label)))
    return out


# ------------------------------------------------------------------------------------------------
# Word diff
# ------------------------------------------------------------------------------------------------
_WORD = re.compile(r"\S+\s*")


def _word_tokens(text: str) -> list[str]:
    """Words with their trailing whitespace (leading whitespace rides on the first word)."""
    toks = _WORD.findall(text or "")
    lead = len(text or "") - len((text or "").lstrip())
    if toks and lead:
        toks[0] = text[:lead] + toks[0]
    elif lead:
        toks = [text]
    return toks


def word_diff(before: str, after: str) -> list[tuple[str, str | None]]:
    """Word-level diff as ``(text, tag)`` segments; tag is ``"-"`` (removed), ``"+"`` (added) or None.

    Words are compared without their whitespace (re-spacing is not an edit worth flagging); each word
    keeps its own spacing when shown, so joining the untagged and ``"+"`` segments gives ``after`` back
    exactly, and the untagged plus ``"-"`` segments give ``before`` up to whitespace.
    """
    a, b = _word_tokens(before), _word_tokens(after)
    sm = difflib.SequenceMatcher(a=[t.strip() for t in a], b=[t.strip() for t in b], autojunk=False)
    out: list[tuple[str, str | None]] = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            out.append(("".join(b[j1:j2]), None))
            continue
        if i2 > i1:
            out.append(("".join(a[i1:i2]), "-"))
        if j2 > j1:
            out.append(("".join(b[j1:j2]), "+"))
    return [seg for seg in out if seg[0]]


# ------------------------------------------------------------------------------------------------
# Token preview
# ------------------------------------------------------------------------------------------------
@dataclass
class TokenPreview:
    n_tokens: int           # incl. </s>
    limit: int
    kept: str               # the part of the caption the text encoder sees
    cut: str                # the part silently dropped by truncation ("" when within the limit)

    @property
    def over(self) -> bool:
        return self.n_tokens > self.limit


def token_preview(tokenizer: Any, text: str, limit: int = MAX_TOKENS) -> TokenPreview:
    """How ``text`` fares under PixArt's truncation at ``limit`` tokens (``</s>`` takes the last slot)."""
    text = text or ""
    with _TOKENIZER_LOCK:
        enc = tokenizer(text, add_special_tokens=True, truncation=False, return_offsets_mapping=True,
                        verbose=False)
    ids = enc["input_ids"]
    n = len(ids)
    if n <= limit:
        return TokenPreview(n, limit, text, "")
    # limit-1 content tokens survive; the eos is appended after truncation.
    offsets = enc["offset_mapping"]
    end = offsets[limit - 2][1] if limit >= 2 else 0
    return TokenPreview(n, limit, text[:end], text[end:])


# ------------------------------------------------------------------------------------------------
# Rule badges
# ------------------------------------------------------------------------------------------------
@dataclass
class Badge:
    name: str
    ok: bool
    detail: str


@dataclass
class ReviewRules:
    """What the badges check one class against: its seed caption and the VSG prompt it was drafted from."""

    seed: str
    features: list[str]
    prompt: str | None


def review_rules(ws: Any, store: "CaptionStore", dataset: str, label: str) -> ReviewRules:
    """The seed caption of ``label`` (dataset's own ``meta.seed_captions`` or the modality template) and the
    dataset's prompt for its modality (features, rendered prompt), exactly as the VSG uses them."""
    from . import vsg
    from .prompts import load_prompt

    info = store.dataset_info(dataset)
    seeds = (info.meta or {}).get("seed_captions") or {}
    seed = vsg.template_caption(label, info.modality, seeds if isinstance(seeds, dict) else None)
    try:
        tmpl = load_prompt(ws, dataset, info.modality)
        prompt = tmpl.render(seed, vsg.humanise_label(label))
        features = list(tmpl.features)
    except (ConfigError, KeyError, ValueError):  # a broken prompts file must not block reviewing
        prompt, features = None, []
    return ReviewRules(seed, features, prompt)


def rule_badges(text: str, *, seed: str | None, n_tokens: int, features: Sequence[str] = (),
                prompt: str | None = None, limit: int = MAX_TOKENS) -> list[Badge]:
    """The VSG's rules on the caption being edited, for a clinician to see at a glance:

    - seed: starts with the class seed caption ("An endoscopic image of polyps ...");
    - length: within the token limit, so nothing is truncated during training;
    - parroting: does not just echo the prompt's feature list or instructions (``vsg.parroting_reason``).
    """
    from .vsg import parroting_reason, starts_with_seed

    badges = []
    if seed:
        ok = starts_with_seed(text or "", seed)
        badges.append(Badge("seed", ok, "starts with the seed caption" if ok else f"does not start with {seed!r}"))
    badges.append(Badge("length", n_tokens <= limit, f"{n_tokens}/{limit} tokens"))
    why = parroting_reason(text or "", features, prompt, seed)
    badges.append(Badge("parroting", why is None, why or "no parroting"))
    return badges


# ------------------------------------------------------------------------------------------------
# Batch operations
# ------------------------------------------------------------------------------------------------
@dataclass
class BatchChange:
    image_id: int
    file_name: str
    label: str
    before: str
    after: str
    expected_version: int   # the version the preview was computed from: apply never overwrites newer work
    source: str | None = None   # set for re-drafts: the drafter that produced ``after``


def _changes(states: Sequence["CaptionState"], fn: Callable[[str], str]) -> list[BatchChange]:
    out = []
    for s in states:
        new = fn(s.text or "")
        if new != (s.text or ""):
            out.append(BatchChange(s.image_id, s.file_name or "", s.label or "", s.text or "", new, s.version))
    return out


def preview_find_replace(states: Sequence["CaptionState"], find: str, replace: str, *, regex: bool = True,
                         case_sensitive: bool = True) -> list[BatchChange]:
    """Every caption that ``find -> replace`` would change (``replace`` may use ``\\1`` groups in regex mode).

    All captions share one :mod:`~medart_core.userregex` budget; a pattern that runs past it raises
    ConfigError before any change is returned, so nothing can be applied from a cut-off preview."""
    if not find:
        raise ConfigError("Type what to find before previewing a find/replace.")
    rx = compile_user_regex(find, case_sensitive=case_sensitive, literal=not regex)
    if not regex:
        replace = replace.replace("\\", "\\\\")   # literal mode: backslashes in the replacement are text
    rx.check_replacement(replace)              # surface bad group references before touching data
    return _changes(states, lambda t: rx.sub(replace, t))


def preview_affix(states: Sequence["CaptionState"], *, prefix: str = "", suffix: str = "") -> list[BatchChange]:
    """Prepend ``prefix`` / append ``suffix`` to every caption (verbatim: include your own spaces)."""
    if not prefix and not suffix:
        raise ConfigError("Type a prefix or a suffix before previewing.")
    return _changes(states, lambda t: f"{prefix}{t}{suffix}")


def available_drafters() -> list[str]:
    """Drafters that run without a GPU model: the class template is always there."""
    return ["template"]


def draft_text(drafter: str, label: str, modality: str, seed_captions: dict | None = None) -> str:
    """One draft from a model-free drafter. VLM/shorten drafts need a GPU job (vsg.caption_dataset)."""
    if drafter != "template":
        raise ConfigError(f"Drafter {drafter!r} cannot run from the caption tab; use 'template' here, or run "
                          "`python -m medart_core caption` for VLM drafts.")
    from . import vsg
    return vsg.template_caption(label, modality, seed_captions)


def preview_redraft(store: "CaptionStore", dataset: str, states: Sequence["CaptionState"],
                    drafter: str = "template") -> list[BatchChange]:
    """Replace each caption by a fresh draft from ``drafter``."""
    info = store.dataset_info(dataset)
    seeds = (info.meta or {}).get("seed_captions")
    seeds = seeds if isinstance(seeds, dict) else None
    by_label: dict[str, str] = {}
    out = []
    for s in states:
        label = s.label or ""
        if label not in by_label:
            by_label[label] = draft_text(drafter, label, info.modality, seeds)
        new = by_label[label]
        if new != (s.text or ""):
            out.append(BatchChange(s.image_id, s.file_name or "", label, s.text or "", new, s.version, drafter))
    return out


def new_batch_id() -> str:
    """``batch:<12 hex>``, the caption store's batch id (one definition: :func:`medart_core.clock.new_batch_id`)."""
    from .clock import new_batch_id as batch_id

    return batch_id("batch")


def apply_batch(store: "CaptionStore", changes: Sequence[BatchChange], *, reviewer: str,
                batch_id: str | None = None) -> BatchResult:
    """Write the previewed changes as one batch.

    Each write passes the version the preview saw, so an image someone edited after the preview is
    skipped and reported, never overwritten. Re-drafts are recorded as a draft event (provenance:
    which drafter) followed by an edit adopting it, so the text changes even where a human edited before.
    """
    if not reviewer:
        raise ConfigError("Enter your name (reviewer) before applying a batch.")
    result = BatchResult(batch_id or new_batch_id(), since="the preview")
    for ch in changes:
        try:
            version = ch.expected_version
            if ch.source:
                cur = store.current(ch.image_id)
                if cur.version != version:
                    raise ConflictError("changed since preview", expected=version, actual=cur.version,
                                        current_text=cur.text)
                ev = store.add_draft(ch.image_id, ch.after, source=ch.source, reviewer=reviewer,
                                     batch_id=result.batch_id)
                result.events.append(ev)
                version = ev.id
                if store.current(ch.image_id).text == ch.after:
                    continue
            result.events.append(store.edit(ch.image_id, ch.after, reviewer=reviewer, expected_version=version,
                                            batch_id=result.batch_id))
        except ConflictError as e:
            result.conflicts.append(BatchConflict(ch.image_id, e.expected, e.actual))
    return result


def undo_batch(store: "CaptionStore", batch_id: str, *, reviewer: str) -> Any:
    """Undo a whole batch as one unit (the store appends compensating events; history is kept)."""
    if not batch_id:
        raise ConfigError("No batch to undo: apply a batch first or paste its id.")
    if not reviewer:
        raise ConfigError("Enter your name (reviewer) before undoing a batch.")
    return store.undo_batch(batch_id, reviewer=reviewer)


def changes_table(changes: Sequence[BatchChange]) -> list[list[Any]]:
    """Rows for the preview table: plain strings (the UI renders them as text, never HTML)."""
    return [[c.image_id, c.file_name, c.label, c.before, c.after] for c in changes]


__all__ = [
    "MAX_TOKENS", "CaptionFilter", "compile_search", "TokenCounter", "filter_states", "progress_by_class",
    "word_diff", "TokenPreview", "token_preview", "Badge",
    "ReviewRules", "review_rules", "rule_badges", "BatchChange", "BatchResult",
    "preview_find_replace", "preview_affix", "preview_redraft", "available_drafters", "draft_text",
    "new_batch_id", "apply_batch", "undo_batch", "changes_table",
]
