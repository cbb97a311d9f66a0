"""The tailer's edges: only regular files, interruptible waits, no GIL held on
its locks (issue 9 defects 4, 7 and 8; ARCHITECTURE.md contract 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import run_cli
from sigil._native import Tailer, fold_file, tail_max_seq
from ticker import Ticker

LINE = (
    b'{"timestamp":"2026-01-01T00:00:00+00:00","session_id":"s1","event_type":"step_complete",'
    b'"component":"routing","message":"m","tokens":3,"metadata":{},"seq":0}\n'
)


def run_native(script: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a snippet in a fresh interpreter, so that a hang is a timeout, not a stuck suite."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---------------------------------------------------------------------------
# Defect 7: a FIFO or a symlink at a log path


@pytest.mark.parametrize("call", ["Tailer(p)", "fold_file(p)", "tail_max_seq(p)"])
def test_a_fifo_at_the_log_path_is_refused_at_once(tmp_path: Path, call: str) -> None:
    fifo = tmp_path / "execution.jsonl"
    os.mkfifo(fifo)
    start = time.monotonic()
    proc = run_native(
        f"""
        import sys
        from sigil._native import Tailer, fold_file, tail_max_seq
        p = {str(fifo)!r}
        try:
            {call}
        except OSError as exc:
            print("refused:", exc)
            sys.exit(0)
        sys.exit("accepted a FIFO")
        """
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not a regular file" in proc.stdout
    assert str(fifo) in proc.stdout
    assert time.monotonic() - start < 15


def test_a_fifo_that_appears_later_is_refused_by_the_next_read(tmp_path: Path) -> None:
    path = tmp_path / "execution.jsonl"
    proc = run_native(
        f"""
        import os, sys
        from sigil._native import Tailer
        t = Tailer({str(path)!r})  # nothing there yet: it waits for the file
        os.mkfifo({str(path)!r})
        try:
            t.read_lines()
        except OSError as exc:
            print("refused:", exc)
            sys.exit(0)
        sys.exit("read a FIFO")
        """
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not a regular file" in proc.stdout


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.jsonl"
    real.write_bytes(LINE)
    link = tmp_path / "execution.jsonl"
    link.symlink_to(real)
    with pytest.raises(OSError, match="symbolic link"):
        Tailer(link)
    with pytest.raises(OSError, match="symbolic link"):
        fold_file(link)
    with pytest.raises(OSError, match="symbolic link"):
        tail_max_seq(link)


def _session_with_fifo(home: Path, session: str = "s1") -> Path:
    directory = home / "logs" / "sessions" / session
    directory.mkdir(parents=True)
    fifo = directory / "execution.jsonl"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.parametrize(
    "args",
    [
        ["monitor", "--session", "s1", "--once"],
        ["monitor", "--session", "s1", "--once", "--mode", "json"],
        ["export", "--session", "s1", "--endpoint", "http://127.0.0.1:9/v1/traces"],
    ],
)
def test_cli_commands_on_a_fifo_log_say_so_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    home = tmp_path / "home"
    fifo = _session_with_fifo(home)
    proc = run_cli(home, *args, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "not a regular file" in lines[0] and str(fifo) in lines[0]
    assert "Traceback" not in proc.stderr


def test_sessions_with_a_fifo_log_says_which_file_without_hanging(tmp_path: Path) -> None:
    """A FIFO at a session's log: ``sigil sessions`` lists that session as
    unreadable (its json ``error`` says why), says which file on one line of
    stderr, does not hang, and exits 0 (issue 10: one bad session does not hide
    the others)."""
    home = tmp_path / "home"
    fifo = _session_with_fifo(home)
    proc = run_cli(home, "sessions", "--json", timeout=30)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not a regular file" in proc.stderr and str(fifo) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["status"] == "unreadable" and str(fifo) in row["error"]


# ---------------------------------------------------------------------------
# Defect 8: Tailer.wait can be interrupted


def test_sigint_interrupts_wait_within_a_slice(tmp_path: Path) -> None:
    path = tmp_path / "execution.jsonl"
    path.write_bytes(b"")
    proc = run_native(
        f"""
        import os, signal, threading, time
        from sigil._native import Tailer
        t = Tailer({str(path)!r})
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            t.wait(8.0)
        except KeyboardInterrupt:
            print(f"interrupted after {{time.monotonic() - start:.3f}}")
        else:
            print(f"not interrupted, returned after {{time.monotonic() - start:.3f}}")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("interrupted after"), proc.stdout
    elapsed = float(proc.stdout.split()[-1])
    # The signal came at 0.5 s; slices are 100 ms (generous margin on a loaded machine).
    assert elapsed < 2.0, proc.stdout


def test_a_signal_handler_that_does_not_raise_lets_wait_go_on(tmp_path: Path) -> None:
    path = tmp_path / "execution.jsonl"
    path.write_bytes(b"")
    seen: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        t = Tailer(path)
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        start = time.monotonic()
        assert t.wait(1.0) is False
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert seen == [signal.SIGUSR1]
    assert time.monotonic() - start >= 0.9


# ---------------------------------------------------------------------------
# Defect 4: stats() and checkpoint() while another thread is in wait()


def _max_tick_gap(action: Callable[[], None], during: float) -> float:
    """The longest pause of a ticking Python thread while ``action`` repeats."""
    with Ticker() as ticker:
        end = time.monotonic() + during
        while time.monotonic() < end:
            action()
            time.sleep(0.01)
    return ticker.max_gap()


@pytest.mark.parametrize("method", ["stats", "checkpoint"])
def test_stats_and_checkpoint_do_not_freeze_python_while_another_thread_waits(
    tmp_path: Path, method: str
) -> None:
    path = tmp_path / "execution.jsonl"
    path.write_bytes(LINE)
    t = Tailer(path)
    assert len(t.read_lines()) == 1
    waiter = threading.Thread(target=t.wait, args=(3.0,))
    waiter.start()
    try:
        time.sleep(0.2)  # the waiter is inside wait() now
        gap = _max_tick_gap(getattr(t, method), during=1.5)
        values = [getattr(t, method)() for _ in range(3)]
    finally:
        waiter.join()
    assert gap < 0.5, f"other Python threads froze for {gap:.2f}s"
    if method == "stats":
        assert values[0]["lines"] == 1
    else:
        assert values[0] is not None and values[0].offset == len(LINE)


def test_stats_are_current_after_each_read(tmp_path: Path) -> None:
    path = tmp_path / "execution.jsonl"
    path.write_bytes(LINE * 3)
    t = Tailer(path)
    assert t.stats()["lines"] == 0
    assert len(t.read_lines(max_lines=2)) == 2
    assert t.stats()["lines"] == 2
    cp = t.checkpoint()
    assert cp is not None and cp.offset == 2 * len(LINE)
    assert len(t.read_lines()) == 1
    assert t.stats()["lines"] == 3
    assert t.stats()["bytes_read"] == 3 * len(LINE)
