"""``sigil sessions``: list sessions with status, tokens and size.

Every number comes from the native session model (contract 12): each live
session's whole history, its ledger (``tokens.json``, which the orchestrator
writes from the model when a run ends) joined natively with the fold of its log,
as the orchestrator reads it. The fold is skipped when the ledger stands for the
log (written from exactly these files, no run left to resume), so a finished
session costs one small read; the runs only the ledger knows (their events
rotated or deleted by an external tool) count while a new run is live too. All
sessions are read by one native call, with no tailer and so no inotify watcher
(issue 10 item 8).
STARTED is the first run's start; DURATION the wall time from there to the last
event, or to now while the session is live. An archived session is the native
model of its archive (``rust/archive.rs``: its log members folded from the gzip
stream and joined with its ledger), as ``sigil report``, ``diff`` and ``replay``
read it: an archive cut short counts its readable part, is marked ``damaged``
and says why on stderr, never its ledger's whole total beside the other views'
readable part. Reading every archive costs one native inflate and fold of
each, across a small thread pool with the GIL released: about what reading
only the ledger at its front with Python's tarfile cost before
(benches/bench_sessions.py, 1,000 archives of 1,000 events: 2.15 s against
2.04 s on a loaded 2-core machine; 300 such archives read one by one: 0.28 s
folded, 0.71 s for the ledgers alone), so the listing keeps no second, cheaper
reading that could disagree. Only an archive with no log at all is listed from
the summaries at its front (see :mod:`sigil.telemetry.log_rotation`).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sigil.interfaces.cli.errors import UsageFailure

if TYPE_CHECKING:
    from sigil.telemetry.log_parser import HistorySnapshot, SessionSnapshot


@dataclass(slots=True)
class SessionRow:
    session_id: str
    status: str
    started_at: str | None
    duration_seconds: float | None
    tokens_used: int | None
    budget: int | None
    runs: int | None
    size_bytes: int
    archived: bool
    path: str
    #: the session model's runs, oldest first: run, status, started_at, ended_at,
    #: tokens_used
    run_details: list[dict[str, Any]] = field(default_factory=list)
    #: why the session's log cannot be read, one line naming the file: status
    #: ``unreadable`` when nothing of it can be; an archive that breaks after
    #: some of it was read (``damaged``) has its readable part counted
    error: str | None = None
    #: the numbers are those of the readable part of a damaged archive
    damaged: bool = False
    #: US dollars of the priced model calls (None: nothing priced), and the
    #: tokens of models without a price
    cost_usd: float | None = None
    unpriced_tokens: int = 0
    #: model calls whose usage the upstream did not report (counted apart, never
    #: as 0 tokens; None: not known, e.g. an archive's summaries)
    unknown_usage_calls: int | None = None
    #: the model's step loops (a component started 3+ times with one input in a
    #: run): run, component, input_sha256, starts, seqs. Runs known only from
    #: the ledger carry none.
    loops: list[dict[str, Any]] = field(default_factory=list)
    #: events the session's log (and its ledger) lack, the model's count of the
    #: holes in seq (a rotation that lost lines): its numbers are then a lower
    #: bound, and its status is marked ``+missing``. An archive counts the
    #: holes of its log. None: not known (summaries from before the ledger)
    missing_events: int | None = None


@click.command("sessions", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-path",
    "-l",
    metavar="DIR",
    help="Base log directory (default: logging.path, ~/.sigil/logs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array of sessions.")
@click.option(
    "--watch", is_flag=True, help="The live sessions, refreshed live (the same as sigil top)."
)
@click.pass_context
def sessions(ctx: click.Context, log_path: str | None, as_json: bool, watch: bool) -> None:
    """List sessions: ID, status, start, duration, tokens used/budget, size, archived.

    Status is running (its lock is held), complete, error, budget_exceeded,
    interrupted, incomplete (its writer stopped before the end), waiting (no run
    yet) or unreadable (its log cannot be read: one line on stderr says why).
    +missing: events are missing from its log (holes in seq, e.g. a rotation
    that lost lines): its numbers are a lower bound (one line on stderr).
    """
    if watch:
        from sigil.interfaces.cli.commands.top import top

        if as_json:
            raise UsageFailure(
                "--watch and --json cannot be used together (try sigil top --once --json)"
            )
        ctx.invoke(top, log_path=log_path)
        return
    from sigil.core.config import load_settings

    settings = load_settings({"logging.path": log_path})
    from sigil.interfaces.cli.screen import shown

    rows = list_sessions(Path(settings.logging.path))
    for row in rows:
        if row.damaged and row.error is not None:
            click.echo(
                f"sigil: warning: session {row.session_id} is unreadable in part:"
                f" {shown(row.error)} (its readable part is counted, as report and diff"
                " count it)",
                err=True,
            )
        elif row.error is not None:
            click.echo(
                f"sigil: warning: session {row.session_id} is unreadable: {shown(row.error)}",
                err=True,
            )
        if row.missing_events:
            click.echo(
                f"sigil: warning: session {row.session_id}: {row.missing_events:,} events"
                " missing from its log (holes in seq): its numbers are a lower bound",
                err=True,
            )
    if as_json:
        import orjson

        # orjson and no deep copy (dataclasses.asdict took longer than folding
        # a thousand small sessions); the same JSON as json.dumps(indent=2).
        names = [f.name for f in fields(SessionRow)]
        listing = [{name: getattr(row, name) for name in names} for row in rows]
        try:
            text = orjson.dumps(listing, option=orjson.OPT_INDENT_2).decode()
        except orjson.JSONEncodeError:  # e.g. a ledger's integer past 64 bits
            text = json.dumps(listing, indent=2)
        click.echo(text)
        return
    if not rows:
        click.echo(f"no sessions in {settings.logging.path}")
        return
    _print_table(rows)


def list_sessions(log_path: Path) -> list[SessionRow]:
    """Rows for live and archived sessions, newest start first."""
    from sigil.core.paths import SESSION_ID_RE

    rows: list[SessionRow] = []
    try:
        entries = sorted(os.scandir(log_path / "sessions"), key=lambda e: e.name)
    except FileNotFoundError:
        entries = []
    except NotADirectoryError:
        raise UsageFailure(f"log path {str(log_path)!r} is not a directory") from None
    except PermissionError:
        where = str(log_path / "sessions")
        raise UsageFailure(f"cannot list {where!r}: permission denied") from None
    live = [
        _live_row(entry.path)
        for entry in entries
        if SESSION_ID_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
    ]
    # Every session's history by one native call, across a small thread pool
    # (issue 10 item 8).
    _apply_models(live)
    for session in live:
        row, locked = session.row, session.locked
        if row.status == "unreadable":
            pass
        elif locked:
            row.status = "running"
        elif row.status == "running":
            row.status = "incomplete"  # no final event and nobody holds the lock (contract 7)
        rows.append(row)
    # log_rotation (tarfile, gzip) is imported only when there are archives: it
    # would cost the listing more than its 1,000 sessions do.
    if os.path.isdir(log_path / "archive"):
        from sigil.telemetry.log_rotation import archived_sessions

        archives = [a for found in archived_sessions(log_path).values() for a in found]
        rows.extend(_archived_rows(archives))
    # One parse per distinct start (a thousand fromisoformat calls showed).
    keys: dict[str | None, float] = {}
    for row in rows:
        if row.started_at not in keys:
            keys[row.started_at] = _sort_key(row.started_at)
    rows.sort(key=lambda row: keys[row.started_at], reverse=True)
    return rows


@dataclass(slots=True)
class _Live:
    """A live session's row (its numbers still to come from the session model),
    whether a writer holds its lock, and whether its ``tokens.json`` is at least
    as new as every file of its log (a summary from before the ledger is then
    shown as it was written)."""

    row: SessionRow
    locked: bool
    summary_current: bool


def _live_row(session_dir: str) -> _Live:
    from sigil.core.locks import is_session_locked
    from sigil.core.paths import LOCK_FILE_NAME, LOG_FILE_NAME, segment_sort_key

    # One pass over the directory gives the size, the log's newest mtime and the
    # summary's: a listing of 1,000 sessions makes few system calls per session.
    size, newest_log, summary_mtime, has_lock = 0, 0.0, None, False
    for entry in _scandir(session_dir):
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        size += st.st_size
        if entry.name == LOG_FILE_NAME or segment_sort_key(LOG_FILE_NAME, entry.name):
            newest_log = max(newest_log, st.st_mtime)
        elif entry.name == "tokens.json":
            summary_mtime = st.st_mtime
        elif entry.name == LOCK_FILE_NAME:
            has_lock = True
        if stat.S_ISDIR(st.st_mode):
            size += _tree_size(Path(entry.path))
    row = SessionRow(
        session_id=os.path.basename(session_dir),
        status="unknown",
        started_at=None,
        duration_seconds=None,
        tokens_used=None,
        budget=None,
        runs=None,
        size_bytes=size,
        archived=False,
        path=session_dir,
    )
    locked = has_lock and is_session_locked(session_dir)
    current = summary_mtime is not None and summary_mtime >= newest_log
    return _Live(row, locked, current)


def _scandir(directory: str) -> list[os.DirEntry[str]]:
    """The directory's entries; none when it cannot be listed (the fold then
    says why its log cannot be read)."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError:
        return []


