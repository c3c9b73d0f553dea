"""User-facing failures, one type per kind. Each message says what to do next.

The studio turns these into ``gr.Error`` / ``gr.Warning``; the CLI prints the message and exits non-zero.
Anything that is *not* a ``MedArtError`` is a bug and keeps its traceback.
"""
from __future__ import annotations


class MedArtError(Exception):
    """Base class: a failure the user can act on (its message says how)."""


class MissingWeightsError(MedArtError):
    """Model weights are neither in a local folder nor in the Hugging Face cache, and the Hub is unreachable."""


class InvalidImageError(MedArtError):
    """A file is not a usable image (corrupt, truncated, too large, wrong type, unsafe name)."""


class ConflictError(MedArtError):
    """A write was based on a stale version of a record; nothing was changed."""

    def __init__(self, message: str, *, expected: object = None, actual: object = None,
                 current_text: str | None = None):
        super().__init__(message)
        self.expected = expected
        self.actual = actual
        self.current_text = current_text


class NotFoundError(MedArtError):
    """A dataset, image, run or checkpoint that was named does not exist."""


class ConfigError(MedArtError):
    """A configuration value is invalid or inconsistent."""


class TrainingDivergedError(MedArtError):
    """Training produced a NaN/Inf loss or a degenerate image; the last good checkpoint is kept."""


class StaleCacheError(MedArtError):
    """A feature cache is incomplete or does not match the data/backbone; rebuild it before training."""


class UnsafeFileError(MedArtError):
    """A weights file would need arbitrary code to load (a pickle that is not a plain tensor dict)."""


class ProfileMismatchError(MedArtError):
    """Two metric results were measured under different protocols and must not be compared or ranked."""
