"""The report index: each run's folded summary in SQLite (issue 13, "How").

``<log_path>/report_index.sqlite3`` holds, per source (a live session directory
or an archive, identified by its files: :mod:`sigil.reports.sources`), the runs
the native session model found in it, each run's per-component totals and the
non-empty buckets of each component's latency histogram. The JSONL stays the
truth: the index is rebuilt whenever it is missing, unreadable or of another
schema, and a source whose files changed (a new run, a rotation, an archive) is
refolded and its rows replaced, so deleting the file loses nothing.
:func:`open_index` brings it up to date lazily, each time a report reads it;
:func:`update_existing` does so where an index already exists (never making
one) when a run ends (``sigil orchestrate``, that session's sources only) and
after ``sigil logs maintain`` (archived sessions then read from their archives,
counted once), so the next report has little or nothing to refold.

Rows come from the native model only (contract 12); reports aggregate them in
SQL.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sigil.reports.sources import Source, archive_read, discover, fold_live, whole_history
from sigil.telemetry.log_parser import (
    ComponentSnapshot,
    ModelSnapshot,
    RunSnapshot,
    SessionSnapshot,
    run_status,
)

__all__ = [
    "INDEX_FILE_NAME",
    "SCHEMA_VERSION",
    "IndexNotUpdated",
    "Refresh",
    "decode_calls",
    "encode_calls",
    "open_index",
    "read_index",
    "refresh",
    "update_existing",
]

INDEX_FILE_NAME = "report_index.sqlite3"
#: 9: an archive cut short is indexed by its readable part (an index of 8
#: holds it as 0 runs, and its fingerprint does not change: rebuilt)
#: 10: each source's events outside any started run, its missing events and
#: numbers past SQLite's integers (``counted``, ``missing_events``, ``overflow``)
SCHEMA_VERSION = 10
#: SQLite's largest integer: a number of the model past it is stored as this,
#: with its run's ``overflow`` set (a lower bound, never a traceback)
INT64_MAX = 2**63 - 1
#: how long a report waits for another one writing the index before it does
#: its own work in memory
BUSY_TIMEOUT_S = 10.0
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sources(
    source TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    archived INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS runs(
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    session_id TEXT NOT NULL,
    run INTEGER NOT NULL,
    archived INTEGER NOT NULL,
    -- 1: the same run (session, number, start) is indexed from a better
    -- source too (the live directory before an archive of it, left by a
    -- maintenance run that died before removing the directory)
    duplicate INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    finished INTEGER NOT NULL,
    started_at TEXT,
    ended_at TEXT,
    started_ts REAL,
    tokens INTEGER NOT NULL,
    events INTEGER NOT NULL,
    steps_completed INTEGER NOT NULL,
    steps_failed INTEGER NOT NULL,
    -- the run's components rolled up (by SQL, at indexing), so a report by
    -- period or session reads one row per run
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    operations INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    max_latency_ms REAL,
    -- the run's budget and the seq of its latest event (a run out of budget:
    -- the final event that said so)
    budget INTEGER,
    last_seq INTEGER,
    -- 1: a run the model lists (RUNS counts it); 0: the source's events the
    -- model counts outside its listed runs (before the log's first
    -- session_start: a run whose start was rotated away; runs dropped past
    -- the fold's cap): their tokens, so a session's tokens are the model's
    -- total, and the source's missing events (one such row per source, when
    -- it has any of either, or no run at all)
    counted INTEGER NOT NULL DEFAULT 1,
    -- events the log and the ledger both lack (holes in seq): the model's
    -- missing_events of the source, on its counted = 0 row
    missing_events INTEGER NOT NULL DEFAULT 0,
    -- 1: a number of this run (or of its components or models) is past
    -- SQLite's integers and is stored as INT64_MAX (a lower bound)
    overflow INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_source ON runs(source);
CREATE INDEX IF NOT EXISTS runs_started ON runs(started_ts);
CREATE INDEX IF NOT EXISTS runs_identity ON runs(session_id, run);
CREATE TABLE IF NOT EXISTS components(
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    component TEXT NOT NULL,
    model TEXT,
    tokens INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    operations INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    retries INTEGER NOT NULL,
    timed INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    max_latency_ms REAL,
    -- the component's heaviest calls in the run, the events that show a token
    -- jump (the native model's, at most 5): 'seq:tokens' comma-separated,
    -- most tokens first
    heaviest TEXT NOT NULL DEFAULT '',
    -- the seqs of its first failed attempts (at most 5), comma-separated:
    -- the events that show a retry storm
    retry_seqs TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS components_run ON components(run_id);
CREATE TABLE IF NOT EXISTS latency(
    component_id INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS latency_component ON latency(component_id);
CREATE TABLE IF NOT EXISTS run_latency(
    run_id INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS run_latency_run ON run_latency(run_id);
-- each run's calls per (component, model), the native model's exact totals
-- (issue 13); model NULL: the component's events that named no model
-- (the component's totals less its models', by SQL at indexing)
CREATE TABLE IF NOT EXISTS models(
    run_id INTEGER NOT NULL,
    component TEXT NOT NULL,
    model TEXT,
    tokens INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    retries INTEGER NOT NULL DEFAULT 0,
    cost_nanousd INTEGER NOT NULL,
    priced_events INTEGER NOT NULL,
    unpriced_tokens INTEGER NOT NULL,
    unpriced_calls INTEGER NOT NULL,
    unknown_usage_calls INTEGER NOT NULL,
    -- the budget the proxy held for the calls of unknown usage (issue 14)
    tokens_held INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS models_run ON models(run_id);
-- steps started again and again with the same input in a run (the native
-- model's loops; seqs: the first starts' seq, comma-separated)
CREATE TABLE IF NOT EXISTS loops(
    run_id INTEGER NOT NULL,
    component TEXT NOT NULL,
    input_sha256 TEXT NOT NULL,
    starts INTEGER NOT NULL,
    seqs TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS loops_run ON loops(run_id);
"""


