"""``sigil monitor`` end to end: the real command in a real pseudo-terminal.

Each test runs ``python -m sigil monitor`` on the slave side of a pty and feeds
what it writes to the pyte terminal emulator, then asserts on the *screen*, as a
user would read it. The session is written by another process: the real
``sigil orchestrate`` where one is installed, or ``tests/monitor_writer.py``,
which writes through the real ExecutionLogger and holds the real session lock
but lets the test decide exactly when each event lands.

The numbers on the final screen are checked against the truth every time: the
orchestrator's ``tokens.json``, or the writer's own running total.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import SIGIL, cli_env
from terminal import Terminal

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

WRITER = [sys.executable, str(Path(__file__).with_name("monitor_writer.py"))]
COLOR_SGR = re.compile(rb"\x1b\[[0-9;]*(3[0-9]|9[0-7]|38;)[0-9;]*m")


class Writer:
    """``tests/monitor_writer.py``: one command in, ``ok <total tokens>`` out."""

    def __init__(self, session: str, log_path: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*WRITER, "--session", session, "--log-path", str(log_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert self._line() == "ready"
        self.total = 0

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def __call__(self, *commands: str) -> int:
        assert self.proc.stdin is not None
        for command in commands:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            reply = self._line()
            assert reply.startswith("ok "), reply
            self.total = int(reply.split()[1])
        return self.total

    def finish(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.close()
        assert self.proc.wait(10) == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def env(sigil_home: Path) -> dict[str, str]:
    return cli_env(sigil_home, TERM="xterm-256color")


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for term in opened:
        term.close()


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    opened: list[Writer] = []
    yield opened
    for writer in opened:
        if writer.proc.poll() is None:
            writer.kill()


@pytest.fixture
def monitor(env: dict[str, str], terminals: list[Terminal]) -> Callable[..., Terminal]:
    def start(*args: str, cols: int = 100, rows: int = 50, **extra_env: str | None) -> Terminal:
        run_env = dict(env)
        for key, value in extra_env.items():
            if value is None:
                run_env.pop(key, None)
            else:
                run_env[key] = value
        term = Terminal([*SIGIL, "monitor", "--refresh-rate", "0.02", *args], run_env, cols, rows)
        terminals.append(term)
        return term

    return start


@pytest.fixture
def writer(env: dict[str, str], log_path: Path, writers: list[Writer]) -> Callable[[str], Writer]:
    def start(session: str) -> Writer:
        w = Writer(session, log_path, env)
        writers.append(w)
        return w

    return start


def summary_numbers(screen: str) -> dict[str, Any]:
    """The final summary's numbers, as shown on the screen."""
    tail = screen[screen.rindex("Session:") :]
    used, budget = re.search(r"Tokens:\s+([\d,]+) / ([\d,]+)", tail).groups()  # type: ignore[union-attr]
    components = {
        name: int(tokens.replace(",", ""))
        for name, tokens in re.findall(r"^\s+(\w+)\s+([\d,]+) tok", tail, re.M)
        if tokens != "0"  # tokens.json lists every allocated component; compare what was used
    }
    counts = {
        key.lower(): int(value.replace(",", ""))
        for key, value in re.findall(r"^(Events|Malformed|Rotations):\s+([\d,]+)", tail, re.M)
    }
    return {
        "used": int(used.replace(",", "")),
        "budget": int(budget.replace(",", "")),
        "components": components,
        **counts,
    }


def session_truth(log_path: Path, session: str) -> dict[str, Any]:
    """What the log holds, folded natively (the writer's side of the truth)."""
    from sigil.telemetry.log_parser import fold_session

    summary = fold_session(session, log_path)
    return {
        "used": summary.tokens_used,
        "components": {
            k: c.tokens for k, c in summary.components.items() if c.tokens or c.operations
        },
    }


# -- the writer-driven scenarios ---------------------------------------------------------


