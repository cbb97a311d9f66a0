"""Rotation, archival and clean-up of session logs (spec 7.3 and 10.3).

The spec's policy, with its defects fixed:

* **Rotation** is one ``rename`` of the live ``execution.jsonl`` to
  ``execution_<YYYYmmdd_HHMMSS>[_<n>].jsonl`` (UTC, never overwriting, always
  sorting after the existing segments: :func:`sigil.core.paths.rotated_segments`
  relies on that order). The spec's ``touch`` of a new empty file is gone: the
  native writer notices the rename and recreates the path itself, and the tailer
  finishes the old inode before following the new one (contract 5), so no event
  is lost, duplicated or reordered. A copy-and-truncate would lose the lines
  written between the copy and the truncation, so it is never used.
* **Archival** of a session idle for ``retention_days`` happens only while
  holding its lock (contract 7), so a session that is running, or that starts
  while it is being archived, is never touched. It is crash-safe: the tar.gz is
  written under a temporary name, fsynced and verified by reading it back
  (member list, sizes and SHA-256 of every file against what was written, and
  the gzip CRC), then renamed to ``archive/<YYYY-MM-DD>/<id>.tar.gz``; only then
  is the session directory renamed aside and deleted. Whatever moment the
  process dies at, the session directory or a verified archive (often both)
  is whole, and the next run finishes the job: stale temporaries are deleted, a
  directory whose archive matches it exactly is removed, a directory renamed
  aside is deleted once its archive verifies (or put back if it does not).
* **Clean-up** deletes archive date directories older than
  ``archive_retention_days``.

Symlinks are refused everywhere (a planted ``sessions/<id>`` link is never
archived or deleted through), and maintenance runs take an exclusive lock on
``<log_path>/.maintenance.lock`` so two of them never race on one session.

Test hook: when the environment variable ``SIGIL_TEST_ARCHIVE_PAUSE`` names one
of :data:`ARCHIVE_PHASES`, archiving prints ``sigil-test: paused at <phase>`` on
stderr when it reaches that phase and sleeps until it is killed. The kill -9
tests use it to stop an archive at each step deterministically; it is read only
at those points and has no other effect.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import os
import shutil
import stat
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sigil.core.file_security import (
    FILE_MODE,
    UnsafePathError,
    check_not_symlink,
    ensure_private_dir,
    symlink_error,
)
from sigil.core.locks import SessionBusy, SessionLock, is_session_locked
from sigil.core.paths import (
    ARCHIVE_NAME_RE,
    LOCK_FILE_NAME,
    LOG_FILE_NAME,
    SESSION_ID_RE,
    segment_sort_key,
)

if TYPE_CHECKING:
    from sigil.core.config import Settings

__all__ = [
    "ARCHIVE_PHASES",
    "ArchiveError",
    "LogRotator",
    "MaintenanceBusy",
    "archived_sessions",
    "read_archived_summaries",
]

ARCHIVE_PHASES = ("writing", "written", "verified", "renamed", "moved_aside")
_PAUSE_ENV = "SIGIL_TEST_ARCHIVE_PAUSE"

MAINTENANCE_LOCK_NAME = ".maintenance.lock"
# Summaries first: `sigil sessions` reads them from an archive without
# decompressing the logs that follow.
SUMMARY_FILES = ("tokens.json", "metrics.json")
_TEMP_SUFFIX = ".tmp"
_TRASH_MARK = ".removing"
_STAMP_FORMAT = "%Y%m%d_%H%M%S"
_CHUNK = 1 << 20
_GZIP_LEVEL = 6  # level 9 costs about three times the CPU for a few percent on JSONL

StrPath = str | os.PathLike[str]
# arcname -> (kind, size, sha256 hex); kind is "dir" or "file".
Manifest = dict[str, tuple[str, int, str]]


class MaintenanceBusy(RuntimeError):
    """Another process is rotating, archiving or cleaning the same log directory."""


class ArchiveError(RuntimeError):
    """An archive could not be written or did not verify; the session was left whole."""


def _pause(phase: str) -> None:
    """The kill -9 test hook described in the module docstring."""
    if os.environ.get(_PAUSE_ENV) == phase:
        sys.stderr.write(f"sigil-test: paused at {phase}\n")
        sys.stderr.flush()
        while True:
            time.sleep(3600)


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable before the next step relies on it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class _HashingReader:
    """Feeds a file to ``tarfile`` and hashes exactly the bytes that went in."""

    __slots__ = ("_file", "digest")

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self.digest.update(data)
        return data


class LogRotator:
    """Rotates large session logs, archives idle sessions, deletes old archives.

    Rotation policy (spec 7.3): at most ``max_file_size_mb`` per log file,
    sessions idle for ``retention_days`` are archived (tar.gz), archives are kept
    ``archive_retention_days``. ``errors`` collects one line per session or
    archive that could not be handled (it was left as it was); the other
    sessions are still processed.
    """

    def __init__(
        self,
        log_path: StrPath,
        max_file_size_mb: float = 10,
        retention_days: int = 7,
        archive_retention_days: int = 30,
    ) -> None:
        self.log_path = Path(log_path).expanduser()
        self.max_file_size = int(max_file_size_mb * 1024 * 1024)
        self.retention_days = retention_days
        self.archive_retention_days = archive_retention_days
        self.archive_path = self.log_path / "archive"
        self.sessions_path = self.log_path / "sessions"
        self.errors: list[str] = []
        self._lock_fd: int | None = None
        self._lock_depth = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> LogRotator:
        logging = settings.logging
        return cls(
            Path(logging.path),
            max_file_size_mb=logging.max_file_size_mb,
            retention_days=logging.retention_days,
            archive_retention_days=logging.archive_retention_days,
        )

    # -- rotation -------------------------------------------------------------

    def should_rotate(self, file_path: Path) -> bool:
        """True when ``file_path`` is a regular file of at least ``max_file_size`` bytes."""
        try:
            st = os.lstat(file_path)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size > 0 and st.st_size >= self.max_file_size

    def rotate(self, file_path: Path) -> Path:
        """Rename ``file_path`` to its next rotated name and return that name.

        Returns ``file_path`` unchanged when it does not exist. The live file is
        not recreated here: its writer does that (see the module docstring).
        """
        check_not_symlink(file_path)
        if not os.path.lexists(file_path):
            return file_path
        with self._exclusive():
            rotated = self._rotated_name(file_path)
            os.rename(file_path, rotated)
            _fsync_dir(rotated.parent)
        return rotated

    def rotate_large_logs(self, dry_run: bool = False) -> list[Path]:
        """Rotate every session log past the size limit; return the rotated names."""
        rotated: list[Path] = []
        with self._exclusive(dry_run):
            for session_dir in self._session_dirs():
                log_file = session_dir / LOG_FILE_NAME
                if not self.should_rotate(log_file):
                    continue
                try:
                    rotated.append(
                        self._rotated_name(log_file) if dry_run else self.rotate(log_file)
                    )
                except OSError as exc:
                    self.errors.append(f"{log_file}: not rotated: {exc}")
        return rotated

    def _rotated_name(self, file_path: Path) -> Path:
        """``<stem>_<UTC stamp>[_<n>]<suffix>``, free, sorting after existing segments.

        A clock that stepped back must not make a new segment sort before an
        older one, or readers would replay events out of order.
        """
        stem, suffix = file_path.stem, file_path.suffix
        # The naming rule is core.paths' (the one the readers follow): the
        # latest dated segment, whatever wrote it, is the one to sort after.
        latest: tuple[str, int] | None = None
        for name in os.listdir(file_path.parent):
            key = segment_sort_key(file_path.name, name)
            if key is not None and key[0] == 0:
                digits = str(key[1])
                dated = (f"{digits[:8]}_{digits[8:14]}", key[2])
                latest = dated if latest is None or dated > latest else latest
        stamp = datetime.now(UTC).strftime(_STAMP_FORMAT)
        n = 0
        if latest is not None and latest >= (stamp, 0):
            stamp, n = latest[0], latest[1] + 1
        while True:
            name = f"{stem}_{stamp}{f'_{n}' if n else ''}{suffix}"
            candidate = file_path.parent / name
            if not os.path.lexists(candidate):
                return candidate
            n += 1

    # -- archival -------------------------------------------------------------

    def archive_old_sessions(self, dry_run: bool = False) -> list[Path]:
        """Archive the sessions idle for ``retention_days``; return their archives.

        A session whose lock is held is skipped. With ``dry_run`` nothing is
        written and the returned paths are where the archives would go.
        """
        archived: list[Path] = []
        cutoff = time.time() - self.retention_days * 86400
        with self._exclusive(dry_run):
            if not dry_run:
                self._recover()
            for session_dir in self._session_dirs():
                try:
                    if self._last_activity(session_dir) >= cutoff:
                        continue
                    archive = (
                        self._planned_archive(session_dir)
                        if dry_run
                        else self._archive_locked(session_dir)
                    )
                except (OSError, ArchiveError, tarfile.TarError) as exc:
                    self.errors.append(f"session {session_dir.name}: not archived: {exc}")
                    continue
                if archive is not None:
                    archived.append(archive)
        return archived

    def _planned_archive(self, session_dir: Path) -> Path | None:
        if is_session_locked(session_dir):
            return None
        return self._free_archive_name(self._today_dir(), session_dir.name)

    def _archive_locked(self, session_dir: Path) -> Path | None:
        """Archive ``session_dir`` while holding its lock, or return None if it is held."""
        # The archiver is the one holder allowed beside an archive of the session
        # (a crash left both, or its content changed since): writers are refused.
        lock = SessionLock(session_dir, refuse_archived=False)
        try:
            lock.acquire()
        except SessionBusy:
            return None
        try:
            return self._archive_session(session_dir)
        finally:
            lock.release()

    def _archive_session(self, session_dir: Path) -> Path:
        archive = self._matching_archive(session_dir)
        if archive is None:
            date_dir = self._today_dir()
            ensure_private_dir(self.archive_path)
            ensure_private_dir(date_dir)
            temp = date_dir / f".{session_dir.name}.{os.getpid()}{_TEMP_SUFFIX}"
            try:
                written = self._write_archive(session_dir, temp)
                _pause("written")
                found = read_manifest(temp)
                if found != written:
                    raise ArchiveError(f"{temp} does not match {session_dir} when read back")
                _pause("verified")
                archive = self._free_archive_name(date_dir, session_dir.name)
                os.rename(temp, archive)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            _fsync_dir(date_dir)
            _pause("renamed")
        self._remove_session_dir(session_dir)
        return archive

    def _write_archive(self, session_dir: Path, temp: Path) -> Manifest:
        """Write ``session_dir`` as tar.gz to ``temp`` (0600, fsynced); return its manifest."""
        manifest: Manifest = {}
        root = session_dir.name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(
                fileobj=raw, mode="w:gz", compresslevel=_GZIP_LEVEL, format=tarfile.PAX_FORMAT
            ) as tar:
                tar.add(session_dir, arcname=root, recursive=False)
                manifest[root] = ("dir", 0, "")
                for index, (path, arcname, is_dir) in enumerate(_archive_members(session_dir)):
                    if is_dir:
                        tar.add(path, arcname=arcname, recursive=False)
                        manifest[arcname] = ("dir", 0, "")
                        continue
                    file_fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with os.fdopen(file_fd, "rb") as file:
                        info = tar.gettarinfo(arcname=arcname, fileobj=file)
                        reader = _HashingReader(file)
                        tar.addfile(info, reader)
                    manifest[arcname] = ("file", info.size, reader.digest.hexdigest())
                    if index == 0:
                        _pause("writing")
            raw.flush()
            os.fsync(raw.fileno())
        return manifest

    def _matching_archive(self, session_dir: Path) -> Path | None:
        """An existing archive whose content equals ``session_dir`` exactly.

        This is the state a crash between "archive renamed into place" and
        "directory removed" leaves. A session re-created under the same ID has
        different content and gets an archive of its own.
        """
        candidates = archived_sessions(self.log_path).get(session_dir.name, [])
        if not candidates:
            return None
        current = directory_manifest(session_dir)
        for candidate in candidates:
            try:
                if read_manifest(candidate) == current:
                    return candidate
            except (OSError, EOFError, tarfile.TarError):
                continue
        return None

    def _remove_session_dir(self, session_dir: Path) -> None:
        """Rename the directory aside (atomic), then delete it.

        A crash during a plain ``rmtree`` would leave half a session under its
        own name; a renamed-aside directory is recognisably "archived, being
        deleted" and the next run finishes it.
        """
        trash = self.sessions_path / f".{session_dir.name}{_TRASH_MARK}"
        n = 1
        while os.path.lexists(trash):
            trash = self.sessions_path / f".{session_dir.name}{_TRASH_MARK}{n}"
            n += 1
        os.rename(session_dir, trash)
        _fsync_dir(self.sessions_path)
        _pause("moved_aside")
        shutil.rmtree(trash)

    def _recover(self) -> None:
        """Finish what an interrupted archive run left (see the module docstring)."""
        if _is_real_dir(self.archive_path):
            for date_dir in self.archive_path.iterdir():
                if not _is_real_dir(date_dir):
                    continue
                for entry in date_dir.iterdir():
                    if entry.name.startswith(".") and entry.name.endswith(_TEMP_SUFFIX):
                        entry.unlink(missing_ok=True)
        if not _is_real_dir(self.sessions_path):
            return
        archives = archived_sessions(self.log_path)
        for entry in sorted(self.sessions_path.iterdir()):
            name = entry.name
            if not (name.startswith(".") and _TRASH_MARK in name) or not _is_real_dir(entry):
                continue
            session_id = name[1:].split(_TRASH_MARK, 1)[0]
            if any(_verifies(archive) for archive in archives.get(session_id, [])):
                shutil.rmtree(entry)
                continue
            # No sound archive (deleted by hand meanwhile?): put the session back.
            home = self.sessions_path / session_id
            if os.path.lexists(home):
                self.errors.append(
                    f"session {session_id}: {name} has no valid archive and {home} exists;"
                    " left both for a human to compare"
                )
                continue
            os.rename(entry, home)
            _fsync_dir(self.sessions_path)
            self.errors.append(f"session {session_id}: {name} had no valid archive; restored it")

    def _today_dir(self) -> Path:
        return self.archive_path / date.today().isoformat()

    @staticmethod
    def _free_archive_name(date_dir: Path, session_id: str) -> Path:
        archive = date_dir / f"{session_id}.tar.gz"
        n = 2
        while os.path.lexists(archive):
            archive = date_dir / f"{session_id}.{n}.tar.gz"
            n += 1
        return archive

    # -- clean-up -------------------------------------------------------------

    def cleanup_old_archives(self, dry_run: bool = False) -> list[Path]:
        """Delete archive date directories older than ``archive_retention_days``.

        A date directory is kept while its date is within the last
        ``archive_retention_days`` days (today included).
        """
        if not _is_real_dir(self.archive_path):
            return []
        cutoff = date.today() - timedelta(days=self.archive_retention_days)
        removed: list[Path] = []
        with self._exclusive(dry_run):
            for date_dir in sorted(self.archive_path.iterdir()):
                try:
                    day = date.fromisoformat(date_dir.name)
                except ValueError:
                    continue  # not a date directory: not ours to delete
                if day >= cutoff or not _is_real_dir(date_dir):
                    continue
                try:
                    if not dry_run:
                        shutil.rmtree(date_dir)
                except OSError as exc:
                    self.errors.append(f"{date_dir}: not removed: {exc}")
                    continue
                removed.append(date_dir)
        return removed

    # -- all of it ------------------------------------------------------------

    def run_maintenance(self, dry_run: bool = False) -> dict[str, Any]:
        """Rotate, archive, clean up; return the spec's summary plus ``rotated``/``errors``."""
        with self._exclusive(dry_run):
            rotated = self.rotate_large_logs(dry_run)
            archived = self.archive_old_sessions(dry_run)
            cleaned = self.cleanup_old_archives(dry_run)
        return {
            "sessions_archived": len(archived),
            "archives_cleaned": len(cleaned),
            "archived_paths": [str(p) for p in archived],
            "cleaned_paths": [str(p) for p in cleaned],
            "rotated": [str(p) for p in rotated],
            "errors": list(self.errors),
            "dry_run": dry_run,
        }

    # -- helpers --------------------------------------------------------------

    def _session_dirs(self) -> Iterator[Path]:
        """Session directories, by name; symlinks and invalid names are reported, not used."""
        try:
            entries = sorted(os.scandir(self.sessions_path), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue  # our own renamed-aside directories
            path = Path(entry.path)
            if entry.is_symlink():
                message = str(symlink_error(path))
                if message not in self.errors:  # each pass of a maintenance run meets it
                    self.errors.append(message)
                continue
            if entry.is_dir(follow_symlinks=False) and SESSION_ID_RE.fullmatch(entry.name):
                yield path

    @staticmethod
    def _last_activity(session_dir: Path) -> float:
        """Newest mtime of the session's files.

        Not the directory's: appends change a file's mtime, not its directory's,
        while taking the lock (which archiving itself does) may create ``.lock``
        and touch both. The lock file is left out for the same reason.
        """
        newest: float | None = None
        for root, _dirs, files in os.walk(session_dir):
            for name in files:
                if name == LOCK_FILE_NAME and root == str(session_dir):
                    continue
                try:
                    mtime = os.lstat(os.path.join(root, name)).st_mtime
                except FileNotFoundError:
                    continue
                newest = mtime if newest is None else max(newest, mtime)
        return os.lstat(session_dir).st_mtime if newest is None else newest

    @contextmanager
    def _exclusive(self, dry_run: bool = False) -> Iterator[None]:
        """Hold ``<log_path>/.maintenance.lock`` (re-entrant within this rotator)."""
        if dry_run:
            yield
            return
        if self._lock_depth == 0:
            ensure_private_dir(self.log_path)
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.log_path / MAINTENANCE_LOCK_NAME, flags, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MaintenanceBusy(
                    f"another sigil maintenance run is working on {self.log_path};"
                    " try again when it has finished"
                ) from None
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # closing drops the flock
                self._lock_fd = None


def _archive_members(session_dir: Path) -> list[tuple[Path, str, bool]]:
    """``(path, arcname, is_dir)`` below ``session_dir``, summaries first, no lock file.

    Raises :class:`UnsafePathError` on a symlink or special file: a session
    holding one was not written by sigil, and it is left for a human to look at.
    """
    root = session_dir.name
    members: list[tuple[Path, str, bool]] = []
    for dirpath, dirs, files in os.walk(session_dir):
        dirs.sort()
        relative = os.path.relpath(dirpath, session_dir)
        for name in (*dirs, *sorted(files)):
            path = Path(dirpath) / name
            if relative == "." and name == LOCK_FILE_NAME:
                continue  # runtime state of the lock we hold, not session data
            mode = os.lstat(path).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise UnsafePathError(
                    errno.ELOOP if stat.S_ISLNK(mode) else errno.EINVAL,
                    f"{path} is not a regular file or directory; session not archived",
                    str(path),
                )
            arcname = "/".join(part for part in (root, relative, name) if part != ".")
            members.append((path, arcname, stat.S_ISDIR(mode)))

    def order(member: tuple[Path, str, bool]) -> tuple[int, str]:
        _, arcname, is_dir = member
        if is_dir:
            return (1, arcname)
        return (0 if arcname.rpartition("/")[2] in SUMMARY_FILES else 2, arcname)

    return sorted(members, key=order)


def directory_manifest(session_dir: Path) -> Manifest:
    """The manifest :meth:`LogRotator._write_archive` would record for ``session_dir``."""
    manifest: Manifest = {session_dir.name: ("dir", 0, "")}
    for path, arcname, is_dir in _archive_members(session_dir):
        if is_dir:
            manifest[arcname] = ("dir", 0, "")
            continue
        digest = hashlib.sha256()
        size = 0
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        manifest[arcname] = ("file", size, digest.hexdigest())
    return manifest


def read_manifest(archive: Path) -> Manifest:
    """Read a whole archive back: its members, their sizes and SHA-256.

    Reading to the end of the gzip stream also checks its CRC and length, so a
    truncated or corrupted archive raises (``EOFError``, ``gzip.BadGzipFile``,
    ``tarfile.TarError`` or ``OSError``) instead of returning.
    """
    manifest: Manifest = {}
    fd = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.isdir():
                    manifest[member.name] = ("dir", 0, "")
                    continue
                digest = hashlib.sha256()
                size = 0
                extracted = tar.extractfile(member)
                if extracted is not None:
                    while chunk := extracted.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                kind = "file" if member.isfile() else "other"
                manifest[member.name] = (kind, size, digest.hexdigest())
        while stream.read(_CHUNK):
            pass
    return manifest


def _verifies(archive: Path) -> bool:
    try:
        read_manifest(archive)
    except (OSError, EOFError, tarfile.TarError):
        return False
    return True


def archived_sessions(log_path: StrPath) -> dict[str, list[Path]]:
    """Session ID -> its archives (``archive/<date>/<id>[.<n>].tar.gz``), newest first."""
    archive_path = Path(log_path).expanduser() / "archive"
    found: dict[str, list[Path]] = {}
    try:
        date_dirs = sorted(os.scandir(archive_path), key=lambda e: e.name, reverse=True)
    except FileNotFoundError:
        return found
    for date_dir in date_dirs:
        if not date_dir.is_dir(follow_symlinks=False):
            continue
        names: list[tuple[int, str, str]] = []
        for entry in os.scandir(date_dir.path):
            match = ARCHIVE_NAME_RE.match(entry.name)
            if match and entry.is_file(follow_symlinks=False):
                names.append((int(match["n"] or 1), entry.name, match["sid"]))
        for _, name, session_id in sorted(names, reverse=True):
            found.setdefault(session_id, []).append(Path(date_dir.path) / name)
    return found


def read_archived_summaries(archive: Path) -> dict[str, bytes]:
    """``tokens.json`` / ``metrics.json`` of an archived session, as raw bytes.

    They are the first members of the archive, so only its first blocks are
    decompressed; an unreadable archive gives an empty dict.
    """
    found: dict[str, bytes] = {}
    try:
        fd = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                name = member.name.rpartition("/")[2]
                if member.isdir() and "/" not in member.name:
                    continue
                if name not in SUMMARY_FILES or not member.isfile():
                    break
                extracted = tar.extractfile(member)
                if extracted is not None:
                    found[name] = extracted.read()
    except (OSError, EOFError, tarfile.TarError):
        return {}
    return found
