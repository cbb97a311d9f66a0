"""Reading session logs: parse, fold and tail over the native core (contracts 5 and 6).

``fold_session`` turns a whole session (its rotated segments, then the live
file) into a :class:`SessionSummary` in native code with the GIL released and
no Python object per line. :class:`SessionTailer` does the same once
(``catch_up``) and then hands out new entries exactly once as they arrive,
following rotation and truncation. Nothing is dropped silently: malformed and
oversize lines are counted and their byte offsets kept. (``SessionTailer`` and
``start_catch_up`` live in :mod:`sigil.telemetry.session_tailer`, which imports
less, and are re-exported here.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigil import _native
from sigil.core.paths import LOG_FILE_NAME, resolve_log_path, rotated_segments, validate_session_id
from sigil.telemetry.session_tailer import SessionTailer, start_catch_up, take_catch_up

MAX_LINE_BYTES: int = _native.MAX_LINE_BYTES

__all__ = [
    "MAX_LINE_BYTES",
    "ComponentSnapshot",
    "ComponentTotals",
    "EventModel",
    "HistoryModel",
    "HistorySnapshot",
    "LastError",
    "Ledger",
    "MalformedLine",
    "ModelSnapshot",
    "ParseResult",
    "ParsedEntry",
    "RunSnapshot",
    "RunTotals",
    "SessionModel",
    "SessionSnapshot",
    "SessionSummary",
    "SessionTailer",
    "StepInFlight",
    "empty_snapshot",
    "fold_file",
    "fold_session",
    "latency_quantile_ms",
    "parse_bytes",
    "parse_lines",
    "run_status",
    "since_start",
    "snapshot_at_rest",
    "snapshot_files",
    "snapshot_many",
    "snapshot_session",
    "start_catch_up",
    "tail_start",
]

#: A parsed event: ``timestamp, session_id, event_type, component, message,
#: tokens, seq, offset`` and ``metadata`` (parsed on first access).
ParsedEntry = _native.ParsedEntry


#: A line that is not a valid event: ``offset``, ``kind`` (``malformed`` or
#: ``oversize``) and ``reason`` (a frozen native class).
MalformedLine = _native.MalformedLine

#: Everything the views show about a session at one moment: the native session
#: model's typed snapshot (contract 12). Runs are :class:`RunSnapshot`,
#: components :class:`ComponentSnapshot`.
SessionSnapshot = _native.SessionSnapshot
RunSnapshot = _native.RunSnapshot
ComponentSnapshot = _native.ComponentSnapshot
LastError = _native.LastError
#: The step running now, as the session model sees it (``SessionSnapshot.in_flight``).
StepInFlight = _native.StepInFlight
#: One model's totals within a component (``SessionSnapshot.models``).
ModelSnapshot = _native.ModelSnapshot
#: Where ``monitor --tail N`` / ``--since TIME`` start reading (rust/select.rs).
tail_start = _native.tail_start
since_start = _native.since_start
#: The session's ledger (``tokens.json``) read and checked natively, and the
#: whole history: the log's model joined with the runs only the ledger knows.
Ledger = _native.Ledger
HistorySnapshot = _native.HistorySnapshot
#: The model's latency quantile rule, for histograms merged across runs (reports).
latency_quantile_ms = _native.latency_quantile_ms


def empty_snapshot() -> SessionSnapshot:
    """The snapshot of a session with no events yet (what a view shows while waiting)."""
    return _native.Fold(0).snapshot()


# The native reader's reason for a line over the length bound (rust/lib.rs).
# The legacy summary dict's ``malformed_samples`` are 2-tuples: their kind is
# told from this suffix, here only.
_OVERSIZE_REASON = "exceeds the line limit"


def _malformed(offset: int, reason: str) -> MalformedLine:
    kind = "oversize" if reason.endswith(_OVERSIZE_REASON) else "malformed"
    return MalformedLine(offset, reason, kind)


@dataclass(slots=True)
class ParseResult:
    entries: list[ParsedEntry]
    malformed: list[MalformedLine]


def _result(raw: tuple[list[ParsedEntry], list[MalformedLine]]) -> ParseResult:
    entries, bad = raw
    return ParseResult(entries, bad)


def parse_lines(lines: list[bytes], base_offset: int = 0) -> ParseResult:
    """Parse consecutive lines (``bytes``, with or without their newline)."""
    return _result(_native.parse_lines(lines, base_offset))


def parse_bytes(data: bytes, base_offset: int = 0) -> ParseResult:
    """Parse a block of newline-terminated lines."""
    return _result(_native.parse_bytes(data, base_offset))


@dataclass(slots=True)
class ComponentTotals:
    tokens: int = 0
    operations: int = 0
    latency_ms: float = 0.0
    errors: int = 0


@dataclass(slots=True)
class RunTotals:
    """The latest pipeline run of a session (ARCHITECTURE.md contract 11)."""

    number: int = 0
    started_at: str | None = None
    ended_at: str | None = None
    status: str = "waiting"
    tokens_used: int = 0
    budget: int | None = None
    components: dict[str, ComponentTotals] = field(default_factory=dict)
    #: the run's ``session_start`` metadata (task, budget, allocations, thresholds)
    start_metadata: dict[str, Any] = field(default_factory=dict)


def _components(raw: dict[str, dict[str, Any]]) -> dict[str, ComponentTotals]:
    return {name: ComponentTotals(**values) for name, values in raw.items()}


@dataclass(slots=True)
class SessionSummary:
    """Totals of a session's events (all runs), from one native fold."""

    tokens_used: int = 0
    entries: int = 0
    lines: int = 0
    malformed: int = 0
    malformed_samples: list[MalformedLine] = field(default_factory=list)
    oversize_lines: int = 0
    torn_tail: bool = False
    event_counts: dict[str, int] = field(default_factory=dict)
    components: dict[str, ComponentTotals] = field(default_factory=dict)
    status: str = "waiting"
    budget: int | None = None
    allocations: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    run: RunTotals = field(default_factory=RunTotals)
    first_timestamp: str | None = None
    last_timestamp: str | None = None
    max_seq: int | None = None
    last_seq: int | None = None
    seq_gaps: int = 0
    seq_missing: int = 0
    seq_regressions: int = 0
    gap_samples: list[tuple[int, int]] = field(default_factory=list)
    dropped_events: int = 0
    last_entries: list[ParsedEntry] = field(default_factory=list)
    #: Files folded, oldest first (rotated segments, then the live file).
    files: list[Path] = field(default_factory=list)
    #: The typed snapshot of the same fold: every number the fields above hold
    #: and the rest of the session model (runs, reasons, retries, latency
    #: percentiles, recent rate). Views move to it; the fields above keep the
    #: pre-model component rule (operations and latency count failed steps too).
    snapshot: SessionSnapshot | None = None

    @classmethod
    def from_fold(cls, fold: _native.Fold, files: list[Path] | None = None) -> SessionSummary:
        """The summary and the snapshot of one native fold."""
        summary = cls.from_native(fold.summary(), files)
        summary.snapshot = fold.snapshot()
        return summary

    @classmethod
    def from_native(cls, d: dict[str, Any], files: list[Path] | None = None) -> SessionSummary:
        run = d["run"]
        return cls(
            tokens_used=d["tokens"],
            entries=d["entries"],
            lines=d["lines"],
            malformed=d["malformed"],
            malformed_samples=[_malformed(o, r) for o, r in d["malformed_samples"]],
            oversize_lines=d["oversize_lines"],
            torn_tail=d["torn_tail"],
            event_counts=dict(d["event_counts"]),
            components=_components(d["components"]),
            status=d["status"],
            budget=d["budget"],
            allocations=dict(d["allocations"]),
            runs=d["runs"],
            run=RunTotals(
                number=run["number"],
                started_at=run["started_at"],
                ended_at=run["ended_at"],
                status=run["status"] or "waiting",
                tokens_used=run["tokens"],
                budget=run["budget"],
                components=_components(run["components"]),
                start_metadata=dict(run["start_metadata"] or {}),
            ),
            first_timestamp=d["first_timestamp"],
            last_timestamp=d["last_timestamp"],
            max_seq=d["max_seq"],
            last_seq=d["last_seq"],
            seq_gaps=d["seq_gaps"],
            seq_missing=d["seq_missing"],
            seq_regressions=d["seq_regressions"],
            gap_samples=[tuple(g) for g in d["gap_samples"]],  # type: ignore[misc]
            dropped_events=d["dropped_events"],
            last_entries=list(d["last_entries"]),
            files=list(files or []),
        )


