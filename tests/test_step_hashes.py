"""Step hashes in the session model (issue 13): the orchestrator logs each
step's ``input_sha256`` (on ``step_start``) and ``output_sha256`` (on
``step_complete``); the model finds loops (a step started again and again with
the same input) and keeps each step's output hash, which ``sigil diff`` compares."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from conftest import run_cli
from sigil._native import Fold

T0 = datetime(2026, 11, 1, 9, 0, 0, tzinfo=UTC)


def line(seq: int, kind: str, component: str, **meta: Any) -> bytes:
    return orjson.dumps(
        {
            "timestamp": (T0 + timedelta(seconds=seq)).isoformat(),
            "session_id": "loop",
            "event_type": kind,
            "component": component,
            "message": kind,
            "tokens": 3 if kind == "step_complete" else 0,
            "metadata": meta,
            "seq": seq,
        }
    )


def test_a_step_repeated_with_the_same_input_five_times_is_a_loop() -> None:
    lines = [line(0, "session_start", "orchestrator", run=1)]
    seq = 1
    for _ in range(5):
        lines.append(line(seq, "step_start", "reasoning", input_sha256="aa" * 32))
        lines.append(line(seq + 1, "step_complete", "reasoning", output_sha256="bb" * 32))
        seq += 2
    # Twice with another input, and once each for another component: no loop.
    for digest in ("cc", "cc"):
        lines.append(line(seq, "step_start", "reasoning", input_sha256=digest * 32))
        seq += 1
    lines.append(line(seq, "step_start", "planning", input_sha256="aa" * 32))
    fold = Fold(last_n=0)
    fold.feed_bytes(b"\n".join(lines) + b"\n")
    snap = fold.snapshot()
    assert [loop.to_dict() for loop in snap.loops] == [
        {
            "run": 1,
            "component": "reasoning",
            "input_sha256": "aa" * 32,
            "starts": 5,
            "seqs": [1, 3, 5, 7, 9],
        }
    ]
    assert snap.run.loops == snap.loops
    assert snap.run.step_outputs == [(i, "reasoning", "bb" * 32) for i in range(5)]
    # A new run starts counting again.
    more = [line(seq + 1, "session_start", "orchestrator", run=2)]
    more += [line(seq + 2 + i, "step_start", "reasoning", input_sha256="aa" * 32) for i in (0, 1)]
    fold.feed_bytes(b"\n".join(more) + b"\n")
    assert [loop.run for loop in fold.snapshot().loops] == [1]


def _events(home: Path, sid: str) -> list[dict[str, Any]]:
    path = home / "logs" / "sessions" / sid / "execution.jsonl"
    return [json.loads(raw) for raw in path.read_text().splitlines()]


def test_orchestrate_logs_hashes_and_diff_lists_exactly_the_replaced_step(
    sigil_home: Path,
) -> None:
    task = ("--task", "Analyze Acme Corp")
    for sid in ("same-1", "same-2"):
        proc = run_cli(sigil_home, "orchestrate", *task, "--session", sid, timeout=120)
        assert proc.returncode == 0, proc.stderr
    events = _events(sigil_home, "same-1")
    starts = [e for e in events if e["event_type"] == "step_start"]
    completes = [e for e in events if e["event_type"] == "step_complete"]
    assert starts and all(
        re.fullmatch(r"[0-9a-f]{64}", e["metadata"]["input_sha256"]) for e in starts
    )
    assert all(re.fullmatch(r"[0-9a-f]{64}", e["metadata"]["output_sha256"]) for e in completes)

    same = json.loads(run_cli(sigil_home, "diff", "same-1", "same-2", "--json").stdout)
    assert same["changed_steps"] == [] and same["loops"] == {"a": [], "b": []}

    (sigil_home / "config.yaml").write_text(
        "pipeline:\n  steps:\n    validation: orchestrate_steps:OtherValidation\n"
    )
    proc = run_cli(sigil_home, "orchestrate", *task, "--session", "other", timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(run_cli(sigil_home, "diff", "same-1@1", "other@1", "--json").stdout)
    assert [(s["component_a"], s["component_b"]) for s in doc["changed_steps"]] == [
        ("validation", "validation")
    ]
    shown = run_cli(sigil_home, "diff", "same-1", "other").stdout
    assert "changed step #6: validation -> validation" in shown


def test_report_shows_loops_and_retry_storms_with_their_events(
    sigil_home: Path, log_path: Path
) -> None:
    lines = [line(0, "session_start", "orchestrator", run=1)]
    lines += [line(1 + i, "step_start", "reasoning", input_sha256="ab" * 32) for i in range(5)]
    lines += [line(6 + i, "retry_attempt", "memory", attempt=i + 1) for i in range(5)]
    lines.append(line(11, "session_complete", "orchestrator", status="complete"))
    d = log_path / "sessions" / "looping"
    d.mkdir(parents=True, mode=0o700)
    (d / "execution.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    proc = run_cli(sigil_home, "report", "session", "--json")
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)["anomalies"]
    assert found["loops"] == [
        {
            "session": "looping",
            "run": 1,
            "component": "reasoning",
            "input_sha256": "ab" * 32,
            "starts": 5,
            "seqs": [1, 2, 3, 4, 5],
        }
    ]
    # The events that show the storm: the failed attempts' seqs.
    seqs = [6, 7, 8, 9, 10]
    assert found["retry_storms"] == [
        {"session": "looping", "run": 1, "component": "memory", "retries": 5, "seqs": seqs}
    ]
    shown = run_cli(sigil_home, "report", "session").stdout
    assert "loop: session looping run 1: reasoning started 5 times" in shown
    assert (
        "retry storm: session looping run 1: memory retried 5 times (seq 6, 7, 8, 9, 10)" in shown
    )
    # In diff too (issue 13: "in report, diff and the live view"), each side's.
    doc = json.loads(run_cli(sigil_home, "diff", "looping", "looping@1", "--json").stdout)
    storm = {"run": 1, "component": "memory", "retries": 5, "seqs": seqs}
    assert doc["retry_storms"] == {"a": [storm], "b": [storm]}
    shown = run_cli(sigil_home, "diff", "looping", "looping@1").stdout
    assert "retry storm in B run 1: memory retried 5 times (seq 6, 7, 8, 9, 10)" in shown
    # And in the live view: json, minimal and the summary.
    proc = run_cli(sigil_home, "monitor", "-s", "looping", "--mode", "json", "--once")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["retry_storms"] == [storm]
    proc = run_cli(sigil_home, "monitor", "-s", "looping", "--mode", "minimal", "--once")
    assert "retry storm: memory" in proc.stdout.splitlines()[0], proc.stdout
    assert "Anomaly:   retry storm: memory retried 5 times (seq 6, 7, 8, 9, 10)" in proc.stdout
