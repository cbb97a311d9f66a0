"""The model provider at its edges (issue 15), through the real ``sigil orchestrate``.

Each test starts a misbehaving OpenAI-compatible server on the loopback interface
(a raw socket server in a thread, so it can misbehave below HTTP: redirect to
another host, never answer, drip one byte at a time, report absurd usage) and
runs ``sigil orchestrate --provider openai`` as a real process against it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import isolated_env
from sigil.core.locks import is_session_locked
from sigil.interfaces.cli.errors import ExitCode
from sigil.telemetry.log_parser import fold_session

pytestmark = pytest.mark.slow

SIGIL = [sys.executable, "-m", "sigil", "orchestrate", "--provider", "openai"]
TASK = "Analyze Acme Corp"
KEY = "sk-secret-key-15"
ANALYSIS = {
    "intent": "lead_analysis",
    "summary": "Acme Corp is a qualified lead worth a follow-up.",
    "findings": ["Budget owner identified: the VP of Operations."],
    "recommendation": "Book a call with the VP of Operations.",
    "action": "proceed",
    "confidence": 0.8,
    "sources": ["mem-002"],
    "steps_addressed": [1, 2, 3, 4],
}


def completion(prompt: int = 100, completion: int = 50) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "test-model-1",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": json.dumps(ANALYSIS)},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    ).encode()


def http_head(status: int, length: int, **headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {length}", "Connection: close"]
    head += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


def http_response(status: int, body: bytes = b"", **headers: str) -> bytes:
    return http_head(status, len(body), **headers) + body


Request = dict[str, Any]
Behaviour = Callable[["socketserver.StreamRequestHandler", Request, int], None]


class LoopbackServer:
    """Reads each HTTP request, records it, then lets ``behave`` answer (or not)."""

    def __init__(self, behave: Behaviour, host: str = "127.0.0.1") -> None:
        self.requests: list[Request] = []
        self.released = threading.Event()  # set at teardown: frees handlers that hang
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline().decode("latin-1").strip()
                if not line:
                    return
                headers: dict[str, str] = {}
                while (h := self.rfile.readline().decode("latin-1").strip()) != "":
                    name, _, value = h.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = self.rfile.read(int(headers.get("content-length", "0")))
                request = {"line": line, "headers": headers, "body": body}
                server.requests.append(request)
                with contextlib.suppress(OSError):  # the client went away: tests make it
                    behave(self, request, len(server.requests))

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.tcp = socketserver.ThreadingTCPServer((host, 0), Handler)
        self.tcp.daemon_threads = True
        self.thread = threading.Thread(
            target=self.tcp.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def address(self) -> str:
        host, port = self.tcp.server_address[:2]
        return f"{host}:{port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}/v1"

    def close(self) -> None:
        self.released.set()
        self.tcp.shutdown()
        self.tcp.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., LoopbackServer]]:
    started: list[LoopbackServer] = []

    def start(behave: Behaviour, host: str = "127.0.0.1") -> LoopbackServer:
        server = LoopbackServer(behave, host)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text(text)


def config(timeout: float = 10, retries: int = 0) -> str:
    return (
        f"provider:\n  timeout_seconds: {timeout}\n"
        f"errors:\n  max_retries: {retries}\n  backoff_base: 0.001\n  backoff_max: 0.01\n"
    )


def start_orchestrate(home: Path, base_url: str, sid: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SIGIL, "--task", TASK, "--session", sid, *args],
        env=isolated_env(home, SIGIL_BASE_URL=base_url, OPENAI_API_KEY=KEY),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def orchestrate(
    home: Path, base_url: str, sid: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    proc = start_orchestrate(home, base_url, sid, *args)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"orchestrate still running after {timeout}s; stderr: {err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def session_dir(home: Path, sid: str) -> Path:
    return home / "logs" / "sessions" / sid


def events_of(home: Path, sid: str) -> list[dict[str, Any]]:
    path = session_dir(home, sid) / "execution.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_totals_agree(home: Path, sid: str, total: int) -> list[dict[str, Any]]:
    """Every reader says the same number: the log, tokens.json, the monitor's fold."""
    events = events_of(home, sid)
    tokens = json.loads((session_dir(home, sid) / "tokens.json").read_text())
    assert sum(e["tokens"] for e in events) == total == tokens["total_used"]
    assert fold_session(sid, home / "logs").tokens_used == total
    return events


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# -- 1. a redirect never takes the key to another host -----------------------------------


