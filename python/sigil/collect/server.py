"""The OTLP/HTTP trace receiver behind ``sigil collect`` (aiohttp, imported lazily).

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` as protobuf
(``application/x-protobuf``) or OTLP/JSON (``application/json``), optionally
gzip-compressed, as the OTLP/HTTP specification has it. Answers:

* 200 with an ``ExportTraceServiceResponse`` in the request's encoding;
* 401 when collect has a token (``--token``) and the request does not carry
  it (``X-Sigil-Token`` or ``Authorization: Bearer``);
* 400 with a ``google.rpc.Status`` when the body is not a trace request --
  decoded whole before anything is written, so nothing is;
* 413 when the body (or what it inflates to) is over ``max_body_bytes``, or
  it has more than ``decode.MAX_SPANS`` spans;
* 415 for another content type or encoding;
* 503 with ``Retry-After`` when another writer holds a session's lock: the
  exporter retries, and the spans already written are not written again.

Requests are handled one at a time on the event loop: writing is a hand-off
to the native writer (it never waits for the disk), and one thread owning the
sessions keeps each session's events in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from sigil.collect.decode import MalformedPayload, PayloadTooLarge, decode_request, gunzip
from sigil.collect.sink import IngestResult, SessionSink

if TYPE_CHECKING:
    from aiohttp import web

    from sigil.telemetry.pricing import Pricer

__all__ = ["DEFAULT_MAX_BODY", "CollectorStats", "build_app", "serve"]

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
DEFAULT_MAX_BODY = 16 << 20
TRACES_PATH = "/v1/traces"
#: Bodies above this size are decoded on a worker thread (below it, the hop costs more).
_INLINE_DECODE_BYTES = 256 << 10
#: google.rpc.Code values used in error bodies
_INVALID_ARGUMENT, _RESOURCE_EXHAUSTED, _UNAVAILABLE, _UNAUTHENTICATED = 3, 8, 14, 16


@dataclass(slots=True)
class CollectorStats:
    requests: int = 0
    rejected: int = 0
    spans: int = 0
    written: int = 0
    duplicates: int = 0
    ignored: int = 0
    busy: int = 0
    archived: int = 0

    def add(self, result: IngestResult) -> None:
        self.spans += result.spans
        self.written += result.written
        self.duplicates += result.duplicates
        self.ignored += result.ignored
        self.busy += result.busy
        self.archived += result.archived


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _status_body(ctype: str, code: int, message: str) -> bytes:
    """A ``google.rpc.Status`` (fields 1 code, 2 message) in the request's encoding."""
    if ctype == JSON:
        return orjson.dumps({"code": code, "message": message})
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def _partial_success(ctype: str, rejected: int, message: str) -> bytes:
    """An ``ExportTraceServiceResponse`` whose ``partial_success`` (field 1) has
    ``rejected_spans`` (1) and ``error_message`` (2): spans refused for good,
    which an exporter must not retry (OTLP/HTTP "partial success")."""
    if ctype == JSON:
        return orjson.dumps(
            {"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}}
        )
    text = message.encode()
    inner = b"\x08" + _varint(rejected) + b"\x12" + _varint(len(text)) + text
    return b"\x0a" + _varint(len(inner)) + inner


def build_app(
    sink: SessionSink,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    stats: CollectorStats | None = None,
    token: str | None = None,
) -> web.Application:
    from aiohttp import web

    stats = stats if stats is not None else CollectorStats()

    def error(ctype: str, status: int, code: int, message: str, **headers: str) -> web.Response:
        stats.rejected += 1
        return web.Response(
            status=status,
            body=_status_body(ctype, code, message),
            content_type=ctype,
            headers=headers or None,
        )

    expected = token.encode() if token else None

    def authorized(request: web.Request) -> bool:
        if expected is None:
            return True
        given = request.headers.get("X-Sigil-Token")
        if given is None:
            auth = request.headers.get("Authorization", "")
            scheme, _, value = auth.partition(" ")
            given = value.strip() if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(given.encode(), expected)

    async def traces(request: web.Request) -> web.Response:
        stats.requests += 1
        ctype = request.content_type
        if not authorized(request):
            return error(
                ctype if ctype in (PROTOBUF, JSON) else JSON,
                401,
                _UNAUTHENTICATED,
                "a valid token is required (X-Sigil-Token or Authorization: Bearer)",
            )
        if ctype not in (PROTOBUF, JSON):
            return error(JSON, 415, _INVALID_ARGUMENT, f"Content-Type must be {PROTOBUF} or {JSON}")
        if request.content_length is not None and request.content_length > max_body_bytes:
            return error(
                ctype, 413, _RESOURCE_EXHAUSTED, f"the body is over {max_body_bytes} bytes"
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(
                ctype, 413, _RESOURCE_EXHAUSTED, f"the body is over {max_body_bytes} bytes"
            )
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        try:
            if encoding == "gzip":
                if len(body) > _INLINE_DECODE_BYTES:
                    # Many small members cost Python-level work: off the loop.
                    body = await asyncio.to_thread(gunzip, body, max_body_bytes)
                else:
                    body = gunzip(body, max_body_bytes)
            elif encoding not in ("", "identity"):
                return error(
                    ctype, 415, _INVALID_ARGUMENT, f"Content-Encoding {encoding!r} is not gzip"
                )
            if len(body) > _INLINE_DECODE_BYTES:
                # Decoded without the GIL on a worker: the loop reads the next request.
                batch = await asyncio.to_thread(decode_request, body, ctype == PROTOBUF)
            else:
                batch = decode_request(body, ctype == PROTOBUF)
        except PayloadTooLarge as exc:
            return error(ctype, 413, _RESOURCE_EXHAUSTED, str(exc))
        except MalformedPayload as exc:
            return error(ctype, 400, _INVALID_ARGUMENT, str(exc))
        try:
            result = sink.ingest(batch)
        except OSError as exc:
            # The log cannot be opened (permissions, a hostile path): the exporter
            # retries, and what was written before is deduplicated.
            return error(ctype, 503, _UNAVAILABLE, f"cannot write the session log: {exc}")
        stats.add(result)
        if result.busy:
            names = ", ".join(result.busy_sessions[:5])
            return error(
                ctype,
                503,
                _UNAVAILABLE,
                f"{result.busy} spans refused: another writer holds session(s) {names}",
                **{"Retry-After": "5"},
            )
        if result.archived:
            names = ", ".join(result.archived_sessions[:5])
            message = (
                f"{result.archived} spans rejected: session(s) {names} are archived "
                "(sigil logs archive); their IDs name those histories"
            )
            return web.Response(
                body=_partial_success(ctype, result.archived, message), content_type=ctype
            )
        if ctype == JSON:
            return web.Response(body=b"{}", content_type=JSON)
        # An ExportTraceServiceResponse without partial_success: no bytes at all.
        return web.Response(body=b"", content_type=PROTOBUF)

    # aiohttp's own bound is one byte above ours, so the handler's check decides.
    app = web.Application(client_max_size=max_body_bytes + 1)
    app.router.add_post(TRACES_PATH, traces)
    return app


async def _close_idle(sink: SessionSink, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        sink.close_idle()


async def serve(
    host: str,
    port: int,
    log_path: str | Path | None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    idle_seconds: float = 60.0,
    on_ready: Callable[[str, int], None] | None = None,
    stop: asyncio.Event | None = None,
    pricer: Pricer | None = None,
    token: str | None = None,
) -> CollectorStats:
    """Serve until SIGINT/SIGTERM (or ``stop``), then end every open session's run."""
    from aiohttp import web

    sink = SessionSink(log_path, idle_seconds=idle_seconds, pricer=pricer)
    # Load the price table while the server starts, not on the first span's path.
    sink.pricer.warm()
    stats = CollectorStats()
    app = build_app(sink, max_body_bytes=max_body_bytes, stats=stats, token=token)
    # The body is inflated here (gunzip), bounded, rather than by aiohttp.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False)
    await runner.setup()
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    closer: asyncio.Task[Any] | None = None
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = port
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            bound = sockets[0].getsockname()[1]
        if on_ready is not None:
            on_ready(host, bound)
        closer = asyncio.create_task(_close_idle(sink, max(0.05, min(idle_seconds / 2, 5.0))))
        await stop.wait()
    finally:
        if closer is not None:
            closer.cancel()
        await runner.cleanup()
        try:
            sink.close()
        except OSError as exc:  # pragma: no cover - a failing disk at exit
            print(f"sigil collect: closing the sessions failed: {exc}", file=sys.stderr)
    return stats
