"""The session lock (ARCHITECTURE.md contract 7: a session is alive while its lock is held).

Every writer of a session -- each open
:class:`~sigil.telemetry.execution_logger.ExecutionLogger`, and so ``sigil
orchestrate`` for as long as a run is in progress -- holds an exclusive,
non-blocking ``flock`` on ``sessions/<id>/.lock``. One process holds at most one
lock per session: the orchestrator takes it before reading the session's history
and hands the held lock to its logger. The kernel drops the
lock when the holder's process dies -- even on ``kill -9`` -- so a monitor that sees
no final event *and* a free lock knows the writer is gone, with no PID file or
heartbeat to go stale.

``flock`` locks belong to an open file description, so a second
:class:`SessionLock` on the same directory conflicts with the first even inside one
process; that is what lets the tests exercise "second orchestrator refused"
without a second process. The lock file is never deleted: unlinking a lock file
that another process has open lets two holders lock two different inodes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from sigil.core.file_security import ensure_private_dir, symlink_error
from sigil.core.paths import LOCK_FILE_NAME, session_archives

__all__ = [
    "SessionArchived",
    "SessionBusy",
    "SessionLock",
    "is_session_locked",
    "lock_holder_pid",
]

_FILE_MODE = 0o600


class SessionBusy(RuntimeError):
    """Another writer holds the session's lock: a ``sigil orchestrate`` run or an
    open ``ExecutionLogger``, in this process or another. Nothing was written."""


class SessionArchived(SessionBusy):
    """The session was archived (``sigil logs archive``/``maintain``): its ID names
    that history, so no writer starts a second one under it. Nothing was written.

    Resuming instead would need every reader (sessions, report, diff, monitor,
    replay, the budget) to join the archive and a new directory into one
    session; refusing keeps one ID, one history, with no view to get wrong."""

    def __init__(self, session_id: str, archive: Path) -> None:
        super().__init__(
            f"session {session_id!r} is archived ({archive}): its ID names that "
            "history; use another session ID"
        )
        self.archive = archive


class SessionLock:
    """Exclusive lock on ``<session_dir>/.lock``, usable as a context manager.

    ``acquire()`` creates the session directory (0700) and the lock file (0600)
    when missing, takes the lock without blocking, and writes the holder's PID into
    the file (for diagnostics only: the lock itself is the source of truth).
    """

    __slots__ = ("_fd", "path", "refuse_archived", "session_dir")

    def __init__(self, session_dir: Path, *, refuse_archived: bool = True) -> None:
        self.session_dir = Path(session_dir)
        self.path = self.session_dir / LOCK_FILE_NAME
        #: a writer's lock: :meth:`acquire` raises :class:`SessionArchived` when the
        #: session has an archive (only the archiver itself turns this off)
        self.refuse_archived = refuse_archived
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self, *, record_pid: bool = True) -> SessionLock:
        """Take the lock or raise :class:`SessionBusy` at once (never waits).

        With ``record_pid=False`` the lock file is left as it was, so a caller that
        may still refuse the run (and must then have written nothing) can check
        first and call :meth:`record_pid` once it goes ahead.
        """
        if self._fd is not None:
            return self
        # Checked before anything is created, and again under the lock below: an
        # archiver that finished between the two removed the directory, so the
        # lock taken is on a new one beside the archive.
        self.refuse_if_archived()
        # A symlink planted as the session directory or the lock file is refused,
        # never followed (the lock file is truncated and written below).
        ensure_private_dir(self.session_dir)
        try:
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, _FILE_MODE
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise symlink_error(self.path) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise symlink_error(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                who = f" (process {holder} is writing it)" if holder else ""
                raise SessionBusy(
                    f"session {self.session_dir.name!r} is already running{who}; "
                    "a session has one writer at a time: wait for it to finish "
                    "or use another session ID"
                ) from None
            try:
                self.refuse_if_archived()
            except SessionArchived:
                self._remove_if_bare()
                raise
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if record_pid:
            self.record_pid()
        return self

    def refuse_if_archived(self) -> None:
        """Raise :class:`SessionArchived` if this writer's session has an archive."""
        if self.refuse_archived:
            archives = session_archives(self.session_dir)
            if archives:
                raise SessionArchived(self.session_dir.name, archives[-1])

    def _remove_if_bare(self) -> None:
        """Remove the directory a refused acquire made, if it holds only the lock
        file (held here, so no other writer uses it); a directory with a log in
        it (an archiver's crash left both) is the archiver's to finish."""
        try:
            if os.listdir(self.session_dir) == [LOCK_FILE_NAME]:
                os.unlink(self.path)
                os.rmdir(self.session_dir)
        except OSError:
            pass

    def record_pid(self) -> None:
        """Write this process's PID into the held lock file (for diagnostics)."""
        if self._fd is None:
            raise RuntimeError("record_pid() needs the lock to be held")
        # Permissions are fixed whatever the umask (contract 8); we own the file now.
        os.fchmod(self._fd, _FILE_MODE)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays for the next holder."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> SessionLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - safety net for a forgotten release
        if getattr(self, "_fd", None) is not None:
            self.release()


def is_session_locked(session_dir: str | os.PathLike[str]) -> bool:
    """True when some process holds the session's lock.

    Tries a non-blocking *shared* lock and releases it at once, so two monitors
    probing together do not see each other as the writer. Creates nothing: a
    missing directory or lock file means "not locked".
    """
    try:
        # os.path, not pathlib: `sigil sessions` asks this of every session.
        fd = os.open(os.path.join(session_dir, LOCK_FILE_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as exc:  # pragma: no cover - e.g. ENOLCK on exotic file systems
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def lock_holder_pid(session_dir: Path) -> int | None:
    """The PID written by the current holder, or None when the lock is free or unknown."""
    if not is_session_locked(session_dir):
        return None
    try:
        fd = os.open(Path(session_dir) / LOCK_FILE_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
