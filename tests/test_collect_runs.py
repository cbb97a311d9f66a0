"""``sigil collect`` with more active sessions than it keeps open.

collect keeps a bounded number of sessions open (each: its lock, its log and a
writer thread). A session pushed out of that bound by others is parked: its
writer closes, its lock stays held and its run goes on, so the session reads
as live (contract 7) and a span arriving for it later continues the same run:
no ``session_complete`` and new ``session_start`` per eviction. Its run ends
as any other's: idle for ``--idle`` seconds, or when collect stops.

Real peers: the ``sigil collect`` command as a subprocess under a low
``RLIMIT_NOFILE`` (128 descriptors: 4 sessions open at once), fed OTLP/JSON
over HTTP; totals read through ``sigil monitor`` and the native model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from conftest import run_cli, wait_for
from sigil.collect import SpanData
from sigil.collect.sink import SessionSink
from sigil.core.locks import is_session_locked
from sigil.telemetry.log_parser import session_history
from test_collect import _json_request, _json_span, events
from test_collect_sessions import LimitedCollector

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

JS = {"Content-Type": "application/json"}
SESSIONS = 12
ROUNDS = 3


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def _span(session: int, rnd: int) -> bytes:
    trace = f"{session + 1:032x}"
    return _json_request(
        _json_span(trace, f"{rnd + 1:016x}", tokens=(10 + rnd, 1), sid=f"conv-{session}")
    )


def _round_robin(collector: LimitedCollector) -> None:
    """``ROUNDS`` spans to each of ``SESSIONS`` sessions, one session after the
    other: more sessions than collect keeps open, each pushed out by the others
    before its next span."""
    with httpx.Client(timeout=30) as client:
        for rnd in range(ROUNDS):
            for session in range(SESSIONS):
                r = client.post(collector.url, content=_span(session, rnd), headers=JS)
                assert r.status_code == 200, r.text


#: each session's tokens: (10 + 1) + (11 + 1) + (12 + 1)
TOKENS = sum(10 + rnd + 1 for rnd in range(ROUNDS))


def _monitor(home: Path, log_path: Path, sid: str) -> dict[str, object]:
    proc = run_cli(
        home, "monitor", "--session", sid, "--once", "--mode", "json", "--log-path", str(log_path)
    )
    assert proc.returncode in (0, 1), proc.stderr
    return orjson.loads(proc.stdout.splitlines()[0])  # type: ignore[no-any-return]


def _run_events(sdir: Path) -> list[tuple[str, object]]:
    return [
        (e["event_type"], e["metadata"].get("reason"))
        for e in events(sdir)
        if e["event_type"] in ("session_start", "session_complete")
    ]


def test_the_fd_bound_leaves_room_to_park_sessions() -> None:
    from sigil.collect.sink import max_open_for, max_parked_for

    # 128 descriptors: 4 open and 16 parked; the default limit of many systems
    # (1024) parks more sessions than it keeps open
    assert (max_open_for(128), max_parked_for(128)) == (4, 16)
    assert max_parked_for(1024) >= max_open_for(1024) >= 100


def _soft_fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit")


def test_collect_raises_its_soft_descriptor_limit_within_the_hard_one(
    home: Path, tmp_path: Path
) -> None:
    """A soft limit below the hard one (the usual 1024 under a high hard
    limit) is raised to 4096, not past the hard limit: room for 256 open and
    1024 parked sessions."""
    import resource
    import signal

    from test_collect import Collector

    def limits(soft: int, hard: int) -> Callable[[], None]:
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for soft, ceiling, expected in ((128, 4096, 4096), (128, 1000, 1000), (512, 512, 512)):
        if hard != resource.RLIM_INFINITY and ceiling > hard:
            continue
        collector = Collector(home, tmp_path / "collected", preexec_fn=limits(soft, ceiling))
        try:
            assert _soft_fd_limit(collector.proc.pid) == expected
        finally:
            collector.proc.send_signal(signal.SIGTERM)
            collector.proc.communicate(timeout=60)
        assert collector.proc.returncode == 0


def test_sessions_pushed_out_of_the_open_bound_keep_their_run(home: Path, tmp_path: Path) -> None:
    """12 sessions, 4 open at once, 3 spans each in turn: every session keeps
    one run, live (its lock held) while collect runs, ended once at stop."""
    log_path = tmp_path / "collected"
    collector = LimitedCollector(home, log_path, 128, "--idle", "600")
    try:
        _round_robin(collector)
        for session in range(SESSIONS):
            sdir = log_path / "sessions" / f"conv-{session}"
            wait_for(f"conv-{session}'s tokens", lambda d=sdir: session_history(d).tokens == TOKENS)
            # a pushed-out session is still live: its lock held, its run not ended
            assert is_session_locked(sdir), session
            history = session_history(sdir)
            assert [run.status for run in history.runs] == ["running"], session
            shown = _monitor(home, log_path, f"conv-{session}")
            assert (shown["status"], shown["incomplete"], shown["runs"]) == ("running", False, 1)
        code, out, err = collector.stop()
    finally:
        collector.kill()
    assert code == 0, err
    assert f"{SESSIONS * ROUNDS} written" in out, out
    for session in range(SESSIONS):
        sid = f"conv-{session}"
        sdir = log_path / "sessions" / sid
        history = session_history(sdir)
        assert [(run.status, run.tokens) for run in history.runs] == [("complete", TOKENS)], sid
        assert _run_events(sdir) == [
            ("session_start", None),
            ("session_complete", "collector stopped"),
        ]
        shown = _monitor(home, log_path, sid)
        assert (shown["tokens_used"], shown["status"], shown["runs"]) == (TOKENS, "complete", 1)
        assert not is_session_locked(sdir)


def test_parked_sessions_end_their_run_when_idle(home: Path, tmp_path: Path) -> None:
    """Idle for ``--idle`` seconds (longer than the spans take to send, on a
    busy machine too), parked sessions end their run and release their lock."""
    log_path = tmp_path / "collected"
    collector = LimitedCollector(home, log_path, 128, "--idle", "5")
    try:
        _round_robin(collector)
        for session in range(SESSIONS):
            sdir = log_path / "sessions" / f"conv-{session}"
            wait_for(
                f"conv-{session}'s idle close",
                lambda d=sdir: (
                    not is_session_locked(d)
                    and [r.status for r in session_history(d).runs] == ["complete"]
                ),
                timeout=60,
            )
        code, _, err = collector.stop()
    finally:
        collector.kill()
    assert code == 0, err
    for session in range(SESSIONS):
        sdir = log_path / "sessions" / f"conv-{session}"
        assert session_history(sdir).tokens == TOKENS
        assert _run_events(sdir) == [("session_start", None), ("session_complete", "idle")]


def _sink_span(session: int, rnd: int) -> SpanData:
    return SpanData(
        trace_id=f"{session + 1:032x}",
        span_id=f"{rnd + 1:016x}",
        parent_span_id="",
        name="chat",
        start_ns=0,
        end_ns=0,
        error=False,
        status_message="",
        attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.conversation.id": f"s{session}",
            "gen_ai.usage.input_tokens": 10 + rnd,
            "gen_ai.usage.output_tokens": 1,
        },
    )


def test_past_the_parked_bound_the_oldest_run_ends_and_is_counted_once(tmp_path: Path) -> None:
    """2 open, 2 parked, 6 sessions in turn: the least recently used parked
    session's run ends (``evicted``); a span for it later starts one run more,
    its spans written before stay duplicates, and every token counts once."""
    sink = SessionSink(tmp_path, idle_seconds=600, max_open=2, max_parked=2)
    try:
        for rnd in range(2):
            for session in range(6):
                result = sink.ingest([_sink_span(session, rnd)])
                assert (result.written, result.busy) == (1, 0)
                assert len(sink.open_sessions) <= 2 and len(sink.parked_sessions) <= 2
        # a retry of a span already written (its session ended and closed) is a duplicate
        assert sink.ingest([_sink_span(0, 0)]).duplicates == 1
    finally:
        sink.close()
    for session in range(6):
        sdir = tmp_path / "sessions" / f"s{session}"
        history = session_history(sdir)
        assert history.tokens == 11 + 12
        assert all(run.status == "complete" for run in history.runs)
        # each session went through 2 rounds; only a session pushed past the
        # parked bound between them ended its run early
        assert len(history.runs) == 2, (session, _run_events(sdir))
        assert _run_events(sdir)[1] == ("session_complete", "evicted: more than 4 sessions active")
