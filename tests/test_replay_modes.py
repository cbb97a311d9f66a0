"""``sigil replay --mode minimal|json|stream`` (issue 13): a finished session
replayed into a pipe or a script, with the monitor's renderers and formats.

Known answers: the replay's last json object is the one ``sigil monitor
--mode json --once`` prints for the finished session, and its minimal line and
summary are the monitor's too. Mid-replay, the numbers that move with the clock
(elapsed, stalled) read the replay's moment of the session, not today's.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import SIGIL, cli_env
from terminal import Terminal
from test_replay import ledger_total, write_session

pytestmark = [pytest.mark.timeout(120)]


def _run(
    home: Path, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SIGIL, *args],
        env=cli_env(home, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _objects(stdout: str) -> list[dict[str, Any]]:
    lines = stdout.splitlines()
    assert lines, stdout
    return [json.loads(line) for line in lines]


def _one_line_usage(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert needle in lines[0], result.stderr
    assert result.stdout == ""


# -- json ---------------------------------------------------------------------------------


def test_json_max_ends_on_the_monitors_once_snapshot(sigil_home: Path, log_path: Path) -> None:
    directory = write_session(log_path, "js-1", runs=2, steps=12)
    replay = _run(sigil_home, "replay", "js-1", "--mode", "json", "--speed", "max")
    assert replay.returncode == 0, replay.stderr
    objects = _objects(replay.stdout)
    assert [o["type"] for o in objects[:-1]] == ["state"] * (len(objects) - 1)
    final = objects[-1]
    assert final["type"] == "final"
    monitor = _run(sigil_home, "monitor", "-s", "js-1", "--mode", "json", "--once")
    assert monitor.returncode == 0, monitor.stderr
    expected = _objects(monitor.stdout)[-1]
    assert expected["type"] == "final"
    assert final == expected
    assert final["tokens_used"] == ledger_total(directory)
    assert final["events"] == 28 and final["run"]["number"] == 2
    # The human summary goes to stderr, as the monitor's json mode does.
    assert "EXECUTION COMPLETE" in replay.stderr


def test_json_paced_one_snapshot_per_change_on_the_sessions_clock(
    sigil_home: Path, log_path: Path
) -> None:
    """At 4x an event each 0.25 s: a snapshot per refresh with changes, the
    events counted up, elapsed the session's (at most its 14 s), never stalled."""
    write_session(log_path, "js-2", steps=12, every=1.0)
    started = time.monotonic()
    replay = _run(sigil_home, "replay", "js-2", "--mode", "json", "--speed", "4x")
    took = time.monotonic() - started
    assert replay.returncode == 0, replay.stderr
    assert took >= 13 / 4 * 0.9, took  # 13 gaps of 1 s at 4x
    objects = _objects(replay.stdout)
    states = [o for o in objects if o["type"] == "state"]
    assert len(states) >= 5, states
    counts = [o["events"] for o in states]
    assert counts == sorted(counts)
    for obj in objects:
        assert 0 <= obj["elapsed_seconds"] <= 14.0, obj["elapsed_seconds"]
        assert obj["stalled_seconds"] is None, obj
    # No two snapshots in a row differ only by the clock.
    assert len({json.dumps(o, sort_keys=True) for o in states}) == len(states)
    assert objects[-1]["type"] == "final" and objects[-1]["events"] == 14


def test_json_events_lists_each_event_as_logged(sigil_home: Path, log_path: Path) -> None:
    write_session(log_path, "js-3", steps=4)
    replay = _run(sigil_home, "replay", "js-3", "--mode", "json", "--json-events", "--speed", "max")
    assert replay.returncode == 0, replay.stderr
    objects = _objects(replay.stdout)
    events = [o for o in objects if o["type"] == "event"]
    assert [e["seq"] for e in events] == list(range(6))
    assert events[0]["event_type"] == "session_start"
    assert objects[-1]["type"] == "final"


