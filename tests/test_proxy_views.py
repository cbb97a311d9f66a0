"""Every view of a metered session says the same numbers (contract 12), after a
clean stop and after ``kill -9`` of ``sigil proxy`` with calls in flight.

The real command in front of a loopback upstream (tests/proxy_upstream.py),
called by the official ``openai`` SDK or plain HTTP; the views are the real
commands: ``sigil monitor --once --mode json``, ``sigil sessions --json``,
``sigil report session --json`` and the proxy's end line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy_upstream import Upstream

SIGIL = [sys.executable, "-m", "sigil"]
KEY = "sk-proj-THISISASECRETKEY0123456789abcdefABCDEF"


def env_of(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIGIL_"))}
    env.update(SIGIL_HOME=str(home), NO_COLOR="1")
    return env


def sigil(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SIGIL, *args], env=env_of(home), capture_output=True, text=True, timeout=120, check=False
    )


def start(home: Path, session: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*SIGIL, "proxy", "--session", session, "--port", "0", *args],
        env=env_of(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Proxy: "):
            return proc, line.split()[1]
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"proxy did not start: {err}")


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def events(home: Path, session: str) -> list[dict[str, Any]]:
    log = home / "logs" / "sessions" / session / "execution.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def monitor(home: Path, session: str) -> dict[str, Any]:
    out = sigil(home, "monitor", "--session", session, "--once", "--mode", "json").stdout
    return dict(json.loads(out.splitlines()[0]))


def sessions(home: Path, session: str) -> dict[str, Any]:
    rows = json.loads(sigil(home, "sessions", "--json").stdout)
    return next(r for r in rows if r.get("session_id", r.get("session")) == session)


def report(home: Path, session: str) -> dict[str, int]:
    """The session's calls of unknown usage and held tokens, by model, summed."""
    proc = sigil(home, "report", "model", "--session-prefix", session, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    return {
        k: sum(int(r.get(k) or 0) for r in rows) for k in ("unknown_usage_calls", "tokens_held")
    }


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sessions_counts_the_calls_of_unknown_usage_as_the_monitor_does(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Finding 8: the ledger alone (tokens.json, the log unchanged) is the
    history `sigil sessions` reads; its calls of unknown usage are counted."""
    home = tmp_path / "home"
    with Upstream() as up:
        proc, url = start(home, "v1", "--upstream", up.url, "--budget", "100000")
        procs.append(proc)
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        msgs = [{"role": "user", "content": "x" * 40}]
        client.chat.completions.create(model="m", messages=msgs)
        client.chat.completions.create(model="nousage", messages=msgs)
        list(client.chat.completions.create(model="nousage", messages=msgs, stream=True))
        code, err = stop(proc)
    assert code == 0, err
    assert "2 with usage unknown" in err, err
    mon = monitor(home, "v1")
    assert mon["unknown_usage_calls"] == 2 and mon["tokens_held"] > 0
    row = sessions(home, "v1")
    assert row["unknown_usage_calls"] == 2, row


def test_what_is_left_of_the_budget_counts_the_held_tokens_in_every_view(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Finding 11: left = budget - used - held (never below 0), the same in the
    monitor, the run's final event and the ``budget_exceeded`` event."""
    home = tmp_path / "home"
    with Upstream() as up:
        proc, url = start(home, "v2", "--upstream", up.url, "--budget", "3000")
        procs.append(proc)
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        msgs = [{"role": "user", "content": "x" * 40}]
        client.chat.completions.create(model="m", messages=msgs)
        # No usage: its reservation (the whole rest of the budget) stays held.
        client.chat.completions.create(model="nousage", messages=msgs)
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="m", messages=msgs)
        code, err = stop(proc)
    assert code == 3, err
    log = events(home, "v2")
    exceeded = [e for e in log if e["event_type"] == "budget_exceeded"]
    assert exceeded and exceeded[-1]["metadata"]["budget_remaining"] == 0
    final = log[-1]
    assert final["event_type"] == "session_error"
    mon = monitor(home, "v2")
    assert mon["status"] == "budget_exceeded"
    held = mon["tokens_held"]
    assert held > 0
    assert mon["tokens_remaining"] == max(0, 3000 - mon["tokens_used"] - held) == 0
    assert final["metadata"]["budget_remaining"] == mon["tokens_remaining"]


def _call(url: str, out: list[Any]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    try:
        out.append(httpx.post(url + "/chat/completions", json=body, timeout=30).status_code)
    except httpx.HTTPError as exc:
        out.append(type(exc).__name__)


def _until(what: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_calls_in_flight_when_the_proxy_is_killed_stay_held_in_every_view_and_the_next_run(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Finding 2: kill -9 with calls in flight leaves only their ``step_start``s;
    the upstream spent the tokens. Their reservations are held (unknown usage)
    once the run is dead, in every view, and the next run starts holding them."""
    home = tmp_path / "home"
    budget = 100_000
    with Upstream(delay=3.0) as up:
        proc, url = start(home, "k9", "--upstream", up.url, "--budget", str(budget))
        procs.append(proc)
        out: list[Any] = []
        threads = [threading.Thread(target=_call, args=(url, out)) for _ in range(5)]
        for t in threads:
            t.start()

        def started() -> bool:
            try:
                log = events(home, "k9")
            except FileNotFoundError:
                return False
            return sum(e["event_type"] == "step_start" for e in log) == 5

        _until(started)
        # While the run is live the calls are in flight, not held.
        live = monitor(home, "k9")
        assert live["tokens_held"] == 0 and live["unknown_usage_calls"] == 0, live
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for t in threads:
            t.join(30)
    log = events(home, "k9")
    startsev = [e for e in log if e["event_type"] == "step_start"]
    assert len(startsev) == 5 and len(log) == 6  # session_start and the 5 starts
    reserved = sum(
        e["metadata"].get("prompt_tokens_reserved", 0) + e["metadata"].get("max_tokens", 0)
        for e in startsev
    )
    assert reserved > 0

    # The writer is gone: the calls hold their reservations, unknown usage.
    mon = monitor(home, "k9")
    assert mon["tokens_used"] == 0
    assert (mon["unknown_usage_calls"], mon["tokens_held"]) == (5, reserved), mon
    assert mon["tokens_remaining"] == budget - reserved
    assert sessions(home, "k9")["unknown_usage_calls"] == 5
    # The replay's end is the end of the log: its writer is gone there too.
    played = sigil(home, "replay", "k9", "--mode", "json", "--speed", "max")
    assert played.returncode == 0, played.stderr
    end = json.loads(played.stdout.splitlines()[-1])
    assert end["type"] == "final" and end["status"] == mon["status"] == "incomplete"
    assert (end["unknown_usage_calls"], end["tokens_held"], end["tokens_remaining"]) == (
        5,
        reserved,
        mon["tokens_remaining"],
    ), end

    # The next run starts holding them, and every view agrees after it.
    with Upstream() as up:
        proc, url = start(home, "k9", "--upstream", up.url)
        procs.append(proc)
        openai.OpenAI(base_url=url, api_key=KEY, max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "again"}]
        )
        code, err = stop(proc)
        spent = up.totals()
    assert code == 0, err
    log = events(home, "k9")
    second = [e for e in log if e["event_type"] == "session_start"][-1]
    assert second["metadata"]["tokens_held_before_run"] == reserved
    assert "1 calls" in err or "1 call" in err, err
    final = log[-1]
    assert final["metadata"]["budget_remaining"] == budget - spent - reserved
    mon = monitor(home, "k9")
    assert (mon["tokens_used"], mon["unknown_usage_calls"], mon["tokens_held"]) == (
        spent,
        5,
        reserved,
    ), mon
    assert mon["tokens_remaining"] == budget - spent - reserved
    assert sessions(home, "k9")["unknown_usage_calls"] == 5
    rep = report(home, "k9")
    assert (rep["unknown_usage_calls"], rep["tokens_held"]) == (5, reserved), rep
    ledger = json.loads((home / "logs" / "sessions" / "k9" / "tokens.json").read_text())
    held = sum(c.get("tokens_held", 0) for c in ledger["component_totals"].values())
    assert held == reserved


def test_the_end_line_counts_a_call_still_open_at_the_end_as_every_view_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call the transport could not record by the end of its abort wait is
    left with its ``step_start`` only, its reservation taken. The run's end
    settles it as every view does (contract 12: a run that ended holds the
    reservations of the calls it left open, unknown usage): the end event's
    ``budget_remaining`` and the end line are the session model's, what
    ``monitor --once`` shows, not the meter's (which holds no open call)."""
    import asyncio

    from sigil.interfaces.cli.commands.proxy import MeteredSession, check_options
    from sigil.proxy.usage import Usage

    home = tmp_path / "home"
    for name in [k for k in os.environ if k.startswith(("SIGIL_", "OPENAI_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SIGIL_HOME", str(home))
    budget = 100_000
    options = check_options(
        session_id="open1", budget=str(budget), upstream="http://127.0.0.1:9/v1", port=0,
        host=None, token=None, log_path=None, call_cap=None,
    )  # fmt: skip
    session = MeteredSession(options)

    async def run() -> None:
        meter = await session.prepare("calls left open")
        await session.begin("calls left open", "http://127.0.0.1:1/v1")
        granted = meter.try_admit(50, prompt=10)
        assert granted == 50
        done = meter.start(component="m", endpoint="chat.completions", model="m", stream=False,
                           granted=granted, requested=50, prompt=10)  # fmt: skip
        meter.complete(done, Usage(10, 20))
        granted = meter.try_admit(100, prompt=20)
        assert granted == 100
        # Never settled: the state a call the abort wait could not record leaves.
        meter.start(component="m", endpoint="chat.completions", model="m", stream=False,
                    granted=granted, requested=100, prompt=20)  # fmt: skip
        await session.end("complete", None)

    asyncio.run(run())
    held = 20 + 100
    final = events(home, "open1")[-1]
    assert final["event_type"] == "session_complete"
    mon = monitor(home, "open1")
    assert (mon["tokens_used"], mon["unknown_usage_calls"], mon["tokens_held"]) == (30, 1, held)
    assert mon["tokens_remaining"] == budget - 30 - held
    assert final["metadata"]["budget_remaining"] == mon["tokens_remaining"], final["metadata"]
    assert final["metadata"]["calls_usage_unknown"] == mon["unknown_usage_calls"]
    assert final["metadata"]["tokens_held_unknown"] == mon["tokens_held"]
    line = session.summary()
    assert "1 with usage unknown" in line and f"({held:,} tokens of the budget held" in line, line
    assert sessions(home, "open1")["unknown_usage_calls"] == 1


def test_a_pipeline_run_after_a_killed_proxy_run_ends_on_the_models_budget_left(
    tmp_path: Path,
) -> None:
    """The killed proxy run's open calls hold their reservations in every view;
    a pipeline run on the same session then ends with what the model leaves of
    the budget (budget - used - held), as ``monitor --once`` shows it, not the
    budget less the tokens alone."""
    from test_replay_modes import KILLED_HELD, write_killed_proxy_session

    home = tmp_path / "home"
    write_killed_proxy_session(home / "logs", "ko1")
    proc = sigil(home, "orchestrate", "--session", "ko1", "--task", "Analyze Acme Corp",
                 "--provider", "offline")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    final = events(home, "ko1")[-1]
    assert final["event_type"] == "session_complete" and final["metadata"]["run"] == 2
    mon = monitor(home, "ko1")
    assert (mon["unknown_usage_calls"], mon["tokens_held"]) == (2, KILLED_HELD), mon
    assert mon["tokens_remaining"] == 50_000 - mon["tokens_used"] - KILLED_HELD
    meta = final["metadata"]
    assert meta["budget_remaining"] == mon["tokens_remaining"], meta
    assert (meta["total_tokens"], meta["run_tokens"]) == (
        mon["tokens_used"],
        mon["run"]["tokens_used"],
    )
