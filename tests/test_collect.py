"""``sigil collect``: OTLP/HTTP in, session logs out.

Real peers only: the ``sigil collect`` command as a subprocess on a free
loopback port, fed by the OpenTelemetry SDK's OTLP/HTTP exporter (protobuf,
plain and gzip), by OTLP/JSON posted with httpx, by ``sigil export`` of a real
``sigil orchestrate`` session, and by the official ``openai`` SDK instrumented
with OpenInference against a loopback OpenAI-compatible server. Totals are read
through the native model (``log_parser.session_history``) and ``sigil monitor``.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import SIGIL, isolated_env, run_cli, run_py, wait_for
from sigil.collect import SessionSink, SpanData, map_span, session_id_for
from sigil.collect.decode import KEPT_ATTRIBUTES as KEPT_KEYS
from sigil.telemetry.log_parser import session_history

pytestmark = pytest.mark.slow

FAST_RETRIES = "errors:\n  max_retries: 3\n  backoff_base: 0.001\n  backoff_max: 0.01\n"


class Collector:
    def __init__(
        self,
        home: Path,
        log_path: Path,
        *args: str,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [*SIGIL, "collect", "--port", "0", "--log-path", str(log_path), *args],
            env=isolated_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on http://" in line, line + self.proc.stderr.read()  # type: ignore[union-attr]
        self.base = line.split("listening on ", 1)[1].strip().removesuffix("/v1/traces")
        self.url = self.base + "/v1/traces"

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return out

    def session_dir(self, sid: str) -> Path:
        return self.log_path / "sessions" / sid


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def collector(home: Path, tmp_path: Path) -> Iterator[Collector]:
    c = Collector(home, tmp_path / "collected", "--idle", "600")
    try:
        yield c
    finally:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


def events(session_dir: Path) -> list[dict[str, Any]]:
    path = session_dir / "execution.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def steps(session_dir: Path) -> list[dict[str, Any]]:
    return [e for e in events(session_dir) if e["event_type"] in ("step_complete", "step_error")]


def wait_tokens(session_dir: Path, tokens: int) -> None:
    wait_for(
        f"{tokens} tokens in {session_dir.name}",
        lambda: session_dir.is_dir() and session_history(session_dir).tokens == tokens,
    )


# -- the OpenTelemetry SDK's OTLP/HTTP exporter (protobuf) ---------------------------------


def _sdk_provider(url: str, *, gzip_body: bool) -> Any:
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "agent"}))
    exporter = OTLPSpanExporter(
        endpoint=url, compression=Compression.Gzip if gzip_body else Compression.NoCompression
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


@pytest.mark.parametrize("gzip_body", [False, True], ids=["protobuf", "protobuf-gzip"])
def test_sdk_exporter_genai_and_openinference_spans(collector: Collector, gzip_body: bool) -> None:
    from opentelemetry.trace import Status, StatusCode

    provider = _sdk_provider(collector.url, gzip_body=gzip_body)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("invoke_agent planner") as agent:
        agent.set_attribute("gen_ai.operation.name", "invoke_agent")
        agent.set_attribute("gen_ai.agent.name", "planner")
        agent.set_attribute("gen_ai.conversation.id", "conv-1")
        for i in range(3):
            with tracer.start_as_current_span("chat gpt-4o") as chat:
                chat.set_attribute("gen_ai.operation.name", "chat")
                chat.set_attribute("gen_ai.conversation.id", "conv-1")
                chat.set_attribute("gen_ai.agent.name", "planner")
                chat.set_attribute("gen_ai.request.model", "gpt-4o")
                chat.set_attribute("gen_ai.response.model", "gpt-4o-2024-08-06")
                chat.set_attribute("gen_ai.usage.input_tokens", 100 + i)
                chat.set_attribute("gen_ai.usage.output_tokens", 20)
        with tracer.start_as_current_span("chat gpt-4o") as failed:
            failed.set_attribute("gen_ai.operation.name", "chat")
            failed.set_attribute("gen_ai.conversation.id", "conv-1")
            failed.set_attribute("gen_ai.usage.input_tokens", 7)
            failed.set_attribute("error.type", "RateLimitError")
            failed.set_status(Status(StatusCode.ERROR, "429 from upstream"))
        # Not a GenAI span: ignored.
        with tracer.start_as_current_span("GET /health") as http:
            http.set_attribute("http.request.method", "GET")
    # OpenInference attributes, grouped by session.id
    with tracer.start_as_current_span("ChatCompletion") as oi:
        oi.set_attribute("openinference.span.kind", "LLM")
        oi.set_attribute("session.id", "oi-session")
        oi.set_attribute("llm.model_name", "gpt-4o-mini")
        oi.set_attribute("llm.token_count.prompt", 11)
        oi.set_attribute("llm.token_count.completion", 5)
        oi.set_attribute("llm.token_count.total", 16)
    assert provider.force_flush(10_000)
    provider.shutdown()

    conv = collector.session_dir("conv-1")
    # 3 chats (100+101+102 + 3*20), the failed call (7); the agent span sums its
    # children's usage only if it reports any (it does not here).
    wait_tokens(conv, 363 + 7)
    # the agent span (no tokens) ends last and may come in a later export batch
    wait_for("the agent span", lambda: len(steps(conv)) == 5)
    done = steps(conv)
    chats = [e for e in done if e["event_type"] == "step_complete" and e["tokens"]]
    assert [e["tokens"] for e in chats] == [120, 121, 122]
    first = chats[0]
    assert first["component"] == "planner"
    meta = first["metadata"]
    assert meta["input_tokens"] == 100 and meta["output_tokens"] == 20
    assert meta["model"] == "gpt-4o-2024-08-06"
    assert meta["latency_ms"] >= 0
    assert len(meta["trace_id"]) == 32 and len(meta["span_id"]) == 16
    errors = [e for e in done if e["event_type"] == "step_error"]
    assert len(errors) == 1
    assert errors[0]["tokens"] == 7 and errors[0]["component"] == "chat"
    assert errors[0]["metadata"]["error_type"] == "RateLimitError"
    assert errors[0]["message"] == "429 from upstream"
    starts = [e for e in events(conv) if e["event_type"] == "step_start"]
    assert len(starts) == len(done) == 5  # 3 chats, the failure, the agent span
    assert not any("health" in e["message"] for e in events(conv))
    # The session is live while collect holds it.
    assert session_history(conv).runs[-1].status == "running"

    oi_dir = collector.session_dir("oi-session")
    wait_tokens(oi_dir, 16)
    (oi_step,) = steps(oi_dir)
    assert oi_step["metadata"]["model"] == "gpt-4o-mini"
    assert oi_step["metadata"]["input_tokens"] == 11
    assert oi_step["component"] == "ChatCompletion"

    out = collector.stop()
    assert "spans received" in out
    # Stopping ends the runs: complete, nothing incomplete.
    history = session_history(conv)
    assert history.tokens == 370
    assert history.runs[-1].status == "complete"


# -- OTLP/JSON with httpx; duplicates; a restart -------------------------------------------


def _json_span(
    trace: str, span: str, *, tokens: tuple[int, int], sid: str | None = None, **extra: Any
) -> dict[str, Any]:
    attrs: list[dict[str, Any]] = [
        {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
        {"key": "gen_ai.request.model", "value": {"stringValue": "llama3"}},
        # 64-bit integers are strings in OTLP/JSON; plain numbers are accepted too
        {"key": "gen_ai.usage.input_tokens", "value": {"intValue": str(tokens[0])}},
        {"key": "gen_ai.usage.output_tokens", "value": {"intValue": tokens[1]}},
    ]
    if sid is not None:
        attrs.append({"key": "gen_ai.conversation.id", "value": {"stringValue": sid}})
    return {
        "traceId": trace,
        "spanId": span,
        "name": "chat llama3",
        "kind": 3,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000000250000000",
        "attributes": attrs,
        "status": {},
        **extra,
    }


def _json_request(*spans: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {
                        "attributes": [{"key": "service.name", "value": {"stringValue": "a"}}]
                    },
                    "scopeSpans": [{"scope": {"name": "t"}, "spans": list(spans)}],
                }
            ]
        }
    )


TRACE = "5b8efff798038103d269b633813fc60c"


def test_json_spans_and_duplicates_counted_once_across_restart(home: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "collected"
    body = _json_request(
        _json_span(TRACE, "eee19b7ec3c1b174", tokens=(40, 2), sid="json-s"),
        _json_span(TRACE, "eee19b7ec3c1b175", tokens=(10, 1), sid="json-s"),
        # no conversation: the trace is the session
        _json_span(TRACE, "eee19b7ec3c1b176", tokens=(5, 5)),
    )
    collector = Collector(home, log_path, "--idle", "600")
    try:
        for _ in range(2):  # a retrying exporter sends the batch again
            r = httpx.post(
                collector.url, content=body, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("application/json")
            assert r.json() == {}
        # gzip too, same spans: still duplicates
        r = httpx.post(
            collector.url,
            content=gzip.compress(body),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        assert r.status_code == 200, r.text
        wait_tokens(collector.session_dir("json-s"), 53)
        wait_tokens(collector.session_dir(TRACE), 10)
        out = collector.stop()
        assert "3 written, 6 duplicates" in out, out
    finally:
        if collector.proc.poll() is None:
            collector.proc.kill()

    (step,) = [e for e in steps(log_path / "sessions" / "json-s") if e["tokens"] == 42]
    assert step["metadata"]["latency_ms"] == 250.0
    assert step["metadata"]["model"] == "llama3"

    # A new collect process: the spans already written are still recognised.
    collector = Collector(home, log_path, "--idle", "600")
    try:
        r = httpx.post(collector.url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200
        new = _json_request(_json_span(TRACE, "0000000000000001", tokens=(1, 1), sid="json-s"))
        r = httpx.post(collector.url, content=new, headers={"Content-Type": "application/json"})
        assert r.status_code == 200
        wait_tokens(collector.session_dir("json-s"), 55)
        out = collector.stop()
        assert "1 written, 3 duplicates" in out, out
    finally:
        if collector.proc.poll() is None:
            collector.proc.kill()
    history = session_history(log_path / "sessions" / "json-s")
    assert history.tokens == 55
    assert [run.status for run in history.runs] == ["complete", "complete"]
    assert [run.tokens for run in history.runs] == [53, 2]


# -- malformed and oversized payloads ------------------------------------------------------


def _nothing_written(log_path: Path) -> bool:
    sessions = log_path / "sessions"
    return not sessions.exists() or not any(sessions.iterdir())


def test_malformed_payloads_get_400_and_nothing_is_written(home: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "collected"
    collector = Collector(home, log_path, "--idle", "600", "--max-body", "0.01")
    pb = {"Content-Type": "application/x-protobuf"}
    js = {"Content-Type": "application/json"}
    good = _json_span(TRACE, "eee19b7ec3c1b174", tokens=(1, 1), sid="m")
    try:
        cases: list[tuple[dict[str, str], bytes]] = [
            (pb, b"\xff\xff\xff\xff garbage"),
            (pb, b"\x0a\x05\x12\x03"),  # truncated nested message
            (js, b"{not json"),
            (js, b"[1, 2]"),
            (js, orjson.dumps({"resourceSpans": {"a": 1}})),
            # one bad span in a batch: the good span before it is not written either
            (js, _json_request(good, _json_span("xyz", "eee19b7ec3c1b175", tokens=(1, 1)))),
            (js, _json_request(good, _json_span(TRACE, "eee19b7e", tokens=(1, 1)))),
            (js, _json_request({**good, "startTimeUnixNano": "soon"})),
            ({**js, "Content-Encoding": "gzip"}, b"not gzip at all"),
        ]
        for headers, body in cases:
            r = httpx.post(collector.url, content=body, headers=headers)
            assert r.status_code == 400, (body, r.status_code, r.text)
            assert r.content, "a 400 says what is wrong"
            if headers["Content-Type"] == "application/json":
                assert r.json()["code"] == 3 and r.json()["message"]
        # protobuf errors carry a google.rpc.Status
        from google.rpc.status_pb2 import Status

        r = httpx.post(collector.url, content=b"\xff\xff", headers=pb)
        status = Status.FromString(r.content)
        assert status.code == 3 and "protobuf" in status.message

        r = httpx.post(collector.url, content=b"{}", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        r = httpx.post(collector.url, content=b"x" * 20_000, headers=js)
        assert r.status_code == 413
        bomb = gzip.compress(b" " * 5_000_000)  # small on the wire, 5 MB inflated
        assert len(bomb) < 10_000
        r = httpx.post(collector.url, content=bomb, headers={**js, "Content-Encoding": "gzip"})
        assert r.status_code == 413
        assert _nothing_written(log_path)
        # and the collector still works
        r = httpx.post(collector.url, content=_json_request(good), headers=js)
        assert r.status_code == 200
        wait_tokens(collector.session_dir("m"), 2)
        collector.stop()
    finally:
        if collector.proc.poll() is None:
            collector.proc.kill()


# -- sigil export of an orchestrated session, collected back --------------------------------


def test_export_of_orchestrated_session_collected_back_has_the_same_totals(
    home: Path, collector: Collector
) -> None:
    sid = "acme-roundtrip"
    config = home / "config.yaml"
    # Retries (attempt spans) in run 1, a failure in run 2.
    config.write_text(
        FAST_RETRIES + "pipeline:\n  steps:\n    reasoning: orchestrate_steps:FlakyReasoning\n"
    )
    first = run_cli(home, "orchestrate", "--task", "Analyze Acme", "--session", sid, "-b", "5000")
    assert first.returncode == 0, first.stderr
    config.write_text(
        FAST_RETRIES + "pipeline:\n  steps:\n    reasoning: orchestrate_steps:FailingReasoning\n"
    )
    second = run_cli(home, "orchestrate", "--task", "Analyze Acme", "--session", sid, "-b", "5000")
    assert second.returncode == 1, second.stderr
    config.unlink()
    original = session_history(home / "logs" / "sessions" / sid)
    assert original.tokens > 0

    for _ in range(2):  # exported twice: the second is all duplicates
        proc = run_cli(home, "export", "--session", sid, "--endpoint", collector.base)
        assert proc.returncode == 0, proc.stderr
    collected_dir = collector.session_dir(sid)
    wait_tokens(collected_dir, original.tokens)
    collector.stop()

    collected = session_history(collected_dir)
    assert collected.tokens == original.tokens
    original_components = {
        name: tokens for name, tokens in original.component_tokens().items() if tokens
    }
    collected_components = {
        name: tokens for name, tokens in collected.component_tokens().items() if tokens
    }
    assert collected_components == original_components
    # sigil monitor reads the same totals from the collected log
    proc = run_cli(
        home,
        "monitor",
        "--session",
        sid,
        "--once",
        "--mode",
        "json",
        "--log-path",
        str(collector.log_path),
    )
    assert proc.returncode in (0, 1), proc.stderr
    final = orjson.loads(proc.stdout.splitlines()[-1])
    assert final["type"] == "final" and final["status"] == "complete"
    assert final["tokens_used"] == original.tokens
    shown = {name: c["tokens"] for name, c in final["components"].items() if c["tokens"]}
    assert shown == original_components


# -- the official openai SDK, instrumented by OpenInference -------------------------------


AGENT = r"""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Upstream(BaseHTTPRequestHandler):
    calls = 0
    def log_message(self, *a): pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Upstream.calls += 1
        prompt = 9 + Upstream.calls
        reply = {
            "id": f"chatcmpl-{Upstream.calls}", "object": "chat.completion", "created": 1,
            "model": body["model"] + "-0613",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hello"}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 3,
                      "total_tokens": prompt + 3},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
