"""Rows for ``sigil collect`` (issue 14): spans ingested per second (aim: 50,000/s).

Each round takes a fresh batch of 5,000 GenAI chat spans (new IDs, so none is
a duplicate) in 10 conversations, encoded as the OTLP/HTTP exporter sends them
(protobuf, 11 attributes a span, 3 of which the mapping skips), and writes
2 events a span:

* ``ingest``: :func:`sigil.collect.decode.decode_request` (the native decoder
  and mapping, rust/otlp.rs) and :class:`sigil.collect.SessionSink` (dedupe,
  pricing, each session's events appended in one native call) -- the
  receiver's work per request;
* ``old_path``: what the receiver did before the native path, kept here as
  the baseline: opentelemetry-proto's decoder
  (:func:`sigil.collect.decode.decode_protobuf`), the Python mapping
  (:func:`sigil.collect.mapping.map_span`), a scrub and a price per span and
  an ``ExecutionLogger.log_event_sync`` per event;
* ``ingest_json``: the same spans in OTLP/JSON (:func:`decode_request`'s
  native JSON decoder), through the same sink;
* ``http``: the same batches POSTed to a running ``sigil collect`` process on
  127.0.0.1, the whole path (HTTP, decode, write);
* the pure-Python baseline: what a plain receiver would do --
  ``json_format.MessageToDict``, the same mapping rules written inline, a set
  for dedupe, ``json.dumps`` and a buffered file write per event.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import quick
from sigil.collect.decode import decode_protobuf, decode_request
from sigil.collect.sink import SessionSink

pytestmark = pytest.mark.benchmark

SPANS = 5_000
GROUP = "sigil collect: spans ingested (5,000 a request)"
AIM_SPANS_PER_S = 50_000


def _kv(key: str, value: object) -> Any:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(int_value=int(value)))  # type: ignore[call-overload]


def request_body(batch: int, n: int = SPANS) -> bytes:
    """``n`` chat spans, IDs unique to ``batch``."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(_kv("service.name", "agent"))
    scope = resource_spans.scope_spans.add()
    for i in range(n):
        span = scope.spans.add()
        span.trace_id = (batch * 1_000_003 + i // 10 + 1).to_bytes(16, "big")
        span.span_id = (i + 1).to_bytes(8, "big")
        span.name = "chat gpt-4o"
        span.start_time_unix_nano = 1_700_000_000_000_000_000 + i
        span.end_time_unix_nano = 1_700_000_000_250_000_000 + i
        span.attributes.extend(
            [
                _kv("gen_ai.operation.name", "chat"),
                _kv("gen_ai.conversation.id", f"conv-{i % 10}"),
                _kv("gen_ai.agent.name", "planner"),
                _kv("gen_ai.request.model", "gpt-4o"),
                _kv("gen_ai.response.model", "gpt-4o-2024-08-06"),
                _kv("gen_ai.provider.name", "openai"),
                _kv("gen_ai.usage.input_tokens", 100 + i % 50),
                _kv("gen_ai.usage.output_tokens", 20),
                _kv("gen_ai.request.temperature", 0.2),
                _kv("server.address", "api.openai.com"),
                _kv("server.port", 443),
            ]
        )
    return request.SerializeToString()


def json_body(body: bytes) -> bytes:
    """A protobuf request in the OTLP/JSON encoding (hex IDs, as exporters send it)."""
    import orjson
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    doc = json_format.MessageToDict(ExportTraceServiceRequest.FromString(body))
    for resource_spans in doc["resourceSpans"]:
        for scope in resource_spans["scopeSpans"]:
            for span in scope["spans"]:
                for name in ("traceId", "spanId"):
                    span[name] = base64.b64decode(span[name]).hex()
    return orjson.dumps(doc)


class _Batches:
    """Fresh request bodies, one per call (a body sent twice would be all duplicates)."""

    def __init__(self, count: int, *, json: bool = False) -> None:
        self.bodies = [request_body(batch) for batch in range(count)]
        if json:
            self.bodies = [json_body(body) for body in self.bodies]
        self.next = 0

    def take(self) -> bytes:
        body = self.bodies[self.next]
        self.next += 1
        return body


def _rounds() -> int:
    return 3 if quick() else 10


@pytest.fixture(scope="module")
def batches() -> Iterator[list[_Batches]]:
    # one set per row, so that each row ingests spans it has not seen
    yield [_Batches(_rounds() + 1) for _ in range(4)] + [_Batches(_rounds() + 1, json=True)]


# -- the pure-Python baseline --------------------------------------------------------------


class _PlainReceiver:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: dict[str, Any] = {}
        self.seen: set[tuple[str, str]] = set()

    def ingest(self, body: bytes) -> int:
        from google.protobuf import json_format
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        doc = json_format.MessageToDict(ExportTraceServiceRequest.FromString(body))
        written = 0
        for resource_spans in doc.get("resourceSpans", []):
            for scope in resource_spans.get("scopeSpans", []):
                for span in scope.get("spans", []):
                    attrs = {}
                    for kv in span.get("attributes", []):
                        value = kv["value"]
                        attrs[kv["key"]] = next(iter(value.values())) if value else None
                    key = (span["traceId"], span["spanId"])
                    if key in self.seen:
                        continue
                    sid = attrs.get("gen_ai.conversation.id") or span["traceId"]
                    inp = int(attrs.get("gen_ai.usage.input_tokens", 0))
                    out = int(attrs.get("gen_ai.usage.output_tokens", 0))
                    component = attrs.get("gen_ai.agent.name") or attrs["gen_ai.operation.name"]
                    latency = (int(span["endTimeUnixNano"]) - int(span["startTimeUnixNano"])) / 1e6
                    meta = {
                        "trace_id": span["traceId"],
                        "span_id": span["spanId"],
                        "input_tokens": inp,
                        "output_tokens": out,
                        "model": attrs.get("gen_ai.response.model"),
                        "latency_ms": latency,
                    }
                    f = self.files.get(sid)
                    if f is None:
                        f = self.files[sid] = open(self.directory / f"{sid}.jsonl", "a")  # noqa: SIM115
                    for kind, tokens in (("step_start", 0), ("step_complete", inp + out)):
                        event = {
                            "session_id": sid,
                            "event_type": kind,
                            "component": component,
                            "message": span["name"],
                            "tokens": tokens,
                            "metadata": meta,
                        }
                        f.write(json.dumps(event) + "\n")
                    self.seen.add(key)
                    written += 1
        return written

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def test_collect_python_baseline(benchmark: Any, tmp_path: Path, batches: list[_Batches]) -> None:
    benchmark.group = GROUP
    benchmark.extra_info.update(ops=SPANS)
    receiver = _PlainReceiver(tmp_path)
    source = batches[0]
    receiver.ingest(source.take())  # opens the files
    try:
        result = benchmark.pedantic(
            receiver.ingest, setup=lambda: ((source.take(),), {}), rounds=_rounds()
        )
    finally:
        receiver.close()
    assert result == SPANS


# -- the path before the native one ----------------------------------------------------------


class _OldPath:
    """The receiver before rust/otlp.rs: Python decoding and mapping, a logger call per event."""

    def __init__(self, directory: Path) -> None:
        from sigil.telemetry.pricing import Pricer
        from sigil.telemetry.sanitization import LogSanitizer

        self.directory = directory
        self.loggers: dict[str, Any] = {}
        self.seen: set[str] = set()
        self.scrub = LogSanitizer().sanitize_string
        self.pricer = Pricer()

    def ingest(self, body: bytes) -> int:
        from sigil.collect.mapping import map_span
        from sigil.telemetry.execution_logger import ExecutionLogger

        written = 0
        scrub, pricer = self.scrub, self.pricer
        for span in decode_protobuf(body):
            event = map_span(span)
            if event is None or event.key in self.seen:
                continue
            logger = self.loggers.get(event.session_id)
            if logger is None:
                logger = ExecutionLogger(event.session_id, self.directory, sanitizer=False)
                logger.initialize_sync()
                self.loggers[event.session_id] = logger
            meta = event.metadata
            component, message = scrub(event.component), scrub(event.message)
            for name in ("model", "provider", "operation", "error_type"):
                if (value := meta.get(name)) is not None:
                    meta[name] = scrub(value)
            model = meta.get("model")
            if isinstance(model, str):
                inp, out = meta.get("input_tokens") or 0, meta.get("output_tokens") or 0
                meta.update(pricer.cost_meta(pricer.price(model, inp, out)))
            ids = {"source": "otlp", "trace_id": meta["trace_id"], "span_id": meta["span_id"]}
            logger.log_event_sync("step_start", component, message, 0, ids)
            logger.log_event_sync("step_complete", component, message, event.tokens, meta)
            self.seen.add(event.key)
            written += 1
        return written

    def close(self) -> None:
        for logger in self.loggers.values():
            logger.close_sync()


def test_collect_old_path(benchmark: Any, tmp_path: Path, batches: list[_Batches]) -> None:
    benchmark.group = GROUP
    benchmark.extra_info.update(ops=SPANS, baseline="test_collect_python_baseline")
    receiver = _OldPath(tmp_path)
    source = batches[3]
    receiver.ingest(source.take())  # opens the sessions
    try:
        result = benchmark.pedantic(
            receiver.ingest, setup=lambda: ((source.take(),), {}), rounds=_rounds()
        )
    finally:
        receiver.close()
    assert result == SPANS


# -- sigil collect ---------------------------------------------------------------------------


def test_collect_ingest(benchmark: Any, tmp_path: Path, batches: list[_Batches]) -> None:
    benchmark.group = GROUP
    benchmark.extra_info.update(
        ops=SPANS, baseline="test_collect_old_path", aim_ops_per_s=AIM_SPANS_PER_S
    )
    sink = SessionSink(tmp_path)
    source = batches[1]
    sink.ingest(decode_request(source.take(), True))  # opens the sessions (locks, session_start)

    def ingest(body: bytes) -> int:
        return sink.ingest(decode_request(body, True)).written

    try:
        written = benchmark.pedantic(ingest, setup=lambda: ((source.take(),), {}), rounds=_rounds())
    finally:
        sink.close()
    assert written == SPANS


def test_collect_decode(benchmark: Any, batches: list[_Batches]) -> None:
    """The native protobuf decode and mapping alone (no sink): the part of
    ``ingest`` that the span count on the wire (before any span is decoded)
    and the one-span-at-a-time decode are in."""
    benchmark.group = GROUP
    benchmark.extra_info.update(ops=SPANS, baseline="test_collect_old_path")
    body = batches[0].bodies[0]  # decoding does not dedupe: the same body each round
    batch = benchmark.pedantic(
        decode_request, args=(body, True), rounds=_rounds() * 5, warmup_rounds=1
    )
    assert batch.spans == SPANS


def test_collect_ingest_json(benchmark: Any, tmp_path: Path, batches: list[_Batches]) -> None:
    benchmark.group = GROUP
    benchmark.extra_info.update(
        ops=SPANS, baseline="test_collect_old_path", aim_ops_per_s=AIM_SPANS_PER_S
    )
    sink = SessionSink(tmp_path)
    source = batches[4]
    sink.ingest(decode_request(source.take(), False))  # opens the sessions

    def ingest(body: bytes) -> int:
        return sink.ingest(decode_request(body, False)).written

    try:
        written = benchmark.pedantic(ingest, setup=lambda: ((source.take(),), {}), rounds=_rounds())
    finally:
        sink.close()
    assert written == SPANS


def test_collect_http(benchmark: Any, tmp_path: Path, batches: list[_Batches]) -> None:
    import httpx

    benchmark.group = GROUP
    benchmark.extra_info.update(
        ops=SPANS, baseline="test_collect_old_path", aim_ops_per_s=AIM_SPANS_PER_S
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigil", "collect", "--port", "0", "--log-path", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split("listening on ", 1)[1].strip()
        source = batches[2]
        headers = {"Content-Type": "application/x-protobuf"}
        with httpx.Client(timeout=60) as client:

            def post(body: bytes) -> int:
                return client.post(url, content=body, headers=headers).status_code

            assert post(source.take()) == 200
            status = benchmark.pedantic(
                post, setup=lambda: ((source.take(),), {}), rounds=_rounds()
            )
        assert status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert f"{(_rounds() + 1) * SPANS} written" in out, out