def fold_file(path: str | os.PathLike[str], last_n: int = 100) -> SessionSummary:
    """Fold one file (GIL released, memory independent of the file's size)."""
    fold = _native.Fold(last_n)
    fold.feed_file(Path(path))
    return SessionSummary.from_fold(fold, [Path(path)])


def snapshot_session(
    session_id: str, log_path: str | os.PathLike[str] | None = None, last_n: int = 100
) -> SessionSnapshot:
    """The session model of a whole session (rotated segments, then the live file)."""
    return SessionModel(session_id, log_path, last_n=last_n).update()


def snapshot_files(paths: list[Path], last_n: int = 0) -> SessionSnapshot:
    """The session model of plain (not gzip-compressed) files, folded in order,
    each read once natively (GIL released) with no tailer and no watcher. A file
    that vanished meanwhile (archived, rotated away) is skipped."""
    fold = _native.Fold(last_n)
    for path in paths:
        try:
            fold.feed_file(path)
        except FileNotFoundError:
            continue
    return fold.snapshot()


def snapshot_at_rest(
    session_id: str, log_path: str | os.PathLike[str] | None = None, last_n: int = 0
) -> SessionSnapshot:
    """The session model of a whole session read once, for a reader that does not
    follow it (``sigil sessions``, a new run's history).

    Each segment, then the live file, is folded by one native call; no tailer,
    so no inotify watcher is opened and closed per session (issue 10 item 8).
    Compressed segments (logrotate's ``compress``) need the tailer's gzip
    reader: then the session is read through :class:`SessionModel` instead.
    """
    directory = resolve_log_path(log_path) / "sessions" / validate_session_id(session_id)
    segments = rotated_segments(directory)
    if any(path.name.endswith(".gz") for path in segments):
        return SessionModel(session_id, log_path, last_n=last_n).update()
    return snapshot_files([*segments, directory / LOG_FILE_NAME], last_n)