threading.Thread(target=server.serve_forever, daemon=True).start()

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from openinference.instrumentation import using_session
from openinference.instrumentation.openai import OpenAIInstrumentor
import openai

provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sys.argv[1])))
OpenAIInstrumentor().instrument(tracer_provider=provider)
client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="sk-test")
with using_session("oi-agent"):
    for _ in range(3):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
assert provider.force_flush(10_000)
provider.shutdown()
print("calls", Upstream.calls)
"""


def test_openai_sdk_instrumented_by_openinference(collector: Collector) -> None:
    import openai  # noqa: F401  (the test extra installs both; never skipped)
    import openinference.instrumentation.openai  # noqa: F401

    proc = run_py(AGENT, collector.url)
    assert "calls 3" in proc.stdout
    sdir = collector.session_dir("oi-agent")
    # usage: prompt 10, 11, 12 and 3 completion tokens each
    wait_tokens(sdir, 10 + 11 + 12 + 9)
    done = steps(sdir)
    assert [e["metadata"]["input_tokens"] for e in done] == [10, 11, 12]
    assert all(e["metadata"]["output_tokens"] == 3 for e in done)
    assert all(e["metadata"]["model"].startswith("gpt-4o-mini") for e in done)
    collector.stop()


# -- the mapping and the sink, in-process ----------------------------------------------------


def _span(span_id: str, parent: str = "", **attrs: Any) -> SpanData:
    return SpanData(TRACE, span_id, parent, "s", 1_000_000, 3_000_000, False, "", attrs)


def test_session_ids_are_made_valid() -> None:
    assert session_id_for("conv-1_A") == "conv-1_A"
    odd = session_id_for("user@example.com/thread 7")
    assert odd.startswith("user_example_com_thread_7-") and len(odd) <= 64
    assert session_id_for("user@example.com/thread 7") == odd
    assert session_id_for("x" * 100) != session_id_for("x" * 101)
    assert len(session_id_for("x" * 100)) <= 64


def test_mapping_of_export_spans_uses_sigil_tokens() -> None:
    root = _span(
        "0000000000000001",
        **{"gen_ai.operation.name": "invoke_workflow", "sigil.tokens": 0, "sigil.run.tokens": 9},
    )
    assert map_span(root) is None
    root_with_tokens = _span(
        "0000000000000002", **{"gen_ai.operation.name": "invoke_workflow", "sigil.tokens": 4}
    )
    event = map_span(root_with_tokens)
    assert event is not None and event.kind == "tokens" and event.tokens == 4
    step = _span(
        "0000000000000003",
        **{
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": "reasoning",
            "gen_ai.usage.input_tokens": 10,
            "gen_ai.usage.output_tokens": 5,
            "sigil.tokens": 17,  # the step's events carried more than its usage
        },
    )
    event = map_span(step)
    assert event is not None and event.tokens == 17 and event.component == "reasoning"
    assert map_span(_span("0000000000000004", **{"http.method": "GET"})) is None


def test_aggregate_parent_usage_is_not_counted_twice(tmp_path: Path) -> None:
    sink = SessionSink(tmp_path)
    common = {"gen_ai.conversation.id": "agg"}
    child = {**common, "gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 5}
    parent = {
        **common,
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.usage.input_tokens": 10,
        "gen_ai.usage.output_tokens": 0,
    }
    result = sink.ingest(
        [
            _span("00000000000000c1", "00000000000000aa", **child),
            _span("00000000000000c2", "00000000000000aa", **child),
            _span("00000000000000aa", **parent),
        ]
    )
    assert result.written == 3
    sink.close()
    history = session_history(tmp_path / "sessions" / "agg")
    assert history.tokens == 10
    (agg,) = [e for e in steps(tmp_path / "sessions" / "agg") if e["metadata"].get("aggregate")]
    assert agg["metadata"]["reported_input_tokens"] == 10 and agg["tokens"] == 0


def test_a_busy_session_is_refused_with_503_and_retried(home: Path, collector: Collector) -> None:
    from sigil.telemetry.execution_logger import ExecutionLogger

    js = {"Content-Type": "application/json"}
    other = ExecutionLogger("held", collector.log_path)
    other.initialize_sync()  # another writer holds the session
    try:
        body = _json_request(_json_span(TRACE, "eee19b7ec3c1b174", tokens=(3, 4), sid="held"))
        r = httpx.post(collector.url, content=body, headers=js)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "held" in r.json()["message"]
    finally:
        other.close_sync()
    r = httpx.post(collector.url, content=body, headers=js)
    assert r.status_code == 200
    wait_tokens(collector.session_dir("held"), 7)
    collector.stop()


def test_collect_without_aiohttp_says_how_to_install(home: Path) -> None:
    code = (
        "import sys; sys.modules['aiohttp'] = None;"
        "sys.argv = ['sigil', 'collect', '--port', '0'];"
        "from sigil.interfaces.cli.main import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "pip install 'sigil[collect]'" in proc.stderr
    assert os.path.isdir(home) and not (home / "logs" / "sessions").exists()


def test_secrets_in_span_text_are_scrubbed(tmp_path: Path) -> None:
    """The loggers run without a per-event sanitizer; the sink scrubs each text
    a span brings with the same rules (sigil.collect.sink, Secrets)."""
    key = "sk-proj-" + "a1B2c3D4e5F6g7H8i9J0" * 3
    span = SpanData(
        TRACE,
        "00000000000000e1",
        "",
        f"chat with {key}",
        1,
        2,
        True,
        f"Incorrect API key provided: {key}",
        {
            "gen_ai.conversation.id": "secrets",
            "gen_ai.operation.name": "chat",
            "gen_ai.agent.name": f"agent {key}",
            "gen_ai.request.model": f"model-{key}",
            "error.type": f"AuthenticationError {key}",
            "gen_ai.usage.input_tokens": 3,
        },
    )
    sink = SessionSink(tmp_path)
    assert sink.ingest([span]).written == 1
    sink.close()
    raw = (tmp_path / "sessions" / "secrets" / "execution.jsonl").read_text()
    assert key not in raw and key[:20] not in raw
    (error,) = [e for e in steps(tmp_path / "sessions" / "secrets")]
    assert error["event_type"] == "step_error" and error["tokens"] == 3
    assert error["message"].startswith("Incorrect API key provided: ")


def test_idle_sessions_are_closed_and_reopened_as_a_new_run(home: Path, tmp_path: Path) -> None:
    from sigil.core.locks import is_session_locked

    collector = Collector(home, tmp_path / "collected", "--idle", "0.3")
    js = {"Content-Type": "application/json"}
    sdir = collector.session_dir("idle-s")
    try:
        body = _json_request(_json_span(TRACE, "00000000000000a1", tokens=(2, 1), sid="idle-s"))
        assert httpx.post(collector.url, content=body, headers=js).status_code == 200
        wait_for(
            "the idle run to end",
            lambda: (
                sdir.is_dir()
                and session_history(sdir).runs
                and session_history(sdir).runs[-1].status == "complete"
            ),
        )
        # the session_complete line may reach the disk just before the lock is released
        wait_for("the lock to be released", lambda: not is_session_locked(sdir))
        # the same span again is still a duplicate, and starts no run
        assert httpx.post(collector.url, content=body, headers=js).status_code == 200
        wait_for("the idle session to close again", lambda: not is_session_locked(sdir))
        assert len(session_history(sdir).runs) == 1
        # a new span opens run 2
        body = _json_request(_json_span(TRACE, "00000000000000a2", tokens=(4, 1), sid="idle-s"))
        assert httpx.post(collector.url, content=body, headers=js).status_code == 200
        wait_tokens(sdir, 8)
        collector.stop()
    finally:
        if collector.proc.poll() is None:
            collector.proc.kill()
    history = session_history(sdir)
    # the duplicate alone reopened the session but started no run
    assert [run.tokens for run in history.runs] == [3, 5]


def test_a_port_in_use_is_one_line_and_exit_1(home: Path, collector: Collector) -> None:
    port = collector.base.rsplit(":", 1)[1]
    proc = run_cli(home, "collect", "--port", port, "--log-path", str(collector.log_path))
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"Error: cannot listen on 127.0.0.1:{port}: ")
    collector.stop()


def test_a_killed_collector_is_resumed_by_the_next_one(home: Path, tmp_path: Path) -> None:
    """kill -9 leaves the run open (its lock drops with the process); the next
    collect continues that run and recognises what the first one wrote."""
    log_path = tmp_path / "collected"
    js = {"Content-Type": "application/json"}
    sdir = log_path / "sessions" / "killed"
    first = _json_request(_json_span(TRACE, "00000000000000b1", tokens=(6, 1), sid="killed"))
    collector = Collector(home, log_path, "--idle", "600")
    try:
        assert httpx.post(collector.url, content=first, headers=js).status_code == 200
        wait_tokens(sdir, 7)
        wait_for("the step to be on disk", lambda: len(steps(sdir)) == 1)
    finally:
        collector.proc.kill()
        collector.proc.wait()
    from sigil.core.locks import is_session_locked
    from sigil.telemetry.log_parser import run_status

    last = session_history(sdir).runs[-1]
    assert run_status(last, writer_gone=not is_session_locked(sdir)) == "incomplete"
    collector = Collector(home, log_path, "--idle", "600")
    try:
        second = _json_request(
            _json_span(TRACE, "00000000000000b1", tokens=(6, 1), sid="killed"),
            _json_span(TRACE, "00000000000000b2", tokens=(2, 2), sid="killed"),
        )
        assert httpx.post(collector.url, content=second, headers=js).status_code == 200
        wait_tokens(sdir, 11)
        out = collector.stop()
        assert "1 written, 1 duplicates" in out, out
    finally:
        if collector.proc.poll() is None:
            collector.proc.kill()
    history = session_history(sdir)
    assert [(run.status, run.tokens) for run in history.runs] == [("complete", 11)]


def test_token_counts_the_log_cannot_take_are_unknown_not_a_crash(tmp_path: Path) -> None:
    sink = SessionSink(tmp_path)
    common = {"gen_ai.conversation.id": "huge", "gen_ai.operation.name": "chat"}
    result = sink.ingest(
        [
            _span("00000000000000d1", **common, **{"gen_ai.usage.input_tokens": 2**62}),
            _span("00000000000000d2", **common, **{"gen_ai.usage.input_tokens": -5}),
            _span("00000000000000d3", **common, **{"gen_ai.usage.input_tokens": "12"}),
            _span("00000000000000d4", **common, **{"gen_ai.usage.input_tokens": 3.0}),
        ]
    )
    sink.close()
    assert result.written == 4
    done = steps(tmp_path / "sessions" / "huge")
    assert [e["tokens"] for e in done] == [0, 0, 12, 3]
    assert [e["metadata"].get("usage") for e in done] == ["unknown", "unknown", None, None]
    assert session_history(tmp_path / "sessions" / "huge").tokens == 15


def test_a_non_loopback_host_needs_a_token(home: Path, tmp_path: Path) -> None:
    proc = run_cli(home, "collect", "--host", "0.0.0.0", "--port", "0", "--log-path", str(tmp_path))
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert "--token" in line and "0.0.0.0" in line


def test_with_a_token_requests_without_it_get_401_and_write_nothing(
    home: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "collected"
    c = Collector(home, log_path, "--host", "127.0.0.1", "--token", "s3cret-token")
    try:
        body = _json_request(_json_span("a" * 32, "b" * 16, tokens=(2, 1)))
        headers = {"Content-Type": "application/json"}
        for extra in ({}, {"X-Sigil-Token": "wrong"}, {"Authorization": "Bearer wrong"}):
            reply = httpx.post(c.url, content=body, headers={**headers, **extra})
            assert reply.status_code == 401, extra
        assert _nothing_written(log_path)
        ok = httpx.post(c.url, content=body, headers={**headers, "X-Sigil-Token": "s3cret-token"})
        assert ok.status_code == 200
        bearer = httpx.post(
            c.url,
            content=_json_request(_json_span("a" * 32, "c" * 16, tokens=(3, 1))),
            headers={**headers, "Authorization": "Bearer s3cret-token"},
        )
        assert bearer.status_code == 200
        wait_tokens(c.session_dir("a" * 32), 7)
    finally:
        c.stop()


# -- the native decoder and mapping, held to the Python reference -----------------------------


class _Capture:
    """An OTLP/HTTP endpoint that keeps the bodies it receives (200, nothing else)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        bodies: list[tuple[str, bytes]] = []
        self.bodies = bodies

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    data = gzip.decompress(data)
                bodies.append((self.headers.get("Content-Type", ""), data))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def capture() -> Iterator[_Capture]:
    c = _Capture()
    try:
        yield c
    finally:
        c.close()


