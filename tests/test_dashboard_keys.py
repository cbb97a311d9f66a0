"""The dashboard as a user drives it: keys, the terminal given back, alerts.

The real ``sigil monitor`` runs on a pseudo-terminal read by pyte (``tests/terminal.py``)
at 60x20, 80x24 and 120x40, while ``tests/monitor_writer.py`` writes a live session
through the real logger. Each key is pressed and the screen checked; after ``q``,
Ctrl-C, SIGTERM and an exception the terminal's settings are the ones it had
before, and nothing typed is left for the shell.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import SIGIL, cli_env
from terminal import Terminal
from test_monitor_e2e import Writer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

SIZES = [(60, 20), (80, 24), (120, 40)]


@pytest.fixture
def env(sigil_home: Path) -> dict[str, str]:
    return cli_env(sigil_home, TERM="xterm-256color")


@pytest.fixture
def started(env: dict[str, str], log_path: Path) -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def start(
        *args: str, cols: int = 80, rows: int = 24, argv: list[str] | None = None
    ) -> Terminal:
        command = argv or [*SIGIL, "monitor", "--refresh-rate", "0.02", *args]
        term = Terminal(command, env, cols, rows)
        opened.append(term)
        return term

    yield start
    for term in opened:
        term.close()


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
            w.kill()


def _step_start(session: str, component: str) -> str:
    """A raw ``step_start`` line (the writer has no command for it)."""
    line = {
        "timestamp": datetime.now(UTC).isoformat(),
        "session_id": session,
        "event_type": "step_start",
        "component": component,
        "message": f"{component.title()} started",
        "tokens": 0,
        "metadata": {},
    }
    return "raw " + json.dumps(line)


def _live_session(w: Writer, session: str) -> None:
    w("start 10000", "step routing 500 300", "step memory 1200 900", "tokens reasoning 300")
    w("error validation 50")
    w(_step_start(session, "reasoning"))


@pytest.mark.parametrize(("cols", "rows"), SIZES)
def test_each_key_changes_the_screen(
    started: Callable[..., Terminal], writer: Callable[[str], Writer], cols: int, rows: int
) -> None:
    session = f"keys-{cols}"
    w = writer(session)
    _live_session(w, session)
    term = started("--session", session, cols=cols, rows=rows)
    # A whole frame: a frame is written top to bottom and may be read half drawn.
    screen = term.wait_for(
        lambda t: "reasoning  attempt 1" in t and "! validation error" in t and "boom" in t
    )
    lines = screen.splitlines()
    assert len(lines) <= rows
    # Nothing essential cut, at every size: what runs now, tokens, burn, every
    # component, the error, the key hint on the last row.
    assert "Now     reasoning  attempt 1" in screen
    assert "Tokens  2,000 / 10,000 (20.00%)" in screen
    assert "Burn" in screen and "tok/min" in screen
    for name in ("routing", "memory", "reasoning", "validation"):
        assert name in screen
    assert "! validation error" in screen and "boom" in screen
    assert lines[-1].startswith("q quit  p pause  ? help")

    term.press("?")
    screen = term.wait_for("pause / resume the display")
    assert "Components" not in screen
    term.press("x")  # any key closes the help
    term.wait_for(lambda s: "Components" in s and "pause / resume" not in s)

    term.press("p")
    term.wait_for("PAUSED")
    w("step contracts 100 10")  # read while paused, not drawn
    term.press("p")
    term.wait_for(lambda s: "PAUSED" not in s and "2,100 / 10,000" in s)

    term.press("s")
    term.wait_for("Components (by tokens)")
    term.press("s")
    term.wait_for("Components (by allocation)")

    term.press("c")
    term.wait_for("▸")

    term.press("\x1b")  # Esc clears the component filter
    term.wait_for(lambda s: "▸" not in s)
    term.press("e")  # errors only: at every size, the table makes room for them
    screen = term.wait_for("Recent events (errors only")
    assert "Components" not in screen
    assert "validation: validation step failed" in screen
    term.press("e")
    term.wait_for("Components")
    if rows >= 24:  # the event list has room
        term.press("e")
        term.wait_for("errors only")
        term.press("e")
        term.press("\x1b")  # Esc clears every filter
        term.wait_for(lambda s: "errors only" not in s and "▸" not in s)
        term.press("/")
        term.wait_for("Enter apply")
        term.press("memory\r")
        screen = term.wait_for("/memory)")
        events = [
            line
            for line in screen[screen.index("Recent events") :].splitlines()[1:]
            if line.strip() and not line.startswith("q quit")
        ]
        assert events and all("memory" in line for line in events), screen
        term.press("\x1b")
        term.wait_for(lambda s: "/memory" not in s)
        w("burst 40 planning 1")  # more events than rows
        term.wait_for("planning step 39")
        term.press("\x1b[A")  # up: one event back
        term.wait_for("1 newer below")
        term.press("\x1b[5~")  # PgUp: a page back
        term.wait_for(lambda s: (m := re.search(r"(\d+) newer below", s)) and int(m[1]) > 1)
        term.press("\x1b[6~")  # PgDn
        term.wait_for("1 newer below")
        term.press("\x1b[B")
        term.wait_for(lambda s: "newer below" not in s and "planning step 39" in s)

    term.press("q")
    assert term.wait() == 0
    assert "Totals so far" in term.text()  # the summary (its title scrolled off at 20 rows)


@pytest.mark.parametrize("how", ["q", "ctrl-c", "sigterm", "exception"])
def test_the_terminal_is_restored(
    started: Callable[..., Terminal],
    writer: Callable[[str], Writer],
    env: dict[str, str],
    how: str,
) -> None:
    session = f"restore-{how}"
    w = writer(session)
    w("start 10000", "step routing 500 300")
    argv = None
    if how == "exception":
        # The real monitor, with a fault planted in its tail loop after the first frame.
        code = (
            "import sys\n"
            "from sigil.interfaces.cli import monitor\n"
            "def boom(self, state, snapshot):\n"
            "    raise RuntimeError('planted fault')\n"
            "monitor.ExecutionMonitor._take = boom\n"
            "from sigil.interfaces.cli.main import main\n"
            "sys.argv = ['sigil', 'monitor', '--refresh-rate', '0.02', '--session', "
            f"{session!r}]\n"
            "main()\n"
        )
        argv = [sys.executable, "-c", code]
    if how == "ctrl-c":
        # As from a shell: the terminal is the monitor's controlling terminal, so
        # Ctrl-C typed on it is a SIGINT (the monitor is a session leader here).
        code = (
            "import fcntl, os, sys, termios\n"
            "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
            "os.execv(sys.argv[1], sys.argv[1:])\n"
        )
        argv = [
            sys.executable, "-c", code, *SIGIL, "monitor", "--refresh-rate", "0.02",
            "--session", session,
        ]  # fmt: skip
    term = started("--session", session, argv=argv)
    before = term.tty_attrs()
    term.wait_for("q quit")
    during = term.tty_attrs()
    assert during[3] & termios.ECHO == 0 and during[3] & termios.ICANON == 0  # cbreak
    if how == "q":
        term.press("q")
        expected = {0}
    elif how == "ctrl-c":
        term.press("\x03")  # the terminal turns it into SIGINT
        expected = {130}
    elif how == "sigterm":
        term.proc.send_signal(signal.SIGTERM)
        expected = {143}
    else:
        w("step memory 10 10")  # the next event hits the fault
        expected = {1}
    term.press("echo leaked")  # typed while it exits: must not reach the shell
    assert term.wait() in expected
    after = term.tty_attrs()
    assert after == before
    assert term.pending_input() == 0
    assert "leaked" not in term.text()


def test_no_keys_leaves_the_terminal_alone(
    started: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("nokeys-1")
    w("start 10000", "step routing 500 300")
    term = started("--session", "nokeys-1", "--no-keys")
    before = term.tty_attrs()
    screen = term.wait_for("500 / 10,000")
    assert "q quit" not in screen
    assert term.tty_attrs()[3] == before[3]  # still canonical, still echoing
    w("complete")
    assert term.wait() == 0


def test_the_bell_rings_once_per_level_and_on_a_failed_step(
    started: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("bell-1")
    w("start 1000", "step routing 100 10")
    term = started("--session", "bell-1", "--follow")
    term.wait_for("100 / 1,000")

    def bells() -> int:
        with term.lock:
            return term.raw.count(b"\x07")

    assert bells() == 0
    w("step memory 450 10")  # 55 %: warning
    term.wait_for("550 / 1,000")
    w("step memory 10 10")  # still warning: no second bell
    term.wait_for("560 / 1,000")
    assert bells() == 1
    w("step reasoning 300 10")  # 86 %: critical
    term.wait_for("860 / 1,000")
    assert bells() == 2
    w("error validation 5")  # a failed step
    term.wait_for("! validation error")
    assert bells() == 3
    w("step reasoning 100 10")  # 96 %: exceeded
    term.wait_for("960 / 1,000")
    assert bells() == 4
    w("step reasoning 1 10")
    term.wait_for("961 / 1,000")
    assert bells() == 4
    term.press("q")
    assert term.wait() == 0


def test_dashboard_mode_needs_a_terminal(env: dict[str, str], sigil_home: Path) -> None:
    proc = subprocess.run(
        [*SIGIL, "monitor", "--session", "x-1", "--mode", "dashboard", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "terminal" in proc.stderr


def test_a_closed_pipe_exits_quietly(
    env: dict[str, str], writer: Callable[[str], Writer], log_path: Path
) -> None:
    w = writer("pipe-1")
    w("start 100000", "burst 3000 routing 1", "complete")
    w.finish()
    shell = f"{' '.join(SIGIL)} monitor --session pipe-1 --mode stream | head -1"
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shell],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stdout.splitlines()) == 1


def test_ctrl_z_gives_the_terminal_back_and_fg_takes_it_again(
    started: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("tstp-1")
    w("start 10000", "step routing 500 300")
    term = started("--session", "tstp-1")
    before = term.tty_attrs()
    term.wait_for("q quit")
    term.proc.send_signal(signal.SIGTSTP)
    deadline = time.monotonic() + 10
    while term.tty_attrs()[3] != before[3] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert term.tty_attrs() == before  # stopped: the terminal is the shell's again
    term.proc.send_signal(signal.SIGCONT)
    while term.tty_attrs()[3] & termios.ICANON and time.monotonic() < deadline:
        time.sleep(0.02)
    assert term.tty_attrs()[3] & termios.ICANON == 0  # back in cbreak, keys work
    term.press("p")
    term.wait_for("PAUSED")
    term.press("q")
    assert term.wait() == 0
    assert term.tty_attrs() == before


def test_control_characters_in_the_log_never_reach_the_terminal(
    started: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    """An event message holding escape sequences (clear screen, a bell, a title)
    is shown as text, its control characters dropped."""
    w = writer("ctl-1")
    line = {
        "timestamp": datetime.now(UTC).isoformat(),
        "session_id": "ctl-1",
        "event_type": "step_complete",
        "component": "routing",
        "message": "evil\x1b[2J\x07\x1b]0;pwned\x07 done",
        "tokens": 5,
        "metadata": {},
    }
    w("start 10000", "raw " + json.dumps(line))
    term = started("--session", "ctl-1", "--mode", "stream")
    screen = term.wait_for("evil")
    assert "evil[2J]0;pwned done" in screen
    with term.lock:
        raw = bytes(term.raw)
    assert b"\x07" not in raw and b"\x1b[2J" not in raw and b"\x1b]0;" not in raw
    w("complete")
    assert term.wait() == 0


def test_now_running_ticks_every_frame_then_says_stalled(
    started: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    """During a long model call nothing arrives, yet the screen moves: the step in
    flight, its attempt, its running time; then "stalled Ns"."""
    w = writer("now-1")
    w("start 10000", "step routing 500 300", _step_start("now-1", "reasoning"))
    term = started("--session", "now-1", cols=80, rows=24)

    def running(screen: str) -> float | None:
        m = re.search(r"Now     reasoning  attempt 1  (\d+\.\d)s", screen)
        return float(m[1]) if m else None

    first = running(term.wait_for(lambda s: running(s) is not None))
    assert first is not None
    later = running(term.wait_for(lambda s: (r := running(s)) is not None and r >= first + 2))
    assert later is not None and later >= first + 2
    term.wait_for(re.compile(r"attempt 1  \d+\.\ds  stalled \d+s").search, timeout=20)
    w("step reasoning 300 5000")
    screen = term.wait_for(lambda s: "between steps" in s and "stalled" not in s)
    assert "800 / 10,000" in screen
    term.press("q")
    assert term.wait() == 0


def test_waiting_uses_normal_colours_and_a_running_clock(
    started: Callable[..., Terminal], env: dict[str, str]
) -> None:
    env.pop("NO_COLOR", None)
    term = started("--session", "later-1", cols=80, rows=24)
    screen = term.wait_for("WAITING FOR LOG")
    clock = re.compile(r"(\d\d:\d\d:\d\d)$")
    first = clock.search(screen.splitlines()[0])
    assert first is not None
    term.wait_for(lambda s: (m := clock.search(s.splitlines()[0])) is not None and m[1] != first[1])
    with term.lock:
        raw = bytes(term.raw)
    # Component names in the table are bold, not the error style (bold red).
    assert b"\x1b[1mrouting" in raw or b"\x1b[1mrouting " in raw
    assert b"\x1b[1;31m" not in raw
    term.press("q")
    assert term.wait() == 0


def test_an_alert_runs_the_configured_command(
    started: Callable[..., Terminal],
    writer: Callable[[str], Writer],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    got = tmp_path / "alerts.txt"
    env["SIGIL_ALERT_COMMAND"] = f"sh -c 'echo \"$0\" >> {got}'"
    w = writer("alert-1")
    w("start 1000", "step routing 100 10")
    term = started("--session", "alert-1")
    term.wait_for("100 / 1,000")
    w("step memory 500 10")
    term.wait_for("600 / 1,000")
    deadline = time.monotonic() + 10
    while not got.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got.read_text() == "sigil alert-1: budget warning\n"
    term.press("q")
    assert term.wait() == 0


def test_the_configured_alert_command_runs_once_per_level_with_its_facts_in_the_environment(
    started: Callable[..., Terminal],
    writer: Callable[[str], Writer],
    sigil_home: Path,
    tmp_path: Path,
) -> None:
    """``monitoring.alert_command`` in config.yaml: run once per level, detached,
    the level and session given as environment variables (never through a shell
    string built from the log's text)."""
    got = tmp_path / "alerts.txt"
    script = tmp_path / "alert.sh"
    script.write_text(
        '#!/bin/sh\nprintf "%s|%s|%s\\n" "$SIGIL_ALERT_LEVEL" "$SIGIL_SESSION_ID" "$1"'
        f' >> "{got}"\n'
    )
    script.chmod(0o755)
    sigil_home.mkdir(parents=True, exist_ok=True)
    (sigil_home / "config.yaml").write_text(f"monitoring:\n  alert_command: {script}\n")
    w = writer("alert-2")
    w("start 1000", "step routing 100 10")
    term = started("--session", "alert-2", "--follow")
    term.wait_for("100 / 1,000")
    w("step memory 450 10")  # warning
    term.wait_for("550 / 1,000")
    w("step reasoning 400 10")  # 95 %: critical and exceeded at once
    term.wait_for("950 / 1,000")

    def lines() -> list[str]:
        return got.read_text().splitlines() if got.exists() else []

    deadline = time.monotonic() + 10
    while len(lines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    w("step reasoning 1 10")
    term.wait_for("951 / 1,000")
    time.sleep(0.3)
    assert sorted(lines()) == sorted([
        "warning|alert-2|sigil alert-2: budget warning",
        "critical|alert-2|sigil alert-2: budget critical",
        "exceeded|alert-2|sigil alert-2: budget exceeded",
    ])  # fmt: skip
    term.press("q")
    assert term.wait() == 0


@pytest.mark.parametrize("command", ["/nonexistent/notify", "sh -c 'exit 3'"])
def test_a_failing_alert_command_is_shown_once_not_a_traceback(
    started: Callable[..., Terminal],
    writer: Callable[[str], Writer],
    env: dict[str, str],
    command: str,
) -> None:
    env["SIGIL_ALERT_COMMAND"] = command
    w = writer("alert-3")
    w("start 1000", "step routing 100 10")
    term = started("--session", "alert-3", "--follow", cols=100)
    term.wait_for("100 / 1,000")
    w("step memory 450 10")  # warning: the command fails
    term.wait_for("alert command failed")
    w("step reasoning 300 10")  # critical: fails again, not shown again
    term.wait_for("850 / 1,000")
    time.sleep(0.5)
    screen = term.text()
    assert screen.count("alert command failed") == 1
    assert "Traceback" not in screen
    term.press("q")
    assert term.wait() == 0
    with term.lock:
        assert b"Traceback" not in term.raw
