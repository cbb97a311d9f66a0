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
  exporter retries, and the spans already written are not written again;
  503 too when a session's log cannot be opened or written (those spans are
  counted as refused: collect then exits 1).

**Descriptors.** collect raises its soft descriptor limit to
``sink.WANTED_FDS`` when the hard limit allows, and the sink bounds its open
and parked sessions by it (``sink.max_open_for``, ``sink.max_parked_for``).
A listener out of descriptors anyway (many connections at once) waits and
retries each second, as asyncio does; collect says so in one line per
minute at most, not a traceback per attempt, and a retry that fires after
the listener closed at shutdown is ignored.

Requests are handled one at a time on the event loop: writing is a hand-off
to the native writer (it waits for the disk only while a burst has filled its
bounded buffer), and one thread owning the sessions keeps each session's
events in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from sigil.collect.decode import MalformedPayload, PayloadTooLarge, decode_request, gunzip
from sigil.collect.sink import IngestResult, SessionSink, raise_fd_limit

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
    #: spans refused because their session's log could not be opened or written
    unwritten: int = 0
    #: events the writers dropped (full or failing disk)
    dropped: int = 0
    #: sessions closed early to bound the open ones
    evicted: int = 0
    #: what went wrong otherwise (closing the sessions, the event loop): each
    #: said in one line on stderr as it happens, counted here (a long-running
    #: collector keeps no list of them)
    errors: int = 0

    @property
    def failed(self) -> bool:
        """Whether spans were lost or refused for a fault of this side (the exit status)."""
        return bool(self.unwritten or self.dropped or self.errors)

    def add(self, result: IngestResult) -> None:
        self.spans += result.spans
        self.written += result.written
        self.duplicates += result.duplicates
        self.ignored += result.ignored
        self.busy += result.busy
        self.archived += result.archived
        self.dropped += result.dropped


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
            stats.unwritten += batch.spans
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


async def _close_idle(sink: SessionSink, period: float, stats: CollectorStats) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            sink.close_idle()
        except OSError as exc:  # a failing disk: said once per close, the loop goes on
            _say(stats, f"closing an idle session failed: {exc}")


#: errnos of a listener out of a resource (asyncio backs off and retries)
_OUT_OF_RESOURCE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: seconds between two "out of descriptors" lines
_RESOURCE_NOTICE_SECONDS = 60.0


def _say(stats: CollectorStats, message: str) -> None:
    stats.errors += 1
    print(f"sigil collect: {message}", file=sys.stderr, flush=True)


class _LoopErrors:
    """The event loop's exception handler: one line per problem, no tracebacks.

    A listener out of descriptors is said once a minute at most (asyncio retries
    it each second); the retry that fires after the listener closed at shutdown
    is ignored; anything else is one line and fails the exit status."""

    def __init__(self, stats: CollectorStats) -> None:
        self.stats = stats
        self.stopping = False
        self.backoffs = 0
        self._noticed = -_RESOURCE_NOTICE_SECONDS

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message") or "event loop error")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCE:
            self.backoffs += 1
            now = loop.time()
            if now - self._noticed >= _RESOURCE_NOTICE_SECONDS:
                self._noticed = now
                print(
                    f"sigil collect: {exc.strerror or exc} accepting connections:"
                    " new connections wait, retried each second (raise `ulimit -n`"
                    " or send from fewer connections)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if self.stopping and isinstance(exc, ValueError | OSError):
            # asyncio's accept retry, scheduled before the listener closed
            return
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        _say(self.stats, f"{message}{detail}".replace("\n", " "))


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
    max_open: int | None = None,
) -> CollectorStats:
    """Serve until SIGINT/SIGTERM (or ``stop``), then end every open session's run.
    ``max_open``: sessions open at once (default: ``sink.max_open_for()``)."""
    from aiohttp import web

    # Room for the sessions' descriptors (the open and parked bounds follow it).
    raise_fd_limit()
    sink = SessionSink(log_path, idle_seconds=idle_seconds, pricer=pricer, max_open=max_open)
    # Load the price table while the server starts, not on the first span's path.
    sink.pricer.warm()
    stats = CollectorStats()
    app = build_app(sink, max_body_bytes=max_body_bytes, stats=stats, token=token)
    # The body is inflated here (gunzip), bounded, rather than by aiohttp.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False)
    await runner.setup()
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    loop_errors = _LoopErrors(stats)
    loop.set_exception_handler(loop_errors)
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
        period = max(0.05, min(idle_seconds / 2, 5.0))
        closer = asyncio.create_task(_close_idle(sink, period, stats))
        await stop.wait()
    finally:
        loop_errors.stopping = True
        if closer is not None:
            closer.cancel()
        await runner.cleanup()
        try:
            sink.close()
        except OSError as exc:  # pragma: no cover - a failing disk at exit
            _say(stats, f"closing the sessions failed: {exc}")
        stats.evicted = sink.evicted
    return stats
