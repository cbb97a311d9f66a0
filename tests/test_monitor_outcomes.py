"""What the monitor concludes about a finished run (issue 11 items 3 and 4, issue 10 item 6).

A run whose final event says ``complete`` is not complete for a reader that
knows events are missing (a seq gap no segment fills, or events the writer had
to drop on a full disk): the outcome is "incomplete data", exit 1, with the
count of missing events. A run recorded as ``interrupted`` (SIGINT/SIGTERM on
the orchestrator) is shown as interrupted, with the shell's code 130, not as a
failure. Real ``sigil monitor`` processes on hand-written logs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from conftest import SIGIL, isolated_env
from live_monitor import json_monitor

pytestmark = pytest.mark.slow

SESSION = "outcome-1"


def _event(seq: int, kind: str, component: str, tokens: int = 0, **meta: object) -> bytes:
    line = {
        "timestamp": f"2026-01-15T10:00:{seq:02d}.000000+00:00",
        "session_id": SESSION,
        "event_type": kind,
        "component": component,
        "message": f"{kind} {component}",
        "tokens": tokens,
        "metadata": meta,
        "seq": seq,
    }
    return orjson.dumps(line) + b"\n"


def _write(home: Path, events: list[bytes]) -> None:
    session = home / "logs" / "sessions" / SESSION
    session.mkdir(parents=True, mode=0o700)
    (session / "execution.jsonl").write_bytes(b"".join(events))


def _monitor(home: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SIGIL, "monitor", "--session", SESSION, "--mode", mode, "--once"],
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _final(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    finals = [obj for obj in lines if obj.get("type") == "final"]
    assert len(finals) == 1, proc.stdout
    return finals[0]


def _start(seq: int = 0) -> bytes:
    return _event(seq, "session_start", "orchestrator", budget=10_000, run=1)


def test_a_seq_gap_makes_a_complete_run_incomplete_data(tmp_path: Path) -> None:
    events = [_start(0)]
    events += [_event(seq, "step_complete", "reasoning", 100) for seq in range(1, 4)]
    # seq 4..7 are gone (say, a rotated segment deleted by logrotate's rotate count)
    events += [_event(seq, "step_complete", "reasoning", 100) for seq in range(8, 10)]
    events.append(_event(10, "session_complete", "orchestrator", status="complete"))
    _write(tmp_path, events)

    proc = _monitor(tmp_path, "json")
    assert proc.returncode == 1, proc.stderr
    final = _final(proc)
    assert final["outcome"] == "incomplete_data"
    assert final["missing_events"] == 4
    assert final["tokens_used"] == 500

    stream = _monitor(tmp_path, "stream")
    assert stream.returncode == 1
    assert "DATA MISSING" in stream.stdout
    assert "4 events missing" in stream.stdout


def test_dropped_events_make_a_complete_run_incomplete_data(tmp_path: Path) -> None:
    events = [
        _start(0),
        _event(1, "step_complete", "reasoning", 100),
        # The writer's notice: 3 events it could not write, carrying 240 tokens.
        _event(2, "events_dropped", "writer", 240, dropped=3, dropped_tokens=240),
        _event(3, "session_complete", "orchestrator", status="complete"),
    ]
    _write(tmp_path, events)
    proc = _monitor(tmp_path, "json")
    assert proc.returncode == 1, proc.stderr
    final = _final(proc)
    assert final["outcome"] == "incomplete_data"
    assert final["dropped_events"] == 3
    # The dropped events' tokens were spent: they count (contract 2).
    assert final["tokens_used"] == 340


def test_a_complete_run_without_gaps_is_complete(tmp_path: Path) -> None:
    events = [_start(0), _event(1, "step_complete", "reasoning", 100)]
    events.append(_event(2, "session_complete", "orchestrator", status="complete"))
    _write(tmp_path, events)
    proc = _monitor(tmp_path, "json")
    assert proc.returncode == 0, proc.stderr
    final = _final(proc)
    assert final["outcome"] == "complete"
    assert final["missing_events"] == 0


def test_an_interrupted_run_is_shown_as_interrupted_with_code_130(tmp_path: Path) -> None:
    events = [
        _start(0),
        _event(1, "step_complete", "routing", 100),
        _event(2, "session_error", "orchestrator", status="interrupted", reason="SIGINT"),
    ]
    _write(tmp_path, events)
    proc = _monitor(tmp_path, "json")
    assert proc.returncode == 130, proc.stderr
    assert _final(proc)["outcome"] == "interrupted"

    stream = _monitor(tmp_path, "stream")
    assert stream.returncode == 130
    assert "RUN INTERRUPTED" in stream.stdout
    assert "FAILED" not in stream.stdout
    assert f"sigil orchestrate --session {SESSION} --resume" in stream.stdout


# A process holding the session's lock while a line arrives on its stdin, as a
# Python-API writer (ExecutionLogger) does while it is open (contract 7).
HOLDER = """
import sys
from pathlib import Path
from sigil.core.locks import SessionLock
lock = SessionLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
sys.stdin.readline()
"""


def _api_session(home: Path) -> Path:
    """Events written without a run, as the README's Python API writes them."""
    _write(
        home, [_event(0, "step_complete", "routing", 50), _event(1, "step_complete", "memory", 150)]
    )
    return home / "logs" / "sessions" / SESSION


