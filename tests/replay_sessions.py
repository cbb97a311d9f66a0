"""Synthetic finished sessions for ``sigil replay``'s memory tests and
benchmarks (``tests/test_replay_memory.py``, ``benches/bench_replay.py``):
runs of 1,000 events (a ``session_start`` declaring its run, steps of four
components, a ``session_complete``), 10 ms apart, from 10:00 on 2026-01-11.
"""

from __future__ import annotations

NAMES = ("routing", "memory", "reasoning", "validation")
#: events per run
RUN_EVENTS = 1000


def replay_lines(session: str, first: int, count: int, *, last: int | None = None) -> bytes:
    """``count`` events from seq ``first``, as JSON lines. ``last``: the
    session's last seq, where its final event closes the run it ends (a run
    cut short of its 1,000 events)."""
    out: list[str] = []
    for seq in range(first, first + count):
        i = seq % RUN_EVENTS
        sec, ms = divmod(seq * 10, 1000)
        minute, sec = divmod(sec, 60)
        hour, minute = divmod(minute, 60)
        stamp = f"2026-01-11T{10 + hour:02d}:{minute:02d}:{sec:02d}.{ms:03d}000+00:00"
        if i == 0:
            kind, comp, tokens = "session_start", "orchestrator", 0
            meta = f'{{"run": {seq // RUN_EVENTS + 1}}}'
        elif i == RUN_EVENTS - 1 or seq == last:
            kind, comp, tokens = "session_complete", "orchestrator", 0
            meta = '{"status": "complete"}'
        else:
            kind, comp, tokens = "step_complete", NAMES[i % 4], 100 + i % 7
            meta = '{"latency_ms": 900, "model": "gpt-4o-mini"}'
        out.append(
            f'{{"timestamp": "{stamp}", "session_id": "{session}", "event_type": "{kind}", '
            f'"component": "{comp}", "message": "{comp} {kind} {seq}", "tokens": {tokens}, '
            f'"metadata": {meta}, "seq": {seq}}}\n'
        )
    return "".join(out).encode()
