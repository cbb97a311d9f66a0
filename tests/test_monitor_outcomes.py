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
import subprocess
from pathlib import Path

import orjson
import pytest

from conftest import SIGIL, isolated_env

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
