"""Rows for ``sigil replay`` (issue 13): a finished session replayed into a pipe.

- ``sigil replay S --speed max --mode json > /dev/null``, a fresh process, on
  10,000 and 1,000,000-event sessions, beside ``sigil monitor -s S --mode json
  --once`` (one native fold of the same log, the least a replay can cost);
- the peak RSS of both: the replay streams the log (bounded chunks), so its
  peak stays near the monitor's whatever the session's length.

The sessions are finished (runs of 1,000 events, each with its final event),
written once per test session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.benchmark

SIGIL = [sys.executable, "-m", "sigil"]
SIZES = {"10k": 10_000, "1m": 1_000_000}
TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:  # the sessions are the memory tests' (one generator)
    sys.path.insert(0, str(TESTS))

from replay_sessions import replay_lines  # noqa: E402

_MAXRSS = (
    "import resource, subprocess, sys\n"
    "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def _write(path: Path, session: str, n: int) -> None:
    """``n`` events, 10 ms apart, in runs of 1,000 (start, steps, complete),
    the last run closed at the last event (tests/replay_sessions.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for first in range(0, n, 10_000):
            f.write(replay_lines(session, first, min(10_000, n - first), last=n - 1))


@pytest.fixture(scope="session")
def replay_home(bench_dir: Path) -> Path:
    home = bench_dir / "replay-home"
    for name, n in SIZES.items():
        path = home / "logs" / "sessions" / f"r{name}" / "execution.jsonl"
        if not path.exists():
            _write(path, f"r{name}", n)
    return home


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SIGIL_HOME"] = str(home)
    env["NO_COLOR"] = "1"
    return env


def _replay(size: str) -> list[str]:
    return [*SIGIL, "replay", f"r{size}", "--speed", "max", "--mode", "json"]


def _monitor(size: str) -> list[str]:
    return [*SIGIL, "monitor", "-s", f"r{size}", "--mode", "json", "--once"]


def _run(argv: list[str], home: Path) -> None:
    subprocess.run(
        argv,
        env=_env(home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=300,
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_replay_max_json_process(benchmark: Any, replay_home: Path, size: str) -> None:
    """``sigil replay --speed max --mode json > /dev/null``: the whole session, streamed."""
    n = SIZES[size]
    benchmark.group = f"replay --speed max -m json, {n:,} events"
    benchmark.pedantic(_run, args=(_replay(size), replay_home), rounds=1 if n > 10_000 else 3)
    benchmark.extra_info.update(ops=n, baseline=f"test_replay_monitor_once_process[{size}]")


@pytest.mark.parametrize("size", list(SIZES))
def test_replay_monitor_once_process(benchmark: Any, replay_home: Path, size: str) -> None:
    """Baseline: ``sigil monitor --mode json --once``, one native fold of the same log."""
    n = SIZES[size]
    benchmark.group = f"replay --speed max -m json, {n:,} events"
    benchmark.pedantic(_run, args=(_monitor(size), replay_home), rounds=1 if n > 10_000 else 3)
    benchmark.extra_info.update(ops=n)


def _peak_rss_mb(argv: list[str], home: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _MAXRSS, *argv],
        env=_env(home),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    return int(out.strip()) / 1024  # ru_maxrss is in KiB on Linux


@pytest.mark.parametrize("size", list(SIZES))
def test_memory_replay_peak(benchmark: Any, replay_home: Path, size: str) -> None:
    """Peak RSS of the replay: bounded chunks of the log, not the log."""
    n = SIZES[size]
    benchmark.group = f"replay peak memory, {n:,} events"
    values: list[float] = []
    started = time.monotonic()
    benchmark.pedantic(lambda: values.append(_peak_rss_mb(_replay(size), replay_home)), rounds=1)
    benchmark.extra_info.update(
        metric="peak RSS (MB)",
        value=values[0],
        aim_max=80,
        baseline=f"test_memory_replay_monitor_peak[{size}]",
        seconds=round(time.monotonic() - started, 2),
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_memory_replay_monitor_peak(benchmark: Any, replay_home: Path, size: str) -> None:
    """Baseline: the peak RSS of ``sigil monitor --mode json --once`` on the same log."""
    n = SIZES[size]
    benchmark.group = f"replay peak memory, {n:,} events"
    values: list[float] = []
    benchmark.pedantic(lambda: values.append(_peak_rss_mb(_monitor(size), replay_home)), rounds=1)
    benchmark.extra_info.update(metric="peak RSS (MB)", value=values[0])
