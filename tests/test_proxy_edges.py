"""Edges of the proxy's transport (rust/proxy.rs) and its startup, found in
review: the in-process server (:class:`ProxyServer` with a :class:`Meter` on a
plain recorder) or the real ``sigil proxy``, in front of the small upstream of
tests/proxy_upstream.py, called by real clients (httpx, the official SDK).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

import test_proxy
from proxy_upstream import Upstream
from sigil.proxy import Meter, ProxyConfig, ProxyServer
from sigil.telemetry.tokens import TokenTracker
from test_proxy_budget import Recorder

# The fixtures of the proxy's end-to-end tests (a real ``sigil proxy``, a real upstream).
upstream = test_proxy.upstream
start_proxy = test_proxy.start_proxy

MSGS = [{"role": "user", "content": "x"}]
T = TypeVar("T")


def _meter(total: int) -> tuple[Recorder, Meter]:
    tracker = TokenTracker(total_budget=total, allocations={})
    log = Recorder()
    tracker.logger = log
    return log, Meter(tracker, log, run=1)


def serving(server: ProxyServer, work: Callable[[str], Awaitable[T]]) -> T:
    """Start ``server`` in an event loop of its own, run ``work(url)``, stop it."""

    async def main() -> T:
        url = await server.start()
        try:
            return await work(url)
        finally:
            await server.stop()

    return asyncio.run(main())


def _thread_name() -> str:
    """The OS name of the calling thread (the transport's is ``sigil-proxy``)."""
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


@pytest.fixture
def fresh_tokenizer(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The process's tokenizer forgotten, so the next use builds it again; yields
    the names of the threads each build ran on (the real build, observed)."""
    from sigil.pipeline import tokenizer

    built_on: list[str] = []
    build = tokenizer._build_cl100k

    def observed() -> Any:
        built_on.append(_thread_name())
        return build()

    monkeypatch.setattr(tokenizer, "_cached", None)
    monkeypatch.setattr(tokenizer, "_build_cl100k", observed)
    yield built_on


def test_the_tokenizer_is_built_before_the_first_call_is_admitted(
    upstream: Upstream, fresh_tokenizer: list[str]
) -> None:
    """Near the end of the budget a prompt is counted with the tokenizer. Built
    lazily, the first such call built it (~150 ms, more on a loaded machine) on
    the transport's thread, holding up every call behind it (review). The
    server builds it as it starts, off that thread, and admits no call before."""
    from sigil.pipeline import tokenizer

    seen: list[bool] = []

    class Observed(ProxyServer):
        def _count_prompt(self, body: dict[str, Any]) -> int:
            seen.append(tokenizer._cached is not None)
            return super()._count_prompt(body)

    _, meter = _meter(2_000)  # little left: prompts are counted, not bounded by length
    server = Observed(meter, ProxyConfig(upstream=upstream.url, call_cap=16))

    async def call(url: str) -> int:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": "m", "messages": MSGS}
            r = await client.post(f"{url}/chat/completions", json=body)
            return r.status_code

    assert serving(server, call) == 200
    assert seen == [True], "the tokenizer was not built when the first call was admitted"
    assert len(fresh_tokenizer) == 1 and fresh_tokenizer[0] != "sigil-proxy", fresh_tokenizer


def test_head_of_models_is_answered_as_get_without_a_body(
    upstream: Upstream, start_proxy: Callable[..., test_proxy.Proxy]
) -> None:
    """``HEAD /v1/models`` answered 404 while GET worked (review). HEAD is GET
    without the content (RFC 9110, 9.3.2): the OpenAI API answers it so, and
    the clients and health checks that probe a base URL with HEAD expect what
    GET would say, not 405. It is forwarded as a GET (an upstream need not know
    HEAD) and answered with GET's status and headers, no body."""
    proxy = start_proxy("--upstream", upstream.url)
    got = httpx.get(f"{proxy.url}/models")
    assert got.status_code == 200 and got.json()["data"]
    for path in ("/models", "/models/m"):
        head = httpx.head(f"{proxy.url}{path}")
        want = httpx.get(f"{proxy.url}{path}")
        assert head.status_code == want.status_code, (path, head.status_code, head.text)
        assert head.content == b""
        assert head.headers["content-type"] == want.headers["content-type"]
        # The length GET's body would have, as RFC 9110 allows.
        assert head.headers.get("content-length") in (None, str(len(want.content)))
    # Anything else is still not forwarded, whatever the method.
    assert httpx.head(f"{proxy.url}/files").status_code == 404
    assert httpx.head(f"{proxy.url}/chat/completions").status_code == 404
    assert proxy.stop()[0] == 0
    assert not test_proxy.steps(proxy.events(), "step_start")


def test_the_endpoint_and_key_header_tables_are_the_transports() -> None:
    """The metered endpoints and the key headers were listed in three places
    (rust/proxy.rs, proxy_transport.py, server.py) that had to agree by hand
    (review). The transport's tables are the one source; Python reads them."""
    from sigil import _native
    from sigil.proxy import server
    from sigil.proxy.policy import secrets_of
    from sigil.telemetry import proxy_transport

    paths = _native.PROXY_ENDPOINT_PATHS
    assert paths == ("/chat/completions", "/completions", "/responses", "/embeddings")
    assert paths == proxy_transport.ENDPOINT_PATHS
    # The policy's endpoint for each index the transport gives is the same route.
    assert tuple(e.path for e in server._ENDPOINTS) == paths
    keys = _native.PROXY_KEY_HEADERS
    assert keys == proxy_transport.KEY_HEADERS
    assert "authorization" in keys and all(k == k.lower() for k in keys)
    # Every header the transport hands the policy as a key is cut out of its logs.
    for name in keys:
        assert secrets_of([(name, "Bearer sk-secret-value")]) == (
            "Bearer sk-secret-value",
            "sk-secret-value",
        ), name


MIB = 1 << 20


#: Larger than what a loopback socket buffers: a client still sends the body
#: of a call refused before it was read.
BIG = 8 * MIB


def _big_body(model: str) -> dict[str, Any]:
    """A chat call whose body is just under 8 MiB."""
    return {"model": model, "messages": [{"role": "user", "content": "x" * (BIG - 256)}]}


def _memory_bound_server(upstream: Upstream) -> tuple[Recorder, ProxyServer]:
    """A server whose calls may hold 17 MiB in all: one call with a body of 8
    MiB (held twice: as read or forwarded, and as the policy parsed it) and an
    answer of 1 MiB fits, two such calls do not."""
    log, meter = _meter(100_000_000_000)  # far from the end: prompts bounded by length
    config = ProxyConfig(
        upstream=upstream.url, max_body_bytes=BIG, max_response_bytes=MIB,
        max_in_flight_bytes=2 * BIG + MIB,
    )  # fmt: skip
    return log, ProxyServer(meter, config)


async def _until_requests(upstream: Upstream, count: int) -> None:
    for _ in range(1000):
        if len(upstream.requests) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the upstream saw {len(upstream.requests)} calls, not {count}")


def test_calls_past_the_memory_limit_wait_briefly_then_get_503(upstream: Upstream) -> None:
    """Each body is bounded (413), but 200 calls of 32 MiB held 6+ GiB together
    (review). The bodies and answers of the calls in flight share a bound
    (``max_in_flight_bytes``): a call past it waits briefly for memory to free,
    then is answered 503 ``server_overloaded`` with ``retry-after``, forwarded
    nowhere and recorded nowhere; smaller calls that fit go on."""
    import time

    upstream.slow_seconds = 6.0
    log, server = _memory_bound_server(upstream)

    async def work(url: str) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            post = f"{url}/chat/completions"
            holding = asyncio.ensure_future(client.post(post, json=_big_body("slow")))
            await _until_requests(upstream, 1)
            assert server._transport is not None
            assert server._transport.held_bytes >= 2 * (BIG - 256)
            started = time.monotonic()
            refused = await client.post(post, json=_big_body("m"))
            waited = time.monotonic() - started
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["type"] == "server_error" and error["code"] == "server_overloaded"
            assert "17,825,792 bytes" in error["message"]
            # The official SDKs retry a 503, after retry-after, as x-should-retry says.
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["x-should-retry"] == "true"
            # It waited for memory (2 s) and was refused while the big call
            # still held it (that call's upstream answers after 6 s).
            assert waited >= 1.5, waited
            # The body it was still sending was read (and dropped): the client
            # gets the answer, not a connection reset mid-send.
            assert len(upstream.requests) == 1  # never forwarded
            # A small call fits beside the big one.
            small = await client.post(post, json={"model": "m", "messages": MSGS})
            assert small.status_code == 200, small.text
            assert not holding.done()
            assert (await holding).status_code == 200
            assert server._transport.held_bytes == 0

    serving(server, work)
    assert len(upstream.requests) == 2
    assert [e[0] for e in log.events].count("step_start") == 2  # the refused call: nothing


def test_the_sdk_retries_a_call_refused_for_memory_and_gets_its_answer(
    upstream: Upstream,
) -> None:
    """What the official SDK sees: with its default retries, a call refused for
    memory is retried once the big call ahead of it ends, and answered; with
    retries off it raises ``InternalServerError`` (503, ``server_overloaded``)."""
    import openai

    # Long enough that the SDK's first try gives up waiting (2 s) and it retries.
    upstream.slow_seconds = 5.0
    _, server = _memory_bound_server(upstream)

    async def work(url: str) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            holding = asyncio.ensure_future(
                client.post(f"{url}/chat/completions", json=_big_body("slow"))
            )
            await _until_requests(upstream, 1)
            plain = openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0)
            with pytest.raises(openai.InternalServerError) as refused:
                await plain.chat.completions.create(**_big_body("m"))
            assert refused.value.status_code == 503 and refused.value.code == "server_overloaded"
            sdk = openai.AsyncOpenAI(base_url=url, api_key="sk-test")  # 2 retries
            answer = await sdk.chat.completions.create(**_big_body("m"))
            assert answer.usage is not None and answer.usage.prompt_tokens > 0
            assert (await holding).status_code == 200

    serving(server, work)
    assert len(upstream.requests) == 2


def test_a_body_far_over_the_limit_gets_its_413_not_a_reset(upstream: Upstream) -> None:
    """A call refused before its body was read whole (413) left the rest of
    the body unread, and hyper then closes the connection: a client still
    sending more than a socket buffers got a reset instead of the answer. The
    rest is read and dropped (holding nothing) before the answer."""
    _, meter = _meter(100_000_000_000)
    server = ProxyServer(meter, ProxyConfig(upstream=upstream.url, max_body_bytes=MIB))

    async def work(url: str) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.post(f"{url}/chat/completions", json=_big_body("m"))
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "request_too_large"
            assert server._transport is not None and server._transport.held_bytes == 0

    serving(server, work)
    assert upstream.requests == []


def _blocked_writing_stdout(pid: int) -> bool:
    """Whether process ``pid``'s main thread is in write(2) on its stdout
    (x86-64 and aarch64 syscall numbers of write)."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] in ("1", "64") and int(fields[1], 16) == 1


def test_a_sigint_as_soon_as_the_url_is_out_stops_the_proxy_cleanly(
    upstream: Upstream, tmp_path: Path
) -> None:
    """A client may stop the proxy the moment it reads the URL. The URL was
    printed before SIGINT and SIGTERM were the proxy's own, so a signal in
    between cancelled the run: "Aborted.", exit 130 (CI saw it once under load).
    The window is held open here: stdout is a full pipe, so the proxy blocks
    writing its announcement, and the signal arrives then."""
    import fcntl
    import signal
    import subprocess

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_end, b"#" * 4096)
    os.set_blocking(write_end, True)
    proc = subprocess.Popen(
        [*test_proxy.SIGIL, "proxy", "--session", "p1", "--port", "0", "--upstream", upstream.url],
        env=test_proxy.env_of(tmp_path / "home"),
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_end)
    try:
        for _ in range(6000):  # up to a minute for the proxy to start
            if _blocked_writing_stdout(proc.pid) or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert _blocked_writing_stdout(proc.pid), "the proxy never wrote its announcement"
        proc.send_signal(signal.SIGINT)
        with os.fdopen(read_end, "rb") as out:
            printed = out.read().lstrip(b"#").decode()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Proxy: http://127.0.0.1:" in printed
    assert proc.returncode == 0, err
    assert "Aborted" not in err
