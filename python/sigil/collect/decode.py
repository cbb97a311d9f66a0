"""OTLP/HTTP trace payloads (protobuf and JSON, optionally gzip).

The receiver's path is native: :func:`decode_request` decodes a body in the
extension (``rust/otlp.rs``, the GIL released) and maps its GenAI spans to
events grouped by session (a :class:`sigil._native.OtlpBatch`). A JSON body
that is malformed, or holds a value in an unusual form (a number as
``stringValue``, an ``intValue`` with a sign or separators...), is decoded
here (:func:`decode_json`, whose messages and conversions rule) and its spans
mapped there.

:func:`decode_protobuf` (opentelemetry-proto) and :mod:`sigil.collect.mapping`
are the reference the tests hold the native path to.

Only what the mapping reads is kept (:data:`KEPT_ATTRIBUTES`). A payload is
decoded whole before anything is written: a malformed one raises
:class:`MalformedPayload` (HTTP 400) and leaves the log untouched; one with
more than :data:`MAX_SPANS` spans raises :class:`PayloadTooLarge` (413).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from sigil.telemetry import otlp_ingest

__all__ = [
    "KEPT_ATTRIBUTES",
    "MAX_SPANS",
    "MalformedPayload",
    "PayloadTooLarge",
    "SpanData",
    "decode_json",
    "decode_protobuf",
    "decode_request",
    "gunzip",
]

#: The most spans one request may carry (more is a 413).
MAX_SPANS = 200_000

#: The attributes the mapping reads (sigil.collect.mapping); every other one is skipped.
KEPT_ATTRIBUTES = frozenset(
    {
        # OpenTelemetry GenAI semantic conventions
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.usage.prompt_tokens",  # before semconv 1.27
        "gen_ai.usage.completion_tokens",
        "gen_ai.request.model",
        "gen_ai.response.model",
        "gen_ai.operation.name",
        "gen_ai.agent.name",
        "gen_ai.conversation.id",
        "gen_ai.provider.name",
        "gen_ai.system",
        "error.type",
        # OpenInference (Phoenix)
        "llm.token_count.prompt",
        "llm.token_count.completion",
        "llm.token_count.total",
        "llm.model_name",
        "llm.provider",
        "session.id",
        "agent.name",
        "openinference.span.kind",
        # what `sigil export` adds (sigil.telemetry.otlp.spans)
        "sigil.tokens",
        "sigil.run.tokens",
        "sigil.latency_ms",
    }
)

_STATUS_ERROR = 2


class MalformedPayload(ValueError):
    """The body is not an OTLP trace export request; the message says what is wrong."""


class PayloadTooLarge(ValueError):
    """The body, or what it inflates to, is over the size limit."""


@dataclass(slots=True)
class SpanData:
    """One span, as the mapping needs it (IDs in lowercase hex, as OTLP JSON has them)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    error: bool
    status_message: str
    attributes: dict[str, Any]


#: Input fed to the inflater at a time: what is left over when a member ends
#: is copied (``unused_data``), so a body of many tiny members costs at most
#: this much per member rather than the rest of the body each time.
_GZIP_FEED = 4096
_NOT_ZERO = re.compile(rb"[^\x00]")


def gunzip(body: bytes, limit: int) -> bytes:
    """``body`` inflated, refusing more than ``limit`` bytes (a gzip bomb is a 413).

    Every member of a multi-member body (RFC 1952 2.2) is inflated in order,
    as ``gzip.decompress`` does, under one cap on their total; zero bytes
    padding the end are ignored (as ``GzipFile`` does), anything else after a
    member must be another member."""
    out = bytearray()
    view = memoryview(body)
    pos = 0
    while True:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while not inflater.eof:
            if pos >= len(body):
                raise MalformedPayload("the gzip body is truncated")
            chunk = view[pos : pos + _GZIP_FEED]
            pos += len(chunk)
            try:
                out += inflater.decompress(chunk, limit + 1 - len(out))
            except zlib.error as exc:
                raise MalformedPayload(f"the gzip body is corrupt: {exc}") from None
            if len(out) > limit or inflater.unconsumed_tail:
                raise PayloadTooLarge(f"the body inflates to more than {limit} bytes")
        pos -= len(inflater.unused_data)
        more = _NOT_ZERO.search(body, pos)
        if more is None:
            return bytes(out)
        pos = more.start()


def decode_request(body: bytes, protobuf: bool) -> otlp_ingest.OtlpBatch:
    """A request's body (protobuf, else OTLP/JSON) as its events, grouped by session."""
    try:
        if protobuf:
            return otlp_ingest.otlp_decode_protobuf(body, max_spans=MAX_SPANS)
        batch = otlp_ingest.otlp_decode_json(body, max_spans=MAX_SPANS)
        if batch is not None:
            return batch
        # Malformed, or a value in an unusual form: this decoder decides.
        return otlp_ingest.otlp_map_spans(decode_json(body), max_spans=MAX_SPANS)
    except OverflowError as exc:
        raise PayloadTooLarge(str(exc)) from None
    except ValueError as exc:
        if isinstance(exc, MalformedPayload):
            raise
        raise MalformedPayload(str(exc)) from None


# ---------------------------------------------------------------------------
# protobuf in Python (opentelemetry-proto, imported on first use): the reference


#: The AnyValue cases kept; no attribute the mapping reads is an array, a map or bytes.
_PB_SCALARS = frozenset({"string_value", "int_value", "double_value", "bool_value"})


def _pb_value(value: Any) -> Any:
    which = value.WhichOneof("value")
    return getattr(value, which) if which in _PB_SCALARS else None