def _reference(spans: list[SpanData]) -> list[dict[str, Any]]:
    """The Python mapping's events, grouped by session as the native batch groups them."""
    from sigil.telemetry.sanitization import LogSanitizer

    scrub = LogSanitizer().sanitize_string
    groups: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        event = map_span(span)
        if event is None:
            continue
        meta = event.metadata
        groups.setdefault(event.session_id, []).append(
            {
                "session_id": event.session_id,
                "kind": event.kind,
                "tokens": event.tokens,
                "usage": event.usage,
                "error": event.error,
                "exported": event.exported,
                "component": scrub(event.component),
                "message": scrub(event.message),
                "key": event.key,
                "parent_key": event.parent_key,
                "input_tokens": meta.get("input_tokens"),
                "output_tokens": meta.get("output_tokens"),
                "model": scrub(meta["model"]) if "model" in meta else None,
                "provider": scrub(meta["provider"]) if "provider" in meta else None,
                "operation": scrub(meta["operation"]) if "operation" in meta else None,
                "latency_ms": meta.get("latency_ms"),
                "error_type": scrub(meta["error_type"]) if "error_type" in meta else None,
                "groups": event.groups,
            }
        )
    return [e for group in groups.values() for e in group]


def _native_events(batch: Any) -> list[dict[str, Any]]:
    out = []
    for event in batch.events():
        event["session_id"] = session_id_for(event.pop("raw_session"))
        out.append(event)
    return out


