"""Rows for the sanitizer on the write path (issue 9: "the write path with the sanitizer on").

The rows log the same events through ``ExecutionLogger.log_event_sync`` with the
sanitizer off and on (the default), with the default fsync policy. Each "on" row
also times the "off" case itself, interleaved in the same process, and records
the cost the sanitizer adds per event as ``metric``/``value`` against the aim
of at most 2 us (``aim_max``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sigil.telemetry.execution_logger import ExecutionLogger

pytestmark = pytest.mark.benchmark

N = 20_000
#: A step_complete event as the orchestrator logs it.
CLEAN = (
    "step_complete",
    "reasoning",
    "Reasoning completed",
    450,
    {
        "input_tokens": 300,
        "output_tokens": 150,
        "latency_ms": 2100.5,
        "model": "gpt-4o-mini",
        "attempt": 1,
        "output": {"analysis": "Acme Corp is a mid-size vendor", "confidence": 0.82},
    },
)
#: A step_error event whose error text carries a key and a URL password.
SECRET = (
    "step_error",
    "reasoning",
    "401 from https://admin:s3cr3t-P4ss@api.example.com for key "
    "sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789",
    0,
    {"error": "Authorization: Bearer 0123456789abcdef0123456789abcdef", "attempt": 2},
)
EVENTS = {"clean": CLEAN, "secret": SECRET}


def _log(
    home: Path,
    run: list[int],
    sanitize: bool,
    event: tuple[Any, ...],
    clock: Any = time.perf_counter,
) -> float:
    """Log N copies of ``event``; the seconds log_event_sync took in all, by ``clock``."""
    run[0] += 1
    logger = ExecutionLogger(f"san-{run[0]}", home / "logs", sanitizer=sanitize)
    logger.initialize_sync()
    log = logger.log_event_sync
    started = clock()
    for _ in range(N):
        log(*event)
    elapsed = clock() - started
    logger.close_sync()
    return elapsed


@pytest.mark.parametrize("kind", ["clean", "secret"])
@pytest.mark.parametrize("sanitize", [False, True], ids=["off", "on"])
def test_log_event_sanitizer(benchmark: Any, bench_home: Path, kind: str, sanitize: bool) -> None:
    event = EVENTS[kind]
    benchmark.group = f"log_event_sync, {kind} events, sanitizer off/on"
    benchmark.extra_info.update(ops=N)
    run = [0]
    if not sanitize:
        benchmark.extra_info["aim_ops_per_s"] = 1_000_000
        benchmark.pedantic(_log, args=(bench_home, run, False, event), rounds=3)
        return
    benchmark.extra_info["baseline"] = f"test_log_event_sanitizer[off-{kind}]"
    benchmark.pedantic(_log, args=(bench_home, run, True, event), rounds=3)
    # The added cost, measured off/on interleaved so that both see the same load.
    off = min(_log(bench_home, run, False, event) for _ in range(3))
    on = min(_log(bench_home, run, True, event) for _ in range(3))
    benchmark.extra_info.update(
        metric="sanitizer cost us/event", value=(on - off) / N * 1e6, aim_max=2.0
    )
    # The same in the logging thread's CPU time, which a loaded machine (other
    # processes taking the CPU) does not inflate: the figure to compare runs by.
    cpu = time.thread_time
    off = min(_log(bench_home, run, False, event, cpu) for _ in range(3))
    on = min(_log(bench_home, run, True, event, cpu) for _ in range(3))
    benchmark.extra_info["cpu_cost_us"] = (on - off) / N * 1e6
    benchmark.extra_info["cpu_us_per_event_off_on"] = [off / N * 1e6, on / N * 1e6]
