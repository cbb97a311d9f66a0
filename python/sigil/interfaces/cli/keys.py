"""The dashboard's keyboard: the terminal in cbreak mode, restored on every exit,
and the view the keys change (:class:`DashboardView`).

cbreak (not raw): keys arrive one at a time without echo, while the terminal
still turns Ctrl-C into SIGINT, so the monitor's own signal handling (130, the
summary so far) is unchanged. What this module guarantees (issue 12):

* the terminal settings are saved before they are changed and put back on
  every path out: a normal return, an exception (``with`` / ``finally``),
  SIGINT and SIGTERM (they stop the monitor's loop, whose ``finally`` restores),
  and interpreter exit (``atexit``, for a path that skips the others);
* ``TCSAFLUSH`` on restore discards input typed but not yet read, so nothing
  typed at the dashboard leaks to the shell afterwards.

Decoding is a pure function (:func:`decode_keys`), tested by value.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sigil.interfaces.cli.monitor import EntryLike

__all__ = ["KEY_NAMES", "SORTS", "DashboardView", "TerminalKeys", "decode_keys"]

# Escape sequences of the keys the dashboard uses (xterm and VT100 forms).
_SEQUENCES = {
    b"\x1b[A": "up",
    b"\x1bOA": "up",
    b"\x1b[B": "down",
    b"\x1bOB": "down",
    b"\x1b[5~": "pgup",
    b"\x1b[6~": "pgdn",
    b"\x1b[H": "home",
    b"\x1b[F": "end",
    b"\x1b[C": "right",
    b"\x1b[D": "left",
}

#: Names :func:`decode_keys` gives besides single printable characters.
KEY_NAMES = frozenset({*_SEQUENCES.values(), "esc", "enter", "backspace"})


def decode_keys(data: bytes) -> list[str]:
    """Keys in ``data``: a printable character as itself, else a name from :data:`KEY_NAMES`.

    An unknown escape sequence is dropped whole (never read as ``esc`` then
    letters, which would run commands the user did not type).
    """
    keys: list[str] = []
    i = 0
    n = len(data)
    while i < n:
        byte = data[i]
        if byte == 0x1B:
            for seq, name in _SEQUENCES.items():
                if data.startswith(seq, i):
                    keys.append(name)
                    i += len(seq)
                    break
            else:
                if i + 1 < n and data[i + 1] in (0x5B, 0x4F):  # CSI / SS3: skip it whole
                    j = i + 2
                    while j < n and not 0x40 <= data[j] <= 0x7E:
                        j += 1
                    i = j + 1
                else:
                    keys.append("esc")
                    i += 1
            continue
        if byte in (0x0D, 0x0A):
            keys.append("enter")
        elif byte in (0x7F, 0x08):
            keys.append("backspace")
        elif byte >= 0x20:
            # A UTF-8 character: take its whole sequence.
            width = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            keys.append(data[i : i + width].decode("utf-8", "replace"))
            i += width
            continue
        i += 1
    return keys


def _background(fd: int) -> bool:
    """True when ``fd`` is our controlling terminal and another process group has it."""
    try:
        foreground = os.tcgetpgrp(fd)
    except OSError:  # not our controlling terminal: no job control applies
        return False
    return foreground != os.getpgrp()


class TerminalKeys:
    """The keyboard of the terminal on ``fd``, in cbreak mode while entered.

    ``enter`` is a no-op (and :attr:`active` stays False) when ``fd`` is not a
    terminal. ``restore`` is idempotent and safe from any exit path.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def enter(self) -> bool:
        """Save the settings and switch to cbreak without echo; False if not a terminal."""
        import termios

        if self._saved is not None:
            return True
        try:
            if not os.isatty(self.fd):
                return False
            if _background(self.fd):
                # ``sigil monitor &``: changing the terminal would stop the process
                # (SIGTTOU), and it is not ours to change.
                return False
            saved = termios.tcgetattr(self.fd)
        except (OSError, termios.error):
            return False
        mode = termios.tcgetattr(self.fd)
        mode[3] &= ~(termios.ICANON | termios.ECHO)  # lflag: no line editing, no echo
        mode[6] = list(mode[6])
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        self._saved = saved
        atexit.register(self.restore)
        try:
            termios.tcsetattr(self.fd, termios.TCSANOW, mode)
        except (OSError, termios.error):
            self._saved = None
            atexit.unregister(self.restore)
            return False
        return True

    def restore(self) -> None:
        """Put the saved settings back, discarding unread input (nothing leaks)."""
        import termios

        saved, self._saved = self._saved, None
        if saved is None:
            return
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(self.fd, termios.TCSAFLUSH, saved)
        atexit.unregister(self.restore)

    def read(self) -> list[str]:
        """The keys waiting now (call when ``fd`` is readable)."""
        try:
            data = os.read(self.fd, 1024)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return []
        return decode_keys(data)

    def __enter__(self) -> TerminalKeys:
        self.enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