def assert_native_matches_python(ctype: str, body: bytes) -> int:
    """Decode and map ``body`` both ways; returns how many events it holds."""
    from sigil import _native
    from sigil.collect.decode import decode_json, decode_protobuf

    if ctype == "application/x-protobuf":
        spans = decode_protobuf(body)
        batch = _native.otlp_decode_protobuf(body)
    else:
        spans = decode_json(body)
        native = _native.otlp_decode_json(body)
        assert native is not None  # the plain shapes exporters send
        assert _native_events(native) == _native_events(_native.otlp_map_spans(spans))
        batch = native
    assert batch.spans == len(spans)
    want = _reference(spans)
    assert _native_events(batch) == want
    assert batch.ignored == len(spans) - len(want)
    return len(want)


def _pb_request(spans: list[dict[str, Any]], resource: dict[str, Any] | None = None) -> bytes:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    def kv(key: str, value: Any) -> Any:
        if value is None:
            return KeyValue(key=key, value=AnyValue())
        if isinstance(value, bool):
            return KeyValue(key=key, value=AnyValue(bool_value=value))
        if isinstance(value, int):
            return KeyValue(key=key, value=AnyValue(int_value=value))
        if isinstance(value, float):
            return KeyValue(key=key, value=AnyValue(double_value=value))
        if isinstance(value, list):
            v = AnyValue()
            v.array_value.values.extend(AnyValue(string_value=str(x)) for x in value)
            return KeyValue(key=key, value=v)
        return KeyValue(key=key, value=AnyValue(string_value=value))

    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    for key, value in (resource or {}).items():
        rs.resource.attributes.append(kv(key, value))
    scope = rs.scope_spans.add()
    for item in spans:
        span = scope.spans.add()
        span.trace_id = bytes.fromhex(item.get("trace", TRACE))
        span.span_id = bytes.fromhex(item["span"])
        span.parent_span_id = bytes.fromhex(item.get("parent", ""))
        span.name = item.get("name", "chat")
        span.start_time_unix_nano = item.get("start", 1_700_000_000_000_000_000)
        span.end_time_unix_nano = item.get("end", 1_700_000_000_123_456_789)
        if item.get("error"):
            span.status.code = 2
            span.status.message = item.get("status_message", "")
        for key, value in item.get("attrs", {}).items():
            span.attributes.append(kv(key, value))
    return request.SerializeToString()


