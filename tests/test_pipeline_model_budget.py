"""The reasoning step's model call stays within the session budget (hostile review, finding 2).

``sigil orchestrate --provider openai --budget 400`` sent the reasoning call with no
``max_tokens`` although 116 tokens were left, and spent 4,385. Now the call's
``max_tokens`` is what is left once its prompt is counted (the proxy's count:
``sigil.proxy.usage``), at most the proxy's cap of a call that sets none (4096);
a prompt that alone takes what is left is refused before it is sent. The offline
pipeline's numbers do not change. Real servers on 127.0.0.1, real processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sigil.pipeline.calls import count_tokens, prompt_estimate_text, prompt_overhead

ANALYSIS = {
    "intent": "lead_analysis",
    "summary": "Acme Corp is a qualified lead worth a follow-up.",
    "findings": ["Budget owner identified."],
    "recommendation": "Book a call.",
    "action": "proceed",
    "confidence": 0.8,
    "sources": [],
    "steps_addressed": [1, 2, 3, 4],
}


class Upstream:
    """An OpenAI-compatible server recording each request; answers with usage."""

    def __init__(self, completion: int = 10) -> None:
        self.requests: list[dict[str, Any]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                upstream.requests.append(body)
                reply = {
                    "model": body.get("model"),
                    "choices": [
                        {"message": {"content": json.dumps(ANALYSIS)}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 100, "completion_tokens": completion},
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


def orchestrate(home: Path, upstream: Upstream, sid: str, *args: str) -> Any:
    from conftest import cli_env

    env = cli_env(home, OPENAI_API_KEY="k", SIGIL_BASE_URL=upstream.base_url, SIGIL_MODEL="m")
    proc = subprocess.run(
        [sys.executable, "-m", "sigil", "orchestrate", "--provider", "openai", "--json",
         "--task", "Analyze Acme Corp", "--session", sid, *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return proc


def events(home: Path, sid: str) -> list[dict[str, Any]]:
    path = next(home.rglob(f"{sid}/execution.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def used_before_reasoning(home: Path, sid: str) -> int:
    total = 0
    for e in events(home, sid):
        if e["component"] == "reasoning":
            break
        total += e["tokens"]
    return total


def prompt_count(messages: list[dict[str, str]]) -> int:
    """The proxy's count of a chat prompt (its text and the format's tokens)."""
    body = {"messages": messages}
    return count_tokens(prompt_estimate_text(body)) + prompt_overhead(body)


def test_the_call_is_capped_at_what_is_left_of_the_budget(
    sigil_home: Path, upstream: Upstream
) -> None:
    # A first run finds the prompt's size; the second leaves 50 tokens for the answer.
    first = orchestrate(sigil_home, upstream, "probe")
    assert first.returncode == 0, first.stderr
    prompt = prompt_count(upstream.requests[0]["messages"])
    before = used_before_reasoning(sigil_home, "probe")
    budget = before + prompt + 50
    upstream.requests.clear()
    run = orchestrate(sigil_home, upstream, "capped", "--budget", str(budget))
    assert run.returncode == 0, run.stderr
    assert used_before_reasoning(sigil_home, "capped") == before
    [request] = upstream.requests
    assert request["max_tokens"] == 50
    assert prompt_count(request["messages"]) == prompt


def test_a_large_budget_caps_the_call_at_the_proxys_default(
    sigil_home: Path, upstream: Upstream
) -> None:
    run = orchestrate(sigil_home, upstream, "large", "--budget", "1000000")
    assert run.returncode == 0, run.stderr
    [request] = upstream.requests
    assert request["max_tokens"] == 4096  # the proxy's cap of a call that sets none


@pytest.mark.parametrize("spare", [0, -1, -200])
def test_a_prompt_that_does_not_fit_is_not_sent(
    sigil_home: Path, upstream: Upstream, spare: int
) -> None:
    """The review's repro (--budget 400 left 116 tokens before reasoning, less than
    its prompt: the call went out uncapped and the run spent 4,385 tokens): a prompt
    that leaves no token of the budget for the answer is refused before it is sent."""
    first = orchestrate(sigil_home, upstream, "probe")
    assert first.returncode == 0, first.stderr
    prompt = prompt_count(upstream.requests[0]["messages"])
    before = used_before_reasoning(sigil_home, "probe")
    upstream.requests.clear()
    budget = before + prompt + spare
    run = orchestrate(sigil_home, upstream, "B3", "--budget", str(budget))
    assert upstream.requests == []  # refused before it was sent
    result = json.loads(run.stdout)
    assert result["status"] == "budget_exceeded", result
    assert run.returncode == 3
    assert "token budget" in result["error"] and "not sent" in result["error"], result["error"]
    assert result["total_tokens"] == before <= budget
    reasoning = [e for e in events(sigil_home, "B3") if e["component"] == "reasoning"]
    assert [e["event_type"] for e in reasoning] == ["step_start", "step_error"]  # not retried
    assert sum(e["tokens"] for e in reasoning) == 0


def test_tokens_held_by_a_killed_run_are_not_given_to_the_call(
    sigil_home: Path, upstream: Upstream
) -> None:
    """An earlier proxy run killed with calls in flight holds their reservations
    (every view says budget - used - held is left): the next run's model call
    is capped at that, not at budget - used (review: the call went out and the
    run ended over its budget)."""
    from test_replay_modes import KILLED_HELD, write_killed_proxy_session

    first = orchestrate(sigil_home, upstream, "probe")
    assert first.returncode == 0, first.stderr
    prompt = prompt_count(upstream.requests[0]["messages"])
    before = used_before_reasoning(sigil_home, "probe")
    upstream.requests.clear()
    logs = next(sigil_home.rglob("probe/execution.jsonl")).parents[2]
    write_killed_proxy_session(logs, "ko")
    killed_used = 30
    # budget - used leaves 50 tokens for the answer; the held tokens leave none.
    assert KILLED_HELD > 50
    run = orchestrate(
        sigil_home, upstream, "ko", "--budget", str(killed_used + before + prompt + 50)
    )
    assert upstream.requests == [], "the call went out on tokens held for the killed calls"
    result = json.loads(run.stdout)
    assert result["status"] == "budget_exceeded", result


def test_the_offline_pipeline_is_unchanged(run_sigil: Any) -> None:
    """No model call, no cap: the offline reasoning step runs with less of the budget
    left than its prompt, and every step's count is what it is with a large budget."""

    def steps(sid: str, *args: str) -> list[int]:
        proc = run_sigil(
            "orchestrate", "--task", "Analyze Acme Corp", "--session", sid, "--json", *args
        )
        assert proc.returncode in (0, 3), proc.stderr
        return [s["tokens_used"] for s in json.loads(proc.stdout)["steps"]]

    full = steps("off")
    assert len(full) == 6
    before = sum(full[:3])
    tight = steps("off-tight", "--budget", str(before + 100))  # 100 left: less than its prompt
    assert tight[:4] == full[:4]


def test_the_cap_goes_in_the_field_the_proxy_uses() -> None:
    """OpenAI's reasoning models refuse ``max_tokens``: on OpenAI's and Azure's hosts
    the cap is ``max_completion_tokens``, as the proxy sends it."""
    from sigil.pipeline.providers import OpenAIChatProvider

    def field(url: str) -> str:
        return OpenAIChatProvider(base_url=url)._cap_field()

    assert field("https://api.openai.com/v1") == "max_completion_tokens"
    assert field("https://acme.openai.azure.com/openai/v1") == "max_completion_tokens"
    assert field("http://127.0.0.1:11434/v1") == "max_tokens"
