"""Review sessions: the rules of reviewing captions one image at a time (what the Captions tab shows), with
no UI in them.

A :class:`ReviewSession` is one reviewer's place in a dataset: the filtered id list, where they are in it,
and the version the editor's text was loaded from. Its methods are the tab's actions (move, save, approve
& next, keep mine, batch preview/apply/undo, ...). Each returns plain view data (:class:`ReviewView`,
:class:`LiveView`, :class:`BatchView`) for the studio to render; a failure the reviewer can fix (no name
typed, invalid regex, nothing previewed) is raised as a ``MedArtError`` and nothing is written.

The rules:

- never lose or silently overwrite a word: every write passes the version the editor loaded; a stale
  write returns a :class:`Conflict` (theirs vs mine) to resolve with :meth:`~ReviewSession.keep_mine` or
  :meth:`~ReviewSession.take_theirs`; moving away from unsaved text saves it first;
- the editor key (``"<image id>:<version>"``) travels with the text, so a queued keypress carrying an
  older image's text can never be written onto the next image;
- 10,000 images: a session holds only ids and an index; "next pending" probes a few images before one
  bulk query.

What all sessions of one workspace share (the store, the backbone's tokenizer and token counter, each
class's rules) is a :class:`ReviewContext`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import interchange
from .caption_ops import (Badge, BatchChange, CaptionFilter, ReviewRules, TokenCounter, TokenPreview,
                          apply_batch, changes_table, filter_states, preview_affix, preview_find_replace,
                          preview_redraft, progress_by_class, review_rules, rule_badges, token_preview,
                          undo_batch, word_diff)
from .errors import ConfigError, ConflictError, MedArtError

if TYPE_CHECKING:
    from .captions import CaptionEvent, CaptionState, CaptionStore

NEAR_PROBES = 40              # next pending: images checked one by one before one bulk query
PREVIEW_ROWS_SHOWN = 2000     # a batch preview lists this many changes; the whole batch is applied
BATCH_OPS = ["find / replace", "prepend / append", "re-draft"]
EXPORTERS = {"imagefolder": interchange.export_imagefolder, "medart-csv": interchange.export_medart_csv}

__all__ = [
    "ReviewError", "ReviewContext", "ReviewSession", "Notice", "LiveView", "ImageView", "Conflict", "ReviewView",
    "BatchView", "NEAR_PROBES", "PREVIEW_ROWS_SHOWN", "BATCH_OPS", "EXPORTERS",
]


class ReviewError(MedArtError):
    """A review action cannot run as asked (no image shown, no reviewer name, nothing previewed); nothing was
    written."""


# ------------------------------------------------------------------------------------------------
# What all sessions share
# ------------------------------------------------------------------------------------------------
class ReviewContext:
    """The workspace and store of a studio, the backbone's T5 tokenizer (loaded once) with its token counter,
    and each class's review rules (re-read when the dataset's prompts file changes)."""

    def __init__(self, ws: Any, store: "CaptionStore", backbone_spec: str | None = "tiny"):
        self.ws, self.store = ws, store
        self.backbone_spec = backbone_spec or "tiny"
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._counter: TokenCounter | None = None
        self._rules: dict[tuple[str, str], tuple[float, ReviewRules | None]] = {}

    def tokenizer(self) -> Any:
        """The backbone's T5 tokenizer; the bundled tiny one when the backbone's is not available offline
        (the counts then come from the tiny vocabulary)."""
        with self._lock:
            if self._tokenizer is None:
                from .backbone import load_tokenizer

                try:
                    self._tokenizer = load_tokenizer(self.backbone_spec)
                except MedArtError:
                    self._tokenizer = load_tokenizer("tiny")
            return self._tokenizer

    def counter(self) -> TokenCounter:
        tok = self.tokenizer()
        with self._lock:
            if self._counter is None:
                self._counter = TokenCounter(tok)
            return self._counter

    def rules(self, dataset: str, label: str) -> ReviewRules | None:
        """Seed/prompt of a class, cached until the dataset's prompts file changes (edited in another tab)."""
        try:
            mtime = self.ws.prompts_path(dataset).stat().st_mtime
        except OSError:
            mtime = 0.0
        hit = self._rules.get((dataset, label))
        if hit is None or hit[0] != mtime:
            try:
                rules = review_rules(self.ws, self.store, dataset, label)
            except MedArtError:
                rules = None   # no badges beat a broken tab
            hit = self._rules[(dataset, label)] = (mtime, rules)
        return hit[1]

    def progress(self, dataset: str | None) -> list[tuple[str, int, int]] | None:
        """``(label, approved, total)`` per class; None without a dataset."""
        return progress_by_class(self.store, dataset) if dataset else None


