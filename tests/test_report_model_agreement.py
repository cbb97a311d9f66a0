"""``sigil report``, ``diff`` and ``sessions`` agree with the native session
model on logs a hostile review built (contract 12): a log whose head lost its
``session_start`` (logrotate ``rotate 0`` during a run), a session past
SQLite's 64-bit integers, and a log with a hole in ``seq`` (logrotate
``copytruncate`` losing lines). Real ``sigil`` subprocesses on real files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli


def _event(
    session: str,
    n: int,
    event_type: str,
    component: str,
    tokens: int,
    meta: dict[str, Any],
    seq: int,
) -> dict[str, Any]:
    return {
        "timestamp": f"2026-11-29T10:{n // 60:02d}:{n % 60:02d}.000000+00:00",
        "session_id": session,
        "event_type": event_type,
        "component": component,
        "message": "m",
        "tokens": tokens,
        "metadata": meta,
        "seq": seq,
    }


def _write(log_path: Path, session: str, events: list[dict[str, Any]]) -> Path:
    directory = log_path / "sessions" / session
    directory.mkdir(parents=True, mode=0o700, exist_ok=True)
    log = directory / "execution.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    os.chmod(log, 0o600)
    return log


def _orphan(log_path: Path, session: str, *, with_run_2: bool) -> None:
    """Run 1's tail without its ``session_start`` (seq from 10), then maybe a whole run 2."""
    spec: list[tuple[str, str, int, dict[str, Any]]] = [
        ("step_complete", "reasoning", 111, {"run": 1}),
        ("step_complete", "contracts", 239, {"run": 1}),
        ("session_complete", "orchestrator", 0, {"run": 1, "status": "complete"}),
    ]
    if with_run_2:
        spec += [
            ("session_start", "orchestrator", 0, {"run": 2}),
            ("step_complete", "routing", 22, {"run": 2}),
            ("session_complete", "orchestrator", 0, {"run": 2, "status": "complete"}),
        ]
    events = [_event(session, i, *s, seq=10 + i) for i, s in enumerate(spec)]
    _write(log_path, session, events)


