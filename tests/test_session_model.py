"""The native session model (rust/fold.rs): its rules, its typed snapshots, and a
comparison with the plain-Python reference fold on random sessions.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_reference import fold_reference, in_flight_reference
from sigil._native import Fold, MalformedLine, SessionSnapshot
from sigil.telemetry import log_parser

T0 = datetime(2026, 1, 11, 10, 0, 0, tzinfo=UTC)


def line(
    event_type: str,
    component: str = "routing",
    tokens: int = 0,
    seq: int | None = 0,
    at: float = 0.0,
    message: str = "m",
    **metadata: Any,
) -> bytes:
    event: dict[str, Any] = {
        "timestamp": (T0 + timedelta(seconds=at)).isoformat(),
        "session_id": "s1",
        "event_type": event_type,
        "component": component,
        "message": message,
        "tokens": tokens,
        "metadata": metadata,
    }
    if seq is not None:
        event["seq"] = seq
    return orjson.dumps(event) + b"\n"


def snapshot_of(*lines: bytes) -> SessionSnapshot:
    fold = Fold(last_n=10)
    fold.feed_bytes(b"".join(lines))
    return fold.snapshot()


# -- issue 9 defect 4: no GIL held while waiting for the fold's lock ------------------


def _slow_block(target_seconds: float) -> tuple[bytes, float]:
    """Lines the general parser must handle (keys out of order, escapes), enough of
    them that one fold of the block takes at least ``target_seconds`` here."""
    one = (
        orjson.dumps(
            {
                "seq": 1,
                "metadata": {"latency_ms": 1.5, "model": "m", "input_tokens": 3},
                "tokens": 5,
                "message": "caf\\u00e9 " * 10,
                "component": "routing",
                "event_type": "step_complete",
                "session_id": "s",
                "timestamp": "2026-01-01T00:00:00+00:00",
            }
        )
        + b"\n"
    )
    count = 20_000
    while True:
        data = one * count
        fold = Fold(last_n=0)
        started = time.perf_counter()
        fold.feed_bytes(data)
        took = time.perf_counter() - started
        if took >= target_seconds:
            return data, took
        count = int(count * max(2.0, 1.2 * target_seconds / max(took, 1e-3)))


def test_snapshot_waits_for_a_feeding_thread_without_freezing_python() -> None:
    data, took = _slow_block(0.6)
    fold = Fold(last_n=0)
    feeding = threading.Event()

    def feed() -> None:
        feeding.set()
        fold.feed_bytes(data)

    def read() -> None:
        fold.summary()
        fold.snapshot()

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeding.wait()
    time.sleep(0.05)  # the feeder holds the fold's lock now
    reader = threading.Thread(target=read)
    gaps: list[float] = []
    last = time.perf_counter()
    reader.start()
    while True:
        alive = reader.is_alive()  # needs the GIL, as any Python code does
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        if not alive:
            break
        time.sleep(0.002)
    reader.join()
    feeder.join()
    # Before the fix the waiting reader held the GIL: this thread stood still
    # for the rest of the feed (about `took` seconds).
    assert max(gaps) < took / 3, (max(gaps), took)
    assert fold.snapshot().entries == data.count(b"\n")


# -- the rules -------------------------------------------------------------------------


def test_a_failed_step_counts_as_an_error_not_an_operation() -> None:
    """One rule for every view (issue 10 item 4): operations are successful steps,
    errors failed ones; latency, its average and percentiles cover successes."""
    snap = snapshot_of(
        line("session_start", "orchestrator", seq=0, run=1, budget=1000),
        line("step_start", "reasoning", seq=1),
        line("retry_attempt", "reasoning", seq=2, error="timeout", category="network", attempt=1),
        line(
            "step_error",
            "reasoning",
            seq=3,
            at=13,
            latency_ms=13004.9,
            error="boom",
            category="provider",
            attempt=2,
        ),
        line("session_error", "orchestrator", seq=4, at=13, status="error", error="step failed"),
    )
    reasoning = snap.components["reasoning"]
    assert (reasoning.operations, reasoning.errors, reasoning.retries) == (0, 1, 1)
    assert reasoning.average_latency_ms is None
    assert reasoning.p95_latency_ms is None
    assert reasoning.failed_latency_ms == 13004.9
    assert reasoning.last_error is not None
    assert reasoning.last_error.to_dict() == {
        "event_type": "step_error",
        "category": "provider",
        "message": "boom",
        "attempt": 2,
        "timestamp": (T0 + timedelta(seconds=13)).isoformat(),
    }
    assert (snap.status, snap.reason) == ("error", "step failed")
    assert (snap.run.steps_completed, snap.run.steps_failed) == (0, 1)


def test_runs_are_kept_with_status_reason_and_duration() -> None:
    snap = snapshot_of(
        line("session_start", "orchestrator", seq=0, run=1, budget=500, task="a"),
        line("step_complete", "routing", 10, seq=1, at=1, latency_ms=5),
        line("session_error", "orchestrator", seq=2, at=2, status="interrupted", reason="SIGINT"),
        line("session_start", "orchestrator", seq=3, at=10, budget=800),
        line("step_complete", "routing", 7, seq=4, at=11, latency_ms=7),
        line("session_complete", "orchestrator", seq=5, at=12.5, status="complete"),
    )
    assert snap.run_count == 2
    first, second = snap.runs
    assert (first.number, first.status, first.reason) == (1, "interrupted", "SIGINT")
    assert (first.tokens, first.budget, first.duration_seconds) == (10, 500, 2.0)
    assert first.start_metadata["task"] == "a"
    assert (second.number, second.status, second.reason) == (2, "complete", None)
    assert (second.tokens, second.budget, second.duration_seconds) == (7, 800, 2.5)
    assert snap.run.number == 2
    assert (snap.tokens, snap.status, snap.budget) == (17, "complete", 800)
    assert snap.duration_seconds == 12.5


def test_component_tokens_model_and_latency_percentiles() -> None:
    lines = [line("session_start", "orchestrator", seq=0)]
    for i in range(100):
        lines.append(
            line(
                "step_complete",
                "reasoning",
                10,
                seq=i + 1,
                at=i,
                latency_ms=float(i + 1),  # 1 .. 100 ms
                input_tokens=6,
                output_tokens=4,
                model="gpt-x" if i < 50 else "gpt-y",
            )
        )
    comp = snapshot_of(*lines).components["reasoning"]
    assert (comp.tokens, comp.input_tokens, comp.output_tokens) == (1000, 600, 400)
    assert comp.model == "gpt-y"
    assert (comp.operations, comp.timed_operations) == (100, 100)
    assert comp.average_latency_ms == 50.5
    # Bucket upper bounds (1, 2, 5, 10, 20, 50, 100 ms), never above the maximum.
    assert (comp.p50_latency_ms, comp.p95_latency_ms, comp.p99_latency_ms) == (50.0, 100.0, 100.0)
    assert comp.max_latency_ms == 100.0
    assert sum(comp.latency_histogram) == 100


def test_recent_rate_and_average_come_from_event_time() -> None:
    """A finished short session has a rate (issue 10 item 2); a stalled one decays."""
    short = snapshot_of(
        line("session_start", "orchestrator", seq=0),
        line("step_complete", "routing", 2704, seq=1, at=0.137),
        line("session_complete", "orchestrator", seq=2, at=0.137),
    )
    assert short.average_tokens_per_second == 2704 / 0.137
    assert short.recent_tokens_per_second() == 2704 / 0.137

    lines = [line("session_start", "orchestrator", seq=0)]
    for i in range(120):  # 10 tokens a second for two minutes
        lines.append(line("token_consumption", "reasoning", 10, seq=i + 1, at=i + 1))
    snap = snapshot_of(*lines)
    assert snap.tokens_in(60) == 600
    assert snap.recent_tokens_per_second(60) == 10.0
    # Stalled 30 s: only the last 30 s of events remain in the window.
    assert snap.tokens_in(60, idle=30) == 300
    assert snap.recent_tokens_per_second(60, idle=30) == 5.0
    assert snap.recent_tokens_per_second(60, idle=600) == 0.0
    assert snap.average_tokens_per_second == 1200 / 120


def test_seq_at_the_top_of_u64_is_counted_not_wrapped() -> None:
    top = 2**64 - 1
    snap = snapshot_of(
        line("token_consumption", seq=top - 2),
        line("token_consumption", seq=top),
        line("token_consumption", seq=top),
        line("token_consumption", seq=0),
    )
    assert (snap.seq_gaps, snap.seq_missing, snap.seq_regressions) == (1, 1, 2)
    assert (snap.max_seq, snap.last_seq) == (top, 0)


def test_malformed_lines_are_typed() -> None:
    good = line("token_consumption", tokens=3)
    fold = Fold(last_n=0)
    fold.feed_bytes(good + b"not json\n" + good + b'{"torn')
    snap = fold.snapshot()
    (bad,) = snap.malformed_lines
    assert isinstance(bad, MalformedLine)
    assert (bad.offset, bad.kind) == (len(good), "malformed")
    assert bad == MalformedLine(len(good), bad.reason, "malformed")
    assert (snap.malformed, snap.tokens, snap.torn_tail) == (1, 6, True)


def test_the_same_fold_is_fed_incrementally(tmp_path: Path) -> None:
    """The monitor's path: one SessionModel, fed as the log grows, snapshotted per frame."""
    session = tmp_path / "sessions" / "s1"
    session.mkdir(parents=True)
    log = session / "execution.jsonl"
    lines = [
        line("session_start", "orchestrator", seq=0, run=1),
        line("step_complete", "routing", 5, seq=1, at=1, latency_ms=3),
        line("step_complete", "memory", 7, seq=2, at=2, latency_ms=4),
        line("session_complete", "orchestrator", seq=3, at=3, status="complete"),
    ]
    log.write_bytes(lines[0])
    model = log_parser.SessionModel("s1", tmp_path, last_n=2)
    assert model.update().status == "running"
    with log.open("ab") as f:
        f.write(lines[1] + lines[2][:10])
    snap = model.update()
    assert (snap.tokens, snap.torn_tail) == (5, True)
    with log.open("ab") as f:
        f.write(lines[2][10:] + lines[3])
    snap = model.update()
    assert (snap.tokens, snap.status, snap.entries) == (12, "complete", 4)
    assert [e.seq for e in snap.last_entries] == [2, 3]
    whole = log_parser.snapshot_session("s1", tmp_path)
    assert whole.to_dict() == snap.to_dict()
    summary = log_parser.fold_session("s1", tmp_path)
    assert summary.snapshot is not None and summary.snapshot.to_dict() == snap.to_dict()


