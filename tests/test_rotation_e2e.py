"""Rotation during a running `sigil orchestrate` with a `sigil monitor` watching.

The run is slowed down by steps plugged in through ``pipeline.steps`` (the way a
user plugs in their own), so that it stays under way while its log is rotated
several times: first with the real `sigil logs rotate`, then by the rotator,
each time with new events on both sides of the rename. No event may be lost,
duplicated or reordered: the segments read oldest first carry seq 0..n-1
exactly once, and the orchestrator's total, tokens.json and the monitor's final
state all equal the sum of the events' tokens (contract 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import cli_env
from sigil.core.locks import is_session_locked
from sigil.core.paths import rotated_segments
from sigil.telemetry.log_rotation import LogRotator

SIGIL = [sys.executable, "-m", "sigil"]
SESSION = "rotating"
PAUSE = 0.6  # each slow step's sleep: a window for one rotation
SPACING = 0.3  # between rotations, so the monitor reads each segment before the next

SLOW_STEPS = f"""
import asyncio

from sigil.pipeline.offline import MemoryStep, PlanningStep, ReasoningStep


class SlowMemory(MemoryStep):
    async def run(self, ctx):
        await asyncio.sleep({PAUSE})
        return await super().run(ctx)


class SlowPlanning(PlanningStep):
    async def run(self, ctx):
        await asyncio.sleep({PAUSE})
        return await super().run(ctx)


class SlowReasoning(ReasoningStep):
    async def run(self, ctx):
        await asyncio.sleep({PAUSE})
        return await super().run(ctx)
"""


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SIGIL, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rotation_under_a_running_orchestrator_and_monitor(sigil_home: Path) -> None:
    log_path = sigil_home / "logs"
    sigil_home.mkdir(parents=True)
    steps_dir = sigil_home / "steps"
    steps_dir.mkdir()
    (steps_dir / "rotation_steps.py").write_text(SLOW_STEPS)
    (sigil_home / "config.yaml").write_text(
        "logging:\n  max_file_size_mb: 0.0001\n"
        "pipeline:\n  steps:\n"
        "    memory: rotation_steps:SlowMemory\n"
        "    planning: rotation_steps:SlowPlanning\n"
        "    reasoning: rotation_steps:SlowReasoning\n"
    )
    python_path = os.pathsep.join(filter(None, [str(steps_dir), os.environ.get("PYTHONPATH")]))
    env = cli_env(sigil_home, PYTHONPATH=python_path)

    monitor = start(["monitor", "--session", SESSION, "--mode", "json"], env)
    time.sleep(0.3)  # the monitor is waiting for the session before it starts
    orchestrate = start(
        ["orchestrate", "--task", "Analyze Acme Corp", "--session", SESSION, "--json"], env
    )
    session_dir = log_path / "sessions" / SESSION
    log_file = session_dir / "execution.jsonl"
    rotator = LogRotator(log_path, max_file_size_mb=0.0001)
    deadline = time.monotonic() + 60
    while not (is_session_locked(session_dir) and _size(log_file) > 0):
        assert orchestrate.poll() is None and time.monotonic() < deadline, orchestrate.stderr
        time.sleep(0.005)
    # The real command first, while the run is under way (in its slow memory step).
    cli = subprocess.run(
        [*SIGIL, "logs", "rotate", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert len(json.loads(cli.stdout)["rotated"]) == 1, cli.stdout
    rotations, last = 1, time.monotonic()
    while orchestrate.poll() is None and time.monotonic() < deadline:
        if time.monotonic() - last >= SPACING and is_session_locked(session_dir):
            done = rotator.rotate_large_logs()
            if done:
                rotations, last = rotations + len(done), time.monotonic()
        time.sleep(0.01)
    out, err = orchestrate.communicate(timeout=60)
    assert orchestrate.returncode == 0, err
    monitor_out, monitor_err = monitor.communicate(timeout=30)
    assert monitor.returncode == 0, monitor_err

    result: dict[str, Any] = json.loads(out)
    files = [*rotated_segments(session_dir), session_dir / "execution.jsonl"]
    events = [
        json.loads(line)
        for path in files
        if path.exists()
        for line in path.read_bytes().splitlines()
    ]
    assert rotations >= 3, rotations  # memory, planning and reasoning windows
    assert len(rotated_segments(session_dir)) == rotations
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[0]["event_type"] == "session_start"
    assert events[-1]["event_type"] == "session_complete"
    total = sum(e["tokens"] for e in events)
    assert total > 0
    assert result["total_tokens"] == total
    tokens_json = json.loads((session_dir / "tokens.json").read_text())
    assert tokens_json["total_used"] == total

    states = [json.loads(line) for line in monitor_out.splitlines() if line.startswith("{")]
    final = states[-1]
    assert final["status"] == "complete"
    assert final["tokens_used"] == total
    assert final["events"] == len(events)
    # The last rename may come after session_complete, when the monitor has left.
    assert final["rotations"] in (rotations - 1, rotations), (final["rotations"], rotations)
    assert (final["malformed"], final["seq_gaps"], final["dropped_events"]) == (0, 0, 0)