def test_redirect_to_another_host_is_a_config_error_and_sends_no_key(
    sigil_home: Path, serve: Callable[..., LoopbackServer]
) -> None:
    def answer(handler: Any, request: Request, n: int) -> None:
        handler.wfile.write(http_response(200, completion()))

    other = serve(answer, host="127.0.0.2")  # another host: a loopback alias

    def redirect(handler: Any, request: Request, n: int) -> None:
        target = f"http://{other.address}/v1/chat/completions"
        handler.wfile.write(http_response(302, Location=target))

    first = serve(redirect)
    write_config(sigil_home, config(retries=3))
    proc = orchestrate(sigil_home, first.base_url, "redir", "--json")

    assert other.requests == []  # nothing, so no Authorization header either
    assert len(first.requests) == 1  # a configuration error is not retried
    assert first.requests[0]["line"].startswith("POST ")
    assert proc.returncode == ExitCode.FAILED, proc.stderr  # as 401/403
    result = json.loads(proc.stdout)
    assert result["status"] == "error"
    assert "Check configuration and restart" in result["error"]
    assert first.address in result["error"] and "redirect" in result["error"]
    assert KEY not in proc.stdout + proc.stderr


def test_redirect_on_the_same_host_is_not_followed_either(
    sigil_home: Path, serve: Callable[..., LoopbackServer]
) -> None:
    """307 keeps the method, but the key still goes only where base_url says."""

    def redirect(handler: Any, request: Request, n: int) -> None:
        if n == 1:
            handler.wfile.write(http_response(307, Location="/elsewhere/chat/completions"))
        else:
            handler.wfile.write(http_response(200, completion()))

    server = serve(redirect)
    write_config(sigil_home, config(retries=3))
    proc = orchestrate(sigil_home, server.base_url, "redir307", "--json")
    assert proc.returncode == ExitCode.FAILED, proc.stderr
    assert len(server.requests) == 1
    assert "provider.base_url" in json.loads(proc.stdout)["error"]


# -- 2. a signal ends an in-flight call --------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGINT, ExitCode.INTERRUPTED), (signal.SIGTERM, ExitCode.TERMINATED)],
)
def test_signal_during_a_model_call_ends_the_process_within_a_second(
    sigil_home: Path, serve: Callable[..., LoopbackServer], signum: int, code: int
) -> None:
    def never_answer(handler: Any, request: Request, n: int) -> None:
        server.released.wait(120)

    server = serve(never_answer)
    write_config(sigil_home, config(timeout=300))
    sid = f"sig{signum}"
    proc = start_orchestrate(sigil_home, server.base_url, sid)
    try:
        wait_until("the model call", lambda: server.requests)
        time.sleep(0.2)  # the call is in flight, waiting for the answer
        sent = time.monotonic()
        proc.send_signal(signum)
        try:
            _, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError("orchestrate still running 15 s after the signal") from None
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, stderr
    assert elapsed < 1.0, f"took {elapsed:.2f}s to exit after the signal"
    assert "Traceback" not in stderr
    events = events_of(sigil_home, sid)
    assert events[-1]["event_type"] == "session_error"
    assert events[-1]["metadata"]["error"] == "interrupted"
    assert not is_session_locked(session_dir(sigil_home, sid))


# -- 3. the timeout bounds the whole call ------------------------------------------------


