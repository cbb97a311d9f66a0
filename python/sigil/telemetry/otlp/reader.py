"""Reading a session's events from disk for export, in bounded batches.

Through :mod:`sigil.telemetry.log_parser`, like every other reader: the same
tailer, the same line bound and the same malformed-line rule, so the spans agree
with the monitor and the fold on every number (ARCHITECTURE.md, Layers).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sigil.telemetry.log_parser import ParsedEntry


@dataclass(slots=True)
class ReadStats:
    entries: int = 0
    malformed: int = 0


def iter_session_entries(
    session_dir: Path, stats: ReadStats | None = None, batch_lines: int = 65536
) -> Iterator[ParsedEntry]:
    """The session's entries in log order: rotated segments, oldest first, then the
    live file, through one native tailer that follows a rotation while it reads,
    in batches of bounded size (memory stays bounded whatever the session's
    size). Malformed and oversize lines are skipped and counted in ``stats``
    (contract 6); a last line without its newline is still being written and is
    left for later.
    """
    from sigil.telemetry.log_parser import SessionTailer

    stats = stats if stats is not None else ReadStats()
    tailer = SessionTailer(session_dir.name, session_dir.parent.parent)
    for result in tailer.iter_existing(batch_lines):
        stats.entries += len(result.entries)
        stats.malformed += len(result.malformed)
        yield from result.entries


def next_seq(session_dir: Path) -> int:
    """The ``seq`` the session's next event will get: what the writer recovers
    (``ExecutionLogger._recover_next_seq``), from the live file or the newest
    segment."""
    from sigil.core.paths import LOG_FILE_NAME, rotated_segments
    from sigil.telemetry.log_parser import last_seq

    for path in [session_dir / LOG_FILE_NAME, *reversed(rotated_segments(session_dir))]:
        try:
            last = last_seq(path)
        except FileNotFoundError:
            continue
        if last is not None:
            return last + 1
    return 0
