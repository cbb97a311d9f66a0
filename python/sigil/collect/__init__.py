"""``sigil collect``: OTLP/HTTP trace ingest, GenAI spans into sigil session logs.

:mod:`.decode` (a request's body into the events of its GenAI spans, grouped
by session: native for protobuf, ``rust/otlp.rs``), :mod:`.mapping` (a span
into events, the inverse of ``sigil export``: the rules, and the Python
reference the native mapping is tested against), :mod:`.sink` (one writer
per session, dedupe, each session's events of a request appended in one
native call) and :mod:`.server` (the aiohttp receiver, imported only when
serving).
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
