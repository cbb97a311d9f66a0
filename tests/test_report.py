"""``sigil report`` on generated histories whose answers the test computes itself.

Each history is written event by event (session_start, steps, retries, errors,
a final event) from a plain list of steps; the expected totals and latency
percentiles are worked out here from that list, independently of the native
model and of the index (the percentile from the sorted raw latencies, not from
histograms). The real ``sigil`` command is run in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import run_cli

#: rust/fold.rs LATENCY_BOUNDS_MS, written out again as the reference's own copy
BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5)
FAILED = ("error", "budget_exceeded", "interrupted", "incomplete")


@dataclass
class Step:
    component: str
    tokens: int
    kind: str = "ok"  # ok | error | retry
    latency_ms: float | None = None
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Run:
    session: str
    number: int
    start: datetime
    steps: list[Step]
    status: str = "complete"  # or error, budget_exceeded, interrupted, or None (no final)
    events: list[dict[str, Any]] = field(default_factory=list)


def write_runs(log_path: Path, runs: list[Run]) -> None:
    """Append each run's events to its session's log (seq rising across runs)."""
    seqs: dict[str, int] = {}
    for run in runs:
        log = log_path / "sessions" / run.session / "execution.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lines, seqs[run.session] = run_lines(run, seqs.get(run.session, 0))
        with log.open("ab") as f:
            f.write(b"\n".join(lines) + b"\n")


def run_lines(run: Run, seq: int) -> tuple[list[bytes], int]:
    """The run's events as sigil writes them, one second apart, from ``seq``."""
    at = run.start
    lines = []

    def event(kind: str, component: str, tokens: int, meta: dict[str, Any]) -> None:
        nonlocal seq, at
        lines.append(
            orjson.dumps(
                {
                    "timestamp": at.isoformat(),
                    "session_id": run.session,
                    "event_type": kind,
                    "component": component,
                    "message": kind,
                    "tokens": tokens,
                    "metadata": meta,
                    "seq": seq,
                }
            )
        )
        seq += 1
        at += timedelta(seconds=1)

    event("session_start", "orchestrator", 0, {"run": run.number, "budget": 10**6})
    for step in run.steps:
        if step.kind == "ok":
            meta: dict[str, Any] = {"run": run.number, "attempt": 1}
            if step.latency_ms is not None:
                meta["latency_ms"] = step.latency_ms
            if step.model is not None:
                meta.update(
                    model=step.model,
                    input_tokens=step.input_tokens,
                    output_tokens=step.output_tokens,
                )
            event("step_complete", step.component, step.tokens, meta)
        elif step.kind == "retry":
            event("retry_attempt", step.component, step.tokens, {"attempt": 1})
        else:
            event("step_error", step.component, step.tokens, {"error": "boom"})
    if run.status == "complete":
        event("session_complete", "orchestrator", 0, {"status": "complete"})
    elif run.status is not None:
        event("session_error", "orchestrator", 0, {"status": run.status, "reason": "x"})
    return lines, seq


# -- the reference ---------------------------------------------------------------


