"""Live export from the orchestrator: a background thread that follows the log."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sigil.telemetry.otlp.reader import iter_session_entries, next_seq
from sigil.telemetry.otlp.spans import SpanBuilder, SpanRecord, _as_event
from sigil.telemetry.otlp.transport import (
    DEFAULT_PROTOCOL,
    _Converter,
    _export_batch,
    _make_exporter,
    _sdk_log_capture,
    require_otlp,
    resend_command,
    traces_endpoint,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter


def _ignore_event(event: Any) -> None:
    """``on_event`` of an exporter that follows the log: the log has the event."""


_time_ns = time.time_ns  # bound once: on_event is on the pipeline's hot path


# ---------------------------------------------------------------------------
# Live export from the orchestrator


@dataclass(slots=True)
class LiveExportReport:
    """What the live exporter managed to send by :meth:`LiveOtlpExporter.shutdown`."""

    session_id: str
    spans_sent: int = 0
    spans_failed: int = 0
    events_dropped: int = 0
    #: False when spans may be missing: a failure, dropped events, or a
    #: shutdown that timed out before everything was sent.
    complete: bool = True
    error: str | None = None
    log_path: str | None = None

    @property
    def resend_command(self) -> str:
        return resend_command(self.session_id, self.log_path)

    def summary(self) -> str:
        """One line for the orchestrator to print."""
        if self.complete:
            return f"OTLP: sent {self.spans_sent} spans of session {self.session_id}"
        why = f" ({self.error})" if self.error else ""
        dropped = f", {self.events_dropped} events not queued" if self.events_dropped else ""
        failed = self.spans_failed or "some"  # a timed-out shutdown cannot count them all
        return (
            f"OTLP: sent {self.spans_sent} spans, {failed} not sent{dropped}{why};"
            f" send the session later with: {self.resend_command}"
        )


class LiveOtlpExporter:
    """Sends a session's spans while its pipeline runs, without ever slowing it.

    A background thread turns the session's events into spans with the same
    :class:`SpanBuilder` as ``sigil export`` (so the IDs match) and sends them in
    batches of ``batch_size`` at most every ``schedule_delay`` seconds, like the
    SDK's BatchSpanProcessor. A slow, failing or absent collector only delays
    that thread; spans that could not be sent are counted, and :meth:`shutdown`
    reports them with the ``sigil export`` command that resends the session.

    Where the events come from:

    * ``follow_log=True`` (the default, what the orchestrator should use): the
      thread reads the session's ``execution.jsonl`` itself, through the native
      tailer, like ``sigil monitor`` (the file is the only channel,
      ARCHITECTURE.md). The logging call pays nothing -- ``on_event`` is a no-op
      -- and the spans are exactly those a later ``sigil export`` sends, times
      included, from already-scrubbed events. Create the exporter before the
      run's first event and shut it down after the logger is closed: events
      already in the log (earlier runs, the dead part of a resumed run) are
      folded for context, and only the spans that this process's events finish
      are sent.
    * ``follow_log=False``: events arrive through :meth:`on_event` (a dict with
      ``event_type, component, message, tokens, metadata, seq`` and optionally
      ``timestamp``; or a ``LogEntry`` / ``ParsedEntry``), for callers without a
      log. ``on_event`` is one bound check and one deque append -- O(1),
      lock-free under the GIL, never waits -- and counts the event as dropped if
      ``max_queue`` events are already waiting. The event's ``seq`` makes the
      IDs match a later ``sigil export``; an event without ``timestamp`` is timed
      when ``on_event`` sees it. The event is kept by reference until the
      thread reads it (do not mutate it); dict events are scrubbed on the thread
      with ``sanitizer`` (True: :class:`~sigil.telemetry.sanitization.LogSanitizer`).
      With ``prime`` the thread first folds what the log already holds before
      the first event's ``seq``.
    """

    def __init__(
        self,
        session_id: str,
        endpoint: str,
        headers: Mapping[str, str] | None = None,
        protocol: str = DEFAULT_PROTOCOL,
        *,
        log_path: str | os.PathLike[str] | None = None,
        batch_size: int = 512,
        schedule_delay: float = 1.0,
        export_timeout: float = 5.0,
        max_queue: int = 100_000,
        max_pending_spans: int = 20_000,
        sanitizer: Any = True,
        prime: bool = True,
        follow_log: bool = True,
        exporter: SpanExporter | None = None,
    ) -> None:
        from sigil.core.paths import resolve_log_path, validate_session_id

        self.session_id = validate_session_id(session_id)
        require_otlp(protocol)
        self._log_path = resolve_log_path(log_path)
        self._session_dir = self._log_path / "sessions" / self.session_id
        self._follow = follow_log
        self._tailer: Any = None
        # Events before this seq were written by earlier processes: in follow
        # mode they are folded for context, their spans not sent again.
        self._first_seq = next_seq(self._session_dir) if follow_log else 0
        if follow_log:
            self.on_event = _ignore_event  # type: ignore[method-assign]
        if sanitizer is True:
            from sigil.telemetry.sanitization import LogSanitizer

            sanitizer = LogSanitizer()
        self._sanitizer = sanitizer or None
        self._prime = prime
        self.endpoint = traces_endpoint(endpoint, protocol)
        self.protocol = protocol
        self._report = LiveExportReport(
            self.session_id, log_path=os.fspath(log_path) if log_path is not None else None
        )
        self._capture = _sdk_log_capture()
        self._exporter = exporter or _make_exporter(
            self.endpoint, headers or {}, protocol, export_timeout
        )
        self._convert = _Converter()
        self._builder = SpanBuilder(self.session_id)
        self._queue: collections.deque[tuple[Any, int]] = collections.deque()
        self._room = max_queue
        self._max_pending = max_pending_spans
        self._batch_size = batch_size
        self._delay = schedule_delay
        self._pending: list[SpanRecord] = []
        self._wake = threading.Event()
        self._flush_waiters: collections.deque[threading.Event] = collections.deque()
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._work, name=f"sigil-otlp-{self.session_id}", daemon=True
        )
        self._thread.start()

    # -- the orchestrator's side (hot path) --------------------------------

    def on_event(self, event: Any) -> None:
        """Queue one event; O(1), never blocks, never raises.

        The pipeline pays this on every event, so it is one bound check and
        one deque append (atomic under the GIL, no lock); ``_room`` drops to 0
        at shutdown, which turns late events into counted drops.
        """
        queue = self._queue
        if len(queue) < self._room:
            queue.append((event, _time_ns()))
        else:
            self._report.events_dropped += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Send what has been queued so far; True if that finished within ``timeout``.

        Waits, so not for the pipeline's hot path: for a caller that wants the
        spans out at a known point (a test, a benchmark, before a long pause).
        """
        if self._closed:
            return True
        done = threading.Event()
        self._flush_waiters.append(done)
        self._wake.set()
        return done.wait(timeout)

    def shutdown(self, timeout: float = 5.0) -> LiveExportReport:
        """Send what is left within ``timeout`` seconds, stop, and report.

        Never raises and never waits much longer than ``timeout``: a collector
        that is down makes the remaining spans count as not sent.
        """
        report = self._report
        if self._closed:
            return report
        self._closed = True
        self._room = 0
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Stuck in a request or a backoff: abort the exporter's retries.
            with contextlib.suppress(Exception):
                self._exporter.shutdown()
            self._thread.join(0.5)
            report.complete = False
            report.error = report.error or "the collector did not answer in time"
            report.spans_failed += len(self._pending)
            report.events_dropped += len(self._queue)
        else:
            with contextlib.suppress(Exception):
                self._exporter.shutdown()
        if report.spans_failed or report.events_dropped:
            report.complete = False
        return report

    # -- the background thread ---------------------------------------------

    def _work(self) -> None:
        deadline = time.monotonic() + self._delay
        while True:
            self._wake.wait(max(deadline - time.monotonic(), 0.0))
            self._wake.clear()
            stopping = self._stopping
            waiters: list[threading.Event] = []
            while self._flush_waiters:
                waiters.append(self._flush_waiters.popleft())
            try:
                self._drain(final=stopping)
                due = stopping or bool(waiters) or time.monotonic() >= deadline
                if due or len(self._pending) >= self._batch_size:
                    self._send(everything=due)
                if due:
                    deadline = time.monotonic() + self._delay
            except Exception as exc:  # never let the thread die silently
                self._report.error = f"{type(exc).__name__}: {exc}"
                self._report.spans_failed += len(self._pending)
                self._pending.clear()
            for waiter in waiters:
                waiter.set()
            if stopping:
                return

    def _drain(self, final: bool) -> None:
        if self._follow:
            self._read_log()
            if final:
                self._pending.extend(self._builder.finish("incomplete"))
            self._bound_pending()
            return
        queue = self._queue
        feed = self._builder.feed
        pending = self._pending
        sanitize = self._clean if self._sanitizer is not None else None
        while queue:
            event, seen_ns = queue.popleft()
            if self._prime:
                self._prime = False
                self._catch_up(_as_event(event).seq)
            if sanitize is not None and isinstance(event, Mapping):
                event = sanitize(event)
            pending.extend(feed(event, seen_ns))
        if final:
            pending.extend(self._builder.finish("incomplete"))
        self._bound_pending()

    def _bound_pending(self) -> None:
        pending = self._pending
        overflow = len(pending) - self._max_pending
        if overflow > 0:
            # The collector has been down long enough: keep memory bounded.
            del pending[:overflow]
            self._report.spans_failed += overflow

    def _read_log(self) -> None:
        """Follow mode: feed everything the log gained since the last round."""
        if self._tailer is None:
            self._open_log()
        read = self._tailer.read
        while True:
            result = read()
            if not result.entries and not result.malformed:
                return
            self._feed_entries(result.entries)

    def _open_log(self) -> None:
        """Start following the log: the rotated segments, oldest first, then the
        live file, through one chain of descriptors, so a rotation in between
        neither loses a segment nor reads one twice (as
        ``SessionTailer.catch_up`` does)."""
        from sigil.telemetry.log_parser import SessionTailer

        tailer = SessionTailer(self.session_id, self._log_path)
        for result in tailer.iter_existing():
            self._feed_entries(result.entries)
        self._tailer = tailer

    def _feed_entries(self, entries: Iterable[Any]) -> None:
        feed = self._builder.feed
        pending = self._pending
        first = self._first_seq
        for entry in entries:
            spans = feed(entry)
            if spans and (entry.seq is None or entry.seq >= first):
                pending.extend(spans)

    def _catch_up(self, first_seq: int | None) -> None:
        """Fold what the log already holds before this process's first event.

        A resumed run, or a new run of an existing session, continues a story
        the log began: without it the spans would lose the run's trace ID, its
        provider and its allocations, and differ from what ``sigil export``
        sends. The spans this finishes were the earlier process's to send; they
        are dropped here (``sigil export`` sends them). Events from ``first_seq``
        on come through :meth:`on_event`, so they are skipped: the writer may
        not have flushed them yet anyway.
        """
        if first_seq is None or first_seq == 0:
            return
        feed = self._builder.feed
        try:
            for entry in iter_session_entries(self._session_dir):
                seq = entry.seq
                if seq is not None and seq >= first_seq:
                    break
                feed(entry)
        except OSError as exc:  # an unreadable log only costs the catch-up
            self._report.error = f"could not read the session's log: {exc.strerror or exc}"

    def _clean(self, event: Mapping[str, Any]) -> Mapping[str, Any]:
        """The orchestrator hands over its event before the logger scrubs it:
        scrub it the same way here, off the pipeline's thread."""
        sanitizer = self._sanitizer
        assert sanitizer is not None  # _clean is only handed out with a sanitizer
        out = dict(event)
        message = out.get("message")
        if isinstance(message, str):
            out["message"] = sanitizer.sanitize_string(message)
        metadata = out.get("metadata")
        if isinstance(metadata, Mapping) and metadata:
            out["metadata"] = sanitizer.sanitize_dict(dict(metadata))
        return out

    def _send(self, everything: bool) -> None:
        pending = self._pending
        while pending and (everything or len(pending) >= self._batch_size):
            batch = pending[: self._batch_size]
            del pending[: self._batch_size]
            spans = [self._convert(record) for record in batch]
            problem = _export_batch(self._exporter, spans, self._capture)
            if problem is None:
                self._report.spans_sent += len(batch)
                continue
            # Like the SDK's BatchSpanProcessor, a batch that failed after the
            # exporter's retries is not queued again: it is counted, and
            # ``sigil export`` resends the session.
            self._report.spans_failed += len(batch)
            self._report.error = problem
            if self._stopping:
                # Shutting down with a failing collector: don't wait on every batch.
                self._report.spans_failed += len(pending)
                pending.clear()
            return  # try the rest on the next round, not back to back
