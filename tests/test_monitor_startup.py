"""``sigil monitor`` starts its catch-up early (issue 9: --once on 1M entries < 200 ms).

The catch-up is one native fold without the GIL, so the monitor starts it as soon
as it knows the session's log and imports the display meanwhile; the session
model built afterwards takes that fold over. These tests pin what must not
change: the numbers are the same as a fresh fold's, the file is folded once, and
nothing is started for a log that is missing or not a regular file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from sigil.telemetry import log_parser, session_tailer
from sigil.telemetry.log_parser import SessionModel, start_catch_up


def _event(seq: int, tokens: int, event_type: str = "step_complete") -> bytes:
    return orjson.dumps(
        {
            "timestamp": f"2026-01-11T10:15:{seq % 60:02d}.000000+00:00",
            "session_id": "s1",
            "event_type": event_type,
            "component": ("routing", "memory", "reasoning")[seq % 3],
            "message": f"step {seq}",
            "tokens": tokens,
            "metadata": {"latency_ms": 10.5 + seq} if seq else {"budget": 100_000},
            "seq": seq,
        }
    )


def _write(path: Path, seqs: range) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        for seq in seqs:
            kind = "session_start" if seq == 0 else "step_complete"
            f.write(_event(seq, 0 if seq == 0 else 7 + seq % 5, kind) + b"\n")


@pytest.fixture(autouse=True)
def _collector_unfrozen() -> Any:
    """The entry point run in this process freezes what exists then (start-up's
    objects): give this test process's own objects back to the collector."""
    import gc

    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _no_leftover_catch_ups() -> Any:
    yield
    for key in list(session_tailer._CATCH_UPS):
        session_tailer._CATCH_UPS.pop(key).join()


def test_a_catch_up_started_ahead_is_taken_over_and_equals_a_fresh_fold(tmp_path: Path) -> None:
    log = tmp_path / "sessions" / "s1" / "execution.jsonl"
    _write(log, range(0, 3000))
    assert start_catch_up("s1", tmp_path, last_n=10)
    assert not start_catch_up("s1", tmp_path, last_n=10)  # one per session and model
    _write(log, range(3000, 3100))  # lands while (or after) the catch-up runs

    model = SessionModel("s1", tmp_path, last_n=10)
    assert not session_tailer._CATCH_UPS
    snap = model.update()
    fresh = SessionModel("s1", tmp_path, last_n=10).update()
    assert snap.to_dict() == fresh.to_dict()
    assert snap.entries == 3100
    assert [e.seq for e in snap.last_entries] == list(range(3090, 3100))
    assert model.tailer.stats()["lines"] == 3100  # every line read once

    _write(log, range(3100, 3105))  # and it goes on tailing where it stopped
    assert model.update().entries == 3105


def test_a_catch_up_for_other_arguments_is_not_taken(tmp_path: Path) -> None:
    _write(tmp_path / "sessions" / "s1" / "execution.jsonl", range(0, 50))
    assert start_catch_up("s1", tmp_path, last_n=5)
    snap = SessionModel("s1", tmp_path, last_n=7).update()
    assert len(snap.last_entries) == 7
    assert len(session_tailer._CATCH_UPS) == 1  # still waiting for its own model


@pytest.mark.parametrize("kind", ["missing", "fifo", "symlink", "directory", "bad id"])
def test_no_catch_up_for_a_log_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    session = tmp_path / "sessions" / "s1"
    session.mkdir(parents=True)
    log = session / "execution.jsonl"
    if kind == "fifo":
        os.mkfifo(log)
    elif kind == "symlink":
        real = tmp_path / "real.jsonl"
        _write(real, range(0, 5))
        log.symlink_to(real)
    elif kind == "directory":
        log.mkdir()
    session_id = "../s1" if kind == "bad id" else "s1"
    assert not start_catch_up(session_id, tmp_path)
    assert not session_tailer._CATCH_UPS