@dataclass(slots=True)
class Refresh:
    """What bringing the index up to date did."""

    sources: int = 0
    refolded: int = 0
    removed: int = 0
    rebuilt: bool = False
    #: session ID -> why its log cannot be read (one line naming the file)
    unreadable: dict[str, str] = field(default_factory=dict)
    #: every source that cannot be read whole, in path order: ``session``,
    #: ``path`` (the live directory or the archive), ``error`` and
    #: ``runs_counted`` (the runs of the part that could be read, live or
    #: archived: an archive cut short counts up to its break): ``sigil report --json``'s
    #: ``unreadable``
    damaged: list[dict[str, Any]] = field(default_factory=list)
    #: why the index file could not be used (this call's index was built in
    #: memory): one line for stderr; None when it was used, or was busy
    warning: str | None = None


def open_index(log_path: Path) -> tuple[sqlite3.Connection, Refresh]:
    """The index of ``log_path``, brought up to date with its logs.

    A missing, corrupt or older index is rebuilt from the logs; where the
    log path cannot hold one (it does not exist, or is read-only), or another
    report holds it longer than :data:`BUSY_TIMEOUT_S`, the index is built in
    memory for this call. So it is where the index file cannot be opened or
    written (a directory in its place, a read-only file, a full disk): then
    with :attr:`Refresh.warning` saying why. Never an exception from SQLite."""
    path = log_path / INDEX_FILE_NAME
    warning: str | None = None
    for attempt in range(2):
        conn: sqlite3.Connection | None = None
        try:
            conn, rebuilt = _connect(path, log_path)
            state = refresh(conn, log_path)
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            if _is_busy(exc):
                break  # another report is writing it: in memory, as always
            if attempt == 0 and _is_corrupt(exc) and _discard(path):
                continue  # made again from the logs (the JSONL is the truth)
            warning = _why_not(path, exc)
            break
        state.rebuilt = rebuilt
        return conn, state
    conn = _create(sqlite3.connect(":memory:"))
    state = refresh(conn, log_path)
    state.rebuilt, state.warning = True, warning
    return conn, state


