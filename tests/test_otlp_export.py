"""OTLP export: the span mapping, ``sigil export`` and the live exporter.

Everything that is sent goes to real OTLP receivers that these tests start on
127.0.0.1 -- an HTTP server answering ``POST /v1/traces`` and a gRPC server --
and is decoded with ``opentelemetry-proto``, as a collector would. The CLI runs
as a real subprocess; sessions come from the real ``sigil orchestrate`` (with
misbehaving steps plugged in from ``config.yaml``, see ``orchestrate_steps.py``)
or from :class:`ExecutionLogger` driven the way the orchestrator drives it.
"""

from __future__ import annotations

import gzip
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from conftest import isolated_env, run_cli
from sigil.telemetry.execution_logger import ExecutionLogger
from sigil.telemetry.log_parser import fold_session
from sigil.telemetry.otlp import (
    SCHEMA_URL,
    LiveOtlpExporter,
    SpanBuilder,
    session_spans,
    span_id_for,
    trace_id_for,
)

SIGIL = [sys.executable, "-m", "sigil"]
FAST_RETRIES = "errors:\n  max_retries: 3\n  backoff_base: 0.001\n  backoff_max: 0.01\n"
STEPS = ["routing", "memory", "planning", "reasoning", "contracts", "validation"]


# -- receivers -----------------------------------------------------------------------------


@dataclass
class Received:
    """What a receiver got: decoded requests, with their headers and arrival times."""

    requests: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spans(self) -> list[tuple[dict[str, Any], Any, Span]]:
        """(resource attributes, scope, span) for every span received."""
        out = []
        with self.lock:
            for request in self.requests:
                for rs in request.resource_spans:
                    resource = attrs(rs.resource.attributes)
                    for ss in rs.scope_spans:
                        out.extend((resource, ss, span) for span in ss.spans)
        return out


class HttpReceiver:
    """An OTLP/HTTP receiver: ``POST /v1/traces`` with a protobuf body.

    ``script`` is the status to answer for each request in turn (then 200), with
    optional headers, e.g. ``[(503, {}), (503, {"Retry-After": "0.2"})]``;
    ``delay`` makes every answer slow.
    """

    def __init__(
        self, script: list[tuple[int, dict[str, str]]] | None = None, delay: float = 0.0
    ) -> None:
        self.got = Received()
        self.attempts: list[float] = []
        self.script = list(script or [])
        self.delay = delay
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.attempts.append(time.monotonic())
                if receiver.delay:
                    time.sleep(receiver.delay)
                if self.path != "/v1/traces":
                    self._answer(404, b"", {})
                    return
                if receiver.script:
                    status, headers = receiver.script.pop(0)
                    self._answer(status, b"", headers)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                with receiver.got.lock:
                    receiver.got.requests.append(request)
                    receiver.got.headers.append({k.lower(): v for k, v in self.headers.items()})
                    receiver.got.times.append(time.monotonic())
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self._answer(200, reply, {"Content-Type": "application/x-protobuf"})

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GrpcReceiver:
    """An OTLP/gRPC receiver (the collector's TraceService on 127.0.0.1)."""

    def __init__(self) -> None:
        import grpc

        self.got = Received()
        got = self.got

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # gRPC's method name
                with got.lock:
                    got.requests.append(request)
                    got.headers.append(dict(context.invocation_metadata()))
                    got.times.append(time.monotonic())
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.stop(None)


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    r = HttpReceiver()
    yield r
    r.close()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


def hex_id(raw: bytes) -> str:
    return raw.hex()


# -- running the CLI -----------------------------------------------------------------------