# ------------------------------------------------------------------------------------------------
# View data (plain values; the studio renders them)
# ------------------------------------------------------------------------------------------------
@dataclass
class Notice:
    text: str = ""
    warn: bool = False       # something did not happen as asked (shown prominently)


@dataclass
class LiveView:
    """What changes with every keystroke in the editor."""

    tokens: TokenPreview
    badges: list[Badge]
    diff: list[tuple[str, str | None]] | None   # word diff against the latest draft; None: no draft


@dataclass
class ImageView:
    """Everything shown about the current image."""

    caption: "CaptionState"          # text, status, version, latest draft, last reviewer, class, file
    position: int                    # 1-based, in the filtered list
    total: int
    image_path: str
    key: str                         # the editor key to send back with the text
    history: list["CaptionEvent"]    # oldest first
    live: LiveView


@dataclass
class Conflict:
    actual: int          # the version that beat the editor's
    theirs: str          # the text saved now
    mine: str            # the editor's text, not saved


@dataclass
class ReviewView:
    """What an action leaves on screen. ``redraw``: show ``image`` (None: nothing matches) and ``progress``;
    otherwise the page stays as it was except the notice and whatever else is set here."""

    notice: Notice
    redraw: bool = False
    image: ImageView | None = None
    progress: list[tuple[str, int, int]] | None = None
    conflict: Conflict | None = None                 # open the conflict panel with both texts
    history: list["CaptionEvent"] | None = None      # page kept, history and editor key new (a comment)
    key: str | None = None
    clear_comment: bool = False
    labels: list[str] | None = None                  # the dataset's classes (after opening it)


@dataclass
class BatchView:
    notice: Notice
    rows: list[list[Any]] | None = None     # preview table (first PREVIEW_ROWS_SHOWN); [] clears it
    review: ReviewView | None = None        # apply/undo: the page, redrawn
    batch_id: str | None = None             # apply/undo: the batch to offer for undo


def _now_hm() -> str:
    return datetime.now(timezone.utc).strftime("%H:%M:%S")