def fold_session(
    session_id: str, log_path: str | os.PathLike[str] | None = None, last_n: int = 100
) -> SessionSummary:
    """Fold a whole session: its rotated segments, oldest first, then the live file.

    A session that has no log yet folds to an empty summary with status ``waiting``.
    """
    tailer = SessionTailer(session_id, log_path)
    return tailer.catch_up(last_n)


class SessionModel:
    """The session model, fed incrementally: one native fold of a session's log
    (rotated segments, then the live file, following rotation and truncation),
    joined natively with the session's ledger (``tokens.json``) when the ledger
    knows runs the log no longer holds (an external rotator deleted their
    events), so a monitor shows the whole history, as ``sigil sessions`` and
    the orchestrator do.

    :meth:`update` folds whatever arrived since the last call and returns a
    :class:`SessionSnapshot`; a monitor calls it once per frame, after
    :meth:`wait`. Every number a view shows comes from these snapshots.
    A catch-up started ahead for the same session (:func:`start_catch_up`) is
    taken over: the model goes on where it stopped.
    """

    def __init__(
        self,
        session_id: str,
        log_path: str | os.PathLike[str] | None = None,
        *,
        last_n: int = 100,
        max_line_bytes: int = _native.MAX_LINE_BYTES,
    ) -> None:
        ahead = take_catch_up(session_id, log_path, last_n, max_line_bytes)
        if ahead is not None:
            self.tailer, self.fold = ahead
        else:
            self.tailer = SessionTailer(session_id, log_path, max_line_bytes=max_line_bytes)
            self.fold = _native.Fold(last_n)
        self._ledger_path = os.path.join(self.tailer.session_dir, LEDGER_FILE_NAME)
        #: the ledger read last, and the (inode, size, mtime) it was read at
        self._ledger: Ledger | None = None
        self._ledger_key: tuple[int, int, int] | None = None

    def update(self) -> SessionSnapshot:
        """Fold what arrived, then snapshot (both without holding the GIL while waiting)."""
        self.tailer.fold_into(self.fold)
        return self.fold.snapshot(self._current_ledger(), writer_gone=self._writer_gone())

    def snapshot(self) -> SessionSnapshot:
        return self.fold.snapshot(self._ledger, writer_gone=self._writer_gone())

    def _writer_gone(self) -> bool:
        """Nobody holds the session's lock: the calls its last run left
        unended hold their reservations (the model's rule, contract 12)."""
        from sigil.core.locks import is_session_locked

        return not is_session_locked(self.tailer.session_dir)

    def _current_ledger(self) -> Ledger | None:
        """The session's ledger, read again only when the file changed (a run's
        end rewrites it): one ``stat`` per update. None when there is none or
        it is not a usable ledger (the log alone is the history then)."""
        try:
            st = os.stat(self._ledger_path)
        except OSError:
            self._ledger, self._ledger_key = None, None
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._ledger_key:
            self._ledger_key = key
            try:
                ledger = Ledger.read(self._ledger_path)
            except OSError:
                ledger = None
            self._ledger = ledger if ledger is not None and ledger.present else None
        return self._ledger

    def wait(self, timeout: float) -> bool:
        """Block, without the GIL, until the log changes or ``timeout`` seconds pass."""
        return self.tailer.wait(timeout)