def _views(home: Path, session: str) -> dict[str, Any]:
    """Each view's tokens, runs and status of ``session``."""
    out: dict[str, Any] = {}
    proc = run_cli(home, "monitor", "-s", session, "--mode", "json", "--once")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.splitlines()[0])
    out["monitor"] = (m["tokens_used"], m["runs"], m["status"])
    proc = run_cli(home, "sessions", "--json")
    assert proc.returncode == 0, proc.stderr
    (s,) = [r for r in json.loads(proc.stdout) if r["session_id"] == session]
    out["sessions"] = (s["tokens_used"], s["runs"], s["status"])
    proc = run_cli(home, "diff", session, session, "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)["a"]
    out["diff"] = (d["tokens"], d["runs"], d["status"])
    proc = run_cli(home, "report", "session", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in json.loads(proc.stdout)["rows"] if r["session"] == session]
    out["report"] = [(r["tokens"], r["runs"]) for r in rows]
    return out


# -- 1. events outside any started run ---------------------------------------------


def test_a_log_whose_first_run_lost_its_start_reports_what_the_model_counts(
    sigil_home: Path, log_path: Path
) -> None:
    _orphan(log_path, "OR1", with_run_2=True)
    views = _views(sigil_home, "OR1")
    assert views["monitor"] == (372, 1, "complete")
    assert views["sessions"] == views["monitor"]
    assert views["diff"] == views["monitor"]
    assert views["report"] == [(372, 1)]
    proc = run_cli(sigil_home, "report", "daily", "--json")
    total = json.loads(proc.stdout)["total"]
    assert (total["tokens"], total["runs"]) == (372, 1)


def test_a_log_holding_only_a_run_without_its_start_is_reported(
    sigil_home: Path, log_path: Path
) -> None:
    _orphan(log_path, "OR1", with_run_2=False)
    views = _views(sigil_home, "OR1")
    assert views["monitor"] == (350, 0, "complete")
    assert views["sessions"] == views["monitor"]
    assert views["diff"] == views["monitor"]
    assert views["report"] == [(350, 0)]
    text = run_cli(sigil_home, "report", "session")
    assert text.returncode == 0 and "OR1" in text.stdout and "350" in text.stdout


def test_the_index_refreshed_by_logs_maintain_counts_them_too(
    sigil_home: Path, log_path: Path
) -> None:
    """The same rows whether the report built the index or ``logs maintain``
    brought an existing one up to date after the log changed."""
    _orphan(log_path, "OR1", with_run_2=False)
    assert run_cli(sigil_home, "report").returncode == 0
    _orphan(log_path, "OR1", with_run_2=True)
    proc = run_cli(sigil_home, "logs", "maintain")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(run_cli(sigil_home, "report", "session", "--json").stdout)["rows"]
    assert [(r["session"], r["tokens"], r["runs"]) for r in rows] == [("OR1", 372, 1)]


# -- 2. a session past SQLite's 64-bit integers -------------------------------------


BIG = 2**53  # the API's documented largest tokens of one event


def _huge(log_path: Path, session: str, events: int) -> int:
    spec = [_event(session, 0, "session_start", "orchestrator", 0, {"run": 1}, 0)]
    spec += [_event(session, 1, "step_complete", "c", BIG, {}, 1 + i) for i in range(events)]
    spec.append(
        _event(
            session, 2, "session_complete", "orchestrator", 0, {"status": "complete"}, events + 1
        )
    )
    _write(log_path, session, spec)
    return events * BIG


def _small(log_path: Path, session: str, tokens: int) -> None:
    _write(
        log_path,
        session,
        [
            _event(session, 0, "session_start", "orchestrator", 0, {"run": 1}, 0),
            _event(session, 1, "step_complete", "c", tokens, {}, 1),
            _event(session, 2, "session_complete", "orchestrator", 0, {"status": "complete"}, 2),
        ],
    )


@pytest.mark.parametrize("events", [1025, 2100])
def test_a_session_past_64_bit_integers_breaks_no_other_session(
    sigil_home: Path, log_path: Path, events: int
) -> None:
    _huge(log_path, "O1", events)
    _small(log_path, "good1", 1234)
    for argv in (["report", "session", "--json"], ["report", "daily"], ["logs", "maintain"]):
        proc = run_cli(sigil_home, *argv)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr and "OverflowError" not in proc.stderr
    doc = json.loads(run_cli(sigil_home, "report", "session", "--json").stdout)
    rows = {r["session"]: r for r in doc["rows"]}
    assert rows["good1"]["tokens"] == 1234 and not rows["good1"]["overflow"]
    assert rows["O1"]["overflow"] and doc["total"]["overflow"]
    # the largest number SQLite holds, a lower bound of the model's total
    assert rows["O1"]["tokens"] == 2**63 - 1
    text = run_cli(sigil_home, "report", "session")
    assert text.returncode == 0, text.stderr
    assert "1,234" in text.stdout
    assert "overflow: session O1" in text.stdout
    # every breakdown still answers
    for group in ("component", "model", "weekly"):
        proc = run_cli(sigil_home, "report", group, "--breakdown", "--json")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_sums_past_64_bits_across_sessions_are_marked_not_raised(
    sigil_home: Path, log_path: Path
) -> None:
    """Each session fits SQLite's integers; their sum does not."""
    for i in range(3):
        each = _huge(log_path, f"big{i}", 400)  # 400 * 2**53: under 2**63
    _small(log_path, "good1", 7)
    proc = run_cli(sigil_home, "report", "session", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    rows = {r["session"]: r for r in doc["rows"]}
    assert rows["big0"]["tokens"] == each and not rows["big0"]["overflow"]
    assert rows["good1"]["tokens"] == 7
    assert doc["total"]["overflow"] and doc["total"]["tokens"] == 2**63 - 1
    proc = run_cli(sigil_home, "report", "daily")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


# -- 3. a hole in seq (events lost) -------------------------------------------------


def _with_gap(log_path: Path, session: str) -> None:
    """Seqs 0-2, then 7-8: five events lost (a copytruncate race)."""
    seqs = [0, 1, 2, 7, 8]
    spec: list[tuple[str, str, int, dict[str, Any]]] = [
        ("session_start", "orchestrator", 0, {"run": 1}),
        ("step_complete", "a", 1000, {}),
        ("step_complete", "b", 940, {}),
        ("step_complete", "c", 2000, {}),
        ("session_complete", "orchestrator", 0, {"status": "complete"}),
    ]
    _write(
        log_path,
        session,
        [
            _event(session, i, *s, seq=seq)
            for i, (s, seq) in enumerate(zip(spec, seqs, strict=True))
        ],
    )


def test_sessions_marks_a_session_with_missing_events(sigil_home: Path, log_path: Path) -> None:
    _with_gap(log_path, "M1")
    _small(log_path, "whole", 5)
    monitor = json.loads(
        run_cli(sigil_home, "monitor", "-s", "M1", "--mode", "json", "--once").stdout.splitlines()[
            0
        ]
    )
    assert monitor["missing_events"] == 4
    rows = {
        r["session_id"]: r for r in json.loads(run_cli(sigil_home, "sessions", "--json").stdout)
    }
    assert rows["M1"]["missing_events"] == 4 and rows["M1"]["tokens_used"] == 3940
    assert rows["whole"]["missing_events"] == 0
    text = run_cli(sigil_home, "sessions")
    assert text.returncode == 0, text.stderr
    (line,) = [x for x in text.stdout.splitlines() if x.startswith("M1 ")]
    assert "+missing" in line
    (whole,) = [x for x in text.stdout.splitlines() if x.startswith("whole ")]
    assert "missing" not in whole
    assert "session M1: 4 events missing" in text.stderr


def test_report_marks_missing_events(sigil_home: Path, log_path: Path) -> None:
    _with_gap(log_path, "M1")
    _small(log_path, "whole", 5)
    doc = json.loads(run_cli(sigil_home, "report", "session", "--json").stdout)
    rows = {r["session"]: r for r in doc["rows"]}
    assert rows["M1"]["missing_events"] == 4 and rows["M1"]["tokens"] == 3940
    assert rows["whole"]["missing_events"] == 0
    assert doc["total"]["missing_events"] == 4
    assert doc["incomplete"] == [{"session": "M1", "missing_events": 4}]
    text = run_cli(sigil_home, "report", "session")
    assert text.returncode == 0, text.stderr
    assert "incomplete: session M1: 4 events missing" in text.stdout
    daily = json.loads(run_cli(sigil_home, "report", "daily", "--json").stdout)
    assert daily["total"]["missing_events"] == 4