def test_monitor_once_folds_the_log_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command starts the catch-up; the monitor's model takes it over: one
    tailer, one pass over the file, the same numbers as the log."""
    logs = tmp_path / "logs"
    _write(logs / "sessions" / "s1" / "execution.jsonl", range(0, 2000))
    monkeypatch.setenv("SIGIL_HOME", str(tmp_path / "home"))
    tailers: list[log_parser.SessionTailer] = []
    real_init = log_parser.SessionTailer.__init__

    def counting_init(self: log_parser.SessionTailer, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        tailers.append(self)

    monkeypatch.setattr(log_parser.SessionTailer, "__init__", counting_init)
    argv = ["monitor", "--session", "s1", "--log-path", str(logs), "--mode", "json", "--once"]
    monkeypatch.setattr(sys, "argv", ["sigil", *argv])
    from sigil.interfaces.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1  # incomplete: no writer, no final event
    first = orjson.loads(capsys.readouterr().out.splitlines()[0])
    assert first["events"] == 2000
    assert first["tokens_used"] == sum(7 + seq % 5 for seq in range(1, 2000))
    assert len(tailers) == 1
    assert tailers[0].stats()["lines"] == 2000
    assert not session_tailer._CATCH_UPS


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["monitor", "--session", "a", "--once"], {"session": "a", "once": ""}),
        (
            ["monitor", "-s", "a", "-l", "/x", "-mjson"],
            {"session": "a", "log_path": "/x", "mode": "json"},
        ),
        (
            ["monitor", "--session=a", "--log-path=/x", "-f"],
            {"session": "a", "log_path": "/x", "follow": ""},
        ),
        (["monitor", "-sa", "-s", "b"], {"session": "b"}),  # the last one wins, as in click
        (["monitor"], {}),
        (["monitor", "--session", "a", "--help"], None),
        (["monitor", "--session", "a", "--bogus"], None),
        (["monitor", "--session"], None),
        (["monitor", "--once", "--follow", "-s", "a"], None),
        (["monitor", "-s", "a", "--mode", "bogus"], None),
        (["monitor", "-s", "a", "--mode", "dashboard"], None),  # not a terminal here
        (["monitor", "-s", "a", "--no-keys"], {"session": "a", "no_keys": ""}),
        (["monitor", "a"], None),
        # The event options (issue 12): what the command accepts starts the fold early.
        (["monitor", "-s", "a", "--all"], {"session": "a", "all": ""}),
        (
            ["monitor", "-s", "a", "--tail", "5", "--component", "x", "--errors"],
            {"session": "a", "tail": "5", "component": "x", "errors": ""},
        ),
        (
            ["monitor", "-s", "a", "-m", "json", "--json-events", "--event-type", "t"],
            {"session": "a", "mode": "json", "json_events": "", "event_type": "t"},
        ),
        (["monitor", "-s", "a", "--tail", "-1"], None),
        (["monitor", "-s", "a", "--all", "--tail", "1"], None),
        (["monitor", "-s", "a", "--component", ""], None),
        (["monitor", "-s", "a", "--json-events"], None),
        (["monitor", "-s", "a", "-m", "minimal", "--errors"], None),
        (["monitor", "-s", "a", "-m", "json", "--all"], None),
        (["monitor", "-s", "a", "--since", "10m"], None),
        (["sessions", "--session", "a"], None),
        ([], None),
    ],
)
def test_the_entry_point_reads_only_a_plain_monitor_command_line(
    args: list[str], expected: dict[str, str] | None
) -> None:
    from sigil.interfaces.cli.early import _monitor_options

    assert _monitor_options(args) == expected


_PROBE = """
import sys
from sigil.telemetry import session_tailer
real = session_tailer.start_catch_up
def probe(*args, **kwargs):
    started = real(*args, **kwargs)
    print("start_catch_up", started, "click" in sys.modules, file=sys.stderr)
    return started
