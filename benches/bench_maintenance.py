"""Log maintenance benchmarks: the spec's table rows (12.1) beside their baselines.

Each group holds sigil's implementation and a baseline measured in the same run,
so the report reads as a ratio:

* ``rotate-10MB``: sigil's rotation (one rename; spec target < 1 s) against the
  copy-and-truncate that log rotators often use (and that loses lines).
* ``archive-10MB``: sigil's verified, crash-safe archive of a session with a
  10 MB log (spec target < 5 s) against the spec's own ``_archive_session``
  (gzip level 9, no verification, no fsync).
* ``sanitize-event`` / ``sanitize-event-with-secret``: serialising one event
  with sigil's sanitizer, with the spec's sanitizer, and with none.

Run: ``python -m pytest benches/bench_maintenance.py --benchmark-only``.
"""

from __future__ import annotations

import gzip
import itertools
import os
import random
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from sigil.telemetry.log_rotation import LogRotator
from sigil.telemetry.sanitization import LogSanitizer

MB = 1024 * 1024


def jsonl_payload(size: int) -> bytes:
    """Event lines like the orchestrator's, varied enough to compress realistically."""
    rng = random.Random(7)
    components = ["routing", "memory", "planning", "reasoning", "contracts", "validation"]
    lines: list[bytes] = []
    total = 0
    seq = 0
    while total < size:
        line = orjson.dumps(
            {
                "timestamp": f"2026-01-11T10:{seq // 6000 % 60:02d}:{seq // 100 % 60:02d}."
                f"{rng.randrange(10**6):06d}+00:00",
                "session_id": "bench",
                "event_type": "step_complete",
                "component": rng.choice(components),
                "message": f"step {seq} finished after {rng.randrange(5000)} ms",
                "tokens": rng.randrange(2000),
                "metadata": {"latency_ms": rng.random() * 3000, "attempt": rng.randrange(3)},
                "seq": seq,
            }
        )
        lines.append(line + b"\n")
        total += len(line) + 1
        seq += 1
    return b"".join(lines)[:size]


@pytest.fixture(scope="module")
def ten_mb() -> bytes:
    return jsonl_payload(10 * MB)


# -- rotate-10MB ---------------------------------------------------------------


def test_rotate_10mb_sigil_rename(benchmark: Any, tmp_path: Path, ten_mb: bytes) -> None:
    benchmark.group = "rotate-10MB"
    session = tmp_path / "sessions" / "bench"
    session.mkdir(parents=True)
    log = session / "execution.jsonl"
    rotator = LogRotator(tmp_path)

    def setup() -> None:
        for old in session.glob("execution_*.jsonl"):
            old.unlink()
        log.write_bytes(ten_mb)

    benchmark.pedantic(lambda: rotator.rotate(log), setup=setup, rounds=20)
    assert not log.exists()


def test_rotate_10mb_baseline_copy_truncate(benchmark: Any, tmp_path: Path, ten_mb: bytes) -> None:
    benchmark.group = "rotate-10MB"
    log = tmp_path / "execution.jsonl"

    def copy_truncate() -> None:
        shutil.copyfile(log, tmp_path / "execution.1.jsonl")
        with open(log, "r+b") as file:
            file.truncate(0)

    def setup() -> None:
        log.write_bytes(ten_mb)

    benchmark.pedantic(copy_truncate, setup=setup, rounds=20)


# -- archive-10MB --------------------------------------------------------------


def make_old_session(log_path: Path, ten_mb: bytes) -> None:
    session = log_path / "sessions" / "bench"
    shutil.rmtree(log_path, ignore_errors=True)
    session.mkdir(parents=True)
    (session / "execution.jsonl").write_bytes(ten_mb)
    (session / "tokens.json").write_bytes(b'{"total_used": 650, "total_budget": 256000}')
    (session / "metrics.json").write_bytes(b'{"duration_seconds": 5.1}')
    old = time.time() - 30 * 86400
    for path in (*session.iterdir(), session):
        os.utime(path, (old, old))