# ------------------------------------------------------------------------------------------------
# The session
# ------------------------------------------------------------------------------------------------
@dataclass
class ReviewSession:
    """One reviewer's session: small on purpose (ids of the filtered set + where we are), plain values only
    so a UI may copy it per browser tab."""

    dataset: str | None = None
    flt: CaptionFilter = field(default_factory=CaptionFilter)
    ids: list[int] = field(default_factory=list)     # filtered image ids, in store order
    index: int = 0
    image_id: int | None = None
    loaded_version: int = 0        # the version the editor's text was loaded from: every write passes it
    loaded_text: str = ""
    rules: ReviewRules | None = None   # seed/prompt of the shown image's class (for the badges)
    conflict: Conflict | None = None
    pending_batch: list[BatchChange] = field(default_factory=list)
    last_batch: str | None = None
    progress: list[tuple[str, int, int]] | None = None
    listed_at: str = ""

    @property
    def editor_key(self) -> str:
        """What the editor shows, as ``"<image id>:<version>"``; the UI sends it back with the text."""
        return f"{self.image_id}:{self.loaded_version}" if self.image_id is not None else ""

    # --- showing -------------------------------------------------------------------------------
    def show(self, rc: ReviewContext, notice: Notice | None = None) -> ReviewView:
        """Load the image at ``index`` and everything shown about it (the one read path)."""
        notice = notice or Notice()
        if not self.ids:
            self.image_id = None
            self.loaded_version, self.loaded_text = 0, ""
            return ReviewView(notice, redraw=True, progress=self.progress)
        self.index = max(0, min(self.index, len(self.ids) - 1))
        image_id = self.ids[self.index]
        cur = rc.store.current(image_id)
        history = rc.store.history(image_id)
        self.image_id, self.loaded_version, self.loaded_text = image_id, cur.version, cur.text
        self.conflict = None
        self.rules = rc.rules(self.dataset, cur.label or "")
        draft = cur.latest_draft
        image = ImageView(cur, self.index + 1, len(self.ids), str(rc.ws.image_path(self.dataset, cur.file_name)),
                          self.editor_key, history, self._live(rc, cur.text, draft.text if draft else None))
        return ReviewView(notice, redraw=True, image=image, progress=self.progress)

    def _live(self, rc: ReviewContext, text: str, draft_text: str | None) -> LiveView:
        preview = token_preview(rc.tokenizer(), text)
        r = self.rules
        badges = rule_badges(text, seed=r.seed if r else None, n_tokens=preview.n_tokens,
                             features=r.features if r else (), prompt=r.prompt if r else None)
        return LiveView(preview, badges, None if draft_text is None else word_diff(draft_text, text))

    def live(self, rc: ReviewContext, text: str) -> LiveView:
        """Per keystroke: token counter, truncation preview, badges and diff against the draft (no writes)."""
        draft = None
        if self.image_id is not None:
            cur_draft = rc.store.current(self.image_id).latest_draft
            draft = cur_draft.text if cur_draft else None
        return self._live(rc, text or "", draft)

    # --- the filtered list ---------------------------------------------------------------------
    def open(self, rc: ReviewContext, dataset: str | None) -> ReviewView:
        """Switch dataset: reset the filters; the view carries the dataset's classes."""
        labels = rc.store.labels(dataset) if dataset else []
        view = self.apply_filters(rc, dataset, CaptionFilter())
        view.labels = labels
        return view

    def apply_filters(self, rc: ReviewContext, dataset: str | None, flt: CaptionFilter,
                      keep_position: bool = False) -> ReviewView:
        """(Re)build the filtered id list with one ``store.states`` call and show its first image (or, with
        ``keep_position``, the one shown now if it is still in the list). An invalid regex raises
        ConfigError and leaves the session as it was."""
        if not dataset:
            self.dataset, self.ids = None, []
            return self.show(rc, Notice("Pick a dataset (build the sample dataset in the Dataset tab)."))
        states = filter_states(rc.store, dataset, flt, counter=rc.counter())
        previous = self.image_id if (keep_position and self.dataset == dataset) else None
        self.dataset, self.flt = dataset, flt
        self.ids = [s.image_id for s in states]
        self.index = self.ids.index(previous) if previous in self.ids else 0
        self.pending_batch = []
        self.listed_at = _now_hm()
        self.progress = rc.progress(dataset)
        return self.show(rc, Notice(f"{len(self.ids)} image(s) match (list taken {self.listed_at} UTC)."))

    # --- save before anything else -------------------------------------------------------------
    def _stale_key(self, key: str | None) -> bool:
        return key is not None and key != "" and key != self.editor_key

    def _write_if_changed(self, rc: ReviewContext, text: str, reviewer: str | None) -> bool:
        """Save the editor's text when it differs from what was loaded; True if it was written.

        Raises ConflictError (stale version) or a MedArtError (no reviewer / invalid text): nothing written."""
        if self.image_id is None or text == self.loaded_text:
            return False
        if not reviewer:
            raise ReviewError("Enter your name in “Reviewer” first: every change records who made it. "
                              "Nothing was saved.")
        ev = rc.store.edit(self.image_id, text, reviewer=reviewer, expected_version=self.loaded_version)
        self.loaded_version, self.loaded_text = ev.id, text
        return True

    def _conflict(self, err: ConflictError, mine: str) -> ReviewView:
        self.conflict = Conflict(err.actual, err.current_text or "", mine)
        return ReviewView(Notice("Someone else changed this caption while you were editing. Nothing was saved: "
                                 "choose “keep mine” or “take theirs” below.", warn=True), conflict=self.conflict)

    def _flush(self, rc: ReviewContext, text: str, key: str | None, reviewer: str | None,
               stale_msg: str = "The editor was out of date; nothing was written.") -> tuple[bool, ReviewView | None]:
        """Write the editor's text (if changed) on the version it was loaded from, before any other action.

        Returns ``(saved, None)`` to go on, or ``(False, view)`` when the action stops here: a stale key (a
        repeated keypress: the current image is shown again) or a conflict (both texts). Invalid text or no
        reviewer raise, with nothing written."""
        if self._stale_key(key):
            return False, self.show(rc, Notice(stale_msg, warn=True))
        try:
            return self._write_if_changed(rc, text, reviewer), None
        except ConflictError as e:
            return False, self._conflict(e, text)

    # --- moving ----------------------------------------------------------------------------------
    def move(self, rc: ReviewContext, text: str, key: str | None, reviewer: str | None, step: int) -> ReviewView:
        """Save unsaved text, then go ``step`` images along the filtered list (stopping at either end)."""
        saved, stop = self._flush(rc, text, key, reviewer,
                                  "The editor was out of date (a key was pressed twice quickly); nothing was "
                                  "written. Check the text and try again.")
        if stop is not None:
            return stop
        if not self.ids:
            return self.show(rc, Notice("No image matches the filters."))
        new_index = self.index + step
        note = "Saved your edit before moving. " if saved else ""
        if new_index >= len(self.ids):
            return self.show(rc, Notice(note + "That was the last image of the filtered list."))
        if new_index < 0:
            return self.show(rc, Notice(note + "This is the first image of the filtered list."))
        self.index = new_index
        return self.show(rc, Notice(note))

    def next_pending(self, rc: ReviewContext, text: str, key: str | None, reviewer: str | None) -> ReviewView:
        """Jump to the next image (in the filtered order, wrapping) whose status is *now* pending."""
        saved, stop = self._flush(rc, text, key, reviewer)
        if stop is not None:
            return stop
        if not self.ids:
            return self.show(rc, Notice("No image matches the filters."))
        n, start = len(self.ids), self.index
        note = "Saved your edit before moving. " if saved else ""
        # Reviewing in order, the next pending image is usually a few steps away: probe those one by one
        # (~0.2 ms each) and only fall back to one bulk query for long jumps.
        for k in range(1, min(n, NEAR_PROBES) + 1):
            i = (start + k) % n
            if rc.store.current(self.ids[i]).status == "pending":
                self.index = i
                return self.show(rc, Notice(note + ("Wrapped to the start of the list. " if i <= start else "")))
        pending = {s.image_id for s in rc.store.states(self.dataset, status="pending")}
        for k in range(1, n + 1):
            i = (start + k) % n
            if self.ids[i] in pending:
                self.index = i
                return self.show(rc, Notice(note + ("Wrapped to the start of the list. " if i <= start else "")))
        return self.show(rc, Notice(note + "No pending image left in this filtered list."))

    def go_to(self, rc: ReviewContext, position: int | float | None, text: str, key: str | None,
              reviewer: str | None) -> ReviewView:
        """Jump to the 1-based ``position`` of the filtered list (clamped to it)."""
        if position is None or not self.ids:
            return ReviewView(Notice())
        target = max(1, min(len(self.ids), int(position))) - 1
        return self.move(rc, text, key, reviewer, target - self.index)

    # --- writing ---------------------------------------------------------------------------------
    def save(self, rc: ReviewContext, text: str, key: str | None, reviewer: str | None) -> ReviewView:
        """Save the editor text as an edit on the version it was loaded from."""
        if self.image_id is None:
            raise ReviewError("No image is shown; nothing to save.")
        saved, stop = self._flush(rc, text, key, reviewer)
        if stop is not None:
            return stop
        if not saved:
            return ReviewView(Notice("No change to save."))
        return self.show(rc, Notice(f"Saved (version {self.loaded_version})."))

    def set_status_and_next(self, rc: ReviewContext, status: str, text: str, key: str | None,
                            reviewer: str | None, advance: bool = True) -> ReviewView:
        """Approve / reject / second read: saves pending edits first (so what is approved is what is seen)."""
        if self.image_id is None:
            raise ReviewError("No image is shown.")
        if self._stale_key(key):
            return self.show(rc, Notice("The editor was out of date; nothing was written.", warn=True))
        if not reviewer:
            raise ReviewError("Enter your name in “Reviewer” first: every decision records who made it. "
                              "Nothing was saved.")
        try:
            self._write_if_changed(rc, text, reviewer)
            ev = rc.store.set_status(self.image_id, status, reviewer=reviewer, expected_version=self.loaded_version)
        except ConflictError as e:
            return self._conflict(e, text)
        self.loaded_version = ev.id
        self.progress = rc.progress(self.dataset)
        done = f"Image #{self.image_id} marked {status}."
        if advance and self.index + 1 < len(self.ids):
            self.index += 1
        elif advance:
            done += " That was the last image of the filtered list."
        return self.show(rc, Notice(done))

    def keep_mine(self, rc: ReviewContext, mine: str, reviewer: str | None) -> ReviewView:
        """Conflict resolution: write my text on top of the version that beat me (explicit, not silent)."""
        if not self.conflict or self.image_id is None:
            return ReviewView(Notice("No conflict to resolve."))
        if not reviewer:
            raise ReviewError("Enter your name in “Reviewer” first. Nothing was saved.")
        try:
            ev = rc.store.edit(self.image_id, mine, reviewer=reviewer, expected_version=int(self.conflict.actual))
        except ConflictError as e:   # changed yet again: show the newest "theirs"
            return self._conflict(e, mine)
        return self.show(rc, Notice(f"Kept your text (saved as version {ev.id})."))

    def take_theirs(self, rc: ReviewContext) -> ReviewView:
        """Conflict resolution: drop my unsaved text and load the current one."""
        return self.show(rc, Notice("Loaded their text; your unsaved text was discarded."))

    def add_comment(self, rc: ReviewContext, comment: str, reviewer: str | None) -> ReviewView:
        if self.image_id is None:
            raise ReviewError("No image is shown.")
        if not reviewer:
            raise ReviewError("Enter your name in “Reviewer” first. The comment was not saved.")
        if not (comment or "").strip():
            raise ReviewError("Type a comment first.")
        ev = rc.store.comment(self.image_id, comment, reviewer=reviewer)
        # A comment moves the version. Re-base the editor on it only if nothing else happened since the
        # editor was loaded, so my own comment never turns my next save into a conflict, while someone
        # else's edit in between still does.
        hist = rc.store.history(self.image_id)
        if all(e.id <= self.loaded_version or e.id == ev.id for e in hist):
            self.loaded_version = ev.id
        return ReviewView(Notice(f"Comment added (event #{ev.id})."), history=hist, key=self.editor_key,
                          clear_comment=True)

    def restore(self, rc: ReviewContext, event_id: int | str | None, reviewer: str | None) -> ReviewView:
        """Make an earlier text of the image (``event_id`` from its history) current again."""
        if self.image_id is None or event_id in (None, ""):
            raise ReviewError("Pick a version from the history first.")
        if not reviewer:
            raise ReviewError("Enter your name in “Reviewer” first. Nothing was restored.")
        try:
            ev = rc.store.restore(self.image_id, int(event_id), reviewer=reviewer,
                                  expected_version=self.loaded_version)
        except ConflictError as e:
            return self._conflict(e, self.loaded_text)
        return self.show(rc, Notice(f"Restored the text of event #{event_id} (new event #{ev.id})."))

    # --- batches -----------------------------------------------------------------------------------
    def batch_preview(self, rc: ReviewContext, op: str, find: str, replace: str, regex: bool, prefix: str,
                      suffix: str, drafter: str) -> BatchView:
        """Compute (and remember) every change the batch would make on the current filtered set. On an
        error the remembered batch is dropped, so "Apply" can never apply an older preview."""
        if not self.dataset:
            raise ReviewError("Pick a dataset first.")
        self.pending_batch = []
        states = filter_states(rc.store, self.dataset, self.flt, counter=rc.counter())
        if op == "find / replace":
            changes = preview_find_replace(states, find or "", replace or "", regex=bool(regex))
        elif op == "prepend / append":
            changes = preview_affix(states, prefix=prefix or "", suffix=suffix or "")
        elif op == "re-draft":
            changes = preview_redraft(rc.store, self.dataset, states, drafter or "template")
        else:
            raise ConfigError(f"Unknown batch operation {op!r}.")
        self.pending_batch = changes
        msg = f"{len(changes)} of {len(states)} filtered caption(s) would change."
        if len(changes) > PREVIEW_ROWS_SHOWN:
            msg += f" Showing the first {PREVIEW_ROWS_SHOWN}."
        if changes:
            msg += " Review them, then press “Apply batch”."
        return BatchView(Notice(msg), rows=changes_table(changes[:PREVIEW_ROWS_SHOWN]))

    def batch_apply(self, rc: ReviewContext, reviewer: str | None) -> BatchView:
        """Write the previewed batch as one unit (images changed since the preview are skipped)."""
        if not self.pending_batch:
            raise ReviewError("Preview a batch first: only previewed changes are applied.")
        if not reviewer:
            raise ReviewError("Enter your name in “Reviewer” first. Nothing was applied.")
        result = apply_batch(rc.store, self.pending_batch, reviewer=reviewer)
        self.pending_batch = []
        self.last_batch = result.batch_id
        self.progress = rc.progress(self.dataset)
        view = self.show(rc, Notice(result.summary()))
        return BatchView(Notice(result.summary() + " Undo it with “Undo batch”."), rows=[], review=view,
                         batch_id=result.batch_id)

    def batch_undo(self, rc: ReviewContext, batch_id: str | None, reviewer: str | None) -> BatchView:
        """Undo ``batch_id`` (empty: this session's last batch) as one unit."""
        batch_id = (batch_id or "").strip() or self.last_batch
        report = undo_batch(rc.store, batch_id or "", reviewer=reviewer or "")
        self.progress = rc.progress(self.dataset)
        view = self.show(rc, Notice(report.summary()))
        return BatchView(Notice(report.summary()), rows=[], review=view, batch_id=report.undo_batch_id or "")

    # --- export ------------------------------------------------------------------------------------
    def export(self, rc: ReviewContext, fmt: str) -> Notice:
        """Export the dataset's approved captions into ``exports/<dataset>-<format>-<UTC timestamp>``."""
        if not self.dataset:
            raise ReviewError("Pick a dataset first.")
        if fmt not in EXPORTERS:
            raise ReviewError(f"Unknown export format {fmt!r}.")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        out_dir = Path(rc.ws.exports_dir) / f"{self.dataset}-{fmt}-{stamp}"
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        report = EXPORTERS[fmt](rc.store, rc.ws, self.dataset, out_dir)
        return Notice(f"{report.exported} image(s) exported ({fmt}) to {report.out_dir}")