def test_json_run_n_ends_on_that_runs_numbers(sigil_home: Path, log_path: Path) -> None:
    write_session(log_path, "js-4", runs=3, steps=4)
    replay = _run(sigil_home, "replay", "js-4", "--mode", "json", "--speed", "max", "--run", "2")
    assert replay.returncode == 0, replay.stderr
    final = _objects(replay.stdout)[-1]
    assert final["run"]["number"] == 2 and final["run"]["tokens_used"] == 806
    assert final["tokens_used"] == 406 + 806


def write_killed_proxy_session(log_path: Path, session: str, *, later_run: bool = False) -> Path:
    """A proxy run killed (``kill -9``) with two calls in flight: its log ends
    on their ``step_start``s (each reserving its prompt and output cap), no
    final event, nobody holding the session's lock. ``later_run``: a second
    run (one call, complete) followed it."""
    from test_replay import _event

    directory = log_path / "sessions" / session
    directory.mkdir(parents=True, mode=0o700)
    meta = {"model": "m", "run": 1}
    lines = [
        _event(session, 0, 0.0, "session_start", "orchestrator", 0, run=1, budget=50_000,
               provider="proxy"),
        _event(session, 1, 1.0, "step_start", "m", 0, call=1, prompt_tokens_reserved=10,
               max_tokens=50, **meta),
        _event(session, 2, 2.0, "step_complete", "m", 30, call=1, input_tokens=10,
               output_tokens=20, latency_ms=900, **meta),
        _event(session, 3, 3.0, "step_start", "m", 0, call=2, prompt_tokens_reserved=20,
               max_tokens=100, **meta),
        _event(session, 4, 4.0, "step_start", "m", 0, call=3, prompt_tokens_reserved=5,
               max_tokens=40, **meta),
    ]  # fmt: skip
    if later_run:
        meta = {"model": "m", "run": 2}
        lines += [
            _event(session, 5, 10.0, "session_start", "orchestrator", 0, run=2, budget=50_000,
                   provider="proxy", tokens_held_before_run=165),
            _event(session, 6, 11.0, "step_start", "m", 0, call=1, prompt_tokens_reserved=10,
                   max_tokens=50, **meta),
            _event(session, 7, 12.0, "step_complete", "m", 40, call=1, input_tokens=10,
                   output_tokens=30, latency_ms=900, **meta),
            _event(session, 8, 13.0, "session_complete", "orchestrator", 0, status="complete"),
        ]  # fmt: skip
    (directory / "execution.jsonl").write_bytes(b"".join(lines))
    return directory


#: What the killed run's two calls in flight reserve: (20 + 100) + (5 + 40).
KILLED_HELD = 165


@pytest.mark.parametrize("speed", ["max", "1000x"])
def test_a_killed_proxy_runs_calls_in_flight_end_held_as_the_monitor_shows_them(
    sigil_home: Path, log_path: Path, speed: str
) -> None:
    """The writer of the replayed log is gone (a session still locked is not
    replayed): at the end of the log the calls its last run left open hold
    their reservations (unknown usage), as ``monitor --once`` shows them, not
    "in flight" as they were while the run was live."""
    write_killed_proxy_session(log_path, "kp-1")
    monitor = _run(sigil_home, "monitor", "-s", "kp-1", "--mode", "json", "--once")
    # Exit 1: the run is incomplete (its writer stopped without a final event).
    assert monitor.returncode == 1, monitor.stderr
    expected = _objects(monitor.stdout)[-1]
    assert (expected["unknown_usage_calls"], expected["tokens_held"]) == (2, KILLED_HELD)
    assert expected["tokens_remaining"] == 50_000 - 30 - KILLED_HELD
    replay = _run(sigil_home, "replay", "kp-1", "--mode", "json", "--speed", speed)
    assert replay.returncode == 0, replay.stderr
    objects = _objects(replay.stdout)
    final = objects[-1]
    assert final["type"] == "final"
    # The clock-bound fields are the replay's moment, the monitor's now; the
    # exit code each command's (the replay played: 0; the monitor found the
    # run incomplete: 1).
    own = ("elapsed_seconds", "stalled_seconds", "tokens_per_second", "seconds_to_budget_end",
           "exit_code")  # fmt: skip
    assert {k: v for k, v in final.items() if k not in own} == {
        k: v for k, v in expected.items() if k not in own
    }
    # The frames before the end are history: the run was live, nothing held.
    for obj in objects:
        if obj["status"] != "incomplete":
            assert obj["tokens_held"] == 0 and obj["unknown_usage_calls"] == 0, obj


