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
root also carries the run's total as ``sigil.run.tokens``. No total is added
up here (contract 12): a run's, the session's and a span's of several events
are the native model's of those events (``log_parser.EventModel``), so the
spans cannot disagree with the other views.

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

The package's parts: :mod:`.spans` (the mapping), :mod:`.reader` (reading a
session's log), :mod:`.transport` (endpoints, headers, the OTLP exporters) and
:mod:`.live` (the live exporter). The mapping (:class:`SpanBuilder`) is pure
Python with no OpenTelemetry import. The OpenTelemetry packages are an optional extra (``pip install
'sigil[otlp]'``) imported only by the functions that send; see
:func:`require_otlp`.
"""

from __future__ import annotations

from sigil.telemetry.otlp.live import LiveExportReport, LiveOtlpExporter
from sigil.telemetry.otlp.reader import ReadStats, iter_session_entries
from sigil.telemetry.otlp.spans import (
    SCHEMA_URL,
    SEMCONV_VERSION,
    SpanBuilder,
    SpanEventRecord,
    SpanRecord,
    root_span_id_for,
    session_spans,
    span_id_for,
    trace_id_for,
)
from sigil.telemetry.otlp.transport import (
    DEFAULT_PROTOCOL,
    INSTALL_HINT,
    PROTOCOLS,
    ExportResult,
    OtlpUnavailable,
    SessionExport,
    check_reachable,
    export_records,
    export_session,
    parse_header,
    require_otlp,
    resend_command,
    traces_endpoint,
)

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
    "SessionExport",
    "SpanBuilder",
    "SpanEventRecord",
    "SpanRecord",
    "check_reachable",
    "export_records",
    "export_session",
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
