"""``monitoring.alert_command`` against hostile commands (a real monitor on a
pseudo-terminal, a real writer, real alert processes).

The command is split like a shell's words and run without a shell, detached:
metacharacters are plain arguments, a command that hangs or floods its output
never holds the dashboard, and ``q`` still quits at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from terminal import Terminal
from test_dashboard_keys import env, started, writer  # noqa: F401  (fixtures)
from test_monitor_e2e import Writer

pytestmark = [pytest.mark.timeout(60)]


def _wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_shell_metacharacters_in_the_command_are_plain_arguments(
    started: Callable[..., Terminal],  # noqa: F811
    writer: Callable[[str], Writer],  # noqa: F811
    sigil_home: Path,
    tmp_path: Path,
) -> None:
    got = tmp_path / "argv.txt"
    script = tmp_path / "alert.sh"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "[%s]\\n" "$a"; done > "{got}"\n')
    script.chmod(0o755)
    pwned = tmp_path / "pwned"
    command = f"{script} '$(touch {pwned})' ; touch {pwned}2 | `touch {pwned}3` && $HOME"
    sigil_home.mkdir(parents=True, exist_ok=True)
    (sigil_home / "config.yaml").write_text(
        "monitoring:\n  alert_command: " + json.dumps(command) + "\n"
    )
    w = writer("meta-1")
    w("start 1000", "step routing 100 10")
    term = started("--session", "meta-1", "--follow")
    term.wait_for("100 / 1,000")
    w("step memory 500 10")  # warning
    term.wait_for("600 / 1,000")
    _wait_for(got)
    term.press("q")
    assert term.wait() == 0
    args = got.read_text().splitlines()
    assert args == [
        f"[$(touch {pwned})]",
        "[;]",
        "[touch]",
        f"[{pwned}2]",
        "[|]",
        "[`touch]",
        f"[{pwned}3`]",
        "[&&]",
        "[$HOME]",
        "[sigil meta-1: budget warning]",
    ]
    assert not any(tmp_path.glob("pwned*"))


def test_a_hanging_and_a_flooding_command_never_hold_the_dashboard(
    started: Callable[..., Terminal],  # noqa: F811
    writer: Callable[[str], Writer],  # noqa: F811
    env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "pid"
    script = tmp_path / "alert.sh"
    # Floods stdout and stderr, then hangs (its pid kept so the test can end it).
    script.write_text(
        f'#!/bin/sh\necho $$ > "{pid_file}.tmp" && mv "{pid_file}.tmp" "{pid_file}"\n'
        "head -c 5000000 /dev/zero; head -c 5000000 /dev/zero >&2\nexec sleep 60\n"
    )
    script.chmod(0o755)
    env["SIGIL_ALERT_COMMAND"] = str(script)
    w = writer("hang-1")
    w("start 1000", "step routing 100 10")
    term = started("--session", "hang-1", "--follow")
    try:
        term.wait_for("100 / 1,000")
        w("step memory 500 10")  # warning: the command starts and hangs
        term.wait_for("600 / 1,000")
        _wait_for(pid_file)
        w("step reasoning 100 10")  # the dashboard still follows
        term.wait_for("700 / 1,000", timeout=5)
        started_at = time.monotonic()
        term.press("q")
        assert term.wait(timeout=5) == 0
        assert time.monotonic() - started_at < 3
        assert "alert command failed" not in term.text()
    finally:
        if pid_file.exists():
            pid = int(pid_file.read_text())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
