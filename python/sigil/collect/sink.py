"""Collected spans into session logs: one native writer per session (opened as
:class:`~sigil.telemetry.execution_logger.ExecutionLogger` opens its own: the
session's lock, then ``seq`` after the log's last event), each holding that
session's lock while it is open (ARCHITECTURE.md contract 7).

**Runs.** The first span collect writes to a session whose last run has ended
(or that is new) starts a run: a ``session_start`` (``metadata.run``, contract
13); when collect closes the session -- idle for ``idle_seconds``, or collect stops -- a
``session_complete``. So a collected session reads as live while spans arrive
and as complete afterwards, like one that ``sigil orchestrate`` wrote, and each
burst of activity is a run (contract 11).

**Dedupe.** A span arriving again (an exporter retrying after a timeout) is
counted once: the (trace ID, span ID) of each span written is in its events'
metadata, and the set is rebuilt from the log when a session is opened, so a
restart of collect keeps it. Only ``step_complete``/``step_error``/
``token_consumption`` events mark a span as written: a span whose
``step_start`` was written just before a crash is written whole again.

**Aggregates.** Some instrumentations put the usage of an agent's model calls
on the agent's span as well (a parent of those calls). A span reporting usage
whose children already reported theirs is written with no tokens (its
reported counts kept as ``reported_*``), so nothing counts twice. A child's
event names its parent (``metadata.parent_span_id``), and the parents are
rebuilt from the log with the spans written, so this holds when the parent
arrives after its session was closed (idle, evicted) or collect restarted.
Children end, and so are exported, before their parent; but a parent can
arrive first (an earlier export batch, first in a batch). A span that can
group model calls (an agent's or a tool's: ``SpanEvent.groups``) reporting
usage before any child is known is *pending*: written at once with no tokens
(``reported_*`` and ``pending: true``) and held; a child reporting usage makes
it an aggregate (nothing more is written for it). Still without one after
``settle_seconds`` (checked by :meth:`SessionSink.close_idle`) or when its run
ends, it is *settled*: one ``token_consumption`` of its component with its
tokens and cost (``settled: true``) -- the only report of those tokens. A
child arriving after that is *covered* (its usage is in that count): written
with no tokens (``covered: true``), and so are its own children. The log is
append-only and the fold adds every event's tokens, so each token is in
exactly one event. Pending, settled and covered spans are rebuilt from the log
with the parents, so this holds across a reopen too.

**Open sessions.** At most ``max_open`` sessions are open at once
(:data:`DEFAULT_MAX_OPEN`, and never more than :func:`max_open_for` allows
under the process's descriptor limit): each holds two descriptors (its lock
and its log) and a writer thread, and traces without a conversation ID are a
session each, so a burst of them would exhaust the descriptors. Opening one
more *parks* the least recently used one: its writer closes (its log and its
thread), its lock stays held and its run goes on -- so it reads as live
(contract 7), and a span arriving for it later reopens its log after the
last event and continues the same run, with no ``session_complete`` and
``session_start`` per eviction. A parked session's run ends as an open one's
does: idle for ``idle_seconds``, or collect stops. At most ``max_parked``
sessions are parked (:func:`max_parked_for`, a descriptor each); past that the
least recently used one's run ends (``session_complete``, reason
``evicted``) and its lock is released; a span arriving for it later reopens
it from its log (spans written, parents known, runs), so nothing is counted
twice and it starts a new run.

**Secrets.** Every text a span brings (its name or status message, the
component, model, provider, operation and error type) is scrubbed with the
built-in sanitizer's rules (``sigil._native.sanitize_string``, what
:class:`~sigil.telemetry.sanitization.LogSanitizer` runs), once per distinct
string of a request; the rest of an event is numbers and hex IDs. So the
writers run without a per-event sanitizer.

**Native.** Decoding, the mapping, dedupe, the aggregate rule and the
formatting of the events run in the extension (``rust/otlp.rs``, the GIL
released): :meth:`SessionSink.ingest` takes the
:class:`sigil._native.OtlpBatch` of a request, and appends each session's
events to its writer in one call. Python keeps what touches other modules:
opening a session (its lock, its history), the run events and pricing (once
per distinct model and token counts of a request).

**Cost.** A span's input and output tokens are priced by its model as the event
is written (``cost_usd``, see sigil.telemetry.pricing); an aggregate (or a
covered span) carries no tokens and so no cost; a pending span's cost is kept
(``reported_cost_usd``) for its settle event.
"""

from __future__ import annotations