session_tailer.start_catch_up = probe
from sigil.interfaces.cli.main import main
sys.argv = ["sigil", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("how", ["flag", "env", "default", "current link", "config file"])
def test_the_catch_up_starts_before_click_is_imported(tmp_path: Path, how: str) -> None:
    """From the command line alone: --log-path, else $SIGIL_LOG_PATH, else the
    default path when no config.yaml could name another; without --session,
    --once reads the session current.jsonl links to."""
    import subprocess

    home = tmp_path / "home"
    logs = home / "logs" if how in ("default", "current link", "config file") else tmp_path / "l"
    _write(logs / "sessions" / "s1" / "execution.jsonl", range(0, 500))
    env = {**os.environ, "SIGIL_HOME": str(home), "NO_COLOR": "1"}
    env.pop("SIGIL_LOG_PATH", None)
    args = ["monitor", "--session", "s1", "--mode", "json", "--once"]
    if how == "flag":
        args += ["--log-path", str(logs)]
    elif how == "env":
        env["SIGIL_LOG_PATH"] = str(logs)
    elif how == "current link":
        args = ["monitor", "--once", "--mode", "json"]
        (logs / "current.jsonl").symlink_to(logs / "sessions" / "s1" / "execution.jsonl")
    elif how == "config file":
        (home / "config.yaml").write_text(f"logging:\n  path: {logs}\n")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 1, proc.stderr  # incomplete: no writer, no final event
    calls = [line.split()[1:] for line in proc.stderr.splitlines() if line.startswith("start_")]
    # With a config file (which may name another log path) the command starts it
    # once it has read the settings: json --once runs without click either way.
    assert calls[0] == ["True", "False"], proc.stderr
    assert all(started == "False" for started, _ in calls[1:]), proc.stderr
    assert orjson.loads(proc.stdout.splitlines()[0])["events"] == 500


@pytest.mark.parametrize(
    "args", [["--mode", "json", "--once"], ["--mode", "bogus", "--once"], ["--once", "--follow"]]
)
def test_the_collector_is_back_on_after_the_monitor_starts_or_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """The entry point pauses the garbage collector for the start-up only: it is on
    again when the monitor runs, and after a usage error."""
    import gc

    logs = tmp_path / "logs"
    _write(logs / "sessions" / "s1" / "execution.jsonl", range(0, 20))
    monkeypatch.setenv("SIGIL_HOME", str(tmp_path / "home"))
    from sigil.interfaces.cli import display

    seen: list[bool] = []
    real_caught_up = display.JsonRenderer.caught_up

    def caught_up(self: display.JsonRenderer, *a: Any) -> None:
        seen.append(gc.isenabled())
        real_caught_up(self, *a)

    monkeypatch.setattr(display.JsonRenderer, "caught_up", caught_up)
    argv = ["sigil", "monitor", "--session", "s1", "--log-path", str(logs), *args]
    monkeypatch.setattr(sys, "argv", argv)
    from sigil.interfaces.cli.main import main

    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
    with pytest.raises(SystemExit):
        main()
    assert gc.isenabled()
    assert seen == ([True] if args[1:2] == ["json"] else [])
    # What start-up made is frozen: no collection walks it again (the first
    # one after the pause would have, on the way to the first frame).
    assert gc.get_freeze_count() > 0


# -- the dashboard's first frame comes before the event loop (issue 12's numbers) --------

_FIRST_FRAME_PROBE = """
import os, signal, sys, time
from sigil.interfaces.cli import display, monitor
report = open(os.environ["PROBE_REPORT"], "w", buffering=1)
real_caught_up = display.DashboardRenderer.caught_up
def caught_up(self, state, phase):
    # What is loaded, and the keys, as the first frame of the session is drawn.
    print("caught_up", "asyncio" in sys.modules, self.view.keys, state.entries, file=report)
    with open(os.environ["PROBE_REPORT"] + ".click", "w") as f:
        print("click" in sys.modules, file=f)
    real_caught_up(self, state, phase)
display.DashboardRenderer.caught_up = caught_up
real_run = monitor.ExecutionMonitor.run
def run(self):
    import gc
    print("run", "asyncio" in sys.modules, gc.isenabled(), file=report)  # the collector is back
    return real_run(self)
monitor.ExecutionMonitor.run = run
plant = os.environ.get("PROBE_PLANT")
real_open = monitor.ExecutionMonitor._open
def planted_open(self, session_id):
    if plant:
        # In cbreak mode now: wait until the test has typed, then cut it short.
        print("open", file=report)
        while not os.path.exists(os.environ["PROBE_REPORT"] + ".go"):
            time.sleep(0.01)
    if plant == "raise":
        raise RuntimeError("planted fault in the catch-up")
    if plant in ("SIGTERM", "SIGINT"):
        os.kill(os.getpid(), getattr(signal, plant))  # arrives during the catch-up
    return real_open(self, session_id)
monitor.ExecutionMonitor._open = planted_open
from sigil.interfaces.cli.main import main
sys.argv = ["sigil", *sys.argv[1:]]
main()
"""


def _says(report: Path, word: str) -> bool:
    try:
        return word in report.read_text().split()
    except FileNotFoundError:
        return False


def _first_frame_terminal(
    tmp_path: Path, plant: str = "", extra: tuple[str, ...] = ()
) -> tuple[Any, Path]:
    sys.path.insert(0, str(Path(__file__).parent))
    from terminal import Terminal

    logs = tmp_path / "logs"
    _write(logs / "sessions" / "s1" / "execution.jsonl", range(0, 500))
    report = tmp_path / "probe.txt"
    env = {**os.environ, "SIGIL_HOME": str(tmp_path / "home"), "NO_COLOR": "1"}
    env.update(TERM="xterm-256color", PROBE_REPORT=str(report), PROBE_PLANT=plant)
    env.pop("SIGIL_LOG_PATH", None)
    argv = [sys.executable, "-c", _FIRST_FRAME_PROBE, "monitor", "--session", "s1",
            "--log-path", str(logs), "--refresh-rate", "0.02", *extra]  # fmt: skip
    return Terminal(argv, env, 100, 30), report


@pytest.mark.timeout(60)
def test_the_dashboard_draws_its_first_frame_before_asyncio_is_imported(tmp_path: Path) -> None:
    """Keys on (cbreak), the session caught up and drawn, and only then the event
    loop: asyncio's import is not on the way to the first frame (and the garbage
    collector the entry point paused is on again when the loop runs)."""
    import termios

    term, report = _first_frame_terminal(tmp_path)
    try:
        before = term.tty_attrs()
        term.wait_for(lambda s: "q quit" in s and "500 events" in s)
        assert report.read_text().split()[:4] == ["caught_up", "False", "True", "500"]
        assert term.tty_attrs()[3] & (termios.ICANON | termios.ECHO) == 0
        term.press("p")  # the keys typed go to the loop that took over
        term.wait_for("PAUSED")
        assert report.read_text().split()[4:] == ["run", "True", "True"]
        term.press("q")
        assert term.wait() == 0
        assert term.tty_attrs() == before
    finally:
        term.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("plant", "expected"), [("SIGTERM", 143), ("SIGINT", 130), ("raise", 1)])
