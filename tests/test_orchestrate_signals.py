"""Ctrl-C and SIGTERM on real ``sigil`` processes (issue 10 item 6, issue 11 items 7-8).

* An interrupted run is recorded as ``interrupted`` (final event ``metadata.status``,
  ``tokens.json``), not ``error``, and ``--resume`` continues it.
* Exit status: 130 for SIGINT, 143 for SIGTERM (the shell's convention), for
  ``orchestrate`` and ``monitor`` alike.
* Signals during shutdown do not break it: two Ctrl-C with no gap, 0.5 ms, 5 ms
  or 50 ms apart (and a storm of them) still end with one final event,
  ``tokens.json`` equal to the log, the lock released, no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import isolated_env, run_cli, wait_for
from sigil.core.locks import is_session_locked

pytestmark = pytest.mark.slow

TASK = "Analyze Acme Corp"
SLOW_PLANNING = (
    "errors:\n  max_retries: 0\npipeline:\n  steps:\n    planning: orchestrate_steps:SlowPlanning\n"
)


def _session(home: Path, sid: str) -> Path:
    return home / "logs" / "sessions" / sid


def _events(home: Path, sid: str) -> list[dict[str, Any]]:
    text = (_session(home, sid) / "execution.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _start_slow_run(home: Path, sid: str) -> subprocess.Popen[str]:
    """``sigil orchestrate`` whose planning step sleeps 60 s; returns once it sleeps."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text(SLOW_PLANNING)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigil", "orchestrate", "--task", TASK, "--session", sid],
        env=isolated_env(home, SIGIL_TEST_SLOW_SECONDS="60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = _session(home, sid) / "execution.jsonl"

    def planning_started() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"orchestrate exited early: {proc.communicate()}")
        return log.exists() and '"step_start","component":"planning"' in log.read_text()

    wait_for("the planning step", planning_started, timeout=30)
    return proc


def _assert_interrupted(home: Path, sid: str, proc: subprocess.Popen[str], code: int) -> None:
    try:
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()
        pytest.fail(f"still running 20 s after the signals (lock held: "
                    f"{is_session_locked(_session(home, sid))}): {out}")  # fmt: skip
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    events = _events(home, sid)
    finals = [e for e in events if e["event_type"] in ("session_complete", "session_error")]
    assert len(finals) == 1, [e["event_type"] for e in events]
    final = finals[0]
    assert final is events[-1]
    assert final["metadata"]["status"] == "interrupted"
    log_sum = sum(e["tokens"] for e in events)
    assert final["metadata"]["total_tokens"] == log_sum
    tokens = json.loads((_session(home, sid) / "tokens.json").read_text())
    assert tokens["status"] == "interrupted" and tokens["total_used"] == log_sum
    assert tokens["runs"][-1]["status"] == "interrupted"
    metrics = json.loads((_session(home, sid) / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert not is_session_locked(_session(home, sid))


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"]
)
def test_interrupted_run_is_recorded_and_resumable(
    sigil_home: Path, signum: int, code: int
) -> None:
    sid = f"sig-{signum}"
    proc = _start_slow_run(sigil_home, sid)
    proc.send_signal(signum)
    _assert_interrupted(sigil_home, sid, proc, code)
    before = sum(e["tokens"] for e in _events(sigil_home, sid))

    resumed = run_cli(sigil_home, "orchestrate", "--session", sid, "--resume", "--json",
                      SIGIL_TEST_SLOW_SECONDS="0")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["resumed"] is True and result["run"] == 1 and result["status"] == "complete"
    events = _events(sigil_home, sid)
    done = [e["component"] for e in events if e["event_type"] == "step_complete"]
    assert done == ["routing", "memory", "planning", "reasoning", "contracts", "validation"]
    assert sum(e["tokens"] for e in events) == result["total_tokens"] > before
    recovered = [s["step"] for s in result["steps"] if s["metadata"].get("resumed")]
    assert recovered == ["routing", "memory"]  # not run again
    tokens = json.loads((_session(sigil_home, sid) / "tokens.json").read_text())
    assert tokens["total_used"] == result["total_tokens"]
    assert [(r["run"], r["status"]) for r in tokens["runs"]] == [(1, "complete")]
    assert [e["seq"] for e in events] == list(range(len(events)))


@pytest.mark.parametrize("gap_ms", [0.0, 0.5, 5.0, 50.0])
@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_second_signal_does_not_break_the_shutdown(
    sigil_home: Path, gap_ms: float, second: int
) -> None:
    sid = f"twice-{int(gap_ms * 10)}-{second}"
    proc = _start_slow_run(sigil_home, sid)
    os.kill(proc.pid, signal.SIGINT)
    if gap_ms:
        time.sleep(gap_ms / 1000)
    os.kill(proc.pid, second)
    _assert_interrupted(sigil_home, sid, proc, 130)


def test_a_storm_of_signals_during_shutdown(sigil_home: Path) -> None:
    proc = _start_slow_run(sigil_home, "storm")
    for i in range(60):
        try:
            os.kill(proc.pid, signal.SIGINT if i % 2 == 0 else signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.001)
    _assert_interrupted(sigil_home, "storm", proc, 130)


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"]
)
def test_monitor_exit_codes_follow_the_shell(sigil_home: Path, signum: int, code: int) -> None:
    (sigil_home / "logs" / "sessions").mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigil", "monitor", "--session", "nobody", "--mode", "minimal"],
        env=isolated_env(sigil_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid_file = sigil_home / "logs" / "monitor.pid"
    wait_for("the monitor to start", pid_file.exists, timeout=30)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr


def test_readme_documents_the_exit_codes() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    line = next(x for x in readme.split("\n\n") if x.startswith("Exit codes"))
    assert "130" in line and "SIGINT" in line and "143" in line and "SIGTERM" in line
