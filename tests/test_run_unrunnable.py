"""``sigil run -- COMMAND`` with a COMMAND that cannot be executed.

A script whose ``#!`` interpreter is missing or not a program, a random file
marked executable, a directory: one line ``cannot run <command>: <why>``,
exit 2, and nothing written (no session). A file that only fails at ``exec``
(an ELF header with nothing valid behind it) ends its session plainly as an
error with the same line, never a traceback or a "resume" hint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SIGIL = [sys.executable, "-m", "sigil"]

pytestmark = [pytest.mark.timeout(120)]


def _run(home: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIGIL_"))}
    env.update(SIGIL_HOME=str(home), NO_COLOR="1", OPENAI_API_KEY="sk-test-key-000000000000000000")
    return subprocess.run(
        [*SIGIL, "run", "--upstream", "http://127.0.0.1:9/v1", "--", *command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _executable(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o755)
    return path


def _sessions(home: Path) -> list[Path]:
    root = home / "logs" / "sessions"
    return sorted(root.iterdir()) if root.exists() else []


@pytest.mark.parametrize(
    "kind", ["missing-interpreter", "directory-interpreter", "random-bytes", "directory"]
)
def test_an_unrunnable_command_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, kind: str
) -> None:
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    if kind == "missing-interpreter":
        _executable(work / "x.sh", b"#!/no/such/interpreter-here\necho hi\n")
        program = "./x.sh"
    elif kind == "directory-interpreter":
        (work / "interp").mkdir()
        _executable(work / "x.sh", f"#!{work / 'interp'} -x\necho hi\n".encode())
        program = "./x.sh"
    elif kind == "random-bytes":
        _executable(work / "blob", bytes(range(7, 250)) * 3)
        program = "./blob"
    else:
        program = str(tmp_path)
    proc = _run(home, work, program)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"Error: cannot run {program}: "), lines[0]
    assert "Traceback" not in proc.stderr and "resume" not in proc.stderr.lower()
    assert _sessions(home) == []


def test_a_command_that_fails_at_exec_ends_its_session_plainly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    # ELF magic, then nothing a loader accepts: only exec() can tell.
    _executable(work / "bad", b"\x7fELF" + b"\x00" * 60)
    proc = _run(home, work, "./bad")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "resume" not in proc.stderr.lower()
    assert "Error: cannot run ./bad: " in proc.stderr, proc.stderr
    (session,) = _sessions(home)
    events = [json.loads(line) for line in (session / "execution.jsonl").read_text().splitlines()]
    final = events[-1]
    assert final["event_type"] == "session_error", final
    assert final["metadata"]["status"] == "error", final
    assert "cannot run ./bad" in json.dumps(final), final