def read_index(log_path: Path, read: Callable[[sqlite3.Connection], T]) -> tuple[T, Refresh]:
    """``read(conn)`` on the index of ``log_path`` brought up to date
    (:func:`open_index`). Corruption found only by ``read`` (a page no refresh
    touched) has the file made again from the logs and ``read`` done again; if
    the file fails again (or cannot be read: busy past the timeout, an I/O
    error), it is done on an index in memory, with a warning unless busy."""
    path = log_path / INDEX_FILE_NAME
    for attempt in range(2):
        conn, state = open_index(log_path)
        try:
            return read(conn), state
        except sqlite3.Error as exc:
            if not conn.execute("PRAGMA database_list").fetchone()[2]:
                raise  # already in memory: not the file's doing
            if attempt == 0 and _is_corrupt(exc) and _discard(path):
                continue
            warning = None if _is_busy(exc) else _why_not(path, exc)
        finally:
            conn.close()
        break
    conn = _create(sqlite3.connect(":memory:"))
    try:
        state = refresh(conn, log_path)
        state.rebuilt, state.warning = True, warning
        return read(conn), state
    finally:
        conn.close()


def _code(exc: BaseException) -> int | None:
    """SQLite's primary result code of ``exc`` (None: not from SQLite)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _is_busy(exc: BaseException) -> bool:
    return _code(exc) in _BUSY_CODES


def _is_corrupt(exc: BaseException) -> bool:
    """Not an index: damaged pages, or not SQLite at all."""
    return _code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _discard(path: Path) -> bool:
    """Remove a damaged index file (and SQLite's journal of it): True when it
    is gone, so the next try makes it again."""
    for extra in ("-journal", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            os.unlink(f"{path}{extra}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _why_not(path: Path, exc: BaseException) -> str:
    """One line: the index file, why it cannot be used, and what this report does."""
    if path.is_dir() and not path.is_symlink():
        why = "is a directory"
    elif _code(exc) == sqlite3.SQLITE_READONLY or (
        isinstance(exc, PermissionError) or _code(exc) == sqlite3.SQLITE_PERM
    ):
        why = "cannot be written"
    elif _is_corrupt(exc):
        why = f"is damaged and cannot be made again ({exc})"
    else:
        why = f"cannot be used ({exc})"
    return f"report index {path} {why}: this report reads the logs in memory"


class IndexNotUpdated(Exception):
    """An existing index could not be brought up to date (one line: the file
    and why). Nothing is lost: the next ``sigil report`` rebuilds or refreshes it."""


def update_existing(
    log_path: Path,
    session_ids: Collection[str] | None = None,
    *,
    repair: bool = False,
    busy_timeout_s: float = 2.0,
) -> Refresh | None:
    """Bring the index of ``log_path`` up to date when there is one (issue 13:
    "updated when a run ends and by ``sigil logs maintain``"); None, and no file
    made, when there is none, so a user who never runs ``sigil report`` pays
    nothing.

    ``session_ids`` limits the refresh to those sessions' sources (the session
    a run just ended in); None refreshes every source. An index that is not one
    of this schema (older, corrupt) is rebuilt with ``repair``, else left to the
    next report. :class:`IndexNotUpdated` when it cannot be written, is held by
    another writer longer than ``busy_timeout_s``, or (without ``repair``) is
    not an index of this schema."""
    path = log_path / INDEX_FILE_NAME
    if not path.is_file():
        return None
    try:
        if repair:
            if not os.access(log_path, os.W_OK):
                raise IndexNotUpdated(f"{path}: the log path is not writable")
            conn, rebuilt, state = _repair(path, log_path, session_ids, busy_timeout_s)
        else:
            conn, rebuilt = _open_existing(path, busy_timeout_s), False
            try:
                state = refresh(conn, log_path, session_ids)
            finally:
                conn.close()
    except (sqlite3.Error, OSError) as exc:
        raise IndexNotUpdated(f"{path}: {exc}") from None
    state.rebuilt = rebuilt
    return state


def _repair(
    path: Path, log_path: Path, session_ids: Collection[str] | None, timeout: float
) -> tuple[sqlite3.Connection, bool, Refresh]:
    """``sigil logs maintain``'s update: the index checked whole (SQLite's
    ``quick_check``, every page read) and made again from the logs when it is
    damaged, then refreshed. The connection is returned closed."""
    for attempt in range(2):
        conn, rebuilt = _connect(path, log_path, timeout=timeout)
        try:
            if rebuilt or _intact(conn):
                try:
                    return conn, rebuilt, refresh(conn, log_path, session_ids)
                except sqlite3.DatabaseError as exc:
                    if attempt or not _is_corrupt(exc):
                        raise
        finally:
            conn.close()
        if attempt or not _discard(path):
            raise IndexNotUpdated(f"{path}: damaged, and it cannot be made again")
    raise AssertionError("unreachable")  # pragma: no cover


def _intact(conn: sqlite3.Connection) -> bool:
    """Every page of the index readable and well formed (``quick_check``)."""
    try:
        rows = conn.execute("PRAGMA quick_check(1)").fetchall()
    except sqlite3.DatabaseError as exc:
        if _is_busy(exc):
            raise
        return False
    return rows == [("ok",)]


def _open_existing(path: Path, timeout: float) -> sqlite3.Connection:
    """The index file as it is (never created, never replaced), checked to be an
    index of this schema."""
    from urllib.parse import quote

    conn = sqlite3.connect(
        f"file:{quote(str(path))}?mode=rw", uri=True, timeout=timeout, isolation_level=None
    )
    try:
        conn.execute("PRAGMA synchronous=OFF")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise IndexNotUpdated(
                f"{path}: not a report index of schema {SCHEMA_VERSION} (found {version});"
                " the next sigil report rebuilds it"
            )
        conn.execute("SELECT count(*) FROM sources").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def _connect(
    path: Path, log_path: Path, *, timeout: float = BUSY_TIMEOUT_S
) -> tuple[sqlite3.Connection, bool]:
    """The index file, made anew when it is not an index of this schema. Busy
    errors (another report writing it) propagate: the file is fine then."""
    if not log_path.is_dir() or not os.access(log_path, os.W_OK):
        return _create(sqlite3.connect(":memory:")), True
    for _attempt in range(2):
        if not path.exists():
            # 0600 like every file sigil writes (contract 8); sqlite keeps the mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=OFF")  # a cache: a torn index is rebuilt
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == SCHEMA_VERSION:
                conn.execute("SELECT count(*) FROM sources").fetchone()
                return conn, False
            if version == 0 and not _tables(conn):
                return _create(conn), True
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) in _BUSY_CODES:
                conn.close()
                raise
        conn.close()
        # Not an index of this schema (older, corrupt, or not SQLite): the logs
        # are the truth, so it is simply made again.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    raise sqlite3.DatabaseError(f"{path}: not a report index, and it cannot be made again")


def _tables(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]


def _create(conn: sqlite3.Connection) -> sqlite3.Connection:
    conn.isolation_level = None
    # IF NOT EXISTS: two reports creating the index at once make one schema.
    conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
    return conn


def refresh(
    conn: sqlite3.Connection, log_path: Path, session_ids: Collection[str] | None = None
) -> Refresh:
    """Refold every source whose files changed since it was indexed, drop the
    sources that are gone, and leave the rest as they are; only the sources of
    ``session_ids`` when it is given."""
    current = discover(log_path, session_ids)
    state = Refresh(sources=len(current))
    if session_ids is None:
        known = dict(conn.execute("SELECT source, fingerprint FROM sources"))
    else:
        known = {}
        for session_id in set(session_ids):
            known.update(
                conn.execute(
                    "SELECT source, fingerprint FROM sources WHERE session_id = ?", (session_id,)
                )
            )
    stale = [s for s in current if known.get(s.key) != s.fingerprint]
    gone = set(known) - {s.key for s in current}
    _unreadable(conn, state)
    if not stale and not gone:
        return state
    live = [s for s in stale if not s.archived]
    by_key: dict[str, _Read] = dict(
        zip((s.key for s in live), _live_runs([s.key for s in live]), strict=True)
    )
    for s in stale:
        if s.archived:
            # A damaged archive counts by its readable part, as a live
            # session's damaged segment does, and is named in ``damaged``.
            snapshot, problem = archive_read(Path(s.key))
            if snapshot is None:
                by_key[s.key] = _Read.unreadable(problem or f"cannot read {s.key}")
            else:
                # The archive's model: its holes in seq are those of its log.
                by_key[s.key] = _Read(
                    list(snapshot.runs), snapshot, snapshot.tokens, snapshot.seq_missing, problem
                )
    conn.execute("BEGIN IMMEDIATE")
    try:
        _delete(conn, [*gone, *(s.key for s in stale)])
        for s in stale:
            _insert(conn, s, by_key[s.key])
        _roll_up(conn)
        _mark_duplicates(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    state.refolded, state.removed = len(stale), len(gone)
    _unreadable(conn, state)
    return state


def _unreadable(conn: sqlite3.Connection, state: Refresh) -> None:
    rows = conn.execute(
        "SELECT s.session_id, s.source, s.error,"
        " (SELECT count(*) FROM runs r WHERE r.source = s.source)"
        " FROM sources s WHERE s.error IS NOT NULL ORDER BY s.source"
    ).fetchall()
    state.unreadable = {session: error for session, _, error, _ in rows}
    state.damaged = [
        {"session": s, "path": p, "error": e, "runs_counted": n} for s, p, e, n in rows
    ]


@dataclass(slots=True)
class _Read:
    """A source as the native model read it: its runs, the fold's snapshot
    (its first event, its events outside any started run), the session's
    tokens and missing events as the model counts them, and why part or all of
    it cannot be read (None: read whole)."""

    runs: list[RunSnapshot]
    snapshot: SessionSnapshot | None
    tokens: int
    missing_events: int
    error: str | None = None

    @classmethod
    def unreadable(cls, error: str) -> _Read:
        return cls([], None, 0, 0, error)


def _live_runs(directories: list[str]) -> list[_Read]:
    """Each live session's runs; where its log cannot be folded whole (a rotated
    segment cut short), the runs of the part that can be read, as the monitor
    reads it (``whole_history``: the segments in order, a damaged one up to
    where it breaks), with the reason; the reason alone when nothing can."""
    out: list[_Read] = []
    for directory, folded in zip(directories, fold_live(directories), strict=True):
        if not isinstance(folded, str):
            out.append(_Read(folded.runs, folded.snapshot, folded.tokens, folded.missing_events))
            continue
        try:
            history = whole_history(Path(directory))
        except Exception:  # the reason already says what is wrong
            history = None
        if history is None or not history.runs:
            out.append(_Read.unreadable(folded))
        else:
            out.append(
                _Read(
                    list(history.runs),
                    history.snapshot,
                    history.tokens,
                    history.missing_events,
                    folded,
                )
            )
    return out


def _delete(conn: sqlite3.Connection, keys: Sequence[str]) -> None:
    if not keys:
        return
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS doomed(source TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM doomed")
    conn.executemany("INSERT OR IGNORE INTO doomed VALUES (?)", [(k,) for k in keys])
    conn.execute(
        "DELETE FROM latency WHERE component_id IN (SELECT c.id FROM components c"
        " JOIN runs r ON c.run_id = r.id WHERE r.source IN (SELECT source FROM doomed))"
    )
    conn.execute(
        "DELETE FROM loops WHERE run_id IN"
        " (SELECT id FROM runs WHERE source IN (SELECT source FROM doomed))"
    )
    conn.execute(
        "DELETE FROM models WHERE run_id IN"
        " (SELECT id FROM runs WHERE source IN (SELECT source FROM doomed))"
    )
    conn.execute(
        "DELETE FROM run_latency WHERE run_id IN"
        " (SELECT id FROM runs WHERE source IN (SELECT source FROM doomed))"
    )
    conn.execute(
        "DELETE FROM components WHERE run_id IN"
        " (SELECT id FROM runs WHERE source IN (SELECT source FROM doomed))"
    )
    conn.execute("DELETE FROM runs WHERE source IN (SELECT source FROM doomed)")
    conn.execute("DELETE FROM sources WHERE source IN (SELECT source FROM doomed)")


def _roll_up(conn: sqlite3.Connection) -> None:
    """Each new run's components summed into its row, and their latency
    histograms merged into the run's, in SQL (the runs of the sources just
    refolded: those named in ``doomed``). Sums past SQLite's integers (a run
    whose components each fit and add up past them) are taken again clamped
    to ``INT64_MAX``, and those runs marked ``overflow``."""
    try:
        conn.execute("SAVEPOINT roll_up")
        _roll_up_with(conn, lambda x: f"SUM({x})")
        conn.execute("RELEASE roll_up")
    except sqlite3.OperationalError as exc:
        if "overflow" not in str(exc):
            raise
        conn.execute("ROLLBACK TO roll_up")
        conn.execute("RELEASE roll_up")
        _roll_up_with(conn, lambda x: f"MIN(TOTAL({x}), {INT64_MAX})")
        conn.execute(
            "UPDATE runs SET overflow = 1 WHERE source IN (SELECT source FROM doomed) AND"
            " (SELECT MAX(TOTAL(c.tokens), TOTAL(c.input_tokens), TOTAL(c.output_tokens),"
            " TOTAL(c.operations), TOTAL(c.errors), TOTAL(c.retries))"
            f" FROM components c WHERE c.run_id = runs.id) >= {float(INT64_MAX)!r}"
        )


def _roll_up_with(conn: sqlite3.Connection, total: Callable[[str], str]) -> None:
    fresh = "SELECT id FROM runs WHERE source IN (SELECT source FROM doomed)"
    conn.execute(
        "UPDATE runs SET (input_tokens, output_tokens, operations, errors, retries,"
        f" max_latency_ms) = (SELECT COALESCE({total('c.input_tokens')}, 0),"
        f" COALESCE({total('c.output_tokens')}, 0), COALESCE({total('c.operations')}, 0),"
        f" COALESCE({total('c.errors')}, 0), COALESCE({total('c.retries')}, 0),"
        " MAX(c.max_latency_ms)"
        f" FROM components c WHERE c.run_id = runs.id) WHERE id IN ({fresh})"
    )
    conn.execute(
        f"INSERT INTO run_latency SELECT c.run_id, h.bucket, {total('h.count')} FROM latency h"
        f" JOIN components c ON h.component_id = c.id WHERE c.run_id IN ({fresh})"
        " GROUP BY c.run_id, h.bucket"
    )
    # What each component's events without a model add up to: its totals less
    # its models' (retries are no calls: all of them here). Computed by SQL from
    # the native numbers, as the run roll-up above.
    m = {
        f: f"COALESCE({total('m.' + f)}, 0)"
        for f in ("tokens", "input_tokens", "output_tokens", "calls", "errors")
    }
    conn.execute(
        "INSERT INTO models(run_id, component, model, tokens, input_tokens, output_tokens,"
        " calls, errors, retries, cost_nanousd, priced_events, unpriced_tokens, unpriced_calls,"
        " unknown_usage_calls)"
        f" SELECT c.run_id, c.component, NULL, MAX(0, c.tokens - {m['tokens']}),"
        f" MAX(0, c.input_tokens - {m['input_tokens']}),"
        f" MAX(0, c.output_tokens - {m['output_tokens']}),"
        f" MAX(0, c.operations + c.errors - {m['calls']}),"
        f" MAX(0, c.errors - {m['errors']}), c.retries, 0, 0, 0, 0, 0"
        " FROM components c LEFT JOIN models m ON m.run_id = c.run_id"
        " AND m.component = c.component AND m.model IS NOT NULL"
        f" WHERE c.run_id IN ({fresh}) GROUP BY c.id"
        # A component all of whose events named a model has no such row.
        " HAVING COUNT(m.run_id) = 0 OR c.retries > 0"
        f" OR c.tokens > {m['tokens']}"
        f" OR c.operations + c.errors > {m['calls']}"
    )


def _mark_duplicates(conn: sqlite3.Connection) -> None:
    """A run indexed from two sources (a session's directory and an archive of
    it, both left by a maintenance run that died before removing the directory)
    counts once: from the live directory, else from the first archive by path.
    A later session reusing the ID has runs that started at other times, so
    both count."""
    conn.execute(
        "UPDATE runs SET duplicate = EXISTS (SELECT 1 FROM runs b"
        " WHERE b.session_id = runs.session_id AND b.run = runs.run"
        " AND b.started_at IS runs.started_at AND b.id <> runs.id"
        " AND (b.archived < runs.archived"
        " OR (b.archived = runs.archived AND b.source < runs.source)))"
    )


class _Clamp:
    """Integers as SQLite holds them: one past ``INT64_MAX`` is stored as it,
    and :attr:`hit` says one was (the run's ``overflow``)."""

    __slots__ = ("hit",)

    def __init__(self) -> None:
        self.hit = False

    def __call__(self, value: int | None) -> int | None:
        if value is not None and value > INT64_MAX:
            self.hit = True
            return INT64_MAX
        return value


def _insert(conn: sqlite3.Connection, source: Source, read: _Read) -> None:
    conn.execute(
        "INSERT INTO sources VALUES (?, ?, ?, ?, ?)",
        (source.key, source.session_id, source.archived, source.fingerprint, read.error),
    )
    runs = read.runs
    last = len(runs) - 1
    writer_there = source.locked and not source.archived
    for i, run in enumerate(runs):
        _insert_run(conn, source, run, run_status(run, writer_gone=not writer_there or i < last))
    _insert_outside(conn, source, read, writer_there)


def _insert_run(
    conn: sqlite3.Connection,
    source: Source,
    run: RunSnapshot,
    status: str,
    *,
    counted: bool = True,
    started_at: str | None = None,
    missing_events: int = 0,
) -> int:
    clamp = _Clamp()
    start = started_at or run.started_at
    started = start or run.ended_at or run.last_at
    cursor = conn.execute(
        "INSERT INTO runs(source, session_id, run, archived, status, finished, started_at,"
        " ended_at, started_ts, tokens, events, steps_completed, steps_failed, budget,"
        " last_seq, counted, missing_events) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            source.key,
            source.session_id,
            clamp(run.number),
            source.archived,
            status,
            run.ended_at is not None,
            start,
            run.ended_at,
            _epoch(started),
            clamp(run.tokens),
            clamp(run.events),
            clamp(run.steps_completed),
            clamp(run.steps_failed),
            clamp(run.budget),
            clamp(run.last_seq),
            counted,
            clamp(missing_events),
        ),
    )
    run_id = cursor.lastrowid
    assert run_id is not None
    _insert_components(conn, run_id, run.components.values(), clamp)
    _insert_models(conn, run_id, run.component_models, clamp)
    conn.executemany(
        "INSERT INTO loops VALUES (?, ?, ?, ?, ?)",
        [
            (run_id, lp.component, lp.input_sha256, clamp(lp.starts), ",".join(map(str, lp.seqs)))
            for lp in run.loops
        ],
    )
    if clamp.hit:
        conn.execute("UPDATE runs SET overflow = 1 WHERE id = ?", (run_id,))
    return run_id


