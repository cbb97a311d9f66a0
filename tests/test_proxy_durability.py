"""Issue 14 review, findings 2 and 9, end to end: a real ``sigil proxy``, the
official ``openai`` SDK, the loopback upstream of tests/proxy_upstream.py.

Finding 2: a call is answered only once its record has reached the OS (the
writer's ``write(2)`` done), so ``kill -9`` of the proxy right after an answer
loses no answered call. Finding 9: one refused oversized prompt does not end the
session as ``budget_exceeded`` while the budget can still admit a call.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

import test_proxy
from proxy_upstream import Upstream
from test_proxy import Proxy, steps

upstream = test_proxy.upstream
start_proxy = test_proxy.start_proxy

MSGS = [{"role": "user", "content": "x"}]


def _config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text(text)


def _kill9(proxy: Proxy) -> list[dict[str, object]]:
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait(timeout=30)
    return [json.loads(line) for line in proxy.log_file.read_text().splitlines()]


def test_every_answered_call_is_in_the_log_when_the_proxy_is_killed_at_once(
    upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Finding 2: 30 calls answered, kill -9 0 ms later, 9 of 30 ``step_complete``
    in the log. The writer's interval is 30 s here: an answered call's record
    must not wait for it (it is written at once, for the call)."""
    _config(tmp_path / "home", "logging:\n  flush_interval_seconds: 30\n")
    proxy = start_proxy("--upstream", upstream.url)
    client = proxy.client(max_retries=0)
    for _ in range(10):
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=5)
    for _ in range(5):
        stream = client.chat.completions.create(model="m", messages=MSGS, max_tokens=5, stream=True)
        for _chunk in stream:
            pass
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.chat.completions.create(model="m", messages=MSGS, max_tokens=5)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    events = _kill9(proxy)
    done = steps(events, "step_complete")
    assert len(done) == 30
    assert sum(int(e["tokens"]) for e in events) == upstream.totals()  # type: ignore[call-overload]


def test_a_refused_oversized_prompt_does_not_end_the_session_as_budget_exceeded(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Finding 9: one prompt larger than the whole budget is refused (429), the
    calls after it succeed, and the stop ended the run as ``budget_exceeded``
    (exit 3) with 95% of the budget left. The budget can still admit a call:
    the run is complete (exit 0)."""
    proxy = start_proxy("--budget", "2000", "--upstream", upstream.url)
    client = proxy.client()
    big = [{"role": "user", "content": "lorem ipsum dolor sit amet " * 2000}]
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="m", messages=big, max_tokens=5)
    assert "does not fit" in refused.value.message
    for _ in range(3):
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=5)
    code, _, err = proxy.stop()
    assert code == 0, err
    events = proxy.events()
    assert events[-1]["event_type"] == "session_complete"
    assert events[-1]["metadata"]["status"] == "complete"
    assert proxy.monitor()["status"] == "complete"


def test_a_budget_too_small_for_any_call_ends_the_session_as_budget_exceeded(
    upstream: Upstream, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """The other way: what is left (2 tokens) cannot admit even the least call
    (a prompt's format tokens and one output token), though the budget's
    ``exceeded`` threshold (1.0 here) is not reached: a refused call means the
    budget ran out, exit 3."""
    _config(tmp_path / "home", "token_budget:\n  exceeded_threshold: 1.0\n")
    proxy = start_proxy("--budget", "41", "--upstream", upstream.url)
    client = proxy.client()
    client.chat.completions.create(model="m", messages=MSGS, max_tokens=1)
    assert upstream.totals() == 39  # 38 in + 1 out: 2 of 41 left
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=1)
    assert "does not fit" in refused.value.message
    code, _, err = proxy.stop()
    assert code == 3, err
    events = proxy.events()
    assert events[-1]["metadata"]["status"] == "budget_exceeded"
    assert "did not fit" in events[-1]["metadata"]["error"]


def test_the_loggers_wait_writes_at_once_and_shares_one_write(tmp_path: Path) -> None:
    """The wait API under the proxy: with a one-hour flush interval, a waiter's
    events are in the file when it returns, threads waiting together share
    writes, and the writer's fsync stays on its own schedule."""
    from sigil.telemetry.execution_logger import ExecutionLogger

    logger = ExecutionLogger("w1", tmp_path, buffer_size=1 << 20, flush_interval=3600)
    logger.wait_written()  # nothing logged: returns at once
    seq = logger.log_event_sync("step_complete", "c", "m", 3)
    logger.wait_written(seq, timeout=30)
    assert len(logger.log_file.read_bytes().splitlines()) == 1

    def worker() -> None:
        for _ in range(50):
            logger.wait_written(logger.log_event_sync("step_complete", "c", "m", 1), timeout=30)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = logger.stats()
    assert len(logger.log_file.read_bytes().splitlines()) == 401
    assert stats["flushes"] <= 401 and stats["fsyncs"] == 0
    logger.close_sync()
    logger.wait_written(seq, timeout=0)  # closed, all written: nothing to wait for


def test_a_slow_write_is_not_taken_for_a_failing_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wait for the write that times out (a slow disk: an fsync under way)
    is not the log failing (review): taking it for one refused every later call
    of the run as unrecorded, on a healthy disk. The event stays queued and the
    writer writes it; a real failure shows in the writer's counters."""
    from types import SimpleNamespace

    from sigil.interfaces.cli.commands import proxy as command
    from sigil.telemetry.execution_logger import ExecutionLogger

    logger = ExecutionLogger("w2", tmp_path, buffer_size=1 << 20, flush_interval=3600)
    session = object.__new__(command.MeteredSession)
    session.orchestrator = SimpleNamespace(execution_logger=logger)  # type: ignore[assignment]
    session._log = SimpleNamespace(dropped=0)  # type: ignore[assignment]
    session._unrecorded_error = None
    session._wait_error = None
    monkeypatch.setattr(command, "WRITE_WAIT_SECONDS", 0.0)  # every wait times out
    logger.log_event_sync("step_complete", "c", "m", 3)
    session._written()
    assert session._unrecorded_error is None
    assert session.unrecorded_now() is None
    logger.close_sync()
    assert len(logger.log_file.read_bytes().splitlines()) == 1