def decode_protobuf(body: bytes) -> list[SpanData]:
    """An ``ExportTraceServiceRequest`` (application/x-protobuf) as spans."""
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise MalformedPayload(f"the body is not an OTLP protobuf trace request: {exc}") from None
    kept, scalars = KEPT_ATTRIBUTES, _PB_SCALARS
    out: list[SpanData] = []
    append = out.append
    for resource_spans in request.resource_spans:
        resource_attrs = {
            kv.key: _pb_value(kv.value)
            for kv in resource_spans.resource.attributes
            if kv.key in kept
        }
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                trace_id, span_id = span.trace_id, span.span_id
                if len(trace_id) != 16 or len(span_id) != 8:
                    raise MalformedPayload(
                        f"span {span.name!r} has a trace ID of {len(trace_id)} bytes"
                        f" and a span ID of {len(span_id)} bytes (16 and 8 expected)"
                    )
                attributes = dict(resource_attrs) if resource_attrs else {}
                for kv in span.attributes:
                    key = kv.key
                    if key in kept:
                        # _pb_value inline: this loop is the decoder's hot path
                        value = kv.value
                        which = value.WhichOneof("value")
                        attributes[key] = getattr(value, which) if which in scalars else None
                status = span.status
                append(
                    SpanData(
                        trace_id.hex(),
                        span_id.hex(),
                        span.parent_span_id.hex(),
                        span.name,
                        span.start_time_unix_nano,
                        span.end_time_unix_nano,
                        status.code == _STATUS_ERROR,
                        status.message,
                        attributes,
                    )
                )
    return out


# ---------------------------------------------------------------------------
# JSON (the OTLP/JSON mapping: lowerCamelCase names, hex IDs, 64-bit ints as strings)

_HEX = frozenset("0123456789abcdefABCDEF")


def _hex_id(value: object, size: int, what: str, *, optional: bool = False) -> str:
    if value in (None, "") and optional:
        return ""
    if not isinstance(value, str) or len(value) != size * 2 or not _HEX.issuperset(value):
        raise MalformedPayload(f"{what} must be {size * 2} hex digits, not {value!r:.80}")
    return value.lower()


def _json_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise MalformedPayload(f"{what} must be an integer, not {value!r:.80}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise MalformedPayload(f"{what} must be an integer, not {value!r:.80}")


def _json_value(value: object, key: str) -> Any:
    if not isinstance(value, dict):
        raise MalformedPayload(f"the value of attribute {key!r} must be an object")
    for name, item in value.items():
        if name == "stringValue":
            return item if isinstance(item, str) else str(item)
        if name == "intValue":
            return _json_int(item, f"attribute {key!r}")
        if name == "doubleValue":
            if isinstance(item, int | float) and not isinstance(item, bool):
                return float(item)
            if isinstance(item, str):
                try:
                    return float(item)
                except ValueError:
                    pass
            raise MalformedPayload(f"attribute {key!r} must be a number, not {item!r:.80}")
        if name == "boolValue":
            return bool(item)
    return None


def _json_attributes(items: object, into: dict[str, Any], where: str) -> None:
    if items is None:
        return
    if not isinstance(items, list):
        raise MalformedPayload(f"{where} attributes must be a list")
    for kv in items:
        if not isinstance(kv, dict) or not isinstance(kv.get("key"), str):
            raise MalformedPayload(f"{where} has an attribute without a key")
        key = kv["key"]
        if key in KEPT_ATTRIBUTES:
            into[key] = _json_value(kv.get("value", {}), key)


def _json_list(obj: dict[str, Any], name: str) -> list[Any]:
    value = obj.get(name, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedPayload(f"{name} must be a list")
    return value


def _json_status(span: dict[str, Any]) -> tuple[bool, str]:
    status = span.get("status") or {}
    if not isinstance(status, dict):
        raise MalformedPayload("a span's status must be an object")
    code = status.get("code", 0)
    error = code == _STATUS_ERROR or code == "STATUS_CODE_ERROR"
    message = status.get("message", "")
    return error, message if isinstance(message, str) else str(message)


def decode_json(body: bytes) -> list[SpanData]:
    """An ``ExportTraceServiceRequest`` in the OTLP/JSON encoding as spans."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedPayload(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedPayload("the body must be a JSON object with resourceSpans")
    out: list[SpanData] = []
    for resource_spans in _json_list(doc, "resourceSpans"):
        if not isinstance(resource_spans, dict):
            raise MalformedPayload("each of resourceSpans must be an object")
        resource_attrs: dict[str, Any] = {}
        resource = resource_spans.get("resource") or {}
        if not isinstance(resource, dict):
            raise MalformedPayload("a resource must be an object")
        _json_attributes(resource.get("attributes"), resource_attrs, "a resource")
        for scope_spans in _json_list(resource_spans, "scopeSpans"):
            if not isinstance(scope_spans, dict):
                raise MalformedPayload("each of scopeSpans must be an object")
            for span in _json_list(scope_spans, "spans"):
                if not isinstance(span, dict):
                    raise MalformedPayload("each span must be an object")
                name = span.get("name", "")
                attributes = dict(resource_attrs)
                _json_attributes(span.get("attributes"), attributes, f"span {name!r:.80}")
                error, message = _json_status(span)
                out.append(
                    SpanData(
                        _hex_id(span.get("traceId"), 16, "traceId"),
                        _hex_id(span.get("spanId"), 8, "spanId"),
                        _hex_id(span.get("parentSpanId"), 8, "parentSpanId", optional=True),
                        name if isinstance(name, str) else str(name),
                        _json_int(span.get("startTimeUnixNano", 0), "startTimeUnixNano"),
                        _json_int(span.get("endTimeUnixNano", 0), "endTimeUnixNano"),
                        error,
                        message,
                        attributes,
                    )
                )
    return out