_ALERT_KINDS = frozenset(
    {"step_error", "retry_attempt", "session_error", "budget_warning", "budget_exceeded",
     "events_dropped"}
)  # fmt: skip
#: The component table's sort orders, in the order ``s`` cycles through them.
SORTS = ("pipeline", "tokens", "allocation", "p95", "errors")


@dataclass(slots=True)
class DashboardView:
    """What the user chose to see (keys); display-only, never a number."""

    keys: bool = False
    paused: bool = False
    help: bool = False
    errors_only: bool = False
    component: str | None = None
    sort: str = "pipeline"
    #: Events scrolled back from the newest (0: following the newest).
    scroll: int = 0
    filter_text: str = ""
    typing: bool = False
    typed: str = ""
    #: Event rows the last frame showed (a page for PgUp/PgDn).
    page: int = 10

    def handle(self, key: str, components: Sequence[str]) -> str | None:
        """Apply ``key``; ``"quit"``, ``"redraw"``, or None when it changed nothing."""
        if self.typing:
            if key == "enter":
                self.typing, self.filter_text, self.scroll = False, self.typed, 0
            elif key == "esc":
                self.typing, self.typed, self.filter_text = False, "", ""
            elif key == "backspace":
                self.typed = self.typed[:-1]
            elif len(key) == 1 and key.isprintable():
                self.typed += key
            else:
                return None
            return "redraw"
        if self.help:
            if key == "q":
                return "quit"
            self.help = False
            return "redraw"
        if key == "q":
            return "quit"
        if key == "p":
            self.paused = not self.paused
        elif key == "?":
            self.help = True
        elif key == "e":
            self.errors_only = not self.errors_only
            self.scroll = 0
        elif key == "c":
            names = list(components)
            if not names:
                return None
            if self.component not in names:
                self.component = names[0]
            else:
                i = names.index(self.component) + 1
                self.component = names[i] if i < len(names) else None
            self.scroll = 0
        elif key == "s":
            self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        elif key == "up":
            self.scroll += 1
        elif key == "down":
            self.scroll = max(0, self.scroll - 1)
        elif key == "pgup":
            self.scroll += max(1, self.page)
        elif key == "pgdn":
            self.scroll = max(0, self.scroll - max(1, self.page))
        elif key in ("end", "home"):
            self.scroll = 0
        elif key == "/":
            self.typing, self.typed = True, self.filter_text
        elif key == "esc":
            if not (self.filter_text or self.component or self.errors_only or self.scroll):
                return None
            self.filter_text, self.component, self.errors_only, self.scroll = "", None, False, 0
        else:
            return None
        return "redraw"

    def shows(self, entry: EntryLike) -> bool:
        if self.errors_only and entry.event_type not in _ALERT_KINDS:
            return False
        if self.component is not None and entry.component != self.component:
            return False
        if self.filter_text:
            needle = self.filter_text.lower()
            hay = f"{entry.component} {entry.event_type} {entry.message}".lower()
            if needle not in hay:
                return False
        return True