def test_a_quiet_live_run_shows_stalled_then_the_rate_again(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    """During a long model call nothing arrives: the dashboard, redrawn without new
    events, says "stalled" (the model's recent rate decays); the next event clears it."""
    term = monitor("--session", "quiet-1")
    w = writer("quiet-1")
    w("start 100000", "step routing 500 10")
    term.wait_for(lambda s: "RUNNING" in s and "Burn" in s)
    screen = term.wait_for("stalled", timeout=20)
    rate = re.search(r"Burn\s+([\d,]+) tok/min .*avg", screen)
    assert rate is not None, screen
    w("step memory 200 10")
    term.wait_for(lambda s: "700 / 100,000" in s and "stalled" not in s)
    w("complete")
    assert term.wait() == 0


def test_monitor_started_first_follows_the_whole_run(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer], log_path: Path
) -> None:
    term = monitor("--session", "live-1")
    term.wait_for("WAITING FOR LOG")
    assert (log_path / "monitor.pid").read_text().strip() == str(term.proc.pid)
    w = writer("live-1")
    term.wait_for("WAITING FOR START")
    w("start 2000", "step routing 50 1100")
    term.wait_for(lambda s: "RUNNING" in s and "50 / 2,000 (2.50%)" in s)
    w("step memory 150 1200", "tokens reasoning 200", "step reasoning 250 2100")
    screen = term.wait_for("650 / 2,000 (32.50%)")
    assert re.search(r"reasoning\s+450 / 150,000", screen)
    w("complete")
    assert term.wait() == 0
    screen = term.text()
    assert "EXECUTION COMPLETE" in screen
    shown = summary_numbers(screen)
    assert shown["used"] == w.total == 650
    assert shown["components"] == {"routing": 50, "memory": 150, "reasoning": 450}
    assert shown["malformed"] == 0
    assert not (log_path / "monitor.pid").exists()
    w.finish()


def test_monitor_started_after_the_session_ended(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer], log_path: Path
) -> None:
    w = writer("done-1")
    w("start 1000", "burst 300 routing 3", "step reasoning 77 10", "complete")
    w.finish()
    term = monitor("--session", "done-1")
    assert term.wait() == 0
    shown = summary_numbers(term.text())
    assert shown["used"] == w.total == 977
    assert shown["components"] == session_truth(log_path, "done-1")["components"]
    assert shown["events"] == 303


def test_monitor_killed_and_restarted_mid_session(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer], log_path: Path
) -> None:
    w = writer("restart-1")
    first = monitor("--session", "restart-1")
    w("start 5000", "step routing 100 5")
    first.wait_for("100 / 5,000")
    first.proc.kill()  # no summary, no cleanup: the pid file stays behind
    first.wait()
    w("step memory 200 5", "burst 50 reasoning 2")
    second = monitor("--session", "restart-1")
    second.wait_for("400 / 5,000")
    w("step validation 10 5", "complete")
    assert second.wait() == 0
    shown = summary_numbers(second.text())
    assert shown["used"] == w.total == 410
    assert shown["components"] == {
        "routing": 100,
        "memory": 200,
        "reasoning": 100,
        "validation": 10,
    }
    assert not (log_path / "monitor.pid").exists()


