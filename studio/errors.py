"""The studio's one convention for user errors: library code raises a ``MedArtError`` whose message says
what to do; every event handler is wrapped in :func:`user_errors`, which shows that message.

* by default as ``gr.Error`` (a modal; the handler's outputs stay as they were), as the Dataset tab does;
* with ``keep=``, as a ``gr.Warning`` toast plus whatever ``keep(message, *args, **kwargs)`` returns for the
  outputs: the page left as it is, with the message in its inline notice (the Captions tab, where a
  reviewer must never lose the text in the editor).

Anything that is not a ``MedArtError`` is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import gradio as gr

from medart_core.errors import MedArtError

F = TypeVar("F", bound=Callable[..., Any])


def warn(message: str) -> None:
    """A ``gr.Warning`` toast, only inside a Gradio event (handlers are also called directly, e.g. by the bench)."""
    from gradio.context import LocalContext

    if message and LocalContext.blocks.get(None) is not None:
        gr.Warning(message)


def user_errors(fn: F | None = None, *, keep: Callable[..., Any] | None = None) -> Any:
    """Decorate an event handler so a ``MedArtError`` reaches the user as a message, not a traceback.

    ``@user_errors`` raises ``gr.Error(message)``; ``@user_errors(keep=f)`` shows a ``gr.Warning`` toast and
    returns ``f(message, *args, **kwargs)`` (called with the handler's own arguments) as the outputs.
    ``functools.wraps`` keeps the signature, so Gradio still injects ``gr.Request``/``gr.SelectData``.
    """
    def decorate(handler: F) -> F:
        @functools.wraps(handler)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return handler(*args, **kwargs)
            except MedArtError as e:
                if keep is None:
                    raise gr.Error(str(e)) from e
                warn(str(e))
                return keep(str(e), *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate
