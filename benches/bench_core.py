"""Rows for the native core: writing, parsing, folding and tailing (spec 12.1).

Each native row runs beside the fastest plain-Python way a user would write
it, in the same group, so the report reads as a ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import quick, write_session
from sigil import _native
from sigil.telemetry.execution_logger import ExecutionLogger
from sigil.telemetry.log_parser import parse_lines

pytestmark = pytest.mark.benchmark

META = {"latency_ms": 2100, "model": "gpt-4o-mini"}


# -- writing ---------------------------------------------------------------


def _sched() -> tuple[float, int] | None:
    """This thread's seconds spent runnable but waiting for a CPU, and its
    involuntary context switches (Linux), or None."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            waited = int(f.read().split()[1]) / 1e9
        with open("/proc/thread-self/status") as f:
            switches = next(
                int(line.split()[1]) for line in f if line.startswith("nonvoluntary_ctxt")
            )
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    return waited, switches


def _log_n(home: Path, n: int, run: list[int], sched: dict[str, float] | None = None) -> float:
    """Log ``n`` events; the logging thread's CPU seconds for them (and in
    ``sched``, the loop's wall seconds, its wait for a CPU and the times it
    was preempted)."""
    run[0] += 1
    # The whole burst (17 MB at 100k events) fits the buffer: the row measures
    # the logging call, and a loaded disk's slow fsync must not turn it into
    # dropped events (the writer never blocks the caller; it drops and counts).
    logger = ExecutionLogger(
        f"w{n}-{run[0]}", home / "logs", sanitizer=False, max_buffer_bytes=64 << 20
    )
    logger.initialize_sync()
    log = logger.log_event_sync
    before, wall = _sched(), time.perf_counter()
    started = time.thread_time()
    for _ in range(n):
        log("step_complete", "reasoning", "Analysis complete", 450, META)
    cpu = time.thread_time() - started
    wall, after = time.perf_counter() - wall, _sched()
    logger.close_sync()
    if sched is not None and before is not None and after is not None:
        sched.update(wall=wall, runqueue_wait=after[0] - before[0], preempted=after[1] - before[1])
    return cpu


