"""Sessions as OpenTelemetry traces: the mapping, the batch export and the live exporter.

The JSONL log stays the source of truth; this module only *derives* spans from
it, so that a session can be shipped to any OTLP backend (an OpenTelemetry
Collector, Jaeger, Grafana Tempo, Langfuse, Phoenix, ...).

**The shape.** One trace per *run* of a session (ARCHITECTURE.md contract 11: a
session is a sequence of runs, each opened by a ``session_start``). A run is a
finished unit -- its root span can be sent once it ends and never changes
afterwards -- whereas a trace per session would have to resend its root every
time the session is resumed. All runs of a session share
``gen_ai.conversation.id`` (the session ID), which is how GenAI backends group
them. In each trace:

* the root span ``invoke_workflow sigil`` covers ``session_start`` to
  ``session_complete`` / ``session_error``;
* one child span ``invoke_agent <component>`` per step *attempt*, matched by
  component and order: from a ``step_start`` (or, for a retry, from its first
  event) to the attempt's end -- ``step_complete``, ``step_error``, or
  ``retry_attempt`` for an attempt that failed and is retried. A retry is a
  new span (``sigil.attempt`` counts them); ``metadata.attempt`` tells a
  retry's events from late events of the attempt that just ended, and
  ``attempt_latency_ms`` times an attempt that has no ``step_start``
  (retries, and the spec's step_complete-only sample logs).

**Tokens (contract 2).** Every event's ``tokens`` lands on exactly one span,
as ``sigil.tokens``: on the attempt that is open for the event's component, or
on that component's attempt that has just ended (until the next step event of
any component: a ``token_consumption`` logged right after its
``step_complete`` still belongs to it), else on the root. So the sum of
``sigil.tokens`` over a session's spans is exactly the session's total; the
root also carries the run's total as ``sigil.run.tokens``.

**Identity.** Trace and span IDs are SHA-256 digests of the session ID and the
``seq`` of the event that opens the run or span, so exporting a session twice
-- or live, then again with ``sigil export`` -- yields the same IDs.

**Conventions.** OpenTelemetry semantic conventions :data:`SEMCONV_VERSION`
(the GenAI agent spans: ``gen_ai.operation.name`` ``invoke_workflow`` /
``invoke_agent``, span kind ``INTERNAL`` for in-process agents), sent with
that version's schema URL. Errors follow "Recording errors": status ``ERROR``,
``error.type``, and an ``exception`` span event; success leaves the status
unset. Retries and budget warnings are span events named ``sigil.<event
type>``.

The mapping (:class:`SpanBuilder`) is pure Python with no OpenTelemetry
import. The OpenTelemetry packages are an optional extra (``pip install
'sigil[otlp]'``) imported only by the functions that send; see
:func:`require_otlp`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "DEFAULT_PROTOCOL",
    "INSTALL_HINT",
    "PROTOCOLS",
    "SCHEMA_URL",
    "SEMCONV_VERSION",
    "ExportResult",
    "LiveExportReport",
    "LiveOtlpExporter",
    "OtlpUnavailable",
    "ReadStats",
    "SpanBuilder",
    "SpanEventRecord",
    "SpanRecord",
    "check_reachable",
    "export_records",
    "iter_file_entries",
    "iter_session_entries",
    "parse_header",
    "require_otlp",
    "resend_command",
    "root_span_id_for",
    "session_spans",
    "span_id_for",
    "trace_id_for",
    "traces_endpoint",
]

#: The OpenTelemetry semantic-conventions release this mapping follows. v1.41.0
#: is the last release that carries the GenAI conventions (agent, workflow and
#: ``gen_ai.usage.*`` attributes) before they moved to their own repository.
SEMCONV_VERSION = "1.41.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

INSTALL_HINT = "pip install 'sigil[otlp]'"
PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_PROTOCOL = "http/protobuf"
TRACES_PATH = "/v1/traces"

WORKFLOW_NAME = "sigil"
ROOT_SPAN_NAME = f"invoke_workflow {WORKFLOW_NAME}"

#: Span events kept per span; the rest are counted in ``sigil.span_events.dropped``
#: (a long reasoning step can log thousands of ``token_consumption`` events).
MAX_SPAN_EVENTS = 128
#: Metadata values copied onto a span event, at most (scalars only).
MAX_EVENT_METADATA = 16

_FINAL_EVENTS = frozenset({"session_complete", "session_error"})
_STEP_END_EVENTS = frozenset({"step_complete", "step_error"})
_BUDGET_EVENTS = frozenset({"budget_warning", "budget_exceeded"})

_REFUSED = "the collector did not accept the spans"


def _ignore_event(event: Any) -> None:
    """``on_event`` of an exporter that follows the log: the log has the event."""


_time_ns = time.time_ns  # bound once: on_event is on the pipeline's hot path

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


class OtlpUnavailable(RuntimeError):
    """The optional OpenTelemetry packages are not installed."""


def require_otlp(protocol: str = DEFAULT_PROTOCOL) -> None:
    """Raise :class:`OtlpUnavailable` (one line naming the extra) unless the
    packages that ``protocol`` needs are importable.

    Checked with ``find_spec`` so that nothing is imported: ``sigil --help`` and
    commands that never export stay fast.
    """
    import importlib.util

    needed = ["opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http"]
    if protocol == "grpc":
        needed = ["opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.grpc", "grpc"]
    for module in needed:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a missing or broken parent package
            found = False
        if not found:
            raise OtlpUnavailable(
                f"OTLP export needs the OpenTelemetry packages ({module} is missing):"
                f" {INSTALL_HINT}"
            )


# ---------------------------------------------------------------------------
# Identity


def _digest(kind: bytes, session_id: str, key: str) -> bytes:
    return hashlib.sha256(
        b"sigil\x00" + kind + b"\x00" + session_id.encode() + b"\x00" + key.encode()
    ).digest()


def trace_id_for(session_id: str, key: int | str) -> int:
    """The 128-bit trace ID of the run opened by the event ``key`` (its ``seq``)."""
    return int.from_bytes(_digest(b"trace", session_id, str(key))[:16], "big") or 1


def root_span_id_for(session_id: str, key: int | str) -> int:
    """The 64-bit span ID of the root of the run opened by the event ``key``.

    Its own digest: an old log's run may begin with a step_complete whose
    attempt span is keyed by the same ``seq``.
    """
    return int.from_bytes(_digest(b"root", session_id, str(key))[:8], "big") or 1


def span_id_for(session_id: str, key: int | str) -> int:
    """The 64-bit span ID of the span opened by the event ``key`` (its ``seq``).

    ``seq`` is unique within a session, so span IDs are too; an ID of 0 is
    invalid in OTLP, hence the ``or 1`` (probability 2**-64).
    """
    return int.from_bytes(_digest(b"span", session_id, str(key))[:8], "big") or 1


# ---------------------------------------------------------------------------
# The span model (no OpenTelemetry types: the mapping is pure and testable)


@dataclass(slots=True)
class SpanEventRecord:
    name: str
    time_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SpanRecord:
    """One finished span, ready to be converted for an exporter."""

    trace_id: int
    span_id: int
    parent_span_id: int | None
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[SpanEventRecord] = field(default_factory=list)
    #: ``"unset"`` (success or unknown, per the conventions) or ``"error"``.
    status: str = "unset"
    status_message: str = ""

    @property
    def tokens(self) -> int:
        return int(self.attributes.get("sigil.tokens", 0))


def _timestamp_ns(text: object) -> int | None:
    """ISO 8601 to Unix nanoseconds; the spec's offset-less form is UTC (contract 1)."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # Integer arithmetic: a float of nanoseconds since 1970 loses microseconds.
    return ((moment - _EPOCH) // _ONE_US) * 1000


def _scalar(value: object) -> bool:
    return isinstance(value, str | bool | int | float)


def _latency_ms(meta: Mapping[str, Any]) -> int | None:
    """The attempt's own duration in ns: ``attempt_latency_ms`` (the orchestrator's,
    per attempt) or ``latency_ms`` (since the step started)."""
    for name in ("attempt_latency_ms", "latency_ms"):
        value = meta.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return int(value * 1_000_000)
    return None


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


class _Span:
    """A span being assembled (an attempt or a run's root)."""

    __slots__ = (
        "attributes",
        "dropped",
        "end_ns",
        "error_type",
        "events",
        "implicit",
        "key",
        "name",
        "ref",
        "span_id",
        "start_ns",
        "status",
        "status_message",
        "tokens",
    )

    def __init__(self, name: str, span_id: int, key: int | str, start_ns: int) -> None:
        self.name = name
        self.span_id = span_id
        self.key = key
        self.start_ns = start_ns
        self.end_ns = start_ns
        self.tokens = 0
        self.attributes: dict[str, Any] = {}
        self.events: list[SpanEventRecord] = []
        self.dropped = 0
        self.status = "unset"
        self.status_message = ""
        self.error_type: str | None = None
        #: The orchestrator's attempt number (metadata.attempt), once an event said it.
        self.ref: int | None = None
        #: Opened by its first event rather than a step_start (a retry, an old log).
        self.implicit = False

    def add_event(self, name: str, time_ns: int, attributes: dict[str, Any]) -> None:
        if len(self.events) < MAX_SPAN_EVENTS:
            self.events.append(SpanEventRecord(name, time_ns, attributes))
        else:
            self.dropped += 1

    def fail(self, message: str, error_type: str) -> None:
        self.status = "error"
        self.status_message = message
        self.error_type = error_type

    def record(self, trace_id: int, parent: int | None, conversation_id: str) -> SpanRecord:
        attributes = {"gen_ai.conversation.id": conversation_id, **self.attributes}
        attributes["sigil.tokens"] = self.tokens
        if self.error_type is not None:
            attributes["error.type"] = self.error_type
        if self.dropped:
            attributes["sigil.span_events.dropped"] = self.dropped
        return SpanRecord(
            trace_id=trace_id,
            span_id=self.span_id,
            parent_span_id=parent,
            name=self.name,
            start_ns=self.start_ns,
            end_ns=max(self.end_ns, self.start_ns),
            attributes=attributes,
            events=self.events,
            status=self.status,
            status_message=self.status_message,
        )


class _Run:
    """One pipeline run: the root span, its attempts and what they share."""

    __slots__ = (
        "allocations",
        "attempt_counts",
        "ended",
        "last_ns",
        "model",
        "open",
        "pending",
        "provider",
        "retry_at",
        "root",
        "total_tokens",
        "trace_id",
    )

    def __init__(self, session_id: str, key: int | str, start_ns: int) -> None:
        self.trace_id = trace_id_for(session_id, key)
        self.root = _Span(ROOT_SPAN_NAME, root_span_id_for(session_id, key), key, start_ns)
        self.last_ns = start_ns
        self.total_tokens = 0
        self.provider: str | None = None
        self.model: str | None = None
        self.allocations: dict[str, Any] = {}
        self.attempt_counts: dict[str, int] = {}
        # component -> attempt started and not ended
        self.open: dict[str, _Span] = {}
        # component -> attempt that ended and still takes that component's late
        # events, until the next step event of any component
        self.pending: dict[str, _Span] = {}
        # component -> when its next attempt starts (a retry_attempt plus its delay)
        self.retry_at: dict[str, int] = {}
        self.ended = False


class _Event:
    """The fields of one log event, from a ParsedEntry, a LogEntry or a dict."""

    __slots__ = ("component", "event_type", "message", "seq", "source", "time_ns", "tokens")

    def __init__(
        self,
        event_type: str,
        component: str,
        message: str,
        tokens: int,
        seq: int | None,
        time_ns: int | None,
        source: Any,
    ) -> None:
        self.event_type = event_type
        self.component = component
        self.message = message
        self.tokens = tokens
        self.seq = seq
        self.time_ns = time_ns
        self.source = source

    @property
    def metadata(self) -> Mapping[str, Any]:
        # ParsedEntry parses its metadata lazily: only events that need it pay.
        source = self.source
        meta = source.get("metadata") if isinstance(source, Mapping) else source.metadata
        return meta if isinstance(meta, Mapping) else {}


def _as_event(entry: Any, fallback_ns: int | None = None) -> _Event:
    if isinstance(entry, Mapping):
        tokens = entry.get("tokens", 0)
        seq = entry.get("seq")
        time_ns = _timestamp_ns(entry.get("timestamp"))
        return _Event(
            str(entry.get("event_type", "")),
            str(entry.get("component", "")),
            str(entry.get("message", "")),
            tokens if type(tokens) is int and tokens >= 0 else 0,
            seq if type(seq) is int else None,
            time_ns if time_ns is not None else fallback_ns,
            entry,
        )
    time_ns = _timestamp_ns(getattr(entry, "timestamp", None))
    return _Event(
        entry.event_type,
        entry.component,
        entry.message,
        entry.tokens,
        entry.seq,
        time_ns if time_ns is not None else fallback_ns,
        entry,
    )


class SpanBuilder:
    """Folds a session's events, in log order, into finished spans.

    Streaming, so that the batch export (``sigil export``) and the live
    exporter run the same code and produce the same spans: :meth:`feed` returns
    the spans that one event finished, :meth:`finish` the rest at the end of
    the input. Pure: no I/O, no OpenTelemetry import.

    ``run_state`` says what an unfinished last run is when the input ends:
    ``"running"`` (its lock is held: status left unset) or ``"incomplete"``
    (its writer is gone: status ``ERROR``).
    """

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.tokens = 0
        self.events = 0
        self.spans = 0
        self.traces = 0
        self._run: _Run | None = None
        self._index = 0
        self._last_ns = 0

    # -- input -------------------------------------------------------------

    def feed(self, entry: Any, fallback_ns: int | None = None) -> list[SpanRecord]:
        """Take one event (ParsedEntry, LogEntry or dict); return spans it finished.

        ``fallback_ns`` times an event whose timestamp is missing or invalid
        (the live exporter passes the moment it saw the event); without it the
        previous event's time is used.
        """
        return self.feed_event(_as_event(entry, fallback_ns))

    def feed_event(self, ev: _Event) -> list[SpanRecord]:
        out: list[SpanRecord] = []
        self.events += 1
        key: int | str = ev.seq if ev.seq is not None else f"i{self._index}"
        self._index += 1
        now = ev.time_ns if ev.time_ns is not None else self._last_ns
        self._last_ns = now
        self.tokens += ev.tokens
        kind = ev.event_type

        run = self._run
        if kind == "session_start" or run is None or run.ended:
            if run is not None and not run.ended:
                # A new run began while this one never ended: its writer died.
                self._close_run(run, out, "incomplete")
            run = self._start_run(key, now, ev if kind == "session_start" else None)
        run.last_ns = max(run.last_ns, now)
        run.total_tokens += ev.tokens
        component = ev.component

        if kind == "session_start":
            run.root.tokens += ev.tokens
        elif kind == "step_start":
            self._flush_pending(run, out)
            previous = run.open.pop(component, None)
            if previous is not None:
                self._abandon(run, previous, now, out)
            attempt = self._new_attempt(run, component, key, now, implicit=False)
            attempt.tokens += ev.tokens
            run.open[component] = attempt
        elif kind in _STEP_END_EVENTS or (
            kind == "retry_attempt" and self._ends_attempt(run, component, ev.metadata)
        ):
            self._end_attempt(run, ev, key, now, out)
        elif kind in _FINAL_EVENTS:
            run.root.tokens += ev.tokens
            run.root.end_ns = now
            meta = ev.metadata
            default_status = "complete" if kind == "session_complete" else "error"
            status = str(meta.get("status") or default_status)
            self._final_attributes(run, meta)
            if kind == "session_error" or status != "complete":
                error_type = status
                if status == "error":
                    error_type = str(meta.get("error_type") or "_OTHER")
                run.root.fail(ev.message, error_type)
                run.root.add_event(
                    "exception",
                    now,
                    {"exception.type": error_type, "exception.message": ev.message},
                )
            self._close_run(run, out, status)
        elif kind in _BUDGET_EVENTS:
            # Budget events concern the session, not a step: they go on the root.
            run.root.tokens += ev.tokens
            meta = ev.metadata
            run.root.add_event(f"sigil.{kind}", now, self._event_attributes(ev, meta))
            if meta.get("scope", "session") == "session":
                if kind == "budget_exceeded":
                    run.root.attributes["sigil.budget.level"] = "exceeded"
                elif meta.get("level") is not None:
                    run.root.attributes["sigil.budget.level"] = str(meta["level"])
        else:
            meta = ev.metadata
            target = self._attempt_of(run, component, meta, key, now, out) or run.root
            target.tokens += ev.tokens
            target.add_event(f"sigil.{kind}", now, self._event_attributes(ev, meta))
        self.spans += len(out)
        return out

    def finish(self, run_state: str = "incomplete") -> list[SpanRecord]:
        """Close what the input left open; ``run_state`` is ``running`` or ``incomplete``."""
        out: list[SpanRecord] = []
        run = self._run
        if run is not None and not run.ended:
            self._close_run(run, out, run_state)
        self.spans += len(out)
        return out

    # -- runs and attempts -------------------------------------------------

    def _start_run(self, key: int | str, now: int, start: _Event | None) -> _Run:
        run = _Run(self.session_id, key, now)
        self._run = run
        self.traces += 1
        root = run.root
        root.attributes.update(
            {
                "gen_ai.operation.name": "invoke_workflow",
                "gen_ai.workflow.name": WORKFLOW_NAME,
                "sigil.seq": key if isinstance(key, int) else -1,
            }
        )
        if start is None:
            return run
        meta = start.metadata
        if isinstance(meta.get("provider"), str):
            run.provider = meta["provider"]
            root.attributes["gen_ai.provider.name"] = run.provider
        if isinstance(meta.get("model"), str):
            run.model = meta["model"]
            root.attributes["gen_ai.request.model"] = run.model
        if (number := _int_or_none(meta.get("run"))) is not None:
            root.attributes["sigil.run"] = number
        if (budget := _int_or_none(meta.get("budget"))) is not None:
            root.attributes["sigil.budget.total"] = budget
        allocations = meta.get("allocations")
        if isinstance(allocations, Mapping):
            run.allocations = dict(allocations)
        thresholds = meta.get("thresholds")
        if isinstance(thresholds, Mapping):
            for name, value in thresholds.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    root.attributes[f"sigil.budget.threshold.{name}"] = float(value)
        return run

    def _new_attempt(
        self, run: _Run, component: str, key: int | str, start_ns: int, *, implicit: bool
    ) -> _Span:
        number = run.attempt_counts.get(component, 0) + 1
        run.attempt_counts[component] = number
        attempt = _Span(
            f"invoke_agent {component}", span_id_for(self.session_id, key), key, start_ns
        )
        attempt.implicit = implicit
        if start_ns < run.root.start_ns:
            # A step_complete timed back by its latency may start before the root.
            run.root.start_ns = start_ns
        attributes = attempt.attributes
        attributes["gen_ai.operation.name"] = "invoke_agent"
        attributes["gen_ai.agent.name"] = component
        if run.provider is not None:
            attributes["gen_ai.provider.name"] = run.provider
        if run.model is not None:
            attributes["gen_ai.request.model"] = run.model
        attributes["sigil.seq"] = key if isinstance(key, int) else -1
        attributes["sigil.attempt"] = number
        allocation = _int_or_none(run.allocations.get(component))
        if allocation is not None:
            attributes["sigil.budget.allocation"] = allocation
        return attempt

    # How the orchestrator logs a step (sigil.interfaces.cli.orchestrator): one
    # step_start, then per attempt its token_consumption (if it used tokens) and
    # its end -- retry_attempt (failed, will retry after metadata.retry_delay_s),
    # step_error (failed for good) or step_complete. Events after the first
    # attempt carry metadata.attempt, which is how a retry is told from a late
    # event of the attempt that just ended.

    @staticmethod
    def _ends_attempt(run: _Run, component: str, meta: Mapping[str, Any]) -> bool:
        """A retry_attempt ends a step attempt; the orchestrator's resume notice
        (a retry_attempt of the orchestrator itself) does not."""
        return component in run.open or _int_or_none(meta.get("attempt")) is not None

    def _attempt_of(
        self,
        run: _Run,
        component: str,
        meta: Mapping[str, Any],
        key: int | str,
        now: int,
        out: list[SpanRecord],
    ) -> _Span | None:
        """The attempt an event of ``component`` belongs to; None means the root."""
        number = _int_or_none(meta.get("attempt"))
        current = run.open.get(component)
        if current is not None:
            if number is None or current.ref is None or current.ref == number:
                if current.ref is None:
                    current.ref = number
                return current
            # Another attempt's event while this one is open: it never ended.
            del run.open[component]
            self._abandon(run, current, now, out)
        pending = run.pending.get(component)
        if pending is not None and (number is None or pending.ref is None or number <= pending.ref):
            return pending  # a late event of the attempt that just ended
        if number is None or component not in run.attempt_counts:
            return None
        # The first event of a retry (attempt ``number``): it started when the
        # retry's delay ran out, or now if that is unknown.
        self._flush_pending(run, out)
        start = min(run.retry_at.pop(component, now), now)
        attempt = self._new_attempt(run, component, key, start, implicit=True)
        attempt.ref = number
        run.open[component] = attempt
        return attempt

    def _end_attempt(
        self, run: _Run, ev: _Event, key: int | str, now: int, out: list[SpanRecord]
    ) -> None:
        component = ev.component
        meta = ev.metadata
        number = _int_or_none(meta.get("attempt"))
        attempt = run.open.pop(component, None)
        if attempt is not None and number is not None and attempt.ref not in (None, number):
            self._abandon(run, attempt, now, out)
            attempt = None
        self._flush_pending(run, out)
        if attempt is None:
            latency = _latency_ms(meta)
            start = run.retry_at.pop(component, now)
            attempt = self._new_attempt(run, component, key, min(start, now), implicit=True)
            attempt.ref = number
            if latency is not None:
                attempt.start_ns = now - latency
        elif attempt.implicit and (latency := _latency_ms(meta)) is not None:
            # Started by an earlier event of this attempt: the step's own
            # measurement is better than the guess made then.
            attempt.start_ns = now - latency
        if attempt.start_ns < run.root.start_ns:
            run.root.start_ns = attempt.start_ns
        attempt.end_ns = now
        attempt.tokens += ev.tokens
        self._step_attributes(run, attempt, meta)
        if ev.event_type != "step_complete":
            error_type = str(meta.get("error_type") or "_OTHER")
            attempt.fail(ev.message, error_type)
            attempt.add_event(
                "exception",
                now,
                {
                    "exception.type": error_type,
                    "exception.message": str(meta.get("error") or ev.message),
                    "sigil.seq": ev.seq if ev.seq is not None else -1,
                },
            )
        if ev.event_type == "retry_attempt":
            attempt.add_event("sigil.retry_attempt", now, self._event_attributes(ev, meta))
            delay = meta.get("retry_delay_s")
            if isinstance(delay, int | float) and not isinstance(delay, bool) and delay >= 0:
                run.retry_at[component] = now + int(delay * 1e9)
        run.pending[component] = attempt

    def _abandon(self, run: _Run, attempt: _Span, now: int, out: list[SpanRecord]) -> None:
        """Emit an attempt whose end never came (its process died, or a log gap)."""
        attempt.end_ns = max(now, attempt.start_ns)
        attempt.fail("the step attempt never ended in the log", "incomplete")
        out.append(self._attempt_record(run, attempt))

    @staticmethod
    def _step_attributes(run: _Run, attempt: _Span, meta: Mapping[str, Any]) -> None:
        attributes = attempt.attributes
        if not meta:
            return
        model = meta.get("request_model", meta.get("model"))
        if isinstance(model, str):
            attributes["gen_ai.request.model"] = model
        response_model = meta.get("response_model", meta.get("model"))
        if isinstance(response_model, str):
            attributes["gen_ai.response.model"] = response_model
        provider = meta.get("provider")
        if isinstance(provider, str):
            attributes["gen_ai.provider.name"] = provider
        for source, target in (
            ("input_tokens", "gen_ai.usage.input_tokens"),
            ("output_tokens", "gen_ai.usage.output_tokens"),
        ):
            value = _int_or_none(meta.get(source))
            if value is not None:
                attributes[target] = value
        latency = meta.get("attempt_latency_ms", meta.get("latency_ms"))
        if isinstance(latency, int | float) and not isinstance(latency, bool):
            attributes["sigil.latency_ms"] = float(latency)

    @staticmethod
    def _final_attributes(run: _Run, meta: Mapping[str, Any]) -> None:
        root = run.root.attributes
        used = _int_or_none(meta.get("total_tokens"))
        if used is not None:
            root["sigil.budget.used"] = used
            budget = root.get("sigil.budget.total")
            if isinstance(budget, int):
                root["sigil.budget.remaining"] = budget - used
        if (number := _int_or_none(meta.get("run"))) is not None:
            root.setdefault("sigil.run", number)

    @staticmethod
    def _event_attributes(ev: _Event, meta: Mapping[str, Any]) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "sigil.message": ev.message,
            "sigil.tokens": ev.tokens,
            "sigil.seq": ev.seq if ev.seq is not None else -1,
        }
        copied = 0
        for name, value in meta.items():
            if copied == MAX_EVENT_METADATA:
                break
            if _scalar(value):
                attributes[f"sigil.metadata.{name}"] = value
                copied += 1
        return attributes

    def _flush_pending(self, run: _Run, out: list[SpanRecord]) -> None:
        if run.pending:
            for attempt in run.pending.values():
                out.append(self._attempt_record(run, attempt))
            run.pending.clear()

    def _attempt_record(self, run: _Run, attempt: _Span) -> SpanRecord:
        return attempt.record(run.trace_id, run.root.span_id, self.session_id)

    def _close_run(self, run: _Run, out: list[SpanRecord], state: str) -> None:
        self._flush_pending(run, out)
        ended = state not in ("running", "incomplete")
        end = run.root.end_ns if ended else run.last_ns
        for component, attempt in run.open.items():
            attempt.end_ns = max(end, attempt.start_ns)
            if state != "running":
                attempt.fail(f"{component}: the run ended before this step did", "incomplete")
            out.append(self._attempt_record(run, attempt))
        run.open.clear()
        root = run.root
        if not ended:
            root.end_ns = run.last_ns
            if state == "incomplete":
                root.fail("the run ended without session_complete (its writer stopped)", state)
        root.attributes["sigil.run.status"] = state
        root.attributes["sigil.run.tokens"] = run.total_tokens
        out.append(root.record(run.trace_id, None, self.session_id))
        run.ended = True


