"""``sigil monitor``'s other modes (issue 12): what the stream lists (``--all``,
``--tail``, ``--since``, ``--component``, ``--event-type``, ``--errors``), the
json mode's ``--json-events``, the minimal line's colours and ``--help``.

Every test runs the real command as a subprocess on a log written by
``tests/monitor_writer.py`` (the real logger, the real session lock); the
minimal mode's colours are read off a pseudo-terminal by pyte. No test sleeps:
each waits for a line of output or a screen.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pytest

from conftest import SIGIL, cli_env
from terminal import Terminal
from test_monitor_e2e import Writer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture
def env(sigil_home: Path) -> dict[str, str]:
    return cli_env(sigil_home, TERM="xterm-256color")


@pytest.fixture
def writer(env: dict[str, str], log_path: Path) -> Iterator[Callable[[str], Writer]]:
    opened: list[Writer] = []

    def start(session: str) -> Writer:
        w = Writer(session, log_path, env)
        opened.append(w)
        return w

    yield start
    for w in opened:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(5)


@pytest.fixture
def spawn(env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """``sigil monitor ARGS`` with stdout and stderr piped (not a terminal)."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*SIGIL, "monitor", "--refresh-rate", "0.02", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.communicate(timeout=5)


def read_until(stream: IO[str] | None, predicate: Callable[[str], bool]) -> list[str]:
    """Lines of ``stream`` up to and including the first that matches (blocking)."""
    assert stream is not None
    lines: list[str] = []
    while True:
        line = stream.readline()
        assert line, f"output ended before the line waited for; got {lines[-5:]}"
        lines.append(line.rstrip("\n"))
        if predicate(lines[-1]):
            return lines


