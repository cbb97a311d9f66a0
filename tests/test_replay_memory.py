"""``sigil replay`` streams a session: its memory does not grow with the log.

The session's rotated segments (one of them gzip), its live file, or its
archive are read in bounded chunks, line by line in segment order. Checked by
the peak RSS of a real ``sigil replay --speed max --mode json > /dev/null``
(``getrusage`` of the child, not a timing): a session four times longer must
not need more than a few MiB more. The answers are checked too: the replay of
the segments ends on the monitor's ``--once`` snapshot, the archive's on the
same one.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import SIGIL, cli_env

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

_NAMES = ("routing", "memory", "reasoning", "validation")
#: The longest a replay of 4x the events may grow past the 1x one's peak.
_SLACK_KIB = 16 << 10


def _lines(session: str, first: int, count: int) -> bytes:
    """``count`` events from seq ``first`` (a run of 1,000 each), 10 ms apart."""
    out: list[str] = []
    for seq in range(first, first + count):
        i = seq % 1000
        sec, ms = divmod(seq * 10, 1000)
        minute, sec = divmod(sec, 60)
        hour, minute = divmod(minute, 60)
        stamp = f"2026-01-11T{10 + hour:02d}:{minute:02d}:{sec:02d}.{ms:03d}000+00:00"
        if i == 0:
            kind, comp, tokens, meta = "session_start", "orchestrator", 0, '{"run": 1}'
        elif i == 999:
            kind, comp, tokens = "session_complete", "orchestrator", 0
            meta = '{"status": "complete"}'
        else:
            kind, comp, tokens = "step_complete", _NAMES[i % 4], 100 + i % 7
            meta = '{"latency_ms": 900, "model": "gpt-4o-mini"}'
        out.append(
            f'{{"timestamp": "{stamp}", "session_id": "{session}", "event_type": "{kind}", '
            f'"component": "{comp}", "message": "{comp} {kind} {seq}", "tokens": {tokens}, '
            f'"metadata": {meta}, "seq": {seq}}}\n'
        )
    return "".join(out).encode()


def _session(log_path: Path, session: str, events: int) -> Path:
    """Two rotated segments (the newer gzip-compressed) and the live file."""
    directory = log_path / "sessions" / session
    directory.mkdir(parents=True, mode=0o700)
    third = events // 3
    (directory / "execution_20260111_100000.jsonl").write_bytes(_lines(session, 0, third))
    (directory / "execution_20260111_110000.jsonl.gz").write_bytes(
        gzip.compress(_lines(session, third, third), compresslevel=1)
    )
    (directory / "execution.jsonl").write_bytes(_lines(session, 2 * third, events - 2 * third))
    return directory


def _archive(log_path: Path, directory: Path) -> None:
    day = log_path / "archive" / "2026-01-11"
    day.mkdir(parents=True, exist_ok=True)
    with tarfile.open(day / f"{directory.name}.tar.gz", "w:gz", compresslevel=1) as tar:
        tar.add(directory, arcname=directory.name)


_PEAK = (
    "import resource, subprocess, sys; "
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _peak_kib(home: Path, session: str) -> int:
    """The peak RSS (KiB) of ``sigil replay SESSION --speed max --mode json > /dev/null``."""
    result = subprocess.run(
        [sys.executable, "-c", _PEAK, *SIGIL, "replay", session, "--speed", "max", "-m", "json"],
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    code, peak = result.stdout.split()
    assert code == "0", result.stderr
    return int(peak)


def _final(home: Path, *args: str) -> dict[str, object]:
    result = subprocess.run(
        [*SIGIL, *args],
        env=cli_env(home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout.splitlines()[-1])
    assert final["type"] == "final"
    return final


@pytest.mark.parametrize("where", ["directory", "archive"])
def test_replay_memory_does_not_grow_with_the_log(
    sigil_home: Path, log_path: Path, tmp_path: Path, where: str
) -> None:
    small = _session(log_path, "mem-small", 30_000)
    large = _session(log_path, "mem-large", 120_000)
    expected = _final(sigil_home, "monitor", "-s", "mem-large", "--mode", "json", "--once")
    assert expected["events"] == 120_000 and expected["runs"] == 120
    if where == "archive":
        for directory in (small, large):
            _archive(log_path, directory)
            directory.rename(tmp_path / directory.name)
    replayed = _final(sigil_home, "replay", "mem-large", "--speed", "max", "--mode", "json")
    assert replayed == expected
    peaks = {name: _peak_kib(sigil_home, name) for name in ("mem-small", "mem-large")}
    # 90,000 more events (about 22 MiB of log): held whole they would show.
    assert peaks["mem-large"] - peaks["mem-small"] < _SLACK_KIB, peaks
