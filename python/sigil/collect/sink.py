"""Collected spans into session logs: one ExecutionLogger per session, each holding
that session's lock while it is open (ARCHITECTURE.md contract 7).

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
reported counts kept as ``reported_*``), so nothing counts twice. Children end,
and so are exported, before their parent; a parent that arrives first is
counted and its children then count again -- a known limit of this rule.

**Secrets.** Every text a span brings (its name or status message, the
component, model, provider, operation and error type) is scrubbed by
:class:`~sigil.telemetry.sanitization.LogSanitizer`, whose cache of clean
strings makes the repeated names of a trace free; the rest of an event is
numbers and hex IDs. So the loggers run without a per-event sanitizer: the
same rules, applied once per distinct string instead of twice per event.

**Cost.** A span's input and output tokens are priced by its model as the event
is written (``cost_usd``, see sigil.telemetry.pricing); an aggregate carries no
tokens and so no cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigil.collect.decode import SpanData
from sigil.collect.mapping import SpanEvent, map_span
from sigil.core.locks import SessionBusy
from sigil.core.paths import resolve_log_path, session_dir
from sigil.telemetry.execution_logger import EventsDroppedError, ExecutionLogger
from sigil.telemetry.pricing import Pricer
from sigil.telemetry.sanitization import LogSanitizer

__all__ = ["COMPONENT", "IngestResult", "SessionSink"]

#: The component of the run events collect writes itself.
COMPONENT = "collect"
_DONE_EVENTS = frozenset({"step_complete", "step_error", "token_consumption"})
#: Parent keys remembered per session for the aggregate rule (bounded; the
#: oldest half is forgotten when full).
_MAX_PARENTS = 65536
#: The metadata values that are text from the span (the others are numbers or hex IDs).
_TEXT_METADATA = ("model", "provider", "operation", "error_type")


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


class _OpenSession:
    __slots__ = ("last_used", "logger", "parents", "run", "seen", "started")

    def __init__(self, logger: ExecutionLogger, seen: set[str], run: int) -> None:
        self.logger = logger
        self.seen = seen
        self.parents: dict[str, None] = {}
        self.run = run
        self.started = False
        self.last_used = time.monotonic()


def _read_history(directory: Path) -> tuple[set[str], int, bool]:
    """From a session's log: the spans already written, its run count and
    whether its last run is still open (no final event after its start)."""
    seen: set[str] = set()
    runs = 0
    open_run = False
    if not directory.is_dir():
        return seen, runs, open_run
    from sigil.telemetry.otlp.reader import iter_session_entries

    for entry in iter_session_entries(directory):
        kind = entry.event_type
        if kind == "session_start":
            runs += 1
            open_run = True
        elif kind in ("session_complete", "session_error"):
            open_run = False
        elif kind in _DONE_EVENTS:
            meta = entry.metadata
            trace_id, span_id = meta.get("trace_id"), meta.get("span_id")
            if isinstance(trace_id, str) and isinstance(span_id, str):
                seen.add(trace_id + span_id)
    return seen, runs, open_run


class SessionSink:
    """Writes collected spans to their sessions' logs (not thread-safe: one caller)."""

    def __init__(
        self,
        log_path: str | Path | None = None,
        *,
        idle_seconds: float = 60.0,
        fsync: str = "interval",
        pricer: Pricer | None = None,
    ) -> None:
        self.log_path = resolve_log_path(log_path)
        #: prices each model call (config's overrides, then the table)
        self.pricer = pricer if pricer is not None else Pricer()
        self.idle_seconds = idle_seconds
        self.fsync = fsync
        self._sessions: dict[str, _OpenSession] = {}
        self._scrub = LogSanitizer().sanitize_string

    @property
    def open_sessions(self) -> list[str]:
        return sorted(self._sessions)

    def _open(self, session_id: str) -> _OpenSession:
        directory = session_dir(session_id, self.log_path)
        # sanitizer=False: _write scrubs every text a span brings (module doc).
        logger = ExecutionLogger(session_id, self.log_path, fsync=self.fsync, sanitizer=False)
        # The lock first (SessionBusy when another writer has it), then the history
        # under it, so nobody writes between the reading and the writing.
        logger.initialize_sync()
        try:
            seen, runs, open_run = _read_history(directory)
        except BaseException:
            logger.close_sync()
            raise
        session = _OpenSession(logger, seen, runs)
        # A run still open (collect was killed) goes on; otherwise the first span
        # written starts one, so a retry of spans already written adds no run.
        session.started = open_run
        return session

    def ingest(self, spans: list[SpanData]) -> IngestResult:
        """Write ``spans``' events; spans of a busy session are refused and counted."""
        result = IngestResult(spans=len(spans))
        sessions = self._sessions
        busy: set[str] = set()
        now = time.monotonic()
        for span in spans:
            event = map_span(span)
            if event is None:
                result.ignored += 1
                continue
            sid = event.session_id
            session = sessions.get(sid)
            if session is None:
                if sid in busy:
                    result.busy += 1
                    continue
                try:
                    session = self._open(sid)
                except SessionBusy:
                    busy.add(sid)
                    result.busy += 1
                    continue
                sessions[sid] = session
            session.last_used = now
            if event.key in session.seen:
                result.duplicates += 1
                continue
            result.dropped += self._write(session, event)
            result.written += 1
        result.busy_sessions = sorted(busy)
        return result

    def _write(self, session: _OpenSession, event: SpanEvent) -> int:
        """Write ``event``; returns how many events the writer reported dropped."""
        dropped = 0
        logger = session.logger

        def log(
            event_type: str, component: str, message: str, tokens: int, meta: dict[str, Any]
        ) -> None:
            nonlocal dropped
            try:
                logger.log_event_sync(event_type, component, message, tokens, meta)
            except EventsDroppedError as exc:
                # This event was accepted all the same (queued, or counted in the
                # log's events_dropped line): logging it again would count twice.
                dropped += exc.dropped_events

        if not session.started:
            session.run += 1
            session.started = True
            log(
                "session_start",
                COMPONENT,
                f"collecting OTLP spans (run {session.run})",
                0,
                {"run": session.run, "source": "otlp", "thresholds": {}, "allocations": {}},
            )
        meta = event.metadata
        scrub = self._scrub
        component, message = scrub(event.component), scrub(event.message)
        for name in _TEXT_METADATA:
            value = meta.get(name)
            if value is not None:
                meta[name] = scrub(value)
        parents = session.parents
        if event.usage is not None and not event.exported:
            if event.key in parents and event.tokens:
                # Its children reported this usage already (see the module doc).
                for name in ("input_tokens", "output_tokens"):
                    if name in meta:
                        meta[f"reported_{name}"] = meta.pop(name)
                meta["aggregate"] = True
                event.tokens = 0
            if event.parent_key:
                if len(parents) >= _MAX_PARENTS:
                    for stale in list(parents)[: _MAX_PARENTS // 2]:
                        del parents[stale]
                parents[event.parent_key] = None
        self._price(meta)
        if event.kind == "tokens":
            log("token_consumption", component, message, event.tokens, meta)
        else:
            ids = {"source": "otlp", "trace_id": meta["trace_id"], "span_id": meta["span_id"]}
            log("step_start", component, message, 0, ids)
            kind = "step_error" if event.error else "step_complete"
            log(kind, component, message, event.tokens, meta)
        session.seen.add(event.key)
        return dropped

    def _price(self, meta: dict[str, Any]) -> None:
        """Add ``cost_usd`` for a span whose model is priced and whose tokens count."""
        model = meta.get("model")
        inp, out = meta.get("input_tokens"), meta.get("output_tokens")
        if not isinstance(model, str) or (inp is None and out is None):
            return
        # Blocks only while the table's import (started by serve) finishes, once.
        meta.update(self.pricer.cost_meta(self.pricer.price(model, inp or 0, out or 0)))

    def close_idle(self, now: float | None = None) -> list[str]:
        """Close the sessions that received nothing for ``idle_seconds``."""
        now = time.monotonic() if now is None else now
        idle = [sid for sid, s in self._sessions.items() if now - s.last_used >= self.idle_seconds]
        for sid in idle:
            self._close(sid, "idle")
        return idle

    def close(self) -> None:
        """End every open session's run and release its lock."""
        errors: list[BaseException] = []
        for sid in list(self._sessions):
            try:
                self._close(sid, "collector stopped")
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def flush(self) -> None:
        for session in self._sessions.values():
            session.logger.flush_sync()

    def _close(self, session_id: str, reason: str) -> None:
        session = self._sessions.pop(session_id)
        if not session.started:
            session.logger.close_sync()
            return
        try:
            meta: dict[str, Any] = {"status": "complete", "run": session.run, "reason": reason}
            session.logger.log_event_sync(
                "session_complete", COMPONENT, f"collect closed the run ({reason})", 0, meta
            )
        finally:
            session.logger.close_sync()