def ref_quantile(values: list[float], p: float) -> float | None:
    """The native rule from raw values: the bucket bound of the ceil(p*n)-th
    smallest latency, never above the largest."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(max(math.ceil(p * len(ordered)), 1), len(ordered))
    x = ordered[rank - 1]
    bound = next((b for b in BOUNDS if b >= x), math.inf)
    return min(float(bound), ordered[-1])


def reference(runs: list[Run], status_of: dict[tuple[str, int], str] | None = None) -> dict:
    steps = [s for r in runs for s in r.steps]
    latencies = [s.latency_ms for s in steps if s.kind == "ok" and s.latency_ms is not None]
    statuses = [(status_of or {}).get((r.session, r.number), r.status) for r in runs]
    return {
        "sessions": len({r.session for r in runs}),
        "runs": len(runs),
        "failed_runs": sum(s in FAILED for s in statuses),
        "tokens": sum(s.tokens for s in steps),
        "input_tokens": sum(s.input_tokens for s in steps if s.kind == "ok"),
        "output_tokens": sum(s.output_tokens for s in steps if s.kind == "ok"),
        "operations": sum(s.kind == "ok" for s in steps),
        "errors": sum(s.kind == "error" for s in steps),
        "retries": sum(s.kind == "retry" for s in steps),
        "p50_latency_ms": ref_quantile(latencies, 0.5),
        "p95_latency_ms": ref_quantile(latencies, 0.95),
        "p99_latency_ms": ref_quantile(latencies, 0.99),
        # no hole in seq in these logs, and no number past SQLite's integers
        "missing_events": 0,
        "overflow": False,
    }


def steps_for(seed: int, n: int = 12) -> list[Step]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choice(["ok", "ok", "ok", "ok", "retry", "error"])
        component = rng.choice(["planning", "reasoning", "memory"])
        latency = rng.choice([0.5, 3.0, 7.5, 42.0, 150.0, 1200.0, 9000.0])
        model = rng.choice([None, "m-small", "m-large"]) if kind == "ok" else None
        tokens = rng.randint(1, 900)
        inp = tokens // 3 if model else 0
        out.append(
            Step(
                component,
                tokens,
                kind,
                latency if kind == "ok" and i % 5 != 0 else None,
                model,
                inp,
                tokens - inp if model else 0,
            )
        )
    return out


def day(text: str) -> datetime:
    return datetime.fromisoformat(text)


def report(home: Path, *args: str, tz: str = "UTC") -> dict[str, Any]:
    proc = run_cli(home, "report", *args, "--json", TZ=tz)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def strip_key(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in keys}


# -- the tests ---------------------------------------------------------------


@pytest.fixture
def history(log_path: Path) -> list[Run]:
    runs = [
        Run("alpha", 1, day("2026-11-01T09:00:00+00:00"), steps_for(1)),
        Run("alpha", 2, day("2026-11-02T10:00:00+00:00"), steps_for(2), status="error"),
        Run("beta", 1, day("2026-11-01T12:00:00+00:00"), steps_for(3)),
        Run("beta", 2, day("2026-11-03T08:00:00+00:00"), steps_for(4), status="budget_exceeded"),
        Run("gamma", 1, day("2026-11-02T15:30:00+00:00"), steps_for(5)),
    ]
    write_runs(log_path, runs)
    return runs


def test_daily_report_matches_the_reference(sigil_home: Path, history: list[Run]) -> None:
    doc = report(sigil_home, "daily")
    by_day: dict[str, list[Run]] = {}
    for run in history:
        by_day.setdefault(run.start.date().isoformat(), []).append(run)
    assert [row["period"] for row in doc["rows"]] == sorted(by_day)
    for row in doc["rows"]:
        assert strip_key(row, "period") == reference(by_day[row["period"]]), row["period"]
    assert doc["total"] == reference(history)
    # The weekly and monthly rows cover the same runs.
    weekly = report(sigil_home, "weekly")
    assert [r["period"] for r in weekly["rows"]] == ["2026-10-26", "2026-11-02"]
    assert weekly["total"] == doc["total"]
    monthly = report(sigil_home, "monthly")
    assert [r["period"] for r in monthly["rows"]] == ["2026-11"]
    assert strip_key(monthly["rows"][0], "period") == reference(history)


def test_session_component_and_model_groups(sigil_home: Path, history: list[Run]) -> None:
    sessions = report(sigil_home, "session")
    for row in sessions["rows"]:
        mine = [r for r in history if r.session == row["session"]]
        assert strip_key(row, "session") == reference(mine)
    components = report(sigil_home, "component")
    names = {s.component for r in history for s in r.steps} | {"orchestrator"}
    assert {row["component"] for row in components["rows"]} == names
    for row in components["rows"]:
        only = [
            Run(
                r.session,
                r.number,
                r.start,
                [s for s in r.steps if s.component == row["component"]],
                r.status,
            )
            for r in history
        ]
        expected = reference(only)
        for key in ("tokens", "input_tokens", "output_tokens", "errors", "retries", "operations"):
            assert row[key] == expected[key], (row["component"], key)
        for key in ("p50_latency_ms", "p95_latency_ms", "p99_latency_ms"):
            assert row[key] == expected[key], (row["component"], key)
    tokens = [row["tokens"] for row in components["rows"]]
    assert tokens == sorted(tokens, reverse=True)
    # Each step counts under the model it named ('-': none), exactly.
    models = report(sigil_home, "model")
    expected_models: dict[str, dict[str, int]] = {"-": {"tokens": 0, "calls": 0, "errors": 0}}
    for r in history:
        for s in r.steps:
            totals = expected_models.setdefault(
                s.model or "-", {"tokens": 0, "calls": 0, "errors": 0}
            )
            totals["tokens"] += s.tokens
            totals["calls"] += s.kind in ("ok", "error")
            totals["errors"] += s.kind == "error"
    got = {
        r["model"]: {"tokens": r["tokens"], "calls": r["calls"], "errors": r["errors"]}
        for r in models["rows"]
    }
    assert got == expected_models
    assert sum(r["tokens"] for r in models["rows"]) == models["total"]["tokens"]


def test_breakdown_splits_each_day_by_component_and_model(
    sigil_home: Path, history: list[Run]
) -> None:
    doc = report(sigil_home, "daily", "--breakdown")
    assert doc["breakdown"] is True
    for row in doc["rows"]:
        assert set(row) >= {"period", "component", "model"}
    # The split rows add up to the day's tokens (checked here, in the test).
    plain = {r["period"]: r["tokens"] for r in report(sigil_home, "daily")["rows"]}
    summed: dict[str, int] = {}
    for row in doc["rows"]:
        summed[row["period"]] = summed.get(row["period"], 0) + row["tokens"]
    assert summed == plain
    # Each (day, component, model) row: the steps of that day's component that
    # named that model ('-': none), exactly.
    expected: dict[tuple[str, str, str], int] = {}
    for r in history:
        for s in r.steps:
            key = (r.start.date().isoformat(), s.component, s.model or "-")
            expected[key] = expected.get(key, 0) + s.tokens
        expected.setdefault((r.start.date().isoformat(), "orchestrator", "-"), 0)
    got = {(r["period"], r["component"], r["model"]): r["tokens"] for r in doc["rows"]}
    assert got == expected


def test_a_component_that_changes_model_within_a_run_is_split_exactly(
    sigil_home: Path, log_path: Path
) -> None:
    """Issue 13: per-model numbers are the model's exact totals, not a
    component's last model standing for all of its steps."""
    steps = [
        Step("planning", 100, "ok", 5.0, "m-a", 70, 30),
        Step("planning", 40, "ok", 5.0, "m-b", 30, 10),
        Step("planning", 7, "error"),
        Step("planning", 11, "ok", 5.0, "m-a", 8, 3),
    ]
    write_runs(log_path, [Run("switch", 1, day("2026-11-04T09:00:00+00:00"), steps)])
    rows = {r["model"]: r for r in report(sigil_home, "model")["rows"]}
    assert {m: r["tokens"] for m, r in rows.items()} == {"m-a": 111, "m-b": 40, "-": 7}
    assert (rows["m-a"]["calls"], rows["m-a"]["input_tokens"], rows["m-a"]["output_tokens"]) == (
        2,
        78,
        33,
    )
    assert (rows["-"]["calls"], rows["-"]["errors"]) == (1, 1)
    split = report(sigil_home, "component", "--breakdown")["rows"]
    got = {(r["component"], r["model"]): r["tokens"] for r in split}
    assert got == {
        ("planning", "m-a"): 111,
        ("planning", "m-b"): 40,
        ("planning", "-"): 7,
        ("orchestrator", "-"): 0,
    }


