"""Following a session's log, and its catch-up started ahead (contract 5).

:class:`SessionTailer` is re-exported by :mod:`sigil.telemetry.log_parser`, with
the models built on it. It lives here, with :func:`start_catch_up`, so that a
command can start a session's catch-up fold importing no more than the native
module and the paths: ``sigil monitor`` starts it before click, the settings
and the display are imported (issue 9), and the monitor's
:class:`~sigil.telemetry.log_parser.SessionModel` takes it over. This module
imports nothing else at load time (no dataclasses, no typing: each costs
milliseconds before the fold could start).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from sigil import _native
from sigil.core.paths import LOG_FILE_NAME, resolve_log_path, rotated_segments, validate_session_id

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import Any, Literal

    from sigil.telemetry.log_parser import ParseResult, SessionSummary

__all__ = ["SessionTailer", "start_catch_up", "take_catch_up"]


class SessionTailer:
    """Follows a session's ``execution.jsonl`` across rotation and truncation.

    Call :meth:`catch_up` once to fold what is there (rotated segments
    included), then :meth:`read` for new entries and :meth:`wait` to sleep until
    there are some. Every complete line is handed out exactly once.
    """

    def __init__(
        self,
        session_id: str,
        log_path: str | os.PathLike[str] | None = None,
        *,
        start: Literal["beginning", "end"] = "beginning",
        max_line_bytes: int = _native.MAX_LINE_BYTES,
        checkpoint: _native.Checkpoint | None = None,
        resume: bool = False,
    ) -> None:
        """``resume``: start at ``checkpoint`` (another tailer's, None: the live
        file's beginning) and read no rotated segment before it."""
        self.session_id = validate_session_id(session_id)
        self.session_dir = resolve_log_path(log_path) / "sessions" / session_id
        self.path = self.session_dir / LOG_FILE_NAME
        self._max_line_bytes = max_line_bytes
        if resume and checkpoint is not None:
            self._tailer = _native.Tailer(
                self.path, checkpoint=checkpoint, max_line_bytes=max_line_bytes
            )
        else:
            self._tailer = _native.Tailer(self.path, start=start, max_line_bytes=max_line_bytes)
        self._caught_up = start == "end" or resume

    def _start_at_oldest_segment(self) -> list[Path]:
        """Point the native tailer at the oldest rotated segment, if any.

        It then reads the segments in order and the live file after them, all
        through one chain of descriptors, so a rotation while reading loses
        nothing and counts nothing twice. Returns the files it will read.
        """
        files: list[Path] = []
        if not self._caught_up:
            segments = rotated_segments(self.session_dir)
            for i, oldest in enumerate(segments):
                try:
                    st = oldest.lstat()
                except FileNotFoundError:
                    continue  # archived or removed meanwhile: try the next one
                self._tailer = _native.Tailer(
                    self.path,
                    checkpoint=_native.Checkpoint(st.st_dev, st.st_ino, 0),
                    max_line_bytes=self._max_line_bytes,
                )
                files = segments[i:]
                break
            self._caught_up = True
        return [*files, self.path]

    def catch_up(self, last_n: int = 100) -> SessionSummary:
        """Fold rotated segments and everything in the live file so far, natively.

        The next :meth:`read` continues exactly after the last line folded.
        """
        from sigil.telemetry.log_parser import SessionSummary

        fold = _native.Fold(last_n)
        files = self._start_at_oldest_segment()
        self._tailer.fold_into(fold)
        return SessionSummary.from_fold(fold, files)

    def fold_into(self, fold: _native.Fold) -> int:
        """Fold every complete line not yet handed out into ``fold`` (natively,
        no Python object per line); the first call starts at the oldest rotated
        segment. Returns the number of lines folded."""
        self._start_at_oldest_segment()
        return self._tailer.fold_into(fold)

    def iter_existing(self, batch_lines: int = 65536) -> Iterator[ParseResult]:
        """Every entry already in the session (segments, then the live file), in
        batches of bounded size -- for readers that need each event, not totals."""
        self._start_at_oldest_segment()
        while True:
            result = self.read(batch_lines)
            if not result.entries and not result.malformed:
                return
            yield result

    def read(self, max_lines: int = 65536) -> ParseResult:
        """New complete entries since the last call (each exactly once)."""
        from sigil.telemetry.log_parser import ParseResult

        entries, malformed = self._tailer.read_entries(max_lines)
        return ParseResult(entries, malformed)

    def read_lines(self, max_lines: int = 65536) -> list[bytes]:
        return self._tailer.read_lines(max_lines)

    def wait(self, timeout: float) -> bool:
        """Block, without the GIL, until the log changes or ``timeout`` seconds pass."""
        return self._tailer.wait(timeout)

    def checkpoint(self) -> _native.Checkpoint | None:
        return self._tailer.checkpoint()

    def stats(self) -> dict[str, Any]:
        """Lines, bytes, rotations, truncations, oversize and torn lines seen."""
        return dict(self._tailer.stats())


_ModelKey = tuple[str, Path, int, int]


class _CatchUp:
    """A session's catch-up fold running ahead, in a thread of its own.

    The native fold releases the GIL, so a command that knows which session it
    will show starts this first and imports its display meanwhile; the
    :class:`SessionModel` built later for the same session takes the tailer and
    the fold over (they go on exactly where this stopped) instead of starting
    again. Not a daemon thread: the interpreter never exits under a running fold.
    """

    def __init__(self, tailer: SessionTailer, fold: _native.Fold) -> None:
        import threading

        self.tailer = tailer
        self.fold = fold
        self.failed = False
        self._thread = threading.Thread(target=self._run, name="sigil-catch-up")
        self._thread.start()

    def _run(self) -> None:
        try:
            self.tailer.fold_into(self.fold)
        except Exception:  # the model's own update() raises it again, in its place
            self.failed = True

    def join(self) -> bool:
        """Wait for the fold; whether it can be taken over (it did not fail)."""
        self._thread.join()
        return not self.failed


_CATCH_UPS: dict[_ModelKey, _CatchUp] = {}


def _model_key(
    session_id: str, log_path: str | os.PathLike[str] | None, last_n: int, max_line_bytes: int
) -> _ModelKey:
    return (session_id, resolve_log_path(log_path), last_n, max_line_bytes)


def take_catch_up(
    session_id: str,
    log_path: str | os.PathLike[str] | None,
    last_n: int,
    max_line_bytes: int,
) -> tuple[SessionTailer, _native.Fold] | None:
    """The tailer and fold of a catch-up started for exactly these arguments, once
    it is done (None if there is none, or it failed: then the caller starts afresh
    and meets the error in its place)."""
    if not _CATCH_UPS:
        return None
    ahead = _CATCH_UPS.pop(_model_key(session_id, log_path, last_n, max_line_bytes), None)
    if ahead is None or not ahead.join():
        return None
    return ahead.tailer, ahead.fold


def start_catch_up(
    session_id: str,
    log_path: str | os.PathLike[str] | None = None,
    *,
    last_n: int = 100,
    max_line_bytes: int = _native.MAX_LINE_BYTES,
) -> bool:
    """Start folding the session's log now, in a background thread, for the next
    :class:`SessionModel` built with the same arguments to take over.

    Only for a log that exists as a regular file (nothing is created or waited
    for). Returns whether a catch-up was started. Every number still comes from
    the one native fold: this only moves when it starts.
    """
    key = _model_key(session_id, log_path, last_n, max_line_bytes)
    if key in _CATCH_UPS:
        return False
    try:
        tailer = SessionTailer(session_id, log_path, max_line_bytes=max_line_bytes)
        if not stat.S_ISREG(tailer.path.lstat().st_mode):
            return False
    except (OSError, ValueError):
        return False  # the model's own construction reports it, in its place
    _CATCH_UPS[key] = _CatchUp(tailer, _native.Fold(last_n))
    return True
