"""The whole history of a session is one native snapshot (issue 10, contract 12):
the model of what the log still holds joined, natively, with the runs only the
ledger (``tokens.json``) still knows once a rotator renamed or deleted their
events. It equals the plain-Python reference (``tests/session_reference.py``)
on generated sessions, and a run's end continues the fold of the log at rest
with the run's own events instead of folding the log again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_reference import history_view, join_reference
from sigil.interfaces.cli.orchestrator import read_session_history, write_summaries
from sigil.telemetry.log_parser import HistoryModel, session_history
from sigil.telemetry.tokens import TokenTracker

COMPONENTS = ("routing", "planning", "reasoning", "validation")
START = datetime(2026, 3, 1, tzinfo=UTC)


def _line(seq: int, event_type: str, component: str, tokens: int, **meta: Any) -> bytes:
    return orjson.dumps(
        {
            "timestamp": (START + timedelta(milliseconds=250 * seq)).isoformat(),
            "session_id": "h",
            "event_type": event_type,
            "component": component,
            "message": event_type,
            "tokens": tokens,
            "metadata": meta,
            "seq": seq,
        }
    )


# A run: its steps (component, tokens, outcome) and how it ended.
step = st.tuples(
    st.sampled_from(COMPONENTS),
    st.integers(0, 500),
    st.sampled_from(["ok", "ok", "consumed", "error", "retry"]),
)
run = st.tuples(
    st.lists(step, max_size=6), st.sampled_from(["complete", "error", "interrupted", None])
)


def _session(runs: Sequence[tuple[list[tuple[str, int, str]], str | None]]) -> list[bytes]:
    """The log lines of ``runs``, numbered 1.., seq from 0, no hole."""
    lines: list[bytes] = []

    def add(event_type: str, component: str, tokens: int = 0, **meta: Any) -> None:
        lines.append(_line(len(lines), event_type, component, tokens, **meta))

    for number, (steps, end) in enumerate(runs, 1):
        add("session_start", "orchestrator", run=number, budget=100_000, task=f"t{number}")
        for component, tokens, outcome in steps:
            add("step_start", component)
            if outcome == "ok":
                # Priced (issue 12, Cost): the fold and the ledger carry the cost.
                add("step_complete", component, tokens, latency_ms=float(tokens % 97),
                    model="m", cost_usd=tokens / 1e6)  # fmt: skip
            elif outcome == "consumed":
                # A model without a price: unpriced tokens.
                add("token_consumption", component, tokens, outcome="failed_attempt", model="u")
                add("step_error", component, error="boom", category="transient")
            elif outcome == "retry":
                add("token_consumption", component, tokens)
                add("retry_attempt", component, attempt=1)
                add("step_complete", component, 1, latency_ms=3.0)
            else:
                add("step_error", component, latency_ms=2.0, error="bad")
        if end is not None:
            kind = "session_complete" if end == "complete" else "session_error"
            add(kind, "orchestrator", status=end, run=number)
    return lines


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _ledger(session: Path) -> None:
    """tokens.json as the orchestrator writes it at the end of a run."""
    history = read_session_history(session)
    if not history.runs:
        return
    tracker = TokenTracker(total_budget=100_000)
    comp_tokens, comp_ops = history.component_totals()
    tracker.restore(history.tokens_used, comp_tokens, comp_ops)
    write_summaries(session, session.name, history, tracker, writer_stats={})


def _log_bytes(session: Path) -> bytes:
    from sigil.core.paths import rotated_segments

    return b"".join(
        p.read_bytes() for p in [*rotated_segments(session), session / "execution.jsonl"]
    )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    runs=st.lists(run, min_size=1, max_size=5),
    ledger_at=st.floats(0, 1),
    cut_at=st.floats(0, 1),
    split_at=st.floats(0, 1),
    holes=st.sets(st.integers(0, 60), max_size=3),
)
def test_the_joined_history_equals_the_reference(
    tmp_path_factory: pytest.TempPathFactory,
    runs: list[Any],
    ledger_at: float,
    cut_at: float,
    split_at: float,
    holes: set[int],
) -> None:
    session = tmp_path_factory.mktemp("logs") / "sessions" / "h"
    session.mkdir(parents=True)
    lines = _session(runs)
    kept = [line for i, line in enumerate(lines) if i not in holes or i == 0]
    # The ledger is written when the log held its first part ...
    written = kept[: max(1, round(ledger_at * len(kept)))]
    _write(session / "execution.jsonl", written)
    _ledger(session)
    ledger = None
    if (session / "tokens.json").exists():
        ledger = json.loads((session / "tokens.json").read_text())
    # ... then the log grew, and a rotator took its oldest events away (deleted
    # a renamed segment); what is left is a numbered segment and the live file.
    rest = kept[round(cut_at * len(kept)) :]
    split = round(split_at * len(rest))
    if split:
        _write(session / "execution.jsonl.1", rest[:split])
    _write(session / "execution.jsonl", rest[split:])

    native = session_history(session)
    assert native.snapshot is not None  # the log changed: it was folded
    assert history_view(native) == join_reference(_log_bytes(session), ledger)


def test_runs_only_the_ledger_knows_keep_their_totals(tmp_path: Path) -> None:
    session = tmp_path / "sessions" / "h"
    session.mkdir(parents=True)
    lines = _session(
        [([("planning", 40, "ok"), ("reasoning", 7, "consumed")], "complete")] * 2
        + [([("reasoning", 5, "ok")], "complete")]
    )
    first_two = next(i for i, line in enumerate(lines) if b'"run":3' in line)
    _write(session / "execution.jsonl", lines[:first_two])
    _ledger(session)
    ledger = json.loads((session / "tokens.json").read_text())
    # logrotate's rename, then the renamed segment deleted: runs 1-2 leave the log.
    os.rename(session / "execution.jsonl", session / "execution.jsonl.1")
    (session / "execution.jsonl.1").unlink()
    _write(session / "execution.jsonl", lines[first_two:])

    history = session_history(session)
    assert [(r.number, r.source) for r in history.runs] == [
        (1, "ledger"),
        (2, "ledger"),
        (3, "log"),
    ]
    assert history.tokens == 2 * 47 + 5 == ledger["total_used"] + 5
    assert history.component_tokens() == {"orchestrator": 0, "planning": 80, "reasoning": 19}
    assert history.component_operations()["planning"] == 2
    assert (history.last_seq, history.ledger_seq, history.missing_events) == (
        len(lines) - 1,
        first_two - 1,
        0,
    )
    assert [(r.first_seq, r.last_seq) for r in history.runs] == [
        (0, first_two // 2 - 1),
        (first_two // 2, first_two - 1),
        (first_two, len(lines) - 1),
    ]
    assert history_view(history) == join_reference(_log_bytes(session), ledger)
    # The orchestrator's history reads the same snapshot's fields, adding nothing.
    orchestrated = read_session_history(session)
    assert orchestrated.tokens_used == history.tokens
    assert [r.run for r in orchestrated.ledger_only] == [1, 2]


def test_a_current_ledger_is_the_history_without_a_fold(tmp_path: Path) -> None:
    session = tmp_path / "sessions" / "h"
    session.mkdir(parents=True)
    _write(session / "execution.jsonl", _session([([("planning", 9, "ok")], "complete")]))
    _ledger(session)
    ledger = json.loads((session / "tokens.json").read_text())
    history = session_history(session)
    assert history.snapshot is None  # the ledger alone
    assert (history.tokens, history.events, history.last_seq) == (
        ledger["total_used"],
        ledger["events"],
        ledger["last_seq"],
    )
    assert [(r.number, r.status, r.source) for r in history.runs] == [(1, "complete", "ledger")]


def test_a_bad_ledger_is_a_problem_in_words_and_the_log_alone_counts(tmp_path: Path) -> None:
    session = tmp_path / "sessions" / "h"
    session.mkdir(parents=True)
    _write(session / "execution.jsonl", _session([([("planning", 9, "ok")], "complete")]))
    path = session / "tokens.json"
    cases = {
        b"{": "is not JSON",
        b'{"ledger_version": 0}': "is not a ledger (no ledger_version 1)",
        b'{"ledger_version": 1}': "last_seq or runs missing",
        b'{"ledger_version": 1, "last_seq": 3, "runs": [{"run": 1, "tokens_used": 5}]}': (
            "run 1: components do not add up to tokens_used"
        ),
    }
    for text, problem in cases.items():
        path.write_bytes(text)
        history = session_history(session)
        assert history.ledger_problem is not None and problem in history.ledger_problem
        assert str(path) in history.ledger_problem
        assert history.ledger_seq is None and history.tokens == 9


@pytest.mark.parametrize("current_ledger", [False, True])
def test_a_run_end_continues_the_fold_at_rest(tmp_path: Path, current_ledger: bool) -> None:
    """What the end of a run computes from the fold at rest plus the run's own
    events equals a fresh read of the whole history."""
    session = tmp_path / "sessions" / "h"
    session.mkdir(parents=True)
    runs = [([("planning", 11, "ok"), ("reasoning", 30, "retry")], "complete")] * 3
    lines = _session([*runs, ([("reasoning", 4, "ok")], "complete")])
    boundary = next(i for i, line in enumerate(lines) if b'"run":4' in line)
    _write(session / "execution.jsonl", lines[:boundary])
    if current_ledger:
        _ledger(session)  # the ledger spares the fold at the start
    model = HistoryModel(session, last_n=16)
    at_start = model.read()
    assert (at_start.snapshot is None) == current_ledger
    model.fold_at_rest()  # the orchestrator does this beside the run's steps
    with (session / "execution.jsonl").open("ab") as f:  # the run appends
        f.write(b"".join(line + b"\n" for line in lines[boundary:]))
    at_end = model.at_run_end()
    assert at_end is not None
    fresh = session_history(session)
    assert history_view(at_end) == history_view(fresh)
    assert at_end.runs[-1].number == 4 and at_end.tokens == 3 * 42 + 4
    assert at_end.snapshot is not None and fresh.snapshot is not None
    assert at_end.snapshot.to_dict() == fresh.snapshot.to_dict() | {
        "malformed_lines": at_end.snapshot.to_dict()["malformed_lines"]
    }


def test_a_run_end_after_an_external_rename_reads_the_log_anew(tmp_path: Path) -> None:
    session = tmp_path / "sessions" / "h"
    session.mkdir(parents=True)
    lines = _session([([("planning", 11, "ok")], "complete")] * 2)
    _write(session / "execution.jsonl", lines[:4])
    model = HistoryModel(session)
    model.read()
    os.rename(session / "execution.jsonl", session / "execution.jsonl.1")
    _write(session / "execution.jsonl", lines[4:])
    assert model.at_run_end() is None  # the caller reads the history anew


def test_a_run_end_continues_the_fold_when_a_segment_is_compressed(tmp_path: Path) -> None:
    import gzip

    session = tmp_path / "sessions" / "h"
    session.mkdir(parents=True)
    lines = _session([([("planning", 11, "ok")], "complete")] * 3)
    third = next(i for i, line in enumerate(lines) if b'"run":3' in line)
    (session / "execution.jsonl.1.gz").write_bytes(
        gzip.compress(b"".join(line + b"\n" for line in lines[:4]))
    )
    _write(session / "execution.jsonl", lines[4:third])
    model = HistoryModel(session)
    model.read()
    with (session / "execution.jsonl").open("ab") as f:
        f.write(b"".join(line + b"\n" for line in lines[third:]))
    at_end = model.at_run_end()
    assert at_end is not None
    assert history_view(at_end) == history_view(session_history(session))
    assert [r.number for r in at_end.runs] == [1, 2, 3] and at_end.tokens == 33


def test_the_orchestrators_run_end_does_not_fold_the_log_again(
    sigil_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs in process: each run's end continues the fold its start made
    (or, the ledger being current, made beside its steps): the history is read
    from the log once per run, at its start."""
    import asyncio

    from sigil.interfaces.cli import orchestrator as module

    reads: list[Path] = []
    ends: list[bool] = []
    real_read = module.read_session_history
    real_end = HistoryModel.at_run_end

    def read(session_dir: Path, **kw: Any) -> Any:
        reads.append(session_dir)
        return real_read(session_dir, **kw)

    def end(self: HistoryModel) -> Any:
        history = real_end(self)
        ends.append(history is not None)
        return history

    monkeypatch.setattr(module, "read_session_history", read)
    monkeypatch.setattr(HistoryModel, "at_run_end", end)
    results = [asyncio.run(module.Orchestrator("twice").execute("Analyze lead")) for _ in range(2)]
    assert [r.status for r in results] == ["complete", "complete"]
    # Each run's end continues that fold with the live file once, with the
    # final event (the summaries); the final event's numbers are the model's
    # too, continued with the events the run kept. Never a refold.
    assert len(reads) == 2 and ends == [True] * 2
    session = sigil_home / "logs" / "sessions" / "twice"
    tokens = json.loads((session / "tokens.json").read_text())
    fresh = session_history(session, use_ledger=False)
    assert tokens["total_used"] == fresh.tokens == results[1].total_tokens
    assert [(r["run"], r["tokens_used"]) for r in tokens["runs"]] == [
        (r.number, r.tokens) for r in fresh.runs
    ]


