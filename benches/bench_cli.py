"""Rows for the command line: start-up times and the logger's cost per pipeline event.

* ``sigil --help`` and ``sigil orchestrate --help``: a whole process, beside a bare
  ``python -c pass`` (the interpreter's own start-up) in the same group. Spec 12.1:
  CLI start-up < 500 ms; aim < 150 ms.
* ``sigil orchestrate``: a whole offline run, and as a metric the time until the
  session ID line appears -- the moment a monitor can attach, which is what
  "start-up" means for this command. Same spec and aim.
* The logger's overhead per event in a pipeline step: the orchestrator's hot
  path (``step_start``, the step, ``step_complete`` through the token tracker) with
  the real native writer, beside the same loop with no logger.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import quick
from sigil.pipeline.base import StepOutput
from sigil.telemetry.execution_logger import ExecutionLogger
from sigil.telemetry.tokens import TokenTracker

pytestmark = pytest.mark.benchmark

SPEC_STARTUP_S = 0.5  # spec 12.1: "Startup time (CLI) < 500 ms"
AIM_STARTUP_S = 0.15


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SIGIL_HOME"] = str(home)
    env["NO_COLOR"] = "1"
    for var in ("SIGIL_LOG_PATH", "SIGIL_BUDGET", "SIGIL_PROVIDER"):
        env.pop(var, None)
    return env


def _run(args: list[str], env: dict[str, str]) -> None:
    subprocess.run(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def _rounds() -> int:
    return 3 if quick() else 10


# -- start-up ----------------------------------------------------------------------------------


def test_startup_python_baseline(benchmark: Any, bench_home: Path) -> None:
    benchmark.group = "CLI start-up (whole process)"
    benchmark.extra_info.update(ops=1)
    env = _env(bench_home)
    benchmark.pedantic(_run, args=([sys.executable, "-c", "pass"], env), rounds=_rounds())


@pytest.mark.parametrize(
    "args", [["--help"], ["orchestrate", "--help"]], ids=["sigil --help", "orchestrate --help"]
)
def test_startup_help(benchmark: Any, bench_home: Path, args: list[str]) -> None:
    benchmark.group = "CLI start-up (whole process)"
    benchmark.extra_info.update(
        ops=1,
        baseline="test_startup_python_baseline",
        spec_max_s=SPEC_STARTUP_S,
        aim_max_s=AIM_STARTUP_S,
    )
    env = _env(bench_home)
    cmd = [sys.executable, "-m", "sigil", *args]
    _run(cmd, env)  # warm the page cache and .pyc files
    benchmark.pedantic(_run, args=(cmd, env), rounds=_rounds())


def test_orchestrate_run_and_time_to_session_start(benchmark: Any, bench_home: Path) -> None:
    """A whole offline run; the metric is the time until ``Session: <id>`` is printed."""
    benchmark.group = "sigil orchestrate (offline pipeline)"
    env = _env(bench_home)
    cmd = [sys.executable, "-m", "sigil", "orchestrate", "--task", "Analyze Acme Corp"]
    _run(cmd, env)  # first use creates the memory store: not part of start-up
    to_first_line: list[float] = []

    def run() -> None:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        to_first_line.append(time.perf_counter() - started)
        proc.stdout.read()
        assert proc.wait() == 0 and line.startswith("Session: ")

    benchmark.pedantic(run, rounds=_rounds())
    to_first_line.sort()
    median_ms = to_first_line[len(to_first_line) // 2] * 1000
    benchmark.extra_info.update(
        ops=1,
        metric="time to session start (ms)",
        value=median_ms,
        spec_max=SPEC_STARTUP_S * 1000,
        aim_max=AIM_STARTUP_S * 1000,
    )


# -- per-event overhead ----------------------------------------------------------------------------

STEPS = 1_000  # steps per call: 2 events each (step_start, step_complete)
# As the orchestrator logs a step_complete: counts, latency and the step's compact output
# (kept for --resume), here about 600 bytes of it.
META = {
    "run": 1,
    "attempt": 1,
    "latency_ms": 1.25,
    "input_tokens": 40,
    "output_tokens": 10,
    "tokenizer": "cl100k_base",
    "output": {
        "intent": "lead_analysis",
        "summary": "Lead analysis of Acme Corp: 4 findings from 5 memories and a 4-step plan.",
        "findings": [f"Finding {i}: the account has a budget owner and a deadline." for i in "abc"]
        * 2,
        "action": "proceed",
        "confidence": 0.8,
    },
}


async def _pipeline_steps(tracker: TokenTracker, logger: ExecutionLogger | None) -> None:
    """The orchestrator's per-step hot path, with a trivial step."""
    for i in range(STEPS):
        if logger is not None:
            await logger.log_event("step_start", "reasoning", "Reasoning started", 0, {"run": 1})
        out = StepOutput(output={"i": i}, input_tokens=40, output_tokens=10, message="done")
        await tracker.track(
            "reasoning", out.tokens, event_type="step_complete", message=out.message, metadata=META
        )


def _steps_without_logging() -> None:
    asyncio.run(_pipeline_steps(TokenTracker(total_budget=10**12), None))


def _steps_with_logging(home: Path, counter: list[int], sanitize: bool) -> None:
    counter[0] += 1
    logger = ExecutionLogger(f"bench-{counter[0]}", home / "logs", sanitizer=sanitize)
    tracker = TokenTracker(total_budget=10**12, logger=logger)

    async def main() -> None:
        await logger.initialize()
        await _pipeline_steps(tracker, logger)
        await logger.close()

    asyncio.run(main())


def test_pipeline_steps_without_logging(benchmark: Any) -> None:
    benchmark.group = f"pipeline step: logger overhead ({STEPS:,} steps, 2 events each)"
    benchmark.extra_info.update(ops=STEPS)
    benchmark.pedantic(_steps_without_logging, rounds=_rounds(), warmup_rounds=1)


@pytest.mark.parametrize(
    "sanitize", [False, True], ids=["sanitizer off", "sanitizer on (the default)"]
)
def test_pipeline_steps_with_logging(benchmark: Any, bench_home: Path, sanitize: bool) -> None:
    benchmark.group = f"pipeline step: logger overhead ({STEPS:,} steps, 2 events each)"
    counter = [0]
    benchmark.pedantic(_steps_with_logging, args=(bench_home, counter, sanitize), rounds=_rounds())
    # The overhead per event, against the no-logging loop measured here the same way.
    without = min(_timed(_steps_without_logging) for _ in range(3))
    with_log = min(
        _timed(lambda: _steps_with_logging(bench_home, counter, sanitize)) for _ in range(3)
    )
    overhead_us = max(0.0, with_log - without) / (2 * STEPS) * 1e6
    benchmark.extra_info.update(
        ops=STEPS,
        baseline="test_pipeline_steps_without_logging",
        metric="logger overhead per event (us)",
        value=overhead_us,
        aim_max=10.0,
    )


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
