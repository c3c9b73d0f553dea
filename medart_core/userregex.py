"""Regular expressions typed by users (the Captions filter, the store's text search, batch find/replace),
run under one time budget per request.

Python's ``re`` backtracks without limit while holding the GIL: 27 characters of ``(a|aa)+$`` against a long
caption froze every other request of the studio for seconds. The ``regex`` engine (pinned in
requirements.txt) releases the GIL while it matches a ``str`` and stops a match after ``timeout`` seconds;
here every match of one :class:`UserRegex` draws on a single budget, so a pattern that is merely slow on each
of 10,000 captions is stopped as surely as one that explodes on a single caption. The cut-off raises
:class:`~medart_core.errors.ConfigError`, before the caller has written anything.

Compiling cannot be timed out (``((a{9999}){9999}){9999}`` spends seconds and gigabytes expanding its repeats,
GIL held), so the pattern's length and the product of its counted repeats are checked before compiling.
"""
from __future__ import annotations

import re
import time

import regex

from .errors import ConfigError

__all__ = ["MAX_PATTERN_CHARS", "MAX_LITERAL_CHARS", "MAX_REPEAT_PRODUCT", "TIME_BUDGET_S", "UserRegex",
           "compile_user_regex"]

MAX_PATTERN_CHARS = 500          # a caption search or find/replace pattern is a line, not a program
MAX_LITERAL_CHARS = 5000         # plain-text find: longer than any caption (MAX_CAPTION_CHARS) cannot match
MAX_REPEAT_PRODUCT = 100_000     # {m,n} bounds multiplied: 10^6 nested compiles in ~0.4 s, 10^12 never
TIME_BUDGET_S = 0.5              # all matches of one pattern in one request (a batch preview has two: <= 1 s)

_COUNTED_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")
_TOO_SLOW = ("Your regular expression took too long (over {budget:g} s) and was stopped; nothing was changed. "
             "Simplify it: nested repeats like (a+)+ or overlapping alternatives like (a|aa)+ make the search "
             "time explode. Use a plain search (untick 'regex') for plain text.")


def _check_repeats(pattern: str) -> None:
    # Every {m}, {m,n}, {m,}, {,n} counts, nested or not (an escaped \{3} too): over-strict for long chains of
    # big repeats, which no caption search needs, and never lets a nesting that expands at compile time through.
    product = 1
    for m in _COUNTED_REPEAT.finditer(pattern):
        product *= max([int(g) for g in m.groups() if g] + [1])
        if product > MAX_REPEAT_PRODUCT:
            raise ConfigError(f"The counted repeats of your regular expression ({m.group(0)} and the others) are "
                              f"too large to run (their product is over {MAX_REPEAT_PRODUCT:,}); use smaller "
                              "counts or + and *.")


class UserRegex:
    """One user's pattern, compiled once; :meth:`search` and :meth:`sub` share the budget of one request.

    The budget's clock starts at the first match, so the database read between compiling (which the callers
    do first, to fail before any I/O) and matching is not charged to the pattern."""

    def __init__(self, compiled: "regex.Pattern[str]", pattern: str, budget_s: float = TIME_BUDGET_S):
        self._rx = compiled
        self.pattern = pattern
        self.budget_s = float(budget_s)
        self._deadline: float | None = None

    def _timeout(self) -> float:
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.budget_s
        left = self._deadline - now
        if left <= 0:
            raise ConfigError(_TOO_SLOW.format(budget=self.budget_s))
        return left

    def search(self, text: str) -> bool:
        """Whether the pattern occurs in ``text``; ConfigError once the request's budget is spent."""
        try:
            return self._rx.search(text or "", timeout=self._timeout()) is not None
        except TimeoutError:
            raise ConfigError(_TOO_SLOW.format(budget=self.budget_s)) from None

    def sub(self, replacement: str, text: str) -> str:
        """``text`` with every match replaced (``\\1`` / ``\\g<name>`` groups as in ``re``); ConfigError once the
        request's budget is spent. Check the replacement first with :meth:`check_replacement`."""
        try:
            return self._rx.sub(replacement, text or "", timeout=self._timeout())
        except TimeoutError:
            raise ConfigError(_TOO_SLOW.format(budget=self.budget_s)) from None
        except (regex.error, IndexError) as e:
            raise ConfigError(f"Invalid replacement {replacement!r}: {e}.") from None

    def check_replacement(self, replacement: str) -> None:
        """ConfigError for a replacement with a bad escape or a group the pattern does not have.

        ``regex`` (unlike ``re``) parses a replacement only at the first match, so the template is expanded
        against an always-matching stand-in with the same groups (numbers and names) as the pattern."""
        names = {number: name for name, number in self._rx.groupindex.items()}
        stand_in = "".join(f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, self._rx.groups + 1))
        try:
            regex.compile(stand_in).match("").expand(replacement)
        except (regex.error, IndexError) as e:
            raise ConfigError(f"Invalid replacement {replacement!r}: {e}.") from None


def compile_user_regex(pattern: str, *, case_sensitive: bool = True, literal: bool = False,
                       budget_s: float | None = None, hint: str = "") -> UserRegex:
    """Compile a user's pattern (``literal``: plain text, matched as typed) with the limits above.

    ConfigError (never ``regex.error``) for a pattern that is too long, has too large repeats or does not
    compile; ``hint`` is appended to the invalid-pattern message (e.g. "Fix it or untick 'regex'.").
    ``budget_s`` defaults to :data:`TIME_BUDGET_S`, read at call time."""
    pattern = str(pattern)
    if literal:
        if len(pattern) > MAX_LITERAL_CHARS:
            raise ConfigError(f"The text to find is {len(pattern):,} characters; at most {MAX_LITERAL_CHARS:,}.")
        source = regex.escape(pattern)
    else:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ConfigError(f"Your regular expression is {len(pattern):,} characters; at most "
                              f"{MAX_PATTERN_CHARS} (shorten it, or untick 'regex' to search plain text).")
        _check_repeats(pattern)
        source = pattern
    flags = 0 if case_sensitive else regex.IGNORECASE
    try:
        compiled = regex.compile(source, flags)
    except (regex.error, OverflowError, RecursionError, MemoryError) as e:
        raise ConfigError(f"Invalid regular expression {pattern!r}: {e}." + (f" {hint}" if hint else "")) from None
    return UserRegex(compiled, pattern, TIME_BUDGET_S if budget_s is None else budget_s)
