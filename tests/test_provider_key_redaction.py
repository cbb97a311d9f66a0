"""The provider's API key never leaves the provider in a text (hostile review, finding 1).

A server that echoes the key in its error (``Incorrect API key provided: <key>``,
in full, masked as ``gsk_Z2a9…T2u9``, cut short, in a non-JSON body) must not
get it into the exception, ``execution.jsonl``, ``errors.jsonl``, the terminal or
the spans ``sigil export`` sends. Real servers on 127.0.0.1, real processes.

The rule (providers.py, ``redact_key``): the key itself, any run of 8 or more of
its characters, and a masked form of it (a start of the key, a mask run, an
end of the key) are cut as ``[REDACTED]``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sigil.pipeline.providers import OpenAIChatProvider, ProviderError

GROQ = "gsk_Z2a9B4c7D1e8F3g6H0i5J2k9L4m7N1o8P3q6R0s5T2u9"
AZURE = "3f2a9c1e7b8d4f6a0c5e2b9d1a7f3c8e"
FREE = "mysecretkey-ZZ9aQ7bX2cV4nM6kL8jH0gF3dS5aP1oI"
KEYS = [GROQ, AZURE, FREE]
RUN = 8  # the shortest run of the key that is cut


def leaks(text: str, key: str) -> list[str]:
    """Every run of ``RUN`` characters of ``key`` found in ``text``."""
    return [key[i : i + RUN] for i in range(len(key) - RUN + 1) if key[i : i + RUN] in text]


def masked(key: str) -> str:
    return f"{key[:8]}…{key[-4:]}"


def stars(key: str) -> str:
    return f"{key[:8]}{'*' * (len(key) - 12)}{key[-4:]}"


# -- a server that echoes the key -------------------------------------------------------


class EchoServer:
    """Answers every POST with ``reply(key)``: (status, content type, body)."""

    def __init__(self, reply: Callable[[str], tuple[int, str, bytes]]) -> None:
        self.reply = reply
        self.calls = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                server.calls += 1
                auth = self.headers.get("Authorization", "")
                status, ctype, body = server.reply(auth.split(" ", 1)[-1])
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def echo() -> Iterator[Callable[..., EchoServer]]:
    servers: list[EchoServer] = []

    def start(reply: Callable[[str], tuple[int, str, bytes]]) -> EchoServer:
        servers.append(EchoServer(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def openai_error(status: int, message: Callable[[str], str]) -> Callable[[str], Any]:
    def reply(key: str) -> tuple[int, str, bytes]:
        body = {"error": {"message": message(key), "type": "invalid_request_error"}}
        return status, "application/json", json.dumps(body).encode()

    return reply


def fails_with(server: EchoServer, key: str) -> ProviderError:
    provider = OpenAIChatProvider(base_url=server.base_url, model="m", api_key=key, timeout=10)
    with pytest.raises(ProviderError) as info:
        asyncio.run(provider.complete([{"role": "user", "content": "hi"}]))
    return info.value


def all_text(exc: BaseException) -> str:
    """What any logger could write of the exception: message, repr, traceback."""
    return "\n".join(
        [
            str(exc),
            repr(exc),
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        ]
    )


# -- the provider's exceptions ----------------------------------------------------------------

ECHOES: dict[str, Callable[[str], Any]] = {
    "full key and header (OpenAI-style 401)": openai_error(
        401, lambda k: f"Incorrect API key provided: {k}. header was Bearer {k}"
    ),
    "masked with an ellipsis": openai_error(401, lambda k: f"Incorrect API key: {masked(k)}"),
    "masked with stars": openai_error(403, lambda k: f"Incorrect API key provided: {stars(k)}."),
    "cut short by the snippet": openai_error(400, lambda k: "x" * 180 + k),
    "non-JSON body, 500": lambda k: (500, "text/plain", f"upstream said: bad key {k}".encode()),
    "non-JSON body, 200": lambda k: (200, "text/html", f"<p>key {k} refused</p>".encode()),
    "JSON error string, 429": lambda k: (
        429, "application/json", json.dumps({"error": f"quota for {k} used up"}).encode()
    ),
}  # fmt: skip


@pytest.mark.parametrize("key", KEYS, ids=["groq", "azure-hex", "free-form"])
@pytest.mark.parametrize("shape", list(ECHOES))
def test_an_echoed_key_is_cut_from_the_exception(
    echo: Callable[..., EchoServer], key: str, shape: str
) -> None:
    server = echo(ECHOES[shape])
    exc = fails_with(server, key)
    text = all_text(exc)
    assert leaks(text, key) == [], text
    assert "[REDACTED]" in str(exc), str(exc)
    if "masked" in shape:
        assert key[-4:] not in str(exc), str(exc)  # the masked form goes whole
    assert server.calls >= 1


def test_the_message_keeps_what_is_not_the_key(echo: Callable[..., EchoServer]) -> None:
    server = echo(openai_error(401, lambda k: f"Incorrect API key provided: {k}. Try again."))
    exc = fails_with(server, GROQ)
    assert str(exc).startswith(f"model server {server.base_url} answered HTTP 401: ")
    assert "Incorrect API key provided: [REDACTED]. Try again." in str(exc)
    assert "check the API key" in str(exc)


def test_a_key_in_the_models_answer_is_cut(echo: Callable[..., EchoServer]) -> None:
    def reply(key: str) -> tuple[int, str, bytes]:
        body = {
            "model": "m",
            "choices": [{"message": {"content": f"your key is {key}!"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        }
        return 200, "application/json", json.dumps(body).encode()

    server = echo(reply)
    provider = OpenAIChatProvider(base_url=server.base_url, model="m", api_key=FREE, timeout=10)
    got = asyncio.run(provider.complete([{"role": "user", "content": "hi"}]))
    assert got.content == "your key is [REDACTED]!"
    assert (got.input_tokens, got.output_tokens) == (3, 4)


def test_ordinary_text_is_left_alone(echo: Callable[..., EchoServer]) -> None:
    """Short pieces (the masked form's 4-character end alone, a word) are not cut."""
    server = echo(openai_error(404, lambda k: "model gpt-4o-mini not found; T2u9 sk- gsk_ ..."))
    exc = fails_with(server, GROQ)
    assert "model gpt-4o-mini not found; T2u9 sk- gsk_ ..." in str(exc)
    assert "[REDACTED]" not in str(exc)


def test_a_key_too_short_to_cut_cuts_nothing() -> None:
    """Keys under 4 characters are not cut (as the proxy's): they would cut letters."""
    from sigil.pipeline.providers import redact_key

    assert redact_key("ok 1", "k", whole_only=True) == "ok 1"
    assert redact_key("ok 1: bad key k", "k") == "ok 1: bad key k"
    assert redact_key("bad key abcd!", "abcd") == "bad key [REDACTED]!"


# -- end to end: orchestrate, then export -----------------------------------------------------


class Capture:
    """An OTLP/HTTP receiver keeping each request's (decompressed) body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                capture.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def sigil(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    from conftest import cli_env

    return subprocess.run(
        [sys.executable, "-m", "sigil", *args],
        env=cli_env(home, **env), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("key", KEYS, ids=["groq", "azure-hex", "free-form"])
def test_an_echoed_key_reaches_no_file_terminal_or_span(
    echo: Callable[..., EchoServer], sigil_home: Path, key: str
) -> None:
    server = echo(
        openai_error(401, lambda k: f"Incorrect API key provided: {k}. header was Bearer {k}")
    )
    run = sigil(
        sigil_home, "orchestrate", "--task", "t", "--session", "K1", "--provider", "openai",
        OPENAI_API_KEY=key, SIGIL_BASE_URL=server.base_url, SIGIL_MODEL="gpt-4o-mini",
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert server.calls == 1
    terminal = run.stdout + run.stderr
    assert "answered HTTP 401" in terminal, terminal
    assert leaks(terminal, key) == [], terminal
    files = [p for p in sigil_home.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"execution.jsonl", "errors.jsonl"} <= names, names
    for path in files:
        data = path.read_bytes().decode("utf-8", "replace")
        assert leaks(data, key) == [], path
    errors = next(p for p in files if p.name == "errors.jsonl").read_text()
    assert "[REDACTED]" in errors

    receiver = Capture()
    try:
        out = sigil(sigil_home, "export", "-s", "K1", "-e", receiver.url)
        assert out.returncode == 0, out.stderr
        sent = b"".join(receiver.bodies).decode("utf-8", "replace")
        assert "answered HTTP 401" in sent  # the spans carry the error ...
        assert leaks(sent, key) == []  # ... without the key
        assert leaks(out.stdout + out.stderr, key) == []
    finally:
        receiver.close()


# -- one rule, near-linear, no public prefix cut (review: redaction speed) -----------------

PROJ = "sk-proj-Q7aZb3Xc9Vd2Ne5Mf8Lg1Kh4Ji7Hk0Gl3Fm6Dn9Sp2Aq5Wr8Et1Yu4Io7Pz0F0g"


def test_a_public_key_prefix_in_an_answer_is_left(echo: Callable[..., EchoServer]) -> None:
    """``sk-proj-`` is how every OpenAI project key starts: a model writing it (or
    another project key) is not quoting this key, and its answer comes back as written."""
    answer = (
        "Project keys look like `sk-proj-...`; set OPENAI_API_KEY=sk-proj-XXXX, "
        "never sk-proj-Abc123Def456Ghi789 in code. Legacy keys are sk-... ones."
    )

    def reply(key: str) -> tuple[int, str, bytes]:
        body = {
            "model": "m",
            "choices": [{"message": {"content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        }
        return 200, "application/json", json.dumps(body).encode()

    server = echo(reply)
    provider = OpenAIChatProvider(base_url=server.base_url, model="m", api_key=PROJ, timeout=10)
    got = asyncio.run(provider.complete([{"role": "user", "content": "hi"}]))
    assert got.content == answer
    # ... while the key itself, a run of it past the prefix and its masked form are cut.
    from sigil.pipeline.providers import redact_key

    assert redact_key(f"a {PROJ} b", PROJ, whole_only=True) == "a [REDACTED] b"
    assert redact_key(f"a {PROJ[:12]} b", PROJ, whole_only=True) == "a [REDACTED] b"
    assert redact_key(f"a {PROJ[:8]}…{PROJ[-4:]} b", PROJ) == "a [REDACTED] b"


def test_a_large_answer_is_redacted_whole() -> None:
    """A 2 MB answer (markdown full of stars, ellipses and x's) with the key, runs
    of it and masked forms scattered in it: each is cut, the rest is as written."""
    from sigil.pipeline.providers import redact_key

    filler = "## Notes\n* **bold** item ... see `sk-proj-` docs; xxxx ### **\u2026** 0x3f2a\n"
    pieces = [PROJ, PROJ[5:20], f"{PROJ[:10]}****{PROJ[-3:]}", f"Bearer {PROJ}", PROJ[-9:]]
    parts: list[str] = []
    expected: list[str] = []
    size = 0
    at = 0
    while size < 2 * 1024 * 1024:
        chunk = filler * 40
        piece = pieces[at % len(pieces)]
        parts += (chunk, " ", piece, ".\n")
        expected += (chunk, " ", "[REDACTED]", ".\n")
        size += len(chunk) + len(piece) + 3
        at += 1
    text = "".join(parts)
    assert len(text) >= 2 * 1024 * 1024
    assert redact_key(text, PROJ, whole_only=True) == "".join(expected)
    assert redact_key("".join(expected), PROJ, whole_only=True) == "".join(expected)


def test_the_proxy_cuts_a_masked_key_as_the_provider_does() -> None:
    """The proxy's failed-call error (``Meter._failure``, with the call's secrets as
    ``secrets_of`` reads them) is cut by the provider's rule: a masked form goes too."""
    from sigil.pipeline.providers import redact_key
    from sigil.proxy.metering import Call, Meter
    from sigil.proxy.policy import secrets_of

    error = f"Incorrect API key provided: {PROJ[:12]}****\u2026{PROJ[-3:]}. Try again."
    secrets = secrets_of({"Authorization": f"Bearer {PROJ}"}, "proxy-own-key-1")
    call = Call(1, "c", "/v1/chat/completions", "m", False, 16, None, 0.0, secrets=secrets)
    cut, _ = Meter._failure(call, error, "auth", 401, None)
    assert cut == "Incorrect API key provided: [REDACTED]. Try again."
    assert cut == redact_key(error, PROJ)
    # a run of 8+ of the key, as the provider cuts it
    cut, _ = Meter._failure(call, f"key {PROJ[3:15]} refused", "auth", 401, None)
    assert cut == "key [REDACTED] refused"
