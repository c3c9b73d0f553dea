"""What every studio tab shares: the workspace, the caption store, the review resources (tokenizer, rules
caches) and who is at the keyboard (``access``: open mode, password sign-in or Hugging Face OAuth; see
``studio/auth.py``)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medart_core.constants import MAX_REVIEWER_CHARS, RANDOM_LABEL
from medart_core.workspace import Workspace

from .auth import Access

if TYPE_CHECKING:
    import gradio as gr

    from medart_core.blind import ReviewStore
    from medart_core.captions import CaptionStore
    from medart_core.jobs import Executor
    from medart_core.review import ReviewContext


@dataclass
class StudioContext:
    ws: Workspace
    store: "CaptionStore"
    backbone_spec: str = "tiny"
    auth_enabled: bool = False
    # Background work started by the shell (e.g. building the sample dataset on first start).
    status: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Who may do what: open (no users; everyone is admin), password sign-in, or Hugging Face OAuth on a Space.
    access: Access = field(default_factory=Access)
    environment: str | None = None   # the banner's "where we run" line (medart_core.spaces), read once
    gate: Any = None                 # studio.gate.GateParts once serve_kwargs made them (policy, sessions)
    _review: "ReviewContext | None" = field(default=None, init=False, repr=False, compare=False)
    _review_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _executor: "Executor | None" = field(default=None, init=False, repr=False, compare=False)
    _reviews: "ReviewStore | None" = field(default=None, init=False, repr=False, compare=False)
    _tokenizers: dict[str, tuple[Any, str]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.auth_enabled = self.auth_enabled or self.access.enabled

    @property
    def review(self) -> "ReviewContext":
        """The Captions tab's shared review resources (the backbone's tokenizer, per-class rules), made once."""
        with self._review_lock:
            if self._review is None:
                from medart_core.review import ReviewContext

                self._review = ReviewContext(self.ws, self.store, self.backbone_spec)
            return self._review

    @property
    def executor(self) -> "Executor":
        """The one door to this workspace's jobs (submit, stop, resume, and every read), made once."""
        with self._review_lock:
            if self._executor is None:
                from medart_core.jobs import LocalExecutor

                self._executor = LocalExecutor(self.ws)
            return self._executor

    @property
    def reviews(self) -> "ReviewStore":
        """The blind-review store of this workspace, made once."""
        with self._review_lock:
            if self._reviews is None:
                from medart_core.blind import ReviewStore

                self._reviews = ReviewStore.for_workspace(self.ws)
            return self._reviews

    def prompt_tokenizer(self) -> tuple[Any, str]:
        """The tokenizer prompts are counted with, and how the UI names it (cheap: no model weights); the
        project's tiny tokenizer, said so, where the backbone's own is not available offline."""
        spec = self.backbone_spec or "tiny"
        with self._review_lock:
            if spec not in self._tokenizers:
                from medart_core import generate as G
                from medart_core.backbone import load_tokenizer
                from medart_core.errors import MedArtError

                try:
                    self._tokenizers[spec] = (load_tokenizer(spec), G.tokenizer_label(spec))
                except MedArtError:
                    self._tokenizers[spec] = (load_tokenizer("tiny"), "the project's tiny Unigram tokenizer (the "
                                              "backbone's own T5 tokenizer is not available offline), not T5's")
            return self._tokenizers[spec]

    def warm_up(self) -> threading.Thread:
        """Load what the first clicks need (the tokenizer of the token counters) in the background, once the
        server is serving: the studio's start does not wait for it."""
        t = threading.Thread(target=lambda: self.review.tokenizer(), name="warm-up", daemon=True)
        t.start()
        return t

    @property
    def backbone_is_random(self) -> bool:
        from medart_core.backbone import PRESETS

        return self.backbone_spec in PRESETS

    def backbone_label(self) -> str:
        if self.backbone_spec == "demo":
            from medart_core.constants import DEMO_LABEL

            return f"demo ({DEMO_LABEL})"
        return f"{self.backbone_spec} ({RANDOM_LABEL})" if self.backbone_is_random else self.backbone_spec

    def environment_line(self) -> str:
        """Where the studio runs (Spaces, ZeroGPU, the accelerator), for the banner; read once per process."""
        if self.environment is None:
            from medart_core.spaces import banner_text, environment

            self.environment = banner_text(environment(self.ws.root))
        return self.environment

    def reviewer_for(self, request: "gr.Request | None", typed_name: str | None) -> str | None:
        """The logged-in user when auth is on (``request.username``, or the Hugging Face profile on a Space);
        otherwise the name typed once per browser session."""
        if request is None:
            user = None
        elif self.access.enabled:
            user = self.access.user_of(request)      # the account's stored spelling: one identity per account
        else:
            user = getattr(request, "username", None)
        if user:
            return str(user)
        if self.access.enabled:
            return None          # with sign-in on, a typed name never stands in for the user
        name = (typed_name or "").strip()
        return name[:MAX_REVIEWER_CHARS] or None
