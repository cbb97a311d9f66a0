"""``sigil collect`` under many sessions and few descriptors.

Spans without a conversation ID are one session per trace; each open session
holds its lock, its log and a writer thread. collect keeps at most a bounded
number open (the least recently used one's run is ended early and reopened on
demand from its log), so a burst of traces never exhausts the descriptors; a
listening socket that runs out of them (many connections at once) waits with
one log line, not a traceback per attempt; shutdown is clean; the exit status
says when spans could not be written.

Real peers: the ``sigil collect`` command as a subprocess under a low
``RLIMIT_NOFILE``, fed OTLP/JSON over HTTP.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import wait_for
from sigil.telemetry.log_parser import session_history
from test_collect import Collector, _json_request, _json_span, steps

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

JS = {"Content-Type": "application/json"}


def _limit(fds: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fds, fds))

    return apply


class LimitedCollector(Collector):
    """``sigil collect`` with at most ``fds`` open descriptors."""

    def __init__(self, home: Path, log_path: Path, fds: int, *args: str) -> None:
        super().__init__(home, log_path, *args, preexec_fn=_limit(fds))
        self.port = int(self.base.rsplit(":", 1)[1])

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _trace(i: int) -> str:
    return f"{i:032x}"


def _one_trace(i: int, span: int = 1, tokens: tuple[int, int] = (10, 5)) -> bytes:
    # no conversation ID: the trace is the session
    return _json_request(_json_span(_trace(i), f"{span:016x}", tokens=tokens))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def test_a_burst_of_traces_keeps_descriptors_and_threads_bounded(
    home: Path, tmp_path: Path
) -> None:
    """600 traces, each its own session, under a limit of 256 descriptors: every
    request is answered 200, the process stays well under the limit, and each
    session has its tokens once, even those closed early and sent to again."""
    log_path = tmp_path / "collected"
    traces = 600
    collector = LimitedCollector(home, log_path, 256, "--idle", "600")
    try:
        with httpx.Client(timeout=30) as client:
            codes = [
                client.post(collector.url, content=_one_trace(i), headers=JS).status_code
                for i in range(1, traces + 1)
            ]
            assert codes == [200] * traces, {c: codes.count(c) for c in set(codes)}
            fds, threads = collector.fds(), collector.threads()
            assert fds < 200, fds
            assert threads < 100, threads
            # the first traces' sessions were closed early: their spans again are
            # duplicates, and a new span of theirs is counted once
            for i in range(1, 11):
                r = client.post(collector.url, content=_one_trace(i), headers=JS)
                assert r.status_code == 200
                r = client.post(collector.url, content=_one_trace(i, 2, (1, 1)), headers=JS)
                assert r.status_code == 200
        code, out, err = collector.stop()
    finally:
        collector.kill()
    assert code == 0, err
    assert "Traceback" not in err, err[-2000:]
    assert f"{traces + 10} written, 10 duplicates" in out, out
    sessions = sorted((log_path / "sessions").iterdir())
    assert len(sessions) == traces
    for i in range(1, traces + 1):
        sdir = log_path / "sessions" / _trace(i)
        history = session_history(sdir)
        assert history.tokens == (17 if i <= 10 else 15), (i, history.tokens)
        # every run ended: the early closes too
        assert all(run.status == "complete" for run in history.runs), i
        assert len(steps(sdir)) == (2 if i <= 10 else 1)


def _hold_connections(port: int, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        held.append(s)
    return held


def _served(url: str) -> bool:
    try:
        return httpx.post(url, content=_one_trace(2), headers=JS, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _release(held: list[socket.socket]) -> None:
    for s in held:
        s.close()


def test_connections_beyond_the_descriptors_wait_with_one_line_and_stop_cleanly(
    home: Path, tmp_path: Path
) -> None:
    """More connections at once than descriptors: the listener backs off and says
    so once (no traceback per accept), serves again once they close, and a stop
    while it is backing off exits 0 without a traceback."""
    log_path = tmp_path / "collected"
    collector = LimitedCollector(home, log_path, 64, "--idle", "600")
    try:
        assert httpx.post(collector.url, content=_one_trace(1), headers=JS).status_code == 200
        held = _hold_connections(collector.port, 90)
        time.sleep(3.5)  # several accept retries
        assert collector.fds() <= 64
        _release(held)
        # served again once the descriptors are back
        wait_for("a request to be served again", lambda: _served(collector.url), timeout=30)
        held = _hold_connections(collector.port, 90)
        time.sleep(1.5)
        code, out, err = collector.stop()
        _release(held)
    finally:
        collector.kill()
    assert code == 0, err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 4, err[-3000:]
    assert any("open files" in line for line in lines), err
    assert "2 written" in out, out
    for i in (1, 2):
        assert session_history(log_path / "sessions" / _trace(i)).tokens == 15


def test_spans_that_could_not_be_written_make_the_exit_status_1(home: Path, tmp_path: Path) -> None:
    """A session whose log cannot be opened: its requests get 503 and, when collect
    stops, the exit status is 1 with one line saying how many spans were refused."""
    log_path = tmp_path / "collected"
    (log_path / "sessions").mkdir(parents=True)
    (log_path / "sessions" / _trace(7)).write_text("not a directory")
    collector = LimitedCollector(home, log_path, 1024, "--idle", "600")
    try:
        r = httpx.post(collector.url, content=_one_trace(7), headers=JS)
        assert r.status_code == 503, r.text
        assert httpx.post(collector.url, content=_one_trace(8), headers=JS).status_code == 200
        code, out, err = collector.stop()
    finally:
        collector.kill()
    assert code == 1, (out, err)
    assert "Traceback" not in err, err
    assert "1 written" in out, out
    assert "1 refused" in out + err, (out, err)


# -- an agent's aggregate span after its session was closed -------------------------------

AGENT_TRACE = "ab" * 16
PARENT = "1" * 16


def _agent_span(span: str, parent: str | None, tokens: tuple[int, int]) -> dict[str, object]:
    """A span of conversation ``conv-1``: a model call (child of ``parent``) or,
    without a parent, the agent's span reporting its calls' usage again."""
    attrs = [
        {
            "key": "gen_ai.operation.name",
            "value": {"stringValue": "chat" if parent else "invoke_agent"},
        },
        {"key": "gen_ai.conversation.id", "value": {"stringValue": "conv-1"}},
        {"key": "gen_ai.agent.name", "value": {"stringValue": "agent"}},
        {"key": "gen_ai.usage.input_tokens", "value": {"intValue": str(tokens[0])}},
        {"key": "gen_ai.usage.output_tokens", "value": {"intValue": str(tokens[1])}},
    ]
    span_json: dict[str, object] = {
        "traceId": AGENT_TRACE,
        "spanId": span,
        "name": "chat" if parent else "invoke_agent",
        "kind": 1,
        "attributes": attrs,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000001000000000",
    }
    if parent:
        span_json["parentSpanId"] = parent
    return span_json


CHILDREN = _json_request(
    _agent_span("2" * 16, PARENT, (100, 10)), _agent_span("3" * 16, PARENT, (200, 20))
)
AGGREGATE = _json_request(_agent_span(PARENT, None, (300, 30)))


def _monitor_tokens(home: Path, log_path: Path) -> int:
    import orjson

    from conftest import run_cli

    proc = run_cli(
        home,
        "monitor",
        "--session",
        "conv-1",
        "--once",
        "--mode",
        "json",
        "--log-path",
        str(log_path),
    )
    assert proc.returncode == 0, proc.stderr
    return int(orjson.loads(proc.stdout.splitlines()[0])["tokens_used"])


def _assert_counted_once(home: Path, log_path: Path) -> None:
    sdir = log_path / "sessions" / "conv-1"
    assert session_history(sdir).tokens == 330
    assert _monitor_tokens(home, log_path) == 330
    (aggregate,) = [e for e in steps(sdir) if e["metadata"]["span_id"] == PARENT]
    assert aggregate["tokens"] == 0 and aggregate["metadata"]["aggregate"] is True
    assert aggregate["metadata"]["reported_input_tokens"] == 300


def test_an_aggregate_arriving_after_the_idle_close_is_counted_once(
    home: Path, tmp_path: Path
) -> None:
    from sigil.core.locks import is_session_locked

    log_path = tmp_path / "collected"
    sdir = log_path / "sessions" / "conv-1"
    collector = LimitedCollector(home, log_path, 1024, "--idle", "0.3")
    try:
        assert httpx.post(collector.url, content=CHILDREN, headers=JS).status_code == 200
        wait_for(
            "the idle close",
            lambda: (
                sdir.is_dir()
                and session_history(sdir).runs
                and session_history(sdir).runs[-1].status == "complete"
                and not is_session_locked(sdir)
            ),
        )
        assert httpx.post(collector.url, content=AGGREGATE, headers=JS).status_code == 200
        code, out, err = collector.stop()
    finally:
        collector.kill()
    assert code == 0, err
    assert "3 written" in out, out
    _assert_counted_once(home, log_path)


def test_an_aggregate_arriving_after_a_restart_is_counted_once(home: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "collected"
    for body in (CHILDREN, AGGREGATE):
        collector = LimitedCollector(home, log_path, 1024, "--idle", "600")
        try:
            assert httpx.post(collector.url, content=body, headers=JS).status_code == 200
            code, _, err = collector.stop()
        finally:
            collector.kill()
        assert code == 0, err
    _assert_counted_once(home, log_path)


def test_an_aggregate_arriving_after_its_session_was_evicted_is_counted_once(
    home: Path, tmp_path: Path
) -> None:
    """Under 128 descriptors a few sessions are open at once: the children's
    session is closed early by other traces, and the parent still counts 0."""
    log_path = tmp_path / "collected"
    collector = LimitedCollector(home, log_path, 128, "--idle", "600")
    try:
        with httpx.Client(timeout=30) as client:
            assert client.post(collector.url, content=CHILDREN, headers=JS).status_code == 200
            for i in range(1, 41):
                r = client.post(collector.url, content=_one_trace(i), headers=JS)
                assert r.status_code == 200
            assert client.post(collector.url, content=AGGREGATE, headers=JS).status_code == 200
        code, out, err = collector.stop()
    finally:
        collector.kill()
    assert code == 0, err
    assert "43 written" in out, out
    history = session_history(log_path / "sessions" / "conv-1")
    assert len(history.runs) == 2  # closed early, reopened for the parent
    _assert_counted_once(home, log_path)