def test_a_step_started_before_a_burst_of_events_is_still_in_flight(tmp_path: Path) -> None:
    """Issue 12 ("Now running"): 500 token counts from another component after the
    step started, more than the fold keeps, do not hide the step in flight."""
    head = [
        line("session_start", "orchestrator", seq=0, run=1),
        line("step_start", "reasoning", seq=1, at=1.0, message="reasoning starts", attempt=2),
    ]
    burst = [line("token_consumption", "memory", 3, seq=2 + i, at=2.0) for i in range(500)]
    path = tmp_path / "burst.jsonl"
    path.write_bytes(b"".join(head + burst))
    for fold in (Fold(last_n=10), Fold(last_n=0)):
        fold.feed_file(path)
        step = fold.snapshot().in_flight
        assert step is not None, "the step in flight was lost behind the burst"
        assert (step.component, step.attempt, step.message) == ("reasoning", 2, "reasoning starts")
        assert step.started_at == (T0 + timedelta(seconds=1)).isoformat()
    # Its own step_complete closes it, however late.
    fold = Fold(last_n=10)
    fold.feed_bytes(b"".join([*head, *burst, line("step_complete", "reasoning", seq=502)]))
    assert fold.snapshot().in_flight is None


# -- the native model equals the plain-Python reference on random sessions -------------

