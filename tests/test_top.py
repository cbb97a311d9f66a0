"""``sigil top`` (and ``sigil sessions --watch``): every live session in one
table, refreshed live, driven on a real pseudo-terminal read by pyte while
``tests/monitor_writer.py`` writes sessions through the real logger (issue 12)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SIGIL, cli_env
from terminal import Terminal
from test_monitor_e2e import Writer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def env(sigil_home: Path) -> dict[str, str]:
    return cli_env(sigil_home, TERM="xterm-256color")


@pytest.fixture
def writers(env: dict[str, str], log_path: Path) -> Iterator[dict[str, Writer]]:
    opened: dict[str, Writer] = {}
    for name, steps in (("alpha", ["step routing 100", "step memory 400"]), ("beta", [])):
        w = Writer(name, log_path, env)
        w("start 10000 1", *steps)
        opened[name] = w
    yield opened
    for w in opened.values():
        if w.proc.poll() is None:
            w.kill()


def _row(screen: str, session: str) -> list[str]:
    for line in screen.splitlines():
        if line.split()[:1] == [session]:
            return line.split()
    raise AssertionError(f"no row for {session}:\n{screen}")


def test_once_lists_every_live_session_from_its_model(
    env: dict[str, str], log_path: Path, writers: dict[str, Writer]
) -> None:
    proc = subprocess.run(
        [*SIGIL, "top", "--once", "--json", "--log-path", str(log_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["session_id"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == {"alpha", "beta"}
    assert rows["alpha"]["tokens_used"] == 500 and rows["alpha"]["budget"] == 10000
    assert rows["alpha"]["status"] == "running" and rows["alpha"]["live"] is True
    assert rows["alpha"]["budget_fraction"] == pytest.approx(0.05)
    assert rows["beta"]["tokens_used"] == 0
    # A session whose writer is gone is not live.
    writers["beta"].finish()
    proc = subprocess.run(
        [*SIGIL, "top", "--once", "--log-path", str(log_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:]] == ["alpha"]


def test_the_live_table_follows_sessions_and_keys(
    env: dict[str, str], log_path: Path, writers: dict[str, Writer]
) -> None:
    term = Terminal(
        [*SIGIL, "top", "--refresh-rate", "0.1", "--log-path", str(log_path)], env, 100, 24
    )
    try:
        screen = term.wait_for(lambda t: "alpha" in t and "beta" in t, timeout=30)
        assert "2 live sessions" in screen
        assert _row(screen, "alpha")[3] == "500"
        # New events reach the table at the next refresh.
        writers["beta"]("step reasoning 2500")
        screen = term.wait_for(lambda t: "2,500" in t, timeout=30)
        lines = [line.split()[0] for line in screen.splitlines() if line.split()[:1]]
        assert lines.index("beta") < lines.index("alpha")  # sorted by tokens
        # s cycles the sort (tokens -> budget -> rate -> errors -> session).
        for order in ("budget", "rate", "errors", "session"):
            term.press("s")
            term.wait_for(f"sort: {order}", timeout=10)
        screen = term.text()
        lines = [line.split()[0] for line in screen.splitlines() if line.split()[:1]]
        assert lines.index("alpha") < lines.index("beta")
        # Enter opens the selected session's monitor; q there comes back to top.
        term.press("\r")
        screen = term.wait_for("SIGIL MONITOR", timeout=30)
        assert "alpha" in screen.splitlines()[0]
        term.press("q")
        term.wait_for("SIGIL TOP", timeout=30)
        # A writer that ends: listed with its final status, no longer live.
        writers["alpha"]("complete")
        writers["alpha"].finish()
        screen = term.wait_for(lambda t: "1 live session " in t, timeout=30)
        assert _row(screen, "alpha")[1] == "complete"
        term.press("q")
        assert term.wait(30) == 0
    finally:
        term.close()
    # The terminal is given back as it was: the alternate screen left, cursor shown.
    raw = bytes(term.raw)
    assert raw.rfind(b"\x1b[?1049l") > raw.rfind(b"\x1b[?1049h") >= 0
    assert raw.rfind(b"\x1b[?25h") > raw.rfind(b"\x1b[?25l")


def test_sigterm_gives_the_terminal_back(
    env: dict[str, str], log_path: Path, writers: dict[str, Writer]
) -> None:
    term = Terminal([*SIGIL, "sessions", "--watch", "--log-path", str(log_path)], env, 80, 24)
    try:
        term.wait_for("alpha", timeout=30)
        term.proc.send_signal(signal.SIGTERM)
        assert term.wait(30) == 143
    finally:
        term.close()
    raw = bytes(term.raw)
    assert raw.rfind(b"\x1b[?1049l") > raw.rfind(b"\x1b[?1049h") >= 0


def test_without_a_terminal_it_says_so(env: dict[str, str], log_path: Path) -> None:
    for argv in (["top"], ["top", "--json"], ["sessions", "--watch", "--json"]):
        proc = subprocess.run(
            [*SIGIL, *argv, "--log-path", str(log_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2, (argv, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert proc.stdout == ""


def test_unknown_usage_and_loops_in_the_table_and_json(log_path: Path, env: dict[str, str]) -> None:
    """Issues 13 and 14: a live session in a loop is marked in STATUS, its calls
    of unknown usage counted beside its tokens, in the table and in --json."""
    from sigil.core.locks import SessionLock
    from test_monitor_modes import anomalous_session

    session_dir = anomalous_session(log_path, "anom", final=False)
    argv = [*SIGIL, "top", "--once", "--log-path", str(log_path)]
    with SessionLock(session_dir):
        table = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        as_json = subprocess.run(
            [*argv, "--json"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    assert table.returncode == 0 and as_json.returncode == 0, table.stderr + as_json.stderr
    line = next(x for x in table.stdout.splitlines() if x.startswith("anom "))
    assert " running+loop " in line and "1,320 +1 unknown" in line
    (row,) = json.loads(as_json.stdout)
    assert row["status"] == "running" and row["tokens_used"] == 1320
    assert row["unknown_usage_calls"] == 1
    assert [(lp["component"], lp["starts"]) for lp in row["loops"]] == [("planning", 5)]