import errno
import resource
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sigil.collect.decode import SpanData
from sigil.collect.mapping import session_id_for
from sigil.core.locks import SessionArchived, SessionBusy, SessionLock
from sigil.core.paths import LOG_FILE_NAME, resolve_log_path, rotated_segments, session_dir
from sigil.telemetry import otlp_ingest
from sigil.telemetry.log_parser import last_seq
from sigil.telemetry.pricing import Pricer, cost_number

__all__ = [
    "COMPONENT",
    "DEFAULT_MAX_OPEN",
    "IngestResult",
    "SessionSink",
    "max_open_for",
    "max_parked_for",
    "raise_fd_limit",
]

#: The component of the run events collect writes itself.
COMPONENT = "collect"
_DONE_EVENTS = frozenset({"step_complete", "step_error", "token_consumption"})
#: The writer's buffer: it wakes its flusher when this much is queued (the
#: flush interval bounds the delay otherwise).
_BUFFER_BYTES = 64 << 10
_MAX_BUFFER_BYTES = 8 << 20
#: Sessions open at once by default (each: 2 descriptors and a writer thread).
DEFAULT_MAX_OPEN = 256
#: Descriptors left for everything else (connections, the interpreter, reading a
#: session's history) when bounding the open sessions by the descriptor limit.
_RESERVED_FDS = 96
#: Descriptors one open session may hold (its lock and log, and a margin for
#: the writer rotating its segments).
_FDS_PER_SESSION = 4
#: Sessions parked at most, whatever the descriptor limit: each keeps its
#: lock's descriptor and its dedupe state in memory, and ending its run opens
#: a writer again (about 3 ms with its fsync: a second for 300 at shutdown).
MAX_PARKED = 1024


#: The soft descriptor limit collect raises itself to, within the hard limit:
#: room for :data:`DEFAULT_MAX_OPEN` open and :data:`MAX_PARKED` parked
#: sessions, and connections.
WANTED_FDS = 4096


def raise_fd_limit(wanted: int = WANTED_FDS) -> int:
    """Raise ``RLIMIT_NOFILE``'s soft limit to ``wanted`` when it is lower
    (never past the hard limit, never lower it); the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a platform's own ceiling (macOS: OPEN_MAX)
            return soft
        return target
    return soft


def _fd_budget(fd_limit: int | None) -> int:
    """The descriptors sessions may hold: the limit (``RLIMIT_NOFILE``'s soft
    limit by default) less a reserve."""
    if fd_limit is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        fd_limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    return fd_limit - _RESERVED_FDS


def max_open_for(fd_limit: int | None = None) -> int:
    """The open sessions the descriptor limit (``RLIMIT_NOFILE``'s soft limit
    by default) allows: an eighth of what is left after a reserve (half of it
    at :data:`_FDS_PER_SESSION` each; the other half is for parked sessions),
    at least 4, at most :data:`DEFAULT_MAX_OPEN`."""
    budget = _fd_budget(fd_limit)
    return max(4, min(DEFAULT_MAX_OPEN, budget // (2 * _FDS_PER_SESSION)))


def max_parked_for(fd_limit: int | None = None, max_open: int | None = None) -> int:
    """The parked sessions (a descriptor each, their lock) the descriptor limit
    allows beside ``max_open`` open ones (default :func:`max_open_for`): what
    is left of the budget, at most :data:`MAX_PARKED`."""
    budget = _fd_budget(fd_limit)
    opened = max_open_for(fd_limit) if max_open is None else max_open
    return max(0, min(MAX_PARKED, budget - opened * _FDS_PER_SESSION))


@dataclass(slots=True)
class IngestResult:
    spans: int = 0
    written: int = 0
    duplicates: int = 0
    ignored: int = 0
    #: events the writer had to drop (full or failing disk; the log's
    #: events_dropped line counts them and their tokens)
    dropped: int = 0
    #: spans refused because another writer holds their session's lock
    busy: int = 0
    busy_sessions: list[str] = field(default_factory=list)
    #: spans refused for good: their session was archived (its ID names that
    #: history; a retry cannot help, so they are not "busy")
    archived: int = 0
    archived_sessions: list[str] = field(default_factory=list)


class _OpenSession:
    """A session collect holds (its lock): open (its writer too) or parked
    (its writer closed, to be reopened after its last event)."""

    __slots__ = (
        "directory",
        "last_used",
        "lock",
        "run",
        "session_id",
        "started",
        "state",
        "writer",
    )

    def __init__(
        self,
        session_id: str,
        directory: Path,
        lock: SessionLock,
        writer: otlp_ingest.AppendWriter,
        state: otlp_ingest.OtlpSession,
        run: int,
    ) -> None:
        self.session_id = session_id
        self.directory = directory
        self.lock = lock
        self.writer = writer
        self.state = state
        self.run = run
        self.started = False
        self.last_used = time.monotonic()

    def log(self, event_type: str, message: str, meta: dict[str, Any]) -> None:
        self.writer.write_event(
            self.session_id, event_type, COMPONENT, message, 0, orjson.dumps(meta)
        )

    def close(self) -> None:
        try:
            if not self.writer.closed:
                self.writer.close()
        finally:
            # Released even when the last flush failed (as ExecutionLogger does).
            self.lock.release()


@dataclass(slots=True)
class _History:
    """What a session's log says collect wrote before."""

    #: spans written (trace ID + span ID)
    seen: set[str] = field(default_factory=set)
    #: parents whose children reported usage (trace ID + ``parent_span_id``)
    parents: list[str] = field(default_factory=list)
    #: spans settled or covered: their children count 0
    covered: list[str] = field(default_factory=list)
    #: (component, message, metadata JSON) of each pending event
    pending: list[tuple[str, str, bytes]] = field(default_factory=list)
    runs: int = 0
    #: its last run is still open (no final event after its start)
    open_run: bool = False


