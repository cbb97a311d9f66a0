"""The span model: a session's events as OpenTelemetry spans (pure, no OpenTelemetry import).

See :mod:`sigil.telemetry.otlp` for the shape, tokens, identity and conventions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sigil.telemetry.log_parser import EventModel
from sigil.telemetry.pricing import COST_KEY, usd

#: The OpenTelemetry semantic-conventions release this mapping follows. v1.41.0
#: is the last release that carries the GenAI conventions (agent, workflow and
#: ``gen_ai.usage.*`` attributes) before they moved to their own repository.
SEMCONV_VERSION = "1.41.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

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

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


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
        "first",
        "fold",
        "implicit",
        "key",
        "name",
        "ref",
        "span_id",
        "start_ns",
        "status",
        "status_message",
    )

    def __init__(self, name: str, span_id: int, key: int | str, start_ns: int) -> None:
        self.name = name
        self.span_id = span_id
        self.key = key
        self.start_ns = start_ns
        self.end_ns = start_ns
        #: the first event with tokens this span carries, and the native model
        #: of them all once there are two
        self.first: _Event | None = None
        self.fold: EventModel | None = None
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

    def take(self, ev: _Event) -> None:
        """Carry ``ev``'s tokens: each event's land on exactly one span. A span
        whose tokens come from one event carries that event's; from several, the
        native model's total of them (an event without tokens changes none)."""
        if not ev.tokens:
            return
        if self.fold is None:
            if self.first is None:
                self.first = ev
                return
            self.fold = EventModel()
            self.first.feed(self.fold)
        ev.feed(self.fold)

    @property
    def tokens(self) -> int:
        if self.fold is not None:
            return self.fold.tokens
        return self.first.tokens if self.first is not None else 0

    def cost_model(self) -> tuple[int, int, int] | None:
        """The native model's cost of this span's events with tokens (None
        without such events): the fold's rules, no sum made here."""
        if self.fold is not None:
            return self.fold.cost()
        if self.first is None or not self.first.priceable():
            return None
        one = EventModel()
        self.first.feed(one)
        return one.cost()

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
        cost_attributes(attributes, "sigil", self.cost_model())
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
        "fold",
        "last_ns",
        "model",
        "open",
        "pending",
        "provider",
        "retry_at",
        "root",
        "trace_id",
    )

    def __init__(self, session_id: str, key: int | str, start_ns: int) -> None:
        self.trace_id = trace_id_for(session_id, key)
        self.root = _Span(ROOT_SPAN_NAME, root_span_id_for(session_id, key), key, start_ns)
        self.last_ns = start_ns
        #: the native model of the run's events (its ``sigil.run.tokens``)
        self.fold = EventModel()
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

    __slots__ = (
        "_args",
        "component",
        "event_type",
        "message",
        "seq",
        "source",
        "time_ns",
        "timestamp",
        "tokens",
    )

    def __init__(
        self,
        event_type: str,
        component: str,
        message: str,
        tokens: int,
        seq: int | None,
        time_ns: int | None,
        source: Any,
        timestamp: str = "",
    ) -> None:
        self.timestamp = timestamp
        self.event_type = event_type
        self.component = component
        self.message = message
        self.tokens = tokens
        self.seq = seq
        self.time_ns = time_ns
        self.source = source
        self._args: tuple[str, str, str, int, int | None, str] | None = None

    def model_args(self) -> tuple[str, str, str, int, int | None, str]:
        """What a model folds of this event: its tokens and, of its metadata,
        what prices it (``cost_usd`` and ``model``; the rest is the span's).
        Made once: the session's, the run's and the span's models all fold it."""
        if self._args is not None:
            return self._args
        seq = self.seq if self.seq is not None and 0 <= self.seq < 1 << 64 else None
        meta = self.metadata
        priced = {k: meta[k] for k in (COST_KEY, "model") if k in meta}
        # json writes a float's shortest text: the decimal the writer logged.
        cost_json = json.dumps(priced) if priced else "{}"
        self._args = (self.timestamp, self.event_type, self.component, self.tokens, seq, cost_json)
        return self._args

    def priceable(self) -> bool:
        """Whether this event says anything of cost (a price, or a model)."""
        meta = self.metadata
        return COST_KEY in meta or "model" in meta

    def feed(self, model: EventModel) -> None:
        """Fold this event into ``model``."""
        model.feed(*self.model_args())

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
            _text(entry.get("timestamp")),
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
        _text(getattr(entry, "timestamp", None)),
    )


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


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
        #: the native model of every event fed (the session's total, ``tokens``)
        self.fold = EventModel()
        self.events = 0
        self.spans = 0
        self.traces = 0
        self._run: _Run | None = None
        self._index = 0
        self._last_ns = 0

    @property
    def tokens(self) -> int:
        """Tokens of every event fed so far: the native model's total."""
        return self.fold.tokens

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
        kind = ev.event_type

        run = self._run
        if kind == "session_start" or run is None or run.ended:
            if run is not None and not run.ended:
                # A new run began while this one never ended: its writer died.
                self._close_run(run, out, "incomplete")
            run = self._start_run(key, now, ev if kind == "session_start" else None)
        run.last_ns = max(run.last_ns, now)
        if ev.tokens:  # an event without tokens changes no total
            args = ev.model_args()
            self.fold.feed(*args)
            run.fold.feed(*args)
        component = ev.component

        if kind == "session_start":
            run.root.take(ev)
        elif kind == "step_start":
            self._flush_pending(run, out)
            previous = run.open.pop(component, None)
            if previous is not None:
                self._abandon(run, previous, now, out)
            attempt = self._new_attempt(run, component, key, now, implicit=False)
            attempt.take(ev)
            run.open[component] = attempt
        elif kind in _STEP_END_EVENTS or (
            kind == "retry_attempt" and self._ends_attempt(run, component, ev.metadata)
        ):
            self._end_attempt(run, ev, key, now, out)
        elif kind in _FINAL_EVENTS:
            run.root.take(ev)
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
            run.root.take(ev)
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
            target.take(ev)
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
        attempt.take(ev)
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
        root.attributes["sigil.run.tokens"] = run.fold.tokens
        cost_attributes(root.attributes, "sigil.run", run.fold.cost())
        cost_attributes(root.attributes, "sigil.session", self.fold.cost())
        out.append(root.record(run.trace_id, None, self.session_id))
        run.ended = True


def cost_attributes(
    attributes: dict[str, Any], prefix: str, cost: tuple[int, int, int] | None
) -> None:
    """``<prefix>.cost_usd`` where something was priced, ``<prefix>.unpriced_tokens``
    where tokens of models without a price were spent (never a cost of 0 for them).

    ``cost`` is a native model's ``(cost_nanousd, priced_events, unpriced_tokens)``
    (:meth:`EventModel.cost`: a snapshot's numbers without building one, which
    was most of the time of building a span)."""
    if cost is None:
        return
    nanousd, priced_events, unpriced_tokens = cost
    if priced_events:
        attributes[f"{prefix}.cost_usd"] = usd(nanousd)
    if unpriced_tokens:
        attributes[f"{prefix}.unpriced_tokens"] = unpriced_tokens


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