@pytest.mark.parametrize("live", [False, True])
def test_sessions_lists_the_runs_only_the_ledger_knows_during_a_new_run(
    tmp_path: Path, live: bool
) -> None:
    """An external rotator deleted runs 1-2's events; run 3 is being written (or
    its writer died): ``sigil sessions`` still counts runs 1-2 from the ledger,
    as the history does, not only what the log holds."""
    from sigil.core.locks import SessionLock
    from sigil.interfaces.cli.commands.sessions import list_sessions

    session = tmp_path / "sessions" / "h"
    session.mkdir(parents=True)
    lines = _session(
        [([("planning", 40, "ok")], "complete")] * 2 + [([("reasoning", 5, "ok")], None)]
    )
    first_two = next(i for i, line in enumerate(lines) if b'"run":3' in line)
    _write(session / "execution.jsonl", lines[:first_two])
    _ledger(session)
    os.rename(session / "execution.jsonl", session / "execution.jsonl.1")
    (session / "execution.jsonl.1").unlink()
    _write(session / "execution.jsonl", lines[first_two:])

    lock = SessionLock(session).acquire() if live else None
    try:
        (row,) = list_sessions(tmp_path)
    finally:
        if lock is not None:
            lock.release()
    history = session_history(session)
    assert row.tokens_used == history.tokens == 85
    assert row.runs == 3
    status = "running" if live else "incomplete"
    assert [(d["run"], d["status"], d["tokens_used"]) for d in row.run_details] == [
        (1, "complete", 40),
        (2, "complete", 40),
        (3, status, 5),
    ]
    assert row.status == status
    assert row.started_at == history.runs[0].started_at


