"""A scriptable session writer for the monitor's end-to-end tests and benchmarks.

It plays the orchestrator's part on the file (the only channel, ARCHITECTURE.md):
it holds the session lock (contract 7) and writes events through the real
:class:`sigil.telemetry.execution_logger.ExecutionLogger`, one command per line on
stdin, and answers ``ok <next seq>`` on stdout once the events are flushed. That
gives a test exact control over what is on disk when it looks at the screen,
which a real pipeline's timing cannot.

Commands::

    start [budget] [run]          session_start (spec allocations, thresholds)
    step COMPONENT TOKENS [MS]    step_complete with metadata.latency_ms
    error COMPONENT [MS]          step_error
    tokens COMPONENT N            token_consumption
    burst N COMPONENT TOKENS      N step_complete events
    warn MESSAGE                  budget_warning
    complete | fail | budget      session_complete / session_error (error, budget_exceeded)
    rotate NAME                   rename execution.jsonl to NAME (the writer reopens the path)
    raw TEXT                      append TEXT and a newline to the log by hand
    torn TEXT                     append TEXT without a newline
    release                       close the logger and release the lock (stay alive)
    exit                          close, release and exit 0
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sigil.core.locks import SessionLock
from sigil.telemetry.execution_logger import ExecutionLogger

ALLOCATIONS = {
    "routing": 10_000,
    "memory": 30_000,
    "planning": 20_000,
    "reasoning": 150_000,
    "contracts": 10_000,
    "validation": 10_000,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--session", required=True)
    parser.add_argument("--log-path", required=True)
    parser.add_argument("--no-lock", action="store_true")
    args = parser.parse_args()

    log_path = Path(args.log_path)
    session_dir = log_path / "sessions" / args.session
    lock = None if args.no_lock else SessionLock(session_dir).acquire()
    # Every command flushes explicitly, so the background flush is kept asleep: a large
    # buffer and interval (this also keeps clear of a lock-order race between an explicit
    # flush and the background thread that the writer had when this was written).
    logger = ExecutionLogger(
        args.session,
        log_path,
        buffer_size=4 << 20,
        flush_interval=3600.0,
        fsync="never",
        sanitizer=False,
        max_buffer_bytes=64 << 20,
        lock=lock,
    )
    logger.initialize_sync()
    total = 0
    run = 0

    def log(kind: str, component: str, message: str, tokens: int = 0, **meta: object) -> None:
        nonlocal total
        total += tokens
        logger.log_event_sync(kind, component, message, tokens=tokens, metadata=meta)

    def reply(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    reply("ready")
    for raw_line in sys.stdin:
        words = raw_line.split()
        if not words:
            continue
        cmd, rest = words[0], words[1:]
        if cmd == "start":
            budget = int(rest[0]) if rest else 256_000
            run = int(rest[1]) if len(rest) > 1 else run + 1
            log(
                "session_start",
                "orchestrator",
                f"Starting run {run}",
                budget=budget,
                run=run,
                allocations=ALLOCATIONS,
                task="e2e task",
                thresholds={"warning": 0.5, "critical": 0.8, "exceeded": 0.95},
            )
        elif cmd == "step":
            latency = float(rest[2]) if len(rest) > 2 else 10.0
            log("step_complete", rest[0], f"{rest[0]} step done", int(rest[1]), latency_ms=latency)
        elif cmd == "error":
            latency = float(rest[1]) if len(rest) > 1 else 5.0
            log(
                "step_error", rest[0], f"{rest[0]} step failed", 0, latency_ms=latency, error="boom"
            )
        elif cmd == "tokens":
            log("token_consumption", rest[0], f"{rest[0]} used tokens", int(rest[1]))
        elif cmd == "burst":
            for i in range(int(rest[0])):
                log("step_complete", rest[1], f"{rest[1]} step {i}", int(rest[2]), latency_ms=1.0)
        elif cmd == "warn":
            log("budget_warning", "orchestrator", " ".join(rest) or "budget warning")
        elif cmd in ("complete", "fail", "budget"):
            status = {"complete": "complete", "fail": "error", "budget": "budget_exceeded"}[cmd]
            kind = "session_complete" if cmd == "complete" else "session_error"
            log(
                kind,
                "orchestrator",
                f"Run {run} {status}",
                status=status,
                total_tokens=total,
                run=run,
            )
        elif cmd == "rotate":
            logger.flush_sync()
            os.rename(session_dir / "execution.jsonl", session_dir / rest[0])
        elif cmd in ("raw", "torn"):
            logger.flush_sync()
            text = raw_line.rstrip("\n").split(" ", 1)[1] if len(words) > 1 else ""
            end = "\n" if cmd == "raw" else ""
            with open(session_dir / "execution.jsonl", "a", encoding="utf-8") as f:
                f.write(text + end)
        elif cmd == "release":
            logger.close_sync()
            if lock is not None:
                lock.release()
        elif cmd == "exit":
            break
        else:
            reply(f"unknown command {cmd!r}")
            continue
        if logger.initialized:
            logger.flush_sync()
        reply(f"ok {total}")
    logger.close_sync()
    if lock is not None:
        lock.release()
    reply("bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
