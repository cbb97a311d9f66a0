"""100,000 events: ExecutionLogger in one process, Tailer and parser in another.

Every event must arrive exactly once, in order, and identical in every field to
what was logged (the timestamp, made by the writer, must be a current UTC time).
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sigil._native import Tailer, fold_file, parse_bytes

N = 100_000

# Shared by the writer process and the test: event i, fully determined by i.
EVENTS_SRC = """
KINDS = ["step_complete", "token_consumption", "step_error", "budget_warning", "custom.kind"]
COMPONENTS = ["routing", "memory", "planning", "reasoning", "répondeur ✓", "c\\"q", "tab\\tc"]


def make_event(i):
    message = f"event {i}: quote \\" backslash \\\\ newline \\n tab \\t ctl \\x01 ünï 🚀"
    if i % 1000 == 0:
        message += " long " + "x" * 5000
    if i % 777 == 0:
        message = ""
    metadata = {"i": i, "quarter": i / 4, "s": "y" * (i % 10), "nested": {"l": [i, None, True]}}
    if i % 5 == 0:
        metadata = {}
    return {
        "event_type": KINDS[i % len(KINDS)],
        "component": COMPONENTS[i % len(COMPONENTS)],
        "message": message,
        "tokens": (i * 7919) % 10007,
        "metadata": metadata,
    }
"""

WRITER = (
    EVENTS_SRC
    + """
import asyncio, sys, time
from sigil.telemetry.execution_logger import ExecutionLogger

async def main(log_path, n):
    logger = ExecutionLogger("e2e-1", log_path=log_path, flush_interval=0.005,
                             sanitizer=False)
    async with logger.session():
        for i in range(n):
            e = make_event(i)
            seq = await logger.log_event(e["event_type"], e["component"], e["message"],
                                         e["tokens"], e["metadata"])
            assert seq == i, (seq, i)
            if i % 1000 == 999:
                await asyncio.sleep(0.001)  # let the reader interleave with the writer
    print(logger.stats()["lines_written"])

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""
)

namespace: dict[str, Any] = {}
exec(EVENTS_SRC, namespace)
make_event = namespace["make_event"]


def test_100000_events_arrive_exactly_once_in_order_and_identical(tmp_path: Path):
    path = tmp_path / "sessions" / "e2e-1" / "execution.jsonl"
    started = datetime.now(UTC)
    tailer = Tailer(path)  # before the file exists
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), str(N)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    entries = []
    batches = 0
    deadline = time.monotonic() + 120
    try:
        while len(entries) < N:
            assert time.monotonic() < deadline, f"{len(entries)} of {N} events after 120 s"
            got, bad = tailer.read_entries()
            assert bad == [], bad[:3]
            if got:
                batches += 1
                entries += got
            else:
                if proc.poll() not in (None, 0):
                    break
                tailer.wait(0.05)
    finally:
        out, err = proc.communicate(timeout=120)
    ended = datetime.now(UTC)
    assert proc.returncode == 0, err
    assert int(out) == N
    assert len(entries) == N
    assert tailer.read_entries() == ([], [])

    data = path.read_bytes()
    assert data.endswith(b"\n")
    line_starts = [0]
    for raw in data.split(b"\n")[:-1]:
        line_starts.append(line_starts[-1] + len(raw) + 1)
    assert len(line_starts) == N + 1

    for i, entry in enumerate(entries):
        want = make_event(i)
        got_dict = entry.to_dict()
        timestamp = got_dict.pop("timestamp")
        assert got_dict == {"session_id": "e2e-1", **want, "seq": i}, i
        assert entry.offset == line_starts[i]
        ts = datetime.fromisoformat(timestamp)
        assert ts.utcoffset() == timedelta(0), timestamp
        assert started - timedelta(seconds=60) <= ts <= ended + timedelta(seconds=60), timestamp

    # the one-shot parser and the fold agree with the tailer
    parsed, bad = parse_bytes(data)
    assert bad == []
    assert [e.to_dict() for e in parsed] == [e.to_dict() for e in entries]
    summary = fold_file(path)
    assert (summary["entries"], summary["malformed"], summary["torn_tail"]) == (N, 0, False)
    assert summary["tokens"] == sum(make_event(i)["tokens"] for i in range(N))
    assert (summary["max_seq"], summary["seq_gaps"], summary["seq_regressions"]) == (N - 1, 0, 0)
    stats = tailer.stats()
    assert stats["lines"] == N and stats["bytes_read"] == len(data)
    assert batches >= 2
