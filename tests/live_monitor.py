"""A ``sigil monitor`` process following a session, for tests that watch a run
come and go (or its writer stop) through the monitor's json stream."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import SIGIL, isolated_env


def json_monitor(home: Path, session: str, *args: str) -> subprocess.Popen[str]:
    """``sigil monitor --session SESSION --mode json [ARGS]`` with ``home`` as its
    home, its stdout and stderr piped as text. The caller stops it."""
    return subprocess.Popen(
        [*SIGIL, "monitor", "--session", session, "--mode", "json", *args],
        env=isolated_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
