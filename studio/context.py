"""What every studio tab shares: the workspace, the caption store, the review resources (tokenizer, rules
caches) and who is at the keyboard."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medart_core.constants import MAX_REVIEWER_CHARS, RANDOM_LABEL
from medart_core.workspace import Workspace

if TYPE_CHECKING:
    import gradio as gr

    from medart_core.captions import CaptionStore
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
    _review: "ReviewContext | None" = field(default=None, init=False, repr=False, compare=False)
    _review_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def review(self) -> "ReviewContext":
        """The Captions tab's shared review resources (the backbone's tokenizer, per-class rules), made once."""
        with self._review_lock:
            if self._review is None:
                from medart_core.review import ReviewContext

                self._review = ReviewContext(self.ws, self.store, self.backbone_spec)
            return self._review

    @property
    def backbone_is_random(self) -> bool:
        from medart_core.backbone import PRESETS

        return self.backbone_spec in PRESETS

    def backbone_label(self) -> str:
        return f"{self.backbone_spec} ({RANDOM_LABEL})" if self.backbone_is_random else self.backbone_spec

    def reviewer_for(self, request: "gr.Request | None", typed_name: str | None) -> str | None:
        """The logged-in user when auth is on; otherwise the name typed once per browser session."""
        user = getattr(request, "username", None) if request is not None else None
        if user:
            return str(user)
        name = (typed_name or "").strip()
        return name[:MAX_REVIEWER_CHARS] or None