def session_spans(
    session_id: str, entries: Iterable[Any], run_state: str = "incomplete"
) -> list[SpanRecord]:
    """All spans of a session's events (in log order); see :class:`SpanBuilder`."""
    builder = SpanBuilder(session_id)
    spans: list[SpanRecord] = []
    for entry in entries:
        spans.extend(builder.feed(entry))
    spans.extend(builder.finish(run_state))
    return spans


# ---------------------------------------------------------------------------
# Reading a session from disk (through the native parser)


@dataclass(slots=True)
class ReadStats:
    files: int = 0
    entries: int = 0
    malformed: int = 0
    torn_tail: bool = False


def iter_session_entries(
    session_dir: Path, stats: ReadStats | None = None, chunk_bytes: int = 8 << 20
) -> Iterator[Any]:
    """The session's entries in log order: rotated segments, oldest first, then the
    live file, parsed natively in blocks of ``chunk_bytes`` (memory stays bounded
    whatever the session's size). Malformed lines are skipped and counted in
    ``stats`` (contract 6); a last line without its newline is still being written
    and is left for later.
    """
    from sigil.core.paths import LOG_FILE_NAME, rotated_segments

    stats = stats if stats is not None else ReadStats()
    for path in [*rotated_segments(session_dir), session_dir / LOG_FILE_NAME]:
        yield from iter_file_entries(path, stats, chunk_bytes)


