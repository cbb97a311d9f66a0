"""kill -9 at every event boundary of a run (issue 11, item 6).

``SIGIL_TEST_KILL_AFTER_EVENT=N`` makes ``sigil orchestrate`` flush its log and
SIGKILL itself right after its Nth event: a real kill -9, at a point chosen
exactly. For every N the session is then recovered the way a user would
(``--resume`` when the run is unfinished, else a new run) and checked:

* no recorded step is lost or run again: each step has exactly one
  ``step_complete`` in run 1, and steps completed before the kill are recovered;
* the totals agree everywhere: the log's sum == ``tokens.json`` == the result ==
  the native fold == ``sigil sessions --json``; ``seq`` runs 0..n-1.

Killed right after the final event (before ``tokens.json``), the log says the run
is complete: ``tokens.json`` is stale, and the next reader or writer that sees
that rebuilds it from the log.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from sigil.telemetry.log_parser import fold_session

pytestmark = pytest.mark.slow

TASK = "Analyze Acme Corp"
STEPS = ["routing", "memory", "planning", "reasoning", "contracts", "validation"]
# A failed attempt (token_consumption, retry_attempt) and budget warnings, so that
# every kind of event the orchestrator writes has a boundary in the walk.
CONFIG = (
    "errors:\n  max_retries: 3\n  backoff_base: 0.001\n  backoff_max: 0.01\n"
    "pipeline:\n  steps:\n    reasoning: orchestrate_steps:FlakyReasoning\n"
)
BUDGET = "5000"


def _dir(home: Path, sid: str) -> Path:
    return home / "logs" / "sessions" / sid


def _events(home: Path, sid: str) -> list[dict[str, Any]]:
    text = (_dir(home, sid) / "execution.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _tokens_json(home: Path, sid: str) -> dict[str, Any]:
    return json.loads((_dir(home, sid) / "tokens.json").read_text())


def _orchestrate(home: Path, *args: str, **env: str) -> Any:
    return run_cli(home, "orchestrate", *args, SIGIL_TEST_FAILURES="1", **env)


def _sessions_row(home: Path, sid: str) -> dict[str, Any]:
    proc = run_cli(home, "sessions", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    rows = rows["sessions"] if isinstance(rows, dict) else rows
    return next(r for r in rows if r["session_id"] == sid)


def _agree(home: Path, sid: str, total: int) -> list[dict[str, Any]]:
    events = _events(home, sid)
    log_sum = sum(e["tokens"] for e in events)
    assert log_sum == total
    tokens = _tokens_json(home, sid)
    assert tokens["total_used"] == total
    assert sum(r["tokens_used"] for r in tokens["runs"]) == total
    assert tokens["last_seq"] == events[-1]["seq"]
    assert fold_session(sid, home / "logs").tokens_used == total
    assert _sessions_row(home, sid)["tokens_used"] == total
    assert [e["seq"] for e in events] == list(range(len(events)))
    return events


def _probe(home: Path) -> int:
    """Events in one undisturbed run of this pipeline."""
    proc = _orchestrate(home, "--task", TASK, "--session", "probe", "--budget", BUDGET)
    assert proc.returncode == 0, proc.stderr
    events = _events(home, "probe")
    kinds = {e["event_type"] for e in events}
    assert {"token_consumption", "retry_attempt", "budget_warning"} <= kinds, kinds
    return len(events)


def test_kill_9_at_every_event_boundary_then_recover(sigil_home: Path) -> None:
    sigil_home.mkdir(parents=True)
    (sigil_home / "config.yaml").write_text(CONFIG)
    per_run = _probe(sigil_home)
    assert per_run >= 16
    for n in range(1, per_run + 1):
        _kill_and_recover(sigil_home, n, final=n == per_run)


def _kill_and_recover(sigil_home: Path, n: int, *, final: bool) -> None:
    sid = f"k{n}"
    proc = _orchestrate(sigil_home, "--task", TASK, "--session", sid, "--budget", BUDGET,
                        SIGIL_TEST_KILL_AFTER_EVENT=str(n))  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (n, proc.returncode, proc.stderr)
    dead = _events(sigil_home, sid)
    assert len(dead) == n  # flushed before the kill
    dead_sum = sum(e["tokens"] for e in dead)
    recorded = [e["component"] for e in dead if e["event_type"] == "step_complete"]

    # Whatever was left, a reader sees the log's numbers.
    assert _sessions_row(sigil_home, sid)["tokens_used"] == dead_sum, n

    if not final:
        proc = _orchestrate(sigil_home, "--session", sid, "--resume", "--json")
        assert proc.returncode == 0, (n, proc.stderr)
        result = json.loads(proc.stdout)
        assert result["resumed"] is True and result["run"] == 1
        recovered = [s["step"] for s in result["steps"] if s["metadata"].get("resumed")]
        assert recovered == recorded, n
    else:
        # The log says complete: nothing to resume, and the stale tokens.json is
        # rebuilt from the log by the command that noticed.
        proc = _orchestrate(sigil_home, "--session", sid, "--resume")
        assert proc.returncode == 2 and "no interrupted run" in proc.stderr, proc.stderr
        assert _tokens_json(sigil_home, sid)["total_used"] == dead_sum
        assert _tokens_json(sigil_home, sid)["status"] == "complete"
        _agree(sigil_home, sid, dead_sum)
        proc = _orchestrate(sigil_home, "--session", sid, "--task", TASK, "--json")
        assert proc.returncode in (0, 3), proc.stderr
        result = json.loads(proc.stdout)
        assert result["run"] == 2
    events = _agree(sigil_home, sid, result["total_tokens"])
    run1_end = next(
        (i for i, e in enumerate(events) if e["event_type"] == "session_start" and i > 0),
        len(events),
    )
    done = [e["component"] for e in events[:run1_end] if e["event_type"] == "step_complete"]
    assert done == STEPS, n  # every step once: none lost, none repeated


def test_killed_after_the_final_event_of_a_second_run(sigil_home: Path) -> None:
    """The issue's case: tokens.json from run 1 exists, run 2's final event is in
    the log, tokens.json was never rewritten. Readers and the next writer go by
    the log; the stale tokens.json is rebuilt with both runs."""
    sigil_home.mkdir(parents=True)
    (sigil_home / "config.yaml").write_text(CONFIG)
    proc = _orchestrate(sigil_home, "--task", TASK, "--session", "two", "--budget", "100000")
    assert proc.returncode == 0, proc.stderr
    per_run = len(_events(sigil_home, "two"))
    run1 = _tokens_json(sigil_home, "two")["total_used"]
    proc = _orchestrate(sigil_home, "--task", TASK, "--session", "two",
                        SIGIL_TEST_KILL_AFTER_EVENT=str(per_run))  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    events = _events(sigil_home, "two")
    assert events[-1]["event_type"] == "session_complete" and events[-1]["metadata"]["run"] == 2
    log_sum = sum(e["tokens"] for e in events)
    assert log_sum > run1 == _tokens_json(sigil_home, "two")["total_used"]  # stale
    assert _sessions_row(sigil_home, "two")["tokens_used"] == log_sum

    proc = _orchestrate(sigil_home, "--session", "two", "--resume")
    assert proc.returncode == 2 and "no interrupted run" in proc.stderr
    assert _agree(sigil_home, "two", log_sum)[-1]["metadata"]["status"] == "complete"
    ledger = _tokens_json(sigil_home, "two")
    assert [(r["run"], r["status"]) for r in ledger["runs"]] == [(1, "complete"), (2, "complete")]
