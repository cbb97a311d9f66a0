"""Owner-only permissions and symlink refusal (spec 11.3; ARCHITECTURE.md contract 8).

Logs hold prompts, outputs and token spend, so sigil's directories are 0700 and
its files 0600 whatever the umask: ``mkdir``/``open`` modes are masked by the
umask, so every creation is followed by an explicit ``chmod``. A symlink planted
where sigil expects its own directory or file (say ``sessions/<id>`` pointing at
``~/.ssh``) is refused rather than followed, because following it would let
whoever planted it redirect sigil's writes, chmods or deletions. Parents of the
path (``~/.sigil`` on another disk, for instance) may be symlinks: the check is on
the last component, the one sigil owns.

Session IDs are validated by :func:`sigil.core.paths.validate_session_id`, re-exported
here because the spec puts it in this module (it raises rather than returning a
bool, so a forgotten check cannot pass silently).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from sigil.core.paths import InvalidSessionId, validate_session_id

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "InvalidSessionId",
    "UnsafePathError",
    "check_not_symlink",
    "ensure_private_dir",
    "ensure_private_file",
    "secure_log_directory",
    "symlink_error",
    "validate_session_id",
    "write_private_atomic",
]

DIR_MODE = 0o700
FILE_MODE = 0o600

StrPath = str | os.PathLike[str]


class UnsafePathError(OSError):
    """A symlink, or something that is not a directory or regular file, where sigil
    expects its own directory or file."""

    def __str__(self) -> str:
        return str(self.strerror)


def symlink_error(path: StrPath) -> UnsafePathError:
    """The error for a symlink found where sigil expects its own file or directory."""
    return UnsafePathError(
        errno.ELOOP,
        f"{os.fspath(path)} is a symbolic link; sigil does not follow links in its log"
        " directory: remove it (or point --log-path elsewhere)",
        os.fspath(path),
    )


def check_not_symlink(path: StrPath) -> None:
    """Raise :class:`UnsafePathError` if ``path`` itself is a symlink (missing is fine)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise symlink_error(path)


def _chmod_dir_nofollow(path: StrPath) -> None:
    # O_NOFOLLOW + fchmod: no window in which a swapped-in symlink gets chmodded.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            check_not_symlink(path)
        raise
    try:
        os.fchmod(fd, DIR_MODE)
    finally:
        os.close(fd)


def ensure_private_dir(path: StrPath) -> Path:
    """Create ``path`` (and missing parents) as 0700 directories; return it.

    An existing directory is accepted as it is (its mode is its owner's choice;
    :func:`secure_log_directory` tightens a tree on request). A symlink or a
    non-directory at ``path`` raises :class:`UnsafePathError`.
    """
    target = Path(path)
    missing: list[Path] = []
    current = target
    while True:
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            missing.append(current)
            if current.parent == current:
                break
            current = current.parent
            continue
        if current == target:
            if stat.S_ISLNK(st.st_mode):
                raise symlink_error(target)
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafePathError(
                    errno.ENOTDIR, f"{target} exists and is not a directory", str(target)
                )
        break
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            # Created concurrently (two sigil processes starting at once): the
            # same checks as for a directory that was already there.
            if directory == target:
                return ensure_private_dir(target)
            continue
        _chmod_dir_nofollow(directory)
    return target


def ensure_private_file(path: StrPath) -> Path:
    """Create ``path`` as an empty 0600 file if missing, or set an existing one to 0600.

    Never truncates, never follows a symlink at ``path``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise symlink_error(path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(
                errno.EINVAL, f"{os.fspath(path)} is not a regular file", os.fspath(path)
            )
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return Path(path)


def secure_log_directory(path: StrPath) -> None:
    """Make ``path`` and everything under it owner-only: directories 0700, files 0600.

    Creates ``path`` if missing. Symlinks inside the tree are skipped, never
    followed (``chmod`` would change their targets); the tree is walked top-down
    and each directory is closed to others before its entries are touched, so no
    other user can swap an entry while the walk runs.
    """
    ensure_private_dir(path)
    _chmod_dir_nofollow(path)
    for root, dirs, files in os.walk(path, topdown=True, followlinks=False):
        for name in dirs:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                _chmod_dir_nofollow(full)
        for name in files:
            full = os.path.join(root, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != FILE_MODE:
                os.chmod(full, FILE_MODE)


def write_private_atomic(path: StrPath, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` as a 0600 file, never half-written, never through a link.

    The data goes to a new temporary file in the same directory, created with
    ``O_EXCL | O_NOFOLLOW`` under an unpredictable name (so a symlink planted at a
    guessable temporary name is never written through), then renamed over
    ``path``: a symlink planted at ``path`` itself is replaced, not followed.
    With ``durable`` the file and then its directory are fsynced, so the new
    content survives a crash once this returns.
    """
    import secrets

    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, FILE_MODE)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 64 random bits
        raise FileExistsError(errno.EEXIST, "no free temporary name", os.fspath(target))
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
