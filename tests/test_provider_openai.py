"""The OpenAI-compatible provider against a real HTTP server on 127.0.0.1.

The server is ``http.server`` in a thread, started by the tests, answering from a
script: normally, slowly, with 429 + Retry-After, with 500, 401/403/404/400, and
with malformed bodies. Nothing leaves the loopback interface.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sigil.core.error_handling import ErrorCategory, ErrorHandler
from sigil.pipeline.providers import (
    ChatCompletion,
    OpenAIChatProvider,
    ProviderAuthError,
    ProviderRequestError,
    ProviderResponseError,
    ProviderTransientError,
    parse_retry_after,
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

ANALYSIS = {
    "intent": "lead_analysis",
    "summary": "Acme Corp is a qualified lead worth a follow-up.",
    "findings": ["Budget owner identified: the VP of Operations."],
    "recommendation": "Book a call with the VP of Operations.",
    "action": "proceed",
    "confidence": 0.8,
    "sources": ["mem-002"],
    "steps_addressed": [1, 2, 3, 4],
    "qualification": {"budget": "yes", "authority": "VP", "need": "monitoring", "timeline": "FY"},
}


def completion_body(
    content: str = "Hello!", prompt: int = 12, completion: int = 5, usage: bool = True
) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "test-model-1",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content},
             "finish_reason": "stop"}
        ],
    }  # fmt: skip
    if usage:
        body["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    return json.dumps(body).encode()


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class ScriptedServer:
    """Answers each POST with the next scripted reply (the last one repeats)."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                payload = self.rfile.read(length)
                with server._lock:
                    server.requests.append(
                        {
                            "path": self.path,
                            "headers": dict(self.headers),
                            "json": json.loads(payload),
                        }
                    )
                    reply = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                if reply.delay:
                    time.sleep(reply.delay)
                try:
                    self.send_response(reply.status)
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # A short poll interval keeps shutdown() (each test's teardown) fast.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self.replies = list(replies)
            self.requests.clear()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    s.thread.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()


def provider(server: ScriptedServer, timeout: float = 5.0) -> OpenAIChatProvider:
    return OpenAIChatProvider(
        base_url=server.base_url, model="test-model", api_key="sk-test-123", timeout=timeout
    )


def complete(p: OpenAIChatProvider, **kwargs: Any) -> ChatCompletion:
    return asyncio.run(p.complete(MESSAGES, **kwargs))


# -- normal -----------------------------------------------------------------------------


def test_normal_completion_takes_tokens_from_usage(server: ScriptedServer) -> None:
    server.script(Reply(body=completion_body("Hello!", prompt=12, completion=5)))
    result = complete(provider(server), max_tokens=50, json_mode=True)
    assert result.content == "Hello!"
    assert (result.input_tokens, result.output_tokens) == (12, 5)
    assert result.model == "test-model-1" and result.finish_reason == "stop"
    assert result.usage_estimated is False and result.usage.total == 17
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test-123"
    assert req["json"]["model"] == "test-model"
    assert req["json"]["messages"] == MESSAGES
    assert req["json"]["max_tokens"] == 50
    assert req["json"]["response_format"] == {"type": "json_object"}


def test_missing_usage_is_counted_locally_and_flagged(server: ScriptedServer) -> None:
    server.script(Reply(body=completion_body("Hello there", usage=False)))
    result = complete(provider(server))
    assert result.usage_estimated is True
    assert result.output_tokens == 2 and result.input_tokens > 0


def test_the_key_never_appears_in_repr(server: ScriptedServer) -> None:
    assert "sk-test-123" not in repr(provider(server))


# -- transient ---------------------------------------------------------------------------


def test_slow_server_times_out_as_transient(server: ScriptedServer) -> None:
    server.script(Reply(body=completion_body(), delay=1.0))
    started = time.perf_counter()
    with pytest.raises(ProviderTransientError, match="timed out") as info:
        complete(provider(server, timeout=0.2))
    assert time.perf_counter() - started < 0.9
    assert ErrorHandler().categorize(info.value) is ErrorCategory.TRANSIENT


