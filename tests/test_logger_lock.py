"""Every writer of a session holds its lock, whatever API opens it (ARCHITECTURE.md
contract 7; issue 10 item 1, issue 11 item 14).

Real processes only: a writer through the README's Python API in one process, the
CLI (``sigil monitor``, ``sigil sessions``, ``sigil orchestrate``) in others.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SIGIL, isolated_env, run_cli, wait_for
from sigil._native import parse_bytes
from sigil.core.locks import SessionBusy, SessionLock, is_session_locked
from sigil.telemetry.execution_logger import ExecutionLogger
from sigil.telemetry.log_parser import fold_session

# A Python-API writer: opens the session with one of the README's three forms,
# logs a run's start and a step, flushes, says "paused", and waits (idle but
# alive) until told to close; then closes WITHOUT a final event, says "closed",
# and waits to be told to exit. Refused at open, it prints "busy: <message>".
API_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from sigil.core.locks import SessionBusy
    from sigil.telemetry.execution_logger import ExecutionLogger

    api, session, log_path = sys.argv[1:4]

    def say(text):
        sys.stdout.write(text + "\\n")
        sys.stdout.flush()

    def events(logger):
        logger.log_event_sync("session_start", "orchestrator", "start", 0, {"run": 1})
        logger.log_event_sync("step_complete", "routing", "Intent classified", 50,
                              {"intent": "lead_analysis", "latency_ms": 3.0})
        logger.flush_sync()
        say("paused")
        sys.stdin.readline()

    try:
        if api == "plain":
            logger = ExecutionLogger(session, log_path)
            events(logger)
            logger.close_sync()
        elif api == "with":
            with ExecutionLogger(session, log_path) as logger:
                events(logger)
        else:
            async def main():
                async with ExecutionLogger(session, log_path).session() as logger:
                    await asyncio.to_thread(events, logger)
            asyncio.run(main())
    except SessionBusy as exc:
        say(f"busy: {exc}")
        sys.exit(0)
    say("closed")
    sys.stdin.readline()
    """
)