def _insert_outside(
    conn: sqlite3.Connection, source: Source, read: _Read, writer_there: bool
) -> None:
    """The source's row of what the model counts outside its listed runs
    (``counted = 0``): with no run listed, the fold's current run (the events
    of a run whose ``session_start`` was rotated away, with their components,
    as the monitor shows them); else the session's tokens beyond its runs'
    (the model's total less its runs', in SQL). It holds the source's missing
    events too, and is left out when it holds nothing."""
    snap = read.snapshot
    first = snap.first_timestamp if snap is not None else None
    if not read.runs and snap is not None and snap.entries:
        _insert_run(
            conn,
            source,
            snap.run,
            run_status(snap.run, writer_gone=not writer_there),
            counted=False,
            started_at=first,
            missing_events=read.missing_events,
        )
        return
    if not read.runs and not read.missing_events:
        return
    clamp = _Clamp()
    cursor = conn.execute(
        "INSERT INTO runs(source, session_id, run, archived, status, finished, started_at,"
        " started_ts, tokens, events, steps_completed, steps_failed, counted, missing_events)"
        " VALUES (?, ?, 0, ?, 'outside', 0, ?, ?, ?, 0, 0, 0, 0, ?)",
        (
            source.key,
            source.session_id,
            source.archived,
            first,
            _epoch(first),
            clamp(read.tokens),
            clamp(read.missing_events),
        ),
    )
    row_id = cursor.lastrowid
    try:
        if clamp.hit:
            raise OverflowError
        conn.execute(
            "UPDATE runs SET tokens = MAX(0, tokens - (SELECT COALESCE(SUM(b.tokens), 0)"
            " FROM runs b WHERE b.source = ? AND b.counted = 1)) WHERE id = ?",
            (source.key, row_id),
        )
    except (OverflowError, sqlite3.OperationalError):
        # The runs' tokens pass SQLite's integers: they are marked, and what
        # lies outside them is not known in SQL.
        conn.execute("UPDATE runs SET tokens = 0, overflow = 1 WHERE id = ?", (row_id,))
    conn.execute(
        "DELETE FROM runs WHERE id = ? AND tokens = 0 AND missing_events = 0 AND overflow = 0",
        (row_id,),
    )