class EventModel:
    """The native session model fed one event at a time, for a reader that holds
    events rather than lines (the OTLP span mapping): every total it reports is
    the fold's, so it cannot disagree with the other views (contract 12)."""

    __slots__ = ("_fold", "feed")

    def __init__(self) -> None:
        self._fold = _native.Fold(0)
        #: ``feed(timestamp, event_type, component, tokens, seq, metadata_json)``
        self.feed = self._fold.feed_event

    @property
    def tokens(self) -> int:
        """Tokens of the events fed so far."""
        return self._fold.tokens

    def snapshot(self) -> SessionSnapshot:
        return self._fold.snapshot()

    def cost(self) -> tuple[int, int, int]:
        """``(cost_nanousd, priced_events, unpriced_tokens)``: the snapshot's,
        without building one."""
        return self._fold.cost()


LEDGER_FILE_NAME = "tokens.json"


def log_files(session_dir: Path) -> list[tuple[str, int, int]]:
    """Name, size and mtime (ns) of each file of the session's log, oldest first:
    what the ledger records to know, later, that the log has not changed."""
    files = []
    for path in [*rotated_segments(session_dir), session_dir / LOG_FILE_NAME]:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        files.append((path.name, st.st_size, st.st_mtime_ns))
    return files


class HistoryModel:
    """The whole history of one session (contract 12): the native model of its
    log joined, natively, with its ledger (``tokens.json``), for a writer that
    holds the session's lock.

    :meth:`read` reads the ledger and, unless the ledger alone is the history
    (the log is exactly as the ledger last saw it and no run is left to
    resume), folds the log at rest. A run then appends to the live file;
    :meth:`at_run_end` continues the same fold with the run's own events (the
    fold at rest is done first if the ledger spared it) and joins it with the
    ledger again, so the end of a run does not refold the log from scratch.
    Blocking: call it in a thread.
    """

    def __init__(
        self,
        session_dir: Path,
        *,
        last_n: int = 0,
        use_ledger: bool = True,
        writer_gone: bool | None = None,
    ) -> None:
        self.session_dir = session_dir
        self.last_n = last_n
        self.use_ledger = use_ledger
        #: the last run's writer is gone (True: the caller holds the lock and
        #: has not started its run; None: nobody holds the lock); then the
        #: calls it left unended hold their reservations (the model's rule)
        self.writer_gone = writer_gone
        self._fold: _native.Fold | None = None
        #: the tailer's model, when a segment is compressed (it follows the log itself)
        self._model: SessionModel | None = None
        #: where the fold stopped in the live file (None: there was none)
        self._live: _native.Checkpoint | None = None
        #: the rotated segments folded (a run's end with others reads anew)
        self._segments: list[str] = []
        #: the fold covers the log from its oldest segment
        self._folded = False

    def ledger(self) -> Ledger:
        if not self.use_ledger:
            return Ledger.absent()
        return Ledger.read(self.session_dir / LEDGER_FILE_NAME)

    def read(self) -> HistorySnapshot:
        """The history now: from the ledger alone when it is current, else the
        fold of the log at rest joined with the ledger."""
        ledger = self.ledger()
        if ledger.present and ledger.unchanged(log_files(self.session_dir)):
            return ledger.history()
        self.fold_at_rest()
        return self._history(ledger)

    def fold_at_rest(self) -> None:
        """Fold the log as it is (segments, then the live file), once."""
        if self._folded:
            return
        directory = self.session_dir
        segments = rotated_segments(directory)
        self._segments = [path.name for path in segments]
        if any(path.name.endswith(".gz") for path in segments):
            model = SessionModel(directory.name, directory.parent.parent, last_n=self.last_n)
            model.update()
            self._model = model
        else:
            fold = _native.Fold(self.last_n)
            live = directory / LOG_FILE_NAME
            # The live file's identity before the segments: one renamed away
            # meanwhile is noticed when the run's events are folded.
            try:
                st = live.lstat()
                start: _native.Checkpoint | None = _native.Checkpoint(st.st_dev, st.st_ino, 0)
            except FileNotFoundError:
                start = None
            for path in segments:
                try:
                    fold.feed_file(path)
                except FileNotFoundError:
                    continue
            if start is not None:
                try:
                    self._live = fold.continue_file(live, start)
                except FileNotFoundError:
                    self._live = None
            self._fold = fold
        self._folded = True

    def folded(self) -> HistorySnapshot:
        """The fold of the log at rest (done first if it was not), joined with
        the ledger: the runs only the ledger knows count too, even with no log
        left at all (deleted by an external tool)."""
        self.fold_at_rest()
        return self._history(self.ledger())

    def _history(self, ledger: Ledger) -> HistorySnapshot:
        gone = self.writer_gone
        if gone is None:
            from sigil.core.locks import is_session_locked

            gone = not is_session_locked(self.session_dir)
        if self._model is not None:
            return self._model.fold.history(ledger, writer_gone=gone)
        assert self._fold is not None
        return self._fold.history(ledger, writer_gone=gone)

    def at_run_end(self) -> HistorySnapshot | None:
        """The history once a run has appended its events to the live file:
        the fold at rest continued with them, joined with the ledger. None when
        the live file is no longer the one folded (an external rotator renamed
        or truncated it during the run): read the history anew then."""
        self.fold_at_rest()
        if self._model is not None:
            self._model.update()
            return self._history(self.ledger())
        assert self._fold is not None
        if [path.name for path in rotated_segments(self.session_dir)] != self._segments:
            return None  # rotated meanwhile
        live = self.session_dir / LOG_FILE_NAME
        try:
            # No live file at rest: the run created it, all of it is new.
            moved = self._fold.continue_file(live, self._live)
        except FileNotFoundError:
            return None
        if moved is None:
            return None
        self._live = moved
        return self._history(self.ledger())

    def continued_with(self, events: Iterable[FedEvent]) -> HistorySnapshot:
        """The fold at rest (done first if it was not), copied and continued with
        ``events`` (each ``Fold.feed_event``'s arguments, oldest first) instead of
        the live file, joined with the ledger: the history of a run from the
        events its writer kept, whatever an external rotator did to the file
        meanwhile (renamed it away, deleted it). The events the fold at rest
        already holds (it may have read the run's first lines: it is done
        beside the run) are skipped by ``seq``. Call it before
        :meth:`at_run_end`, which moves a compressed log's model on."""
        self.fold_at_rest()
        base = self._model.fold if self._model is not None else self._fold
        assert base is not None
        held = base.summary().get("max_seq")
        fold = base.copy()
        for args in events:
            seq = args[4]
            if held is not None and seq is not None and seq <= held:
                continue
            fold.feed_event(*args)
        gone = self.writer_gone
        if gone is None:
            from sigil.core.locks import is_session_locked

            gone = not is_session_locked(self.session_dir)
        return fold.history(self.ledger(), writer_gone=gone)


