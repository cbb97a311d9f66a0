"""``sigil sessions`` reads every number from the session model (issue 10 items 3
and 8): STARTED is the first run's start, DURATION the wall time from there to
the last event (to now while live), ``runs`` the model's runs; a finished
session is read without a tailer; a log that is not a regular file is bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from conftest import SIGIL, isolated_env, run_cli
from sigil.core.locks import SessionLock

TASK = "Analyze Acme Corp"


def _rows(home: Path) -> dict[str, dict[str, Any]]:
    proc = run_cli(home, "sessions", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {row["session_id"]: row for row in json.loads(proc.stdout)}


def _event(when: datetime, seq: int, event_type: str, tokens: int = 0, **metadata: object) -> bytes:
    record = {
        "timestamp": when.isoformat(),
        "session_id": "s",
        "event_type": event_type,
        "component": "orchestrator" if event_type.startswith("session") else "reasoning",
        "message": event_type,
        "tokens": tokens,
        "metadata": metadata,
        "seq": seq,
    }
    return json.dumps(record).encode() + b"\n"


def test_started_is_the_first_runs_start_and_duration_spans_all_runs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for _ in range(2):
        proc = run_cli(home, "orchestrate", "--task", TASK, "--session", "two", "--json")
        assert proc.returncode == 0, proc.stderr
        time.sleep(2.0)
    tokens = json.loads((home / "logs" / "sessions" / "two" / "tokens.json").read_text())
    row = _rows(home)["two"]
    assert row["runs"] == 2
    assert [r["run"] for r in row["run_details"]] == [1, 2]
    assert sum(r["tokens_used"] for r in row["run_details"]) == row["tokens_used"]
    assert row["tokens_used"] == tokens["total_used"]
    first_start = datetime.fromisoformat(tokens["runs"][0]["started_at"])
    second_start = datetime.fromisoformat(tokens["runs"][1]["started_at"])
    assert abs((datetime.fromisoformat(row["started_at"]) - first_start).total_seconds()) < 0.5
    # Wall time from the first start to the last event: it includes the 2 s gap.
    assert row["duration_seconds"] >= (second_start - first_start).total_seconds()


def test_a_live_sessions_duration_runs_to_now(tmp_path: Path) -> None:
    home = tmp_path / "home"
    session = home / "logs" / "sessions" / "live"
    session.mkdir(parents=True)
    start = datetime.now(UTC) - timedelta(seconds=3)
    (session / "execution.jsonl").write_bytes(
        _event(start, 0, "session_start", budget=1000, run=1)
        + _event(start + timedelta(seconds=0.1), 1, "step_complete", 50)
    )
    with SessionLock(session):
        row = _rows(home)["live"]
    assert row["status"] == "running"
    assert row["duration_seconds"] >= 2.9, row
    assert row["runs"] == 1 and row["tokens_used"] == 50


def test_a_fifo_log_is_bad_input_naming_the_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    session = home / "logs" / "sessions" / "pipe"
    session.mkdir(parents=True)
    fifo = session / "execution.jsonl"
    os.mkfifo(fifo)
    for args in (["sessions"], ["sessions", "--json"]):
        proc = run_cli(home, *args, timeout=30)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(fifo) in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_reading_finished_sessions_opens_no_watcher(tmp_path: Path) -> None:
    """A finished session is read once: no tailer, so no inotify instance is
    created (closing 1,000 of them cost seconds of kernel time)."""
    strace = shutil.which("strace")
    assert strace is not None, "strace is needed (apt-get install strace)"
    home = tmp_path / "home"
    start = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(3):
        session = home / "logs" / "sessions" / f"done{i}"
        session.mkdir(parents=True)
        (session / "execution.jsonl").write_bytes(
            _event(start, 0, "session_start", budget=1000, run=1)
            + _event(start + timedelta(seconds=1), 1, "step_complete", 10 + i)
            + _event(start + timedelta(seconds=2), 2, "session_complete", status="complete")
        )
    trace = tmp_path / "trace.txt"
    proc = _run_traced(home, strace, trace)
    assert proc.returncode == 0, proc.stderr
    rows = {row["session_id"]: row for row in json.loads(proc.stdout)}
    assert {r["tokens_used"] for r in rows.values()} == {10, 11, 12}
    assert {r["status"] for r in rows.values()} == {"complete"}
    calls = [line for line in trace.read_text().splitlines() if "inotify_init" in line]
    assert calls == [], calls


def _run_traced(home: Path, strace: str, trace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [strace, "-f", "-qq", "-e", "trace=inotify_init,inotify_init1", "-o", str(trace),
         *SIGIL, "sessions", "--json"],
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