def test_session_spanning_midnight_counts_each_run_on_its_own_day(
    sigil_home: Path, log_path: Path
) -> None:
    runs = [
        Run("night", 1, day("2026-11-05T23:50:00+00:00"), steps_for(7)),
        Run("night", 2, day("2026-11-06T00:10:00+00:00"), steps_for(8)),
    ]
    write_runs(log_path, runs)
    doc = report(sigil_home, "daily")
    assert [r["period"] for r in doc["rows"]] == ["2026-11-05", "2026-11-06"]
    assert strip_key(doc["rows"][0], "period") == reference(runs[:1])
    assert strip_key(doc["rows"][1], "period") == reference(runs[1:])
    # In Tokyo (UTC+9; a POSIX TZ string: no tzdata needed) both runs started on the 6th.
    tokyo = report(sigil_home, "daily", tz="JST-9")
    assert [r["period"] for r in tokyo["rows"]] == ["2026-11-06"]
    assert strip_key(tokyo["rows"][0], "period") == reference(runs)
    # One session, two runs.
    sessions = report(sigil_home, "session")
    assert [(r["session"], r["runs"]) for r in sessions["rows"]] == [("night", 2)]


def test_since_and_until_honour_time_zones(sigil_home: Path, log_path: Path) -> None:
    early = Run("tz1", 1, day("2026-11-01T20:00:00+00:00"), steps_for(9))
    late = Run("tz2", 1, day("2026-11-02T02:00:00+00:00"), steps_for(10))
    write_runs(log_path, [early, late])
    # Midnight of the 2nd in UTC+05:00 is 19:00 UTC on the 1st: both runs.
    both = report(sigil_home, "daily", "--since", "2026-11-02T00:00:00+05:00")
    assert both["total"] == reference([early, late])
    # A bare date is local midnight: in UTC only the later run.
    only_late = report(sigil_home, "daily", "--since", "2026-11-02")
    assert only_late["total"] == reference([late])
    # ... and in New York (UTC-5 in November) midnight of the 2nd is 05:00 UTC: none.
    none = report(sigil_home, "daily", "--since", "2026-11-02", tz="EST5EDT,M3.2.0,M11.1.0")
    assert none["rows"] == [] and none["total"]["runs"] == 0
    # --until a bare date covers that whole day; a moment is exclusive.
    assert report(sigil_home, "daily", "--until", "2026-11-01")["total"] == reference([early])
    until_z = report(sigil_home, "daily", "--until", "2026-11-02T02:00:00Z")
    assert until_z["total"] == reference([early])
    prefix = report(sigil_home, "daily", "--session-prefix", "tz2")
    assert prefix["total"] == reference([late])


def _age(directory: Path, days: int) -> None:
    old = time.time() - days * 86400
    for path in directory.rglob("*"):
        os.utime(path, (old, old))