_components = st.sampled_from(["routing", "memory", "reasoning", "orchestrator", "validation"])
_texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_meta_values: dict[str, st.SearchStrategy[Any]] = {
    "latency_ms": st.one_of(
        st.floats(-5, 1e6, allow_nan=False), st.integers(0, 10**6), st.just("slow"), st.just(True)
    ),
    "status": st.sampled_from(["complete", "error", "budget_exceeded", "interrupted", "weird", 3]),
    "reason": st.one_of(_texts, st.just(None), st.integers(0, 3)),
    "error": st.one_of(_texts, st.just("x" * 1500 + "é")),
    "category": st.one_of(_texts, st.just(7)),
    "attempt": st.one_of(st.integers(0, 5), st.just(-1), st.just("2")),
    "run": st.one_of(st.integers(0, 9), st.just(2**64 - 1), st.just("3")),
    "budget": st.one_of(st.integers(0, 10**6), st.just(-1)),
    "allocations": st.one_of(
        st.dictionaries(_components, st.integers(0, 1000), max_size=3),
        st.just({"a": -1}),
    ),
    "dropped": st.integers(0, 50),
    "model": st.one_of(st.sampled_from(["m1", "m2"]), st.just(5)),
    "input_tokens": st.integers(0, 500),
    "output_tokens": st.one_of(st.integers(0, 500), st.just(1.5)),
    "resume": st.one_of(st.booleans(), st.just("yes")),
    "usage": st.sampled_from(["unknown", "known", 3, None]),
    # Issue 14: the budget a call of unknown usage held, odd numbers and wrong types.
    "tokens_held": st.one_of(
        st.integers(0, 5000), st.sampled_from([2**64 - 1, -1, 1.5, "9", None, True])
    ),
    # Review 14, finding 2: the proxy's call numbers and what their starts reserved.
    "call": st.one_of(st.integers(0, 3), st.sampled_from([-1, "1", 1.5])),
    "prompt_tokens_reserved": st.one_of(st.integers(0, 500), st.sampled_from([-1, "9", 1.5])),
    "max_tokens": st.one_of(st.integers(0, 500), st.sampled_from([2**64 - 1, "9", None])),
    "input_sha256": st.sampled_from(["a1", "b2", 7]),
    "output_sha256": st.sampled_from(["o1", "o2", None]),
    # Issue 12 (Cost): a price's shortest text, odd numbers and wrong types.
    "cost_usd": st.one_of(
        st.decimals(0, 10**4, places=9).map(float),
        st.floats(0, 1e30, allow_nan=False),
        st.integers(0, 2**64 - 1),  # the largest integer a JSON writer (orjson) emits
        st.sampled_from([-1, -0.0, "0.5", True, None]),
    ),
}
_metadata = st.fixed_dictionaries({}, optional=_meta_values)
_event = st.tuples(
    st.sampled_from(
        [
            "session_start",
            "step_start",
            "step_complete",
            "step_complete",
            "step_error",
            "retry_attempt",
            "token_consumption",
            "session_complete",
            "session_error",
            "events_dropped",
            "budget_warning",
        ]
    ),
    st.one_of(_components, st.integers(0, 300).map(lambda i: f"c{i}")),
    st.integers(0, 10_000),
    _metadata,
    st.sampled_from([1, 1, 1, 0, 2, 5, -1, -3]),  # seq step: gaps and regressions
    st.one_of(st.floats(0, 3, allow_nan=False), st.sampled_from([70.0, -80.0])),  # time step
)
_item = st.one_of(
    _event.map(lambda e: ("event", e)),
    st.sampled_from([b"not json", b"{}", b'{"tokens": -1}', b"", b"[1]"]).map(
        lambda raw: ("bad", raw)
    ),
)


