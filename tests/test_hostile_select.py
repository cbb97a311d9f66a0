"""``sigil monitor --tail N / --since TIME`` against hostile values and logs.

The native search (``rust/select.rs``) finds where to start; what is listed
must be exactly what filtering every event would list: the last N events,
or those at or after TIME. Real session logs (over the search's 64 KiB
linear span, so it bisects), real ``sigil monitor`` processes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import cli_env

pytestmark = [pytest.mark.timeout(60)]

Run = Callable[..., subprocess.CompletedProcess[str]]
T0 = datetime(2026, 1, 11, 10, 0, 0, tzinfo=UTC)


def _line(session: str, seq: int, at: datetime, *, first: str = "timestamp") -> bytes:
    event = {
        "timestamp": at.isoformat(timespec="microseconds"),
        "session_id": session,
        "event_type": "step_complete",
        "component": "routing",
        "message": f"ev{seq}",
        "tokens": 1,
        "metadata": {"pad": "x" * 200},
        "seq": seq,
    }
    if first != "timestamp":
        event = {first: event.pop(first), **event}
    return json.dumps(event, separators=(",", ":")).encode()


def _write(
    log_path: Path,
    session: str,
    moments: list[datetime],
    *,
    eol: bytes = b"\n",
    last_eol: bool = True,
    first: Callable[[int], str] = lambda i: "timestamp",
) -> None:
    directory = log_path / "sessions" / session
    directory.mkdir(parents=True)
    lines = [_line(session, i, at, first=first(i)) for i, at in enumerate(moments)]
    body = eol.join(lines) + (eol if last_eol else b"")
    (directory / "execution.jsonl").write_bytes(body)


def _listed(result: subprocess.CompletedProcess[str]) -> list[int]:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.stderr
    return [int(m) for m in re.findall(r"^\[[^\]]*\] routing: ev(\d+)\b", result.stdout, re.M)]


def _monitor(run_sigil: Run, session: str, *args: str) -> list[int]:
    result = run_sigil(
        "monitor", "-s", session, "--mode", "stream", "--once", *args, env={"TZ": "UTC"}, timeout=30
    )
    return _listed(result)


@pytest.fixture
def steady(log_path: Path) -> list[datetime]:
    moments = [T0 + timedelta(seconds=i) for i in range(1500)]  # ~400 KiB
    _write(log_path, "st-1", moments)
    return moments


@pytest.mark.parametrize("n", [0, 1, 7, 1499, 1500, 1501, 10**6])
def test_tail_lists_exactly_the_last_n(run_sigil: Run, steady: list[datetime], n: int) -> None:
    got = _monitor(run_sigil, "st-1", "--tail", str(n))
    assert got == list(range(1500))[len(steady) - min(n, 1500) :] if n else got == []


@pytest.mark.parametrize(
    ("since", "first"),
    [
        ("2026-01-11T10:10:00+00:00", 600),
        ("2026-01-11T10:24:59+00:00", 1499),
        ("2030-01-01T00:00:00+00:00", 1500),  # the future: nothing
        ("2000-01-01T00:00:00+00:00", 0),  # long before: everything
        ("0001-01-01T00:00:00+00:00", 0),
        ("9999-12-31T23:59:59+00:00", 1500),
    ],
)
def test_since_lists_exactly_the_events_at_or_after(
    run_sigil: Run, steady: list[datetime], since: str, first: int
) -> None:
    assert _monitor(run_sigil, "st-1", "--since", since) == list(range(first, 1500))


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
@pytest.mark.parametrize("last_eol", [True, False])
def test_crlf_and_a_last_line_without_newline(
    run_sigil: Run, log_path: Path, eol: bytes, last_eol: bool
) -> None:
    moments = [T0 + timedelta(seconds=i) for i in range(800)]
    session = f"cr-{len(eol)}-{int(last_eol)}"
    _write(log_path, session, moments, eol=eol, last_eol=last_eol)
    every = _monitor(run_sigil, session, "--all")
    assert every[:799] == list(range(799))
    assert _monitor(run_sigil, session, "--tail", "5") == every[-5:]
    since = "2026-01-11T10:10:00+00:00"
    assert _monitor(run_sigil, session, "--since", since) == [i for i in every if i >= 600]


def test_since_with_lines_whose_timestamp_is_not_first(run_sigil: Run, log_path: Path) -> None:
    """Lines whose timestamp is not at the fixed offset (another writer's key
    order): the search may start early, never late."""
    moments = [T0 + timedelta(seconds=i) for i in range(1500)]
    _write(log_path, "ko-1", moments, first=lambda i: "seq" if i % 3 else "timestamp")
    since = "2026-01-11T10:20:00+00:00"
    assert _monitor(run_sigil, "ko-1", "--since", since) == list(range(1200, 1500))
    _write(log_path, "ko-2", moments, first=lambda i: "seq")
    assert _monitor(run_sigil, "ko-2", "--since", since) == list(range(1200, 1500))


def test_since_with_a_clock_stepped_back_by_less_than_a_second(
    run_sigil: Run, log_path: Path
) -> None:
    """NTP slews: timestamps go back a little here and there; the search's
    second of slack keeps every event at or after TIME."""
    moments = [T0 + timedelta(seconds=i) - timedelta(milliseconds=700 * (i % 2))
               for i in range(1500)]  # fmt: skip
    _write(log_path, "nm-1", moments)
    since = T0 + timedelta(seconds=700)
    want = [i for i, at in enumerate(moments) if at >= since]
    assert _monitor(run_sigil, "nm-1", "--since", since.isoformat()) == want


def test_since_with_a_clock_stepped_back_an_hour(run_sigil: Run, log_path: Path) -> None:
    """The writer's clock stepped back an hour mid-log: bisecting on the
    timestamps listed nothing; the lines out of order are read in file order."""
    moments = [T0 + timedelta(seconds=i) for i in range(1500)]
    # From line 750 on the writer's clock is an hour behind.
    moments = moments[:750] + [at - timedelta(hours=1) for at in moments[750:]]
    _write(log_path, "nm-2", moments)
    since = T0 + timedelta(seconds=300)
    want = [i for i, at in enumerate(moments) if at >= since]
    assert _monitor(run_sigil, "nm-2", "--since", since.isoformat()) == want


@pytest.mark.parametrize("n", [str(2**63), str(2**64), "9" * 40])
def test_a_huge_tail_is_one_line_or_everything(
    run_sigil: Run, steady: list[datetime], n: str
) -> None:
    args = ["monitor", "-s", "st-1", "--mode", "stream", "--once", "--tail", n]
    result = run_sigil(*args, timeout=30)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode in (0, 2), result.stderr


@pytest.mark.parametrize("since", ["0001-01-01", "0001-01-01T00:00:00"])
def test_since_at_the_edge_of_time_is_one_line(
    run_sigil: Run, steady: list[datetime], since: str
) -> None:
    result = run_sigil(
        "monitor", "-s", "st-1", "--mode", "stream", "--once", "--since", since,
        env={"TZ": "Asia/Tokyo"}, timeout=30,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode in (0, 2), result.stderr


def test_monitor_with_a_closed_stdout_is_one_line(sigil_home: Path, steady: list[datetime]) -> None:
    code = (
        "import os, sys, runpy; os.close(1); sys.stdout = None; "
        "sys.argv = ['sigil', 'monitor', '-s', 'st-1', '--mode', 'stream', '--once', '--all']; "
        "runpy.run_module('sigil', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=cli_env(sigil_home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