def test_timeout_bounds_the_whole_call_not_each_read(
    sigil_home: Path, serve: Callable[..., LoopbackServer]
) -> None:
    """A server dripping one byte every 0.5 s never trips a per-read timeout of 2 s."""
    body = completion()

    def drip(handler: Any, request: Request, n: int) -> None:
        handler.wfile.write(http_head(200, len(body)))
        for byte in body:
            if server.released.wait(0.5):
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()

    server = serve(drip)
    write_config(sigil_home, config(timeout=2, retries=1))
    started = time.monotonic()
    proc = orchestrate(sigil_home, server.base_url, "drip", "--json", timeout=90)
    elapsed = time.monotonic() - started

    assert len(server.requests) == 2  # the first attempt, then one retry
    assert proc.returncode == ExitCode.FAILED, proc.stderr  # reasoning is required
    result = json.loads(proc.stdout)
    assert "timed out after 2s" in result["error"]
    # Two attempts of 2 s each, plus the process start and the other steps.
    assert 4.0 <= elapsed < 12.0, elapsed
    events = events_of(sigil_home, "drip")
    retries = [e for e in events if e["event_type"] == "retry_attempt"]
    assert len(retries) == 1 and "timed out after 2s" in json.dumps(retries[0])


# -- 4. usage outside the token range is an invalid response ------------------------------


@pytest.mark.parametrize(
    ("usage", "then_valid", "code"),
    [
        ({"prompt_tokens": 10**20, "completion_tokens": 50}, True, ExitCode.OK),
        ({"prompt_tokens": 10**20, "completion_tokens": 50}, False, ExitCode.FAILED),
        ({"prompt_tokens": 2**53 + 1, "completion_tokens": 0}, False, ExitCode.FAILED),
        ({"prompt_tokens": -5, "completion_tokens": 50}, False, ExitCode.FAILED),
        ({"prompt_tokens": 10, "completion_tokens": 1.5}, False, ExitCode.FAILED),
    ],
)
def test_usage_outside_the_token_range_is_rejected_and_totals_agree(
    sigil_home: Path,
    serve: Callable[..., LoopbackServer],
    usage: dict[str, Any],
    then_valid: bool,
    code: int,
) -> None:
    bad = json.loads(completion())
    bad["usage"] = usage
    bad_body = json.dumps(bad).encode()

    def answer(handler: Any, request: Request, n: int) -> None:
        body = completion(100, 50) if then_valid and n > 1 else bad_body
        handler.wfile.write(http_response(200, body))

    server = serve(answer)
    write_config(sigil_home, config(retries=1))
    proc = orchestrate(sigil_home, server.base_url, "huge", "--json")

    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "ValueError" not in proc.stdout + proc.stderr
    assert len(server.requests) == 2  # retried once, per policy
    result = json.loads(proc.stdout)
    events = assert_totals_agree(sigil_home, "huge", result["total_tokens"])
    assert result["total_tokens"] < 10_000
    retry = next(e for e in events if e["event_type"] == "retry_attempt")
    assert "usage" in retry["message"] + json.dumps(retry["metadata"])  # shown, not hidden
    reasoning = next(s for s in result["steps"] if s["step"] == "reasoning")
    if then_valid:
        assert reasoning["tokens_used"] == 150
    else:
        assert result["status"] == "error"
        assert reasoning["tokens_used"] == 0  # the tokens of a rejected answer are unknown


# -- 5. credentials in the base URL ------------------------------------------------------


@pytest.mark.parametrize("userinfo", ["alice:s3cret-pw@", "s3cret-pw@", ":s3cret-pw@"])
def test_credentials_in_base_url_are_refused_without_echoing_them(
    sigil_home: Path, serve: Callable[..., LoopbackServer], userinfo: str
) -> None:
    def answer(handler: Any, request: Request, n: int) -> None:
        handler.wfile.write(http_response(200, completion()))

    server = serve(answer)
    write_config(sigil_home, config(retries=3))
    before = sorted(p.name for p in sigil_home.rglob("*"))
    url = f"http://{userinfo}{server.address}/v1"
    proc = orchestrate(sigil_home, url, "creds", timeout=30)

    assert proc.returncode == ExitCode.USAGE, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "credentials" in lines[0] and "provider.base_url" in lines[0]
    assert "s3cret-pw" not in proc.stdout + proc.stderr
    assert server.requests == []
    assert sorted(p.name for p in sigil_home.rglob("*")) == before  # nothing written
