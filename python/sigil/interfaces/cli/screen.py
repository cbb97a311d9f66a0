"""Terminal cell geometry for the dashboard: how wide text is on screen, and
lines of styled segments cut to a width (no rich: a frame stays cheap).

This is layout, not accounting: no number of a session is computed here.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Line", "cells", "crop", "printable", "shown", "span", "wrap"]

# C0 and C1 control characters and DEL: text from a log must never reach the
# terminal as a control sequence (an event message holding ESC [2J, a bell, or a
# title change would otherwise act on the user's terminal). Tabs become spaces.
_CONTROLS: dict[int, str | None] = dict.fromkeys([*range(0x20), 0x7F, *range(0x80, 0xA0)])
_CONTROLS[0x09] = " "


# Bidi overrides and the Unicode line separators reorder or break a line too.
_CONTROLS.update(dict.fromkeys(
    [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029]
))  # fmt: skip


def printable(text: str) -> str:
    """``text`` without control characters (kept as is when it has none)."""
    return text if text.isprintable() else text.translate(_CONTROLS)


#: How :func:`shown` writes the control characters people know by a letter.
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e", "\x07": "\\a", "\x08": "\\b"}
#: Bidirectional overrides and isolates, and the line and paragraph separators:
#: text that reorders or breaks what follows it on a terminal.
_UNSEEN = frozenset(k for k in _CONTROLS if k > 0xA0)


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x20 or 0x7F <= code < 0xA0:
        return f"\\x{code:02x}"
    if code in _UNSEEN:
        return f"\\u{code:04x}"
    return ch


def shown(text: object) -> str:
    """A name or message from a log (a component, a model, an agent, an error)
    made safe for every text view: each control character written visibly
    (``\\e`` for ESC, ``\\n`` for a newline, ``\\x9b``, ``\\u202e``), so a
    log can neither move the cursor, retitle or clear the terminal nor start a
    line of its own. ``--json`` output never goes through it: JSON escapes
    them. (The live dashboard and the stream mode drop them instead:
    :func:`printable`, their cells fixed.)"""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(_escape(ch) for ch in text)


def span(widths: Iterable[int]) -> int:
    """Cells taken by columns of these widths, side by side."""
    return sum(widths)


def cells(text: str) -> int:
    """Terminal cells of ``text`` (wide East Asian characters take two)."""
    if text.isascii():
        return len(text)
    import unicodedata

    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )


def crop(text: str, room: int) -> str:
    """``text`` cut to ``room`` cells, with ``…`` where it was cut."""
    if room <= 0:
        return ""
    if cells(text) <= room:
        return text
    out: list[str] = []
    used = 0
    for ch in text:
        w = cells(ch)
        if used + w > room - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


class Line:
    """One screen line: segments of text with an SGR style, cut to a width."""

    __slots__ = ("parts",)

    def __init__(self, text: str = "", style: str = "") -> None:
        self.parts: list[tuple[str, str]] = [(printable(text), style)] if text else []

    def add(self, text: str, style: str = "") -> Line:
        if text:
            self.parts.append((printable(text), style))
        return self

    @property
    def cells(self) -> int:
        return sum(cells(t) for t, _ in self.parts)

    def render(self, width: int, color: bool) -> str:
        out: list[str] = []
        room = width
        for text, style in self.parts:
            if room <= 0:
                break
            w = cells(text)
            if w > room:
                text = crop(text, room)
                w = room
            room -= w
            out.append(f"\x1b[{style}m{text}\x1b[0m" if color and style else text)
        return "".join(out)


def wrap(text: str, room: int) -> list[str]:
    """``text`` wrapped to ``room`` cells: every word kept, long ones broken."""
    import textwrap

    return textwrap.wrap(text, max(8, room), break_long_words=True, break_on_hyphens=False) or [""]