class _PyBufferedLogger:
    """The baseline: orjson.dumps of the entry dict, a buffered file, fsync every 100 ms."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "ab", buffering=1 << 16)  # noqa: SIM115 - closed in close()
        self.last_sync = time.monotonic()
        self.seq = 0

    def log(self, event_type: str, component: str, message: str, tokens: int, meta: Any) -> None:
        from datetime import UTC, datetime

        self.f.write(
            orjson.dumps(
                {
                    "timestamp": datetime.now(UTC).isoformat(),
                    "session_id": "b",
                    "event_type": event_type,
                    "component": component,
                    "message": message,
                    "tokens": tokens,
                    "metadata": meta,
                    "seq": self.seq,
                }
            )
            + b"\n"
        )
        self.seq += 1
        now = time.monotonic()
        if now - self.last_sync >= 0.1:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.last_sync = now

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _py_log_n(dirpath: Path, n: int, run: list[int]) -> None:
    run[0] += 1
    w = _PyBufferedLogger(dirpath / f"py{n}-{run[0]}.jsonl")
    for _ in range(n):
        w.log("step_complete", "reasoning", "Analysis complete", 450, META)
    w.close()


@pytest.mark.parametrize("n", [1_000, 100_000])
def test_write_sigil(benchmark: Any, bench_home: Path, n: int) -> None:
    benchmark.group = f"write {n:,} events"
    benchmark.extra_info.update(ops=n, baseline=f"test_write_python_orjson[{n}]")
    if n == 1_000:
        benchmark.extra_info["spec_max_s"] = 0.100  # spec 12.1: 1,000 entries < 100 ms
    else:
        benchmark.extra_info["aim_ops_per_s"] = 1_000_000
    run = [0]
    benchmark.pedantic(_log_n, args=(bench_home, n, run), rounds=5 if n == 1_000 else 2)
    if n != 1_000:
        # The calling thread's CPU time per event, which a loaded machine does
        # not inflate (the wall time above includes waiting for a CPU).
        cpu = min(_log_n(bench_home, n, run) for _ in range(2))
        benchmark.extra_info["cpu_ops_per_s"] = n / cpu
        # Where the loop's wall time goes beyond its CPU time: waiting for a
        # CPU (a loaded machine, or a thread that preempts the logging one:
        # the flush thread did at each wake-up before it became SCHED_BATCH).
        sched: dict[str, float] = {}
        _log_n(bench_home, n, run, sched)
        if sched:
            benchmark.extra_info.update(
                loop_ops_per_s=n / sched["wall"],
                loop_runqueue_wait_s=sched["runqueue_wait"],
                loop_preemptions=sched["preempted"],
            )


@pytest.mark.parametrize("n", [1_000, 100_000])
def test_write_python_orjson(benchmark: Any, tmp_path: Path, n: int) -> None:
    benchmark.group = f"write {n:,} events"
    benchmark.extra_info.update(ops=n)
    run = [0]
    benchmark.pedantic(_py_log_n, args=(tmp_path, n, run), rounds=5 if n == 1_000 else 2)


# -- parsing into Python records ------------------------------------------


@pytest.fixture(scope="module")
def lines_10k(session_10k: Path) -> list[bytes]:
    return session_10k.read_bytes().splitlines()


def test_parse_10k_sigil(benchmark: Any, lines_10k: list[bytes]) -> None:
    benchmark.group = "parse 10,000 entries into records"
    benchmark.extra_info.update(
        ops=len(lines_10k),
        baseline="test_parse_10k_orjson",
        spec_max_s=1.0,  # spec 12.1: parse 10,000 entries < 1 s
        aim_ops_per_s=1_200_000,
    )
    result = benchmark(parse_lines, lines_10k)
    assert len(result.entries) == len(lines_10k) and not result.malformed


def _orjson_records(lines: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in lines]


def _json_records(lines: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


def test_parse_10k_orjson(benchmark: Any, lines_10k: list[bytes]) -> None:
    benchmark.group = "parse 10,000 entries into records"
    benchmark.extra_info.update(ops=len(lines_10k))
    benchmark(_orjson_records, lines_10k)


def test_parse_10k_json(benchmark: Any, lines_10k: list[bytes]) -> None:
    benchmark.group = "parse 10,000 entries into records"
    benchmark.extra_info.update(ops=len(lines_10k))
    benchmark(_json_records, lines_10k)


# -- folding a whole session ----------------------------------------------
#
# Issue 9's targets, checked against rows of the same run: the fold of 1M
# entries at least 10x orjson-per-line Python with the default threads, at
# least 6 M entries/s on one thread, and at least 1.5x faster than DuckDB's
# read_json (explicit columns, 2 threads) at 1M and 10M entries. `cat` of the
# same file is the floor. The 10M rows (a 2.3 GB file) run only in the full
# `make bench`: quick mode leaves that size out of the parameters.

FOLD_SIZES = ["10k", "1m"] if quick() else ["10k", "1m", "10m"]
ENTRIES = {"10k": 10_000, "1m": 1_000_000, "10m": 10_000_000}


@pytest.fixture(scope="module")
def fold_session(request: pytest.FixtureRequest, bench_dir: Path) -> Any:
    """The session file of a size, written once per module."""
    cache: dict[str, Path] = {}

    def get(size: str) -> Path:
        if size not in cache:
            if size == "10m":
                cache[size] = write_session(bench_dir / "s10m" / "execution.jsonl", 10_000_000)
            else:
                cache[size] = request.getfixturevalue(f"session_{size}")
        return cache[size]

    return get


def _py_fold(path: Path) -> int:
    """What a user would write: orjson per line, totals in dicts."""
    tokens = 0
    per_component: dict[str, int] = {}
    with open(path, "rb") as f:
        for line in f:
            e = orjson.loads(line)
            tokens += e["tokens"]
            c = e["component"]
            per_component[c] = per_component.get(c, 0) + e["tokens"]
    return tokens


def _one_thread(fn: Any, *args: Any) -> Any:
    """Run ``fn`` on one CPU: the fold sizes its thread pool by the CPUs this
    process may use (sched_getaffinity), so this is its single-thread figure."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        return fn(*args)
    finally:
        os.sched_setaffinity(0, cpus)


@pytest.mark.parametrize("size", FOLD_SIZES)
def test_fold_sigil(benchmark: Any, size: str, fold_session: Any) -> None:
    path: Path = fold_session(size)
    n = ENTRIES[size]
    benchmark.group = f"fold {n:,} entries"
    benchmark.extra_info.update(
        ops=n,
        baselines={
            f"test_fold_python_orjson[{size}]": 10,
            f"test_fold_duckdb[{size}]": 1.5 if size != "10k" else None,
            f"test_fold_cat[{size}]": None,
        },
    )
    if size == "1m":
        # 10x orjson-per-line measured at ~1.1 M/s on the reference 2-core machine.
        benchmark.extra_info["aim_ops_per_s"] = 11_000_000
    rounds = {"10k": 5, "1m": 3, "10m": 2}[size]
    summary = benchmark.pedantic(_native.fold_file, args=(path,), rounds=rounds, warmup_rounds=1)
    assert summary["entries"] == n and summary["malformed"] == 0


@pytest.mark.parametrize("size", ["1m"])
def test_fold_sigil_one_thread(benchmark: Any, size: str, fold_session: Any) -> None:
    path: Path = fold_session(size)
    n = ENTRIES[size]
    benchmark.group = f"fold {n:,} entries"
    benchmark.extra_info.update(
        ops=n, baselines={f"test_fold_python_orjson[{size}]": None}, aim_ops_per_s=6_000_000
    )
    summary = benchmark.pedantic(
        _one_thread, args=(_native.fold_file, path), rounds=3, warmup_rounds=1
    )
    assert summary["entries"] == n