CRAFTED: list[dict[str, Any]] = [
    # GenAI semconv, every attribute the mapping reads
    {
        "span": "0000000000000001",
        "attrs": {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.response.model": "gpt-4o-2024-08-06",
            "gen_ai.provider.name": "openai",
            "gen_ai.agent.name": "planner",
            "gen_ai.conversation.id": "conv-1",
            "gen_ai.usage.input_tokens": 100,
            "gen_ai.usage.output_tokens": 20,
            "server.port": 443,
        },
    },
    # older names, counts as strings and floats, a child of span 1
    {
        "span": "0000000000000002",
        "parent": "0000000000000001",
        "attrs": {
            "gen_ai.system": "anthropic",
            "gen_ai.usage.prompt_tokens": "0042",
            "gen_ai.usage.completion_tokens": 7.0,
            "gen_ai.conversation.id": "conv-1",
        },
    },
    # OpenInference
    {
        "span": "0000000000000003",
        "name": "ChatCompletion",
        "attrs": {
            "openinference.span.kind": "LLM",
            "llm.model_name": "gpt-4o-mini",
            "llm.provider": "openai",
            "llm.token_count.prompt": 12,
            "llm.token_count.completion": 3,
            "llm.token_count.total": 15,
            "session.id": "user@example.com/thread 7",
            "agent.name": "",
        },
    },
    {"span": "0000000000000004", "attrs": {"llm.token_count.total": 9, "session.id": "s2"}},
    # an error, with and without a status message; usage unknown
    {
        "span": "0000000000000005",
        "error": True,
        "status_message": "rate limited",
        "attrs": {"gen_ai.operation.name": "chat", "error.type": "RateLimitError"},
    },
    {
        "span": "0000000000000006",
        "name": "",
        "error": True,
        "attrs": {"gen_ai.operation.name": "embeddings"},
    },
    # not GenAI; a workflow without tokens; a workflow with them (sigil export)
    {"span": "0000000000000007", "attrs": {"http.method": "GET", "llm.token_count.total": -1}},
    {
        "span": "0000000000000008",
        "attrs": {"gen_ai.operation.name": "invoke_workflow", "sigil.tokens": 0},
    },
    {
        "span": "0000000000000009",
        "start": 0,
        "end": 0,
        "attrs": {
            "gen_ai.operation.name": "invoke_workflow",
            "sigil.tokens": 11,
            "sigil.latency_ms": 2.5,
            "gen_ai.conversation.id": "conv-1",
        },
    },
    # odd values: bool, too large, negative, non-integral, an array, a null value
    {
        "span": "000000000000000a",
        "start": 5,
        "end": 4,
        "attrs": {
            "gen_ai.operation.name": "chat",
            "gen_ai.usage.input_tokens": 2**62,
            "gen_ai.usage.output_tokens": True,
            "llm.token_count.prompt": 3.5,
            "gen_ai.request.model": ["a", "b"],
            "gen_ai.agent.name": None,
            "sigil.latency_ms": 7,
        },
    },
    {"span": "000000000000000b", "attrs": {"openinference.span.kind": "EMBEDDING"}},
    {"span": "000000000000000c", "attrs": {"openinference.span.kind": "CHAIN"}},
    # a secret in the texts, a long component
    {
        "span": "000000000000000d",
        "name": "call with sk-proj-" + "a1B2c3D4e5F6g7H8i9J0" * 3,
        "attrs": {"gen_ai.operation.name": "chat", "gen_ai.agent.name": "agent-" + "x" * 300},
    },
    # the same span again (a retry within the request)
    {"span": "0000000000000004", "attrs": {"llm.token_count.total": 9, "session.id": "s2"}},
]


