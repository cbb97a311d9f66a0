"""``sigil run -- python agent.py`` with a real Pydantic AI agent.

The agent is ordinary Pydantic AI code whose OpenAI provider reads
``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` from the environment, which ``sigil
run`` points at its proxy: an ``OpenAIChatModel`` (chat completions), or the
model string ``"openai:agent"`` (the Responses API), each run and streamed. The
upstream (tests/proxy_upstream.py, model ``agent``) plays the model: it calls
the agent's tool, then answers with the tool's result, so each run is a
tool-call round trip of two model requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy_upstream import Upstream

pytestmark = pytest.mark.slow

SIGIL = [sys.executable, "-m", "sigil"]

AGENT = textwrap.dedent(
    """
    import asyncio, sys

    from pydantic_ai import Agent
    from pydantic_ai.exceptions import ModelHTTPError
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    api, mode, status = sys.argv[1], sys.argv[2], int(sys.argv[3])
    provider = OpenAIProvider()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment
    print("base_url", provider.base_url, flush=True)
    # chat: the chat completions model; responses: what "openai:..." means, the Responses API
    model = OpenAIChatModel("agent", provider=provider) if api == "chat" else "openai:agent"
    agent = Agent(model, instructions="Answer with the weather tool.")

    @agent.tool_plain
    def weather(city: str) -> str:
        print("tool", city, flush=True)
        return f"sunny in {city}"

    async def main():
        prompt = "What is the weather in Paris?"
        if mode == "stream":
            async with agent.run_stream(prompt) as result:
                output = await result.get_output()
        else:
            # The header names the agent's component in the log (the proxy does not forward it).
            settings = {"max_tokens": 64, "extra_headers": {"X-Sigil-Component": "weather"}}
            result = await agent.run(prompt, model_settings=settings)
            output = result.output
        usage = result.usage()
        print("output", output, flush=True)
        print("usage", usage.requests, usage.input_tokens, usage.output_tokens, flush=True)

    try:
        asyncio.run(main())
    except ModelHTTPError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        print("refused", exc.status_code, body.get("code"), flush=True)
        sys.exit(status)
    sys.exit(status)
    """
)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream(tool_arguments={"city": "Paris"}) as up:
        yield up


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIGIL_"))}
    env.update(SIGIL_HOME=str(home), NO_COLOR="1", OPENAI_API_KEY="sk-test-key-000000000000000000")
    return subprocess.run(
        [*SIGIL, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def run_agent(
    home: Path, upstream: Upstream, session: str, budget: int, api: str, mode: str, status: int
) -> subprocess.CompletedProcess[str]:
    script = home.parent / "agent.py"
    script.write_text(AGENT)
    return run(
        home, "run", "--session", session, "--budget", str(budget), "--upstream", upstream.url,
        "--", sys.executable, str(script), api, mode, str(status),
    )  # fmt: skip


def monitor(home: Path, session: str) -> dict[str, Any]:
    proc = run(home, "monitor", "--session", session, "--mode", "json", "--once")
    return json.loads(proc.stdout.splitlines()[0])


def events(home: Path, session: str) -> list[dict[str, Any]]:
    log = home / "logs" / "sessions" / session / "execution.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


def lines(stdout: str, key: str) -> list[list[str]]:
    return [line.split()[1:] for line in stdout.splitlines() if line.split()[:1] == [key]]


APIS = ["chat", "responses"]
MODES = ["run", "stream"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
def test_pydantic_ai_agent_round_trip_is_metered_exactly(
    upstream: Upstream, tmp_path: Path, api: str, mode: str
) -> None:
    home = tmp_path / "home"
    proc = run_agent(home, upstream, "pai", 50_000, api, mode, 7)
    assert proc.returncode == 7, proc.stderr  # the script's own status
    # The agent reached the proxy, not the upstream: its base URL is the one announced.
    [[base_url]] = lines(proc.stdout, "base_url")
    assert f"proxy {base_url.rstrip('/')}" in proc.stderr
    assert base_url.rstrip("/") != upstream.url
    # The tool-call round trip: the model called the tool, then answered with its result.
    assert lines(proc.stdout, "tool") == [["Paris"]]
    assert lines(proc.stdout, "output") == [["answer:", "sunny", "in", "Paris"]]
    assert len(upstream.requests) == 2
    assert [r.get("stream", False) for r in upstream.requests] == [mode == "stream"] * 2
    first, second = upstream.requests
    if api == "chat":
        assert first["tools"][0]["function"]["name"] == "weather"
        assert any(m.get("role") == "tool" for m in second["messages"])
        cap = [r.get("max_completion_tokens", r.get("max_tokens")) for r in upstream.requests]
    else:
        assert first["tools"][0]["name"] == "weather"
        assert any(i.get("type") == "function_call_output" for i in second["input"])
        cap = [r.get("max_output_tokens") for r in upstream.requests]
    # The agent's own cap went through (under the budget's); else the proxy's default.
    assert cap == [64 if mode == "run" else 4096] * 2

    # The agent's usage, the upstream's and the log's are the same numbers.
    reported = upstream.reported
    assert len(reported) == 2
    inp = sum(r.input_tokens for r in reported)
    out = sum(r.output_tokens for r in reported)
    assert lines(proc.stdout, "usage") == [["2", str(inp), str(out)]]
    log = events(home, "pai")
    done = [e for e in log if e["event_type"] == "step_complete"]
    assert [(e["metadata"]["input_tokens"], e["metadata"]["output_tokens"]) for e in done] == [
        (r.input_tokens, r.output_tokens) for r in reported
    ]
    assert all(e["metadata"]["stream"] is (mode == "stream") for e in done)
    endpoint = "/v1/chat/completions" if api == "chat" else "/v1/responses"
    assert all(e["metadata"]["endpoint"] == endpoint for e in done)
    state = monitor(home, "pai")
    assert state["tokens_used"] == upstream.totals() == inp + out > 0
    component = "weather" if mode == "run" else "agent"  # the header's name, else the model's
    assert {e["component"] for e in done} == {component}
    assert state["components"][component]["operations"] == 2
    assert state["components"][component]["tokens"] == inp + out
    # The agent's key reached the upstream; the proxy's own header did not.
    for headers in upstream.headers:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert lowered["authorization"] == "Bearer sk-test-key-000000000000000000"
        assert "x-sigil-component" not in lowered
    assert "sk-test-key" not in (home / "logs" / "sessions" / "pai" / "execution.jsonl").read_text()
    assert log[-1]["event_type"] == "session_error"
    assert "status 7" in log[-1]["metadata"]["error"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("api", APIS)
def test_pydantic_ai_agent_fails_fast_when_the_budget_is_spent(
    upstream: Upstream, tmp_path: Path, api: str, mode: str
) -> None:
    # 150 tokens: the first model request reserves its prompt's estimate (~70)
    # and its cap (64, the agent's max_tokens) and spends about 110; the
    # request carrying the tool result (a longer prompt, ~100) no longer fits
    # in what is left and is refused with 429 insufficient_quota, which neither
    # the openai SDK nor Pydantic AI retries.
    upstream.pieces = 1000  # each answer spends its whole cap
    home = tmp_path / "home"
    proc = run_agent(home, upstream, "tight", 150, api, mode, 0)
    assert proc.returncode == 3, proc.stderr
    assert lines(proc.stdout, "tool") == [["Paris"]]
    assert lines(proc.stdout, "refused") == [["429", "insufficient_quota"]]
    assert lines(proc.stdout, "output") == []
    # No retry storm: one request reached the upstream, one was refused, once.
    assert len(upstream.requests) == 1
    log = events(home, "tight")
    refused = [e for e in log if e["event_type"] == "step_error"]
    assert [e["metadata"]["category"] for e in refused] == ["budget"]
    state = monitor(home, "tight")
    assert state["status"] == "budget_exceeded"
    assert state["tokens_used"] == upstream.totals() > 10