def test_writer_killed_leaves_an_incomplete_session(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("crash-1")
    term = monitor("--session", "crash-1")
    w("start 1000", "step routing 40 5", "step memory 60 5")
    term.wait_for("100 / 1,000")
    w.kill()  # kill -9: no final event; the kernel frees the lock
    assert term.wait() == 1
    screen = term.text()
    assert "SESSION INCOMPLETE" in screen
    assert "sigil orchestrate --session crash-1 --resume" in screen
    assert summary_numbers(screen)["used"] == 100


def test_monitor_started_on_a_dead_session_says_incomplete(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("dead-1")
    w("start 1000", "step routing 40 5", 'torn {"timestamp": "2026')
    w.kill()
    term = monitor("--session", "dead-1")
    assert term.wait() == 1
    screen = term.text()
    assert "SESSION INCOMPLETE" in screen and "torn last line" in screen
    assert summary_numbers(screen)["used"] == 40


def test_rotation_twice_and_malformed_lines_keep_totals_exact(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer], log_path: Path
) -> None:
    term = monitor("--session", "rot-1")
    w = writer("rot-1")
    w("start 100000", "burst 40 routing 5")
    term.wait_for("200 / 100,000")
    w("rotate execution_20260111_101500.jsonl", "burst 40 memory 7")
    w("raw this is not json", 'raw {"tokens": 5}', "raw [1, 2, 3]")
    term.wait_for("480 / 100,000")
    w("rotate execution_20260111_101501.jsonl", "burst 40 reasoning 11", "complete")
    assert term.wait() == 0
    shown = summary_numbers(term.text())
    assert shown["used"] == w.total == 40 * (5 + 7 + 11)
    assert shown["components"] == {"routing": 200, "memory": 280, "reasoning": 440}
    assert (shown["malformed"], shown["rotations"]) == (3, 2)
    assert shown["events"] == 1 + 120 + 1
    assert len(list((log_path / "sessions" / "rot-1").glob("execution_*.jsonl"))) == 2


def test_budget_exceeded_exits_3(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("budget-1")
    term = monitor("--session", "budget-1", "--mode", "stream")
    w("start 100", "step reasoning 99 5", "budget")
    assert term.wait() == 3
    assert "BUDGET EXCEEDED" in term.text()


def test_narrow_terminal(monitor: Callable[..., Terminal], writer: Callable[[str], Writer]) -> None:
    w = writer("narrow-1")
    term = monitor("--session", "narrow-1", cols=40, rows=60)
    w("start 1000", "step routing 50 1100", "step reasoning 600 6100")
    screen = term.wait_for("650 / 1,000 (65.00%)")
    assert "Tokens  650 / 1,000 (65.00%)" in screen.splitlines()
    assert "Slowest reasoning 6,100ms/op slow" in screen
    w("complete")
    assert term.wait() == 0
    shown = summary_numbers(term.text())
    assert shown["used"] == 650 and shown["components"] == {"routing": 50, "reasoning": 600}


def test_wide_terminal(monitor: Callable[..., Terminal], writer: Callable[[str], Writer]) -> None:
    w = writer("wide-1")
    term = monitor("--session", "wide-1", cols=160, rows=50)
    w("start 1000", "step routing 50 1100")
    screen = term.wait_for("50 / 1,000")
    assert re.search(r"routing\s+50 / 10,000\s+\d+% #+\.+\s+1,100ms\s+1,100ms", screen)
    w("complete")
    assert term.wait() == 0


def test_resize_redraws_at_the_new_width(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("resize-1")
    term = monitor("--session", "resize-1", cols=120, rows=50)
    w("start 1000", "step routing 50 1100")
    term.wait_for(lambda s: re.search(r"routing\s+50 / 10,000", s))
    term.resize(40, 50)
    w("step memory 10 5")
    screen = term.wait_for(lambda s: "60 / 1,000" in s and "Slowest" in s)
    assert "/ 10,000" not in screen  # the narrow layout drops the allocation column
    w("complete")
    assert term.wait() == 0


def test_colour_and_NO_COLOR(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("color-1")
    w("start 1000", "step routing 50 5", "complete")
    colored = monitor("--session", "color-1", NO_COLOR=None)
    plain = monitor("--session", "color-1", NO_COLOR="1")
    assert colored.wait() == 0 and plain.wait() == 0
    assert COLOR_SGR.search(bytes(colored.raw))
    assert not COLOR_SGR.search(bytes(plain.raw))
    assert summary_numbers(plain.text())["used"] == summary_numbers(colored.text())["used"] == 50


def test_stream_mode_in_a_terminal(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("stream-1")
    term = monitor("--session", "stream-1", "--mode", "stream", NO_COLOR=None)
    w("start 1000", "step routing 50 5")
    term.wait_for("routing: routing step done (50 tokens)")
    w("complete")
    assert term.wait() == 0
    assert b"\x1b[36mrouting\x1b[0m" in bytes(term.raw)  # the component is coloured


def test_minimal_mode_rewrites_one_line(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("mini-1")
    term = monitor("--session", "mini-1", "--mode", "minimal")
    w("start 1000", "step routing 50 5")
    term.wait_for("Tokens: 50 / 1,000 (5.00%) running")
    w("step memory 25 5")
    screen = term.wait_for("Tokens: 75 / 1,000 (7.50%) running")
    assert "Tokens: 50 /" not in screen  # rewritten in place, not a new line
    w("complete")
    assert term.wait() == 0
    assert summary_numbers(term.text())["used"] == 75


def test_ctrl_c_prints_the_summary_so_far(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer], log_path: Path
) -> None:
    w = writer("intr-1")
    term = monitor("--session", "intr-1")
    w("start 1000", "step routing 30 5")
    term.wait_for("30 / 1,000")
    term.proc.send_signal(signal.SIGINT)
    assert term.wait() == 130
    screen = term.text()
    assert "MONITOR STOPPED" in screen and summary_numbers(screen)["used"] == 30
    assert not (log_path / "monitor.pid").exists()


def test_follow_waits_for_the_next_run(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("follow-1")
    term = monitor("--session", "follow-1", "--follow", "--mode", "stream")
    w("start 1000 1", "step routing 100 5", "fail")
    term.wait_for("EXECUTION FAILED")
    w("start 1000 2", "step routing 20 5", "complete")
    screen = term.wait_for("EXECUTION COMPLETE")
    assert term.proc.poll() is None  # still following
    assert "run 2 of 2" in screen and summary_numbers(screen)["used"] == 120
    assert "This run:  20" in screen
    term.proc.send_signal(signal.SIGINT)
    assert term.wait() == 130


def test_without_session_follows_current_jsonl(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer], log_path: Path
) -> None:
    term = monitor("--mode", "stream")
    term.wait_for("current.jsonl")
    w = writer("cur-1")
    (log_path / "current.jsonl").symlink_to(log_path / "sessions" / "cur-1" / "execution.jsonl")
    w("start 1000", "step memory 70 5", "complete")
    assert term.wait() == 0
    screen = term.text()
    assert "Session:   cur-1" in screen and summary_numbers(screen)["used"] == 70


def test_a_partial_truncation_never_counts_an_event_twice(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer], log_path: Path
) -> None:
    """copytruncate that keeps the head of the file: the tailer starts the file
    again, and the events it re-reads are not added a second time."""
    w = writer("trunc-1")
    w("start 1000", "step routing 12 5", "step memory 30 5")
    term = monitor("--session", "trunc-1", "--mode", "stream")
    term.wait_for("(30 tokens)")
    path = log_path / "sessions" / "trunc-1" / "execution.jsonl"
    head = b"".join(path.read_bytes().splitlines(keepends=True)[:2])  # start + routing
    with open(path, "r+b") as f:
        f.truncate(len(head))
    w("step planning 7 5", "complete")
    assert w.total == 49
    assert term.wait() == 0
    screen = term.text()
    assert summary_numbers(screen)["used"] == 49
    assert "re-read after truncation" in screen


def test_without_session_an_ended_session_is_not_the_active_one(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer], log_path: Path
) -> None:
    """Started before the next run, the monitor does not replay the last, finished
    session that current.jsonl still names: it waits, then tracks the new run."""
    old = writer("old-1")
    old("start 1000", "step memory 5 5", "complete")
    old.finish()
    link = log_path / "current.jsonl"
    link.symlink_to(log_path / "sessions" / "old-1" / "execution.jsonl")
    term = monitor("--mode", "stream")
    term.wait_for("has ended")
    assert term.proc.poll() is None  # still waiting
    new = writer("new-1")
    new("start 1000")
    link.unlink()
    link.symlink_to(log_path / "sessions" / "new-1" / "execution.jsonl")
    new("step routing 12 5", "complete")
    assert term.wait() == 0
    screen = term.text()
    assert "Session:   new-1" in screen and summary_numbers(screen)["used"] == 12


def test_once_prints_and_exits(
    monitor: Callable[..., Terminal], writer: Callable[[str], Writer]
) -> None:
    w = writer("once-1")
    w("start 1000", "step routing 12 5")
    term = monitor("--session", "once-1", "--once")
    assert term.wait() == 0  # still running: a snapshot, not a failure
    assert summary_numbers(term.text())["used"] == 12
    w("fail")
    assert monitor("--session", "once-1", "--once").wait() == 1
    missing = monitor("--session", "nothing-here", "--once")
    assert missing.wait() == 1
    assert "no log for session nothing-here" in missing.text()


def test_once_in_json_mode_prints_one_state_and_the_final_object(
    writer: Callable[[str], Writer], run_sigil: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    w = writer("once-json")
    w("start 1000", "step routing 12 5")
    result = run_sigil("monitor", "--session", "once-json", "--once", "--mode", "json")
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["type"] for o in objects] == ["state", "final"]
    assert objects[-1]["tokens_used"] == 12


# -- output piped, json, bad input (no terminal needed) ----------------------------------


def test_output_piped_to_a_file_is_plain_stream(
    env: dict[str, str], tmp_path: Path, writer: Callable[[str], Writer]
) -> None:
    w = writer("pipe-1")
    w("start 1000", "step routing 50 5", "raw not json", "complete")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    run_env = dict(env)
    run_env.pop("NO_COLOR", None)  # no colour anyway: the file is not a terminal
    with open(out, "w") as o, open(err, "w") as e:
        rc = subprocess.run(
            [*SIGIL, "monitor", "--session", "pipe-1"],
            stdout=o,
            stderr=e,
            env=run_env,
            timeout=20,
            check=False,
        ).returncode
    assert rc == 0
    text = out.read_text()
    assert "\x1b" not in text
    assert "routing: routing step done (50 tokens)" in text
    assert summary_numbers(text) | {} == summary_numbers(text)
    assert summary_numbers(text)["used"] == 50 and summary_numbers(text)["malformed"] == 1
    assert "watching session pipe-1" in err.read_text()  # progress on stderr


def test_json_mode_is_ndjson_on_stdout(
    env: dict[str, str], writer: Callable[[str], Writer]
) -> None:
    w = writer("json-1")
    proc = subprocess.Popen(
        [*SIGIL, "monitor", "--session", "json-1", "--mode", "json", "--refresh-rate", "0.02"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    w(
        "start 1000",
        "step routing 50 5",
        "raw oops",
        "rotate execution_20260111_101500.jsonl",
        "step memory 25 5",
        "complete",
    )
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0
    objects = [json.loads(line) for line in stdout.splitlines()]
    final = objects[-1]
    assert final["type"] == "final" and final["exit_code"] == 0
    assert final["tokens_used"] == 75 == w.total
    assert {k: v["tokens"] for k, v in final["components"].items() if v["tokens"]} == {
        "routing": 50,
        "memory": 25,
    }
    assert (final["malformed"], final["rotations"], final["status"]) == (1, 1, "complete")
    assert all(o["type"] == "state" for o in objects[:-1])
    assert "EXECUTION COMPLETE" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--session", "../etc"], "invalid session ID"),
        (["--session", "x" * 65], "invalid session ID"),
        (["--refresh-rate", "0"], "--refresh-rate must be above 0"),
        (["--refresh-rate", "-1"], "--refresh-rate must be above 0"),
        (["--refresh-rate", "fast"], "--refresh-rate must be a number"),
        (["--mode", "fancy"], "--mode must be one of"),
        (["--once", "--follow"], "cannot be used together"),
        # /proc refuses new directories, even to root: waiting would never end.
        (["--session", "s", "--log-path", "/proc/1/nope"], "cannot be created"),
        (["--bogus"], "No such option"),
        (["--session"], "requires an argument"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    run_sigil: Callable[..., subprocess.CompletedProcess[str]], args: list[str], message: str
) -> None:
    result = run_sigil("monitor", *args, timeout=20)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


def test_log_path_that_is_a_file_is_refused(
    run_sigil: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for path in (blocker, blocker / "logs"):
        result = run_sigil("monitor", "--session", "s", "--log-path", str(path), timeout=20)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1
        assert "not a directory" in result.stderr


def test_unreadable_log_path_is_refused(sigil_home: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0)
    # Root reads any directory; without the DAC capabilities it is refused like anyone.
    drop = ["-dac_override", "-dac_read_search"]
    prefix = (
        ["setpriv", f"--inh-caps={','.join(drop)}", f"--bounding-set={','.join(drop)}"]
        if os.geteuid() == 0
        else []
    )
    try:
        result = subprocess.run(
            [*prefix, *SIGIL, "monitor", "--session", "s", "--log-path", str(locked)],
            env={**os.environ, "SIGIL_HOME": str(sigil_home), "NO_COLOR": "1"},
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    finally:
        locked.chmod(0o700)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not readable" in result.stderr


def test_bad_config_value_is_one_line_and_exit_2(
    run_sigil: Callable[..., subprocess.CompletedProcess[str]], sigil_home: Path
) -> None:
    sigil_home.mkdir(parents=True, exist_ok=True)
    (sigil_home / "config.yaml").write_text("monitoring:\n  refresh_rate_hz: 0\n")
    result = run_sigil("monitor", "--session", "s", "--once", timeout=20)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "refresh_rate_hz" in result.stderr


# -- with the real orchestrator ----------------------------------------------------------


TESTS_DIR = Path(__file__).resolve().parent
TASK = "Analyze Acme Corp"


def tokens_json(log_path: Path, session: str) -> dict[str, Any]:
    return json.loads((log_path / "sessions" / session / "tokens.json").read_text())


def tokens_json_numbers(log_path: Path, session: str) -> dict[str, Any]:
    data = tokens_json(log_path, session)
    return {
        "used": data["total_used"],
        "budget": data["total_budget"],
        "components": {k: v["used"] for k, v in data["components"].items() if v["used"]},
    }


class Orchestrator:
    """The real ``sigil orchestrate`` in a subprocess.

    Its planning step is swapped, through ``config.yaml`` as a user would do it, for
    ``orchestrate_steps:SlowPlanning`` (tests/orchestrate_steps.py), which sleeps
    ``SIGIL_TEST_SLOW_SECONDS`` first: a window in which the run is observably alive.
    """

    def __init__(
        self,
        home: Path,
        env: dict[str, str],
        session: str,
        *args: str,
        slow: float = 0.0,
        gate: Path | None = None,
    ) -> None:
        home.mkdir(parents=True, exist_ok=True)
        config = home / "config.yaml"
        if not config.exists():
            config.write_text("pipeline:\n  steps:\n    planning: orchestrate_steps:SlowPlanning\n")
        run_env = dict(env)
        run_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])
        )
        run_env["SIGIL_TEST_SLOW_SECONDS"] = str(slow)
        if gate is not None:
            run_env["SIGIL_TEST_GATE"] = str(gate)
        run_env.pop("OPENAI_API_KEY", None)
        task = [] if "--resume" in args else ["--task", TASK]
        self.proc = subprocess.Popen(
            [*SIGIL, "orchestrate", *task, "--session", session, *args],
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait(self, timeout: float = 30) -> int:
        self.proc.communicate(timeout=timeout)
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def orchestrate(sigil_home: Path, env: dict[str, str]) -> Iterator[Callable[..., Orchestrator]]:
    started: list[Orchestrator] = []

    def start(
        session: str, *args: str, slow: float = 0.0, gate: Path | None = None
    ) -> Orchestrator:
        orch = Orchestrator(sigil_home, env, session, *args, slow=slow, gate=gate)
        started.append(orch)
        return orch

    yield start
    for orch in started:
        if orch.proc.poll() is None:
            orch.kill()


def wait_for_log(log_path: Path, session: str, needle: str, timeout: float = 20) -> None:
    log = log_path / "sessions" / session / "execution.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} never appeared in {log}")


def test_orchestrate_with_the_monitor_started_first(
    monitor: Callable[..., Terminal], orchestrate: Callable[..., Orchestrator], log_path: Path
) -> None:
    term = monitor("--session", "orch-1", cols=160)
    term.wait_for("WAITING FOR LOG")
    orch = orchestrate("orch-1", "--budget", "50000", slow=0.6)
    # Mid-run: the slow planning step is running, routing and memory are done.
    screen = term.wait_for(lambda s: "RUNNING" in s and "Planning started" in s)
    # Default allocations are the spec's shares of 256K scaled to the budget: 10,000 -> 1,953.
    assert re.search(r"routing\s+[\d,]+ / 1,953", screen)
    assert orch.wait() == 0
    assert term.wait() == 0
    shown = summary_numbers(term.text())
    assert {k: shown[k] for k in ("used", "budget", "components")} == tokens_json_numbers(
        log_path, "orch-1"
    )


def test_orchestrate_then_monitor_after_the_end_at_40_columns(
    monitor: Callable[..., Terminal], orchestrate: Callable[..., Orchestrator], log_path: Path
) -> None:
    assert orchestrate("orch-2").wait() == 0
    term = monitor("--session", "orch-2", cols=40, rows=60)
    assert term.wait() == 0
    shown = summary_numbers(term.text())
    assert {k: shown[k] for k in ("used", "budget", "components")} == tokens_json_numbers(
        log_path, "orch-2"
    )
    # Without --session, --once shows the session current.jsonl names, here the same
    # one (a live monitor would wait for the next run: this one has ended).
    again = monitor("--mode", "minimal", "--once", cols=40)
    assert again.wait() == 0
    assert summary_numbers(again.text())["used"] == tokens_json(log_path, "orch-2")["total_used"]


def test_orchestrate_with_the_monitor_killed_and_restarted(
    monitor: Callable[..., Terminal], orchestrate: Callable[..., Orchestrator], log_path: Path
) -> None:
    first = monitor("--session", "orch-3")
    orch = orchestrate("orch-3", slow=4.0)  # room for a loaded machine to restart the monitor
    first.wait_for("Planning started")
    first.proc.kill()
    first.wait()
    second = monitor("--session", "orch-3")
    second.wait_for("RUNNING")
    assert orch.wait() == 0
    assert second.wait() == 0
    shown = summary_numbers(second.text())
    assert {k: shown[k] for k in ("used", "budget", "components")} == tokens_json_numbers(
        log_path, "orch-3"
    )
    assert not (log_path / "monitor.pid").exists()


def test_orchestrate_killed_9_then_resumed(
    monitor: Callable[..., Terminal], orchestrate: Callable[..., Orchestrator], log_path: Path
) -> None:
    term = monitor("--session", "orch-4")
    orch = orchestrate("orch-4", slow=60)
    term.wait_for("Planning started")
    orch.proc.send_signal(signal.SIGKILL)
    orch.proc.communicate(timeout=10)
    assert term.wait() == 1
    screen = term.text()
    assert "SESSION INCOMPLETE" in screen
    assert "sigil orchestrate --session orch-4 --resume" in screen
    # Do what the monitor says; a monitor following the session sees the run finish.
    follower = monitor("--session", "orch-4", "--follow", "--mode", "stream")
    follower.wait_for("SESSION INCOMPLETE")
    assert orchestrate("orch-4", "--resume").wait() == 0
    screen = follower.wait_for("EXECUTION COMPLETE")
    shown = summary_numbers(screen)
    assert {k: shown[k] for k in ("used", "budget", "components")} == tokens_json_numbers(
        log_path, "orch-4"
    )
    follower.proc.send_signal(signal.SIGINT)
    assert follower.wait() == 130


def test_orchestrate_with_two_rotations_and_malformed_lines(
    monitor: Callable[..., Terminal],
    orchestrate: Callable[..., Orchestrator],
    log_path: Path,
    tmp_path: Path,
) -> None:
    session = log_path / "sessions" / "orch-5"
    assert orchestrate("orch-5", slow=0).wait() == 0  # run 1
    # Rotation 1, between the runs, and two lines written by hand into the new file.
    os.rename(session / "execution.jsonl", session / "execution_20260111_101500.jsonl")
    with open(session / "execution.jsonl", "a") as f:
        f.write('garbage written by hand\n{"tokens": "many"}\n')
    gate = tmp_path / "planning-may-go-on"
    orch = orchestrate("orch-5", gate=gate)  # run 2: planning waits for the gate
    wait_for_log(log_path, "orch-5", "Planning started")
    term = monitor("--session", "orch-5", NO_COLOR="1")
    term.wait_for(lambda s: "RUNNING" in s and "run 2" in s)
    # Rotation 2, mid-run, while the monitor is tailing; one more bad line.
    os.rename(session / "execution.jsonl", session / "execution_20260111_101501.jsonl")
    with open(session / "execution.jsonl", "a") as f:
        f.write("[1, 2, 3]\n")
    gate.touch()
    assert orch.wait() == 0
    assert term.wait() == 0
    shown = summary_numbers(term.text())
    assert {k: shown[k] for k in ("used", "budget", "components")} == tokens_json_numbers(
        log_path, "orch-5"
    )
    assert (shown["malformed"], shown["rotations"]) == (3, 2)


def test_orchestrate_output_piped(
    env: dict[str, str], orchestrate: Callable[..., Orchestrator], log_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "monitor.out"
    with open(out, "w") as o:
        mon = subprocess.Popen(
            [*SIGIL, "monitor", "--session", "orch-6"],
            stdout=o,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert orchestrate("orch-6", "--budget", "40000").wait() == 0
        _, err = mon.communicate(timeout=20)
    assert mon.returncode == 0
    text = out.read_text()
    assert "\x1b" not in text and "routing: Intent classified" in text
    assert summary_numbers(text)["used"] == tokens_json(log_path, "orch-6")["total_used"]
    assert "watching session orch-6" in err