def test_native_decoding_matches_python_on_crafted_spans() -> None:
    body = _pb_request(CRAFTED, resource={"service.name": "svc", "session.id": "from-resource"})
    assert assert_native_matches_python("application/x-protobuf", body) == 11
    json_spans = [
        _json_span(TRACE, f"{i:016x}", tokens=(i, 2), sid=f"j{i % 3}") for i in range(1, 9)
    ]
    json_spans.append(_json_span(TRACE, "00000000000000ff", tokens=(1, 1), parentSpanId=""))
    assert assert_native_matches_python("application/json", _json_request(*json_spans)) == 9


def test_native_refuses_what_python_refuses() -> None:
    from sigil import _native
    from sigil.collect.decode import MalformedPayload, decode_protobuf

    good = _pb_request(CRAFTED[:2])
    bad_ids = _pb_request([{"span": "0001"}])
    for body in (b"\x0a\x05\x12\x03", good[:-3], b"\xff" * 8, bad_ids):
        with pytest.raises(MalformedPayload) as python:
            decode_protobuf(body)
        with pytest.raises(ValueError) as native:
            _native.otlp_decode_protobuf(body)
        if body is bad_ids:
            assert str(native.value) == str(python.value)
    with pytest.raises(OverflowError):
        _native.otlp_decode_protobuf(good, max_spans=1)


def test_native_matches_python_on_openinference_openai_spans(capture: _Capture) -> None:
    import openai  # noqa: F401  (the test extra installs both; never skipped)
    import openinference.instrumentation.openai  # noqa: F401

    proc = run_py(AGENT, capture.base + "/v1/traces")
    assert "calls 3" in proc.stdout
    assert capture.bodies
    assert sum(assert_native_matches_python(*item) for item in capture.bodies) == 3


