"""HTML the studio's tabs share, built from the library's plain data (diff segments, token previews,
badges, notices, per-class progress).

Caption text and reviewer names are data, never markup: every piece of them is ``html.escape``d here, and
the library never builds HTML at all.
"""
from __future__ import annotations

import html
from typing import Any, Iterable, Sequence

from medart_core.caption_ops import Badge, TokenPreview, word_diff


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def notice_html(msg: str, kind: str = "ok") -> str:
    """One notice line (``kind`` "ok" or "warn"); an empty message keeps the line's height."""
    return f'<div class="cap-notice cap-notice-{kind}">{esc(msg)}</div>' if msg else '<div class="cap-notice"></div>'


def word_diff_segments_html(segments: Iterable[tuple[str, str | None]]) -> str:
    """Diff segments (see ``caption_ops.word_diff``) as HTML with ``<del>``/``<ins>``, every piece escaped."""
    parts = []
    for text, tag in segments:
        e = html.escape(text)
        if tag == "-":
            parts.append(f'<del class="cap-del">{e}</del>')
        elif tag == "+":
            parts.append(f'<ins class="cap-ins">{e}</ins>')
        else:
            parts.append(e)
    return "".join(parts)


def word_diff_html(before: str, after: str) -> str:
    """The word diff of two captions as HTML with ``<del>``/``<ins>``; every piece of caption text is escaped."""
    return word_diff_segments_html(word_diff(before, after))


def token_counter_html(p: TokenPreview) -> str:
    """"n / limit T5 tokens", coloured by how close to the limit, and the part truncation cuts off."""
    cls = "cap-tok-over" if p.over else ("cap-tok-near" if p.n_tokens > 0.9 * p.limit else "cap-tok-ok")
    head = f'<span class="cap-tok {cls}"><b>{p.n_tokens}</b> / {p.limit} T5 tokens</span>'
    if not p.over:
        return f'<div class="cap-tokens">{head}</div>'
    return (f'<div class="cap-tokens">{head} &mdash; {p.n_tokens - p.limit} over: the text encoder never sees '
            f'<span class="cap-cut">{html.escape(p.cut)}</span></div>')


def badges_html(badges: Iterable[Badge]) -> str:
    """The rule badges (seed, length, parroting) as pills with their details as tooltips."""
    out = []
    for b in badges:
        cls = "cap-badge-ok" if b.ok else "cap-badge-bad"
        mark = "&#10003;" if b.ok else "&#10007;"
        out.append(f'<span class="cap-badge {cls}" title="{html.escape(b.detail, quote=True)}">{mark} '
                   f'{html.escape(b.name)}: {html.escape(b.detail)}</span>')
    return '<div class="cap-badges">' + " ".join(out) + "</div>"


def progress_html(rows: Sequence[tuple[str, int, int]] | None) -> str:
    """"Approved a/t" overall and per class, from ``caption_ops.progress_by_class`` rows (None: no dataset)."""
    if rows is None:
        return ""
    total_a = sum(a for _, a, _ in rows)
    total = sum(t for _, _, t in rows)
    parts = " · ".join(f"{esc(label)} {a}/{t}" for label, a, t in rows)
    return (f'<div class="cap-progress"><b>Approved {total_a}/{total}</b>'
            + (f" &nbsp;—&nbsp; {parts}" if parts else "") + "</div>")
