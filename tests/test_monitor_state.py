"""SessionState: the monitor's pure fold (spec 4.3.2, ARCHITECTURE.md contracts 2, 6, 11).

Most tests fold hand-made events with no file at all. The last group checks the
one property that lets the monitor start late on a huge session: starting from
the native catch-up fold (``SessionState.from_summary``) gives exactly the state
that folding the same parsed events one by one gives.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil.interfaces.cli.monitor import SessionState
from sigil.telemetry.execution_logger import LogEntry
from sigil.telemetry.log_parser import MalformedLine, fold_session, parse_bytes, parse_lines

T0 = datetime(2026, 1, 11, 10, 15, 32, tzinfo=UTC)
_seq = itertools.count()
_AUTO = -1  # ev(): give the event the next seq


def ev(
    event_type: str,
    component: str = "orchestrator",
    tokens: int = 0,
    *,
    at: float = 0.0,
    seq: int | None = _AUTO,
    message: str | None = None,
    **metadata: Any,
) -> LogEntry:
    return LogEntry(
        timestamp=(T0 + timedelta(seconds=at)).isoformat(),
        session_id="s1",
        event_type=event_type,
        component=component,
        message=message or f"{event_type} {component}",
        tokens=tokens,
        metadata=metadata,
        seq=next(_seq) if seq == _AUTO else seq,
    )


def fold(*entries: LogEntry, **kwargs: Any) -> SessionState:
    state = SessionState(session_id="s1", **kwargs)
    state.update_from_entries(entries)
    return state


# -- tokens (contract 2) ----------------------------------------------------------------


def test_tokens_are_the_sum_over_events_never_counted_twice() -> None:
    # The spec's sample logs the same tokens on token_consumption and step_complete;
    # under contract 2 each event carries only its own, and the monitor just adds.
    state = fold(
        ev("session_start", budget=1000),
        ev("token_consumption", "routing", 30),
        ev("step_complete", "routing", 20, latency_ms=1100),
        ev("step_complete", "memory", 150, latency_ms=1200),
        ev("budget_warning", "orchestrator", 0, used=200),
        ev("session_complete", status="complete", total_tokens=200),
    )
    assert state.tokens_used == 200
    assert state.components["routing"].tokens_used == 50
    assert state.components["memory"].tokens_used == 150
    assert state.tokens_remaining == 800
    assert state.budget_percentage == pytest.approx(20.0)
    assert state.status == "complete"


def test_operations_latency_and_errors_come_from_step_events_only() -> None:
    state = fold(
        ev("session_start"),
        ev("step_start", "reasoning", latency_ms=999),
        ev("token_consumption", "reasoning", 10, latency_ms=999),
        ev("step_complete", "reasoning", 40, latency_ms=2100),
        ev("step_error", "reasoning", 0, latency_ms=100.5, error="timeout"),
    )
    comp = state.components["reasoning"]
    assert (comp.tokens_used, comp.operations, comp.errors) == (50, 2, 1)
    assert comp.total_latency_ms == pytest.approx(2200.5)
    assert comp.avg_latency_ms == pytest.approx(1100.25)
    assert state.slowest_component == "reasoning"


def test_slowest_component_is_by_total_latency() -> None:
    state = fold(
        ev("step_complete", "routing", latency_ms=1100),
        ev("step_complete", "planning", latency_ms=50),
        ev("step_complete", "planning", latency_ms=50),
        ev("token_consumption", "memory", 5),  # no operations: never "slowest"
    )
    assert state.slowest_component == "routing"
    assert fold().slowest_component is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1100, 1100.0), (12.5, 12.5), ("1100", 0.0), (True, 0.0), (None, 0.0),
     (float("nan"), 0.0), (float("inf"), 0.0)],
)
def test_latency_must_be_a_finite_number(value: Any, expected: float) -> None:
    state = fold(ev("step_complete", "routing", latency_ms=value))
    assert state.components["routing"].total_latency_ms == expected
    assert state.components["routing"].operations == 1


# -- status, budget and runs (spec 3.5, contract 11) ------------------------------------


def test_status_moves_from_waiting_to_running_to_final() -> None:
    state = SessionState(session_id="s1")
    assert state.status == "waiting"
    state.update_from_entry(ev("step_start", "routing"))
    assert state.status == "waiting"
    state.update_from_entry(ev("session_start", budget=5000))
    assert (state.status, state.total_budget, state.run.number) == ("running", 5000, 1)
    state.update_from_entry(ev("session_complete"))
    assert state.status == "complete" and state.ended


@pytest.mark.parametrize(
    ("event", "meta", "status"),
    [
        ("session_complete", {}, "complete"),
        ("session_error", {}, "error"),
        ("session_error", {"status": "budget_exceeded"}, "budget_exceeded"),
        ("session_error", {"status": "error"}, "error"),
        ("session_error", {"status": "weird"}, "error"),
        ("session_complete", {"status": "budget_exceeded"}, "budget_exceeded"),
    ],
)
def test_final_status(event: str, meta: dict[str, Any], status: str) -> None:
    state = fold(ev("session_start"), ev(event, **meta))
    assert state.status == status
    assert state.run.status == status
    assert state.run.ended_at is not None


def test_a_new_run_resets_run_totals_but_not_the_session_totals() -> None:
    state = fold(
        ev("session_start", budget=1000, run=1, at=0),
        ev("step_complete", "routing", 100, at=1, latency_ms=10),
        ev("session_error", status="error", at=2),
        ev("session_start", budget=1000, run=2, at=10),
        ev("step_complete", "routing", 30, at=11, latency_ms=10),
    )
    assert state.status == "running" and not state.ended
    assert state.runs == 2
    assert state.run.number == 2
    assert state.run.tokens_used == 30
    assert state.run.components["routing"].tokens_used == 30
    assert state.tokens_used == 130  # what earlier runs used stays used
    assert state.components["routing"].operations == 2
    assert state.tokens_remaining == 870
    assert state.start_time == T0 + timedelta(seconds=10)


def test_an_undeclared_run_number_follows_the_previous_run() -> None:
    state = fold(ev("session_start"), ev("session_complete"), ev("session_start"))
    assert state.run.number == 2
    state = fold(ev("session_start", run=5), ev("session_start"))
    assert (state.runs, state.run.number) == (2, 6)


def test_budget_and_allocations_follow_the_latest_start_and_ignore_bad_values() -> None:
    allocations = {"routing": 10, "memory": 20}
    state = fold(ev("session_start", budget=500, allocations=allocations))
    assert state.total_budget == 500 and state.budget_declared
    assert state.allocations == allocations
    # Not integers: ignored, as the native fold ignores them.
    state.update_from_entry(ev("session_start", budget=700.0, allocations={"routing": "x"}))
    state.update_from_entry(ev("session_start", budget=True, allocations=[1, 2]))
    state.update_from_entry(ev("session_start", budget=-5))
    assert state.total_budget == 500
    assert state.allocations == allocations


def test_default_budget_until_a_start_says_otherwise() -> None:
    state = SessionState(session_id="s1", total_budget=1234)
    assert state.total_budget == 1234 and not state.budget_declared
    assert fold(ev("session_start")).total_budget == 256_000


def test_elapsed_rate_and_forecast_use_the_run_clock() -> None:
    state = fold(
        ev("session_start", budget=10_000, at=0),
        ev("step_complete", "reasoning", 1000, at=4, latency_ms=1),
    )
    now = T0 + timedelta(seconds=10)
    assert state.elapsed_at(now) == pytest.approx(10.0)
    assert state.tokens_per_second(now) == pytest.approx(100.0)
    assert state.seconds_to_budget_end(now) == pytest.approx(90.0)
    state.update_from_entry(ev("session_complete", at=5))
    # A finished run's clock stops at its final event.
    assert state.elapsed_at(now + timedelta(hours=1)) == pytest.approx(5.0)
    assert state.seconds_to_budget_end(now) is None


def test_no_rate_or_forecast_from_noise_or_for_a_dead_writer() -> None:
    state = fold(
        ev("session_start", budget=10_000, at=0),
        ev("step_complete", "reasoning", 1000, at=0.001, latency_ms=1),
    )
    # A millisecond of run time gives no rate (it would read 1,000,000 tok/s).
    assert state.tokens_per_second(T0 + timedelta(seconds=0.5)) == 0.0
    later = T0 + timedelta(seconds=10)
    assert state.seconds_to_budget_end(later) == pytest.approx(90.0)
    state.incomplete = True  # the writer is gone: the budget will not run out
    assert state.seconds_to_budget_end(later) is None


def test_an_incomplete_run_stops_its_clock_at_the_last_event() -> None:
    state = fold(ev("session_start", at=0), ev("step_complete", "routing", 5, at=3))
    state.incomplete = True
    assert state.display_status == "incomplete"
    assert state.elapsed_at(T0 + timedelta(days=1)) == pytest.approx(3.0)


def test_offset_less_timestamps_are_read_as_local_time() -> None:
    entry = ev("session_start")
    entry.timestamp = "2026-01-11T10:15:32.123456"  # the spec's own format
    state = fold(entry)
    start = state.start_time
    assert start is not None and start.tzinfo is not None
    assert start.replace(tzinfo=None) == datetime(2026, 1, 11, 10, 15, 32, 123456)


# -- what could not be read (contract 6) ------------------------------------------------


def test_seq_gaps_and_regressions_are_counted() -> None:
    state = fold(ev("step_start", seq=0), ev("step_start", seq=1), ev("step_start", seq=5),
                 ev("step_start", seq=3), ev("step_start", seq=None))
    assert (state.seq_gaps, state.seq_missing, state.seq_regressions) == (1, 3, 1)
    assert (state.max_seq, state.last_seq) == (5, 3)


def test_events_re_read_after_a_truncation_are_counted_once() -> None:
    state = fold(*(ev("step_complete", "routing", 10, seq=i) for i in range(4)))
    state.note_reader_stats({"truncations": 1})  # the tailer starts the file again
    state.update_from_entries(
        [ev("step_complete", "routing", 10, seq=i) for i in (0, 1, 2, 3, 4)]
    )
    assert (state.tokens_used, state.entries, state.rereads) == (50, 5, 4)
    assert state.seq_regressions == 0 and state.seq_gaps == 0
    # Out of order without a truncation is not a re-read: it counts.
    other = fold(ev("x", "c", 5, seq=5), ev("x", "c", 5, seq=3))
    assert (other.tokens_used, other.seq_regressions, other.rereads) == (10, 1, 0)


def test_malformed_and_oversize_lines_are_counted_apart() -> None:
    state = SessionState(session_id="s1")
    state.note_malformed([
        MalformedLine(10, "expected value"),
        MalformedLine(99, "line of 2000000 bytes exceeds the line limit"),
        MalformedLine(120, "empty line"),
    ])
    assert (state.malformed, state.oversize_lines) == (2, 1)
    assert state.malformed_samples[0] == (10, "expected value")


def test_reader_stats_bring_rotations_and_truncations() -> None:
    state = SessionState(session_id="s1")
    state.note_reader_stats({"rotations": 2, "truncations": 1, "torn_lines": 0})
    assert (state.rotations, state.truncations, state.torn_tail) == (2, 1, False)
    state.note_reader_stats({"rotations": 3, "truncations": 1, "torn_lines": 1})
    assert (state.rotations, state.torn_tail) == (3, True)


def test_events_dropped_by_the_writer_are_counted() -> None:
    state = fold(ev("events_dropped", dropped=7), ev("events_dropped", dropped="x"))
    assert state.dropped_events == 7
    assert any("events_dropped" in w for w in state.warnings)


def test_recent_events_are_bounded() -> None:
    state = fold(*(ev("step_complete", "routing", 1) for _ in range(50)), max_events=10)
    assert len(state.events) == 10
    assert state.entries == 50 and state.tokens_used == 50


def test_names_are_bounded_like_the_native_fold() -> None:
    state = fold(*(ev("step_complete", f"c{i}", 1) for i in range(300)))
    assert len(state.components) == 257
    assert state.components["(other)"].tokens_used == 44
    assert state.tokens_used == 300


def test_update_does_no_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fold must work with no files around and no clock: run it from an empty cwd.
    monkeypatch.chdir(tmp_path)
    fold(ev("session_start"), ev("step_complete", "routing", 5), ev("session_complete"))
    assert list(tmp_path.iterdir()) == []


# -- from_summary(native fold) == folding the parsed entries one by one -----------------


def _line(kind: str, component: str, tokens: int, seq: int | None, at: int,
          meta: dict[str, Any] | None) -> bytes:
    obj: dict[str, Any] = {
        "timestamp": (T0 + timedelta(seconds=at)).isoformat(),
        "session_id": "s1",
        "event_type": kind,
        "component": component,
        "message": f"{kind} {component} {at}",
        "tokens": tokens,
    }
    if meta is not None:
        obj["metadata"] = meta
    if seq is not None:
        obj["seq"] = seq
    return orjson.dumps(obj)


_kinds = st.sampled_from([
    "session_start", "session_complete", "session_error", "step_start", "step_complete",
    "step_error", "token_consumption", "budget_warning", "events_dropped",
])
_components = st.sampled_from(["orchestrator", "routing", "memory", "reasoning", "x"])
_meta = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "latency_ms": st.one_of(st.integers(0, 10_000), st.floats(0, 1e4), st.text(max_size=2)),
            "budget": st.one_of(st.integers(0, 10**6), st.floats(0, 10), st.booleans()),
            "status": st.sampled_from(["complete", "error", "budget_exceeded", "other"]),
            "run": st.integers(1, 5),
            "allocations": st.dictionaries(st.sampled_from(["routing", "memory"]),
                                           st.integers(0, 100)),
            "dropped": st.integers(0, 10),
        },
    ),
)
_event = st.tuples(_kinds, _components, st.integers(0, 500), _meta)
_line_strategy = st.one_of(
    _event.map(lambda e: ("event", e)),
    st.sampled_from([b"not json", b"{}", b'{"tokens": -1}', b"[1,2]", b""]).map(
        lambda raw: ("bad", raw)
    ),
)


def _session_lines(items: list[tuple[str, Any]], seq_skip: int) -> list[bytes]:
    lines: list[bytes] = []
    seq = 0
    for at, (kind, item) in enumerate(items):
        if kind == "bad":
            lines.append(item)
            continue
        event_type, component, tokens, meta = item
        if seq_skip and at % seq_skip == 0:
            seq += 2  # a gap
        lines.append(_line(event_type, component, tokens, seq, at, meta))
        seq += 1
    return lines


def _write_session(log_path: Path, lines: list[bytes], splits: list[int]) -> None:
    """Write ``lines`` as rotated segments (cut at ``splits``) plus the live file."""
    session = log_path / "sessions" / "s1"
    session.mkdir(parents=True)
    cuts = sorted({min(max(0, s), len(lines)) for s in splits})
    bounds = [0, *cuts, len(lines)]
    parts = [lines[a:b] for a, b in itertools.pairwise(bounds)]
    for i, part in enumerate(parts[:-1]):
        name = f"execution_20260111_1015{i:02d}.jsonl"
        (session / name).write_bytes(b"".join(line + b"\n" for line in part))
    (session / "execution.jsonl").write_bytes(b"".join(line + b"\n" for line in parts[-1]))


def _fold_one_by_one(lines: list[bytes]) -> SessionState:
    parsed = parse_lines(lines)
    state = SessionState(session_id="s1")
    state.update_from_entries(parsed.entries)
    state.note_malformed(parsed.malformed)
    return state


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(_line_strategy, max_size=60),
    splits=st.lists(st.integers(0, 60), max_size=2),
    seq_skip=st.integers(0, 7),
)
def test_from_summary_equals_folding_one_by_one(
    items: list[tuple[str, Any]], splits: list[int], seq_skip: int
) -> None:
    lines = _session_lines(items, seq_skip)
    with tempfile.TemporaryDirectory() as tmp:
        _write_session(Path(tmp), lines, splits)
        summary = fold_session("s1", tmp)
    from_native = SessionState.from_summary(summary, session_id="s1")
    by_python = _fold_one_by_one(lines)
    assert from_native == by_python
    assert from_native.snapshot() == by_python.snapshot()
    # The recent events shown are the same events.
    assert [e.seq for e in from_native.events] == [e.seq for e in list(by_python.events)[-100:]]


def test_from_summary_of_a_realistic_session(tmp_path: Path) -> None:
    lines = [_line("session_start", "orchestrator", 0, 0, 0,
                   {"budget": 9000, "allocations": {"routing": 100}, "run": 1,
                    "thresholds": {"warning": 0.4}, "task": "t"})]
    for i in range(1, 2000):
        comp = ["routing", "memory", "planning", "reasoning"][i % 4]
        lines.append(_line("step_complete", comp, i % 7, i, i, {"latency_ms": i % 13}))
    lines.append(_line("session_complete", "orchestrator", 0, 2000, 2000,
                       {"status": "complete"}))
    _write_session(tmp_path, lines, [700, 1400])
    state = SessionState.from_summary(fold_session("s1", tmp_path), session_id="s1")
    assert state == _fold_one_by_one(lines)
    assert state.tokens_used == sum(i % 7 for i in range(1, 2000))
    assert state.status == "complete"
    # Display hints come from the recent events.
    assert state.components["reasoning"].last_message.startswith("step_complete reasoning")
    assert len(state.events) == 100
    # Segments rotated away before the catch-up count as rotations, then live ones add.
    assert state.rotations == 2
    state.note_reader_stats({"rotations": 1})
    assert state.rotations == 3


def test_from_summary_replays_the_start_when_it_is_recent(tmp_path: Path) -> None:
    # Thresholds and task are display hints the native fold does not keep; they are
    # taken from the recent events when the run's session_start is among them.
    lines = [
        _line("session_start", "orchestrator", 0, 0, 0,
              {"budget": 9000, "thresholds": {"warning": 0.4}, "task": "t"}),
        _line("budget_warning", "orchestrator", 0, 1, 1, None),
    ]
    _write_session(tmp_path, lines, [])
    state = SessionState.from_summary(fold_session("s1", tmp_path), session_id="s1")
    assert state.thresholds == {"warning": 0.4}
    assert state.task == "t"
    assert len(state.warnings) == 1


def test_from_summary_keeps_the_start_settings_of_a_long_run(tmp_path: Path) -> None:
    # The run's session_start is far older than the last events kept by the fold:
    # its thresholds and task still come through the summary.
    lines = [
        _line("session_start", "orchestrator", 0, 0, 0,
              {"budget": 9000, "thresholds": {"warning": 0.4}, "task": "long"}),
    ] + [_line("step_complete", "reasoning", 1, i, i, {"latency_ms": 1}) for i in range(1, 300)]
    _write_session(tmp_path, lines, [])
    summary = fold_session("s1", tmp_path, last_n=10)
    assert summary.run.start_metadata["task"] == "long"
    state = SessionState.from_summary(summary, session_id="s1")
    assert state.thresholds == {"warning": 0.4}
    assert state.task == "long"


def test_from_summary_of_a_missing_session(tmp_path: Path) -> None:
    state = SessionState.from_summary(fold_session("nope", tmp_path), session_id="nope",
                                      default_budget=42)
    assert state == SessionState(session_id="nope", total_budget=42)
    assert state.status == "waiting"


def test_from_summary_with_a_torn_tail(tmp_path: Path) -> None:
    lines = [_line("session_start", "orchestrator", 0, 0, 0, None),
             _line("step_complete", "routing", 5, 1, 1, None)]
    _write_session(tmp_path, lines, [1])
    live = tmp_path / "sessions" / "s1" / "execution.jsonl"
    with open(live, "ab") as f:
        f.write(b'{"timestamp": "2026-01-11T10:15:40+00:00", "sess')  # the writer died here
    summary = fold_session("s1", tmp_path)
    state = SessionState.from_summary(summary, session_id="s1")
    assert state.tokens_used == 5 and state.entries == 2


def test_parse_bytes_and_parse_lines_fold_alike() -> None:
    lines = [_line("step_complete", "routing", n, n, n, {"latency_ms": n}) for n in range(20)]
    a = SessionState(session_id="s1")
    a.update_from_entries(parse_bytes(b"".join(x + b"\n" for x in lines)).entries)
    b = _fold_one_by_one(lines)
    assert a == b


def test_entries_parsed_natively_and_log_entries_fold_alike() -> None:
    entries = [
        ev("session_start", budget=100, allocations={"routing": 50}, run=1),
        ev("step_complete", "routing", 10, latency_ms=3),
        ev("session_error", status="budget_exceeded"),
    ]
    native = parse_lines([e.to_bytes() for e in entries]).entries
    assert fold(*entries) == _fold_state(native)


def _fold_state(entries: Any) -> SessionState:
    state = SessionState(session_id="s1")
    state.update_from_entries(entries)
    return state


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX only")
def test_fold_speed_is_reasonable() -> None:
    # Not a benchmark (see benches/bench_monitor.py): a guard against an accidental
    # O(n^2) in the live path, which folds every new event in Python.
    import time

    entries = parse_lines(
        [_line("step_complete", "routing", 1, i, i, {"latency_ms": 1}) for i in range(20_000)]
    ).entries
    state = SessionState(session_id="s1")
    started = time.perf_counter()
    state.update_from_entries(entries)
    assert time.perf_counter() - started < 2.0
    assert state.tokens_used == 20_000
