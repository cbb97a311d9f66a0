"""Where sigil keeps its files (ARCHITECTURE.md contracts 8 and 9).

Every path built from a session ID goes through :func:`validate_session_id`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

LOG_FILE_NAME = "execution.jsonl"
LOCK_FILE_NAME = ".lock"


class InvalidSessionId(ValueError):
    """A session ID that could escape the sessions directory or is not allowed."""


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` if it matches ``^[A-Za-z0-9_-]{1,64}$``, else raise."""
    if not isinstance(session_id, str) or not SESSION_ID_RE.fullmatch(session_id):
        shown = session_id if isinstance(session_id, str) else type(session_id).__name__
        raise InvalidSessionId(
            f"invalid session ID {shown!r}: use 1 to 64 letters, digits, '-' or '_'"
        )
    return session_id


def sigil_home() -> Path:
    """``$SIGIL_HOME`` if set, else ``~/.sigil``."""
    env = os.environ.get("SIGIL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".sigil"


def default_log_path() -> Path:
    """The base log directory: ``<sigil home>/logs``."""
    return sigil_home() / "logs"


def resolve_log_path(log_path: str | os.PathLike[str] | None) -> Path:
    """``log_path`` expanded, or the default base log directory."""
    return Path(log_path).expanduser() if log_path else default_log_path()


def sessions_dir(log_path: str | os.PathLike[str] | None = None) -> Path:
    return resolve_log_path(log_path) / "sessions"


def session_dir(session_id: str, log_path: str | os.PathLike[str] | None = None) -> Path:
    """``<log_path>/sessions/<id>``, after validating the ID."""
    return sessions_dir(log_path) / validate_session_id(session_id)


def session_log_file(session_id: str, log_path: str | os.PathLike[str] | None = None) -> Path:
    return session_dir(session_id, log_path) / LOG_FILE_NAME


def rotated_segments(session_directory: Path) -> list[Path]:
    """Rotated segments of a session's log, oldest first.

    The rotator names them ``execution_<YYYYmmdd_HHMMSS>[_<n>].jsonl`` (spec 7.3),
    so their names sort in the order they were written.
    """
    try:
        names = [
            entry.name
            for entry in os.scandir(session_directory)
            if entry.name.startswith("execution_")
            and entry.name.endswith(".jsonl")
            and entry.is_file(follow_symlinks=False)
        ]
    except FileNotFoundError:
        return []
    return [session_directory / name for name in sorted(names, key=_segment_key)]


def _segment_key(name: str) -> tuple[str, int]:
    stem = name[len("execution_") : -len(".jsonl")]
    parts = stem.split("_")
    # execution_20260111_101532.jsonl or execution_20260111_101532_3.jsonl
    if len(parts) == 3 and parts[2].isdigit():
        return ("_".join(parts[:2]), int(parts[2]))
    return (stem, 0)