def test_native_matches_python_on_the_spans_sigil_export_sends(
    home: Path, capture: _Capture
) -> None:
    sid = "acme-native"
    config = home / "config.yaml"
    config.write_text(
        FAST_RETRIES + "pipeline:\n  steps:\n    reasoning: orchestrate_steps:FlakyReasoning\n"
    )
    first = run_cli(home, "orchestrate", "--task", "Analyze Acme", "--session", sid, "-b", "5000")
    assert first.returncode == 0, first.stderr
    proc = run_cli(home, "export", "--session", sid, "--endpoint", capture.base)
    assert proc.returncode == 0, proc.stderr
    assert capture.bodies
    assert sum(assert_native_matches_python(*item) for item in capture.bodies) > 0


def _reference_log(spans: list[SpanData], log_path: Path) -> None:
    """The sink before rust/otlp.rs (Python mapping, a logger call per event), as the
    reference for the lines the native sink writes."""
    from sigil.telemetry.execution_logger import ExecutionLogger
    from sigil.telemetry.pricing import Pricer
    from sigil.telemetry.sanitization import LogSanitizer

    scrub, pricer = LogSanitizer().sanitize_string, Pricer()
    loggers: dict[str, ExecutionLogger] = {}
    seen: set[str] = set()
    parents: dict[str, set[str]] = {}
    covered: dict[str, set[str]] = {}
    #: per session, key -> (component, message, pending metadata), in order held
    pending: dict[str, dict[str, tuple[str, str, dict[str, Any]]]] = {}
    for span in spans:
        event = map_span(span)
        if event is None:
            continue
        logger = loggers.get(event.session_id)
        if logger is None:
            logger = loggers[event.session_id] = ExecutionLogger(
                event.session_id, log_path, sanitizer=False
            )
            meta0 = {"run": 1, "source": "otlp", "thresholds": {}, "allocations": {}}
            logger.log_event_sync(
                "session_start", "collect", "collecting OTLP spans (run 1)", 0, meta0
            )
        if event.key in seen:
            continue
        meta = event.metadata
        component, message = scrub(event.component), scrub(event.message)
        for name in ("model", "provider", "operation", "error_type"):
            if meta.get(name) is not None:
                meta[name] = scrub(meta[name])
        known = parents.setdefault(event.session_id, set())
        done = covered.setdefault(event.session_id, set())
        held = pending.setdefault(event.session_id, {})
        is_covered = not event.exported and event.parent_key in done
        count = "own"
        reported_tokens, cost_meta = event.tokens, {}
        if event.usage is not None and not event.exported:
            if event.tokens:
                if is_covered:
                    count = "covered"
                elif event.key in known:
                    count = "aggregate"
                elif event.groups:
                    count = "pending"
            if count != "own":
                model, inp = meta.get("model"), meta.get("input_tokens")
                out = meta.get("output_tokens")
                if isinstance(model, str) and (inp is not None or out is not None):
                    cost_meta = pricer.cost_meta(pricer.price(model, inp or 0, out or 0))
                for name in ("input_tokens", "output_tokens"):
                    if name in meta:
                        meta[f"reported_{name}"] = meta.pop(name)
                if count != "pending":
                    meta[count] = True
                event.tokens = 0
            if event.parent_key:
                held.pop(event.parent_key, None)
                known.add(event.parent_key)
                # the child names its parent (so a reopened session knows it)
                parent = event.parent_key[len(meta["trace_id"]) :]
                head = ("source", "trace_id", "span_id")
                meta = {
                    **{k: meta[k] for k in head},
                    "parent_span_id": parent,
                    **{k: v for k, v in meta.items() if k not in head},
                }
        model, inp, out = meta.get("model"), meta.get("input_tokens"), meta.get("output_tokens")
        if isinstance(model, str) and (inp is not None or out is not None):
            meta.update(pricer.cost_meta(pricer.price(model, inp or 0, out or 0)))
        if count == "pending":
            meta["reported_tokens"] = reported_tokens
            if "cost_usd" in cost_meta:
                meta["reported_cost_usd"] = cost_meta["cost_usd"]
            meta["pending"] = True
            held[event.key] = (component, message, dict(meta))
        if is_covered:
            meta["covered"] = True
            done.add(event.key)
        if event.kind == "tokens":
            logger.log_event_sync("token_consumption", component, message, event.tokens, meta)
        else:
            ids = {"source": "otlp", "trace_id": meta["trace_id"], "span_id": meta["span_id"]}
            logger.log_event_sync("step_start", component, message, 0, ids)
            kind = "step_error" if event.error else "step_complete"
            logger.log_event_sync(kind, component, message, event.tokens, meta)
        seen.add(event.key)
    for sid, logger in loggers.items():
        # the run's end settles what is still pending
        for component, message, meta in pending.get(sid, {}).values():
            names = [
                ("source", "source"),
                ("trace_id", "trace_id"),
                ("span_id", "span_id"),
                ("reported_input_tokens", "input_tokens"),
                ("reported_output_tokens", "output_tokens"),
                ("model", "model"),
                ("provider", "provider"),
                ("operation", "operation"),
                ("reported_cost_usd", "cost_usd"),
            ]
            settled = {to: meta[name] for name, to in names if name in meta} | {"settled": True}
            tokens = meta["reported_tokens"]
            logger.log_event_sync("token_consumption", component, message, tokens, settled)
        logger.close_sync()


def _lines_without_time(log_path: Path) -> dict[str, list[bytes]]:
    import re

    out = {}
    for sdir in sorted((log_path / "sessions").iterdir()):
        raw = (sdir / "execution.jsonl").read_bytes().splitlines()
        out[sdir.name] = [re.sub(rb'^\{"timestamp":"[^"]*",', b"{", line) for line in raw]
    return out