#: ``Fold.feed_event``'s arguments: timestamp, event_type, component, tokens,
#: seq, metadata_json, message
FedEvent = tuple[str, str, str, int, int | None, str, str]


def session_history(
    session_dir: Path, *, last_n: int = 0, use_ledger: bool = True
) -> HistorySnapshot:
    """The whole history of a session at rest (its log and its ledger)."""
    return HistoryModel(session_dir, last_n=last_n, use_ledger=use_ledger).read()


# ---------------------------------------------------------------------------
# Readers above this module (the OTLP package) reach the native reader only
# through it (ARCHITECTURE.md, Layers).


def last_seq(path: str | os.PathLike[str]) -> int | None:
    """The ``seq`` of the last valid event in one log file, or None: read backwards
    from its end (a compressed segment is streamed through)."""
    return _native.tail_max_seq(Path(path))


# ---------------------------------------------------------------------------
# What every view shows of a run and of many sessions at rest


def run_status(run: RunSnapshot, *, writer_gone: bool) -> str:
    """A run's status to show: ``incomplete`` once its writer is gone (nobody holds
    the session's lock, or a later run started) without a final event; otherwise
    the model's. The monitor's current run and ``sigil sessions``' run details
    both say it through this one rule (contract 7)."""
    if writer_gone and run.ended_at is None:
        return "incomplete"
    return run.status


