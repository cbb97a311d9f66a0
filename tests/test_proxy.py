"""``sigil proxy`` end to end: the official ``openai`` SDK against the real command,
in front of a small OpenAI-compatible server on 127.0.0.1 (tests/proxy_upstream.py).

Every token count is checked against what the upstream reported, through the
session model (``sigil monitor --mode json --once``) and the log itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy_upstream import Upstream

SIGIL = [sys.executable, "-m", "sigil"]
KEY = "sk-proj-THISISASECRETKEY0123456789abcdefABCDEF"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


@dataclass
class Proxy:
    proc: subprocess.Popen[str]
    url: str
    session: str
    home: Path

    def client(self, **kw: Any) -> openai.OpenAI:
        kw.setdefault("api_key", KEY)
        return openai.OpenAI(base_url=self.url, **kw)

    def async_client(self, **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("api_key", KEY)
        return openai.AsyncOpenAI(base_url=self.url, **kw)

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, err

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / "sessions" / self.session / "execution.jsonl"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]

    def events_so_far(self, kind: str = "step_complete", count: int = 1) -> list[dict[str, Any]]:
        """The log of the running proxy, once ``count`` events of ``kind`` are
        written (the writer flushes on an interval)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                events = self.events()
            except (FileNotFoundError, json.JSONDecodeError):
                events = []
            if len(steps(events, kind)) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.05)

    def monitor(self) -> dict[str, Any]:
        proc = subprocess.run(
            [*SIGIL, "monitor", "--session", self.session, "--mode", "json", "--once"],
            env=env_of(self.home),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return json.loads(proc.stdout.splitlines()[0])


def env_of(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIGIL_"))}
    env.update(SIGIL_HOME=str(home), NO_COLOR="1", **extra)
    return env


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(*args: str, session: str = "p1", env: dict[str, str] | None = None) -> Proxy:
        home = tmp_path / "home"
        proc = subprocess.Popen(
            [*SIGIL, "proxy", "--session", session, "--port", "0", *args],
            env=env_of(home, **(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            if line.startswith("Proxy: "):
                url = line.split()[1]
                break
        if url is None:
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"proxy did not start: {err}")
        proxy = Proxy(proc, url, session, home)
        started.append(proxy)
        return proxy

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def steps(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event_type"] == kind]


def test_non_streamed_calls_carry_the_upstreams_usage_exactly(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy("--budget", "100000", "--upstream", upstream.url)
    client = proxy.client()
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello there"}]
    )
    assert chat.choices[0].message.content
    named = client.with_options(default_headers={"X-Sigil-Component": "planner"})
    named.chat.completions.create(model="m", messages=[{"role": "user", "content": "plan"}])
    resp = client.responses.create(model="r", input="hi")
    assert resp.usage is not None
    # A call that sets no cap gets the proxy's (--call-cap, 4096 by default).
    assert upstream.requests[0]["max_tokens"] == upstream.requests[2]["max_output_tokens"] == 4096
    emb = client.embeddings.create(model="e", input=["a", "b", "c"])
    assert emb.usage.prompt_tokens == 9
    client.completions.create(model="legacy", prompt="say")
    assert [m.id for m in client.models.list()] == ["m"]
    code, _out, err = proxy.stop()
    assert code == 0, err

    events = proxy.events()
    completes = steps(events, "step_complete")
    assert len(steps(events, "step_start")) == len(completes) == 5
    # Each call's tokens are the upstream's usage, in and out.
    assert [(e["metadata"]["input_tokens"], e["metadata"]["output_tokens"]) for e in completes] == [
        (r.input_tokens, r.output_tokens) for r in upstream.reported
    ]
    assert {e["component"] for e in completes} == {"m", "planner", "r", "e", "legacy"}
    assert all(e["metadata"]["latency_ms"] > 0 for e in completes)
    # The session model (what every view shows) agrees with the upstream.
    state = proxy.monitor()
    assert state["status"] == "complete"
    assert state["tokens_used"] == upstream.totals() > 0
    assert state["components"]["planner"]["operations"] == 1
    assert events[-1]["event_type"] == "session_complete"
    # The key went upstream and nowhere else.
    assert all(h.get("Authorization") == f"Bearer {KEY}" for h in upstream.headers)
    assert KEY not in proxy.log_file.read_text()
    assert "X-Sigil-Component" not in upstream.headers[1]
    summaries = proxy.log_file.parent
    assert json.loads((summaries / "tokens.json").read_text())["total_used"] == upstream.totals()


def test_streamed_calls_ask_for_usage_and_hand_back_the_stream_the_client_asked_for(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy("--budget", "100000", "--upstream", upstream.url)
    client = proxy.client()
    msgs = [{"role": "user", "content": "stream please"}]
    # Without include_usage: the upstream is asked for it, the client does not see it.
    chunks = list(client.chat.completions.create(model="m", messages=msgs, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "word " * 5
    assert upstream.requests[0]["stream_options"] == {"include_usage": True}
    # With include_usage: the client gets its usage chunk.
    chunks = list(
        client.chat.completions.create(
            model="m", messages=msgs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    # The Responses API reports usage in its completed event.
    events = list(client.responses.create(model="r", input="x", stream=True))
    assert events[-1].type == "response.completed"
    code, _, err = proxy.stop()
    assert code == 0, err
    completes = steps(proxy.events(), "step_complete")
    assert len(completes) == 3 and all(e["metadata"]["stream"] for e in completes)
    assert all("ttft_ms" in e["metadata"] for e in completes)
    assert proxy.monitor()["tokens_used"] == upstream.totals()


def test_a_broken_stream_is_counted_from_what_arrived_and_raised_to_the_client(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    upstream.pieces = 10
    proxy = start_proxy("--budget", "100000", "--upstream", upstream.url)
    client = proxy.client(max_retries=0)
    received = []
    with pytest.raises(openai.APIError, match="stream"):
        for chunk in client.chat.completions.create(
            model="broken", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            received.append(chunk)
    assert received  # part of the answer arrived before the break
    code, _, err = proxy.stop()
    assert code == 0, err
    events = proxy.events()
    spent = steps(events, "token_consumption")
    assert len(spent) == 1
    meta = spent[0]["metadata"]
    assert meta["usage_estimated"] is True and meta["output_tokens"] > 0
    assert spent[0]["tokens"] == meta["input_tokens"] + meta["output_tokens"]
    error = steps(events, "step_error")[0]
    assert error["metadata"]["category"] == "upstream_stream"
    state = proxy.monitor()
    assert state["tokens_used"] == spent[0]["tokens"]
    assert state["components"]["broken"]["errors"] == 1


def test_concurrent_calls_are_each_logged_once(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    upstream.delay = 0.01
    proxy = start_proxy("--budget", "1000000", "--upstream", upstream.url)

    async def main() -> None:
        client = proxy.async_client()
        calls = [
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "q" * i}], max_tokens=50
            )
            for i in range(40)
        ]
        streams = [
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "s" * i}], stream=True
            )
            for i in range(10)
        ]
        done = await asyncio.gather(*calls)
        assert len(done) == 40
        for s in await asyncio.gather(*streams):
            async for _ in s:
                pass
        await client.close()

    asyncio.run(main())
    code, _, err = proxy.stop()
    assert code == 0, err
    events = proxy.events()
    completes = steps(events, "step_complete")
    assert len(completes) == 50 == len(steps(events, "step_start"))
    assert len({e["metadata"]["call"] for e in completes}) == 50
    assert sum(e["tokens"] for e in completes) == upstream.totals()
    assert proxy.monitor()["tokens_used"] == upstream.totals()


def test_budget_caps_each_call_and_refuses_once_spent_without_sdk_retries(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    upstream.pieces = 40
    proxy = start_proxy("--budget", "400", "--upstream", upstream.url)
    client = proxy.client()  # the SDK's default: 2 automatic retries
    msgs = [{"role": "user", "content": "go"}]
    client.chat.completions.create(model="m", messages=msgs, max_tokens=100_000)
    # The cap sent upstream is what the budget had left after the prompt's
    # reservation, not what was asked.
    reserved = steps(proxy.events_so_far(), "step_start")[0]["metadata"]["prompt_tokens_reserved"]
    assert 0 < reserved < 20
    assert upstream.requests[0]["max_tokens"] == 400 - reserved
    answered = 1
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(50):
            client.chat.completions.create(model="m", messages=msgs)
            answered += 1
    assert refused.value.code == "insufficient_quota"
    assert "budget" in refused.value.message
    forwarded = len(upstream.requests)
    assert forwarded == answered
    # Refused at once, never retried: one refusal logged per call made (an SDK
    # retry would be a second request, and a second refusal in the log).
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m", messages=msgs)
    assert len(upstream.requests) == forwarded
    code, _, err = proxy.stop()
    assert code == 3, err
    events = proxy.events()
    refusals = [e for e in steps(events, "step_error") if e["metadata"]["category"] == "budget"]
    assert len(refusals) == 2
    assert steps(events, "budget_exceeded")
    assert events[-1]["metadata"]["status"] == "budget_exceeded"
    state = proxy.monitor()
    assert state["status"] == "budget_exceeded"
    assert state["tokens_used"] == upstream.totals() >= 0.95 * 400


def test_a_prompt_larger_than_what_is_left_is_refused_before_it_is_forwarded(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy("--budget", "500", "--upstream", upstream.url)
    client = proxy.client()  # the SDK's default retries: the refusal must not be retried
    big = [{"role": "user", "content": "lorem ipsum dolor " * 400}]
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="m", messages=big, max_tokens=10)
    assert refused.value.code == "insufficient_quota"
    assert "does not fit" in refused.value.message
    assert upstream.requests == []
    # What is left still serves a call that fits.
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert len(upstream.requests) == 1
    # The budget did not run out: one call was refused (issue 14 review, finding 9).
    code, _, err = proxy.stop()
    assert code == 0, err
    events = proxy.events()
    refusals = [e for e in steps(events, "step_error") if e["metadata"]["category"] == "budget"]
    assert len(refusals) == 1 and "does not fit" in refusals[0]["metadata"]["error"]
    assert events[-1]["metadata"]["status"] == "complete"
    assert proxy.monitor()["tokens_used"] == upstream.totals() <= 500


def test_the_sdk_would_retry_a_plain_429(upstream: Upstream) -> None:
    """Why the refusal carries ``x-should-retry: false``: without it the official
    SDK retries a 429 (the status OpenAI uses for a spent quota)."""
    client = openai.OpenAI(api_key="k", base_url=upstream.url)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="quota429", messages=[{"role": "user", "content": "x"}]
        )
    assert len(upstream.requests) == 3


def test_concurrent_calls_cannot_overshoot_by_more_than_one_cap(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    upstream.pieces = 1000
    upstream.delay = 0.0
    proxy = start_proxy("--budget", "1000", "--upstream", upstream.url)

    async def main() -> list[Any]:
        client = proxy.async_client(max_retries=0)
        calls = [
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], max_tokens=300
            )
            for _ in range(12)
        ]
        out = await asyncio.gather(*calls, return_exceptions=True)
        await client.close()
        return out

    results = asyncio.run(main())
    code, _, _ = proxy.stop()
    assert code == 3
    caps = [r["max_tokens"] * r.get("n", 1) for r in upstream.requests]
    # Output never exceeds the budget; all that passes is the prompts of the
    # calls in flight, each far below one call's cap.
    assert sum(r.output_tokens for r in upstream.reported) <= 1000
    assert upstream.totals() <= 1000 + 300
    assert all(c <= 300 for c in caps)
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert refused and len(refused) + len(upstream.requests) == 12
    assert proxy.monitor()["tokens_used"] == upstream.totals()


def test_upstream_down_slow_invalid_or_without_usage(
    upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    # Down: a port nothing listens on.
    down = start_proxy("--upstream", "http://127.0.0.1:9/v1", session="down")
    with pytest.raises(openai.InternalServerError) as exc:
        down.client(max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert exc.value.status_code == 502 and "unreachable" in exc.value.message
    down.stop()
    errors = steps(down.events(), "step_error")
    assert errors[0]["metadata"]["category"] == "upstream_unavailable"

    upstream.slow_seconds = 3
    proxy = start_proxy("--upstream", upstream.url, "--timeout", "0.5", session="bad")
    client = proxy.client(max_retries=0)
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="slow", messages=msgs)
    assert exc.value.status_code == 504
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="invalid", messages=msgs)
    assert exc.value.status_code == 502 and "not a JSON object" in exc.value.message
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="fail500", messages=msgs)
    assert exc.value.status_code == 500 and "exploded" in exc.value.message
    answer = client.chat.completions.create(model="nousage", messages=msgs)
    assert answer.usage is None
    streamed = list(client.chat.completions.create(model="nousage", messages=msgs, stream=True))
    assert streamed
    _, _, err = proxy.stop()
    # The end line says the usage is unknown: never a 0 that looks like a count.
    # Unknown: the two answers without usage, and the three failures after the
    # call reached the upstream (a timeout, a body that is not JSON, a 500).
    assert "5 with usage unknown" in err and "at least 0 tokens this run" in err, err
    events = proxy.events()
    assert events[-1]["metadata"]["calls_usage_unknown"] == 5
    assert events[-1]["metadata"]["tokens_held_unknown"] > 0
    errors = steps(events, "step_error")
    categories = [e["metadata"]["category"] for e in errors]
    assert categories == ["timeout", "upstream_invalid", "upstream_error"]
    assert all(e["metadata"]["usage"] == "unknown" for e in errors)
    assert proxy.monitor()["unknown_usage_calls"] == 5
    unknown = steps(events, "step_complete")
    assert len(unknown) == 2
    for e in unknown:
        # Unknown, shown as such: never a 0 that looks like a count.
        assert e["metadata"]["usage"] == "unknown"
        assert "input_tokens" not in e["metadata"] and "output_tokens" not in e["metadata"]
        assert "usage unknown" in e["message"]


def test_a_body_over_the_limit_is_refused_with_413(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy("--upstream", upstream.url)
    big = "x" * (33 << 20)
    with pytest.raises(openai.APIStatusError) as exc:
        proxy.client(max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": big}]
        )
    assert exc.value.status_code == 413
    assert upstream.requests == []
    r = httpx.post(f"{proxy.url}/chat/completions", content=b"not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{proxy.url}/audio/speech", json={})
    assert r.status_code == 404 and "does not forward" in r.json()["error"]["message"]
    assert proxy.stop()[0] == 0


def test_a_client_that_disconnects_mid_stream(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    upstream.pieces = 200
    upstream.delay = 0.01
    proxy = start_proxy("--upstream", upstream.url)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "long"}]}
    with httpx.stream("POST", f"{proxy.url}/chat/completions", json=body) as r:
        for _ in r.iter_bytes():
            break  # leave after the first bytes
    # The proxy notices at its next write to the client: wait for that (however
    # slowly a loaded machine gets there), not for a fixed time, so the stop
    # below cannot be what ends the call.
    deadline = time.monotonic() + 30
    while not steps(proxy.events(), "step_error") and time.monotonic() < deadline:
        time.sleep(0.05)
    # The proxy goes on serving.
    proxy.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    proxy.stop()
    events = proxy.events()
    error = steps(events, "step_error")[0]
    assert error["metadata"]["category"] == "client_disconnected"
    spent = steps(events, "token_consumption")[0]
    assert spent["metadata"]["usage_estimated"] is True
    assert 0 < spent["metadata"]["output_tokens"] < 200


def test_a_token_is_required_beyond_loopback(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(
        "--upstream", upstream.url, "--host", "127.0.0.1", "--token", "tok-123",
        env={"OPENAI_API_KEY": "sk-upstream-key-of-the-proxy-0000000000"},
    )  # fmt: skip
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.AuthenticationError):
        proxy.client(max_retries=0).chat.completions.create(model="m", messages=msgs)
    # The token as the API key: the upstream gets the proxy's own key.
    proxy.client(api_key="tok-123").chat.completions.create(model="m", messages=msgs)
    assert upstream.headers[-1]["Authorization"] == "Bearer sk-upstream-key-of-the-proxy-0000000000"
    # The token in its header: the client's own key passes through.
    proxy.client(default_headers={"X-Sigil-Token": "tok-123"}).chat.completions.create(
        model="m", messages=msgs
    )
    assert upstream.headers[-1]["Authorization"] == f"Bearer {KEY}"
    assert "X-Sigil-Token" not in upstream.headers[-1]
    proxy.stop()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "70000"], "--port"),
        (["--budget", "lots"], "--budget"),
        (["--upstream", "ftp://x"], "http"),
        (["--upstream", "http://u:p@host/v1"], "credentials"),
        # The upstream is an API root the proxy appends paths to: a query or a
        # fragment would land in the middle of every forwarded URL.
        (["--upstream", "http://127.0.0.1:1/v1?x=1"], "query"),
        (["--upstream", "http://127.0.0.1:1/v1?"], "query"),
        (["--upstream", "http://127.0.0.1:1/v1#frag"], "fragment"),
        (["--upstream", "http://127.0.0.1:1/v1#"], "fragment"),
        # Not URLs at all (hostile review: a traceback, or accepted and then
        # every call failed with 404 or 502).
        (["--upstream", "http://[::1"], "not a valid URL"),
        (["--upstream", "http://[zz]:80/v1"], "not a valid URL"),
        (["--upstream", "http://bad host:80/v1"], "cannot carry"),
        (["--upstream", "http://127.0.0.1:1/v 1"], "cannot carry"),
        (["--upstream", "http://127.0.0.1:1/v1\x7f"], "cannot carry"),
        (["--host", "0.0.0.0"], "--token"),
        (["--timeout", "0"], "--timeout"),
        (["--call-cap", "-5"], "--call-cap"),
        (["--session", "../x"], "session"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = subprocess.run(
        [*SIGIL, "proxy", *args],
        env=env_of(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0]
    assert not (tmp_path / "home" / "logs" / "sessions").exists()


def test_a_running_session_and_a_taken_port_are_refused(
    upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    proxy = start_proxy("--upstream", upstream.url)
    again = subprocess.run(
        [*SIGIL, "proxy", "--session", "p1", "--upstream", upstream.url, "--port", "0"],
        env=env_of(proxy.home), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert again.returncode == 2 and "already running" in again.stderr
    port = proxy.url.split(":")[2].split("/")[0]
    taken = subprocess.run(
        [*SIGIL, "proxy", "--session", "p2", "--upstream", upstream.url, "--port", port],
        env=env_of(proxy.home), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert taken.returncode == 2 and "port" in taken.stderr
    assert not (proxy.home / "logs" / "sessions" / "p2" / "execution.jsonl").exists()
    assert proxy.stop()[0] == 0


def test_a_second_run_continues_the_session_and_its_budget(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    first = start_proxy("--budget", "5000", "--upstream", upstream.url)
    first.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
    first.stop()
    second = start_proxy("--upstream", upstream.url)  # the recorded budget holds
    second.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "b"}])
    second.stop()
    starts = steps(second.events(), "session_start")
    assert [s["metadata"]["run"] for s in starts] == [1, 2]
    assert starts[1]["metadata"]["budget"] == 5000
    state = second.monitor()
    assert state["tokens_used"] == upstream.totals()
    assert state["budget"] == 5000


def test_each_of_n_choices_is_capped_so_that_all_fit(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy("--budget", "1000", "--upstream", upstream.url)
    proxy.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], n=4, max_tokens=600
    )
    proxy.stop()
    reserved = steps(proxy.events(), "step_start")[0]["metadata"]["prompt_tokens_reserved"]
    # 4 x the cap = what was left once the prompt's estimate was reserved
    assert upstream.requests[0]["max_tokens"] == (1000 - reserved) // 4 < 250


def test_help_does_not_import_the_server(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "from sigil.interfaces.cli.main import main\n"
        "sys.argv = ['sigil', *sys.argv[1:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "names = ('aiohttp', 'asyncio', 'openai')\n"
        "print(sorted(m for m in names if m in sys.modules), file=sys.stderr)\n"
    )
    for args in (["--help"], ["proxy", "--help"], ["run", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-c", probe, *args], env=env_of(tmp_path), capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.stderr.strip().splitlines()[-1] in ("[]", "['asyncio']"), (args, proc.stderr)
        assert "aiohttp" not in proc.stderr


def test_a_stalled_stream_and_a_stop_mid_stream_are_recorded(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    upstream.pieces = 1000
    upstream.piece_delay = 0.6
    proxy = start_proxy("--upstream", upstream.url, "--timeout", "0.3")
    with pytest.raises(openai.APIError, match="stalled"):
        for _ in proxy.client(max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            pass
    proxy.stop()
    assert steps(proxy.events(), "step_error")[0]["metadata"]["category"] == "upstream_stream"

    # Stopped while a stream is in flight: the call is recorded, then the run ends.
    upstream.piece_delay = 0.01
    proxy = start_proxy("--upstream", upstream.url, session="p2")
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", f"{proxy.url}/chat/completions", json=body, timeout=30) as r:
        # The iterator is held: leaving it (a break) would close the connection,
        # and the proxy could see the client gone before it sees the stop.
        reading = r.iter_bytes()
        next(reading)
        code, _, err = proxy.stop()
        del reading
    assert code == 0, err
    events = proxy.events()
    assert [e["event_type"] for e in events][-2:] == ["step_error", "session_complete"]
    assert events[-2]["metadata"]["category"] == "proxy_stopped"
    assert events[-1]["metadata"]["calls_failed"] == 1


def test_each_call_is_priced_from_the_model_the_upstream_answered_with(
    upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Issue 12 (Cost): ``cost_usd`` on each event of a priced model (here by the
    user's override of the upstream's model names), none on an unpriced one."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(
        "pricing:\n  models:\n"
        "    m-2026: {input_per_mtok: 0.5, output_per_mtok: 1.5}\n"
        "    broken-2026: {input_per_mtok: 1, output_per_mtok: 2}\n"
        "    broken: {input_per_mtok: 1, output_per_mtok: 2}\n"
    )
    upstream.pieces = 10
    proxy = start_proxy("--budget", "100000", "--upstream", upstream.url)
    client = proxy.client(max_retries=0)
    msgs = [{"role": "user", "content": "price me"}]
    client.chat.completions.create(model="m", messages=msgs)
    list(client.chat.completions.create(model="m", messages=msgs, stream=True))
    client.completions.create(model="legacy", prompt="say")
    with pytest.raises(openai.APIError, match="stream"):
        list(client.chat.completions.create(model="broken", messages=msgs, stream=True))
    code, _, err = proxy.stop()
    assert code == 0, err
    events = proxy.events()
    priced = {"m-2026": (0.5, 1.5), "broken-2026": (1, 2), "broken": (1, 2)}
    spent = [e for e in events if e["event_type"] in ("step_complete", "token_consumption")]
    assert len(spent) == 4
    for event in spent:
        meta = event["metadata"]
        rates = priced.get(meta["model"])
        if rates is None:
            assert meta["model"] == "legacy-2026" and "cost_usd" not in meta
        else:
            want = (meta["input_tokens"] * rates[0] + meta["output_tokens"] * rates[1]) / 1e6
            assert meta["cost_usd"] == pytest.approx(want, abs=1e-9)
    assert sum("cost_usd" in e["metadata"] for e in spent) == 3
    # A step_error repeats neither the tokens nor their cost (they are on token_consumption).
    assert all("cost_usd" not in e["metadata"] for e in steps(events, "step_error"))
    # The session model's sum, in the monitor's json mode and tokens.json, is exact.
    nano = sum(round(e["metadata"]["cost_usd"] * 1e9) for e in spent if "cost_usd" in e["metadata"])
    legacy = next(e for e in spent if "cost_usd" not in e["metadata"])
    state = proxy.monitor()
    assert state["cost_usd"] == nano / 1e9
    assert state["unpriced_tokens"] == legacy["tokens"]
    assert state["unpriced_models"] == ["legacy-2026"]
    assert state["components"]["legacy"]["cost_usd"] is None
    ledger = json.loads((proxy.log_file.parent / "tokens.json").read_text())
    assert ledger["cost_nanousd"] == nano and ledger["cost_usd"] == nano / 1e9


def test_cached_prompt_tokens_are_logged_and_priced_at_the_cache_rate(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """gpt-4o's cache reads cost half its input rate (genai-prices): a call whose
    prompt was partly cached costs what genai-prices says for that usage."""
    from genai_prices import Usage as PriceUsage
    from genai_prices import calc_price

    upstream.answer_as = {"m": "gpt-4o", "r": "gpt-4o"}
    upstream.cached_tokens = 5
    proxy = start_proxy("--budget", "100000", "--upstream", upstream.url)
    client = proxy.client(max_retries=0)
    msgs = [{"role": "user", "content": "cache me"}]
    chat = client.chat.completions.create(model="m", messages=msgs)
    assert chat.usage is not None and chat.usage.prompt_tokens_details is not None
    assert chat.usage.prompt_tokens_details.cached_tokens == 5
    list(client.chat.completions.create(model="m", messages=msgs, stream=True))
    client.responses.create(model="r", input="cache me too")
    code, _, err = proxy.stop()
    assert code == 0, err
    done = steps(proxy.events(), "step_complete")
    assert len(done) == 3
    for event in done:
        meta = event["metadata"]
        assert meta["model"] == "gpt-4o" and meta["cached_input_tokens"] == 5
        inp, out = meta["input_tokens"], meta["output_tokens"]
        cached = calc_price(
            PriceUsage(input_tokens=inp, output_tokens=out, cache_read_tokens=5),
            model_ref="gpt-4o",
        ).total_price
        uncached = calc_price(
            PriceUsage(input_tokens=inp, output_tokens=out), model_ref="gpt-4o"
        ).total_price
        assert cached < uncached
        assert meta["cost_usd"] == float(cached)
        assert event["tokens"] == inp + out  # cached tokens are input tokens, counted once


def _tls_files(where: Path) -> tuple[Path, Path, Path]:
    """A test CA, and a certificate for localhost it signed: (ca.pem, cert.pem, key.pem)."""
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    usage = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "encipher_only", "decipher_only"),
        False,
    ) | {"key_cert_sign": True, "crl_sign": True}  # fmt: skip
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sigil test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**usage), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (where / "ca.pem", where / "cert.pem", where / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_an_https_upstream_is_verified_and_metered(
    start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """OpenAI itself is an https:// upstream: the certificate is checked against
    the system's roots (here a test CA, through SSL_CERT_FILE)."""
    import ssl

    ca, cert, key = _tls_files(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    msgs = [{"role": "user", "content": "hello"}]
    with Upstream(ssl_context=context) as up:
        assert up.url.startswith("https://localhost:")
        proxy = start_proxy("--upstream", up.url, env={"SSL_CERT_FILE": str(ca)})
        answer = proxy.client(max_retries=0).chat.completions.create(model="m", messages=msgs)
        assert answer.usage is not None
        assert proxy.stop()[0] == 0
        assert proxy.monitor()["tokens_used"] == up.totals() > 0
        # A certificate no trusted root signed: refused, never forwarded.
        untrusted = start_proxy("--upstream", up.url, session="p2")
        with pytest.raises(openai.InternalServerError) as exc:
            untrusted.client(max_retries=0).chat.completions.create(model="m", messages=msgs)
        assert exc.value.status_code == 502 and "unreachable" in exc.value.message
        assert len(up.requests) == 1
        untrusted.stop()


def test_a_client_that_leaves_after_the_last_event_had_the_whole_stream(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """The SDK stops reading at ``[DONE]``; an upstream that closes the stream a
    moment later (LiteLLM's does) must not turn a complete call into a failed one."""
    upstream.linger = 2.0
    proxy = start_proxy("--upstream", upstream.url)
    chunks = list(
        proxy.client(max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
    )
    assert chunks
    proxy.events_so_far("step_complete")
    assert proxy.stop()[0] == 0
    events = proxy.events()
    assert steps(events, "step_error") == []
    assert len(steps(events, "step_complete")) == 1
    assert proxy.monitor()["tokens_used"] == upstream.totals()


def test_a_call_whose_client_left_while_it_waited_for_budget_is_never_forwarded(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    upstream.slow_seconds = 3.0
    proxy = start_proxy("--budget", "1000", "--upstream", upstream.url)
    msgs = [{"role": "user", "content": "x"}]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Everything left is promised to a slow call in flight ...
        first = pool.submit(
            proxy.client(max_retries=0).chat.completions.create,
            model="slow", messages=msgs, max_tokens=100_000,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(upstream.requests) == 1
        # ... so a second call waits for it to settle; its client gives up first.
        body = {"model": "m", "messages": msgs, "max_tokens": 10}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{proxy.url}/chat/completions", json=body, timeout=1.0)
        first.result(timeout=60)
    # Budget is free again: a call still waiting would be admitted and
    # forwarded now; give it the time to show.
    time.sleep(1.0)
    code, _, err = proxy.stop()
    assert code == 0, err
    assert len(upstream.requests) == 1
    events = proxy.events()
    assert len(steps(events, "step_start")) == 1
    assert len(steps(events, "step_complete")) == 1
    assert not steps(events, "step_error")
    assert proxy.monitor()["tokens_used"] == upstream.totals()


def test_a_call_cut_by_the_stop_gets_the_stops_answer(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    upstream.slow_seconds = 15.0  # longer than the stop's grace period
    proxy = start_proxy("--upstream", upstream.url)
    body = {"model": "slow", "messages": [{"role": "user", "content": "x"}]}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(httpx.post, f"{proxy.url}/chat/completions", json=body, timeout=60)
        deadline = time.monotonic() + 30
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(upstream.requests) == 1
        code, _, err = proxy.stop()
        answer = call.result(timeout=60)
    assert code == 0, err
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["message"] == "sigil proxy: the proxy stopped before the call ended"
    assert error["type"] == "server_error"
    # The policy's answer sets no x-should-retry: the SDK retries a 503 as it would.
    assert "x-should-retry" not in answer.headers
    events = proxy.events()
    assert steps(events, "step_error")[-1]["metadata"]["category"] == "proxy_stopped"
    assert events[-1]["metadata"]["calls_failed"] == 1


def test_a_client_that_never_finishes_its_body_is_answered_408_in_the_timeout(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """A client that sends headers and part of its body, then nothing, held its
    call (a task and its buffer) for as long as it kept the connection open
    (review of the native transport). The body must arrive within the timeout."""
    import socket

    proxy = start_proxy("--upstream", upstream.url, "--timeout", "1")
    host, port = proxy.url.split("//")[1].split("/")[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"model":'
        )
        started = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request body" in answer or waited < 30
    assert waited < 10, waited
    assert upstream.requests == []
    # Nothing is recorded for a call never admitted, and the proxy goes on serving.
    proxy.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert proxy.stop()[0] == 0
    assert len(steps(proxy.events(), "step_start")) == 1
