"""SessionState: what the monitor shows, read from the native session model
(spec 4.3.2, ARCHITECTURE.md contracts 2, 6, 11 and 12).

States are built as the monitor builds them: events written as JSON lines into
one native ``Fold`` (``tests/model_state.py``), whose snapshots the state reads.
The fold's own rules are tested in ``test_session_model.py``; these tests check
that the state shows them, keeps its display-only parts, and adds nothing up.
"""

from __future__ import annotations

import ast
import inspect
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import sigil.interfaces.cli.display as display_module
import sigil.interfaces.cli.monitor as monitor_module
from model_state import Fed, state_of
from sigil.interfaces.cli.monitor import SessionState
from sigil.telemetry.execution_logger import LogEntry
from sigil.telemetry.log_parser import SessionModel

T0 = datetime(2026, 1, 11, 10, 15, 32, tzinfo=UTC)
_seq = itertools.count()


def ev(
    event_type: str,
    component: str = "orchestrator",
    tokens: int = 0,
    *,
    at: float = 0.0,
    **metadata: Any,
) -> LogEntry:
    return LogEntry(
        timestamp=(T0 + timedelta(seconds=at)).isoformat(),
        session_id="s1",
        event_type=event_type,
        component=component,
        message=f"{event_type} {component}",
        tokens=tokens,
        metadata=metadata,
        seq=next(_seq),
    )


def test_the_numbers_are_the_snapshots() -> None:
    state = state_of(
        ev("session_start", budget=1000, allocations={"routing": 100}, run=1),
        ev("token_consumption", "routing", 30),
        ev("step_complete", "routing", 20, latency_ms=1100),
        ev("step_error", "memory", 5, latency_ms=300, error="boom", category="transient"),
        ev("session_complete", status="complete"),
    )
    snap = state.snap
    assert (state.tokens_used, state.status, state.runs) == (snap.tokens, "complete", 1)
    assert state.tokens_used == 55 and state.tokens_remaining == 945
    assert state.budget_percentage == pytest.approx(5.5)
    assert state.allocations == {"routing": 100}
    routing, memory = state.components["routing"], state.components["memory"]
    assert (routing.tokens, routing.operations, routing.average_latency_ms) == (50, 1, 1100.0)
    # The model's rule: a failed step is an error, not an operation, and its latency
    # is kept apart.
    assert (memory.operations, memory.errors, memory.average_latency_ms) == (0, 1, None)
    assert state.slowest_component == "routing"
    assert [name for name, _ in state.last_errors()] == ["memory"]
    assert state.last_errors()[0][1].category == "transient"


def test_no_totals_arithmetic_in_the_views() -> None:
    """Contract 12: the monitor and its views add nothing up (no ``x += ...`` and no
    ``sum(...)`` over events or components); only the native fold counts."""
    for module in (monitor_module, display_module):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add)), (
                f"{module.__name__}:{node.lineno} adds in place"
            )
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "sum":
                raise AssertionError(f"{module.__name__}:{node.lineno} sums")
    assert not hasattr(SessionState, "update_from_entry")


def test_a_new_run_keeps_the_session_totals() -> None:
    state = state_of(
        ev("session_start", budget=1000, run=1, at=0),
        ev("step_complete", "routing", 100, at=1, latency_ms=10),
        ev("session_error", status="error", at=2, reason="routing broke"),
        ev("session_start", budget=1000, run=2, at=10),
        ev("step_complete", "routing", 30, at=11, latency_ms=10),
    )
    assert (state.status, state.runs, state.run.number) == ("running", 2, 2)
    assert state.run.tokens == 30 and state.tokens_used == 130
    assert state.reason is None  # the running run has not failed
    assert state.start_time == T0 + timedelta(seconds=10)
    ended = state.last_ended_run
    assert ended is not None and (ended.number, ended.status) == (1, "error")


def test_default_budget_until_a_start_says_otherwise() -> None:
    fed = Fed("s1", default_budget=1234)
    assert fed.state.total_budget == 1234 and not fed.state.budget_declared
    fed.feed(ev("session_start", budget=500))
    assert fed.state.total_budget == 500 and fed.state.budget_declared