def iter_file_entries(
    path: Path, stats: ReadStats | None = None, chunk_bytes: int = 8 << 20
) -> Iterator[Any]:
    """One log file's entries (see :func:`iter_session_entries`); none if it is gone.

    Read through the native tailer, like the monitor and the fold: batches of
    bounded size, lines over the line limit skipped (never held whole) and
    counted with the malformed ones, so every reader agrees on the session's
    tokens.
    """
    from sigil import _native

    stats = stats if stats is not None else ReadStats()
    if not path.is_file():
        return
    tailer = _native.Tailer(path)
    stats.files += 1
    batch_lines = max(1, chunk_bytes // 256)
    while True:
        entries, malformed = tailer.read_entries(batch_lines, chunk_bytes)
        if not entries and not malformed:
            break
        stats.entries += len(entries)
        stats.malformed += len(malformed)
        yield from entries
    checkpoint = tailer.checkpoint()
    try:
        if checkpoint is not None and checkpoint[2] < path.stat().st_size:
            stats.torn_tail = True  # a last line without its newline: still being written
    except FileNotFoundError:
        pass


def _next_seq(session_dir: Path) -> int:
    """The ``seq`` the session's next event will get: what the writer recovers
    (ExecutionLogger._recover_next_seq), from the live file or the newest segment."""
    from sigil import _native
    from sigil.core.paths import LOG_FILE_NAME, rotated_segments

    for path in [session_dir / LOG_FILE_NAME, *reversed(rotated_segments(session_dir))]:
        try:
            last = _native.tail_max_seq(path)
        except FileNotFoundError:
            continue
        if last is not None:
            return int(last) + 1
    return 0


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


# ---------------------------------------------------------------------------
# Endpoints and headers


def traces_endpoint(endpoint: str, protocol: str = DEFAULT_PROTOCOL) -> str:
    """The URL spans are sent to.

    For OTLP/HTTP, ``endpoint`` is a base URL as in ``OTEL_EXPORTER_OTLP_ENDPOINT``
    and ``/v1/traces`` is appended, unless it already ends with it. For gRPC the
    URL is used as it is (``http://`` means no TLS). Raises ``ValueError`` with a
    one-line message for anything that is not an http(s) URL with a host.
    """
    text = endpoint.strip()
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"invalid OTLP endpoint {endpoint!r}: expected http://HOST:PORT or https://HOST:PORT"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"invalid OTLP endpoint {endpoint!r}: bad port") from None
    if protocol == "grpc":
        return text
    path = parts.path.rstrip("/")
    if not path.endswith(TRACES_PATH):
        path += TRACES_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