#: archives folded at once (each fold releases the GIL: inflate and parse)
_ARCHIVE_THREADS = 4


def _archived_rows(archives: list[Path]) -> list[SessionRow]:
    """Each archive's row from the native model of the archive, as report,
    diff and replay read it (contract 12), the archives folded across a small
    thread pool."""
    if not archives:
        return []
    try:
        from sigil.reports.sources import archive_read
    except ImportError:  # the native core is not built: the summaries only
        return [_archived_row(archive, None, None) for archive in archives]
    threads = min(_ARCHIVE_THREADS, len(archives), os.cpu_count() or 1)
    if threads <= 1:
        folds = [archive_read(archive) for archive in archives]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            folds = list(pool.map(archive_read, archives))
    return [
        _archived_row(archive, snapshot, problem)
        for archive, (snapshot, problem) in zip(archives, folds, strict=True)
    ]


def _archived_row(
    archive: Path, snapshot: SessionSnapshot | None, problem: str | None
) -> SessionRow:
    row = SessionRow(
        session_id=archive.name.split(".", 1)[0],
        status="unknown",
        started_at=None,
        duration_seconds=None,
        tokens_used=None,
        budget=None,
        runs=None,
        size_bytes=_mtime_size(archive)[1],
        archived=True,
        path=str(archive),
    )
    if snapshot is not None and (snapshot.lines or snapshot.run_count):
        _apply_history(row, snapshot, snapshot, live=False)
        if row.status == "running":
            row.status = "incomplete"  # no final event, and its writer is long gone
        row.error, row.damaged = problem, problem is not None
        return row
    if problem is not None:
        # Nothing of its log or ledger can be read.
        row.status, row.error = "unreadable", problem
        return row
    # No log in it: the summaries at its front (an archive from before the ledger).
    from sigil.telemetry.log_rotation import read_archived_summaries

    summaries = read_archived_summaries(archive)
    tokens = _loads(summaries.get("tokens.json"))
    metrics = _loads(summaries.get("metrics.json"))
    if tokens is not None and _is_ledger(tokens):
        _apply_ledger(row, tokens)
    elif tokens is not None or metrics is not None:
        _apply_summaries(row, tokens or {}, metrics or {})
    return row