def test_archived_sessions_are_counted_without_extracting(
    sigil_home: Path, log_path: Path, history: list[Run]
) -> None:
    from sigil.telemetry.log_rotation import LogRotator

    before = report(sigil_home, "daily")
    _age(log_path / "sessions" / "alpha", 30)
    _age(log_path / "sessions" / "beta", 30)
    archived = LogRotator(log_path, retention_days=7).archive_old_sessions()
    assert len(archived) == 2 and not (log_path / "sessions" / "alpha").exists()
    listing = sorted(p.relative_to(log_path) for p in log_path.rglob("*"))
    after = report(sigil_home, "daily")
    assert after == before
    # Nothing was extracted: the tree is as it was, plus the index.
    assert sorted(p.relative_to(log_path) for p in log_path.rglob("*")) == listing
    sessions = report(sigil_home, "session")
    assert {r["session"] for r in sessions["rows"]} == {"alpha", "beta", "gamma"}


def test_deleted_or_corrupt_index_is_rebuilt_with_the_same_answer(
    sigil_home: Path, log_path: Path, history: list[Run]
) -> None:
    index = log_path / "report_index.sqlite3"
    first = report(sigil_home, "daily", "--breakdown")
    assert index.exists() and (index.stat().st_mode & 0o777) == 0o600
    rows = sqlite3.connect(index).execute("SELECT count(*) FROM runs").fetchone()[0]
    assert rows == len(history)
    index.unlink()
    assert report(sigil_home, "daily", "--breakdown") == first
    index.write_bytes(b"not a database at all" * 100)
    assert report(sigil_home, "daily", "--breakdown") == first
    assert sqlite3.connect(index).execute("SELECT count(*) FROM runs").fetchone()[0] == rows


def test_stale_index_picks_up_a_new_run(
    sigil_home: Path, log_path: Path, history: list[Run]
) -> None:
    report(sigil_home, "daily")  # builds the index
    extra = Run("gamma", 2, day("2026-11-03T18:00:00+00:00"), steps_for(11), status="interrupted")
    write_runs_after(log_path, extra)
    doc = report(sigil_home, "daily")
    assert doc["total"] == reference([*history, extra])
    # The same as an index built from nothing.
    (log_path / "report_index.sqlite3").unlink()
    assert report(sigil_home, "daily") == doc
    # A session that is gone drops out.
    shutil.rmtree(log_path / "sessions" / "beta")
    gone = report(sigil_home, "daily")
    assert gone["total"] == reference([r for r in [*history, extra] if r.session != "beta"])


def write_runs_after(log_path: Path, run: Run) -> None:
    """Append a run to a session that already has events (seq continues)."""
    log = log_path / "sessions" / run.session / "execution.jsonl"
    last = json.loads(log.read_bytes().splitlines()[-1])
    lines, _ = run_lines(run, last["seq"] + 1)
    with log.open("ab") as f:
        f.write(b"\n".join(lines) + b"\n")


def test_incomplete_run_counts_as_failed(sigil_home: Path, log_path: Path) -> None:
    runs = [Run("dead", 1, day("2026-11-07T10:00:00+00:00"), steps_for(12), status=None)]
    write_runs(log_path, runs)
    doc = report(sigil_home, "session")
    assert doc["rows"][0]["failed_runs"] == 1
    assert doc["total"] == reference(runs, {("dead", 1): "incomplete"})


def test_merged_percentiles_agree_with_the_native_model_for_one_session(
    log_path: Path, history: list[Run]
) -> None:
    from sigil.reports.index import open_index
    from sigil.reports.query import Filters, run_report
    from sigil.telemetry.log_parser import empty_snapshot, snapshot_many

    conn, _ = open_index(log_path)
    bounds = empty_snapshot().latency_bounds_ms
    for session in ("alpha", "beta", "gamma"):
        got = run_report(conn, "component", Filters(session_prefix=session), bounds)
        snap = snapshot_many([log_path / "sessions" / session])[0]
        assert not isinstance(snap, str)
        for row in got.rows:
            native = snap.components[row["component"]]
            assert row["p50_latency_ms"] == native.p50_latency_ms
            assert row["p95_latency_ms"] == native.p95_latency_ms
            assert row["p99_latency_ms"] == native.p99_latency_ms
            assert row["tokens"] == native.tokens