def _read_history(directory: Path) -> _History:
    """From a session's log: the spans already written, the parents of those
    that reported usage, its run count and whether its last run is open."""
    history = _History()
    if not directory.is_dir():
        return history
    from sigil.telemetry.otlp.reader import iter_session_entries

    seen, parents, covered = history.seen, history.parents, history.covered
    for entry in iter_session_entries(directory):
        kind = entry.event_type
        if kind == "session_start":
            history.runs += 1
            history.open_run = True
        elif kind in ("session_complete", "session_error"):
            history.open_run = False
        elif kind in _DONE_EVENTS:
            meta = entry.metadata
            trace_id, span_id = meta.get("trace_id"), meta.get("span_id")
            if isinstance(trace_id, str) and isinstance(span_id, str):
                seen.add(trace_id + span_id)
                parent = meta.get("parent_span_id")
                if isinstance(parent, str) and parent:
                    parents.append(trace_id + parent)
                if meta.get("settled") is True or meta.get("covered") is True:
                    covered.append(trace_id + span_id)
                elif meta.get("pending") is True:
                    history.pending.append((entry.component, entry.message, orjson.dumps(meta)))
    return history


def _next_seq(directory: Path) -> int:
    """The seq after the last event of the live file or, if it has none yet
    (just rotated), of the newest rotated segment (as ExecutionLogger does)."""
    for path in [directory / LOG_FILE_NAME, *reversed(rotated_segments(directory))]:
        try:
            last = last_seq(path)
        except FileNotFoundError:
            continue
        if last is not None:
            return int(last) + 1
    return 0


