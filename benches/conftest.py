"""Benchmark fixtures and the conventions ``scripts/check_bench.py`` reads.

Every row runs beside its pure-Python baseline in the same run (one
``benchmark.group``) and records in ``benchmark.extra_info``:

- ``ops``: items processed per call (the report prints items per second);
- ``baseline``: the name of the baseline benchmark in the same group;
- ``spec_max_s``: the spec's limit on the mean time per call -- exceeding it fails CI;
- ``aim_max_s`` / ``aim_ratio`` / ``aim_ops_per_s``: targets reported, not enforced
  (they depend on the machine);
- ``metric`` / ``value`` / ``spec_max`` / ``aim_max``: for rows that measure
  something other than time (memory in MB, CPU percent, lag in ms).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

COMPONENTS = ("routing", "memory", "planning", "reasoning", "contracts", "validation")


def event_line(seq: int, session_id: str = "bench") -> bytes:
    """A realistic event line as sigil's writer produces it (about 230 bytes)."""
    comp = COMPONENTS[seq % len(COMPONENTS)]
    return orjson.dumps(
        {
            "timestamp": "2026-01-11T10:15:33.234567+00:00",
            "session_id": session_id,
            "event_type": "step_complete",
            "component": comp,
            "message": f"{comp.title()} completed",
            "tokens": 50 + seq % 400,
            "metadata": {"latency_ms": 1100.5, "model": "gpt-4o-mini"},
            "seq": seq,
        }
    )


def write_session(path: Path, n: int, session_id: str = "bench") -> Path:
    """Write an ``n``-event session log (session_start first) straight to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    start = orjson.dumps(
        {
            "timestamp": "2026-01-11T10:15:32.000000+00:00",
            "session_id": session_id,
            "event_type": "session_start",
            "component": "orchestrator",
            "message": "Starting pipeline",
            "tokens": 0,
            "metadata": {"task": "bench", "budget": 10**12},
            "seq": 0,
        }
    )
    with open(path, "wb") as f:
        f.write(start + b"\n")
        chunk: list[bytes] = []
        for seq in range(1, n):
            chunk.append(event_line(seq, session_id))
            if len(chunk) == 10_000:
                f.write(b"\n".join(chunk) + b"\n")
                chunk.clear()
        if chunk:
            f.write(b"\n".join(chunk) + b"\n")
    return path


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def session_10k(bench_dir: Path) -> Path:
    return write_session(bench_dir / "s10k" / "execution.jsonl", 10_000)


@pytest.fixture(scope="session")
def session_1m(bench_dir: Path) -> Path:
    return write_session(bench_dir / "s1m" / "execution.jsonl", 1_000_000)


@pytest.fixture
def bench_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SIGIL_HOME", str(tmp_path / "home"))
    yield tmp_path / "home"


def quick() -> bool:
    """True in CI's quick mode (fewer rounds); set by ``make bench-quick``."""
    return os.environ.get("SIGIL_BENCH_QUICK") == "1"