def test_run_n_of_a_killed_run_ends_with_its_calls_held(sigil_home: Path, log_path: Path) -> None:
    """``--run 1`` of a session whose killed run 1 was followed by run 2: run 1's
    writer is gone, so the end of its replay holds its open calls, as every
    view counts run 1 (and run 2 started holding them)."""
    write_killed_proxy_session(log_path, "kp-2", later_run=True)
    monitor = _objects(_run(sigil_home, "monitor", "-s", "kp-2", "--mode", "json", "--once").stdout)
    assert monitor[-1]["tokens_held"] == KILLED_HELD
    replay = _run(sigil_home, "replay", "kp-2", "--mode", "json", "--speed", "max", "--run", "1")
    assert replay.returncode == 0, replay.stderr
    final = _objects(replay.stdout)[-1]
    assert final["run"]["number"] == 1 and final["run"]["status"] == "incomplete"
    assert (final["unknown_usage_calls"], final["tokens_held"]) == (2, KILLED_HELD)
    assert final["tokens_remaining"] == 50_000 - 30 - KILLED_HELD


# -- minimal ------------------------------------------------------------------------------


def _minimal_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith("js-") or ln.startswith("mn-")]


def test_minimal_piped_ends_on_the_monitors_line_and_summary(
    sigil_home: Path, log_path: Path
) -> None:
    write_session(log_path, "mn-1", runs=2, steps=6)
    replay = _run(sigil_home, "replay", "mn-1", "--mode", "minimal", "--speed", "max")
    assert replay.returncode == 0, replay.stderr
    monitor = _run(sigil_home, "monitor", "-s", "mn-1", "--mode", "minimal", "--once")
    assert monitor.returncode == 0, monitor.stderr
    ours, theirs = replay.stdout.splitlines(), monitor.stdout.splitlines()
    # The monitor's output is its last line of the state, then the summary.
    assert ours[-len(theirs) :] == theirs, (ours, theirs)
    assert "\r" not in replay.stdout and "\x1b" not in replay.stdout


def test_minimal_piped_paced_writes_a_line_per_change(sigil_home: Path, log_path: Path) -> None:
    """Piped, a line per change of the session, not per tick of the clock."""
    write_session(log_path, "mn-2", steps=8, every=1.0)
    replay = _run(sigil_home, "replay", "mn-2", "--mode", "minimal", "--speed", "5x")
    assert replay.returncode == 0, replay.stderr
    monitor = _run(sigil_home, "monitor", "-s", "mn-2", "--mode", "minimal", "--once")
    summary = monitor.stdout.splitlines()[1:]
    lines = replay.stdout.splitlines()
    assert lines[-len(summary) :] == summary
    state_lines = lines[: -len(summary)]
    assert 3 <= len(state_lines) <= 10 + 1, state_lines  # at most one per event (+ the start)
    assert all(a != b for a, b in itertools.pairwise(state_lines))
    assert state_lines[-1] == monitor.stdout.splitlines()[0]


# -- defaults -----------------------------------------------------------------------------