class SessionSink:
    """Writes collected spans to their sessions' logs (not thread-safe: one caller)."""

    def __init__(
        self,
        log_path: str | Path | None = None,
        *,
        idle_seconds: float = 60.0,
        fsync: str = "interval",
        pricer: Pricer | None = None,
        max_open: int | None = None,
        max_parked: int | None = None,
        settle_seconds: float | None = None,
    ) -> None:
        self.log_path = resolve_log_path(log_path)
        #: sessions open at once (the least recently used is parked for a new one)
        self.max_open = max_open_for() if max_open is None else max(1, max_open)
        #: sessions parked at once (past it, the least recently used one's run ends)
        self.max_parked = (
            max_parked_for(max_open=self.max_open) if max_parked is None else max(0, max_parked)
        )
        #: prices each model call (config's overrides, then the table)
        self.pricer = pricer if pricer is not None else Pricer()
        self.idle_seconds = idle_seconds
        #: how long a pending span (a parent reporting usage before any child)
        #: waits for a child before its own tokens count (default: idle_seconds)
        self.settle_seconds = idle_seconds if settle_seconds is None else settle_seconds
        if fsync not in ("always", "interval", "never"):
            raise ValueError(f"fsync must be 'always', 'interval' or 'never', not {fsync!r}")
        self.fsync = fsync
        #: open sessions, least recently used first
        self._sessions: OrderedDict[str, _OpenSession] = OrderedDict()
        #: parked sessions (lock held, writer closed), least recently used first
        self._parked: OrderedDict[str, _OpenSession] = OrderedDict()
        #: sessions whose run was ended early to make room (reason "evicted")
        self.evicted = 0
        #: raw session IDs (conversation, session, trace) to valid ones
        self._session_ids: dict[str, str] = {}

    @property
    def open_sessions(self) -> list[str]:
        return sorted(self._sessions)

    @property
    def parked_sessions(self) -> list[str]:
        return sorted(self._parked)

    def _writer(self, directory: Path, session_id: str, start_seq: int) -> otlp_ingest.AppendWriter:
        return otlp_ingest.AppendWriter(
            directory / LOG_FILE_NAME,
            buffer_bytes=_BUFFER_BYTES,
            flush_interval=0.1,
            fsync=self.fsync,  # type: ignore[arg-type]
            max_buffer_bytes=_MAX_BUFFER_BYTES,
            session_id=session_id,
            start_seq=start_seq,
            sanitize=False,
        )

    def _open(self, session_id: str) -> _OpenSession:
        directory = session_dir(session_id, self.log_path)
        # The lock first (SessionBusy when another writer has it), then the history
        # under it, so nobody writes between the reading and the writing.
        lock = SessionLock(directory)
        lock.acquire()
        try:
            history = _read_history(directory)
            writer = self._writer(directory, session_id, _next_seq(directory))
        except BaseException:
            lock.release()
            raise
        state = otlp_ingest.OtlpSession()
        state.add_seen(history.seen)
        state.add_parents(history.parents)
        state.add_covered(history.covered)
        # after the parents and the settled: those are pending no more
        state.add_pending(history.pending, time.monotonic())
        session = _OpenSession(session_id, directory, lock, writer, state, history.runs)
        # A run still open (collect was killed) goes on; otherwise the first span
        # written starts one, so a retry of spans already written adds no run.
        session.started = history.open_run
        return session

    def _reopen(self, session: _OpenSession) -> _OpenSession:
        """A parked session open again: a writer after its last event (its lock
        was held meanwhile, so nobody wrote after it)."""
        writer = session.writer
        session.writer = self._writer(session.directory, session.session_id, writer.next_seq)
        return session

    def _open_bounded(self, session_id: str) -> _OpenSession:
        """Open a session (or reopen it if parked), first parking the least
        recently used ones past ``max_open``; out of descriptors anyway (other
        files, many connections), end a quarter of the sessions held and try
        once more."""
        # A parked session to reopen is set aside, so that parking others does
        # not pick it to end.
        parked = self._parked.pop(session_id, None)
        try:
            while len(self._sessions) >= self.max_open:
                self._evict()
            try:
                return self._open(session_id) if parked is None else self._reopen(parked)
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                if not self._sessions and not self._parked:
                    raise
            reason = "evicted: out of descriptors"
            for _ in range(max(1, (len(self._sessions) + len(self._parked)) // 4)):
                # the open ones first: their writers are open (a parked one needs
                # a descriptor to write its run's end)
                held = self._sessions or self._parked
                if held:
                    self.evicted += 1
                    self._close(next(iter(held)), reason)
            return self._open(session_id) if parked is None else self._reopen(parked)
        except BaseException:
            if parked is not None:
                self._parked[session_id] = parked  # still parked (its writer closed)
            raise

    def _evict(self) -> None:
        """Park the least recently used open session; past ``max_parked``, end
        the least recently used parked one's run."""
        sid, session = next(iter(self._sessions.items()))
        if self.max_parked == 0:
            self.evicted += 1
            self._close(sid, f"evicted: more than {self.max_open} sessions active")
            return
        del self._sessions[sid]
        try:
            session.writer.close()
        except BaseException:
            # its events may not all be on disk: the run is left as it is (the
            # lock released, it reads as incomplete) and the error goes up
            session.lock.release()
            raise
        self._parked[sid] = session
        while len(self._parked) > self.max_parked:
            self.evicted += 1
            limit = self.max_open + self.max_parked
            self._close(next(iter(self._parked)), f"evicted: more than {limit} sessions active")

    def _session_id(self, raw: str) -> str:
        sid = self._session_ids.get(raw)
        if sid is None:
            if len(self._session_ids) >= 65536:
                self._session_ids.clear()
            sid = self._session_ids[raw] = session_id_for(raw)
        return sid

    def _costs(self, batch: otlp_ingest.OtlpBatch) -> list[float | None]:
        """The cost of each of the batch's price requests (None: unpriced)."""
        price = self.pricer.price
        costs: list[float | None] = []
        for model, inp, out in batch.price_requests():
            # Blocks only while the table's import (started by serve) finishes, once.
            cost = price(model, inp, out)
            costs.append(None if cost is None else cost_number(cost))
        return costs

    def ingest(self, spans: otlp_ingest.OtlpBatch | Sequence[SpanData]) -> IngestResult:
        """Write a request's events (an :class:`~sigil._native.OtlpBatch`, or
        spans decoded in Python); spans of a busy session are refused and counted."""
        batch = (
            spans if isinstance(spans, otlp_ingest.OtlpBatch) else otlp_ingest.otlp_map_spans(spans)
        )
        result = IngestResult(spans=batch.spans, ignored=batch.ignored)
        sessions = self._sessions
        busy: set[str] = set()
        archived: set[str] = set()
        now = time.monotonic()
        costs: list[float | None] | None = None
        for index, (raw, size) in enumerate(zip(batch.sessions(), batch.sizes(), strict=True)):
            sid = self._session_id(raw)
            session = sessions.get(sid)
            if session is None:
                parked = self._parked.get(sid)
                if parked is not None and not parked.state.has_new(batch, index):
                    # spans written already (a retry): no need to reopen its log
                    parked.last_used = now
                    self._parked.move_to_end(sid)
                    result.duplicates += size
                    continue
                if sid in busy:
                    result.busy += size
                    continue
                if sid in archived:
                    result.archived += size
                    continue
                try:
                    session = self._open_bounded(sid)
                except SessionArchived:
                    archived.add(sid)
                    result.archived += size
                    continue
                except SessionBusy:
                    busy.add(sid)
                    result.busy += size
                    continue
                sessions[sid] = session
            else:
                sessions.move_to_end(sid)
            session.last_used = now
            if not session.started:
                if not session.state.has_new(batch, index):
                    result.duplicates += size
                    continue
                session.run += 1
                session.started = True
                session.log(
                    "session_start",
                    f"collecting OTLP spans (run {session.run})",
                    {"run": session.run, "source": "otlp", "thresholds": {}, "allocations": {}},
                )
            if costs is None:
                costs = self._costs(batch)
            written, duplicates, dropped = session.state.write(
                batch, index, session.writer, costs, now
            )
            result.written += written
            result.duplicates += duplicates
            result.dropped += dropped
        result.busy_sessions = sorted(busy)
        result.archived_sessions = sorted(archived)
        return result

    def close_idle(self, now: float | None = None) -> list[str]:
        """Settle the pending spans held for ``settle_seconds``; end the runs
        of the sessions (open or parked) that received nothing for
        ``idle_seconds``, and release them."""
        now = time.monotonic() if now is None else now
        self.settle(now - self.settle_seconds)
        idle = [
            sid
            for held in (self._sessions, self._parked)
            for sid, s in held.items()
            if now - s.last_used >= self.idle_seconds
        ]
        for sid in idle:
            self._close(sid, "idle")
        return idle

    def close(self) -> None:
        """End every held session's run and release its lock."""
        errors: list[BaseException] = []
        for sid in [*self._sessions, *self._parked]:
            try:
                self._close(sid, "collector stopped")
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def settle(self, before: float | None = None) -> int:
        """Settle the pending spans held at or before ``before`` (a
        ``time.monotonic()``; None: all) of the sessions whose run is going
        on; how many were settled."""
        settled = 0
        for held in (self._sessions, self._parked):
            for sid, session in held.items():
                if session.started and session.state.pending(before):
                    settled += self._settle(sid, session, before)
        return settled

    def _settle(self, session_id: str, session: _OpenSession, before: float | None) -> int:
        if not session.writer.closed:
            return session.state.settle(session.writer, before)[0]
        # parked: a writer after its last event, for these events only
        writer = self._writer(session.directory, session_id, session.writer.next_seq)
        try:
            return session.state.settle(writer, before)[0]
        finally:
            writer.close()
            session.writer = writer

    def flush(self) -> None:
        for session in self._sessions.values():
            session.writer.flush()

    def _close(self, session_id: str, reason: str) -> None:
        """End the run of a held session (open or parked) and release it."""
        session = self._sessions.pop(session_id, None) or self._parked.pop(session_id)
        try:
            if session.started:
                if session.writer.closed:  # parked: a writer after its last event
                    session.writer = self._writer(
                        session.directory, session_id, session.writer.next_seq
                    )
                # the pending spans' tokens count: no child came in this run
                session.state.settle(session.writer)
                meta: dict[str, Any] = {"status": "complete", "run": session.run, "reason": reason}
                session.log("session_complete", f"collect closed the run ({reason})", meta)
        finally:
            session.close()
