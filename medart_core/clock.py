"""Timestamps and batch ids the stores write: one definition each, so their stored formats cannot drift.

Two timestamp formats are stored and both stay as they are (old databases keep parsing, and text columns
compare as strings): the caption store's events carry milliseconds and an explicit offset
(:func:`utc_now_ms`, ``2026-12-07T16:43:02.123+00:00``); the users table and blind reviews carry whole
seconds with ``Z`` (:func:`utc_now`, ``2026-12-07T16:43:02Z``). The job ledger stores epoch seconds (floats).
"""
from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

__all__ = ["utc_now", "utc_now_ms", "new_batch_id"]


def utc_now() -> str:
    """UTC now as ``YYYY-MM-DDTHH:MM:SSZ`` (users, blind reviews)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def utc_now_ms() -> str:
    """UTC now as ISO 8601 with milliseconds and ``+00:00`` (caption events, datasets)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_batch_id(kind: str = "batch") -> str:
    """``<kind>:<12 hex>``: the id a batch of caption writes is undone by (``batch``, ``import``, ``undo``, …)."""
    return f"{kind}:{uuid.uuid4().hex[:12]}"
