"""Gradio glue the tabs share: handlers of ``(ctx, ...)`` bound for Gradio, forms as named dicts.

A tab's layout builds its components into a ``dict[name → component]``; a *form* is such a dict of the
inputs one action reads (the Generate settings, the caption filters). Gradio passes input values by
position, so :func:`bind` zips them back to their names: the handler receives one ``dict[name → value]``
per form, and the wiring lists a form's components once, as ``list(form.values())``.

:func:`bind` also drops the leading ``ctx`` from what Gradio sees, and keeps the rest of the handler's
signature (names, ``gr.Request``/``gr.SelectData`` annotations, ``gr.Progress()`` defaults), so Gradio still
injects the request and names the API parameters after the handler's own.
"""
from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable, Mapping, Sequence


def bind(ctx: Any, fn: Callable[..., Any], **forms: Sequence[str]) -> Callable[..., Any]:
    """``fn(ctx, ...)`` as a Gradio handler without ``ctx``; each keyword ``param=[field, ...]`` replaces
    ``fn``'s parameter ``param`` by one positional input per field, given to ``fn`` as ``{field: value}``."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[1:]                    # the first one is ctx
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):      # an annotation only a type checker can resolve: Gradio needs none
        hints = {}
    shown: list[inspect.Parameter] = []
    for p in params:
        if p.name in forms:
            shown += [inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD) for f in forms[p.name]]
        else:
            shown.append(p.replace(annotation=hints.get(p.name, p.annotation)))
    names = [p.name for p in shown]
    if len(set(names)) != len(names) or set(forms) - {p.name for p in params}:
        raise ValueError(f"bind({fn.__name__}): form fields clash with its parameters, or name none of them")
    gradio_sig = sig.replace(parameters=shown, return_annotation=hints.get("return", sig.return_annotation))

    @functools.wraps(fn)
    def handler(*args: Any, **kwargs: Any) -> Any:
        given = gradio_sig.bind(*args, **kwargs)
        given.apply_defaults()
        values = dict(given.arguments)
        for param, fields in forms.items():
            values[param] = {f: values.pop(f) for f in fields}
        call = sig.bind(ctx, **values)          # positionally, as fn's own callers (and keep= hooks) see it
        return fn(*call.args, **call.kwargs)

    # Gradio reads both: the signature for names and defaults (gr.Progress), the hints for gr.Request.
    handler.__signature__ = gradio_sig  # type: ignore[attr-defined]
    handler.__annotations__ = {p.name: p.annotation for p in shown if p.annotation is not inspect.Parameter.empty}
    return handler


def inputs_of(*parts: Any) -> list[Any]:
    """Gradio's input list from components and forms (a form contributes its components in field order)."""
    out: list[Any] = []
    for part in parts:
        out += list(part.values()) if isinstance(part, Mapping) else [part]
    return out


def as_tuple(names: Sequence[str], result: Mapping[str, Any]) -> tuple:
    """A handler's ``{output name: value}`` in the order of ``names``; a name it did not set is left as it is."""
    import gradio as gr

    return tuple(result.get(n, gr.skip()) for n in names)