def test_slow_request_does_not_block_the_event_loop(server: ScriptedServer) -> None:
    server.script(Reply(body=completion_body(), delay=0.4))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    async def main() -> ChatCompletion:
        task = asyncio.create_task(ticker())
        try:
            return await provider(server).complete(MESSAGES)
        finally:
            task.cancel()

    assert asyncio.run(main()).content == "Hello!"
    # The loop kept running while the request waited: about 20 ticks on a quiet
    # machine, never one if the request blocked it (the ticker starts only when
    # main() awaits and is cancelled as soon as the request returns).
    assert ticks >= 3


def test_429_with_retry_after_seconds(server: ScriptedServer) -> None:
    server.script(
        Reply(
            status=429,
            body=b'{"error": {"message": "Rate limit reached"}}',
            headers={"Retry-After": "7"},
        )
    )
    with pytest.raises(ProviderTransientError, match="429: Rate limit reached") as info:
        complete(provider(server))
    assert info.value.status == 429 and info.value.retry_after == 7.0
    handled = ErrorHandler(backoff_base=0.01, jitter=0).handle(info.value, _ctx())
    assert handled.should_retry and handled.retry_delay == 7.0


def test_429_with_retry_after_http_date(server: ScriptedServer) -> None:
    when = formatdate(time.time() + 30, usegmt=True)
    server.script(Reply(status=429, body=b"slow down", headers={"Retry-After": when}))
    with pytest.raises(ProviderTransientError) as info:
        complete(provider(server))
    assert info.value.retry_after is not None and 25 <= info.value.retry_after <= 31


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_transient(server: ScriptedServer, status: int) -> None:
    server.script(Reply(status=status, body=b"<html>upstream error</html>"))
    with pytest.raises(ProviderTransientError, match=f"HTTP {status}") as info:
        complete(provider(server))
    assert info.value.retry_after is None


def test_connection_refused_is_transient() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the request: nothing listens
    p = OpenAIChatProvider(base_url=f"http://127.0.0.1:{port}/v1", timeout=2)
    with pytest.raises(ProviderTransientError, match=r"unreachable|connection"):
        complete(p)


# -- config and logic ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_are_config_errors(server: ScriptedServer, status: int) -> None:
    server.script(Reply(status=status, body=b'{"error": {"message": "Incorrect API key"}}'))
    with pytest.raises(ProviderAuthError, match="check the API key") as info:
        complete(provider(server))
    handled = ErrorHandler().handle(info.value, _ctx())
    assert handled.category is ErrorCategory.CONFIG and not handled.should_retry
    assert handled.fatal


def test_404_is_a_config_error(server: ScriptedServer) -> None:
    server.script(Reply(status=404, body=b'{"error": "model not found"}'))
    with pytest.raises(ProviderAuthError, match=r"provider\.model"):
        complete(provider(server))


def test_400_is_a_logic_error(server: ScriptedServer) -> None:
    server.script(Reply(status=400, body=b'{"error": {"message": "bad request"}}'))
    with pytest.raises(ProviderRequestError) as info:
        complete(provider(server))
    assert ErrorHandler().categorize(info.value) is ErrorCategory.LOGIC


# -- malformed bodies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"<html>gateway says hi</html>", b"", b"[1, 2]", b'{"choices": []}', b"\xff\xfe{"],
)
def test_malformed_bodies(server: ScriptedServer, body: bytes) -> None:
    server.script(Reply(body=body))
    with pytest.raises(ProviderResponseError) as info:
        complete(provider(server))
    assert info.value.usage is None
    assert ErrorHandler().categorize(info.value) is ErrorCategory.TRANSIENT