def test_latency_quantile_reads_merged_buckets() -> None:
    from sigil.reports.query import latency_quantile

    # 10 steps of 3 ms (bucket 2: <= 5) and 1 of 900 ms (bucket 9: <= 1000).
    assert latency_quantile({2: 10, 9: 1}, 900.0, 0.5) == 5.0
    assert latency_quantile({2: 10, 9: 1}, 900.0, 0.95) == 900.0
    assert latency_quantile({2: 10}, 3.0, 0.99) == 3.0
    assert latency_quantile({18: 2}, 7e5, 0.5) == 7e5
    assert latency_quantile({}, None, 0.5) is None


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["report", "yearly"], "unknown report 'yearly'"),
        (["report", "--since", "2026-13-01"], "--since '2026-13-01' is not a date"),
        (["report", "--until", "yesterday"], "--until 'yesterday' is not a date"),
        (["report", "--session-prefix", "nobody"], "no session ID starts with 'nobody'"),
        (
            ["report", "--since", "2026-11-02", "--until", "2026-11-01T12:00"],
            "--until '2026-11-01T12:00' is not after --since '2026-11-02'",
        ),
        (["report", "--bogus"], "No such option"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(
    sigil_home: Path, history: list[Run], args: list[str], says: str
) -> None:
    proc = run_cli(sigil_home, *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and says in lines[0], proc.stderr


def test_table_on_a_pipe_is_whole(sigil_home: Path, history: list[Run]) -> None:
    proc = run_cli(sigil_home, "report", "daily", TZ="UTC")
    assert proc.returncode == 0, proc.stderr
    assert "2026-11-01" in proc.stdout and "TOTAL" in proc.stdout
    assert "…" not in proc.stdout
    assert "COST" not in proc.stdout.upper()


def test_empty_log_path_reports_nothing(sigil_home: Path) -> None:
    doc = report(sigil_home, "daily")
    assert doc["rows"] == [] and doc["total"]["runs"] == 0


def test_runs_only_the_ledger_knows_still_count(sigil_home: Path, log_path: Path) -> None:
    """An external rotator deleted the events of the first two runs of an
    offline-pipeline session: the ledger (tokens.json) still knows them, and the
    report counts them as the session's other views do."""
    for _ in range(2):
        proc = run_cli(sigil_home, "orchestrate", "--task", "Analyze Acme", "--session", "kept")
        assert proc.returncode == 0, proc.stderr
    session = log_path / "sessions" / "kept"
    report(sigil_home, "session")  # index the two runs from the log
    os.rename(session / "execution.jsonl", session / "execution.jsonl.1")
    (session / "execution.jsonl.1").unlink()
    proc = run_cli(sigil_home, "orchestrate", "--task", "Analyze Globex", "--session", "kept")
    assert proc.returncode == 0, proc.stderr
    ledger = json.loads((session / "tokens.json").read_text())
    assert [r["run"] for r in ledger["runs"]] == [1, 2, 3]
    doc = report(sigil_home, "session")
    row = doc["rows"][0]
    assert row["runs"] == 3
    assert row["tokens"] == ledger["total_used"] == sum(r["tokens_used"] for r in ledger["runs"])
    # The same from an index built from nothing.
    (log_path / "report_index.sqlite3").unlink()
    assert report(sigil_home, "session") == doc


def test_a_run_without_a_final_event_is_running_while_its_lock_is_held(
    sigil_home: Path, log_path: Path
) -> None:
    """Contract 7: running while a writer holds the lock, incomplete (a failure)
    once it is gone; the index notices the lock being released."""
    from sigil.core.locks import SessionLock

    runs = [Run("busy", 1, day("2026-11-08T10:00:00+00:00"), steps_for(14), status=None)]
    write_runs(log_path, runs)
    lock = SessionLock(log_path / "sessions" / "busy").acquire()
    try:
        held = report(sigil_home, "session")
        assert held["total"] == reference(runs, {("busy", 1): "running"})
    finally:
        lock.release()
    gone = report(sigil_home, "session")
    assert gone["total"] == reference(runs, {("busy", 1): "incomplete"})
    assert gone["total"]["failed_runs"] == 1


def test_report_agrees_with_sigil_sessions(sigil_home: Path, history: list[Run]) -> None:
    """Contract 12: one truth, whichever view shows it."""
    proc = run_cli(sigil_home, "sessions", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {
        row["session_id"]: (row["tokens_used"], row["runs"]) for row in json.loads(proc.stdout)
    }
    doc = report(sigil_home, "session")
    assert {row["session"]: (row["tokens"], row["runs"]) for row in doc["rows"]} == listed


def test_a_session_both_live_and_archived_counts_once(
    sigil_home: Path, log_path: Path, history: list[Run]
) -> None:
    """A maintenance run that died between writing the archive and removing the
    directory leaves both (log_rotation's crash-safety): the runs count once.
    A later session reusing the ID (its own runs) counts beside the archive."""
    import tarfile

    before = report(sigil_home, "session")
    day_dir = log_path / "archive" / "2026-11-20"
    day_dir.mkdir(parents=True)
    with tarfile.open(day_dir / "alpha.tar.gz", "w:gz") as tar:
        tar.add(log_path / "sessions" / "alpha", arcname="alpha")
    assert report(sigil_home, "session") == before
    # The directory goes (maintenance finished): still the same numbers.
    shutil.rmtree(log_path / "sessions" / "alpha")
    assert report(sigil_home, "session") == before
    # A new session under the same ID: its run and the archived ones.
    again = Run("alpha", 1, day("2026-11-25T09:00:00+00:00"), steps_for(15))
    write_runs(log_path, [again])
    alpha = [r for r in history if r.session == "alpha"]
    row = next(r for r in report(sigil_home, "session")["rows"] if r["session"] == "alpha")
    assert strip_key(row, "session") == reference([*alpha, again])


def test_an_index_locked_by_another_report_is_waited_for_then_done_in_memory(
    log_path: Path, history: list[Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sigil.reports import index as index_module
    from sigil.reports.query import Filters, run_report
    from sigil.telemetry.log_parser import empty_snapshot

    conn, _ = index_module.open_index(log_path)
    conn.close()
    # gamma is stale now (an mtime no tick can collide with)
    os.utime(log_path / "sessions" / "gamma" / "execution.jsonl", ns=(10**18, 10**18))
    holder = sqlite3.connect(log_path / "report_index.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another report is writing
    monkeypatch.setattr(index_module, "BUSY_TIMEOUT_S", 0.05)
    try:
        conn, state = index_module.open_index(log_path)
        got = run_report(conn, "daily", Filters(), empty_snapshot().latency_bounds_ms)
    finally:
        holder.execute("ROLLBACK")
    assert state.rebuilt  # built in memory, the file left to the other report
    assert got.total == reference(history)


def test_an_archive_with_a_compressed_segment_and_a_broken_archive(
    sigil_home: Path, log_path: Path
) -> None:
    """logrotate's ``compress`` left run 1 in ``execution.jsonl.1.gz``: read from
    the archive in memory, oldest first. A broken archive is one warning line;
    the others still count."""
    import gzip
    import tarfile

    runs = [
        Run("rot", 1, day("2026-11-10T09:00:00+00:00"), steps_for(16)),
        Run("rot", 2, day("2026-11-11T09:00:00+00:00"), steps_for(17)),
    ]
    write_runs(log_path / "staging", runs)
    lines = (log_path / "staging" / "sessions" / "rot" / "execution.jsonl").read_bytes()
    second_start = lines.index(b'"metadata":{"run":2,')
    cut = lines.rindex(b"\n", 0, second_start) + 1
    session = log_path / "staging" / "rot"
    session.mkdir()
    (session / "execution.jsonl.1.gz").write_bytes(gzip.compress(lines[:cut]))
    (session / "execution.jsonl").write_bytes(lines[cut:])
    day_dir = log_path / "archive" / "2026-11-20"
    day_dir.mkdir(parents=True)
    with tarfile.open(day_dir / "rot.tar.gz", "w:gz") as tar:
        tar.add(session, arcname="rot")
    (day_dir / "junk.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    shutil.rmtree(log_path / "staging")
    proc = run_cli(sigil_home, "report", "daily", "--json", TZ="UTC")
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.splitlines()
    assert len(warnings) == 1 and "session junk is unreadable" in warnings[0], proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["total"] == reference(runs)
    assert [r["period"] for r in doc["rows"]] == ["2026-11-10", "2026-11-11"]


# -- token jumps: a component's tokens per call far above its own history ----------

#: the rule's numbers, written out again as the reference's own copy
JUMP_HISTORY, JUMP_MIN_HISTORY, JUMP_FACTOR, JUMP_MIN_TOKENS = 20, 5, 2.0, 100


def per_call(steps: list[Step], component: str) -> float | None:
    """Tokens per call (a completed or failed step; no retries here) of one
    component in one run, from the steps written."""
    mine = [s for s in steps if s.component == component]
    calls = sum(s.kind in ("ok", "error") for s in mine)
    return sum(s.tokens for s in mine) / calls if calls else None


#: calls shown as the events of a jump (the heaviest, most tokens first)
HEAVIEST_CALLS = 5


def call_events(runs: list[Run]) -> dict[tuple[str, int, str], list[tuple[int, int]]]:
    """(session, run, component) -> (seq, tokens) of each call (completed or
    failed step), from the lines :func:`write_runs` writes for ``runs``."""
    out: dict[tuple[str, int, str], list[tuple[int, int]]] = {}
    seqs: dict[str, int] = {}
    for run in runs:
        lines, seqs[run.session] = run_lines(run, seqs.get(run.session, 0))
        for raw in lines:
            e = orjson.loads(raw)
            if e["event_type"] in ("step_complete", "step_error"):
                key = (run.session, run.number, e["component"])
                out.setdefault(key, []).append((e["seq"], e["tokens"]))
    return out


def jump_events(calls: list[tuple[int, int]]) -> dict[str, Any]:
    """A jump's events: its calls, the heaviest (most tokens, then lower seq)."""
    heaviest = sorted(calls, key=lambda c: (-c[1], c[0]))[:HEAVIEST_CALLS]
    return {
        "calls": len(calls),
        "seqs": [seq for seq, _ in heaviest],
        "heaviest_calls": [{"seq": seq, "tokens": tokens} for seq, tokens in heaviest],
    }


def calls_text(jump: dict[str, Any]) -> str:
    """How a table names a jump's events."""
    heaviest = ", ".join(f"{c['seq']} ({c['tokens']:,} tokens)" for c in jump["heaviest_calls"])
    return f"its heaviest calls: seq {heaviest}"


def reference_jumps(runs: list[Run], first: int = 0) -> list[dict[str, Any]]:
    """Each run from ``first`` on (runs in start order), each component whose
    tokens per call is above JUMP_FACTOR x the nearest-rank p99 of its last
    JUMP_HISTORY runs' and at least JUMP_MIN_TOKENS above it, with the events
    that show it (:func:`jump_events`)."""
    out = []
    events = call_events(runs)
    components = sorted({s.component for r in runs for s in r.steps})
    for component in components:
        seen: list[float] = []
        for i, run in enumerate(runs):
            value = per_call(run.steps, component)
            if value is None:
                continue
            window = seen[-JUMP_HISTORY:]
            if i >= first and len(window) >= JUMP_MIN_HISTORY:
                ordered = sorted(window)
                p99 = ordered[math.ceil(0.99 * len(ordered)) - 1]
                if value > JUMP_FACTOR * p99 and value - p99 >= JUMP_MIN_TOKENS:
                    out.append(
                        {
                            "session": run.session,
                            "run": run.number,
                            "component": component,
                            "tokens_per_call": value,
                            "history_p99": p99,
                            "history_runs": len(window),
                            **jump_events(events[run.session, run.number, component]),
                        }
                    )
            seen.append(value)
    return sorted(out, key=lambda j: (j["session"], j["run"], j["component"]))


def steady_runs(n: int, seed: int, jump: dict[int, tuple[str, float]] | None = None) -> list[Run]:
    """``n`` sessions of one run each, a day apart: planning ~200, reasoning
    ~400 and memory ~5 tokens per call (3 calls each, one failed now and then);
    ``jump`` multiplies one component's tokens in the runs it names."""
    import random

    rng = random.Random(seed)
    start = day("2026-10-01T09:00:00+00:00")
    runs = []
    for i in range(n):
        steps = []
        for component, size in (("planning", 200), ("reasoning", 400), ("memory", 5)):
            factor = jump[i][1] if jump and i in jump and jump[i][0] == component else 1.0
            for k in range(3):
                tokens = int(rng.randint(size * 8 // 10, size * 12 // 10) * factor)
                kind = "error" if k == 2 and rng.random() < 0.2 else "ok"
                steps.append(Step(component, tokens, kind, 10.0 if kind == "ok" else None))
        runs.append(Run(f"s{i:02d}", 1, start + timedelta(days=i), steps))
    return runs


def test_a_steady_history_has_no_token_jump(sigil_home: Path, log_path: Path) -> None:
    # memory jumps 8x in the last run, but from ~5 to ~40 tokens per call: too small.
    runs = steady_runs(30, seed=7, jump={29: ("memory", 8.0)})
    write_runs(log_path, runs)
    doc = report(sigil_home, "daily")
    assert reference_jumps(runs) == []
    assert doc["anomalies"]["token_jumps"] == []
    assert "token jump" not in run_cli(sigil_home, "report", TZ="UTC").stdout


def test_a_component_jumping_5x_in_the_last_session_is_flagged(
    sigil_home: Path, log_path: Path
) -> None:
    runs = steady_runs(12, seed=3, jump={11: ("reasoning", 5.0)})
    write_runs(log_path, runs)
    want = reference_jumps(runs)
    assert [(j["session"], j["component"], j["history_runs"]) for j in want] == [
        ("s11", "reasoning", 11)
    ]
    doc = report(sigil_home, "session")
    assert doc["anomalies"]["token_jumps"] == [
        {**j, "tokens_per_call": pytest.approx(j["tokens_per_call"])} for j in want
    ]
    # A range holding only the last session still compares with the runs before it.
    last = report(sigil_home, "daily", "--since", "2026-10-12")
    assert last["anomalies"]["token_jumps"] == doc["anomalies"]["token_jumps"]
    # A range without the jump shows none.
    before = report(sigil_home, "daily", "--until", "2026-10-11")
    assert before["anomalies"]["token_jumps"] == []
    shown = run_cli(sigil_home, "report", "session", TZ="UTC").stdout
    j = want[0]
    assert (
        f"token jump: session s11 run 1: reasoning {j['tokens_per_call']:,.1f} tokens per call,"
        f" above {j['history_p99']:,.1f} (p99 of its last 11 runs); {calls_text(j)}"
    ) in shown


def test_too_little_history_flags_nothing(sigil_home: Path, log_path: Path) -> None:
    # Four runs before the jump: fewer than JUMP_MIN_HISTORY.
    runs = steady_runs(5, seed=5, jump={4: ("planning", 5.0)})
    write_runs(log_path, runs)
    assert reference_jumps(runs) == []
    assert report(sigil_home, "session")["anomalies"]["token_jumps"] == []
    # One more run (five before the jump) and it is flagged.
    more = steady_runs(6, seed=5, jump={5: ("planning", 5.0)})
    shutil.rmtree(log_path / "sessions")
    write_runs(log_path, more)
    flagged = report(sigil_home, "session")["anomalies"]["token_jumps"]
    assert [(j["session"], j["component"], j["history_runs"]) for j in flagged] == [
        ("s05", "planning", 5)
    ]


def test_the_history_is_the_last_20_runs_only(sigil_home: Path, log_path: Path) -> None:
    # Huge values long ago (runs 0-4) leave the window before the jump (run 25).
    runs = steady_runs(26, seed=11, jump={**{i: ("reasoning", 6.0) for i in range(5)}})
    runs[25] = steady_runs(26, seed=11, jump={25: ("reasoning", 5.0)})[25]
    write_runs(log_path, runs)
    want = reference_jumps(runs)
    assert [(j["session"], j["component"], j["history_runs"]) for j in want] == [
        ("s25", "reasoning", 20)
    ]
    got = report(sigil_home, "session")["anomalies"]["token_jumps"]
    assert got == [{**j, "tokens_per_call": pytest.approx(j["tokens_per_call"])} for j in want]
    # --session-prefix narrows the history to those sessions (s20..s25 here).
    narrow = reference_jumps(runs[20:])
    got = report(sigil_home, "session", "--session-prefix", "s2")["anomalies"]["token_jumps"]
    assert got == [{**j, "tokens_per_call": pytest.approx(j["tokens_per_call"])} for j in narrow]


def test_a_token_jump_names_its_heaviest_calls(sigil_home: Path, log_path: Path) -> None:
    """Issue 13: each anomaly "with the events that show it". The jump's run
    has 8 reasoning calls: the 5 heaviest are named by seq (ties: lower seq
    first), with the count of calls."""
    runs = steady_runs(7, seed=13)
    tokens = [900, 2000, 100, 2000, 1500, 50, 3000, 700]
    runs[6].steps = [s for s in runs[6].steps if s.component != "reasoning"] + [
        Step("reasoning", t, "ok", 10.0) for t in tokens
    ]
    write_runs(log_path, runs)
    want = reference_jumps(runs)
    assert [(j["session"], j["component"], j["calls"]) for j in want] == [("s06", "reasoning", 8)]
    # Known answer: the run's seqs are 0 (start), planning 1-3, memory 4-6, reasoning 7-14.
    assert want[0]["seqs"] == [13, 8, 10, 11, 7]
    doc = report(sigil_home, "session")
    assert doc["anomalies"]["token_jumps"] == [
        {**j, "tokens_per_call": pytest.approx(j["tokens_per_call"])} for j in want
    ]
    shown = run_cli(sigil_home, "report", "session", TZ="UTC").stdout
    assert (
        "its heaviest calls: seq 13 (3,000 tokens), 8 (2,000 tokens), 10 (2,000 tokens),"
        " 11 (1,500 tokens), 7 (900 tokens)"
    ) in " ".join(shown.split())


def test_a_run_out_of_budget_is_shown_with_the_event_that_ended_it(
    sigil_home: Path, log_path: Path
) -> None:
    """Issue 13's "budget exhaustion", in report and diff, with its event: the
    seq of the final event that said ``budget_exceeded`` (budget 10**6 here)."""
    steps = [Step("reasoning", 600_000, "ok", 10.0), Step("reasoning", 500_000, "ok", 10.0)]
    write_runs(
        log_path,
        [
            Run("b1", 1, day("2026-11-01T09:00:00+00:00"), steps[:1]),
            Run("b1", 2, day("2026-11-01T10:00:00+00:00"), steps, status="budget_exceeded"),
        ],
    )
    # Run 1: seq 0-2 (start, a step, the end); run 2: start 3, steps 4-5, the end 6.
    want = {"run": 2, "tokens": 1_100_000, "budget": 10**6, "seqs": [6]}
    doc = report(sigil_home, "session")
    assert doc["anomalies"]["budget_exhausted"] == [{"session": "b1", **want}]
    shown = run_cli(sigil_home, "report", "session", TZ="UTC").stdout
    assert "budget exhausted: session b1 run 2: 1,100,000 of 1,000,000 tokens (seq 6)" in shown
    proc = run_cli(sigil_home, "diff", "b1@1", "b1@2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["budget_exhausted"] == {"a": [], "b": [want]}
    shown = run_cli(sigil_home, "diff", "b1@1", "b1@2").stdout
    assert "budget exhausted in B run 2: 1,100,000 of 1,000,000 tokens (seq 6)" in shown
