"""Where sigil keeps its files (ARCHITECTURE.md contracts 8 and 9).

Every path built from a session ID goes through :func:`validate_session_id`.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

LOG_FILE_NAME = "execution.jsonl"
LOCK_FILE_NAME = ".lock"
#: ``archive/<YYYY-MM-DD>/<id>[.<n>].tar.gz``, as ``sigil logs archive`` names them
ARCHIVE_NAME_RE = re.compile(r"^(?P<sid>[A-Za-z0-9_-]{1,64})(?:\.(?P<n>\d+))?\.tar\.gz$")


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


def session_archives(session_directory: Path) -> list[Path]:
    """The archives of the session whose directory is ``session_directory``
    (``<log_path>/sessions/<id>``): ``<log_path>/archive/<date>/<id>[.<n>].tar.gz``,
    in name order. Symlinks are not archives. Empty when it was never archived."""
    session_id = session_directory.name
    archive_root = session_directory.parent.parent / "archive"
    found: list[Path] = []
    try:
        date_dirs = sorted(os.scandir(archive_root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return found
    for date_dir in date_dirs:
        if not date_dir.is_dir(follow_symlinks=False):
            continue
        try:
            entries = sorted(os.scandir(date_dir.path), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            match = ARCHIVE_NAME_RE.match(entry.name)
            if match and match["sid"] == session_id and entry.is_file(follow_symlinks=False):
                found.append(Path(entry.path))
    return found


class NotARegularFile(ValueError):
    """A log path that names a FIFO, a symlink, a directory or a device."""


def check_log_file(path: Path) -> None:
    """Raise :class:`NotARegularFile` if something other than a regular file is at
    ``path`` (a missing file is fine: it may be created later).

    The native readers refuse such files themselves when they open them
    (``O_NOFOLLOW|O_NONBLOCK`` and ``fstat``); this check lets a command say so
    in one line before it starts.
    """
    try:
        mode = path.lstat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISREG(mode):
        return
    kinds = {
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISLNK: "a symbolic link",
        stat.S_ISDIR: "a directory",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a device",
        stat.S_ISBLK: "a device",
    }
    what = next((name for test, name in kinds.items() if test(mode)), "not a plain file")
    raise NotARegularFile(
        f"{path} is not a regular file ({what}); sigil reads logs only from regular files"
    )


def rotated_segments(session_directory: Path, log_name: str = LOG_FILE_NAME) -> list[Path]:
    """Rotated segments of a session's log (regular files only), oldest first.

    Three naming schemes are recognised, each maybe ending in ``.gz``:
    sigil's rotator, ``execution_<YYYYmmdd>_<HHMMSS>[_<n>].jsonl`` (spec 7.3);
    Debian logrotate's numbered ``execution.jsonl.<N>`` (1 is the newest); and
    logrotate's ``dateext``, ``execution.jsonl-<YYYYmmdd>`` (any dateformat of
    digits, ``-`` and ``_``). Oldest first means the dated names (sigil's and
    dateext's) by date and counter, then the numbered ones from the highest
    number down.

    This mirrors ``segment_key`` in ``rust/segments.rs``, the rule the native
    tailer follows from one segment to the next (the core layer cannot import
    the native module); ``tests/test_segments.py`` checks that both agree.
    """
    try:
        found = [
            (key, entry.name)
            for entry in os.scandir(session_directory)
            if (key := segment_sort_key(log_name, entry.name)) is not None
            and entry.is_file(follow_symlinks=False)
        ]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [session_directory / name for _, name in sorted(found)]


#: A segment's place in the order: (0, 14-digit date, counter) for dated names,
#: (1, -N, 0) for logrotate's numbered ones.
SegmentKey = tuple[int, str | int, int]

_DATEEXT_RE = re.compile(r"^[0-9][0-9_-]*$")


def segment_sort_key(log_name: str, name: str) -> SegmentKey | None:
    """Where ``name`` sorts among the rotated segments of ``log_name``, or None
    if it is not one."""
    plain = name.removesuffix(".gz")
    if plain.startswith(log_name):
        rest = plain[len(log_name) :]
        if rest.startswith(".") and _ascii_digits(rest[1:]) and len(rest) <= 19:
            return (1, -int(rest[1:]), 0)
        if rest.startswith("-") and _DATEEXT_RE.fullmatch(rest[1:]):
            digits = "".join(c for c in rest[1:] if c.isdigit())
            if len(digits) >= 8:
                return (0, digits.ljust(14, "0"), 0)
    stem, dot, ext = log_name.rpartition(".")
    if not dot or not stem:
        stem, ext = log_name, ""
    else:
        ext = "." + ext
    prefix = stem + "_"
    if not (plain.startswith(prefix) and plain.endswith(ext)):
        return None
    middle = plain[len(prefix) : len(plain) - len(ext)]
    parts = middle.split("_")
    if len(parts) not in (2, 3):
        return None
    day, time = parts[0], parts[1]
    if len(day) != 8 or len(time) != 6 or not (_ascii_digits(day) and _ascii_digits(time)):
        return None
    counter = 0
    if len(parts) == 3:
        if not (_ascii_digits(parts[2]) and len(parts[2]) <= 18):
            return None
        counter = int(parts[2])
    return (0, day + time, counter)


def _ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
