"""The native session model for readers outside the live tailer (issue 13):
archived sessions folded from their tar.gz stream, and a bare ``Fold`` that a
reader feeds lines of its own choosing (``sigil replay`` paces a finished
session's lines into it). Only this layer imports the native module.
"""

from __future__ import annotations

import os

from sigil import _native
from sigil.telemetry.log_parser import SessionSnapshot

__all__ = ["Fold", "fold_archive"]

#: The native session model, fed lines as bytes (``feed_bytes``); its
#: ``snapshot()`` is what every view shows (contract 12).
Fold = _native.Fold


def fold_archive(
    archive: str | os.PathLike[str],
) -> tuple[SessionSnapshot | None, str | None]:
    """The session model of an archived session (``archive/<date>/<id>.tar.gz``),
    folded natively from the gzip stream with the GIL released (``rust/archive.rs``):
    its rotated segments oldest first, then its live file, joined with the
    archive's ledger. Nothing is extracted to disk and no event is handed to
    Python. ``(snapshot, None)`` when read whole; ``(snapshot, reason)`` when the
    archive breaks (cut short, corrupt) after some of it was read: the members
    before the break, the one it cuts up to the cut, as a live session's damaged
    segment is read; ``(None, reason)`` when nothing of it can be. The reason is
    one line naming the archive."""
    return _native.fold_archive(archive)