def _is_ledger(doc: dict[str, Any]) -> bool:
    return doc.get("ledger_version") == 1 and isinstance(doc.get("runs"), list)


def _apply_ledger(row: SessionRow, ledger: dict[str, Any]) -> None:
    """A finished session from its ledger: the runs and totals the orchestrator
    wrote from the session model when its last run ended."""
    row.status = _text(ledger.get("status")) or "complete"
    row.tokens_used = _int(ledger.get("total_used"))
    row.budget = _int(ledger.get("total_budget"))
    row.cost_usd = _cost_of(ledger.get("cost_usd"))
    row.unpriced_tokens = _int(ledger.get("unpriced_tokens")) or 0
    runs = [r for r in ledger["runs"] if isinstance(r, dict)]
    row.runs = len(runs)
    row.run_details = [
        {
            "run": _int(r.get("run")),
            "status": _text(r.get("status")),
            "started_at": _text(r.get("started_at")),
            "ended_at": _text(r.get("ended_at")),
            "tokens_used": _int(r.get("tokens_used")),
            "cost_usd": _cost_of(r.get("cost_usd")),
        }
        for r in runs
    ]
    first = _text(ledger.get("first_timestamp")) or next(
        (s for r in runs if (s := _text(r.get("started_at")))), None
    )
    last = _text(ledger.get("last_timestamp")) or next(
        (e for r in reversed(runs) if (e := _text(r.get("ended_at")))), None
    )
    _set_span(row, first, last)