def _rotated_away_then_run_three(tmp_path: Path, *, finished: bool) -> Path:
    """Runs 1-2 (40 tokens each) whose events an external rotator deleted, and
    run 3 (5 tokens) in the log, finished (ledger rewritten) or still open."""
    session = tmp_path / "logs" / "sessions" / "h"
    session.mkdir(parents=True)
    end = "complete" if finished else None
    lines = _session(
        [([("planning", 40, "ok")], "complete")] * 2 + [([("reasoning", 5, "ok")], end)]
    )
    first_two = next(i for i, line in enumerate(lines) if b'"run":3' in line)
    _write(session / "execution.jsonl", lines[:first_two])
    _ledger(session)
    os.rename(session / "execution.jsonl", session / "execution.jsonl.1")
    (session / "execution.jsonl.1").unlink()
    _write(session / "execution.jsonl", lines[first_two:])
    if finished:
        _ledger(session)
    return session


@pytest.mark.parametrize("finished", [True, False])
def test_the_monitor_counts_the_runs_only_the_ledger_knows(tmp_path: Path, finished: bool) -> None:
    """``sigil monitor`` shows the whole history (85 tokens over 3 runs), as
    ``tokens.json`` and ``sigil sessions`` do, not only the 5 tokens the log
    still holds; per component too."""
    import subprocess
    import sys

    from conftest import isolated_env

    session = _rotated_away_then_run_three(tmp_path, finished=finished)
    proc = subprocess.run(
        [sys.executable, "-m", "sigil", "monitor", "--session", "h", "--once", "--mode", "json"],
        env=isolated_env(tmp_path, SIGIL_LOG_PATH=str(tmp_path / "logs")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    frame = json.loads(proc.stdout.strip().splitlines()[-1])
    history = session_history(session)
    assert frame["tokens_used"] == history.tokens == 85
    assert frame["runs"] == 3
    assert {k: c["tokens"] for k, c in frame["components"].items()} == {
        "orchestrator": 0,
        "planning": 80,
        "reasoning": 5,
    }
    assert frame["components"]["planning"]["operations"] == 2
    assert frame["run"]["number"] == 3 and frame["run"]["tokens_used"] == 5
    if finished:
        assert json.loads((session / "tokens.json").read_text())["total_used"] == 85


def test_the_live_model_follows_a_ledger_written_meanwhile(tmp_path: Path) -> None:
    """The model a monitor follows picks up a ledger written after it started
    (a run's end) and keeps the runs it alone knows."""
    from sigil.telemetry.log_parser import SessionModel

    session = tmp_path / "logs" / "sessions" / "h"
    session.mkdir(parents=True)
    lines = _session([([("planning", 40, "ok")], "complete")] * 2)
    _write(session / "execution.jsonl", lines)
    model = SessionModel("h", tmp_path / "logs", last_n=0)
    assert (model.update().tokens, model.update().run_count) == (80, 2)
    _ledger(session)
    os.rename(session / "execution.jsonl", session / "execution.jsonl.1")
    (session / "execution.jsonl.1").unlink()
    fresh = SessionModel("h", tmp_path / "logs", last_n=0).update()
    assert (fresh.tokens, fresh.run_count, [r.source for r in fresh.runs]) == (
        80,
        2,
        ["ledger", "ledger"],
    )
    assert fresh.status == "complete"


def test_a_loop_of_a_run_only_the_ledger_knows_is_kept(tmp_path: Path) -> None:
    """One truth across views: run 1's loop (planning started 3 times with one
    input) is still the history's, the monitor's and ``sigil sessions``' once
    run 1's events left the log and only the ledger knows the run."""
    import subprocess
    import sys

    from conftest import isolated_env, run_cli

    session = tmp_path / "logs" / "sessions" / "h"
    session.mkdir(parents=True)
    digest = "ab" * 32
    run1 = [
        _line(0, "session_start", "orchestrator", 0, run=1, budget=100_000, task="t1"),
        *(_line(s, "step_start", "planning", 0, input_sha256=digest) for s in (1, 2, 3)),
        _line(4, "step_complete", "planning", 9, latency_ms=1.0),
        _line(5, "session_complete", "orchestrator", 0, status="complete", run=1),
    ]
    _write(session / "execution.jsonl", run1)
    _ledger(session)
    loop = {"run": 1, "component": "planning", "input_sha256": digest, "starts": 3,
            "seqs": [1, 2, 3]}  # fmt: skip
    assert json.loads((session / "tokens.json").read_text())["runs"][0]["loops"] == [loop]
    # Run 1 leaves the log (rotated, then deleted); run 2 runs.
    os.rename(session / "execution.jsonl", session / "execution.jsonl.1")
    (session / "execution.jsonl.1").unlink()
    _write(
        session / "execution.jsonl",
        [
            _line(6, "session_start", "orchestrator", 0, run=2, budget=100_000, task="t2"),
            _line(7, "step_complete", "planning", 5, latency_ms=1.0),
        ],
    )
    history = session_history(session)
    assert [(r.source, [lp.to_dict() for lp in r.loops]) for r in history.runs] == [
        ("ledger", [loop]),
        ("log", []),
    ]
    env = isolated_env(tmp_path, SIGIL_LOG_PATH=str(tmp_path / "logs"))
    proc = subprocess.run(
        [sys.executable, "-m", "sigil", "monitor", "--session", "h", "--once", "--mode", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["loops"] == [loop]
    proc = run_cli(tmp_path, "sessions", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [row["loops"] for row in json.loads(proc.stdout)] == [[loop]]
