"""The findings of a hostile review of ``sigil proxy`` (issue 14), end to end: the
real command, the official ``openai`` SDK (or httpx where the SDK would refuse
the request itself), and the small upstream of tests/proxy_upstream.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

import test_proxy
from proxy_upstream import Upstream
from test_proxy import SIGIL, Proxy, env_of, steps

# The fixtures of the proxy's end-to-end tests (a real ``sigil proxy``, a real upstream).
upstream = test_proxy.upstream
start_proxy = test_proxy.start_proxy

MSGS = [{"role": "user", "content": "x"}]


def test_every_choice_of_n_is_reserved_even_above_128(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Finding 1: n=200 was reserved as one choice (n outside 1..128 read as 1):
    admitted at max_tokens 100, it spent 20,000 tokens of a 10,000 budget."""
    proxy = start_proxy("--budget", "10000", "--upstream", upstream.url)
    r = httpx.post(
        f"{proxy.url}/chat/completions",
        json={"model": "ncount", "n": 200, "max_tokens": 100, "messages": MSGS},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    sent = upstream.requests[0]["max_tokens"]
    # Each of the 200 completions capped so that all of them fit.
    assert sent * 200 <= 10_000
    code, _, err = proxy.stop()
    assert upstream.totals() <= 10_000, err
    assert proxy.monitor()["tokens_used"] == upstream.totals()
    assert code in (0, 3)


def test_each_prompt_of_a_list_is_reserved(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Finding 1: 20 prompts at max_tokens 100 reserved 100 output tokens."""
    proxy = start_proxy("--budget", "1000", "--upstream", upstream.url)
    client = proxy.client(max_retries=0)
    client.completions.create(model="ncount", prompt=[f"p{i}" for i in range(20)], max_tokens=100)
    sent = upstream.requests[0]["max_tokens"]
    assert sent * 20 <= 1000
    proxy.stop()
    assert upstream.totals() <= 1000
    assert proxy.monitor()["tokens_used"] == upstream.totals()


def test_a_request_whose_size_cannot_be_bounded_is_refused_with_400(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy("--budget", "100000", "--upstream", upstream.url)
    for n in (0, -1, "3", 2.5, True, 10**9):
        body = {"model": "m", "n": n, "max_tokens": 10, "messages": MSGS}
        r = httpx.post(f"{proxy.url}/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, (n, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"
    assert upstream.requests == []
    # The SDK raises it at once (a 400 is never retried).
    with pytest.raises(openai.BadRequestError):
        proxy.client().chat.completions.create(model="m", messages=MSGS, n=0)  # type: ignore[arg-type]
    assert upstream.requests == []
    assert proxy.stop()[0] == 0


def test_prompts_given_as_token_ids_are_reserved(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Finding 1, the prompt side: token arrays hold no text, yet are prompt
    tokens; 3,000 of them do not fit in a budget of 1,000."""
    proxy = start_proxy("--budget", "1000", "--upstream", upstream.url)
    client = proxy.client()
    with pytest.raises(openai.RateLimitError, match="does not fit"):
        client.embeddings.create(model="e", input=[[1] * 1500, [2] * 1500])
    with pytest.raises(openai.RateLimitError, match="does not fit"):
        client.completions.create(model="ncount", prompt=[3] * 3000, max_tokens=1)
    assert upstream.requests == []
    proxy.stop()


def test_both_cap_fields_are_lowered_to_the_grant(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Finding 6: with max_completion_tokens 100 and max_tokens 5000, 100 was
    reserved and 5000 forwarded (which a server reading max_tokens honours)."""
    proxy = start_proxy("--budget", "100000", "--upstream", upstream.url)
    proxy.client().chat.completions.create(
        model="ncount", messages=MSGS, max_completion_tokens=100, max_tokens=5000
    )
    sent = upstream.requests[0]
    assert sent["max_tokens"] == sent["max_completion_tokens"] == 100
    proxy.stop()
    start = steps(proxy.events(), "step_start")[0]["metadata"]
    assert start["max_tokens"] == 100
    assert upstream.reported[0].output_tokens == 100


def _sse_lines(eol: bytes) -> bytes:
    events = [
        b'data: {"model":"m-1","choices":[{"index":0,"delta":{"content":"Hel"}}]}',
        b': a comment\ndata: {"choices":[{"index":0,"delta":{"content":"lo"}}]}',
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}',
        b"data: [DONE]",
    ]
    return b"".join(e.replace(b"\n", eol) + eol + eol for e in events)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_sse_events_end_with_any_line_end(eol: bytes, step: int) -> None:
    """Finding 7: events whose lines end with a bare CR were never split (the
    usage was lost, the stream taken as broken); the SSE spec allows CR, LF and
    CRLF. Every byte is still forwarded as it came."""
    from sigil.proxy.usage import CHAT, StreamFollower, Usage

    data = _sse_lines(eol)
    follower = StreamFollower(CHAT)
    out = b""
    for i in range(0, len(data), step):
        out += follower.feed(data[i : i + step])
        # An event is forwarded once complete, not held for the next one.
        assert follower.pending < len(data)
    out += follower.flush()
    assert out == data
    assert (follower.usage, follower.text, follower.done) == (Usage(5, 2), "Hello", True)
    assert follower.events == 4


def test_a_stream_with_bare_cr_line_ends_is_counted_exactly(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy("--budget", "100000", "--upstream", upstream.url)
    chunks = list(
        proxy.client(max_retries=0).chat.completions.create(
            model="crsep", messages=MSGS, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "word " * 5
    assert proxy.stop()[0] == 0
    events = proxy.events()
    done = steps(events, "step_complete")
    assert len(done) == 1 and not steps(events, "step_error")
    meta = done[0]["metadata"]
    reported = upstream.reported[0]
    assert (meta["input_tokens"], meta["output_tokens"]) == (
        reported.input_tokens, reported.output_tokens,
    )  # fmt: skip
    assert "usage_estimated" not in meta
    assert proxy.monitor()["tokens_used"] == upstream.totals()


def test_a_stream_ending_in_an_error_event_keeps_what_arrived(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Finding 4: an upstream ``error`` event after part of the answer logged 0
    tokens and released the reservation; a stream that simply broke logged an
    estimate. Both now count what arrived."""
    upstream.pieces = 20
    proxy = start_proxy("--budget", "100000", "--upstream", upstream.url)
    client = proxy.client(max_retries=0)
    with pytest.raises(openai.APIError, match="overloaded"):
        for _ in client.chat.completions.create(model="streamerror", messages=MSGS, stream=True):
            pass
    assert proxy.stop()[0] == 0
    events = proxy.events()
    spent = steps(events, "token_consumption")
    assert len(spent) == 1
    meta = spent[0]["metadata"]
    # 20 pieces of "hello world " arrived: about 40 tokens, estimated.
    assert meta["usage_estimated"] is True and meta["output_tokens"] >= 20
    error = steps(events, "step_error")[0]
    assert error["metadata"]["category"] == "upstream_error"
    assert "overloaded" in error["metadata"]["error"]
    assert error["metadata"].get("usage") != "unknown"
    assert proxy.monitor()["tokens_used"] == spent[0]["tokens"] > 0


@pytest.mark.parametrize(
    "key",
    [
        "gw_live_8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c",
        # Longer than the error text the proxy keeps (200 characters): the
        # message is cut mid-key, and what is left of it is still the key.
        "gw_live_" + "0123456789abcdef" * 25,
    ],
)
def test_a_key_the_upstream_echoes_is_never_logged(
    upstream: Upstream, start_proxy: Callable[..., Proxy], key: str
) -> None:
    """Finding 3: an upstream answering 401 "Invalid API key: <key>" put the
    client's key (one no pattern knows) verbatim in the step_error."""
    proxy = start_proxy("--budget", "100000", "--upstream", upstream.url)
    with pytest.raises(openai.AuthenticationError) as exc:
        proxy.client(api_key=key, max_retries=0).chat.completions.create(
            model="echokey", messages=MSGS
        )
    assert key in exc.value.message  # the client sees the upstream's own answer
    r = httpx.post(
        f"{proxy.url}/chat/completions",
        headers={"api-key": key},
        json={"model": "echokey", "messages": MSGS},
    )
    assert r.status_code == 401
    assert proxy.stop()[0] == 0
    text = proxy.log_file.read_text()
    errors = steps(proxy.events(), "step_error")
    assert len(errors) == 2
    assert "Invalid API key: [REDACTED]" in errors[0]["metadata"]["error"]
    assert "[REDACTED]" in errors[0]["message"]
    # Not the key, nor any piece of it long enough to mean anything.
    assert not any(key[i : i + 12] in text for i in range(len(key) - 12))


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("command", ["proxy", "run"])
def test_a_log_that_cannot_be_written_refuses_calls_and_fails_the_run(
    upstream: Upstream, tmp_path: Path, command: str
) -> None:
    """Finding 2: on a full disk every call was served (unmetered), and the proxy
    exited 0 with a summary of calls its log lacked. A real write failure here:
    the files of the proxy process may not grow past 40 kB (RLIMIT_FSIZE, so
    every write past it fails with EFBIG, as on a full disk with ENOSPC)."""
    home = tmp_path / "home"
    calls = 400
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    if command == "proxy":
        args = ["proxy", "--session", "full", "--port", "0", "--upstream", upstream.url]
    else:
        args = ["run", "--session", "full", "--upstream", upstream.url, "--",
                sys.executable, str(script), str(calls)]  # fmt: skip
    proc = subprocess.Popen(
        [*SIGIL, *args],
        env=env_of(home, OPENAI_API_KEY="sk-test-0000000000000000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limit_file_size(40_000),
    )
    assert proc.stdout is not None
    if command == "proxy":
        url = next(line.split()[1] for line in proc.stdout if line.startswith("Proxy: "))
        out = _agent_calls(url, calls)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    else:
        out, err = proc.communicate(timeout=300)
    answers = [line for line in out.splitlines() if line in ("ok", "refused")]
    assert len(answers) == calls, out
    # Served while the log took them, then refused: never served again after.
    assert "refused" in answers and "ok" in answers
    assert "ok" not in answers[answers.index("refused") :]
    assert "recording_failed" in out
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: cannot write") and "File too large" in last, err
    assert f"refused {answers.count('refused')} calls it could not record" in last, err
    log = home / "logs" / "sessions" / "full" / "execution.jsonl"
    assert log.stat().st_size <= 40_000
    # Detected at once (issue 14 review, finding 2): each call's record is
    # written before it is answered, so the one call whose write failed is the
    # only one served that the log lacks (the 100 ms flush let ~19 through).
    recorded = [json.loads(line) for line in log.read_bytes().splitlines() if line.endswith(b"}")]
    completed = [e for e in recorded if e["event_type"] == "step_complete"]
    assert answers.count("ok") == len(completed) + 1, (answers.count("ok"), len(completed))
    # No summary claims what the log lacks.
    assert not (log.parent / "tokens.json").exists()


AGENT = """
import sys
import openai

client = openai.OpenAI(max_retries=0)
for i in range(int(sys.argv[1])):
    try:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "call %d" % i}], max_tokens=5
        )
        print("ok", flush=True)
    except openai.InternalServerError as exc:
        print("refused", flush=True)
        print(exc.code, exc.status_code, flush=True)
"""


def _agent_calls(url: str, calls: int) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", AGENT, str(calls)],
        env={**os.environ, "OPENAI_BASE_URL": url, "OPENAI_API_KEY": "sk-test-00000000000"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return proc.stdout


def test_unknown_usage_means_one_thing_in_the_events_the_end_line_and_the_views(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Finding 5: every step_error said ``usage: "unknown"`` (a 401 too), so the
    session model counted calls as unknown that the end line did not. Now a call
    is unknown when it reached the upstream and may have spent tokens nobody
    reported; a 4xx refusal or an upstream never reached spent nothing."""
    upstream.slow_seconds = 3
    proxy = start_proxy("--budget", "100000", "--upstream", upstream.url, "--timeout", "0.5")
    client = proxy.client(max_retries=0)
    client.chat.completions.create(model="m", messages=MSGS)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="echokey", messages=MSGS)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="quota429", messages=MSGS)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="fail500", messages=MSGS)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="slow", messages=MSGS)
    client.chat.completions.create(model="nousage", messages=MSGS)
    code, _, err = proxy.stop()
    assert code == 0, err
    events = proxy.events()
    usage = {
        e["component"]: e["metadata"].get("usage")
        for e in events
        if e["event_type"] in ("step_complete", "step_error")
    }
    assert usage == {
        "m": None,  # its tokens are known
        "echokey": "none",
        "quota429": "none",
        "fail500": "unknown",
        "slow": "unknown",
        "nousage": "unknown",
    }
    state = proxy.monitor()
    assert state["unknown_usage_calls"] == 3
    assert events[-1]["metadata"]["calls_usage_unknown"] == 3
    line = err.strip().splitlines()[-1]
    assert "6 calls (4 failed, 3 with usage unknown)" in line, line
    assert f"at least {state['tokens_used']:,} tokens this run" in line, line
    # The unknown calls hold their reservations: counted against the budget.
    assert events[-1]["metadata"]["tokens_held_unknown"] > 0


@given(
    secret=st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=4, max_size=60),
    before=st.text(max_size=30),
    after=st.text(max_size=30),
    cut=st.integers(0, 200),
)
def test_redact_leaves_no_piece_of_the_key(secret: str, before: str, after: str, cut: int) -> None:
    """However the text around a key reads, and wherever a length limit cut it."""
    from sigil.proxy.policy import redact

    text = (before + secret + after + secret)[: len(before) + len(secret) + len(after) + cut]
    out = redact(text, (secret,))
    assert secret not in out
    # A tail cut mid-key is redacted too when it is long enough to mean something.
    for size in range(6, len(secret)):
        assert not out.endswith(secret[:size]) or before.endswith(secret[:size])


def test_secrets_of_a_call() -> None:
    from sigil.proxy.policy import secrets_of

    headers = {"Authorization": "Bearer sk-abc-123", "api-key": "az-key-1", "Accept": "x"}
    assert secrets_of(headers, "proxy-own-key", None, "t") == (
        "Bearer sk-abc-123", "proxy-own-key", "sk-abc-123", "az-key-1",
    )  # fmt: skip


def test_plan_output_counts_every_completion() -> None:
    from sigil.proxy.policy import Refusal, plan_output
    from sigil.proxy.usage import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES

    plan = plan_output(COMPLETIONS, {"prompt": ["a", "b", "c"], "n": 2, "best_of": 4})
    assert (plan.outputs, plan.requested, plan.wanted(10)) == (12, None, 120)
    assert plan_output(COMPLETIONS, {"prompt": [1, 2, 3]}).outputs == 1
    assert plan_output(COMPLETIONS, {"prompt": [[1], [2]]}).outputs == 2
    chat = plan_output(CHAT, {"max_tokens": 500, "max_completion_tokens": 80, "n": 3})
    assert (chat.requested, chat.wanted(4096)) == (80, 240)
    assert chat.caps_to_send(150, "max_tokens") == {"max_tokens": 50, "max_completion_tokens": 50}
    assert chat.caps_to_send(10_000, "max_tokens") == {"max_tokens": 80}
    assert plan_output(CHAT, {}).caps_to_send(70, "max_completion_tokens") == {
        "max_completion_tokens": 70
    }
    assert plan_output(RESPONSES, {"n": None}).outputs == 1
    emb = plan_output(EMBEDDINGS, {"input": ["a", "b"]})
    assert (emb.wanted(10), emb.least, emb.caps_to_send(0, "x")) == (None, 0, {})
    for bad in ({"n": 0}, {"best_of": "2"}, {"n": 1 << 19}, {"max_tokens": -1}):
        with pytest.raises(Refusal):
            plan_output(COMPLETIONS, bad)


def test_a_redirect_spent_nothing_and_holds_no_budget() -> None:
    """The native transport does not follow redirects, so a 3xx from the
    upstream is relayed as an error: like a 4xx it was answered before anything
    was generated (review: it was "unknown" and held its reservation for the
    rest of the run). A 5xx or a cut call stays unknown."""
    from sigil.proxy.policy import usage_unknown

    for status in (301, 302, 307, 308, 400, 401, 429):
        assert not usage_unknown("upstream_error", status, False), status
    for status in (500, 502, 503, None):
        assert usage_unknown("upstream_error", status, False), status
    assert not usage_unknown("upstream_error", 503, True)
