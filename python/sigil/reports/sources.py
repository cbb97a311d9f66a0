"""Where sessions live and how each is read whole: the live session
directories (``sessions/<id>``) and the archives (``archive/<date>/<id>.tar.gz``).

A source is identified by its files: name, size and mtime of each file of a
live session's log and of its ledger (plus whether a writer holds its lock),
or an archive's size, mtime and inode. The index refolds a source exactly when
that identity changed. Archives are read from the tar stream in memory, never
extracted to disk.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from sigil.core.paths import LOCK_FILE_NAME, LOG_FILE_NAME, SESSION_ID_RE, segment_sort_key
from sigil.telemetry.archived import fold_archive
from sigil.telemetry.log_parser import (
    HistoryModel,
    HistorySnapshot,
    RunSnapshot,
    SessionSnapshot,
    history_many,
    snapshot_many,
)

__all__ = [
    "Folded",
    "Source",
    "archive_read",
    "archive_snapshot",
    "discover",
    "find_session",
    "fold_live",
    "whole_history",
]

_LEDGER = "tokens.json"


@dataclass(slots=True, frozen=True)
class Source:
    """One place a session's history is kept: its live directory or one archive."""

    key: str  # the directory's or the archive's path
    session_id: str
    archived: bool
    fingerprint: str
    locked: bool = False


def discover(log_path: Path, session_ids: Collection[str] | None = None) -> list[Source]:
    """Every live session directory and every archive under ``log_path``; only
    those of ``session_ids`` when it is given."""
    found: list[Source] = []
    if session_ids is None:
        try:
            entries = sorted(os.scandir(log_path / "sessions"), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        for entry in entries:
            if SESSION_ID_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                found.append(_live_source(entry.path, entry.name))
    else:
        for session_id in sorted(set(session_ids)):
            directory = log_path / "sessions" / session_id
            if (
                SESSION_ID_RE.fullmatch(session_id)
                and directory.is_dir()
                and not directory.is_symlink()
            ):
                found.append(_live_source(str(directory), session_id))
    if os.path.isdir(log_path / "archive"):
        from sigil.telemetry.log_rotation import archived_sessions

        for session_id, archives in sorted(archived_sessions(log_path).items()):
            if session_ids is not None and session_id not in session_ids:
                continue
            for archive in archives:
                try:
                    st = os.lstat(archive)
                except OSError:
                    continue
                fingerprint = f"a:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
                found.append(Source(str(archive), session_id, True, fingerprint))
    return found


def _live_source(directory: str, session_id: str) -> Source:
    parts: list[str] = []
    has_lock = False
    try:
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError:
        children = []
    for child in children:
        name = child.name
        if name == LOCK_FILE_NAME:
            has_lock = True
            continue
        if name in (LOG_FILE_NAME, _LEDGER) or segment_sort_key(LOG_FILE_NAME, name):
            try:
                st = child.stat(follow_symlinks=False)
            except OSError:
                continue
            parts.append(f"{name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    locked = False
    if has_lock:
        from sigil.core.locks import is_session_locked

        locked = is_session_locked(directory)
    # A held lock is part of the identity: a run's status (running or
    # incomplete) depends on whether its writer is still there (contract 7).
    parts.append("locked" if locked else "free")
    return Source(directory, session_id, False, "|".join(parts), locked)


def find_session(log_path: Path, session_id: str) -> Source | None:
    """The live directory of ``session_id``, else its newest archive."""
    if not SESSION_ID_RE.fullmatch(session_id):
        return None
    directory = log_path / "sessions" / session_id
    if directory.is_dir() and not directory.is_symlink():
        return _live_source(str(directory), session_id)
    if os.path.isdir(log_path / "archive"):
        from sigil.telemetry.log_rotation import archived_sessions

        archives = archived_sessions(log_path).get(session_id)
        if archives:
            return Source(str(archives[0]), session_id, True, "")
    return None


def archive_snapshot(archive: Path) -> SessionSnapshot | str:
    """The session model of an archived session read whole, folded natively
    from its tar.gz stream (``rust/archive.rs``): its rotated segments oldest
    first, then the live file (the order the live reader folds them in), joined
    with the archive's ledger as a live session's snapshot is (the runs only
    the ledger knows count too). Nothing is extracted to disk, no event is
    handed to Python, and the GIL is released. A one-line reason when the
    archive cannot be read to its end (:func:`archive_read` keeps the readable
    part of a damaged one)."""
    snapshot, problem = fold_archive(archive)
    if problem is not None or snapshot is None:
        return problem or f"cannot read {archive}"
    return snapshot


def archive_read(archive: Path) -> tuple[SessionSnapshot | None, str | None]:
    """An archived session as every view reads it: ``(snapshot, None)`` read
    whole; ``(snapshot, reason)`` the readable part of an archive that breaks
    (cut short, corrupt) after it, which the views count with a warning, as a
    live session's damaged segment; ``(None, reason)`` nothing readable."""
    return fold_archive(archive)


def whole_history(directory: Path) -> HistorySnapshot:
    """A live session's whole history with every run folded from its log (so
    its components keep their latency histograms, models and input/output
    tokens) and joined natively with its ledger (the runs only the ledger
    knows). :func:`session_history` would answer from the ledger alone when it
    stands for the log, and the ledger keeps no histogram."""
    model = HistoryModel(directory)
    model.fold_at_rest()
    # Continuing the fold at rest reads nothing new; it returns the fold joined
    # with the ledger, or None when the log was rotated while it was read.
    history = model.at_run_end()
    if history is None:
        # No live file (deleted: the ledger still knows its finished runs), or
        # it was rotated while it was read: fold anew, still joined.
        return HistoryModel(directory).folded()
    return history


@dataclass(slots=True)
class Folded:
    """A live session read by the native model: the fold of its log, and its
    runs: the fold's (with latency histograms, models and input/output tokens)
    plus those only its ledger knows (their events rotated or deleted by an
    external tool), from the native join with the ledger."""

    snapshot: SessionSnapshot
    runs: list[RunSnapshot]
    #: some runs are known only to the ledger: the snapshot's totals miss them
    ledger_only_runs: bool
    #: the session's tokens as the model counts them (its history's: the
    #: log's, events outside any started run included, and the ledger-only
    #: runs'), and the events both its log and its ledger lack (holes in seq)
    tokens: int = 0
    missing_events: int = 0


def fold_live(directories: list[str]) -> list[Folded | str]:
    """Every session's history (its ledger joined natively with the fold of
    its log) in one native call across a small thread pool; the log folded by
    a second native call only where the history skipped the fold (its ledger
    stands for the log): the ledger keeps no latency histogram. A one-line
    reason for a session whose log cannot be read."""
    if not directories:
        return []
    histories = history_many(directories)
    unfolded = [
        d
        for d, h in zip(directories, histories, strict=True)
        if not isinstance(h, str) and h.snapshot is None
    ]
    folds: dict[str, SessionSnapshot | str] = dict(
        zip(unfolded, snapshot_many(unfolded), strict=True)
    )
    out: list[Folded | str] = []
    for directory, history in zip(directories, histories, strict=True):
        if isinstance(history, str):
            out.append(history)
            continue
        fold = history.snapshot if history.snapshot is not None else folds[directory]
        if isinstance(fold, str):
            out.append(fold)
            continue
        runs = list(fold.runs)
        folded = {r.number for r in runs}
        extra = [r for r in history.runs if r.number not in folded]
        if extra:
            runs = sorted([*runs, *extra], key=lambda r: r.number)
        out.append(Folded(fold, runs, bool(extra), history.tokens, history.missing_events))
    return out