def _session_bytes(items: list[tuple[str, Any]]) -> list[bytes]:
    out: list[bytes] = []
    seq, at = 0, 0.0
    for kind, item in items:
        if kind == "bad":
            out.append(item + b"\n")
            continue
        event_type, component, tokens, meta, seq_step, time_step = item
        seq = max(0, seq + seq_step)
        at = max(0.0, at + time_step)
        out.append(line(event_type, component, tokens, seq, round(at, 6), **meta))
    return out


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    # Malformed reasons are the parser's words; the model's facts are offset and kind.
    return {**d, "malformed_lines": [tuple(m[:2]) for m in d["malformed_lines"]]}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(_item, max_size=80),
    cuts=st.lists(st.integers(0, 80), max_size=3),
    torn=st.booleans(),
)
def test_native_model_equals_the_reference(
    items: list[tuple[str, Any]], cuts: list[int], torn: bool
) -> None:
    lines = _session_bytes(items)
    data = b"".join(lines) + (b'{"torn' if torn else b"")
    expected = fold_reference(data)
    # Fed in pieces at line boundaries, as a tailer feeds a live log.
    fold = Fold(last_n=0)
    offset = 0
    bounds = sorted({min(c, len(lines)) for c in cuts} | {len(lines)})
    start = 0
    for end in bounds:
        chunk = b"".join(lines[start:end])
        fold.feed_bytes(chunk, offset)
        offset += len(chunk)
        start = end
    if torn:
        fold.feed_bytes(b'{"torn', offset)
    snap = fold.snapshot()
    got = snap.to_dict()
    assert _comparable(got) == _comparable(expected)
    # Review 14: with the writer gone, the last run's calls never ended are held too.
    gone = fold.snapshot(writer_gone=True).to_dict()
    assert _comparable(gone) == _comparable(fold_reference(data, writer_gone=True))
    # Issue 12: the step in flight over every event (this fold keeps none).
    flight = in_flight_reference(data)
    shown = snap.in_flight
    assert (shown and (shown.component, shown.started_at, shown.attempt, shown.message)) == (
        flight and (flight["component"], flight["started_at"], flight["attempt"], flight["message"])
    )