@pytest.mark.parametrize("size", FOLD_SIZES)
def test_fold_python_orjson(benchmark: Any, size: str, fold_session: Any) -> None:
    path: Path = fold_session(size)
    n = ENTRIES[size]
    benchmark.group = f"fold {n:,} entries"
    benchmark.extra_info.update(ops=n)
    benchmark.pedantic(_py_fold, args=(path,), rounds=5 if size == "10k" else 1)


def _duckdb_fold(con: Any, path: Path) -> list[tuple[Any, ...]]:
    """The same totals through DuckDB: every column given, as a user who knows
    the format would write it (no schema sampling)."""
    columns = (
        "{timestamp: 'VARCHAR', session_id: 'VARCHAR', event_type: 'VARCHAR', "
        "component: 'VARCHAR', message: 'VARCHAR', tokens: 'UBIGINT', metadata: 'JSON', "
        "seq: 'UBIGINT'}"
    )
    query = (
        "SELECT component, event_type, count(*), sum(tokens), max(seq) "
        f"FROM read_json(?, format = 'newline_delimited', columns = {columns}) "
        "GROUP BY ALL"
    )
    return con.execute(query, [str(path)]).fetchall()


@pytest.mark.parametrize("size", FOLD_SIZES)
def test_fold_duckdb(benchmark: Any, size: str, fold_session: Any) -> None:
    import duckdb  # a test-only dependency (pyproject's test extra)

    path: Path = fold_session(size)
    n = ENTRIES[size]
    benchmark.group = f"fold {n:,} entries"
    benchmark.extra_info.update(ops=n)
    con = duckdb.connect()
    con.execute("SET threads = 2")
    rows = benchmark.pedantic(
        _duckdb_fold, args=(con, path), rounds={"10k": 5, "1m": 3, "10m": 2}[size], warmup_rounds=1
    )
    assert sum(r[2] for r in rows) == n
    con.close()


@pytest.mark.parametrize("size", FOLD_SIZES)
def test_fold_cat(benchmark: Any, size: str, fold_session: Any) -> None:
    """The floor: `cat` of the file to /dev/null (the page cache is warm)."""
    path: Path = fold_session(size)
    n = ENTRIES[size]
    benchmark.group = f"fold {n:,} entries"
    benchmark.extra_info.update(ops=n)
    run = subprocess.run
    benchmark.pedantic(
        lambda: run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True),
        rounds=5,
        warmup_rounds=1,
    )


# -- tailing ---------------------------------------------------------------


def _tail_all(t: _native.Tailer) -> int:
    n = 0
    while batch := t.read_lines():
        n += len(batch)
    return n


def _py_tail_all(f: Any) -> int:
    n = 0
    for line in f:
        if line.endswith(b"\n"):
            n += 1
    return n


# Opening is setup, not timed: a tailer (or file) is opened once and then read
# for the life of a monitor; closing an inotify instance can take milliseconds
# in the kernel, which would swamp a 10,000-line read.


def test_tail_read_sigil(benchmark: Any, session_10k: Path) -> None:
    benchmark.group = "tail read 10,000 lines"
    benchmark.extra_info.update(ops=10_000, baseline="test_tail_read_python")
    n = benchmark.pedantic(_tail_all, setup=lambda: ((_native.Tailer(session_10k),), {}), rounds=50)
    assert n == 10_000


def test_tail_read_python(benchmark: Any, session_10k: Path) -> None:
    benchmark.group = "tail read 10,000 lines"
    benchmark.extra_info.update(ops=10_000)
    files: list[Any] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        while files:
            files.pop().close()
        files.append(open(session_10k, "rb"))  # noqa: SIM115 - closed in the next setup
        return (files[-1],), {}

    assert benchmark.pedantic(_py_tail_all, setup=setup, rounds=50) == 10_000
    while files:
        files.pop().close()


def test_empty_poll_sigil(benchmark: Any, session_10k: Path) -> None:
    benchmark.group = "poll that finds nothing new"
    benchmark.extra_info.update(ops=1, baseline="test_empty_poll_python")
    t = _native.Tailer(session_10k, start="end")
    assert benchmark(t.read_lines) == []


def test_empty_poll_python(benchmark: Any, session_10k: Path) -> None:
    benchmark.group = "poll that finds nothing new"
    benchmark.extra_info.update(ops=1)
    position = session_10k.stat().st_size
    inode = session_10k.stat().st_ino

    def poll() -> list[bytes]:
        st = os.stat(session_10k)
        if st.st_ino != inode or st.st_size <= position:
            return []
        with open(session_10k, "rb") as f:
            f.seek(position)
            return f.read().splitlines()

    assert benchmark(poll) == []