def test_the_terminal_is_restored_when_the_first_frame_is_cut_short(
    tmp_path: Path, plant: str, expected: int
) -> None:
    """A signal or an exception during the catch-up that comes before the event
    loop: the exit code of the signal (or 1), the terminal as it was."""
    import time

    term, report = _first_frame_terminal(tmp_path, plant)
    try:
        before = term.tty_attrs()
        deadline = time.monotonic() + 30
        while not _says(report, "open") and time.monotonic() < deadline:
            time.sleep(0.02)
        term.press("echo leaked")  # typed while it catches up: must not reach the shell
        time.sleep(0.1)
        Path(f"{report}.go").touch()
        assert term.wait() == expected, term.text()
        assert term.tty_attrs() == before
        assert term.pending_input() == 0
        assert "leaked" not in term.text()
    finally:
        term.close()


# -- a plain dashboard command line runs without click (issue 12's numbers) ------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "extra", [(), ("--mode", "dashboard", "--follow"), ("-m", "dashboard", "--no-keys")]
)
def test_a_plain_dashboard_command_line_draws_its_first_frame_without_click(
    tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """``sigil monitor -s ID`` on a terminal: click's import is not on the way to
    the first frame (the entry point runs the command itself)."""
    term, report = _first_frame_terminal(tmp_path, extra=extra)
    try:
        term.wait_for(lambda s: "500 events" in s)
        assert Path(f"{report}.click").read_text().split() == ["False"]
        term.press("q")
        if "--no-keys" in extra:
            term.proc.send_signal(__import__("signal").SIGINT)
            assert term.wait() == 130
        else:
            assert term.wait() == 0
    finally:
        term.close()


#: ``python -c _ENTRY WHICH REPORT ARGS...``: the command line ARGS run by the
#: entry point (WHICH ``main``) or by the click command (``click``), as the entry
#: point ran every command line before; unless REPORT is ``-``, whether click
#: was imported is written there at exit.
_ENTRY = """
import atexit, sys
which = sys.argv.pop(1)
report = sys.argv.pop(1)
sys.argv = ["sigil", *sys.argv[1:]]
if report != "-":
    atexit.register(lambda: open(report, "w").write(str("click" in sys.modules)))
if which == "main":
    from sigil.interfaces.cli.main import main
    main()
else:
    from sigil.interfaces.cli.group import run
    run()
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "case",
    [
        "--help",
        "-h",
        "--bogus",
        "-s ../up",
        "-s",
        "--refresh-rate 0",
        "-r soon",
        "--mode fancy",
        "--once --follow",
        "--log-path FILE",
        "--log-path=FILE",
        "bad config",
        "--mode stream --tail x",
    ],
)
def test_the_command_line_on_a_terminal_reads_as_the_click_command_does(
    tmp_path: Path, case: str
) -> None:
    """Help, a typo, a value the command refuses, a bad setting: the same screen and
    exit code as the click command (the entry point leaves them to it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from terminal import Terminal

    logs = tmp_path / "logs"
    _write(logs / "sessions" / "s1" / "execution.jsonl", range(0, 20))
    home = tmp_path / "home"
    home.mkdir()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    env = {**os.environ, "SIGIL_HOME": str(home), "NO_COLOR": "1", "TERM": "xterm-256color"}
    env.pop("SIGIL_LOG_PATH", None)
    args = ["monitor", "-s", "s1", "--log-path", str(logs)]
    if case == "bad config":
        (home / "config.yaml").write_text("monitoring:\n  refresh_rate_hz: fast\n")
    elif case == "-s":
        args = [*args, "-s"]
    else:
        words = case.replace("FILE", str(not_a_dir)).split()
        args = [*args, *words] if "log-path" not in case else ["monitor", "-s", "s1", *words]
    seen = []
    for which in ("main", "click"):
        term = Terminal([sys.executable, "-c", _ENTRY, which, "-", *args], env, 100, 40)
        try:
            code = term.wait(30)
            seen.append((code, bytes(term.raw)))
        finally:
            term.close()
    assert seen[0] == seen[1]
    assert seen[0][0] in (0, 2), seen[0]
    if case not in ("--help", "-h"):
        assert seen[0][1].decode().startswith("Error: "), seen[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "case",
    [
        "--mode json --once",
        "-m json --once -r 0.5",
        "--once --mode=json",
        "--mode json --once -s nope",
    ],
)
def test_json_once_runs_without_click_and_writes_what_the_click_command_writes(
    tmp_path: Path, case: str
) -> None:
    """Issue 9's 1M-entry row, ``sigil monitor -s ID --mode json --once``: the
    entry point runs it without importing click, with the same output, errors
    and exit code as the click command."""
    import subprocess

    logs = tmp_path / "logs"
    _write(logs / "sessions" / "s1" / "execution.jsonl", range(0, 300))
    env = {**os.environ, "SIGIL_HOME": str(tmp_path / "home"), "NO_COLOR": "1", "TZ": "UTC"}
    env.pop("SIGIL_LOG_PATH", None)
    words = case.split()
    if "-s" not in words:
        words = ["--session", "s1", *words]
    results = {}
    for which in ("main", "click"):
        report = tmp_path / f"{which}.click"
        argv = [sys.executable, "-c", _ENTRY, which, str(report), "monitor",
                "--log-path", str(logs), *words]  # fmt: skip
        proc = subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False)
        results[which] = (proc.returncode, proc.stdout, proc.stderr, report.read_text())
    code, out, err, click_loaded = results["main"]
    assert (code, out, err) == results["click"][:3]
    if "nope" in case:  # no such session: one line, from the same code either way
        assert code != 0 and b"no log for session nope" in err
    else:
        # exit 1: the writer stopped without a final event (an incomplete session)
        assert code == 1 and orjson.loads(out.splitlines()[0])["session_id"] == "s1"
        assert click_loaded == "False"
