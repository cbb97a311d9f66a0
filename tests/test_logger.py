"""ExecutionLogger and the session readers over real files and processes (spec 4.2, App. D)."""

from __future__ import annotations

import asyncio
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import run_cli
from sigil._native import fold_file, parse_bytes
from sigil.telemetry.execution_logger import (
    ExecutionLogger,
    LogEntry,
    SyncExecutionLogger,
    log_execution_event,
)
from sigil.telemetry.log_parser import MAX_LINE_BYTES, SessionTailer, fold_session

ROTATED = "execution_20260101_000000.jsonl"


def log_file(log_path: Path, session_id: str) -> Path:
    return log_path / "sessions" / session_id / "execution.jsonl"


def seqs_in(path: Path) -> list[int]:
    entries, bad = parse_bytes(path.read_bytes())
    assert bad == [], bad
    return [e.seq for e in entries]  # type: ignore[misc]


# ---------------------------------------------------------------------------
# The spec's API


def test_appendix_d_example_works_as_written(sigil_home: Path):
    async def main() -> None:
        async with ExecutionLogger(session_id="test-1").session() as logger:
            await logger.log_event(
                event_type="step_complete",
                component="routing",
                message="Intent classified",
                tokens=50,
                metadata={"intent": "lead_analysis"},
            )

    asyncio.run(main())
    path = log_file(sigil_home / "logs", "test-1")
    entries, bad = parse_bytes(path.read_bytes())
    assert bad == []
    assert [e.to_dict() | {"timestamp": None} for e in entries] == [
        {
            "timestamp": None,
            "session_id": "test-1",
            "event_type": "step_complete",
            "component": "routing",
            "message": "Intent classified",
            "tokens": 50,
            "metadata": {"intent": "lead_analysis"},
            "seq": 0,
        }
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (path.parent, path.parent.parent, sigil_home / "logs"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_the_async_api(tmp_path: Path):
    async def main() -> tuple[list[int], dict]:
        logger = ExecutionLogger("async-1", log_path=tmp_path, flush_interval=3600)
        assert not logger.initialized
        seqs = [await logger.log_event("step_complete", "routing", f"m{i}", i) for i in range(3)]
        assert logger.initialized
        await logger.flush()
        assert seqs_in(logger.log_file) == [0, 1, 2]  # flush() wrote it
        seqs.append(await logger.log_event("session_complete", "orchestrator", "done"))
        await logger.close()
        await logger.close()  # idempotent
        return seqs, logger.stats()

    seqs, stats = asyncio.run(main())
    assert seqs == [0, 1, 2, 3]
    assert seqs_in(log_file(tmp_path, "async-1")) == [0, 1, 2, 3]
    assert stats["lines"] == 4 and stats["fsyncs"] >= 1


def test_the_sync_twin(tmp_path: Path):
    assert SyncExecutionLogger is ExecutionLogger
    with ExecutionLogger("sync-1", log_path=tmp_path, flush_interval=3600) as logger:
        assert logger.next_seq == 0
        assert logger.log_event_sync("step_complete", "routing", "a", 5, {"k": [1]}) == 0
        assert logger.log_event_sync("step_complete", "routing", "b") == 1
        logger.flush_sync()
        assert seqs_in(logger.log_file) == [0, 1]
        for bad in (-1, 1.5, True, "3"):
            with pytest.raises(ValueError, match="tokens"):
                logger.log_event_sync("x", "c", "m", bad)  # type: ignore[arg-type]
        assert logger.next_seq == 2
    entries, _ = parse_bytes(log_file(tmp_path, "sync-1").read_bytes())
    assert entries[0].metadata == {"k": [1]} and entries[0].tokens == 5
    # logging after close reopens the file and continues the seq
    assert logger.log_event_sync("step_complete", "routing", "c") == 2
    logger.close_sync()
    assert seqs_in(log_file(tmp_path, "sync-1")) == [0, 1, 2]


def test_log_execution_event_helper(tmp_path: Path):
    async def main() -> list[int]:
        return [
            await log_execution_event("helper-1", "step_complete", "c", f"{i}", log_path=tmp_path)
            for i in range(3)
        ]

    assert asyncio.run(main()) == [0, 1, 2]
    assert seqs_in(log_file(tmp_path, "helper-1")) == [0, 1, 2]


@pytest.mark.parametrize(
    "session_id", ["../x", "", "a" * 65, "a/b", "..", ".", "a b", "x\x00", "ü", None, 42]
)
def test_invalid_session_ids_are_rejected_before_anything_is_created(
    tmp_path: Path, session_id: object
):
    logs = tmp_path / "logs"
    with pytest.raises(ValueError):
        ExecutionLogger(session_id, log_path=logs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SessionTailer(session_id, log_path=logs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fold_session(session_id, log_path=logs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        asyncio.run(log_execution_event(session_id, "x", "c", "m", log_path=logs))  # type: ignore[arg-type]
    assert not logs.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_longest_valid_session_id_is_accepted(tmp_path: Path):
    sid = "a-Z_9" * 12 + "abcd"
    assert len(sid) == 64
    with ExecutionLogger(sid, log_path=tmp_path) as logger:
        logger.log_event_sync("x", "c", "m")
    assert seqs_in(log_file(tmp_path, sid)) == [0]


# ---------------------------------------------------------------------------
# seq across reopen and rotation


def test_seq_continues_when_the_session_is_reopened(tmp_path: Path):
    def run(n: int) -> list[int]:
        with ExecutionLogger("cont-1", log_path=tmp_path) as logger:
            return [logger.log_event_sync("step_complete", "c", "m") for _ in range(n)]

    assert run(3) == [0, 1, 2]
    assert run(2) == [3, 4]
    live = log_file(tmp_path, "cont-1")
    # rotated away: the next logger starts a new live file and continues the seq
    os.rename(live, live.parent / ROTATED)
    assert run(2) == [5, 6]
    assert seqs_in(live.parent / ROTATED) == [0, 1, 2, 3, 4]
    assert seqs_in(live) == [5, 6]
    # rotated again, and an empty live file left behind (opened, nothing logged)
    os.rename(live, live.parent / "execution_20260101_000000_2.jsonl")
    with ExecutionLogger("cont-1", log_path=tmp_path) as logger:
        logger.initialize_sync()
    assert live.read_bytes() == b""
    assert run(1) == [7]
    # a crash left a torn line: the seq continues after the last whole event
    with open(live, "ab") as f:
        f.write(b'{"timestamp":"2026-01-11T10:00:00+00:00","session_id":"cont-1","seq":99')
    assert run(1) == [8]
    entries, bad = parse_bytes(live.read_bytes())
    assert [e.seq for e in entries] == [7, 8]
    assert len(bad) == 1 and "invalid JSON" in bad[0].reason


def test_rotation_under_an_open_logger_keeps_the_seq(tmp_path: Path):
    with ExecutionLogger("rot-1", log_path=tmp_path, flush_interval=3600) as logger:
        for _ in range(3):
            logger.log_event_sync("step_complete", "c", "m")
        logger.flush_sync()
        os.rename(logger.log_file, logger.session_dir / ROTATED)
        for _ in range(2):
            logger.log_event_sync("step_complete", "c", "m")
        logger.flush_sync()
        assert logger.stats()["reopens"] == 1
    assert seqs_in(logger.session_dir / ROTATED) == [0, 1, 2]
    assert seqs_in(logger.log_file) == [3, 4]


# ---------------------------------------------------------------------------
# log_event never waits for the disk


def test_log_event_completes_without_suspending(tmp_path: Path):
    """After the file is open, log_event awaits nothing: the coroutine finishes on
    its first step (no disk I/O, no hand-off to a thread)."""

    async def main() -> None:
        logger = ExecutionLogger("nowait-1", log_path=tmp_path, fsync="always", buffer_size=1)
        await logger.initialize()
        for i in range(100):
            coro = logger.log_event("step_complete", "routing", f"event {i}", tokens=1)
            with pytest.raises(StopIteration) as done:
                coro.send(None)
            assert done.value.value == i
        await logger.close()

    asyncio.run(main())
    assert seqs_in(log_file(tmp_path, "nowait-1")) == list(range(100))


def test_logging_10000_events_keeps_the_event_loop_responsive(tmp_path: Path):
    async def main() -> tuple[float, list[int], dict]:
        logger = ExecutionLogger("lag-1", log_path=tmp_path, fsync="always", buffer_size=1)
        await logger.initialize()
        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t0 - 0.001)

        tick = asyncio.create_task(ticker())
        seqs = []
        for i in range(10_000):
            seqs.append(await logger.log_event("step_complete", "routing", f"event {i}", 1))
            if i % 100 == 99:
                await asyncio.sleep(0)  # a pipeline yields between steps
        stop.set()
        await tick
        await logger.close()
        return max(lags, default=0.0), seqs, logger.stats()

    max_lag, seqs, stats = asyncio.run(main())
    assert seqs == list(range(10_000))
    assert stats["lines_written"] == 10_000
    # Each log_event fsyncing on the loop would be 10,000 fsyncs; the background
    # thread batches them.
    assert stats["fsyncs"] < 5_000, stats
    # generous: 100 events between yields must not stall the loop for long
    assert max_lag < 1.0, max_lag


# ---------------------------------------------------------------------------
# Reading a session: fold_session and SessionTailer


def test_fold_session_over_rotated_segments_and_the_live_file(tmp_path: Path):
    assert fold_session("none-1", log_path=tmp_path).status == "waiting"
    names = [ROTATED, "execution_20260101_000000_2.jsonl", "execution_20260102_000000.jsonl"]
    with ExecutionLogger("fold-1", log_path=tmp_path, flush_interval=3600) as logger:
        logger.log_event_sync("session_start", "orchestrator", "start", 0, {"budget": 500})
        for k, name in enumerate(names):
            for i in range(10):
                logger.log_event_sync("step_complete", f"c{k}", f"{k}/{i}", tokens=i)
            logger.flush_sync()
            os.rename(logger.log_file, logger.session_dir / name)
        for i in range(5):
            logger.log_event_sync("step_complete", "live", f"live/{i}", tokens=100)
        logger.log_event_sync("session_complete", "orchestrator", "done")
    summary = fold_session("fold-1", log_path=tmp_path, last_n=3)
    assert summary.files == [logger.session_dir / n for n in names] + [logger.log_file]
    assert summary.entries == 1 + 30 + 5 + 1
    assert summary.tokens_used == 3 * 45 + 500
    assert summary.max_seq == 36 and summary.seq_gaps == 0 and summary.seq_regressions == 0
    assert summary.budget == 500
    assert summary.status == "complete"
    assert {k: c.tokens for k, c in summary.components.items()} == {
        "orchestrator": 0,
        "c0": 45,
        "c1": 45,
        "c2": 45,
        "live": 500,
    }
    assert [e.seq for e in summary.last_entries] == [34, 35, 36]
    # the same as folding the files one after another by hand
    by_hand = sum(fold_file(p)["tokens"] for p in summary.files)
    assert by_hand == summary.tokens_used


LIVE_WRITER = """
import os, sys, time
from sigil.telemetry.execution_logger import ExecutionLogger
log_path, n, rotate_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
logger = ExecutionLogger("live-1", log_path=log_path, flush_interval=0.002, fsync="never",
                         sanitizer=False)
logger.initialize_sync()
for i in range(n):
    logger.log_event_sync("step_complete", "routing", f"event {i}", tokens=i % 13)
    if i == rotate_at:
        logger.flush_sync()
        print("ready", flush=True)
        sys.stdin.readline()
        os.rename(logger.log_file, logger.session_dir / "execution_20260101_000000.jsonl")
        print("rotated", flush=True)
    if i % 50 == 0:
        time.sleep(0.001)
logger.close_sync()
print("done", flush=True)
"""


@pytest.mark.parametrize("tailer_opened", ["before_rotation", "after_rotation"])
def test_catch_up_then_read_continues_exactly_after_the_fold(tmp_path: Path, tailer_opened: str):
    n, rotate_at = 20_000, 3_000
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE_WRITER, str(tmp_path), str(n), str(rotate_at)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin and proc.stdout
    try:
        assert proc.stdout.readline().strip() == "ready"
        tailer = None
        if tailer_opened == "before_rotation":
            tailer = SessionTailer("live-1", log_path=tmp_path)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "rotated"
        if tailer is None:
            tailer = SessionTailer("live-1", log_path=tmp_path)
        summary = tailer.catch_up(last_n=10)
        # The fold saw a prefix of the session: seq 0..M without gaps.
        m = summary.max_seq
        assert m is not None and m >= rotate_at
        assert summary.entries == m + 1
        assert (summary.seq_gaps, summary.seq_regressions, summary.malformed) == (0, 0, 0)
        assert [e.seq for e in summary.last_entries] == list(range(m - 9, m + 1))
        got: list[int] = []
        deadline = time.monotonic() + 60
        while (not got or got[-1] < n - 1) and time.monotonic() < deadline:
            result = tailer.read()
            assert result.malformed == []
            got += [e.seq for e in result.entries]  # type: ignore[misc]
            if not result.entries:
                tailer.wait(0.05)
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "done" in out
    # read() continued exactly after the fold: nothing twice, nothing lost
    assert got == list(range(m + 1, n))
    assert tailer.read().entries == []
    stats = tailer.stats()
    assert stats["truncations"] == 0
    # and the whole session folds to all n events
    whole = fold_session("live-1", log_path=tmp_path)
    assert (whole.entries, whole.max_seq, whole.seq_gaps) == (n, n - 1, 0)
    assert whole.tokens_used == sum(i % 13 for i in range(n))
    assert orjson.loads(tailer.path.read_bytes().splitlines()[-1])["seq"] == n - 1


def _fold_tokens_and_lines(log_file: Path) -> tuple[int, int, int]:
    summary = fold_file(log_file)
    return summary["tokens"], summary["entries"], summary["malformed"] + summary["oversize_lines"]


@pytest.mark.parametrize("sanitize", [True, False])
def test_any_content_is_logged_within_the_readers_line_limit(
    tmp_path: Path, sanitize: bool
) -> None:
    """Content orjson refuses, circular metadata, and values far over the line
    limit are still logged as one readable line, so their tokens are counted by
    every reader exactly as by the writer (contract 2)."""
    circular: dict[str, Any] = {"a": 1}
    circular["self"] = circular
    huge = "x" * (3 << 20)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("big int", {"v": 2**70, "latency_ms": 5}),
        ("circular", circular),
        ("huge metadata", {"blob": huge, "input_tokens": 3, "model": "m"}),
        ("huge message " + huge, {"latency_ms": 1}),
        ("many keys", {f"k{i}": "v" * 200 for i in range(20_000)}),
    ]
    logger = ExecutionLogger("limits", tmp_path, sanitizer=sanitize)
    for i, (message, meta) in enumerate(cases):
        logger.log_event_sync("step_complete", "reasoning", message, 10 + i, meta)
    logger.close_sync()
    tokens, entries, rejected = _fold_tokens_and_lines(logger.log_file)
    assert (tokens, entries, rejected) == (sum(10 + i for i in range(len(cases))), len(cases), 0)
    lines = logger.log_file.read_bytes().splitlines()
    assert all(len(line) <= MAX_LINE_BYTES for line in lines)
    big = LogEntry.from_json(lines[0])
    # Beyond 64 bits an integer is kept as its decimal string: readers would round it.
    assert big.metadata["v"] == str(2**70)
    kept = LogEntry.from_json(lines[2]).metadata
    assert kept["input_tokens"] == 3 and kept["model"] == "m"
    assert kept["metadata_truncated"]["dropped_keys"] == ["blob"]
    assert LogEntry.from_json(lines[3]).message.endswith("bytes truncated]")


def test_tokens_out_of_range_are_refused(tmp_path: Path) -> None:
    logger = ExecutionLogger("range", tmp_path, sanitizer=False)
    for bad in (-1, 1 << 63, 1.5, True, "3"):
        with pytest.raises(ValueError):
            logger.log_event_sync("x", "c", "m", bad)  # type: ignore[arg-type]
    logger.close_sync()


# ---------------------------------------------------------------------------
# Values the log cannot take as they are (issue 11 items 11, 12, 13)


def _depth(value: Any) -> int:
    """Nesting of containers: a flat dict is 1."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _step_complete(home: Path, session: str, component: str) -> list[dict[str, Any]]:
    lines = log_file(home / "logs", session).read_bytes().splitlines()
    events = [orjson.loads(line) for line in lines]
    return [
        e["metadata"]
        for e in events
        if e["event_type"] == "step_complete" and e["component"] == component
    ]


def test_nan_and_huge_ints_replace_only_themselves_in_a_real_run(sigil_home: Path) -> None:
    """Issue 11 item 13: a step's output holding NaN, infinities and 2**70 used to
    turn the whole metadata into ``metadata_error``, losing the usage and the
    output ``--resume`` needs. Only the offending values are replaced: non-finite
    floats by null, integers beyond 64 bits by their decimal string."""
    sigil_home.mkdir(parents=True)
    (sigil_home / "config.yaml").write_text(
        "pipeline:\n  steps:\n    reasoning: logger_steps:OddNumbersReasoning\n"
    )
    proc = run_cli(sigil_home, "orchestrate", "--task", "Analyze lead", "--session", "odd")
    assert proc.returncode == 0, proc.stderr
    (meta,) = _step_complete(sigil_home, "odd", "reasoning")
    assert "metadata_error" not in meta, meta
    assert (meta["input_tokens"], meta["output_tokens"], meta["model"]) == (120, 80, "odd-model")
    assert meta["output"] == {
        "summary": "odd", "score": None, "ceiling": None, "floor": None,
        "huge": str(2**70), "ok": 7,
    }  # fmt: skip


@pytest.mark.parametrize("sanitize", [True, False])
def test_only_the_offending_values_are_replaced(tmp_path: Path, sanitize: bool) -> None:
    circular: list[Any] = [1]
    circular.append(circular)
    meta = {
        "input_tokens": 3, "model": "m", "nan": math.nan, "inf": [math.inf, -math.inf, 1.5],
        "big": 2**64, "small": -(2**63) - 1, "u64": 2**64 - 1, "i64": -(2**63),
        "nested": {"deep": {"big": 2**70, "keep": "yes"}}, "loop": circular,
    }  # fmt: skip
    logger = ExecutionLogger("odd", tmp_path, sanitizer=sanitize)
    logger.log_event_sync("step_complete", "reasoning", "m", 4, meta)
    logger.close_sync()
    (line,) = logger.log_file.read_bytes().splitlines()
    got = orjson.loads(line)["metadata"]
    assert got["input_tokens"] == 3 and got["model"] == "m"
    assert got["nan"] is None and got["inf"] == [None, None, 1.5]
    assert (got["big"], got["small"]) == (str(2**64), str(-(2**63) - 1))
    assert (got["u64"], got["i64"]) == (2**64 - 1, -(2**63))
    assert got["nested"] == {"deep": {"big": str(2**70), "keep": "yes"}}
    assert got["loop"][0] == 1 and isinstance(got["loop"][1], str)
    assert fold_file(logger.log_file)["tokens"] == 4


def test_deep_metadata_is_cut_at_one_bound_and_never_poisons_the_session(
    sigil_home: Path,
) -> None:
    """Issue 11 item 11: a step output nested 126 levels deep was logged whole,
    and every later ``sigil orchestrate`` on the session exited 1 ("recursion
    limit exceeded"). The logger cuts metadata at MAX_METADATA_DEPTH (64)
    levels, the bound every reader applies, and says where it cut."""
    from sigil.core.limits import DEPTH_MARKER, MAX_METADATA_DEPTH

    assert MAX_METADATA_DEPTH == 64
    sigil_home.mkdir(parents=True)
    (sigil_home / "config.yaml").write_text(
        "pipeline:\n  steps:\n    reasoning: logger_steps:DeepReasoning\n"
    )
    for run in (1, 2):
        proc = run_cli(sigil_home, "orchestrate", "--task", "Analyze lead", "--session", "deep")
        assert proc.returncode == 0, (run, proc.stderr)
    metas = _step_complete(sigil_home, "deep", "reasoning")
    assert len(metas) == 2
    for meta in metas:
        assert (meta["input_tokens"], meta["output_tokens"]) == (30, 20)
        assert _depth(meta) == MAX_METADATA_DEPTH
        node = meta["output"]["tree"]
        while isinstance(node, dict):
            node = node["n"]
        assert node == DEPTH_MARKER


def test_metadata_at_the_depth_bound_is_kept_whole(tmp_path: Path) -> None:
    from sigil.core.limits import MAX_METADATA_DEPTH

    def nested(levels: int) -> dict[str, Any]:
        value: Any = 1
        for _ in range(levels):
            value = {"n": value}
        return value

    logger = ExecutionLogger("bound", tmp_path, sanitizer=False)
    at_bound, over = nested(MAX_METADATA_DEPTH), nested(MAX_METADATA_DEPTH + 1)
    # The bound counts the metadata object itself as level 1.
    logger.log_event_sync("x", "c", "m", 1, at_bound)
    logger.log_event_sync("x", "c", "m", 1, over)
    logger.log_event_sync("x", "c", "m", 1, {"many": [[1]] * 100, "s": "{[" * 100})
    logger.close_sync()
    first, second, third = (
        orjson.loads(x)["metadata"] for x in logger.log_file.read_bytes().splitlines()
    )
    assert first == at_bound
    assert _depth(second) == MAX_METADATA_DEPTH and second != over
    assert third == {"many": [[1]] * 100, "s": "{[" * 100}  # many brackets, shallow


def test_tokens_beyond_2_pow_53_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    """Issue 11 item 12: one valid range for ``tokens``, 0..=2**53 (contract),
    the range every reader accepts; outside it the logger raises ValueError."""
    from sigil.core.limits import MAX_TOKENS

    assert MAX_TOKENS == 2**53
    logger = ExecutionLogger("range53", tmp_path, sanitizer=False)
    assert logger.log_event_sync("x", "c", "m", 2**53) == 0
    logger.flush_sync()
    before = logger.log_file.read_bytes()
    for bad in (2**53 + 1, 2**63 - 1, 2**64 - 1):
        with pytest.raises(ValueError, match="2\\*\\*53"):
            logger.log_event_sync("x", "c", "m", bad)
    logger.close_sync()
    assert logger.log_file.read_bytes() == before
    assert fold_file(logger.log_file)["tokens"] == 2**53


# -- the sanitizer on the write path (issue 9) ------------------------------------------


def test_sanitizer_on_writes_no_secret_from_the_corpus(tmp_path: Path) -> None:
    """Every secret of the corpus, as the message, as a metadata value at any
    depth and in a list, never reaches the log; look-alikes are written as given."""
    from test_sanitization import ORDINARY, SECRETS

    logger = ExecutionLogger("scrub", tmp_path)  # the sanitizer is on by default
    for _, text, _ in SECRETS:
        logger.log_event_sync(
            "step_error",
            "reasoning",
            f"failed: {text}",
            0,
            {"error": text, "nested": {"detail": [f"at {text}", 1]}, "output": {"raw": text}},
        )
    logger.log_event_sync("step_complete", "reasoning", "ok", 1, {"ordinary": list(ORDINARY)})
    logger.close_sync()
    lines = log_file(tmp_path, "scrub").read_text(encoding="utf-8").splitlines()
    for (name, _, secret), line in zip(SECRETS, lines, strict=False):
        assert secret not in line, name
    events = [orjson.loads(line) for line in lines]
    assert events[-1]["metadata"]["ordinary"] == list(ORDINARY)
    assert seqs_in(log_file(tmp_path, "scrub")) == list(range(len(SECRETS) + 1))


def test_the_writer_scrubs_and_python_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the built-in sanitizer the writer scrubs in its own pass: the Python
    sanitizer is not run per event (it would double the cost); a sanitizer with
    extra patterns still runs in Python, after the built-in rules."""
    from sigil.telemetry.sanitization import LogSanitizer

    calls: list[str] = []
    scrub = LogSanitizer.sanitize_string

    def counting(self: LogSanitizer, value: str) -> str:
        calls.append(value)
        return scrub(self, value)

    monkeypatch.setattr(LogSanitizer, "sanitize_string", counting)
    logger = ExecutionLogger("native", tmp_path)
    logger.log_event_sync(
        "step_error",
        "c",
        "key sk-proj-abcdefghijklmnopqrstuvwxyz0123",
        0,
        {"password": "hunter2", "url": "https://u:pw1@h.example/x"},
    )
    logger.close_sync()
    assert calls == []
    event = orjson.loads(log_file(tmp_path, "native").read_bytes())
    assert event["message"] == "key ***API_KEY***"
    assert event["metadata"] == {
        "password": "***REDACTED***",
        "url": "https://u:***REDACTED***@h.example/x",
    }

    extra = ExecutionLogger(
        "extra", tmp_path, sanitizer=LogSanitizer([("acme-[0-9]+", "***ACME***")])
    )
    extra.log_event_sync("e", "c", "ACME-7 sk-proj-abcdefghijklmnopqrstuvwxyz0123", 0, {})
    extra.close_sync()
    assert calls
    event = orjson.loads(log_file(tmp_path, "extra").read_bytes())
    assert event["message"] == "***ACME*** ***API_KEY***"


def test_an_oversized_event_is_scrubbed_before_it_is_cut(tmp_path: Path) -> None:
    """Cutting a long message to size must not cut a secret short of its rule."""
    from sigil.telemetry.execution_logger import MAX_EVENT_BYTES

    key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123"
    message = "x" * (MAX_EVENT_BYTES - 30) + " " + key
    logger = ExecutionLogger("big", tmp_path)
    logger.log_event_sync("e", "c", message, 0, {"k": "y" * MAX_EVENT_BYTES + " " + key})
    logger.close_sync()
    data = log_file(tmp_path, "big").read_text(encoding="utf-8")
    assert "abcdefghijklmnopqrstuvwxyz0" not in data
    assert "sk-proj-abcdefgh" not in data