def test_thresholds_and_task_come_from_the_runs_start() -> None:
    state = state_of(ev("session_start", task="t1", thresholds={"warning": 0.3, "x": "bad"}))
    assert state.thresholds == {"warning": 0.3} and state.task == "t1"


def test_rates_forecast_and_stall() -> None:
    fed = Fed("s1")
    fed.feed(
        ev("session_start", budget=10_000, at=0),
        *(ev("step_complete", "reasoning", 100, at=i, latency_ms=1) for i in range(1, 11)),
    )
    state = fed.state
    at_last = T0 + timedelta(seconds=10)
    assert state.recent_rate(at_last) == pytest.approx(100.0)
    assert state.average_rate == pytest.approx(100.0)
    assert state.stalled_seconds(at_last) is None
    assert state.seconds_to_budget_end(at_last) == pytest.approx(90.0)
    # 20 s without an event: stalled, the recent rate decays, the forecast follows it.
    later = at_last + timedelta(seconds=20)
    assert state.stalled_seconds(later) == pytest.approx(20.0)
    assert state.recent_rate(later) == pytest.approx(1000 / 30)
    assert state.average_rate == pytest.approx(100.0)
    assert state.seconds_to_budget_end(later) == pytest.approx(9000 / (1000 / 30))
    assert state.elapsed_at(later) == pytest.approx(30.0)
    # The writer is gone: no stall, no forecast, the clock stops at the last event.
    state.incomplete = True
    assert state.display_status == "incomplete"
    assert state.stalled_seconds(later) is None and state.seconds_to_budget_end(later) is None
    assert state.elapsed_at(later + timedelta(days=1)) == pytest.approx(10.0)
    # A finished run: the rate of its events, its clock stopped at its final event.
    fed.feed(ev("session_complete", at=10.5))
    assert state.recent_rate(later) == pytest.approx(1000 / 10.5)
    assert state.elapsed_at(later) == pytest.approx(10.5)


def test_a_short_finished_run_has_a_rate() -> None:
    state = state_of(
        ev("session_start", at=0),
        ev("step_complete", "routing", 2704, at=0.137, latency_ms=1),
        ev("session_complete", at=0.137),
    )
    assert state.recent_rate() == pytest.approx(2704 / 0.137)


def test_update_returns_the_new_events_and_keeps_warnings() -> None:
    fed = Fed("s1", last_n=10)
    assert [e.event_type for e in fed.feed(ev("session_start"), ev("budget_warning"))] == [
        "session_start",
        "budget_warning",
    ]
    new = fed.feed(*(ev("step_complete", "routing", 1) for _ in range(50)))
    # A burst larger than the model keeps is counted, and its last events listed.
    assert len(new) == 10 and fed.state.entries == 52 and fed.state.tokens_used == 50
    assert fed.state.unlisted == 40
    assert len(fed.state.events) == 10
    assert any("budget_warning" in w for w in fed.state.warnings)


def test_malformed_lines_come_from_the_model() -> None:
    state = state_of(ev("session_start"), b"{nope", b"")
    assert state.malformed == 2
    assert state.malformed_samples[0][0] > 0


def test_a_torn_tail_shows_once_no_writer_will_finish_it(tmp_path: Path) -> None:
    session = tmp_path / "sessions" / "s1"
    session.mkdir(parents=True)
    (session / "execution.jsonl").write_bytes(ev("session_start").to_bytes() + b'\n{"torn')
    model = SessionModel("s1", tmp_path)
    state = SessionState("s1", snapshot=model.update())
    assert state.snap.torn_tail and not state.torn_tail  # a writer may be mid-line
    state.incomplete = True
    assert state.torn_tail


def test_reader_stats_bring_rotations_truncations_and_rereads() -> None:
    state = SessionState("s1")
    state.rotated_segments = 2
    state.note_reader_stats({"rotations": 1, "truncations": 0, "rereads": 0}, at_catch_up=True)
    assert state.rotations == 2
    state.note_reader_stats({"rotations": 2, "truncations": 1, "rereads": 4})
    assert (state.rotations, state.truncations, state.rereads) == (3, 1, 4)