def test_malformed_body_with_usage_keeps_the_tokens(server: ScriptedServer) -> None:
    body = {"model": "m", "choices": [{"message": {"content": None}}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 0}}  # fmt: skip
    server.script(Reply(body=json.dumps(body).encode()))
    with pytest.raises(ProviderResponseError) as info:
        complete(provider(server))
    assert info.value.usage is not None and info.value.usage.total == 30


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    past = formatdate(time.time() - 100, usegmt=True)
    assert parse_retry_after(past) == 0.0


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError):
        OpenAIChatProvider(base_url="ftp://example.invalid")
    with pytest.raises(ValueError):
        OpenAIChatProvider(base_url="http://127.0.0.1:1/v1", timeout=0)


# -- through the orchestrator ------------------------------------------------------------------


def _ctx() -> Any:
    from sigil.core.error_handling import ErrorContext

    return ErrorContext(component="reasoning", operation="reasoning.run", session_id="s")


def _read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_orchestrator_retries_429_then_uses_the_model(
    server: ScriptedServer, sigil_home: Path
) -> None:
    from sigil.core.config import load_settings
    from sigil.interfaces.cli.orchestrator import Orchestrator

    server.script(
        Reply(status=429, body=b"{}", headers={"Retry-After": "0.2"}),
        Reply(status=500, body=b"oops"),
        Reply(body=completion_body(json.dumps(ANALYSIS), prompt=321, completion=123)),
    )
    settings = load_settings(
        {
            "provider.name": "openai",
            "provider.base_url": server.base_url,
            "provider.model": "test-model",
            "errors.backoff_base": 0.001,
            "errors.backoff_max": 0.01,
        }
    )
    orch = Orchestrator("model-run", settings=settings)
    result = asyncio.run(orch.execute("Analyze Acme Corp"))
    assert result.status == "complete", result.error
    events = _read_log(orch.log_file)
    retries = [e for e in events if e["event_type"] == "retry_attempt"]
    assert [e["metadata"]["retry_delay_s"] >= 0.2 for e in retries] == [True, False]
    done = next(
        e for e in events if e["event_type"] == "step_complete" and e["component"] == "reasoning"
    )
    assert done["tokens"] == 444
    assert done["metadata"]["input_tokens"] == 321
    assert done["metadata"]["output_tokens"] == 123
    assert done["metadata"]["model"] == "test-model-1"
    start = events[0]
    assert start["metadata"]["provider"] == "openai"
    assert start["metadata"]["model"] == "test-model"
    assert result.final_output["result"]["summary"] == ANALYSIS["summary"]
    assert sum(e["tokens"] for e in events) == result.total_tokens
    tokens = json.loads((orch.session_dir / "tokens.json").read_text())
    assert tokens["total_used"] == result.total_tokens
    assert len(server.requests) == 3


def test_cli_with_openai_provider_and_auth_failure(
    server: ScriptedServer, sigil_home: Path
) -> None:
    """``--provider openai`` end to end; a 401 stops the run (exit 1) with the config hint."""
    from conftest import cli_env

    server.script(Reply(body=completion_body(json.dumps(ANALYSIS), prompt=100, completion=50)))
    env = cli_env(sigil_home, SIGIL_BASE_URL=server.base_url, OPENAI_API_KEY="sk-cli")
    cmd = [sys.executable, "-m", "sigil", "orchestrate", "--provider", "openai", "--json"]
    ok = subprocess.run(
        [*cmd, "--task", "Analyze Acme Corp", "--session", "cli-model"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    reasoning = next(s for s in result["steps"] if s["step"] == "reasoning")
    assert reasoning["tokens_used"] == 150
    assert reasoning["metadata"]["model"] == "test-model-1"
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-cli"

    server.script(Reply(status=401, body=b'{"error": {"message": "Incorrect API key"}}'))
    bad = subprocess.run(
        [*cmd, "--task", "Analyze Acme Corp", "--session", "cli-model-401"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 1, bad.stderr
    result = json.loads(bad.stdout)
    assert result["status"] == "error"
    assert "Check configuration and restart" in result["error"]
    assert len(server.requests) == 1  # a config error is not retried
