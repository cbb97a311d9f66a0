"""Where spans go and how: endpoints, headers, and sending through the OpenTelemetry SDK."""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sigil.telemetry.otlp.reader import ReadStats, iter_session_entries
from sigil.telemetry.otlp.spans import SCHEMA_URL, SpanBuilder, SpanRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter


INSTALL_HINT = "pip install 'sigil[otlp]'"
PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_PROTOCOL = "http/protobuf"
TRACES_PATH = "/v1/traces"

_REFUSED = "the collector did not accept the spans"


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
# Endpoints and headers


def traces_endpoint(endpoint: str, protocol: str = DEFAULT_PROTOCOL) -> str:
    """The URL spans are sent to.

    For OTLP/HTTP, ``endpoint`` is a base URL as in ``OTEL_EXPORTER_OTLP_ENDPOINT``
    and ``/v1/traces`` is appended, unless it already ends with it. For gRPC the
    URL is used as it is (``http://`` means no TLS). Raises ``ValueError`` with a
    one-line message for anything that is not an http(s) URL with a host.
    """
    text = endpoint.strip()
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:  # what urllib cannot split: ``http://[::1``, ``http://[zz]``
        raise ValueError(f"invalid OTLP endpoint {endpoint!r}: {exc}") from None
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
    #: the tokens of the events the spans carry: the native model's total of
    #: the events read (:func:`export_session` sets it), never re-added here
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


@dataclass(slots=True)
class SessionExport:
    """What :func:`export_session` did: the send's result, what was read, and
    whether the session was still running (its last trace then goes out open)."""

    result: ExportResult
    read: ReadStats
    running: bool


def export_session(
    directory: Path,
    session_id: str,
    url: str,
    headers: Mapping[str, str],
    protocol: str = DEFAULT_PROTOCOL,
    *,
    timeout: float = 10.0,
) -> SessionExport:
    """Send a session's log, read from ``directory``, as traces (``sigil export``).

    A held lock means a run is in progress: its open spans go out as they are
    now (status unset) and a later export completes them under the same IDs.
    """
    from sigil.core.locks import is_session_locked

    running = is_session_locked(directory)
    stats = ReadStats()
    builder = SpanBuilder(session_id)

    def records() -> Iterator[SpanRecord]:
        for entry in iter_session_entries(directory, stats):
            yield from builder.feed(entry)
        yield from builder.finish("running" if running else "incomplete")

    result = export_records(records(), url, headers, protocol, timeout=timeout)
    result.tokens = builder.tokens
    return SessionExport(result, stats, running)
