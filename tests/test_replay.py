"""``sigil replay``: a finished session played through the dashboard (issue 13).

The real command runs on a pseudo-terminal read by pyte (``tests/terminal.py``).
Sessions are written here with known timestamps and a ``tokens.json`` written
the way the orchestrator writes it; the replay must end on the ledger's
numbers, ``p`` must stop the replay (not only the screen), ``n`` must fold
exactly one more event, and ``q`` must give the terminal back as it was.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import SIGIL, cli_env
from terminal import Terminal

pytestmark = [pytest.mark.timeout(120)]


def _event(session: str, seq: int, at: float, kind: str, component: str, tokens: int,
           **meta: Any) -> bytes:  # fmt: skip
    minutes, seconds = divmod(at, 60)
    stamp = f"2026-01-11T10:{int(minutes):02d}:{seconds:09.6f}+00:00"
    return (
        json.dumps(
            {
                "timestamp": stamp,
                "session_id": session,
                "event_type": kind,
                "component": component,
                "message": f"{component} {kind} {seq}",
                "tokens": tokens,
                "metadata": meta,
                "seq": seq,
            }
        ).encode()
        + b"\n"
    )


def write_session(
    log_path: Path, session: str, *, runs: int = 1, steps: int = 12, every: float = 1.0
) -> Path:
    """A finished session: each run a session_start, ``steps`` steps ``every``
    seconds apart, a session_complete; then tokens.json as the orchestrator writes it."""
    from test_history_join import _ledger

    directory = log_path / "sessions" / session
    directory.mkdir(parents=True, mode=0o700)
    lines: list[bytes] = []
    seq, at = 0, 0.0
    names = ("routing", "memory", "reasoning", "validation")
    for run in range(1, runs + 1):
        lines.append(_event(session, seq, at, "session_start", "orchestrator", 0, run=run,
                            budget=50_000))  # fmt: skip
        seq += 1
        for i in range(steps):
            at += every
            comp = names[i % len(names)]
            if i == 5:
                lines.append(_event(session, seq, at, "step_error", comp, 0, latency_ms=40))
            else:
                lines.append(
                    _event(session, seq, at, "step_complete", comp, 100 * run + i, latency_ms=900)
                )
            seq += 1
        at += every
        lines.append(_event(session, seq, at, "session_complete", "orchestrator", 0,
                            status="complete"))  # fmt: skip
        seq += 1
    (directory / "execution.jsonl").write_bytes(b"".join(lines))
    _ledger(directory)
    return directory


def ledger_total(directory: Path) -> int:
    return int(json.loads((directory / "tokens.json").read_text())["total_used"])


@pytest.fixture
def env(sigil_home: Path) -> dict[str, str]:
    return cli_env(sigil_home, TERM="xterm-256color")


@pytest.fixture
def started(env: dict[str, str]) -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def start(*args: str, cols: int = 100, rows: int = 40) -> Terminal:
        term = Terminal([*SIGIL, "replay", *args], env, cols, rows)
        opened.append(term)
        return term

    yield start
    for term in opened:
        term.close()


def _events_shown(screen: str) -> int | None:
    match = re.search(r"Log +([\d,]+) events", screen)
    return int(match[1].replace(",", "")) if match else None


def _summary_tokens(text: str) -> int:
    match = re.search(r"Tokens: +([\d,]+) /", text)
    assert match, text
    return int(match[1].replace(",", ""))


@pytest.mark.slow
def test_replay_ends_on_the_ledgers_numbers_and_q_restores_the_terminal(
    started: Callable[..., Terminal], log_path: Path
) -> None:
    directory = write_session(log_path, "rp-1", runs=2, steps=12)
    total = ledger_total(directory)
    term = started("rp-1", "--speed", "max")
    before = term.tty_attrs()
    screen = term.wait_for("finished, 28 of 28 lines")
    assert term.tty_attrs()[3] & termios.ICANON == 0  # cbreak while it plays
    assert f"Tokens  {total:,} / 50,000" in screen
    assert "COMPLETE" in screen and "run 2" in screen
    assert _events_shown(screen) == 28
    assert screen.splitlines()[-1].startswith("q quit  p pause")
    term.press("q")
    assert term.wait() == 0
    text = term.text()
    assert _summary_tokens(text) == total
    assert "EXECUTION COMPLETE" in text
    assert term.tty_attrs() == before
    assert term.pending_input() == 0


@pytest.mark.slow
def test_pause_stops_the_replay_and_n_steps_exactly_one_event(
    started: Callable[..., Terminal], log_path: Path
) -> None:
    write_session(log_path, "rp-2", steps=40, every=1.0)
    term = started("rp-2", "--speed", "4x")  # an event each 0.25 s
    term.wait_for(lambda s: (_events_shown(s) or 0) >= 3)
    term.press("p")
    screen = term.wait_for(lambda s: "PAUSED" in s and "paused: n steps" in s)
    shown = _events_shown(screen)
    assert shown is not None
    time.sleep(1.5)  # six events' worth of time: none is folded while paused
    screen = term.text()
    assert _events_shown(screen) == shown and "PAUSED" in screen
    term.press("n")
    term.wait_for(lambda s: _events_shown(s) == shown + 1)
    time.sleep(1.0)
    assert _events_shown(term.text()) == shown + 1  # one event, then paused again
    term.press(".")
    term.wait_for(lambda s: _events_shown(s) == shown + 2)
    term.press("p")  # plays on
    term.wait_for(lambda s: "PAUSED" not in s and (_events_shown(s) or 0) > shown + 3)
    term.press("q")
    assert term.wait() == 0
    assert "Totals so far" in term.text()


@pytest.mark.slow
def test_the_replay_clock_is_the_sessions_not_the_wall_clock(
    started: Callable[..., Terminal], log_path: Path
) -> None:
    """Mid-replay the run is shown running (not stalled, though its events are
    old), its elapsed time that of the events played."""
    write_session(log_path, "rp-3", steps=40, every=10.0)
    term = started("rp-3", "--speed", "20x")  # 0.5 s per 10 s gap
    screen = term.wait_for(lambda s: (_events_shown(s) or 0) >= 4)
    assert "RUNNING" in screen and "stalled" not in screen
    match = re.search(r"Elapsed (\d+(?:\.\d)?)s", screen)
    assert match and 20 <= float(match[1]) <= 120, screen
    # The header clock shows the session's time (10:0x local), not today's.
    term.press("q")
    assert term.wait() == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["nope-1"], "unknown session 'nope-1'"),
        (["rp-e", "--speed", "fast"], "--speed must be"),
        (["rp-e", "--speed", "0x"], "--speed must be"),
        (["rp-e", "--run", "7"], "has no run 7"),
        (["../etc"], "session"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    sigil_home: Path, log_path: Path, args: list[str], needle: str
) -> None:
    write_session(log_path, "rp-e")
    proc = subprocess.run(
        [*SIGIL, "replay", *args, "--mode", "stream"],
        env=cli_env(sigil_home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr


def test_a_live_session_is_refused_with_a_pointer_to_monitor(
    sigil_home: Path, log_path: Path
) -> None:
    from sigil.core.locks import SessionLock

    directory = write_session(log_path, "rp-live")
    with SessionLock(directory).acquire():
        proc = subprocess.run(
            [*SIGIL, "replay", "rp-live"],
            env=cli_env(sigil_home),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "still running" in proc.stderr and "sigil monitor --session rp-live" in proc.stderr


def _stream(sigil_home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SIGIL, "replay", *args, "--mode", "stream", "--speed", "max"],
        env=cli_env(sigil_home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_archived_session_replays_without_extracting(sigil_home: Path, log_path: Path) -> None:
    import os

    from sigil.telemetry.log_rotation import LogRotator

    directory = write_session(log_path, "rp-arch", runs=2)
    total = ledger_total(directory)
    live = _stream(sigil_home, "rp-arch")
    assert live.returncode == 0, live.stderr
    old = time.time() - 30 * 86400
    for path in [directory, *directory.iterdir()]:
        os.utime(path, (old, old))
    (archive,) = LogRotator(log_path, retention_days=7).archive_old_sessions()
    assert not directory.exists()
    listing = sorted(p.relative_to(log_path) for p in log_path.rglob("*"))
    proc = _stream(sigil_home, "rp-arch")
    assert proc.returncode == 0, proc.stderr
    assert _summary_tokens(proc.stdout) == total
    assert proc.stdout == live.stdout  # the same events, the same summary
    assert sorted(p.relative_to(log_path) for p in log_path.rglob("*")) == listing
    assert archive.exists()
    shutil.rmtree(log_path / "archive")


def test_run_n_plays_that_run_after_folding_the_ones_before(
    sigil_home: Path, log_path: Path
) -> None:
    write_session(log_path, "rp-runs", runs=3, steps=4)
    first = _stream(sigil_home, "rp-runs", "--run", "1")
    assert first.returncode == 0, first.stderr
    lines = [ln for ln in first.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) == 6 and "session_start" in lines[0] and "session_complete" in lines[-1]
    # Run 1's tokens: 100 + 101 + 102 (step 5 is not reached with 4 steps) + 103.
    assert _summary_tokens(first.stdout) == 406
    second = _stream(sigil_home, "rp-runs", "--run", "2")
    assert second.returncode == 0, second.stderr
    listed = [ln for ln in second.stdout.splitlines() if ln.startswith("[")]
    assert len(listed) == 6 and "session_start 6" in listed[0]
    assert "(run 2 of 2)" in second.stdout
    assert _summary_tokens(second.stdout) == 406 + 806
    assert "This run:  806" in second.stdout


class _CountingFold:
    """The native ``Fold``, counting the lines fed into every instance
    (copies included): how often the replay folds each event."""

    fed: list[int] = []  # one counter shared by every instance

    def __init__(self, last_n: int = 100, inner: Any = None) -> None:
        from sigil import _native

        self._inner = _native.Fold(last_n) if inner is None else inner

    def feed_bytes(self, data: bytes, base_offset: int = 0) -> int:
        _CountingFold.fed.append(data.count(b"\n"))
        return int(self._inner.feed_bytes(data, base_offset))

    def copy(self) -> _CountingFold:
        return _CountingFold(inner=self._inner.copy())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.mark.parametrize("speed", ["max", "1000x"])
def test_run_n_folds_each_event_once(
    sigil_home: Path, log_path: Path, monkeypatch: pytest.MonkeyPatch, speed: str
) -> None:
    """``--run 3`` of 4 runs: the runs before it are folded once (the search
    for run 3's start is that fold, handed to the player), run 3 is played,
    run 4 is never folded; the numbers are those of the whole session up to
    run 3's end, as before."""
    from click.testing import CliRunner

    import sigil.telemetry.archived as archived
    from sigil.interfaces.cli.commands.replay import replay

    directory = write_session(log_path, "rp-once", runs=4, steps=4)
    log = (directory / "execution.jsonl").read_bytes().splitlines()
    starts = [i for i, line in enumerate(log) if b'"session_start"' in line]
    assert len(starts) == 4
    monkeypatch.setattr(archived, "Fold", _CountingFold)
    _CountingFold.fed = []
    result = CliRunner().invoke(
        replay,
        ["rp-once", "--run", "3", "--speed", speed, "--mode", "json", "--no-keys"],
        env={"SIGIL_HOME": str(sigil_home), "TZ": "UTC"},
    )
    assert result.exit_code == 0, result.output
    final = [json.loads(t) for t in result.output.splitlines() if t.startswith("{")][-1]
    assert final["run"]["number"] == 3
    assert final["tokens_used"] == 406 + 806 + 1206
    # Every line up to run 4's session_start once; run 3's session_start once
    # more, into the copy that told which run it opens.
    assert sum(_CountingFold.fed) == starts[3] + 1, _CountingFold.fed


GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.slow
def test_a_stepped_frame_matches_its_golden_file(tmp_path: Path) -> None:
    """The golden session of the views' tests, started paused and stepped twelve
    events in (reasoning's first attempt failed, its retry announced): the whole
    frame, whose clock is the session's, compared with ``golden/replay-80x24.txt``
    (``SIGIL_UPDATE_GOLDEN=1`` rewrites it; review the diff)."""
    import os

    import orjson

    from conftest import isolated_env
    from test_golden_views import SESSION, fixed_session

    session = tmp_path / "home" / "logs" / "sessions" / SESSION
    session.mkdir(parents=True, mode=0o700)
    session.joinpath("execution.jsonl").write_bytes(
        b"".join(orjson.dumps(e) + b"\n" for e in fixed_session())
    )
    env = isolated_env(tmp_path / "home", TERM="xterm-256color", NO_COLOR="1", TZ="UTC")
    term = Terminal([*SIGIL, "replay", SESSION, "--paused"], env, 80, 24)
    try:
        term.wait_for("0 of 19 lines")
        for i in range(1, 13):
            term.press("n")
            term.wait_for(f" {i} of 19 lines")
        text = term.wait_for(lambda s: "12 of 19 lines" in s and "Log     12 events" in s)
        # The frame may still be arriving (its recent events are drawn after
        # the log line): it is whole once the screen stays as it is.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.3)
            again = term.text()
            if again == text:
                break
            text = again
        term.press("q")
        assert term.wait() == 0
    finally:
        term.close()
    path = GOLDEN / "replay-80x24.txt"
    if os.environ.get("SIGIL_UPDATE_GOLDEN"):
        path.write_text(text + "\n")
    assert text + "\n" == path.read_text(), f"{path.name} changed; review it"


def test_pacing_divides_each_gap_by_the_speed_and_caps_it() -> None:
    """The wait before each event: its gap since the previous one over the speed,
    at most ``max_gap``; ``max`` never waits. The replay's moment moves between
    two events as the wait goes by, and stops while paused."""
    import io

    from sigil.interfaces.cli.display import DisplayOptions, StreamRenderer
    from sigil.interfaces.cli.replay import Player, Timeline, parse_speed

    assert parse_speed("10x") == 10 and parse_speed("0.5") == 0.5 and parse_speed("MAX") is None
    for bad in ("0x", "-2x", "fast", "infx", "nanx"):
        with pytest.raises(ValueError):
            parse_speed(bad)

    at = [0.0, 1.0, 101.0, 101.5]
    data = b"".join(_event("pace", i, t, "step_complete", "routing", 10) for i, t in enumerate(at))
    timeline = Timeline("pace", [("execution.jsonl", data + b"not json\n")])
    assert [ln.gap for ln in timeline.lines] == [0.0, 1.0, 100.0, 0.5, 0.0]
    now = [1000.0]
    out = io.StringIO()
    renderer = StreamRenderer(out, io.StringIO(), DisplayOptions())
    player = Player(timeline, renderer, speed=10.0, max_gap=2.0, clock=lambda: now[0])
    assert [player.delay(i) for i in range(5)] == [0.0, 0.1, 2.0, 0.05, 0.0]
    assert Player(timeline, renderer, speed=None).delay(2) == 0.0

    # Two events in (the second 0.1 s after the first); the third, 100 s of
    # event time later, is due 2 s after the second.
    from datetime import UTC, datetime

    zero = datetime(2026, 1, 11, 10, 0, tzinfo=UTC).timestamp()
    player.next_due = now[0]
    now[0] += 0.1
    player._advance(player._due(now[0]))
    assert player.cursor == 2 and player.fold.snapshot().tokens == 20
    assert player.next_due == pytest.approx(now[0] + 2.0)
    moment = player.moment()
    assert moment is not None and moment.timestamp() == pytest.approx(zero + 1.0)
    now[0] += 1.0  # half the wait: half the gap of event time
    moment = player.moment()
    assert moment is not None and moment.timestamp() == pytest.approx(zero + 51.0)
    player.pause()
    now[0] += 10.0
    moment = player.moment()
    assert moment is not None and moment.timestamp() == pytest.approx(zero + 51.0)
    player.step()
    assert player.cursor == 3 and player.fold.snapshot().tokens == 30
    player.resume()
    assert player.next_due == pytest.approx(now[0] + 0.05)
    assert "step_complete 2" in out.getvalue()


def test_calls_open_mid_log_are_in_flight_and_held_only_at_the_end() -> None:
    """A killed proxy run's log played event by event: while its calls are open
    mid-log they are in flight (the run was live then: nothing held, the
    history as it was); at the end of the log the writer is gone, so they hold
    their reservations as calls of unknown usage, as every view counts them."""
    import io
    import tempfile

    from sigil.interfaces.cli.display import DisplayOptions, StreamRenderer
    from sigil.interfaces.cli.replay import Player, Timeline
    from sigil.telemetry.log_parser import snapshot_session
    from test_replay_modes import KILLED_HELD, write_killed_proxy_session

    with tempfile.TemporaryDirectory() as tmp:
        directory = write_killed_proxy_session(Path(tmp), "kp-steps")
        data = (directory / "execution.jsonl").read_bytes()
        # The monitor's model: nobody holds the session's lock.
        live = snapshot_session("kp-steps", tmp)
    timeline = Timeline("kp-steps", [("execution.jsonl", data)])
    renderer = StreamRenderer(io.StringIO(), io.StringIO(), DisplayOptions())
    player = Player(timeline, renderer, speed=1.0, clock=lambda: 0.0)
    for _ in range(timeline.count - 1):
        player.step()
        assert not player.finished
        assert (player.state.snap.tokens_held, player.state.unknown_usage_calls) == (0, 0)
    # Two calls open, in flight (the run live as far as this moment knows).
    assert player.state.status == "running"
    assert player.fold.snapshot().tokens_held == 0
    player.step()
    assert player.finished
    assert player.state.display_status == "incomplete"
    assert (player.state.unknown_usage_calls, player.state.snap.tokens_held) == (2, KILLED_HELD)
    assert player.state.tokens_remaining == 50_000 - 30 - KILLED_HELD
    assert (live.unknown_usage_calls, live.tokens_held) == (2, KILLED_HELD)
    assert live.tokens_remaining == player.state.tokens_remaining
