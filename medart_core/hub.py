"""The Hugging Face Hub rules every loader shares: whether we are offline, what a Hub id looks like, and
whether the Hub answers at all. Loaders (backbone, VSG models, LoRA cards) ask here, so they agree."""
from __future__ import annotations

import os
import re

# A repo id as the Hub spells it: ``name`` (legacy canonical repos such as ``t5-large``) or ``owner/name``,
# letters, digits, ``_``, ``.`` and ``-`` only, starting with a letter or digit.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (``1``/``true``/``yes``/``on``): read the local cache only, never download."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def looks_like_hub_id(spec: str, *, require_owner: bool = False) -> bool:
    """Whether ``spec`` is spelled like a Hub repo id (it may still not exist).

    ``require_owner`` accepts only ``owner/name`` (PixArt backbones are never legacy bare names). Anything
    else (``./x``, ``/abs``, ``~/x``, ``a/b/c``, text with spaces) is a path or a typo, not an id."""
    if not isinstance(spec, str) or not _HUB_ID.match(spec):
        return False
    return "/" in spec or not require_owner


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers a TCP connect within ``timeout`` seconds.

    huggingface_hub retries a dead network for about a minute per file; probing once first lets an offline
    machine fall back to the local cache at once instead of appearing to hang.
    """
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