def _apply_summaries(row: SessionRow, tokens: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Summaries from before the ledger (no ``ledger_version``)."""
    row.status = _text(metrics.get("status")) or _text(tokens.get("status")) or "complete"
    row.tokens_used = _int(tokens.get("total_used"))
    row.budget = _int(tokens.get("total_budget"))
    row.runs = _run_count(metrics.get("runs")) or _run_count(tokens.get("runs"))
    duration = metrics.get("duration_seconds")
    if isinstance(duration, int | float) and not isinstance(duration, bool):
        row.duration_seconds = float(duration)
    started = _text(metrics.get("started_at")) or _text(tokens.get("started_at"))
    ended = _parse_time(_text(metrics.get("timestamp")) or _text(tokens.get("timestamp")))
    if started is None and ended is not None and row.duration_seconds is not None:
        started = (ended - timedelta(seconds=row.duration_seconds)).isoformat()
    row.started_at = started


def _cost_of(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _run_count(value: Any) -> int | None:
    return len(value) if isinstance(value, list) else _int(value)


def _apply_models(sessions: list[_Live]) -> None:
    """Every number from the native session model: each session's history (its
    ledger joined with the fold of its log, the fold skipped when the ledger
    stands for it), all of them read by one native call across a small thread
    pool with the GIL released, with no tailer and so no inotify watcher. A
    session whose log cannot be read is ``unreadable``, with the reason in
    ``error``."""
    if not sessions:
        return
    try:
        from sigil.telemetry.log_parser import history_many
    except ImportError:  # the native core is not built: nothing to read the logs with
        return
    histories = history_many([session.row.path for session in sessions])
    now = datetime.now(UTC).isoformat()
    for session, history in zip(sessions, histories, strict=True):
        row, live = session.row, session.locked
        if isinstance(history, str):
            row.status, row.error = "unreadable", history
            continue
        if history.ledger_problem is not None and session.summary_current and not live:
            # Summaries from before the ledger, written after the log's last event.
            summary = _read_json(os.path.join(row.path, "tokens.json"))
            if summary is not None and "ledger_version" not in summary:
                metrics = _read_json(os.path.join(row.path, "metrics.json")) or {}
                _apply_summaries(row, summary, metrics)
                continue
        _apply_history(row, history, history.snapshot, live=live, now=now)


def _apply_history(
    row: SessionRow,
    history: HistorySnapshot | SessionSnapshot,
    snap: SessionSnapshot | None,
    *,
    live: bool,
    now: str | None = None,
) -> None:
    """A row's numbers from the session model: a live session's history (its
    ledger joined with its log's fold), or an archive's snapshot (the archive's
    fold joined with its ledger). ``snap`` is the fold's own snapshot."""
    from sigil.telemetry.log_parser import HistorySnapshot, run_status
    from sigil.telemetry.pricing import usd

    runs = history.runs
    row.tokens_used = history.tokens
    row.missing_events = (
        history.missing_events if isinstance(history, HistorySnapshot) else history.seq_missing
    )
    row.cost_usd = usd(history.cost_nanousd) if history.priced_events else None
    row.unpriced_tokens = history.unpriced_tokens
    row.unknown_usage_calls = history.unknown_usage_calls
    row.loops = [loop.to_dict() for r in runs for loop in r.loops]
    row.runs = history.run_count
    if runs:
        row.status, row.budget = runs[-1].status, runs[-1].budget
    elif snap is not None:
        row.status, row.budget = snap.status, snap.budget
    else:
        row.status = "waiting"
    # A run without a final event whose writer is gone (the lock is free, or
    # a later run started) is incomplete, as the monitor shows it.
    last = len(runs) - 1
    row.run_details = [
        {
            "run": r.number,
            "status": run_status(r, writer_gone=not live or i < last),
            "started_at": r.started_at,
            "ended_at": r.ended_at,
            "tokens_used": r.tokens,
            "cost_usd": usd(r.cost_nanousd) if r.priced_events else None,
        }
        for i, r in enumerate(runs)
    ]
    first = next((r.started_at for r in runs if r.started_at), None)
    if first is None and snap is not None:
        first = snap.first_timestamp
    # A live session's duration runs to now, not to its latest event.
    end: str | None
    if live:
        end = now
    else:
        end = snap.last_timestamp if snap is not None else None
        if end is None and runs:
            end = runs[-1].ended_at or runs[-1].last_at
    _set_span(row, first, end)


def _set_span(row: SessionRow, first: str | None, last: str | None) -> None:
    """STARTED is the first run's start; DURATION the wall time from there to
    the last event (to now while the session is live)."""
    row.started_at = first
    start, end = _parse_time(first), _parse_time(last)
    if start is not None and end is not None:
        if (start.tzinfo is None) != (end.tzinfo is None):
            start, end = start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)
        row.duration_seconds = round(max(0.0, (end - start).total_seconds()), 3)