class ApiWriter:
    """A running :data:`API_WRITER` process."""

    def __init__(self, api: str, session: str, log_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", API_WRITER, api, session, str(log_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith(word), (line, self.proc.stderr and self.proc.stderr.read())
        return line.strip()

    def tell(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


@pytest.fixture
def writers() -> Iterator[list[ApiWriter]]:
    started: list[ApiWriter] = []
    yield started
    for writer in started:
        writer.stop()


def monitor_once(home: Path, session: str) -> tuple[int, dict[str, object], str]:
    proc = run_cli(home, "monitor", "--session", session, "--once", "--mode", "json")
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["type"] == "final", proc.stdout
    text = run_cli(home, "monitor", "--session", session, "--once")
    return proc.returncode, final, text.stdout


def listed_status(home: Path, session: str) -> str:
    proc = run_cli(home, "sessions", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = (r for r in json.loads(proc.stdout) if r["session_id"] == session)
    return str(row["status"])


@pytest.mark.parametrize("api", ["plain", "with", "async"])
def test_a_paused_python_api_writer_is_live_not_incomplete(
    sigil_home: Path, writers: list[ApiWriter], api: str
) -> None:
    """Issue 10 item 1: idle and live is not incomplete; gone without a final
    event is incomplete, as before."""
    session = f"api-{api}"
    log_path = sigil_home / "logs"
    writer = ApiWriter(api, session, log_path)
    writers.append(writer)
    writer.expect("paused")
    assert is_session_locked(log_path / "sessions" / session)

    code, final, text = monitor_once(sigil_home, session)
    assert final["incomplete"] is False and final["status"] == "running", final
    assert final["tokens_used"] == 50
    assert code == 0 and "INCOMPLETE" not in text, text
    assert listed_status(sigil_home, session) == "running"

    writer.tell()
    writer.expect("closed")  # closed cleanly, no final event, process still alive
    assert not is_session_locked(log_path / "sessions" / session)
    code, final, text = monitor_once(sigil_home, session)
    assert (code, final["status"], final["incomplete"]) == (1, "incomplete", True)
    assert "SESSION INCOMPLETE" in text
    assert listed_status(sigil_home, session) == "incomplete"


def test_a_second_writer_of_the_session_is_refused(
    sigil_home: Path, writers: list[ApiWriter]
) -> None:
    """Contract 7: another process's ExecutionLogger and another in-process one
    are refused with SessionBusy; nothing of theirs is written."""
    log_path = sigil_home / "logs"
    first = ApiWriter("with", "shared", log_path)
    writers.append(first)
    first.expect("paused")
    log = log_path / "sessions" / "shared" / "execution.jsonl"
    before = log.read_bytes()

    second = ApiWriter("async", "shared", log_path)
    writers.append(second)
    refusal = second.expect("busy:")
    assert "'shared' is already running" in refusal and "process" in refusal, refusal

    local = ExecutionLogger("shared", log_path)
    with pytest.raises(SessionBusy, match="already running"):
        local.log_event_sync("step_complete", "c", "m", 5)
    with pytest.raises(SessionBusy):
        local.initialize_sync()
    assert log.read_bytes() == before

    first.tell()
    first.expect("closed")
    # The lock went with the first writer's close: the same object now opens.
    assert local.log_event_sync("step_complete", "c", "m", 5) == 2
    assert is_session_locked(log.parent)
    local.close_sync()
    assert not is_session_locked(log.parent)
    entries, bad = parse_bytes(log.read_bytes())
    assert bad == [] and [e.seq for e in entries] == [0, 1, 2]


def test_the_lock_lives_exactly_as_long_as_the_open_log(tmp_path: Path) -> None:
    """Taken on open, released on close, taken again when logging reopens the
    log; held across ``with`` and ``async with .session()``."""
    session_dir = tmp_path / "sessions" / "life"
    logger = ExecutionLogger("life", tmp_path)
    assert not is_session_locked(session_dir)
    logger.log_event_sync("step_complete", "c", "m")
    assert is_session_locked(session_dir)
    logger.close_sync()
    assert not is_session_locked(session_dir)
    logger.log_event_sync("step_complete", "c", "m")  # reopens: the lock comes back
    assert is_session_locked(session_dir)
    logger.close_sync()
    logger.close_sync()  # idempotent
    assert not is_session_locked(session_dir)

    with ExecutionLogger("life", tmp_path) as logger:
        assert is_session_locked(session_dir)
    assert not is_session_locked(session_dir)

    async def main() -> None:
        async with ExecutionLogger("life", tmp_path).session():
            assert is_session_locked(session_dir)
        assert not is_session_locked(session_dir)

    asyncio.run(main())


def test_a_lock_held_by_the_caller_is_used_not_taken_twice(tmp_path: Path) -> None:
    """The orchestrator's case: it locks the session before it reads the history,
    then hands the held lock to its logger, so one process holds one lock; the
    logger leaves a lock it did not take to its owner."""
    lock = SessionLock(tmp_path / "sessions" / "owned").acquire()
    try:
        logger = ExecutionLogger("owned", tmp_path, lock=lock)
        assert logger.log_event_sync("step_complete", "c", "m") == 0
        logger.close_sync()
        assert lock.held and is_session_locked(lock.session_dir)
    finally:
        lock.release()
    assert not is_session_locked(lock.session_dir)
    with pytest.raises(ValueError, match="another session"):
        ExecutionLogger("other", tmp_path, lock=SessionLock(tmp_path / "sessions" / "owned"))


def test_orchestrate_is_refused_while_a_python_api_writer_is_open(
    sigil_home: Path, writers: list[ApiWriter]
) -> None:
    writer = ApiWriter("plain", "mixed", sigil_home / "logs")
    writers.append(writer)
    writer.expect("paused")
    log = sigil_home / "logs" / "sessions" / "mixed" / "execution.jsonl"
    before = log.read_bytes()
    proc = run_cli(sigil_home, "orchestrate", "--task", "Analyze lead", "--session", "mixed")
    assert proc.returncode == 2 and "already running" in proc.stderr, proc.stderr
    assert log.read_bytes() == before


def test_a_python_api_writer_is_refused_while_orchestrate_runs(
    sigil_home: Path, writers: list[ApiWriter]
) -> None:
    """Issue 11 item 14: a Python-API writer during a ``sigil orchestrate`` run of
    the same session is refused; the run's seq stays unique and its log sums to
    what tokens.json says."""
    (sigil_home / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (sigil_home / "config.yaml").write_text(
        "pipeline:\n  steps:\n    planning: orchestrate_steps:SlowPlanning\n"
    )
    run = subprocess.Popen(
        [*SIGIL, "orchestrate", "--task", "Analyze lead", "--session", "race"],
        env=isolated_env(sigil_home, SIGIL_TEST_SLOW_SECONDS="5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    session_dir = sigil_home / "logs" / "sessions" / "race"
    log = session_dir / "execution.jsonl"
    try:
        wait_for(
            "the run to reach its planning step",
            lambda: (
                run.poll() is not None
                or (log.exists() and '"step_start","component":"planning"' in log.read_text())
            ),
            timeout=60,
        )
        assert run.poll() is None, run.communicate()
        writer = ApiWriter("plain", "race", sigil_home / "logs")
        writers.append(writer)
        refusal = writer.expect("busy:")
        assert "already running" in refusal
        _out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err
    entries, bad = parse_bytes(log.read_bytes())
    assert bad == []
    assert [e.seq for e in entries] == list(range(len(entries)))
    assert not any(e.message == "Intent classified" for e in entries)
    tokens = json.loads((session_dir / "tokens.json").read_text())
    assert tokens["total_used"] == fold_session("race", sigil_home / "logs").tokens_used
    assert tokens["total_used"] == sum(e.tokens for e in entries)