def test_split_folds_of_many_names_equal_the_reference(tmp_path: Path) -> None:
    """Over MAX_NAMES components in a file large enough to fold on several threads."""
    path = tmp_path / "names.jsonl"
    block = b"".join(
        line("step_complete", f"c{i}", 1, seq=None, at=0, latency_ms=1) for i in range(400)
    )
    data = block * (9 * 2**20 // len(block) + 1)
    path.write_bytes(data)
    fold = Fold(last_n=0)
    fold.feed_file(path)
    got = fold.snapshot()
    expected = fold_reference(data)
    assert got.to_dict()["components"] == expected["components"]
    assert got.components["(other)"].tokens == 144 * (data.count(b"\n") // 400)


def test_the_events_of_anomalies_merge_exactly_across_split_folds(tmp_path: Path) -> None:
    """Issue 13: each component's heaviest calls and first failed attempts,
    folded on several threads (a file over the parallel threshold), equal the
    reference's one pass, in every run and in the session."""
    import random

    rng = random.Random(5)
    path = tmp_path / "many.jsonl"
    lines = []
    for seq in range(95_000):
        if seq % 9_000 == 0:
            lines.append(line("session_start", "orchestrator", 0, seq, run=seq // 9_000 + 1))
            continue
        kind = rng.choice(["step_complete", "step_complete", "step_error", "retry_attempt"])
        component = rng.choice(["planning", "reasoning", "memory"])
        lines.append(line(kind, component, rng.randrange(0, 5_000), seq, attempt=1))
    data = b"".join(lines)
    assert len(data) > 8 << 20  # rust/fold.rs PARALLEL_MIN_BYTES: folded in parts
    path.write_bytes(data)
    fold = Fold(last_n=0)
    fold.feed_file(path)
    got = fold.snapshot().to_dict()
    expected = fold_reference(data)
    keys = ("heaviest_calls", "retry_seqs")
    for got_components, want_components in [
        (got["components"], expected["components"]),
        *(
            (g["components"], w["components"])
            for g, w in zip(got["runs"], expected["runs"], strict=True)
        ),
    ]:
        assert {n: {k: c[k] for k in keys} for n, c in got_components.items()} == {
            n: {k: c[k] for k in keys} for n, c in want_components.items()
        }
    assert len(got["runs"]) == len(expected["runs"]) == 11
    assert len(got["components"]["reasoning"]["heaviest_calls"]) == 5


def test_rate_series_reaches_thirty_minutes_back() -> None:
    """Issue 12's sparkline of the last minutes: the window holds 32 minutes of
    event time (it held 64 seconds)."""
    fold = Fold(last_n=0)
    fold.feed_bytes(
        line("step_complete", "routing", 100, seq=0, at=0)
        + line("step_complete", "routing", 5, seq=1, at=1200)
    )
    snap = fold.snapshot()
    series = snap.rate_series(30, 60.0)
    assert len(series) == 30 and series[9] == 100 and series[29] == 5
    assert sum(series) == 105
    assert snap.tokens_in(1800.0) == 105
    assert snap.recent_tokens_per_second(1800.0) == 105 / 1200
    assert snap.window_seconds >= 30 * 60
