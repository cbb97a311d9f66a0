"""The native OTLP ingest path for ``sigil collect`` (rust/otlp.rs): request
bodies decoded and mapped to sigil events with the GIL released, and each
session's events appended in one native write. Only the telemetry layer
imports the native module (ARCHITECTURE.md, Layers); the collect service
reaches it through here.
"""

from __future__ import annotations

from sigil import _native

__all__ = [
    "AppendWriter",
    "OtlpBatch",
    "OtlpSession",
    "otlp_decode_json",
    "otlp_decode_protobuf",
    "otlp_map_spans",
    "sanitize_string",
]

#: The events of one request, grouped by session (``otlp_decode_*``).
OtlpBatch = _native.OtlpBatch
#: A session's duplicate-span set and aggregate rule; appends a batch's events.
OtlpSession = _native.OtlpSession
#: The append writer the session's events go through (fsync, sticky errors).
AppendWriter = _native.AppendWriter
otlp_decode_protobuf = _native.otlp_decode_protobuf
otlp_decode_json = _native.otlp_decode_json
otlp_map_spans = _native.otlp_map_spans
sanitize_string = _native.sanitize_string