def test_off_a_terminal_the_default_is_the_monitors(sigil_home: Path, log_path: Path) -> None:
    write_session(log_path, "df-1", steps=3)
    # monitoring.default_mode (here from the environment) picks the mode, as for the monitor.
    replay = _run(sigil_home, "replay", "df-1", "--speed", "max", SIGIL_MONITOR_MODE="json")
    assert replay.returncode == 0, replay.stderr
    assert _objects(replay.stdout)[-1]["type"] == "final"
    # The default, dashboard, is the stream off a terminal.
    replay = _run(sigil_home, "replay", "df-1", "--speed", "max")
    assert replay.returncode == 0, replay.stderr
    assert "session_complete" in replay.stdout


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--mode", "json", "--paused"], {}, "--paused"),
        (["--mode", "minimal", "--paused"], {}, "--paused"),
        (["--mode", "stream", "--json-events"], {}, "--json-events needs --mode json"),
        (["--json-events"], {}, "--json-events needs --mode json"),
        (["--mode", "JSON"], {}, "--mode must be one of dashboard, stream, minimal, json"),
        (["--mode", "dashboard"], {}, "needs a terminal"),
        ([], {"SIGIL_MONITOR_MODE": "nope"}, "monitoring.default_mode"),
    ],
)
def test_bad_modes_are_one_line_exit_2(
    sigil_home: Path, log_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    write_session(log_path, "er-1", steps=2)
    _one_line_usage(_run(sigil_home, "replay", "er-1", "--speed", "max", *args, **env), needle)


def test_unknown_session_in_json_mode_writes_nothing(sigil_home: Path, log_path: Path) -> None:
    log_path.mkdir(parents=True)
    _one_line_usage(
        _run(sigil_home, "replay", "nope-1", "--mode", "json", "--speed", "max"),
        "unknown session 'nope-1'",
    )


# -- on a terminal ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["minimal", "json"])
def test_minimal_and_json_on_a_terminal(sigil_home: Path, log_path: Path, mode: str) -> None:
    directory = write_session(log_path, "pt-1", steps=10, every=1.0)
    total = ledger_total(directory)
    term = Terminal(
        [*SIGIL, "replay", "pt-1", "--mode", mode, "--speed", "10x"],
        cli_env(sigil_home, TERM="xterm-256color"),
        120,
        30,
    )
    try:
        code = term.wait()
        text = term.text()
        raw = bytes(term.raw).decode(errors="replace")
    finally:
        term.close()
    assert code == 0, raw[-800:]
    assert "Traceback" not in raw
    assert "EXECUTION COMPLETE" in text
    assert f"{total:,}" in text
    if mode == "minimal":
        assert "\r" in raw and "\x1b[K" in raw  # one line, rewritten in place
        assert "\x1b[?1049h" not in raw  # not the dashboard's screen
    else:
        finals = [ln for ln in raw.replace("\r", "").splitlines() if '"type":"final"' in ln]
        assert len(finals) == 1 and json.loads(finals[0])["tokens_used"] == total


@pytest.mark.slow
def test_paused_at_max_speed_steps_one_line_then_plays_to_the_end(
    sigil_home: Path, log_path: Path
) -> None:
    """--speed max folds runs of lines as read; a step still folds exactly one."""
    directory = write_session(log_path, "pm-1", runs=2, steps=12)
    total = ledger_total(directory)
    term = Terminal(
        [*SIGIL, "replay", "pm-1", "--speed", "max", "--paused"],
        cli_env(sigil_home, TERM="xterm-256color"),
        100,
        40,
    )
    try:
        term.wait_for("0 of 28 lines")
        for i in range(1, 4):
            term.press("n")
            term.wait_for(f" {i} of 28 lines")
        screen = term.wait_for(lambda s: "3 of 28 lines" in s and "Log     3 events" in s)
        assert "PAUSED" in screen
        term.press("p")
        screen = term.wait_for("finished, 28 of 28 lines")
        assert f"Tokens  {total:,} / 50,000" in screen
        term.press("q")
        assert term.wait() == 0
    finally:
        term.close()
