"""A burst of events from the Python API is never dropped while the disk takes
writes (contract 4): when the writer's buffer is full and its last flush
succeeded, ``log_event_sync`` waits for the flusher to make room
(backpressure) instead of dropping events and raising ``EventsDroppedError``.
Dropping is for a disk that fails (ENOSPC, EIO: ``test_writer_faults.py``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import orjson
import pytest

from sigil.telemetry.execution_logger import EventsDroppedError, ExecutionLogger

pytestmark = [pytest.mark.timeout(120)]


def _events(log: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in log.read_bytes().splitlines()]


@pytest.mark.parametrize("flush_interval", [30.0, 0.005])
def test_a_burst_larger_than_the_buffer_is_written_whole_on_a_healthy_disk(
    tmp_path: Path, flush_interval: float
) -> None:
    """20,000 events (~4 MiB) through a 16 KiB buffer, as fast as the caller
    can: every one of them in the log, in seq order, no drop reported. With a
    flush threshold at the bound and a long interval, only the writer's wait
    for room wakes the flusher."""
    logger = ExecutionLogger(
        "burst",
        log_path=tmp_path,
        buffer_size=16 * 1024,
        flush_interval=flush_interval,
        max_buffer_bytes=16 * 1024,
        sanitizer=False,
    )
    raised: list[EventsDroppedError] = []
    sent = 0
    for i in range(20_000):
        try:
            logger.log_event_sync("step_complete", "reasoning", f"event {i}", 3, {"pad": "p" * 120})
        except EventsDroppedError as exc:
            raised.append(exc)
        sent += 3
    stats = dict(logger.stats())
    logger.close_sync()
    assert not raised, (len(raised), raised[0])
    assert stats["dropped_lines"] == 0, stats
    events = _events(logger.log_file)
    assert [e["seq"] for e in events] == list(range(20_000))
    assert sum(int(e["tokens"]) for e in events) == sent  # type: ignore[call-overload]
    assert not any(e["event_type"] == "events_dropped" for e in events)


def test_threads_bursting_at_once_lose_nothing_with_fsync_always(tmp_path: Path) -> None:
    """Four threads, 2,000 events each, into an 8 KiB buffer synced on every
    flush (each flush waits for the disk): all 8,000 written once each."""
    logger = ExecutionLogger(
        "threads",
        log_path=tmp_path,
        buffer_size=1024,
        flush_interval=0.05,
        fsync="always",
        max_buffer_bytes=8 * 1024,
        sanitizer=False,
    )
    logger.initialize_sync()
    raised: list[BaseException] = []

    def burst(t: int) -> None:
        for i in range(2_000):
            try:
                logger.log_event_sync("step_complete", f"c{t}", f"{t}:{i}", 1, {"i": i})
            except EventsDroppedError as exc:
                raised.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=burst, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    logger.close_sync()
    assert not raised, raised[0]
    events = _events(logger.log_file)
    assert sorted(int(e["seq"]) for e in events) == list(range(8_000))  # type: ignore[call-overload]
    assert sorted(str(e["message"]) for e in events) == sorted(
        f"{t}:{i}" for t in range(4) for i in range(2_000)
    )
    assert time.monotonic() - started < 60
