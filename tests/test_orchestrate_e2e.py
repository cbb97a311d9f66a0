"""``sigil orchestrate`` end to end: the real command in a subprocess.

Every scenario checks the token invariant of contract 2 exactly: the sum of
``tokens`` over the session's log == the result's ``total_tokens`` (``--json``) ==
``tokens.json``'s ``total_used`` == what the monitor's fold computes. Failures are
produced by steps plugged in from ``config.yaml`` (``tests/orchestrate_steps.py``),
never by patching sigil.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import isolated_env, run_cli
from sigil.core.locks import SessionLock, is_session_locked
from sigil.telemetry.log_parser import fold_session

pytestmark = pytest.mark.slow

SIGIL = [sys.executable, "-m", "sigil", "orchestrate"]
TASK = "Analyze Acme Corp"
STEPS = ["routing", "memory", "planning", "reasoning", "contracts", "validation"]
FAST_RETRIES = "errors:\n  max_retries: 3\n  backoff_base: 0.001\n  backoff_max: 0.01\n"


# -- helpers -------------------------------------------------------------------------------


def orchestrate(
    home: Path, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return run_cli(home, "orchestrate", *args, timeout=timeout, **env)


def run_json(home: Path, *args: str, **env: str) -> tuple[int, dict[str, Any], str]:
    proc = orchestrate(home, *args, "--json", **env)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text(text)


def steps_config(**steps: str) -> str:
    lines = [FAST_RETRIES, "pipeline:", "  steps:"]
    lines += [f"    {slot}: orchestrate_steps:{name}" for slot, name in steps.items()]
    return "\n".join(lines) + "\n"


def session_dir(home: Path, sid: str) -> Path:
    return home / "logs" / "sessions" / sid


def events_of(home: Path, sid: str) -> list[dict[str, Any]]:
    path = session_dir(home, sid) / "execution.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def kinds(events: list[dict[str, Any]], component: str | None = None) -> list[str]:
    return [e["event_type"] for e in events if component is None or e["component"] == component]


def tokens_json(home: Path, sid: str) -> dict[str, Any]:
    return json.loads((session_dir(home, sid) / "tokens.json").read_text())


def assert_invariant(home: Path, sid: str, total: int) -> list[dict[str, Any]]:
    """Contract 2 in every outcome, plus seq continuity (contract 1)."""
    events = events_of(home, sid)
    log_sum = sum(e["tokens"] for e in events)
    assert log_sum == total == tokens_json(home, sid)["total_used"]
    assert fold_session(sid, home / "logs").tokens_used == total
    assert [e["seq"] for e in events] == list(range(len(events)))
    summary = {"session_start", "session_complete", "session_error", "budget_warning",
               "budget_exceeded", "step_start", "step_error", "retry_attempt"}  # fmt: skip
    assert all(e["tokens"] == 0 for e in events if e["event_type"] in summary)
    for e in events:
        meta = e["metadata"]
        if e["event_type"] in ("step_complete", "token_consumption") and "input_tokens" in meta:
            assert meta["input_tokens"] + meta["output_tokens"] == e["tokens"]
    return events


def error_lines(stderr: str) -> list[str]:
    """stderr without the config loader's one-line warnings (unknown keys)."""
    return [line for line in stderr.splitlines() if not line.startswith("sigil: warning")]


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    if not root.exists():
        return {}
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        out[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def step_tokens(result: dict[str, Any]) -> dict[str, int]:
    return {s["step"]: s["tokens_used"] for s in result["steps"]}


# -- success ---------------------------------------------------------------------------------


def test_successful_run(sigil_home: Path) -> None:
    proc = orchestrate(sigil_home, "--task", TASK, "--session", "ok-1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "Session: ok-1"
    assert "Status: complete" in proc.stdout
    for step in STEPS:
        assert re.search(rf"^\s+{step}\s+ok\s+\d+", proc.stdout, re.M), step

    events = events_of(sigil_home, "ok-1")
    expected = ["session_start"]
    for _ in STEPS:
        expected += ["step_start", "step_complete"]
    assert kinds(events) == [*expected, "session_complete"]
    start = events[0]["metadata"]
    assert start["task"] == TASK and start["budget"] == 256_000 and start["run"] == 1
    assert start["allocations"]["reasoning"] == 150_000
    assert start["thresholds"] == {"warning": 0.5, "critical": 0.8, "exceeded": 0.95}
    assert start["provider"] == "offline" and start["tokenizer"] == "cl100k_base"
    final = events[-1]["metadata"]
    assert final["status"] == "complete" and final["run"] == 1
    total = final["total_tokens"]
    assert_invariant(sigil_home, "ok-1", total)
    for e in events:
        if e["event_type"] == "step_complete":
            assert e["tokens"] > 0 and e["metadata"]["latency_ms"] >= 0
            assert "output" in e["metadata"]  # what --resume needs

    d = session_dir(sigil_home, "ok-1")
    tok = tokens_json(sigil_home, "ok-1")
    assert tok["status"] == "complete" and tok["total_budget"] == 256_000
    assert tok["total_remaining"] == 256_000 - total
    assert set(tok["components"]) == set(STEPS)
    assert sum(c["used"] for c in tok["components"].values()) == total
    assert [r["run"] for r in tok["runs"]] == [1] and tok["runs"][0]["tokens_used"] == total
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["steps_completed"] == 6 and metrics["steps_failed"] == 0
    assert metrics["slowest_component"] in STEPS and metrics["fastest_component"] in STEPS
    assert set(metrics["components"]) == set(STEPS)
    assert metrics["status"] == "complete" and len(metrics["runs"]) == 1
    assert not (d / "errors.jsonl").exists()

    for path in (d / "execution.jsonl", d / "tokens.json", d / "metrics.json", d / ".lock"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (sigil_home / "logs", sigil_home / "logs" / "sessions", d):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    current = sigil_home / "logs" / "current.jsonl"
    assert current.is_symlink() and current.resolve() == (d / "execution.jsonl").resolve()
    assert not is_session_locked(d)
    assert not list(d.glob(".*.tmp"))


def test_json_output_default_id_and_determinism(sigil_home: Path) -> None:
    code, first, stderr = run_json(sigil_home, "--task", TASK)
    assert code == 0
    sid = first["session_id"]
    assert re.fullmatch(r"\d{8}-\d{6}-[a-z]+-[a-z]+-[0-9a-f]{4}", sid)
    assert stderr.splitlines()[0] == f"Session: {sid}"  # stdout stays pure JSON
    assert first["success"] is True and first["status"] == "complete"
    assert first["quality_score"] is not None and first["recommended_action"] == "proceed"
    assert [s["step"] for s in first["steps"]] == STEPS
    assert sum(step_tokens(first).values()) == first["total_tokens"] == first["run_tokens"]
    assert_invariant(sigil_home, sid, first["total_tokens"])

    code, second, _ = run_json(sigil_home, "--task", TASK)
    assert code == 0 and second["session_id"] != sid
    assert second["final_output"] == first["final_output"]  # same task, same output
    assert step_tokens(second) == step_tokens(first)


def test_a_session_holds_several_runs_under_one_budget(sigil_home: Path) -> None:
    code, one, _ = run_json(sigil_home, "--task", TASK, "--session", "multi", "--budget", "50000")
    assert code == 0
    code, two, _ = run_json(sigil_home, "--task", "Summarize the notes", "--session", "multi")
    assert code == 0 and two["run"] == 2
    assert two["budget"] == 50_000  # the session keeps its budget
    assert two["total_tokens"] == one["total_tokens"] + two["run_tokens"]
    events = assert_invariant(sigil_home, "multi", two["total_tokens"])
    starts = [e for e in events if e["event_type"] == "session_start"]
    assert [s["metadata"]["run"] for s in starts] == [1, 2]
    tok = tokens_json(sigil_home, "multi")
    assert [(r["run"], r["status"]) for r in tok["runs"]] == [(1, "complete"), (2, "complete")]
    assert sum(r["tokens_used"] for r in tok["runs"]) == tok["total_used"]


# -- errors ----------------------------------------------------------------------------------


def test_transient_error_retried_then_success(sigil_home: Path) -> None:
    write_config(sigil_home, steps_config(reasoning="FlakyReasoning"))
    code, result, stderr = run_json(sigil_home, "--task", TASK, "--session", "flaky")
    assert code == 0, stderr
    events = assert_invariant(sigil_home, "flaky", result["total_tokens"])
    assert kinds(events, "reasoning") == [
        "step_start",
        "token_consumption",
        "retry_attempt",
        "token_consumption",
        "retry_attempt",
        "step_complete",
    ]
    failed = [e for e in events if e["event_type"] == "token_consumption"]
    assert [e["tokens"] for e in failed] == [50, 50]  # what each failed attempt used
    assert all(e["metadata"]["model"] == "flaky-model" for e in failed)
    retries = [e for e in events if e["event_type"] == "retry_attempt"]
    assert [e["metadata"]["retry_count"] for e in retries] == [0, 1]
    assert all(e["metadata"]["category"] == "transient" for e in retries)
    reasoning = next(s for s in result["steps"] if s["step"] == "reasoning")
    assert reasoning["success"] and reasoning["metadata"]["attempts"] == 3
    done = next(
        e for e in events if e["event_type"] == "step_complete" and e["component"] == "reasoning"
    )
    assert reasoning["tokens_used"] == 100 + done["tokens"]
    errors = (session_dir(sigil_home, "flaky") / "errors.jsonl").read_text().splitlines()
    assert [json.loads(r)["category"] for r in errors] == ["transient", "transient"]


def test_retries_exhausted_fail_the_run(sigil_home: Path) -> None:
    write_config(sigil_home, steps_config(reasoning="FlakyReasoning"))
    code, result, _ = run_json(
        sigil_home, "--task", TASK, "--session", "flaky-out", SIGIL_TEST_FAILURES="99"
    )
    assert code == 1 and result["status"] == "error"
    events = assert_invariant(sigil_home, "flaky-out", result["total_tokens"])
    assert kinds(events, "reasoning").count("token_consumption") == 4  # 1 try + 3 retries
    error = next(e for e in events if e["event_type"] == "step_error")
    assert error["metadata"]["should_retry"] is False
    assert "Retries exhausted" in error["message"]
    assert "contracts" not in {e["component"] for e in events}


def test_required_step_failing_ends_the_run(sigil_home: Path) -> None:
    write_config(sigil_home, steps_config(reasoning="FailingReasoning"))
    proc = orchestrate(sigil_home, "--task", TASK, "--session", "broken")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines()[0] == "Session: broken"
    assert "Status: error" in proc.stdout and "reasoning exploded" in proc.stdout
    events = events_of(sigil_home, "broken")
    assert kinds(events, "reasoning") == ["step_start", "step_error"]
    assert {e["component"] for e in events}.isdisjoint({"contracts", "validation"})
    final = events[-1]
    assert final["event_type"] == "session_error"
    assert final["metadata"]["status"] == "error"
    assert final["metadata"]["failed_steps"] == ["reasoning"]
    assert_invariant(sigil_home, "broken", final["metadata"]["total_tokens"])
    assert tokens_json(sigil_home, "broken")["status"] == "error"
    records = (session_dir(sigil_home, "broken") / "errors.jsonl").read_text().splitlines()
    record = json.loads(records[0])
    assert record["category"] == "logic" and "reasoning exploded" in record["traceback"]
    metrics = json.loads((session_dir(sigil_home, "broken") / "metrics.json").read_text())
    assert metrics["steps_failed"] == 1 and metrics["components"]["reasoning"]["errors"] == 1


def test_optional_step_failing_is_skipped(sigil_home: Path) -> None:
    write_config(sigil_home, steps_config(memory="FailingMemory"))
    code, result, _ = run_json(sigil_home, "--task", TASK, "--session", "no-memory")
    assert code == 0 and result["status"] == "complete"
    assert [s["success"] for s in result["steps"]] == [True, False, True, True, True, True]
    events = assert_invariant(sigil_home, "no-memory", result["total_tokens"])
    assert kinds(events, "memory") == ["step_start", "step_error"]
    assert events[-1]["metadata"]["steps_failed"] == 1


def test_config_error_stops_at_once(sigil_home: Path) -> None:
    write_config(sigil_home, steps_config(reasoning="MisconfiguredReasoning"))
    code, result, _ = run_json(sigil_home, "--task", TASK, "--session", "no-key")
    assert code == 1
    assert "Check configuration and restart" in result["error"]
    events = assert_invariant(sigil_home, "no-key", result["total_tokens"])
    assert kinds(events, "reasoning") == ["step_start", "step_error"]


# -- budget ------------------------------------------------------------------------------------


def test_budget_runs_out_mid_pipeline(sigil_home: Path) -> None:
    code, probe, _ = run_json(sigil_home, "--task", TASK, "--session", "probe")
    assert code == 0
    used = step_tokens(probe)
    after_memory = used["routing"] + used["memory"]
    after_planning = after_memory + used["planning"]
    budget = math.floor(after_planning / 0.95)  # planning crosses 95 %, memory does not
    assert after_memory < 0.95 * budget <= after_planning

    proc = orchestrate(sigil_home, "--task", TASK, "--session", "tight", "--budget", str(budget))
    assert proc.returncode == 3, proc.stderr
    assert "Status: budget_exceeded" in proc.stdout
    events = assert_invariant(sigil_home, "tight", after_planning)
    started = [e["component"] for e in events if e["event_type"] == "step_start"]
    assert started == ["routing", "memory", "planning"]  # the next step did not start
    budget_events = [e for e in events if e["event_type"].startswith("budget_")]
    session = [e for e in budget_events if e["metadata"]["scope"] == "session"]
    levels = [(e["event_type"], e["metadata"]["level"]) for e in session]
    assert levels.count(("budget_exceeded", "exceeded")) == 1
    assert len(levels) == len(set(levels))  # each level announced once
    # The allocations scale with this small budget: a component over its share is
    # announced once too.
    over = [e["metadata"]["component"] for e in budget_events if e not in session]
    assert len(over) == len(set(over))
    exceeded_at = next(i for i, e in enumerate(events) if e["event_type"] == "budget_exceeded")
    before = [e for e in events[:exceeded_at] if not e["event_type"].startswith("budget_")]
    assert (before[-1]["event_type"], before[-1]["component"]) == ("step_complete", "planning")
    final = events[-1]
    assert final["event_type"] == "session_error"
    assert final["metadata"]["status"] == "budget_exceeded"
    assert tokens_json(sigil_home, "tight")["status"] == "budget_exceeded"
    assert fold_session("tight", sigil_home / "logs").status == "budget_exceeded"

    # A new run on the spent session stops before its first step: earlier runs' tokens stay used.
    code, again, _ = run_json(sigil_home, "--task", TASK, "--session", "tight")
    assert code == 3 and again["run"] == 2 and again["steps"] == []
    assert again["total_tokens"] == after_planning and again["run_tokens"] == 0
    events = assert_invariant(sigil_home, "tight", after_planning)
    run2 = events[[e["event_type"] for e in events].index("session_start", 1) :]
    assert kinds(run2) == ["session_start", "budget_exceeded", "session_error"]

    # Raising the budget lets the session go on, still counting what was spent.
    code, more, _ = run_json(sigil_home, "--task", TASK, "--session", "tight", "--budget", "99999")
    assert code == 0 and more["run"] == 3
    assert more["total_tokens"] == after_planning + more["run_tokens"]
    assert_invariant(sigil_home, "tight", more["total_tokens"])
    assert [r["status"] for r in tokens_json(sigil_home, "tight")["runs"]] == [
        "budget_exceeded",
        "budget_exceeded",
        "complete",
    ]


# -- crash and resume ------------------------------------------------------------------------------


def start_and_kill(home: Path, sid: str) -> None:
    """Start a run whose planning step hangs, wait for it, then kill -9 the process."""
    write_config(home, steps_config(planning="SlowPlanning"))
    proc = subprocess.Popen(
        [*SIGIL, "--task", TASK, "--session", sid],
        env=isolated_env(home, SIGIL_TEST_SLOW_SECONDS="60"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = session_dir(home, sid) / "execution.jsonl"
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if log.exists() and '"step_start","component":"planning"' in log.read_text():
                break
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached the planning step")
        assert is_session_locked(session_dir(home, sid))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert not is_session_locked(session_dir(home, sid))  # the kernel dropped the lock
    assert fold_session(sid, home / "logs").status == "running"  # no final event


def test_kill_9_then_resume(sigil_home: Path) -> None:
    start_and_kill(sigil_home, "crash")
    dead = events_of(sigil_home, "crash")
    dead_tokens = sum(e["tokens"] for e in dead)
    assert kinds(dead)[-1] == "step_start" and dead_tokens > 0
    assert not (session_dir(sigil_home, "crash") / "tokens.json").exists()

    code, result, stderr = run_json(
        sigil_home, "--session", "crash", "--resume", SIGIL_TEST_SLOW_SECONDS="0"
    )
    assert code == 0, stderr
    assert result["resumed"] is True and result["run"] == 1 and result["task"] == TASK
    events = assert_invariant(sigil_home, "crash", result["total_tokens"])
    assert result["total_tokens"] == result["run_tokens"]  # the dead part counts for the run
    assert kinds(events).count("session_start") == 1
    completes = [e["component"] for e in events if e["event_type"] == "step_complete"]
    assert completes == STEPS  # routing and memory were not run again
    assert kinds(events, "planning") == ["step_start", "step_start", "step_complete"]
    resume = next(e for e in events if e["metadata"].get("resume"))
    assert resume["event_type"] == "retry_attempt" and resume["component"] == "orchestrator"
    assert resume["metadata"]["recovered_steps"] == ["routing", "memory"]
    assert resume["metadata"]["tokens_before_resume"] == dead_tokens
    recovered = [s for s in result["steps"] if s["metadata"].get("resumed")]
    assert [s["step"] for s in recovered] == ["routing", "memory"]
    assert sum(s["tokens_used"] for s in recovered) == dead_tokens
    assert result["final_output"]["valid"] is True
    assert events[-1]["event_type"] == "session_complete"

    # Nothing left to resume now: bad usage, nothing written.
    before = snapshot(sigil_home)
    proc = orchestrate(sigil_home, "--session", "crash", "--resume")
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1
    assert "no interrupted run" in proc.stderr
    assert snapshot(sigil_home) == before


def test_resume_after_the_dead_runs_log_was_rotated(sigil_home: Path) -> None:
    """`sigil logs rotate` renames the live log away (the dead writer never makes a
    new one): the run can still be resumed, and no token is lost or counted twice."""
    start_and_kill(sigil_home, "rotated")
    dead_tokens = sum(e["tokens"] for e in events_of(sigil_home, "rotated"))
    live = session_dir(sigil_home, "rotated") / "execution.jsonl"
    live.rename(live.with_name("execution_20260101_000000.jsonl"))
    code, result, stderr = run_json(
        sigil_home, "--session", "rotated", "--resume", SIGIL_TEST_SLOW_SECONDS="0"
    )
    assert code == 0, stderr
    assert result["resumed"] is True and result["total_tokens"] > dead_tokens
    summary = fold_session("rotated", sigil_home / "logs")
    assert summary.tokens_used == result["total_tokens"]
    tokens = json.loads((session_dir(sigil_home, "rotated") / "tokens.json").read_text())
    assert tokens["total_used"] == result["total_tokens"]


def test_new_run_after_a_crash_keeps_the_dead_runs_tokens(sigil_home: Path) -> None:
    start_and_kill(sigil_home, "crash2")
    dead_tokens = sum(e["tokens"] for e in events_of(sigil_home, "crash2"))
    code, result, stderr = run_json(
        sigil_home, "--task", TASK, "--session", "crash2", SIGIL_TEST_SLOW_SECONDS="0"
    )
    assert code == 0 and result["run"] == 2
    assert "never finished" in stderr
    assert result["total_tokens"] == dead_tokens + result["run_tokens"]
    assert_invariant(sigil_home, "crash2", result["total_tokens"])
    runs = tokens_json(sigil_home, "crash2")["runs"]
    assert [(r["run"], r["status"], r["tokens_used"]) for r in runs] == [
        (1, "incomplete", dead_tokens),
        (2, "complete", result["run_tokens"]),
    ]


def test_sigterm_ends_the_run_cleanly(sigil_home: Path) -> None:
    write_config(sigil_home, steps_config(planning="SlowPlanning"))
    proc = subprocess.Popen(
        [*SIGIL, "--task", TASK, "--session", "termed"],
        env=isolated_env(sigil_home, SIGIL_TEST_SLOW_SECONDS="60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = session_dir(sigil_home, "termed") / "execution.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if log.exists() and '"component":"planning"' in log.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 143, stderr  # 128 + SIGTERM, the shell's convention
    events = events_of(sigil_home, "termed")
    assert events[-1]["event_type"] == "session_error"
    assert events[-1]["metadata"]["status"] == "interrupted"
    assert events[-1]["metadata"]["error"] == "interrupted"
    assert_invariant(sigil_home, "termed", events[-1]["metadata"]["total_tokens"])
    assert not is_session_locked(session_dir(sigil_home, "termed"))


# -- bad input ----------------------------------------------------------------------


def _hold_lock(home: Path) -> SessionLock:
    return SessionLock(session_dir(home, "held")).acquire()


def _completed_session(home: Path) -> None:
    assert orchestrate(home, "--task", TASK, "--session", "done").returncode == 0


BAD_INPUTS: list[tuple[str, list[str], Callable[[Path], object] | None, str]] = [
    ("dotdot-id", ["--task", TASK, "--session", "../x"], None, "invalid session ID"),
    ("long-id", ["--task", TASK, "--session", "a" * 65], None, "invalid session ID"),
    ("slash-id", ["--task", TASK, "--session", "a/b"], None, "invalid session ID"),
    ("empty-task", ["--task", ""], None, "--task must not be empty"),
    ("blank-task", ["--task", "   "], None, "--task must not be empty"),
    ("no-task", [], None, "--task is required"),
    ("zero-budget", ["--task", TASK, "--budget", "0"], None, "positive integer"),
    ("negative-budget", ["--task", TASK, "--budget", "-5"], None, "positive integer"),
    ("text-budget", ["--task", TASK, "--budget", "lots"], None, "positive integer"),
    ("float-budget", ["--task", TASK, "--budget", "1.5"], None, "positive integer"),
    ("huge-budget", ["--task", TASK, "--budget", "9" * 23], None, "below 2**63"),
    (
        "config-huge-budget",
        ["--task", TASK],
        lambda h: write_config(h, "token_budget:\n  default_total: " + "9" * 23 + "\n"),
        "token_budget.default_total",
    ),
    (
        "config-huge-buffer",
        ["--task", TASK],
        lambda h: write_config(h, "logging:\n  buffer_size_bytes: 99999999999\n"),
        "logging.buffer_size_bytes",
    ),
    ("provider", ["--task", TASK, "--provider", "claude"], None, "unknown provider"),
    ("option", ["--task", TASK, "--bogus"], None, "No such option"),
    ("resume-no-session", ["--resume"], None, "--resume needs --session"),
    ("resume-unknown", ["--resume", "--session", "ghost"], None, "no log to resume"),
    (
        "resume-complete",
        ["--resume", "--session", "done"],
        _completed_session,
        "no interrupted run",
    ),
    ("lock-held", ["--task", TASK, "--session", "held"], _hold_lock, "already running"),
    (
        "config-yaml",
        ["--task", TASK],
        lambda h: write_config(h, "token_budget: [unclosed\n"),
        "config.yaml",
    ),
    (
        "config-type",
        ["--task", TASK],
        lambda h: write_config(h, "token_budget:\n  default_total: lots\n"),
        "token_budget.default_total",
    ),
    (
        "config-step",
        ["--task", TASK],
        lambda h: write_config(h, steps_config(reasoning="NotAStep")),
        "is not a step",
    ),
    (
        "config-steps-type",
        ["--task", TASK],
        lambda h: write_config(h, "pipeline:\n  steps: [reasoning]\n"),
        "pipeline.steps",
    ),
    (
        "config-step-slot",
        ["--task", TASK],
        lambda h: write_config(h, "pipeline:\n  steps:\n    thinking: orchestrate_steps:X\n"),
        "unknown step 'thinking'",
    ),
    (
        "config-step-import",
        ["--task", TASK],
        lambda h: write_config(h, "pipeline:\n  steps:\n    reasoning: nowhere_xyz:Step\n"),
        "cannot import",
    ),
    ("openai-no-key", ["--task", TASK, "--provider", "openai"], None, "OPENAI_API_KEY"),
    # /proc refuses new directories, even to root.
    (
        "log-path-uncreatable",
        ["--task", TASK, "--log-path", "/proc/1/nope"],
        None,
        "cannot use log path",
    ),
    (
        "log-path-file",
        ["--task", TASK, "--log-path", "{home}/afile"],
        lambda h: (h.mkdir(parents=True), (h / "afile").write_text("x")),
        "not a directory",
    ),
]


@pytest.mark.parametrize(
    ("args", "setup", "expected"),
    [pytest.param(a, s, e, id=i) for i, a, s, e in BAD_INPUTS],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    sigil_home: Path,
    args: list[str],
    setup: Callable[[Path], object] | None,
    expected: str,
) -> None:
    held = setup(sigil_home) if setup else None
    try:
        before = snapshot(sigil_home)
        proc = orchestrate(sigil_home, *[a.replace("{home}", str(sigil_home)) for a in args])
        after = snapshot(sigil_home)
    finally:
        if isinstance(held, SessionLock):
            held.release()
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    assert expected in errors[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert after == before


# -- the Python API of Appendix D --------------------------------------------------


def test_appendix_d_api(sigil_home: Path) -> None:
    from sigil.interfaces.cli.orchestrator import Orchestrator, PipelineResult, PipelineStep

    async def main() -> tuple[Orchestrator, PipelineResult]:
        orchestrator = Orchestrator(session_id="test-1", token_budget=256000)
        result = await orchestrator.execute(task="Analyze lead", context={})
        return orchestrator, result

    orchestrator, result = asyncio.run(main())
    assert isinstance(result, PipelineResult) and result.success
    assert [s.step for s in result.steps] == list(PipelineStep)
    assert result.quality_score is not None and result.recommended_action == "proceed"
    assert result.total_tokens == sum(s.tokens_used for s in result.steps)
    assert orchestrator.log_file == session_dir(sigil_home, "test-1") / "execution.jsonl"
    assert_invariant(sigil_home, "test-1", result.total_tokens)
    assert result.raise_for_status() is result


def test_python_api_replaces_steps_and_refuses_a_busy_session(sigil_home: Path) -> None:
    from sigil.core.locks import SessionBusy
    from sigil.interfaces.cli.orchestrator import Orchestrator, PipelineError
    from sigil.pipeline.base import StepContext, StepOutput

    class EchoReasoning:
        name = "reasoning"

        async def run(self, ctx: StepContext) -> StepOutput:
            text = f"echo: {ctx.task}"
            return StepOutput(
                output={"summary": text}, input_tokens=ctx.count(ctx.task),
                output_tokens=ctx.count(text), model="echo-1",
            )  # fmt: skip

    orch = Orchestrator("custom", components={"reasoning": EchoReasoning()})
    assert orch.reasoning_manager is orch.steps["reasoning"]
    result = asyncio.run(orch.execute("Analyze lead"))
    reasoning = next(s for s in result.steps if s.step == "reasoning")
    assert reasoning.output == {"summary": "echo: Analyze lead"}
    assert reasoning.metadata["model"] == "echo-1"
    assert result.quality_score is not None and result.quality_score < 0.6
    assert_invariant(sigil_home, "custom", result.total_tokens)

    lock = SessionLock(session_dir(sigil_home, "custom")).acquire()
    try:
        with pytest.raises(SessionBusy):
            asyncio.run(Orchestrator("custom").execute("Analyze lead"))
    finally:
        lock.release()

    broken = Orchestrator("custom")

    class Boom:
        name = "planning"

        async def run(self, ctx: StepContext) -> StepOutput:
            raise RuntimeError("no plan")

    broken.planner = Boom()
    result = asyncio.run(broken.execute("Analyze lead"))
    assert result.status == "error" and result.run == 2
    with pytest.raises(PipelineError, match="no plan"):
        result.raise_for_status()


# -- the session lock (contract 7) ---------------------------------------------------------


def test_session_lock_semantics(tmp_path: Path) -> None:
    from sigil.core.locks import SessionBusy, lock_holder_pid

    d = tmp_path / "sessions" / "s1"
    assert not is_session_locked(d) and not d.exists()  # probing creates nothing
    with SessionLock(d) as lock:
        assert lock.held and is_session_locked(d)
        assert lock_holder_pid(d) == os.getpid()
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert stat.S_IMODE((d / ".lock").stat().st_mode) == 0o600
        with pytest.raises(SessionBusy, match="already running"):
            SessionLock(d).acquire()  # flock is per open file: refused even in-process
    assert not is_session_locked(d) and lock_holder_pid(d) is None
    assert (d / ".lock").exists()  # never unlinked: a deleted lock file splits holders
    second = SessionLock(d).acquire(record_pid=False)
    try:
        assert is_session_locked(d)
    finally:
        second.release()
        second.release()  # idempotent


@pytest.mark.parametrize("planted", ["session_dir", "lock_file"])
def test_a_planted_symlink_is_refused_and_its_target_untouched(
    sigil_home: Path, tmp_path: Path, planted: str
) -> None:
    """A symlink in place of the session directory or its lock file is refused
    (one line, exit 2), never followed: the file it points at stays as it was."""
    target_dir = tmp_path / "elsewhere"
    target_dir.mkdir()
    precious = target_dir / "precious"
    precious.write_text("IMPORTANT USER DATA\n")
    precious.chmod(0o644)
    sessions = sigil_home / "logs" / "sessions"
    sessions.mkdir(parents=True)
    if planted == "session_dir":
        (sessions / "planted").symlink_to(target_dir)
    else:
        (sessions / "planted").mkdir()
        (sessions / "planted" / ".lock").symlink_to(precious)
    proc = orchestrate(sigil_home, "--task", "Analyze Acme", "--session", "planted")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "symbolic link" in lines[0], proc.stderr
    assert "Session:" not in proc.stdout
    assert precious.read_text() == "IMPORTANT USER DATA\n"
    assert stat.S_IMODE(precious.stat().st_mode) == 0o644
    assert sorted(p.name for p in target_dir.iterdir()) == ["precious"]