# -- output ---------------------------------------------------------------------

_HEADERS = ("ID", "STATUS", "STARTED", "DURATION", "TOKENS", "COST", "SIZE", "ARCHIVED")


def _print_table(rows: list[SessionRow]) -> None:
    table = [_HEADERS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADERS))]
    for line in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _cells(row: SessionRow) -> tuple[str, ...]:
    from sigil.interfaces.cli.display import format_duration, unknown_text

    started = _parse_time(row.started_at)
    if started is None:
        shown_start = "-"
    else:
        local = started.astimezone() if started.tzinfo else started
        shown_start = local.strftime("%Y-%m-%d %H:%M:%S")
    tokens = "-" if row.tokens_used is None else f"{row.tokens_used:,}"
    if row.budget is not None:
        tokens += f"/{row.budget:,}"
    if row.unknown_usage_calls:
        tokens += f" {unknown_text(row.unknown_usage_calls)}"
    archived = Path(row.path).parent.name if row.archived else "-"
    return (
        row.session_id,
        row.status
        + ("+loop" if row.loops else "")
        + ("+damaged" if row.damaged else "")
        + ("+missing" if row.missing_events else ""),
        shown_start,
        format_duration(row.duration_seconds),
        tokens,
        _cost(row),
        _size(row.size_bytes),
        archived,
    )


def _cost(row: SessionRow) -> str:
    """The session's cost as the dashboard shows it: ``unpriced`` when only models
    without a price ran (never $0), ``-`` when no model did."""
    from sigil.interfaces.cli.display import format_cost

    return format_cost(_RowCost(row))


@dataclass(frozen=True, slots=True)
class _RowCost:
    """A row's cost in the session model's terms (for display.format_cost)."""

    row: SessionRow

    @property
    def cost_nanousd(self) -> int:
        return round((self.row.cost_usd or 0.0) * 1e9)

    @property
    def priced_events(self) -> int:
        return 0 if self.row.cost_usd is None else 1

    @property
    def unpriced_tokens(self) -> int:
        return self.row.unpriced_tokens


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# -- small readers -------------------------------------------------------------


def _read_json(path: str | Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        return _loads(file.read())


def _loads(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _sort_key(started_at: str | None) -> float:
    parsed = _parse_time(started_at)
    if parsed is None:
        return float("-inf")
    return parsed.timestamp()


def _mtime_size(path: Path) -> tuple[float, int]:
    try:
        st = os.lstat(path)
    except OSError:
        return (0.0, 0)
    return (st.st_mtime, st.st_size)


def _tree_size(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            total += _mtime_size(Path(root) / name)[1]
    return total