def _insert_components(
    conn: sqlite3.Connection,
    run_id: int,
    components: Iterable[ComponentSnapshot],
    clamp: _Clamp,
) -> None:
    for c in components:
        cursor = conn.execute(
            "INSERT INTO components(run_id, component, model, tokens, input_tokens,"
            " output_tokens, operations, errors, retries, timed, latency_ms, max_latency_ms,"
            " heaviest, retry_seqs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                c.name,
                c.model,
                clamp(c.tokens),
                clamp(c.input_tokens),
                clamp(c.output_tokens),
                clamp(c.operations),
                clamp(c.errors),
                clamp(c.retries),
                clamp(c.timed_operations),
                c.latency_ms,
                c.max_latency_ms,
                encode_calls(c.heaviest_calls),
                ",".join(map(str, c.retry_seqs)),
            ),
        )
        component_id = cursor.lastrowid
        buckets = [(component_id, i, clamp(n)) for i, n in enumerate(c.latency_histogram) if n]
        if buckets:
            conn.executemany("INSERT INTO latency VALUES (?, ?, ?)", buckets)


def _insert_models(
    conn: sqlite3.Connection,
    run_id: int,
    pairs: Mapping[str, Mapping[str, ModelSnapshot]],
    clamp: _Clamp,
) -> None:
    conn.executemany(
        "INSERT INTO models(run_id, component, model, tokens, input_tokens, output_tokens,"
        " calls, errors, cost_nanousd, priced_events, unpriced_tokens, unpriced_calls,"
        " unknown_usage_calls, tokens_held) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                run_id,
                component,
                name,
                clamp(m.tokens),
                clamp(m.input_tokens),
                clamp(m.output_tokens),
                clamp(m.calls),
                clamp(m.errors),
                clamp(m.cost_nanousd),
                clamp(m.priced_events),
                clamp(m.unpriced_tokens),
                clamp(m.unpriced_calls),
                clamp(m.unknown_usage_calls),
                clamp(m.tokens_held),
            )
            for component, models in pairs.items()
            for name, m in models.items()
        ],
    )


def encode_calls(calls: Iterable[tuple[int, int]]) -> str:
    """``(seq, tokens)`` pairs as the index keeps them: ``seq:tokens,...``."""
    return ",".join(f"{seq}:{tokens}" for seq, tokens in calls)


def decode_calls(text: str | None) -> list[tuple[int, int]]:
    """The pairs :func:`encode_calls` wrote."""
    out = []
    for part in (text or "").split(","):
        seq, sep, tokens = part.partition(":")
        if sep:
            out.append((int(seq), int(tokens)))
    return out


def _epoch(text: str | None) -> float | None:
    """Seconds since the epoch of an event time; the spec's offset-less form is UTC."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