def sigil(
    home: Path, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return run_cli(home, *args, timeout=timeout, **env)


def export(
    home: Path, sid: str, url: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return sigil(home, "export", "--session", sid, "--endpoint", url, *args, **env)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def session_dir(home: Path, sid: str) -> Path:
    return home / "logs" / "sessions" / sid


def log_events(home: Path, sid: str) -> list[dict[str, Any]]:
    path = session_dir(home, sid) / "execution.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def ts_ns(text: str) -> int:
    moment = datetime.fromisoformat(text)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


# -- a session written the way the orchestrator writes it --------------------------------


def log_pipeline(logger: ExecutionLogger, hook: Any = None, steps: int = 6) -> int:
    """One run of the orchestrator's event stream, retries and a budget warning
    included; ``hook`` sees every event as the orchestrator's would. Returns the
    tokens logged."""
    total = 0

    def log(kind: str, component: str, message: str, tokens: int = 0, **meta: Any) -> None:
        nonlocal total
        seq = logger.log_event_sync(kind, component, message, tokens, meta)
        total += tokens
        if hook is not None:
            hook(
                {
                    "event_type": kind,
                    "component": component,
                    "message": message,
                    "tokens": tokens,
                    "metadata": meta,
                    "seq": seq,
                }
            )

    log(
        "session_start",
        "orchestrator",
        "Starting pipeline",
        task="t",
        budget=2000,
        allocations={s: 1000 for s in STEPS},
        run=1,
        provider="offline",
        model="m-1",
        thresholds={"warning": 0.5, "critical": 0.8, "exceeded": 0.95},
    )
    for index, step in enumerate(STEPS[:steps]):
        log("step_start", step, f"{step} started", run=1)
        if step == "reasoning":
            for attempt in (1, 2):
                log("token_consumption", step, "failed attempt", 50, attempt=attempt)
                log(
                    "retry_attempt",
                    step,
                    "StepError: timed out",
                    attempt=attempt,
                    error="timed out",
                    error_type="StepError",
                    retry_delay_s=0.001,
                    latency_ms=1.0,
                    attempt_latency_ms=0.5,
                )
            log(
                "step_complete",
                step,
                "done",
                300,
                attempt=3,
                latency_ms=3.0,
                attempt_latency_ms=0.9,
                input_tokens=200,
                output_tokens=100,
                model="m-1",
            )
            log(
                "budget_warning",
                "orchestrator",
                "50% used",
                scope="session",
                level="elevated",
                total_used=1000,
                budget=2000,
            )
        else:
            log(
                "step_complete",
                step,
                "done",
                100 + index,
                attempt=1,
                latency_ms=0.4,
                attempt_latency_ms=0.4,
                input_tokens=60,
                output_tokens=40 + index,
            )
    log(
        "session_complete",
        "orchestrator",
        "Pipeline completed",
        status="complete",
        run=1,
        total_tokens=total,
    )
    return total


def write_session(log_path: Path, sid: str, steps: int = 6) -> int:
    logger = ExecutionLogger(sid, log_path, sanitizer=False)
    with logger:
        return log_pipeline(logger, steps=steps)


# -- the mapping (pure) --------------------------------------------------------------------


def event(seq: int, t: float, kind: str, component: str, tokens: int = 0, **meta: Any) -> dict:
    return {
        "timestamp": f"2026-01-11T10:00:{t:09.6f}+00:00",
        "session_id": "s",
        "event_type": kind,
        "component": component,
        "message": f"{kind} {component}",
        "tokens": tokens,
        "metadata": meta,
        "seq": seq,
    }


def test_mapping_retries_are_attempt_spans_and_tokens_add_up() -> None:
    events = [
        event(
            0,
            0,
            "session_start",
            "orchestrator",
            budget=500,
            provider="offline",
            model="m",
            run=1,
            allocations={"reasoning": 400},
        ),
        event(1, 1, "step_start", "reasoning", run=1),
        event(2, 2, "token_consumption", "reasoning", 10, attempt=1),
        event(
            3,
            3,
            "retry_attempt",
            "reasoning",
            attempt=1,
            error_type="Timeout",
            retry_delay_s=0.5,
            attempt_latency_ms=2000,
        ),
        event(4, 4, "token_consumption", "reasoning", 20, attempt=2),
        event(
            5,
            5,
            "step_error",
            "reasoning",
            attempt=2,
            error_type="Timeout",
            attempt_latency_ms=1500,
            error="timed out",
        ),
        event(6, 5.5, "token_consumption", "reasoning", 7),  # late: the attempt that just ended
        event(
            7,
            6,
            "session_error",
            "orchestrator",
            status="error",
            total_tokens=37,
            error_type="PipelineError",
        ),
    ]
    spans = session_spans("s", events)
    assert [s.name for s in spans] == [
        "invoke_agent reasoning",
        "invoke_agent reasoning",
        "invoke_workflow sigil",
    ]
    first, second, root = spans
    assert sum(s.tokens for s in spans) == 37
    assert (first.tokens, second.tokens, root.tokens) == (10, 27, 0)
    assert root.attributes["sigil.run.tokens"] == 37
    assert first.parent_span_id == second.parent_span_id == root.span_id
    assert root.parent_span_id is None
    assert {s.trace_id for s in spans} == {trace_id_for("s", 0)}
    assert first.span_id == span_id_for("s", 1) and second.span_id == span_id_for("s", 4)
    assert [first.attributes["sigil.attempt"], second.attributes["sigil.attempt"]] == [1, 2]
    assert first.status == second.status == root.status == "error"
    assert first.attributes["error.type"] == "Timeout"
    assert [e.name for e in first.events] == [
        "sigil.token_consumption",
        "exception",
        "sigil.retry_attempt",
    ]
    base = ts_ns("2026-01-11T10:00:00+00:00")
    sec = 1_000_000_000
    assert (first.start_ns, first.end_ns) == (base + 1 * sec, base + 3 * sec)
    # The retry started when its delay ran out, then its own latency corrected it.
    assert (second.start_ns, second.end_ns) == (base + 3 * sec + sec // 2, base + 5 * sec)
    assert (root.start_ns, root.end_ns) == (base, base + 6 * sec)
    assert second.attributes["sigil.budget.allocation"] == 400
    assert second.attributes["gen_ai.provider.name"] == "offline"


def test_mapping_old_logs_incomplete_runs_and_stable_ids() -> None:
    # The spec's sample: step_complete only, no session_start, no end.
    events = [
        event(0, 1.0, "step_complete", "routing", 50, latency_ms=1000),
        event(1, 2.5, "step_complete", "memory", 150, latency_ms=500),
        event(2, 3.0, "step_start", "reasoning"),
    ]
    spans = session_spans("old", events)
    routing, _memory, reasoning, root = spans
    assert routing.end_ns - routing.start_ns == 1_000_000_000
    assert root.start_ns == routing.start_ns  # the root covers its children
    assert root.attributes["sigil.run.status"] == "incomplete"
    assert root.status == reasoning.status == "error"
    assert sum(s.tokens for s in spans) == 200
    running = session_spans("old", events, run_state="running")
    assert running[-1].status == "unset" and running[-1].attributes["sigil.run.status"] == "running"
    again = session_spans("old", events)
    assert [(s.trace_id, s.span_id) for s in again] == [(s.trace_id, s.span_id) for s in spans]
    assert len({s.span_id for s in spans}) == len(spans)


def test_mapping_streams_the_same_spans_as_batch() -> None:
    events = [event(i, i, "step_complete", STEPS[i % 6], i) for i in range(50)]
    builder = SpanBuilder("s")
    streamed = [span for e in events for span in builder.feed(e)] + builder.finish()
    assert streamed == session_spans("s", events)
    assert builder.tokens == sum(range(50)) == sum(s.tokens for s in streamed)


# -- sigil export against the real orchestrator -------------------------------------------


def test_export_of_orchestrated_session(tmp_path: Path, receiver: HttpReceiver) -> None:
    home = tmp_path / "home"
    home.mkdir()
    sid = "acme-otlp"
    # Run 1: reasoning fails twice (transient) then works, and crosses 50 % of the budget.
    config = home / "config.yaml"
    config.write_text(
        FAST_RETRIES + "pipeline:\n  steps:\n    reasoning: orchestrate_steps:FlakyReasoning\n"
    )
    first = sigil(home, "orchestrate", "--task", "Analyze Acme", "--session", sid, "-b", "2000")
    assert first.returncode == 0, first.stderr
    # Run 2 of the same session: reasoning fails for good.
    config.write_text(
        FAST_RETRIES + "pipeline:\n  steps:\n    reasoning: orchestrate_steps:FailingReasoning\n"
    )
    second = sigil(home, "orchestrate", "--task", "Analyze Acme", "--session", sid, "-b", "2000")
    assert second.returncode == 1, second.stderr
    config.unlink()

    proc = export(home, sid, receiver.url)
    assert proc.returncode == 0, proc.stderr
    assert one_line(proc.stdout).startswith(f"exported session {sid}: ")
    assert proc.stderr == ""

    received = receiver.got.spans()
    spans = [span for _, _, span in received]
    roots = [s for s in spans if not s.parent_span_id]
    assert len(roots) == 2  # one trace per run
    assert len({s.trace_id for s in spans}) == 2
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans)
    for span in spans:
        if span.parent_span_id:
            parent = by_id[span.parent_span_id]
            assert not parent.parent_span_id and parent.trace_id == span.trace_id

    # Contract 2: sigil.tokens over all spans == the log == tokens.json == the fold.
    tokens = sum(attrs(s.attributes)["sigil.tokens"] for s in spans)
    total = json.loads((session_dir(home, sid) / "tokens.json").read_text())["total_used"]
    events = log_events(home, sid)
    assert tokens == total == sum(e["tokens"] for e in events)
    assert fold_session(sid, home / "logs").tokens_used == total

    run1, run2 = sorted(roots, key=lambda s: s.start_time_unix_nano)
    r1 = attrs(run1.attributes)
    assert run1.name == "invoke_workflow sigil" and run1.kind == Span.SPAN_KIND_INTERNAL
    assert r1["gen_ai.operation.name"] == "invoke_workflow"
    assert r1["gen_ai.conversation.id"] == sid
    assert r1["gen_ai.provider.name"] == "offline"
    assert r1["sigil.run"] == 1 and r1["sigil.run.status"] == "complete"
    assert r1["sigil.budget.total"] == 2000
    assert r1["sigil.budget.used"] + r1["sigil.budget.remaining"] == 2000
    assert run1.status.code == Status.STATUS_CODE_UNSET
    assert "sigil.budget_warning" in [e.name for e in run1.events]
    starts = [e for e in events if e["event_type"] == "session_start"]
    finals = [e for e in events if e["event_type"] in ("session_complete", "session_error")]
    assert run1.start_time_unix_nano == ts_ns(starts[0]["timestamp"])
    assert run1.end_time_unix_nano == ts_ns(finals[0]["timestamp"])

    children = [s for s in spans if s.trace_id == run1.trace_id and s.parent_span_id]
    names = [s.name for s in sorted(children, key=lambda s: s.start_time_unix_nano)]
    assert names == [f"invoke_agent {step}" for step in STEPS[:3]] + [
        "invoke_agent reasoning"
    ] * 3 + [f"invoke_agent {step}" for step in STEPS[4:]]
    reasoning = sorted(
        (s for s in children if s.name == "invoke_agent reasoning"),
        key=lambda s: s.start_time_unix_nano,
    )
    for number, span in enumerate(reasoning, 1):
        a = attrs(span.attributes)
        assert a["sigil.attempt"] == number
        assert a["gen_ai.agent.name"] == "reasoning"
        assert a["gen_ai.operation.name"] == "invoke_agent"
        # The spec's 150,000 of 256,000, scaled to this session's 2,000 budget.
        assert a["sigil.budget.allocation"] == 150_000 * 2_000 // 256_000
    failed = reasoning[:2]
    assert all(s.status.code == Status.STATUS_CODE_ERROR for s in failed)
    assert all(attrs(s.attributes)["error.type"] == "StepError" for s in failed)
    assert all({"exception", "sigil.retry_attempt"} <= {e.name for e in s.events} for s in failed)
    assert all(attrs(s.attributes)["sigil.tokens"] == 50 for s in failed)  # FAILED_ATTEMPT_USAGE
    ok = attrs(reasoning[2].attributes)
    assert reasoning[2].status.code == Status.STATUS_CODE_UNSET
    assert ok["gen_ai.usage.input_tokens"] + ok["gen_ai.usage.output_tokens"] == ok["sigil.tokens"]
    assert ok["gen_ai.request.model"]
    assert reasoning[0].end_time_unix_nano <= reasoning[1].start_time_unix_nano

    r2 = attrs(run2.attributes)
    assert r2["sigil.run"] == 2 and r2["sigil.run.status"] == "error"
    assert run2.status.code == Status.STATUS_CODE_ERROR
    failing = [s for s in spans if s.trace_id == run2.trace_id and s.name.endswith("reasoning")]
    assert [s.status.code for s in failing] == [Status.STATUS_CODE_ERROR]

    resource, scope, _ = received[0]
    assert resource["service.name"] == "sigil"
    assert scope.schema_url == SCHEMA_URL and scope.scope.name == "sigil"

    # Exporting again yields the same IDs: the backend sees the same traces again.
    again = HttpReceiver()
    try:
        proc = export(home, sid, again.url)
        assert proc.returncode == 0, proc.stderr
        ids = {(s.trace_id, s.span_id, s.parent_span_id) for _, _, s in again.got.spans()}
    finally:
        again.close()
    assert ids == {(s.trace_id, s.span_id, s.parent_span_id) for s in spans}


# -- sigil export: the collector misbehaves ------------------------------------------------


def test_export_retries_503_with_backoff(tmp_path: Path) -> None:
    home = tmp_path / "home"
    total = write_session(home / "logs", "s503")
    receiver = HttpReceiver(script=[(503, {}), (503, {"Retry-After": "0.2"})])
    try:
        proc = export(home, "s503", receiver.url)
        attempts = receiver.attempts
        spans = receiver.got.spans()
    finally:
        receiver.close()
    assert proc.returncode == 0, proc.stderr
    assert len(attempts) == 3
    # Exponential backoff starts at 1 s (+-20 % jitter); Retry-After wins when given.
    assert attempts[1] - attempts[0] >= 0.75
    assert attempts[2] - attempts[1] >= 0.15  # Retry-After: 0.2 (SDKs that honour it)
    assert sum(attrs(s.attributes)["sigil.tokens"] for _, _, s in spans) == total


def test_export_to_a_slow_collector(tmp_path: Path) -> None:
    home = tmp_path / "home"
    total = write_session(home / "logs", "slow")
    receiver = HttpReceiver(delay=1.0)
    try:
        started = time.monotonic()
        proc = export(home, "slow", receiver.url, "--timeout", "10")
        elapsed = time.monotonic() - started
        spans = receiver.got.spans()
    finally:
        receiver.close()
    assert proc.returncode == 0, proc.stderr
    assert elapsed >= 1.0
    assert sum(attrs(s.attributes)["sigil.tokens"] for _, _, s in spans) == total


def test_export_refused_says_why(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_session(home / "logs", "deny", steps=2)
    receiver = HttpReceiver(script=[(401, {})])
    try:
        proc = export(home, "deny", receiver.url)
    finally:
        receiver.close()
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert line.startswith("Error: export to ") and "401" in line
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--endpoint", "http://127.0.0.1:{closed}"], 1, "cannot connect to the collector"),
        (["--endpoint", "localhost:4318"], 2, "expected an http:// or https:// URL"),
        (["--endpoint", "http://127.0.0.1:99999"], 2, "bad port"),
        (["--endpoint", "{url}", "--session", "nope"], 2, "no session 'nope'"),
        (["--endpoint", "{url}", "--session", "../etc"], 2, "invalid session ID"),
        (["--endpoint", "{url}", "--header", "Authorization"], 2, "expected KEY=VALUE"),
        (["--endpoint", "{url}", "--header", "Bad Name=x"], 2, "invalid header name"),
        (["--endpoint", "{url}", "--protocol", "http/json"], 2, "--protocol must be"),
        (["--endpoint", "{url}", "--timeout", "0"], 2, "--timeout must be"),
        ([], 2, "no OTLP endpoint"),
    ],
)
def test_export_bad_input_is_one_line(
    tmp_path: Path, receiver: HttpReceiver, args: list[str], code: int, expected: str
) -> None:
    home = tmp_path / "home"
    write_session(home / "logs", "known", steps=1)
    args = [a.format(closed=closed_port(), url=receiver.url) for a in args]
    if "--session" not in args:
        args = ["--session", "known", *args]
    proc = sigil(home, "export", *args)
    assert proc.returncode == code, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith("Error: ") and expected in line, line
    assert proc.stdout == ""
    assert receiver.got.requests == []


def test_export_without_the_extra_says_how_to_install(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    home = tmp_path / "home"
    write_session(home / "logs", "noextra", steps=1)
    # The packages are installed here: hide them from this one process.
    code = (
        "import sys; sys.modules['opentelemetry.sdk'] = None;"
        "sys.modules['opentelemetry.exporter'] = None;"
        "from sigil.interfaces.cli.main import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "export", "--session", "noextra", "--endpoint", receiver.url],
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "pip install 'sigil[otlp]'" in one_line(proc.stderr)


def test_export_headers_from_flags_env_and_config(tmp_path: Path, receiver: HttpReceiver) -> None:
    home = tmp_path / "home"
    write_session(home / "logs", "hdr", steps=1)
    (home / "config.yaml").write_text(
        f"export:\n  otlp_endpoint: {receiver.url}\n  otlp_headers:\n    x-from-config: c\n"
    )
    proc = sigil(
        home,
        "export",
        "--session",
        "hdr",
        "-H",
        "Authorization=Bearer abc",
        OTEL_EXPORTER_OTLP_HEADERS="x-tenant=acme%20corp",
    )
    assert proc.returncode == 0, proc.stderr
    headers = receiver.got.headers[0]
    assert headers["authorization"] == "Bearer abc"
    # An environment variable replaces the config file's value (contract 9).
    assert headers["x-tenant"] == "acme corp" and "x-from-config" not in headers


def test_export_over_grpc(tmp_path: Path) -> None:
    home = tmp_path / "home"
    total = write_session(home / "logs", "grpc-s")
    grpc_receiver = GrpcReceiver()
    try:
        proc = export(home, "grpc-s", grpc_receiver.url, "--protocol", "grpc", "-H", "X-Token=t1")
        spans = grpc_receiver.got.spans()
        headers = grpc_receiver.got.headers
    finally:
        grpc_receiver.close()
    assert proc.returncode == 0, proc.stderr
    assert sum(attrs(s.attributes)["sigil.tokens"] for _, _, s in spans) == total
    assert headers[0]["x-token"] == "t1"


# -- the live exporter ---------------------------------------------------------------------


def span_shape(spans: list[Span], times: bool = False) -> set[tuple[Any, ...]]:
    return {
        (
            s.trace_id,
            s.span_id,
            s.parent_span_id,
            s.name,
            s.status.code,
            attrs(s.attributes)["sigil.tokens"],
            (s.start_time_unix_nano, s.end_time_unix_nano) if times else None,
        )
        for s in spans
    }


def flaky_config(home: Path) -> None:
    (home / "config.yaml").write_text(
        FAST_RETRIES + "pipeline:\n  steps:\n    reasoning: orchestrate_steps:FlakyReasoning\n"
    )


def test_live_export_follows_a_real_orchestrator(tmp_path: Path, receiver: HttpReceiver) -> None:
    """The exporter follows the log that ``sigil orchestrate`` writes (in another
    process here): it sends the spans of the run it saw start, exactly as a later
    ``sigil export`` sends them, times included."""
    home = tmp_path / "home"
    home.mkdir()
    flaky_config(home)
    sid = "follow-1"
    first = sigil(home, "orchestrate", "--task", "Analyze Acme", "--session", sid, "-b", "5000")
    assert first.returncode == 0, first.stderr
    live = LiveOtlpExporter(sid, receiver.url, log_path=home / "logs", schedule_delay=0.1)
    live.on_event({"event_type": "ignored"})  # a no-op when following the log
    second = sigil(home, "orchestrate", "--task", "Analyze Acme", "--session", sid, "-b", "5000")
    assert second.returncode == 0, second.stderr
    report = live.shutdown(timeout=10)
    assert report.complete and report.spans_failed == 0, report
    live_spans = [s for _, _, s in receiver.got.spans()]
    assert report.spans_sent == len(live_spans) > 0
    # Only run 2 went out live: one root, and it is run 2's.
    roots = [s for s in live_spans if not s.parent_span_id]
    assert [attrs(r.attributes)["sigil.run"] for r in roots] == [2]

    later = HttpReceiver()
    try:
        proc = export(home, sid, later.url)
        batch_spans = [s for _, _, s in later.got.spans()]
    finally:
        later.close()
    assert proc.returncode == 0, proc.stderr
    run2 = [s for s in batch_spans if s.trace_id == roots[0].trace_id]
    assert span_shape(live_spans, times=True) == span_shape(run2, times=True)
    tokens = json.loads((session_dir(home, sid) / "tokens.json").read_text())["total_used"]
    assert sum(attrs(s.attributes)["sigil.tokens"] for s in batch_spans) == tokens


def test_live_export_collector_down_then_export_completes(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    """A collector that is down changes nothing for the pipeline; the report names
    the command, and running it later completes the trace."""
    home = tmp_path / "home"
    home.mkdir()
    flaky_config(home)
    sid = "down-follow"
    dead = f"http://127.0.0.1:{closed_port()}"
    live = LiveOtlpExporter(
        sid, dead, log_path=home / "logs", schedule_delay=0.05, export_timeout=1.0
    )
    started = time.monotonic()
    proc = sigil(home, "orchestrate", "--task", "Analyze Acme", "--session", sid, "-b", "2000")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 20
    started = time.monotonic()
    report = live.shutdown(timeout=2.0)
    assert time.monotonic() - started < 3.5
    assert not report.complete and report.spans_sent == 0 and report.spans_failed > 0
    assert report.resend_command == f"sigil export --session {sid} --log-path {home / 'logs'}"
    assert report.resend_command in report.summary()
    assert live.shutdown() is report  # idempotent

    proc = export(home, sid, receiver.url)
    assert proc.returncode == 0, proc.stderr
    spans = [s for _, _, s in receiver.got.spans()]
    tokens = json.loads((session_dir(home, sid) / "tokens.json").read_text())["total_used"]
    assert sum(attrs(s.attributes)["sigil.tokens"] for s in spans) == tokens
    assert len([s for s in spans if not s.parent_span_id]) == 1


def test_live_export_through_on_event_matches_a_later_export(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    """The queue mode: events handed over by the caller, as an orchestrator hook would."""
    home = tmp_path / "home"
    log_path = home / "logs"
    live = LiveOtlpExporter(
        "live-1", receiver.url, log_path=log_path, schedule_delay=0.1, follow_log=False
    )
    logger = ExecutionLogger("live-1", log_path)
    with logger:
        total = log_pipeline(logger, hook=live.on_event)
    report = live.shutdown(timeout=10)
    assert report.complete, report
    live_spans = [s for _, _, s in receiver.got.spans()]
    assert report.spans_sent == len(live_spans) > 0 and report.spans_failed == 0
    assert sum(attrs(s.attributes)["sigil.tokens"] for s in live_spans) == total

    later = HttpReceiver()
    try:
        proc = export(home, "live-1", later.url)
        batch_spans = [s for _, _, s in later.got.spans()]
    finally:
        later.close()
    assert proc.returncode == 0, proc.stderr
    assert span_shape(live_spans) == span_shape(batch_spans)


def test_live_export_on_event_never_blocks_with_collector_down(tmp_path: Path) -> None:
    log_path = tmp_path / "logs"
    dead = f"http://127.0.0.1:{closed_port()}"
    live = LiveOtlpExporter(
        "down-1",
        dead,
        log_path=log_path,
        schedule_delay=0.05,
        export_timeout=1.0,
        follow_log=False,
    )
    logger = ExecutionLogger("down-1", log_path, sanitizer=False)
    with logger:
        log_pipeline(logger, hook=live.on_event)
        time.sleep(0.3)  # let the thread meet the dead collector mid-run
        # A burst of 10,000 events: each call is a deque append, whatever the collector.
        event = {"event_type": "token_consumption", "component": "reasoning", "message": "m",
                 "tokens": 0, "metadata": {}, "seq": None}  # fmt: skip
        started = time.perf_counter()
        for _ in range(10_000):
            live.on_event(event)
        burst_seconds = time.perf_counter() - started
    assert burst_seconds < 0.5, burst_seconds  # ~3 ms expected; generous for loaded CI
    started = time.monotonic()
    report = live.shutdown(timeout=2.0)
    assert time.monotonic() - started < 3.5
    assert not report.complete and report.spans_sent == 0 and report.spans_failed > 0


def test_live_export_queue_bound_counts_drops(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    live = LiveOtlpExporter(
        "bound",
        dead,
        log_path=tmp_path,
        max_queue=100,
        schedule_delay=60,
        export_timeout=0.5,
        prime=False,
        follow_log=False,
    )
    for seq in range(250):
        live.on_event({"event_type": "step_complete", "component": "routing", "message": "m",
                       "tokens": 1, "metadata": {}, "seq": seq})  # fmt: skip
    report = live.shutdown(timeout=2.0)
    assert report.events_dropped == 150
    assert not report.complete and "sigil export --session bound" in report.summary()


def test_live_export_scrubs_handed_over_secrets(tmp_path: Path, receiver: HttpReceiver) -> None:
    live = LiveOtlpExporter(
        "scrub", receiver.url, log_path=tmp_path, schedule_delay=0.05, follow_log=False
    )
    secret = "sk-proj-" + "a1B2c3D4e5F6g7H8i9J0" * 2
    for seq, (kind, message, meta) in enumerate(
        [
            ("session_start", "go", {}),
            ("token_consumption", f"key {secret}", {"api_key": secret}),
            ("session_complete", "ok", {"status": "complete"}),
        ]
    ):
        live.on_event({"event_type": kind, "component": "orchestrator", "message": message,
                       "tokens": 3, "metadata": meta, "seq": seq})  # fmt: skip
    report = live.shutdown(timeout=5)
    assert report.complete, report
    wire = b"".join(r.SerializeToString() for r in receiver.got.requests)
    assert secret.encode() not in wire and b"REDACTED" in wire


def test_orchestrate_export_otlp_flag_sends_the_run_live(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    """`sigil orchestrate --export-otlp` sends the run's spans while it runs; the
    spans' tokens add up to tokens.json."""
    home = tmp_path / "home"
    home.mkdir()
    sid = "flag-live"
    proc = sigil(
        home,
        "orchestrate", "--task", "Analyze Acme", "--session", sid, "--export-otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "OTLP" not in proc.stderr  # complete: nothing to report
    spans = [s for _, _, s in receiver.got.spans()]
    tokens = json.loads((session_dir(home, sid) / "tokens.json").read_text())["total_used"]
    assert spans and sum(attrs(s.attributes)["sigil.tokens"] for s in spans) == tokens


def test_orchestrate_export_otlp_with_the_collector_down(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    """A dead collector leaves the pipeline's result unchanged; the run says what
    was not sent and how to send it, and that command completes the trace."""
    home = tmp_path / "home"
    home.mkdir()
    baseline = sigil(home, "orchestrate", "--task", "Analyze Acme", "--session", "plain", "--json")
    assert baseline.returncode == 0, baseline.stderr
    sid = "flag-down"
    dead = f"http://127.0.0.1:{closed_port()}"
    proc = sigil(
        home,
        "orchestrate", "--task", "Analyze Acme", "--session", sid, "--export-otlp", "--json",
        OTEL_EXPORTER_OTLP_ENDPOINT=dead,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result, plain = json.loads(proc.stdout), json.loads(baseline.stdout)
    assert result["total_tokens"] == plain["total_tokens"]
    assert result["final_output"] == plain["final_output"]
    resend = f"sigil export --session {sid} --log-path {home / 'logs'}"
    assert resend in proc.stderr
    later = export(home, sid, receiver.url)
    assert later.returncode == 0, later.stderr
    spans = [s for _, _, s in receiver.got.spans()]
    tokens = json.loads((session_dir(home, sid) / "tokens.json").read_text())["total_used"]
    sent = sum(attrs(s.attributes)["sigil.tokens"] for s in spans)
    assert sent == tokens == result["total_tokens"]


def test_export_counts_tokens_like_every_other_reader(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    """A line over the readers' limit is skipped by the fold and the monitor; the
    export skips it too, so the three agree on the session's tokens."""
    from sigil.telemetry.log_parser import MAX_LINE_BYTES, fold_session

    home = tmp_path / "home"
    log_path = home / "logs"
    write_session(log_path, "big-line")
    log_file = session_dir(home, "big-line") / "execution.jsonl"
    huge = json.dumps(
        {"timestamp": "2026-01-11T10:15:40+00:00", "session_id": "big-line",
         "event_type": "token_consumption", "component": "reasoning",
         "message": "x" * (MAX_LINE_BYTES + 10), "tokens": 1000, "metadata": {}}
    )  # fmt: skip
    with open(log_file, "a") as f:
        f.write(huge + "\n")
    proc = export(home, "big-line", receiver.url)
    assert proc.returncode == 0, proc.stderr
    spans = [s for _, _, s in receiver.got.spans()]
    summary = fold_session("big-line", log_path)
    assert summary.oversize_lines == 1
    assert sum(attrs(s.attributes)["sigil.tokens"] for s in spans) == summary.tokens_used