def test_archive_10mb_sigil_verified(benchmark: Any, tmp_path: Path, ten_mb: bytes) -> None:
    benchmark.group = "archive-10MB"
    rotator = LogRotator(tmp_path, retention_days=7)

    def archive() -> None:
        assert len(rotator.archive_old_sessions()) == 1

    benchmark.pedantic(archive, setup=lambda: make_old_session(tmp_path, ten_mb), rounds=5)
    assert not (tmp_path / "sessions" / "bench").exists()


def test_archive_10mb_baseline_spec(benchmark: Any, tmp_path: Path, ten_mb: bytes) -> None:
    """The spec's ``_archive_session`` + ``rmtree``, as written in its section 7.3."""
    benchmark.group = "archive-10MB"
    archive_file = tmp_path / "spec.tar.gz"

    def spec_archive() -> None:
        session_dir = tmp_path / "sessions" / "bench"
        with gzip.open(archive_file, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
            tar.add(session_dir, arcname=session_dir.name)
        shutil.rmtree(session_dir)

    benchmark.pedantic(spec_archive, setup=lambda: make_old_session(tmp_path, ten_mb), rounds=5)


# -- sanitize-event --------------------------------------------------------------


class SpecSanitizer:
    """The spec's LogSanitizer (11.2), verbatim in behaviour: six ``re.sub`` per string."""

    SENSITIVE_PATTERNS = [
        (r'api[_-]?key["\']?\s*[:=]\s*["\']?[\w-]+', "api_key=***REDACTED***"),
        (r'password["\']?\s*[:=]\s*["\']?[^\s"\']+', "password=***REDACTED***"),
        (r"bearer\s+[\w-]+", "Bearer ***REDACTED***"),
        (r"sk-[a-zA-Z0-9]{20,}", "***API_KEY***"),
        (r"\b\d{16}\b", "***CARD_NUMBER***"),
        (r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Z|a-z]{2,}\b", "***EMAIL***"),
    ]

    def sanitize_string(self, value: str) -> str:
        for pattern, replacement in self.SENSITIVE_PATTERNS:
            value = re.sub(pattern, replacement, value, flags=re.IGNORECASE)
        return value

    def sanitize_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        return {
            k: self.sanitize_string(v)
            if isinstance(v, str)
            else self.sanitize_dict(v)
            if isinstance(v, dict)
            else v
            for k, v in data.items()
        }


CLEAN_EVENT = (
    "Intent classified as: lead_analysis (confidence 0.93)",
    {"latency_ms": 1100, "intent": "lead_analysis", "model": "gpt-4o-mini", "attempt": 1},
)
SECRET_EVENT = (
    "401 from provider: key sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789 rejected",
    {"latency_ms": 80, "url": "https://user:hunter2@api.example.com/v1", "attempt": 2},
)


def serialise(
    sanitizer: LogSanitizer | SpecSanitizer | None, event: tuple[str, dict[str, Any]]
) -> Callable[[], bytes]:
    """The write path of one event; each message is new (like a real log's)."""
    template, metadata = event
    counter = itertools.count()

    def write_path() -> bytes:
        msg, meta = f"{template} #{next(counter)}", metadata
        if sanitizer is not None:
            msg, meta = sanitizer.sanitize_string(msg), sanitizer.sanitize_dict(meta)
        return orjson.dumps({"message": msg, "tokens": 50, "metadata": meta})

    return write_path


SANITIZERS: dict[str, Callable[[], LogSanitizer | SpecSanitizer | None]] = {
    "baseline_no_sanitizer": lambda: None,
    "sigil": LogSanitizer,
    "spec": SpecSanitizer,
}


@pytest.mark.parametrize("name", list(SANITIZERS))
def test_sanitize_event(benchmark: Any, name: str) -> None:
    benchmark.group = "sanitize-event"
    benchmark(serialise(SANITIZERS[name](), CLEAN_EVENT))


@pytest.mark.parametrize("name", list(SANITIZERS))
def test_sanitize_event_with_secret(benchmark: Any, name: str) -> None:
    benchmark.group = "sanitize-event-with-secret"
    out = benchmark(serialise(SANITIZERS[name](), SECRET_EVENT))
    if name == "sigil":
        assert b"hunter2" not in out and b"Ab3dEfGhIjKl" not in out
