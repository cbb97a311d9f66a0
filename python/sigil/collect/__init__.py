"""``sigil collect``: OTLP/HTTP trace ingest, GenAI spans into sigil session logs.

:mod:`.decode` (protobuf and JSON payloads into :class:`SpanData`),
:mod:`.mapping` (a span into events: the inverse of ``sigil export``),
:mod:`.sink` (one :class:`~sigil.telemetry.execution_logger.ExecutionLogger`
per session, dedupe) and :mod:`.server` (the aiohttp receiver, imported only
when serving).
"""

from __future__ import annotations

from sigil.collect.decode import MalformedPayload, PayloadTooLarge, SpanData
from sigil.collect.mapping import SpanEvent, map_span, session_id_for
from sigil.collect.sink import IngestResult, SessionSink

__all__ = [
    "IngestResult",
    "MalformedPayload",
    "PayloadTooLarge",
    "SessionSink",
    "SpanData",
    "SpanEvent",
    "map_span",
    "session_id_for",
]