# RFC 9110 "token" characters, the only ones allowed in a header name.
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def parse_header(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` to a header pair; ``ValueError`` (one line) when malformed."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"invalid header {text!r}: expected KEY=VALUE")
    if not set(key) <= _TOKEN_CHARS:
        raise ValueError(f"invalid header name {key!r}: use letters, digits and -")
    if "\r" in value or "\n" in value:
        raise ValueError(f"invalid header {key!r}: the value contains a line break")
    return key, value.strip()


def check_reachable(url: str, timeout: float = 3.0) -> None:
    """Fail fast, with the reason, when nothing listens at ``url``'s host and port.

    The exporters retry a refused connection with backoff for their whole
    timeout; one TCP connect tells the user at once instead. Skipped when a
    proxy handles the URL (the proxy, not the collector, is then reachable).
    Raises ``ConnectionError`` with a one-line message.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    if parts.scheme in proxies and not urllib.request.proxy_bypass(host):
        return
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as exc:
        problem = f"cannot resolve the collector's host {host!r}: {exc.strerror}"
    except TimeoutError:
        problem = f"no answer from the collector at {host}:{port} within {timeout:g} s"
    except OSError as exc:
        problem = f"cannot connect to the collector at {host}:{port}: {exc.strerror or exc}"
    else:
        return
    raise ConnectionError(problem)


def resend_command(session_id: str, log_path: str | os.PathLike[str] | None = None) -> str:
    """The command that sends a whole session again (same IDs, so no duplicates)."""
    command = f"sigil export --session {session_id}"
    if log_path is not None:
        command += f" --log-path {os.fspath(log_path)}"
    return command


# ---------------------------------------------------------------------------
# Sending through the OpenTelemetry SDK's OTLP exporters


class _LastError(logging.Handler):
    """Keeps the SDK exporters' last complaint, for one clear line at the end.

    The exporters log each failure and retry (``Transient error ..., retrying``)
    to the root logger; in a terminal under a live dashboard that is noise, and
    for ``sigil export`` it would not be one line. So their loggers stop
    propagating and this handler keeps the latest message instead.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.message = record.getMessage()
        except Exception:  # pragma: no cover - a bad format string in a log call
            self.message = str(record.msg)


_capture: _LastError | None = None
_capture_lock = threading.Lock()


def _sdk_log_capture() -> _LastError:
    global _capture
    with _capture_lock:
        if _capture is None:
            _capture = _LastError()
            for name in ("opentelemetry.exporter", "opentelemetry.sdk"):
                logger = logging.getLogger(name)
                logger.addHandler(_capture)
                logger.propagate = False
        return _capture


def _resource() -> Any:
    """``service.name=sigil`` and the host, overridable by ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` (Resource.create alone lets code win over env)."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    from sigil import __version__

    class _SessionResource(Resource):
        """The SDK's encoder groups spans by resource, hashing it once per span,
        and Resource hashes by dumping its attributes to JSON: a tenth of the
        export's time for 100,000 spans. This one is immutable, so hash once."""

        _hash: int | None = None

        def __hash__(self) -> int:
            if self._hash is None:
                self._hash = super().__hash__()
            return self._hash

        def __eq__(self, other: object) -> bool:
            return self is other or super().__eq__(other)

    defaults = {
        "service.name": "sigil",
        "service.version": __version__,
        "host.name": socket.gethostname(),
    }
    merged = Resource.create(defaults).merge(OTELResourceDetector().detect())
    return _SessionResource(merged.attributes, merged.schema_url)


class _Converter:
    """SpanRecord -> SDK ReadableSpan, sharing the resource and scope objects."""

    def __init__(self) -> None:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        from sigil import __version__

        self._Event = Event
        self._ReadableSpan = ReadableSpan
        self._SpanContext = SpanContext
        self._kind = SpanKind.INTERNAL
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._unset = Status(StatusCode.UNSET)
        self._Status = Status
        self._error = StatusCode.ERROR
        self._resource = _resource()
        self._scope = InstrumentationScope("sigil", __version__, SCHEMA_URL)

    def __call__(self, record: SpanRecord) -> ReadableSpan:
        context = self._SpanContext(record.trace_id, record.span_id, False, self._flags)
        parent = (
            self._SpanContext(record.trace_id, record.parent_span_id, False, self._flags)
            if record.parent_span_id is not None
            else None
        )
        status = (
            self._Status(self._error, record.status_message or None)
            if record.status == "error"
            else self._unset
        )
        events = [self._Event(e.name, e.attributes, e.time_ns) for e in record.events]
        return self._ReadableSpan(
            name=record.name,
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=record.attributes,
            events=events,
            kind=self._kind,
            status=status,
            start_time=record.start_ns,
            end_time=record.end_ns,
            instrumentation_scope=self._scope,
        )


def _make_exporter(
    endpoint: str, headers: Mapping[str, str], protocol: str, timeout: float
) -> SpanExporter:
    """The maintained OTLP exporter for ``protocol`` (retries with backoff, honours
    ``Retry-After``, TLS, compression and the ``OTEL_EXPORTER_OTLP_*`` TLS settings)."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        # gRPC metadata keys must be lowercase.
        return GrpcExporter(
            endpoint=endpoint,
            headers={k.lower(): v for k, v in headers.items()},
            timeout=timeout,
        )
    if protocol != "http/protobuf":
        raise ValueError(f"unsupported OTLP protocol {protocol!r}: use http/protobuf or grpc")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint, headers=dict(headers), timeout=timeout)


def _export_batch(
    exporter: SpanExporter, spans: Sequence[ReadableSpan], capture: _LastError
) -> str | None:
    """Send one batch; None when the collector took it, else why not.

    Some SDK releases raise (a refused connection, say) where others return
    FAILURE: both become a reason, never a traceback.
    """
    from opentelemetry.sdk.trace.export import SpanExportResult

    try:
        if exporter.export(spans) is SpanExportResult.SUCCESS:
            return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return capture.message or _REFUSED


@dataclass(slots=True)
class ExportResult:
    """What a batch export sent: spans sent and failed, and the last error."""

    spans_sent: int = 0
    spans_failed: int = 0
    traces: int = 0
    tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.spans_failed == 0 and self.error is None


def export_records(
    records: Iterable[SpanRecord],
    endpoint: str,
    headers: Mapping[str, str] | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    *,
    timeout: float = 10.0,
    batch_size: int = 2048,
    stop_on_failure: bool = True,
    exporter: SpanExporter | None = None,
) -> ExportResult:
    """Send spans in batches of ``batch_size`` through the SDK's OTLP exporter.

    ``endpoint`` is the full traces URL (:func:`traces_endpoint`). Each batch is
    one request, retried by the exporter with exponential backoff (and
    ``Retry-After``) within ``timeout`` seconds. With ``stop_on_failure`` the
    first batch that still fails ends the export: the collector is down, and the
    remaining spans are counted as failed rather than waited on.
    """
    require_otlp(protocol)
    capture = _sdk_log_capture()
    capture.message = None
    own_exporter = exporter is None
    exporter = exporter or _make_exporter(endpoint, headers or {}, protocol, timeout)
    convert = _Converter()
    result = ExportResult()
    batch: list[ReadableSpan] = []
    failing = False

    def send() -> None:
        nonlocal failing
        if failing:
            result.spans_failed += len(batch)
        elif (problem := _export_batch(exporter, batch, capture)) is None:
            result.spans_sent += len(batch)
        else:
            result.spans_failed += len(batch)
            result.error = problem
            failing = stop_on_failure
        batch.clear()

    try:
        for record in records:
            result.tokens += record.tokens
            if record.parent_span_id is None:
                result.traces += 1
            batch.append(convert(record))
            if len(batch) >= batch_size:
                send()
        if batch:
            send()
    finally:
        if own_exporter:
            exporter.shutdown()
    return result


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
        self._first_seq = _next_seq(self._session_dir) if follow_log else 0
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
        """Start following the live file, after folding the rotated segments.

        The tailer pins the live file's identity first, so a rotation in
        between neither loses a segment nor reads one twice (as
        ``SessionTailer.catch_up`` does).
        """
        from sigil.core.paths import rotated_segments
        from sigil.telemetry.log_parser import SessionTailer

        tailer = SessionTailer(self.session_id, self._log_path)
        checkpoint = tailer.checkpoint()
        live = checkpoint[:2] if checkpoint else _identity(tailer.path)
        for segment in rotated_segments(self._session_dir):
            if _identity(segment) != live:
                self._feed_entries(iter_file_entries(segment))
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