def _hold(session: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(session)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "locked\n"
    return holder


def _step(holder: subprocess.Popen[str], expect: str) -> None:
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    if expect:
        assert holder.stdout.readline() == expect


def test_a_live_writer_without_a_run_is_running_not_waiting(tmp_path: Path) -> None:
    """Events, no session_start, the lock held: ``sigil sessions`` says running, and
    so does every mode of ``sigil monitor --once``; once the lock is free, both say
    waiting (nothing says the run that never started is incomplete)."""
    holder = _hold(_api_session(tmp_path))
    try:
        proc = _monitor(tmp_path, "json")
        assert proc.returncode == 0, proc.stderr
        objects = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [o["status"] for o in objects] == ["running", "running"]
        assert _final(proc)["outcome"] == "snapshot"
        minimal = _monitor(tmp_path, "minimal")
        assert minimal.stdout.splitlines()[0].endswith(" running"), minimal.stdout
        assert "SESSION RUNNING" in minimal.stdout and "Status:    RUNNING" in minimal.stdout
        _step(holder, "released\n")
        after = _monitor(tmp_path, "json")
        assert after.returncode == 0, after.stderr
        assert (_final(after)["status"], _final(after)["outcome"]) == ("waiting", "waiting")
    finally:
        holder.kill()
        holder.wait()


def test_the_live_monitor_follows_a_writer_without_a_run_coming_and_going(
    tmp_path: Path,
) -> None:
    """The tail probes the lock while it waits for a run: a Python-API writer taking
    the session's lock shows as running, letting it go as waiting again."""
    session = _api_session(tmp_path)
    monitor = json_monitor(tmp_path, SESSION)
    holder = None
    try:
        assert monitor.stdout is not None

        def next_status() -> str:
            line = monitor.stdout.readline()  # type: ignore[union-attr]
            assert line, monitor.stderr.read()  # type: ignore[union-attr]
            return str(json.loads(line)["status"])

        assert next_status() == "waiting"
        holder = _hold(session)
        assert next_status() == "running"
        _step(holder, "released\n")
        assert next_status() == "waiting"
        monitor.send_signal(signal.SIGINT)
        out, _ = monitor.communicate(timeout=30)
        assert monitor.returncode == 130
        assert json.loads(out.splitlines()[-1])["outcome"] == "stopped"
    finally:
        for proc in (monitor, holder):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def _abandoned(home: Path) -> None:
    """A run whose writer died mid-step: no final event, and nobody holds the lock."""
    _write(
        home,
        [_start(0), _event(1, "step_complete", "routing", 100), _event(2, "step_start", "memory")],
    )


def test_a_dead_writers_run_is_incomplete_in_the_monitor_run_too(tmp_path: Path) -> None:
    """The session is incomplete, and so is its run: the json's ``run.status`` does
    not say ``running`` beside a top-level ``incomplete`` (the OTLP root span of
    that run says ``incomplete`` too)."""
    _abandoned(tmp_path)
    proc = _monitor(tmp_path, "json")
    assert proc.returncode == 1, proc.stderr
    final = _final(proc)
    assert (final["status"], final["outcome"]) == ("incomplete", "incomplete")
    assert final["run"]["status"] == "incomplete"


def test_a_dead_writers_run_is_incomplete_in_sessions_run_details(tmp_path: Path) -> None:
    _abandoned(tmp_path)
    proc = subprocess.run(
        [*SIGIL, "sessions", "--json"],
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    (row,) = json.loads(proc.stdout)
    assert row["status"] == "incomplete"
    assert [r["status"] for r in row["run_details"]] == ["incomplete"]
