"""Reading a session's events from disk for export, in bounded batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------
# Reading a session from disk (through the native parser)


@dataclass(slots=True)
class ReadStats:
    files: int = 0
    entries: int = 0
    malformed: int = 0
    torn_tail: bool = False


def iter_session_entries(
    session_dir: Path, stats: ReadStats | None = None, chunk_bytes: int = 8 << 20
) -> Iterator[Any]:
    """The session's entries in log order: rotated segments, oldest first, then the
    live file, parsed natively in blocks of ``chunk_bytes`` (memory stays bounded
    whatever the session's size). Malformed lines are skipped and counted in
    ``stats`` (contract 6); a last line without its newline is still being written
    and is left for later.
    """
    from sigil.core.paths import LOG_FILE_NAME, rotated_segments

    stats = stats if stats is not None else ReadStats()
    for path in [*rotated_segments(session_dir), session_dir / LOG_FILE_NAME]:
        yield from iter_file_entries(path, stats, chunk_bytes)


def iter_file_entries(
    path: Path, stats: ReadStats | None = None, chunk_bytes: int = 8 << 20
) -> Iterator[Any]:
    """One log file's entries (see :func:`iter_session_entries`); none if it is gone.

    Read through the native tailer, like the monitor and the fold: batches of
    bounded size, lines over the line limit skipped (never held whole) and
    counted with the malformed ones, so every reader agrees on the session's
    tokens.
    """
    from sigil import _native

    stats = stats if stats is not None else ReadStats()
    if not path.is_file():
        return
    tailer = _native.Tailer(path)
    stats.files += 1
    batch_lines = max(1, chunk_bytes // 256)
    while True:
        entries, malformed = tailer.read_entries(batch_lines, chunk_bytes)
        if not entries and not malformed:
            break
        stats.entries += len(entries)
        stats.malformed += len(malformed)
        yield from entries
    checkpoint = tailer.checkpoint()
    try:
        if checkpoint is not None and checkpoint[2] < path.stat().st_size:
            stats.torn_tail = True  # a last line without its newline: still being written
    except FileNotFoundError:
        pass


def _next_seq(session_dir: Path) -> int:
    """The ``seq`` the session's next event will get: what the writer recovers
    (ExecutionLogger._recover_next_seq), from the live file or the newest segment."""
    from sigil import _native
    from sigil.core.paths import LOG_FILE_NAME, rotated_segments

    for path in [session_dir / LOG_FILE_NAME, *reversed(rotated_segments(session_dir))]:
        try:
            last = _native.tail_max_seq(path)
        except FileNotFoundError:
            continue
        if last is not None:
            return int(last) + 1
    return 0


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)
