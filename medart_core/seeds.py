"""Seed derivation: one rule for every independent random stream (training steps, crops, drafts, samples)."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def derive_seed(*parts: Any, bits: int = 63) -> int:
    """A ``bits``-bit seed from any tuple of parts: independent streams for (purpose, rank, step, ...).

    sha256 over the JSON list of the parts' ``str``; 63 bits fit ``torch.Generator.manual_seed`` and an
    SQLite integer, 31 bits fit every RNG (numpy's legacy seeding included)."""
    if not 1 <= bits <= 63:
        raise ValueError(f"bits must be in 1..63, got {bits}")
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(h[:8], "big") & ((1 << bits) - 1)