def snapshot_many(
    session_dirs: Sequence[str | os.PathLike[str]],
    *,
    threads: int = 0,
    last_n: int = 0,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> list[SessionSnapshot | str]:
    """The session model of many sessions at rest, as :func:`snapshot_at_rest`
    reads one (rotated segments, then the live file; no tailer, no watcher), in
    one native call that folds them across a small thread pool (``threads``, 0:
    the machine's cores) with the GIL released.

    One item per directory, in order: the session's snapshot, or a one-line
    reason naming the file when its log cannot be read (a FIFO, a directory, a
    symlink, permission denied). A session with no log yet folds to an empty
    snapshot (status ``waiting``).
    """
    logs = [os.path.join(directory, LOG_FILE_NAME) for directory in session_dirs]
    return _native.fold_sessions(logs, threads, max_line_bytes, last_n)


def history_many(
    session_dirs: Sequence[str | os.PathLike[str]],
    *,
    threads: int = 0,
    last_n: int = 0,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> list[HistorySnapshot | str]:
    """The whole history of many sessions (:func:`session_history` of each), in
    one native call across a small thread pool with the GIL released: each
    session's ledger joined with the fold of its log, the fold skipped when the
    ledger stands for the log (it was written from exactly these files and no
    run is left to resume). So the runs only a ledger knows (their events
    rotated or deleted by an external tool) are counted whether the session is
    finished or live.

    One item per directory, in order: the history, or a one-line reason naming
    the file when the session's log cannot be read.
    """
    logs = [os.path.join(directory, LOG_FILE_NAME) for directory in session_dirs]
    return _native.read_histories(logs, threads, max_line_bytes, last_n)
