"""``sigil diff``: two runs of the offline pipeline, generated sessions with
known answers, archived sessions, and one-line errors.

The expected numbers are read from the JSONL here, event by event (a plain
reference), never from the native model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import run_cli
from test_report import Run, day, steps_for, write_runs

FAST_RETRIES = "errors:\n  max_retries: 3\n  backoff_base: 0.001\n  backoff_max: 0.01\n"


def reference_components(log: Path, run: int | None = None) -> dict[str, dict[str, int]]:
    """Tokens, operations, errors and retries per component, from the raw events
    of the whole log or of one run (the events from its session_start on)."""
    current = 0
    out: dict[str, dict[str, int]] = {}
    for line in log.read_bytes().splitlines():
        event = json.loads(line)
        if event["event_type"] == "session_start":
            current = event["metadata"].get("run", current + 1)
        if run is not None and current != run:
            continue
        c = out.setdefault(
            event["component"], {"tokens": 0, "operations": 0, "errors": 0, "retries": 0}
        )
        c["tokens"] += event["tokens"]
        c["operations"] += event["event_type"] == "step_complete"
        c["errors"] += event["event_type"] == "step_error"
        c["retries"] += event["event_type"] == "retry_attempt"
    return out


def diff_json(home: Path, a: str, b: str) -> dict[str, Any]:
    proc = run_cli(home, "diff", a, b, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def check_against_reference(doc: dict[str, Any], left: dict, right: dict) -> None:
    names = set(left) | set(right)
    assert {row["component"] for row in doc["components"]} == names
    for row in doc["components"]:
        for side, ref in (("a", left), ("b", right)):
            want = ref.get(row["component"])
            if want is None:
                assert row[side] is None
                continue
            for key, value in want.items():
                assert row[side][key] == value, (row["component"], side, key)
        zero = {"tokens": 0, "errors": 0, "retries": 0, "operations": 0}
        for key in zero:
            delta = right.get(row["component"], zero)[key] - left.get(row["component"], zero)[key]
            assert row["delta"][key] == delta
    # Largest token difference first.
    deltas = [abs(row["delta"]["tokens"]) for row in doc["components"]]
    assert deltas == sorted(deltas, reverse=True)


def test_two_runs_of_the_offline_pipeline_with_one_step_replaced(sigil_home: Path) -> None:
    task = "Analyze Acme Corp's latest quarterly report"
    first = run_cli(sigil_home, "orchestrate", "--task", task, "--session", "acme")
    assert first.returncode == 0, first.stderr
    # The second run's reasoning step fails twice, then works.
    sigil_home.mkdir(parents=True, exist_ok=True)
    (sigil_home / "config.yaml").write_text(
        FAST_RETRIES + "pipeline:\n  steps:\n    reasoning: orchestrate_steps:FlakyReasoning\n"
    )
    second = run_cli(
        sigil_home, "orchestrate", "--task", task, "--session", "acme", SIGIL_TEST_FAILURES="2"
    )
    assert second.returncode == 0, second.stderr
    log = sigil_home / "logs" / "sessions" / "acme" / "execution.jsonl"
    doc = diff_json(sigil_home, "acme@1", "acme@2")
    assert doc["a"]["run"] == 1 and doc["b"]["run"] == 2
    left, right = reference_components(log, 1), reference_components(log, 2)
    assert doc["a"]["tokens"] == sum(c["tokens"] for c in left.values())
    assert doc["b"]["tokens"] == sum(c["tokens"] for c in right.values())
    check_against_reference(doc, left, right)
    top = doc["components"][0]
    assert top["component"] == "reasoning"
    assert top["delta"]["retries"] == right["reasoning"]["retries"] >= 2
    # The run that retried took longer in reasoning; latency is there on both sides.
    assert top["a"]["p95_latency_ms"] is not None and top["b"]["p95_latency_ms"] is not None
    # The table says the same on a pipe, whole.
    table = run_cli(sigil_home, "diff", "acme@1", "acme@2")
    assert table.returncode == 0 and "reasoning" in table.stdout and "…" not in table.stdout
    # A session against itself: no differences.
    same = diff_json(sigil_home, "acme", "acme")
    assert all(
        not any(row["delta"][k] for k in ("tokens", "errors", "retries"))
        for row in same["components"]
    )


def test_two_generated_sessions_and_an_archived_one(sigil_home: Path, log_path: Path) -> None:
    import os
    import time

    from sigil.telemetry.log_rotation import LogRotator

    write_runs(
        log_path,
        [
            Run("left", 1, day("2026-11-01T09:00:00+00:00"), steps_for(21)),
            Run("left", 2, day("2026-11-01T10:00:00+00:00"), steps_for(22)),
            Run("right", 1, day("2026-11-02T09:00:00+00:00"), steps_for(23, n=30)),
        ],
    )
    logs = {s: log_path / "sessions" / s / "execution.jsonl" for s in ("left", "right")}
    refs = {s: reference_components(p) for s, p in logs.items()}
    doc = diff_json(sigil_home, "left", "right")
    assert doc["a"]["runs"] == 2 and doc["b"]["runs"] == 1
    check_against_reference(doc, refs["left"], refs["right"])
    one_run = diff_json(sigil_home, "left@2", "right@1")
    check_against_reference(one_run, reference_components(logs["left"], 2), refs["right"])
    # Archive "left": the same answer, read from the tar.gz.
    old = time.time() - 30 * 86400
    for path in (log_path / "sessions" / "left").rglob("*"):
        os.utime(path, (old, old))
    assert LogRotator(log_path, retention_days=7).archive_old_sessions()
    archived = diff_json(sigil_home, "left", "right")
    assert archived["a"]["archived"] is True
    assert archived["components"] == doc["components"]


def test_user_errors_are_one_line_with_exit_2(sigil_home: Path, log_path: Path) -> None:
    write_runs(log_path, [Run("only", 1, day("2026-11-01T09:00:00+00:00"), steps_for(31))])
    cases = [
        (("diff", "only", "ghost"), "unknown session 'ghost'"),
        (("diff", "only@3", "only"), "session 'only' has no run 3 (its runs: 1)"),
        (("diff", "../etc", "only"), "'../etc' is not a session"),
        (("diff", "only"), "Missing argument"),
    ]
    for args, says in cases:
        proc = run_cli(sigil_home, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and says in lines[0], proc.stderr
        assert proc.stdout == ""


def test_token_jumps_between_a_and_b(sigil_home: Path, log_path: Path) -> None:
    """A component whose tokens per call on one side is above 2x the other
    side's and at least 100 above it is a token jump of that side."""
    from test_report import Step

    def steps(per_call: dict[str, list[int]]) -> list[Step]:
        return [Step(c, t) for c, tokens in per_call.items() for t in tokens]

    base = {
        "reasoning": [100, 100, 100],  # 100 per call
        "planning": [300, 300],  # 300 per call
        "memory": [10, 10],  # 10 per call
        "validation": [200, 200],  # 200 per call
    }
    grown = {
        "reasoning": [500, 700],  # 600 per call: 6x A's, B's jump
        "planning": [100, 100, 100],  # 100 per call: A is 3x B's, A's jump
        "memory": [50, 50],  # 5x, but only 40 more per call: none
        "validation": [390, 410],  # 400 per call: 2x, not above it: none
    }
    write_runs(
        log_path,
        [
            Run("base", 1, day("2026-11-01T09:00:00+00:00"), steps(base)),
            Run("grown", 1, day("2026-11-02T09:00:00+00:00"), steps(grown)),
            Run("grown", 2, day("2026-11-02T10:00:00+00:00"), steps(base)),
        ],
    )
    doc = diff_json(sigil_home, "base", "grown@1")
    assert doc["token_jumps"] == {
        "a": [
            {
                "session": "base",
                "run": None,
                "component": "planning",
                "tokens_per_call": 300.0,
                "history_p99": 100.0,
                "history_runs": 1,
                # the events that show it: seq 0 is base's session_start,
                # reasoning 1-3, planning 4-5
                "calls": 2,
                "seqs": [4, 5],
                "heaviest_calls": [{"seq": 4, "tokens": 300}, {"seq": 5, "tokens": 300}],
            }
        ],
        "b": [
            {
                "session": "grown",
                "run": 1,
                "component": "reasoning",
                "tokens_per_call": 600.0,
                "history_p99": 100.0,
                "history_runs": 1,
                "calls": 2,
                "seqs": [2, 1],
                "heaviest_calls": [{"seq": 2, "tokens": 700}, {"seq": 1, "tokens": 500}],
            }
        ],
    }
    # The same numbers on both sides: nothing.
    same = diff_json(sigil_home, "base", "grown@2")
    assert same["token_jumps"] == {"a": [], "b": []}
    shown = run_cli(sigil_home, "diff", "base", "grown@1").stdout
    assert (
        "token jump in B: reasoning 600.0 tokens per call, 6.0x A's 100.0;"
        " its heaviest calls: seq 2 (700 tokens), 1 (500 tokens)"
    ) in shown
    assert (
        "token jump in A: planning 300.0 tokens per call, 3.0x B's 100.0;"
        " its heaviest calls: seq 4 (300 tokens), 5 (300 tokens)"
    ) in shown