def test_the_native_sink_writes_the_lines_the_python_path_wrote(tmp_path: Path) -> None:
    from sigil.collect.decode import decode_protobuf

    common = {"gen_ai.conversation.id": "agg", "gen_ai.request.model": "gpt-4o"}
    child = {**common, "gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 5}
    parent = {**common, "gen_ai.operation.name": "invoke_agent"}
    parent |= {"gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 0}
    aggregates = [
        {"span": "00000000000000c1", "parent": "00000000000000aa", "attrs": child},
        {"span": "00000000000000c2", "parent": "00000000000000aa", "attrs": child},
        {"span": "00000000000000aa", "attrs": parent},
        # an agent before its call (pending, then an aggregate), one alone (settled)
        {"span": "00000000000000d1", "attrs": parent},
        {"span": "00000000000000c3", "parent": "00000000000000d1", "attrs": child},
        {"span": "00000000000000d2", "attrs": parent},
    ]
    spans = decode_protobuf(_pb_request(CRAFTED + aggregates))
    _reference_log(spans, tmp_path / "python")
    sink = SessionSink(tmp_path / "native")
    # one request as the receiver decodes it, then all of it again (duplicates)
    from sigil.collect.decode import decode_request

    body = _pb_request(CRAFTED + aggregates)
    assert sink.ingest(decode_request(body, True)).written == 16
    assert sink.ingest(decode_request(body, True)).duplicates == 17
    sink.close()
    native, python = (
        _lines_without_time(tmp_path / "native"),
        _lines_without_time(tmp_path / "python"),
    )
    assert native.keys() == python.keys()
    for sid, lines in native.items():
        # the native sink also ends its run (session_complete); the reference does not
        assert lines[-1].startswith(
            b'{"session_id":"%s","event_type":"session_complete"' % sid.encode()
        )
        assert lines[:-1] == python[sid], sid
    assert any(b'"aggregate":true' in line for line in native["agg"])
    assert sum(b'"pending":true' in line for line in native["agg"]) == 2
    assert sum(b'"settled":true' in line for line in native["agg"]) == 1
    assert any(b'"cost_usd":' in line for lines in native.values() for line in lines)


def test_unusual_json_values_are_decoded_as_the_python_decoder_decodes_them() -> None:
    from sigil import _native
    from sigil.collect.decode import decode_json, decode_request

    odd_values: list[dict[str, Any]] = [
        {"stringValue": 5},
        {"intValue": "+7"},
        {"intValue": " 8 "},
        {"intValue": 9.0},
        {"doubleValue": "1e3"},
        {"boolValue": 1},
        {"arrayValue": {}, "intValue": "3"},
    ]
    for value in odd_values:
        span = _json_span(TRACE, "00000000000000a1", tokens=(1, 2), sid="odd")
        span["attributes"].append({"key": "llm.token_count.total", "value": value})
        span["attributes"].append({"key": "gen_ai.agent.name", "value": value})
        body = _json_request(span)
        try:
            want = _reference(decode_json(body))
        except ValueError:
            want = None
        if want is None:
            with pytest.raises(ValueError):
                decode_request(body, False)
            continue
        assert _native_events(decode_request(body, False)) == want, value
    # the plain shapes are decoded natively, the odd ones by Python
    plain = _json_span(TRACE, "00000000000000a2", tokens=(1, 2), status={"code": 2})
    assert _native.otlp_decode_json(_json_request(plain)) is not None
    odd = _json_span(TRACE, "00000000000000a3", tokens=(1, 2), status={"message": None})
    assert _native.otlp_decode_json(_json_request(odd)) is None
    assert _native_events(decode_request(_json_request(odd), False)) == _reference(
        decode_json(_json_request(odd))
    )
    for bad in (b"[]", b"{", b'{"resourceSpans": {}}', _json_request({"traceId": "x"})):
        assert _native.otlp_decode_json(bad) is None


def test_native_and_python_decoding_agree_on_generated_spans() -> None:
    """Any JSON value in any kept attribute, and scalar protobuf values: the
    native path gives the Python reference's events, or both refuse the body."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from sigil.collect.decode import MalformedPayload, decode_json, decode_request

    keys = sorted(KEPT_KEYS)
    json_leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(
            [
                *["", "7", "-3", "+4", " 5", "1_0", "x", "LLM", "invoke_workflow", "chat"],
                # the spans that group model calls (SpanEvent.groups)
                *["invoke_agent", "create_agent", "execute_tool", "AGENT", "CHAIN", "EMBEDDING"],
            ]
        ),
    )
    any_value = st.dictionaries(
        st.sampled_from(["stringValue", "intValue", "doubleValue", "boolValue", "arrayValue"]),
        json_leaf,
        max_size=2,
    )
    attr = st.tuples(st.sampled_from(keys), st.one_of(any_value, json_leaf))
    span = st.fixed_dictionaries(
        {"attrs": st.lists(attr, max_size=6), "status": st.one_of(st.none(), json_leaf, any_value)}
    )

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(span, min_size=1, max_size=4))
    def check(spans: list[dict[str, Any]]) -> None:
        items = []
        for i, s in enumerate(spans):
            item = _json_span(TRACE, f"{i + 1:016x}", tokens=(1, 1))
            item["attributes"] = [{"key": k, "value": v} for k, v in s["attrs"]]
            item["status"] = s["status"]
            items.append(item)
        body = _json_request(*items)
        try:
            want: Any = _reference(decode_json(body))
        except (MalformedPayload, ValueError, TypeError, OverflowError):
            want = None
        try:
            got: Any = _native_events(decode_request(body, False))
        except MalformedPayload:
            got = None
        assert got == want
        # the same scalars as protobuf
        pb_spans = []
        for i, s in enumerate(spans):
            attrs = {}
            for k, v in s["attrs"]:
                leaf = next(iter(v.values()), None) if isinstance(v, dict) else v
                if isinstance(leaf, int) and not isinstance(leaf, bool):
                    leaf = max(-(2**63), min(2**63 - 1, leaf))
                attrs[k] = leaf
            pb_spans.append({"span": f"{i + 1:016x}", "attrs": attrs})
        assert_native_matches_python("application/x-protobuf", _pb_request(pb_spans))

    check()


def test_a_request_over_the_span_limit_is_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    from sigil.collect import decode
    from sigil.collect.decode import PayloadTooLarge, decode_request

    monkeypatch.setattr(decode, "MAX_SPANS", 2)
    three = [_json_span(TRACE, f"{i:016x}", tokens=(1, 1)) for i in range(1, 4)]
    pb = _pb_request([{"span": f"{i:016x}"} for i in range(1, 4)])
    for body, protobuf in ((_json_request(*three), False), (pb, True)):
        with pytest.raises(PayloadTooLarge, match="more than 2 spans"):
            decode_request(body, protobuf)
        assert decode_request(body[:0] if protobuf else _json_request(*three[:2]), protobuf)
    # the Python decoder's path (an unusual value) is bounded too
    odd = [dict(s, name=5) for s in three]
    with pytest.raises(PayloadTooLarge):
        decode_request(_json_request(*odd), False)
