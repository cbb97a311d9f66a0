"""``sigil run`` and a COMMAND that ignores or absorbs signals (real processes).

The first SIGINT/SIGTERM is passed to COMMAND, which decides when to end. A
second one, or ``--kill-after`` seconds after the first, kills COMMAND
(SIGKILL) and the session ends with its final event. Once sigil was
signalled the run is recorded as interrupted and sigil exits 128 + that
signal, even when COMMAND chose to exit 0: the status and the exit code agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

SIGIL = [sys.executable, "-m", "sigil"]

pytestmark = [pytest.mark.timeout(120)]

STUBBORN = """\
import os, signal, sys, time
def note(signum, frame):
    print("got", signum, flush=True)
    if sys.argv[1] == "exit0":
        sys.exit(0)
signal.signal(signal.SIGTERM, note)
signal.signal(signal.SIGINT, note)
with open(sys.argv[2], "w") as f:
    f.write(str(os.getpid()))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


_STARTED: list[tuple[subprocess.Popen[str], Path]] = []


@pytest.fixture(autouse=True)
def _reap() -> Any:
    """Whatever a failing test leaves running (sigil, its COMMAND) is killed."""
    yield
    while _STARTED:
        proc, pidfile = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def _start(tmp_path: Path, mode: str, *extra: str) -> tuple[subprocess.Popen[str], Path, Path]:
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    home = tmp_path / "home"
    pidfile = tmp_path / "child.pid"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIGIL_"))}
    env.update(SIGIL_HOME=str(home), NO_COLOR="1")
    proc = subprocess.Popen(
        [*SIGIL, "run", "--session", "stub", "--upstream", "http://127.0.0.1:9/v1", *extra,
         "--", sys.executable, str(script), mode, str(pidfile)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _STARTED.append((proc, pidfile))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc, home, pidfile


def _final(home: Path) -> dict[str, Any]:
    log = home / "logs" / "sessions" / "stub" / "execution.jsonl"
    return json.loads(log.read_text().splitlines()[-1])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie not yet reaped by sigil counts as alive here; sigil has exited
    # by the time this is asked, so the child was reaped or reparented.
    return False


@pytest.mark.parametrize(
    ("first", "second", "code"),
    [
        (signal.SIGTERM, signal.SIGTERM, 143),
        (signal.SIGINT, signal.SIGINT, 130),
        (signal.SIGTERM, signal.SIGINT, 143),
    ],
)
def test_a_second_signal_kills_a_command_that_ignores_the_first(
    tmp_path: Path, first: int, second: int, code: int
) -> None:
    proc, home, pidfile = _start(tmp_path, "ignore")
    child = int(pidfile.read_text())
    proc.send_signal(first)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == f"got {int(first)}"
    proc.send_signal(second)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    final = _final(home)
    assert final["event_type"] == "session_error", final
    assert final["metadata"]["status"] == "interrupted", final
    assert "killed" in final["message"] or "killed" in json.dumps(final["metadata"]), final
    assert _gone(child)


def test_kill_after_ends_a_command_that_ignores_sigterm(tmp_path: Path) -> None:
    proc, home, pidfile = _start(tmp_path, "ignore", "--kill-after", "1")
    child = int(pidfile.read_text())
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - started
    assert proc.returncode == 143, err
    assert 0.9 <= took < 10, took
    assert _final(home)["metadata"]["status"] == "interrupted"
    assert _gone(child)


def test_a_command_that_exits_0_on_sigterm_is_interrupted_and_exits_143(tmp_path: Path) -> None:
    proc, home, _ = _start(tmp_path, "exit0")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    final = _final(home)
    assert final["metadata"]["status"] == "interrupted", final
    assert proc.returncode == 143, err


def test_kill_after_must_be_a_positive_number(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIGIL_"))}
    env.update(SIGIL_HOME=str(tmp_path / "home"), NO_COLOR="1")
    for bad in ("0", "-1", "soon", "nan"):
        proc = subprocess.run(
            [*SIGIL, "run", "--kill-after", bad, "--", "true"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 2, (bad, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "--kill-after" in proc.stderr
    assert not (tmp_path / "home" / "logs" / "sessions").exists()