def rest(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """What is left of stdout and stderr at exit. Read through the same text
    wrappers as :func:`read_until` (``communicate`` reads the pipes' descriptors
    and would lose what a ``readline`` already buffered)."""
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()  # stderr stays small: notices, or the summary in json mode
    err = proc.stderr.read()
    proc.wait(20)
    return out, err


def event_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[")]


def raw_event(ts: str, kind: str, component: str, message: str, tokens: int = 0) -> str:
    return "raw " + json.dumps(
        {
            "timestamp": ts,
            "session_id": "x",
            "event_type": kind,
            "component": component,
            "message": message,
            "tokens": tokens,
            "metadata": {},
        }
    )


# -- stream: which events ------------------------------------------------------------------


def test_all_lists_every_event_from_the_start_then_follows(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    w = writer("all-1")
    w("start 100000", "burst 150 routing 2")
    proc = spawn("--session", "all-1", "--mode", "stream", "--all")
    caught_up = read_until(proc.stdout, lambda line: "routing step 149 " in line)
    assert caught_up[0].endswith("orchestrator: Starting run 1 (0 tokens)")
    assert len(caught_up) == 151
    # Then it follows: a burst larger than the model's recent ring is listed whole.
    w("burst 250 memory 1", "complete")
    out, err = rest(proc)
    assert proc.returncode == 0
    lines = caught_up + out.splitlines()
    events = event_lines("\n".join(lines))
    assert len(events) == 1 + 150 + 250 + 1
    assert [e.split(": ", 1)[1] for e in events[151:401]] == [
        f"memory step {i} (1 tokens)" for i in range(250)
    ]
    assert "not shown" not in err
    assert "Tokens:    550 / 100,000" in out  # the model's totals, unchanged


def test_all_into_a_pipe_closed_early_exits_0_quietly(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    w = writer("pipe-all")
    w("start 100000", "burst 5000 routing 2", "complete")  # more than a pipe's buffer
    proc = spawn("--session", "pipe-all", "--all")
    first = read_until(proc.stdout, lambda line: line.startswith("["))
    assert first[-1].endswith("orchestrator: Starting run 1 (0 tokens)")
    assert proc.stdout is not None
    proc.stdout.close()  # `| head -1`
    assert proc.wait(20) == 0
    assert proc.stderr is not None
    assert proc.stderr.read().strip() == "sigil monitor: watching session pipe-all"


def test_the_stream_lists_each_event_once_across_rotation_and_malformed_lines(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    w = writer("rot-s")
    w("start 100000", "step routing 10 5")
    proc = spawn("--session", "rot-s", "--mode", "stream", "--all")
    read_until(proc.stdout, lambda line: "routing step done" in line)
    w(
        "raw not json",
        "rotate execution_20260111_101500.jsonl",
        "burst 120 memory 1",
        "rotate execution_20260111_101600.jsonl",
        "step planning 40 5",
        "complete",
    )
    out, err = rest(proc)
    assert proc.returncode == 0
    events = [line.split(": ", 1)[1] for line in event_lines(out)]
    assert events == [
        *(f"memory step {i} (1 tokens)" for i in range(120)),
        "planning step done (40 tokens)",
        "Run 1 complete (0 tokens)",
    ]
    assert "Tokens:    170 / 100,000" in out and "Malformed: 1" in out
    assert "not shown" not in err


def test_a_partial_truncation_lists_no_event_twice(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]], log_path: Path
) -> None:
    """copytruncate keeping the head: the lines read again are not listed again."""
    w = writer("trunc-s")
    w("start 1000", "step routing 12 5", "step memory 30 5")
    proc = spawn("--session", "trunc-s", "--mode", "stream", "--all")
    first = read_until(proc.stdout, lambda line: "(30 tokens)" in line)
    path = log_path / "sessions" / "trunc-s" / "execution.jsonl"
    head = b"".join(path.read_bytes().splitlines(keepends=True)[:2])  # start + routing
    with open(path, "r+b") as f:
        f.truncate(len(head))
    w("step planning 7 5", "complete")
    out, _ = rest(proc)
    assert proc.returncode == 0
    assert [line.split(": ", 1)[1] for line in event_lines("\n".join(first) + "\n" + out)] == [
        "Starting run 1 (0 tokens)",
        "routing step done (12 tokens)",
        "memory step done (30 tokens)",
        "planning step done (7 tokens)",
        "Run 1 complete (0 tokens)",
    ]
    assert "Tokens:    49 / 1,000" in out


def test_without_all_the_catch_up_says_how_to_see_the_rest(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    w = writer("recent-1")
    w("start 100000", "burst 40 routing 2", "complete")
    out, err = rest(spawn("--session", "recent-1", "--mode", "stream"))
    assert len(event_lines(out)) == 20
    assert "(22 earlier events folded, not shown): --all or --tail N lists them" in err


def test_tail_lists_the_last_n_then_follows(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    w = writer("tail-1")
    w("start 100000", "burst 30 routing 2")
    proc = spawn("--session", "tail-1", "--mode", "stream", "--tail", "3")
    first = read_until(proc.stdout, lambda line: "routing step 29 " in line)
    assert [line.split(": ", 1)[1] for line in first] == [
        f"routing step {i} (2 tokens)" for i in (27, 28, 29)
    ]
    w("step planning 40 5", "complete")
    out, _ = rest(proc)
    assert [line.split(": ", 1)[1] for line in event_lines(out)] == [
        "planning step done (40 tokens)",
        "Run 1 complete (0 tokens)",
    ]


def test_tail_zero_lists_only_what_comes(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    w = writer("tail-0")
    w("start 100000", "burst 5 routing 2", "complete")
    out, err = rest(spawn("--session", "tail-0", "--mode", "stream", "--tail", "0"))
    assert event_lines(out) == [] and "EXECUTION COMPLETE" in out
    assert "not shown" not in err


def test_since_an_iso_time_and_a_duration(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    w = writer("since-1")
    w(
        raw_event("2026-01-11T10:00:00+00:00", "step_complete", "routing", "old one", 1),
        raw_event("2026-01-11T10:10:00+00:00", "step_complete", "routing", "newer one", 2),
        raw_event("2026-01-11T10:20:00+00:00", "step_complete", "memory", "newest one", 4),
        "start 100000",
        "complete",
    )
    iso = spawn("--session", "since-1", "-m", "stream", "--since", "2026-01-11T10:05:00+00:00")
    out, _ = rest(iso)
    messages = [line.split(": ", 1)[1] for line in event_lines(out)]
    assert messages[:2] == ["newer one (2 tokens)", "newest one (4 tokens)"]
    assert "old one (1 tokens)" not in messages
    assert messages[2:] == ["Starting run 1 (0 tokens)", "Run 1 complete (0 tokens)"]
    assert "Tokens:    7 / 100,000" in out  # a filter selects; the totals are the model's

    recent = spawn("--session", "since-1", "-m", "stream", "--since", "10m")
    out, _ = rest(recent)
    messages = [line.split(": ", 1)[1] for line in event_lines(out)]
    assert messages == ["Starting run 1 (0 tokens)", "Run 1 complete (0 tokens)"]


def test_component_event_type_and_errors_select_events(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    w = writer("filt-1")
    w(
        "start 100000",
        "step routing 10 5",
        "error memory",
        "step planning 40 5",
        "tokens reasoning 5",
        "complete",
    )

    def messages(*args: str) -> list[str]:
        out, _ = rest(spawn("--session", "filt-1", "--all", *args))
        assert "Tokens:    55 / 100,000" in out, out  # every total stays the model's
        return [line.split(": ", 1)[1] for line in event_lines(out)]

    assert messages("--component", "routing", "--component", "planning") == [
        "routing step done (10 tokens)",
        "planning step done (40 tokens)",
    ]
    assert messages("--event-type", "step_complete", "--event-type", "token_consumption") == [
        "routing step done (10 tokens)",
        "planning step done (40 tokens)",
        "reasoning used tokens (5 tokens)",
    ]
    assert messages("--errors") == ["memory step failed (0 tokens)"]
    assert messages("--errors", "--component", "routing") == []


def test_filters_apply_to_the_events_that_arrive_live(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    w = writer("live-f")
    w("start 100000", "error memory", "step routing 10 5")
    # No --mode: the event options choose the stream.
    proc = spawn("--session", "live-f", "--errors", "--tail", "1")
    first = read_until(proc.stdout, lambda line: "memory step failed" in line)
    w("step routing 10 5", "burst 120 planning 1", "error routing", "complete")
    out, _ = rest(proc)
    assert proc.returncode == 0
    assert [line.split(": ", 1)[1] for line in first + event_lines(out)] == [
        "memory step failed (0 tokens)",
        "routing step failed (0 tokens)",
    ]


def test_a_monitor_started_before_the_run_shows_session_start(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    proc = spawn("--session", "first-1", "--mode", "stream")
    read_until(proc.stderr, lambda line: "waiting for" in line)
    w = writer("first-1")
    w("start 100000", "burst 150 routing 2", "complete")
    out, err = rest(proc)
    assert proc.returncode == 0
    events = event_lines(out)
    assert events[0].endswith("orchestrator: Starting run 1 (0 tokens)")
    assert len(events) == 152  # the whole run: nothing folded unlisted
    assert "not shown" not in err


# -- json ----------------------------------------------------------------------------------


def test_json_events_beside_state_snapshots(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]], log_path: Path
) -> None:
    w = writer("jev-1")
    w("start 100000", "step routing 10 5")
    proc = spawn("--session", "jev-1", "--mode", "json", "--json-events", "--all")
    first = read_until(proc.stdout, lambda line: '"routing step done"' in line)
    w("error memory", "burst 130 planning 1", "complete")
    out, _ = rest(proc)
    assert proc.returncode == 0
    objects = [json.loads(line) for line in first + out.splitlines()]
    # The events of the past (--all) first, then the state they lead to.
    assert [o["type"] for o in objects[:3]] == ["event", "event", "state"]
    assert objects[2]["tokens_used"] == 10
    events = [o for o in objects if o["type"] == "event"]
    logged = [
        json.loads(line)
        for line in (log_path / "sessions" / "jev-1" / "execution.jsonl").read_text().splitlines()
    ]
    # Each event as logged, plus "type": "event" (in the order of the log, every one).
    assert [{k: v for k, v in e.items() if k != "type"} for e in events] == logged
    states = [o for o in objects if o["type"] == "state"]
    assert objects[-1]["type"] == "final" and objects[-1]["tokens_used"] == w.total == 140
    # A snapshot only when the state changed: never the same state twice in a row.
    clock = {"elapsed_seconds", "tokens_per_second", "stalled_seconds", "seconds_to_budget_end"}
    keys = [{k: v for k, v in s.items() if k not in clock} for s in states]
    assert all(a != b for a, b in itertools.pairwise(keys))
    assert len(states) <= len(events)


def test_json_events_filters(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    w = writer("jev-2")
    w("start 100000", "step routing 10 5", "error memory", "complete")
    out, _ = rest(
        spawn("--session", "jev-2", "-m", "json", "--json-events", "--tail", "5", "--errors")
    )
    events = [o for o in map(json.loads, out.splitlines()) if o["type"] == "event"]
    assert [(e["event_type"], e["component"]) for e in events] == [("step_error", "memory")]


def test_json_without_json_events_writes_no_event(
    writer: Callable[[str], Writer], spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    w = writer("jev-3")
    w("start 100000", "step routing 10 5", "complete")
    out, _ = rest(spawn("--session", "jev-3", "-m", "json"))
    assert {o["type"] for o in map(json.loads, out.splitlines())} == {"state", "final"}


# -- minimal -------------------------------------------------------------------------------


def _colours(term: Terminal, text: str) -> set[str]:
    """The foreground colours of the cells where ``text`` is on the screen."""
    with term.lock:
        screen = term.screen
        for y in range(screen.lines):
            row = "".join(screen.buffer[y][x].data for x in range(screen.columns))
            at = row.find(text)
            if at >= 0:
                return {screen.buffer[y][x].fg for x in range(at, at + len(text))}
    raise AssertionError(f"{text!r} is not on the screen:\n{term.text()}")


def test_minimal_colours_the_budget_level_rate_forecast_and_errors(
    env: dict[str, str], writer: Callable[[str], Writer]
) -> None:
    w = writer("mini-c")
    run_env = dict(env)
    run_env.pop("NO_COLOR", None)
    term = Terminal(
        [*SIGIL, "monitor", "-r", "0.02", "--session", "mini-c", "--mode", "minimal"],
        run_env,
        120,
        10,
    )
    try:
        w("start 1000", "step routing 100 5")
        term.wait_for("100 / 1,000 (10.00%) running")
        assert _colours(term, "100 / 1,000 (10.00%)") == {"green"}
        assert "tok/min" in term.text()
        w("step memory 500 5")
        term.wait_for("600 / 1,000 (60.00%)")
        assert _colours(term, "600 / 1,000 (60.00%)") == {"brown"}  # SGR 33: pyte says brown
        w("error memory")
        screen = term.wait_for("1 error")
        assert _colours(term, "1 error") == {"red"}
        assert "budget ends in ~" in screen  # the forecast from the recent rate
        w("step planning 250 5")
        term.wait_for("850 / 1,000 (85.00%)")
        assert _colours(term, "850 / 1,000 (85.00%)") == {"red"}
        w("complete")
        assert term.wait() == 0
    finally:
        term.close()


# -- help and usage errors -----------------------------------------------------------------


def test_help_has_examples(run_sigil: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = run_sigil("monitor", "--help", timeout=20)
    assert result.returncode == 0
    assert "Examples:" in result.stdout
    for flag in ("--all", "--tail", "--since", "--component", "--event-type", "--errors"):
        assert flag in result.stdout
    assert "sigil monitor -s acme-1 -m json --json-events" in result.stdout
    assert "monitoring.alert_command" in result.stdout and "SIGIL_ALERT_LEVEL" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tail", "-1"], "--tail must be a whole number of events (0 or more), got '-1'"),
        (["--tail", "many"], "--tail must be a whole number"),
        (["--since", "yesterday"], "--since must be an ISO time"),
        (["--since", "10x"], "--since must be an ISO time"),
        (["--all", "--tail", "3"], "--all and --tail cannot be used together"),
        (["--all", "--since", "1h"], "--all and --since cannot be used together"),
        (["--json-events"], "--json-events needs --mode json"),
        (["--mode", "stream", "--json-events"], "--json-events needs --mode json"),
        (["--mode", "json", "--errors"], "with --mode json add --json-events"),
        (["--mode", "minimal", "--all"], "--all selects events: use --mode stream"),
        (["--component", ""], "--component must not be empty"),
        (["--tail"], "requires an argument"),
    ],
)
def test_bad_event_options_are_one_line_and_exit_2(
    run_sigil: Callable[..., subprocess.CompletedProcess[str]], args: list[str], message: str
) -> None:
    result = run_sigil("monitor", "--session", "s", *args, timeout=20)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


# -- the pieces ----------------------------------------------------------------------------


def test_parse_since_and_tail() -> None:
    from sigil.interfaces.cli.event_selection import parse_since, parse_tail

    now = datetime(2026, 1, 11, 12, 0, tzinfo=UTC)
    assert parse_since("10m", now) == now - timedelta(minutes=10)
    assert parse_since("1h30m", now) == now - timedelta(minutes=90)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2026-01-11T10:15:00+00:00", now) == datetime(
        2026, 1, 11, 10, 15, tzinfo=UTC
    )
    assert parse_since("2026-01-11T10:15:00", now) is not None  # local time
    for bad in ("", "yesterday", "10", "m10", "-5m", "10m ago"):
        assert parse_since(bad, now) is None, bad
    assert parse_tail("0") == 0 and parse_tail("25") == 25
    for bad in ("-1", "1.5", "", "x", "٣"):
        assert parse_tail(bad) is None, bad


def test_selection_selects_never_counts() -> None:
    from sigil.interfaces.cli.event_selection import EventSelection

    class E:
        def __init__(self, kind: str, component: str, ts: str = "2026-01-11T10:00:00Z") -> None:
            self.event_type, self.component, self.timestamp = kind, component, ts

    events: list[Any] = [
        E("step_complete", "routing"),
        E("retry_attempt", "memory"),
        E("session_error", "orchestrator", "2026-01-11T11:00:00Z"),
    ]
    assert EventSelection().select(events) is events
    assert [e.event_type for e in EventSelection(errors=True).select(events)] == [
        "retry_attempt",
        "session_error",
    ]
    since = datetime(2026, 1, 11, 10, 30, tzinfo=UTC)
    assert [e.component for e in EventSelection(since=since).select(events)] == ["orchestrator"]


# -- anomalies, unknown usage and per-model totals (issues 13, 14, 12) ----------------------

LOOP_INPUT = "ab" * 32


def anomalous_session(log_path: Path, session: str, *, final: bool = True) -> Path:
    """A session written by hand the way the orchestrator and the proxy write it:
    planning started five times with one ``input_sha256`` (an agent loop), a
    proxy call whose upstream reported no usage (``"usage": "unknown"``), and
    reasoning on two models. Returns the session's directory."""
    start = datetime.now(UTC) - timedelta(seconds=30)
    rows: list[tuple[str, str, int, dict[str, Any]]] = [
        ("session_start", "orchestrator", 0,
         {"run": 1, "budget": 10_000, "task": "loop", "allocations": {"planning": 2000}}),
        *(("step_start", "planning", 0, {"run": 1, "input_sha256": LOOP_INPUT})
          for _ in range(5)),
        ("step_complete", "planning", 120,
         {"run": 1, "latency_ms": 50, "model": "gpt-4o", "input_tokens": 100,
          "output_tokens": 20}),
        ("step_complete", "planning", 0,
         {"run": 1, "latency_ms": 40, "model": "gpt-4o", "usage": "unknown"}),
        ("step_complete", "reasoning", 900,
         {"run": 1, "latency_ms": 90, "model": "big-model", "input_tokens": 800,
          "output_tokens": 100}),
        ("step_complete", "reasoning", 300,
         {"run": 1, "latency_ms": 70, "model": "small-model", "input_tokens": 250,
          "output_tokens": 50}),
    ]  # fmt: skip
    if final:
        rows.append(("session_complete", "orchestrator", 0, {"run": 1, "status": "complete"}))
    session_dir = log_path / "sessions" / session
    session_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "timestamp": (start + timedelta(seconds=seq)).isoformat(),
                "session_id": session,
                "event_type": kind,
                "component": component,
                "message": f"{component} {kind}",
                "tokens": tokens,
                "metadata": meta,
                "seq": seq,
            }
        )
        for seq, (kind, component, tokens, meta) in enumerate(rows)
    ]
    (session_dir / "execution.jsonl").write_text("\n".join(lines) + "\n")
    return session_dir


def test_json_snapshots_carry_loops_unknown_usage_and_models(
    env: dict[str, str], log_path: Path
) -> None:
    anomalous_session(log_path, "anom-j")
    proc = subprocess.run(
        [*SIGIL, "monitor", "--session", "anom-j", "--mode", "json", "--once"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    final = json.loads(proc.stdout.splitlines()[-1])
    assert final["loops"] == [
        {"run": 1, "component": "planning", "input_sha256": LOOP_INPUT, "starts": 5,
         "seqs": [1, 2, 3, 4, 5]}
    ]  # fmt: skip
    assert final["unknown_usage_calls"] == 1
    assert final["tokens_used"] == 1320  # the unknown call adds nothing, and is counted apart
    components = final["components"]
    assert components["planning"]["unknown_usage_calls"] == 1
    assert components["reasoning"]["unknown_usage_calls"] == 0
    assert components["reasoning"]["models"] == ["big-model", "small-model"]
    models = final["models"]
    assert set(models) == {"gpt-4o", "big-model", "small-model"}
    assert models["gpt-4o"]["calls"] == 2 and models["gpt-4o"]["unknown_usage_calls"] == 1
    assert models["gpt-4o"]["tokens"] == 120
    assert (models["big-model"]["tokens"], models["big-model"]["input_tokens"]) == (900, 800)


def test_minimal_names_unknown_usage_and_loops(env: dict[str, str], log_path: Path) -> None:
    anomalous_session(log_path, "anom-m")
    proc = subprocess.run(
        [*SIGIL, "monitor", "--session", "anom-m", "--mode", "minimal", "--once"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("Tokens:"))
    assert line == "Tokens: 1,320 / 10,000 (13.20%) complete | +1 unknown | loop: planning"
    # The final summary says both too.
    assert "Unknown:   1 call of unknown usage" in proc.stdout
    assert "Anomaly:   loop: planning started 5 times with the same input" in proc.stdout
