"""``sigil sessions`` reads every number from the session model (issue 10 items 3
and 8): STARTED is the first run's start, DURATION the wall time from there to
the last event (to now while live), ``runs`` the model's runs; a finished
session is read without a tailer; a session whose log cannot be read is listed as
unreadable beside the others.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import SIGIL, isolated_env, run_cli
from sigil.core.locks import SessionLock

TASK = "Analyze Acme Corp"


def _rows(home: Path) -> dict[str, dict[str, Any]]:
    proc = run_cli(home, "sessions", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {row["session_id"]: row for row in json.loads(proc.stdout)}


def _event(when: datetime, seq: int, event_type: str, tokens: int = 0, **metadata: object) -> bytes:
    record = {
        "timestamp": when.isoformat(),
        "session_id": "s",
        "event_type": event_type,
        "component": "orchestrator" if event_type.startswith("session") else "reasoning",
        "message": event_type,
        "tokens": tokens,
        "metadata": metadata,
        "seq": seq,
    }
    return json.dumps(record).encode() + b"\n"


def test_started_is_the_first_runs_start_and_duration_spans_all_runs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for _ in range(2):
        proc = run_cli(home, "orchestrate", "--task", TASK, "--session", "two", "--json")
        assert proc.returncode == 0, proc.stderr
        time.sleep(2.0)
    tokens = json.loads((home / "logs" / "sessions" / "two" / "tokens.json").read_text())
    row = _rows(home)["two"]
    assert row["runs"] == 2
    assert [r["run"] for r in row["run_details"]] == [1, 2]
    assert sum(r["tokens_used"] for r in row["run_details"]) == row["tokens_used"]
    assert row["tokens_used"] == tokens["total_used"]
    first_start = datetime.fromisoformat(tokens["runs"][0]["started_at"])
    second_start = datetime.fromisoformat(tokens["runs"][1]["started_at"])
    assert abs((datetime.fromisoformat(row["started_at"]) - first_start).total_seconds()) < 0.5
    # Wall time from the first start to the last event: it includes the 2 s gap.
    assert row["duration_seconds"] >= (second_start - first_start).total_seconds()


def test_a_live_sessions_duration_runs_to_now(tmp_path: Path) -> None:
    home = tmp_path / "home"
    session = home / "logs" / "sessions" / "live"
    session.mkdir(parents=True)
    start = datetime.now(UTC) - timedelta(seconds=3)
    (session / "execution.jsonl").write_bytes(
        _event(start, 0, "session_start", budget=1000, run=1)
        + _event(start + timedelta(seconds=0.1), 1, "step_complete", 50)
    )
    with SessionLock(session):
        row = _rows(home)["live"]
    assert row["status"] == "running"
    assert row["duration_seconds"] >= 2.9, row
    assert row["runs"] == 1 and row["tokens_used"] == 50


def _finished(session: Path, tokens: int) -> None:
    """A finished one-run session of ``tokens`` tokens, written by hand."""
    start = datetime.now(UTC) - timedelta(minutes=5)
    session.mkdir(parents=True, exist_ok=True)
    (session / "execution.jsonl").write_bytes(
        _event(start, 0, "session_start", budget=1000, run=1)
        + _event(start + timedelta(seconds=1), 1, "step_complete", tokens)
        + _event(start + timedelta(seconds=2), 2, "session_complete", status="complete")
    )


def _unreadable_log(session: Path, kind: str) -> Path:
    session.mkdir(parents=True)
    log = session / "execution.jsonl"
    if kind == "fifo":
        os.mkfifo(log)
    elif kind == "directory":
        log.mkdir()
    else:  # a symlink to a valid log: sigil never follows links to logs
        _finished(session.parent.parent.parent / "elsewhere", 5)
        log.symlink_to(session.parent.parent.parent / "elsewhere" / "execution.jsonl")
    return log


def _check_unreadable(home: Path, log: Path, reason: str, argv: list[str] | None = None) -> None:
    """``bad`` is listed as unreadable with a one-line reason naming its log, beside
    ``good``; one line on stderr names the file; exit 0; no hang."""
    prefix = argv or []
    proc = subprocess.run(
        [*prefix, *SIGIL, "sessions", "--json"],
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(log) in lines[0] and reason in lines[0], proc.stderr
    rows = {row["session_id"]: row for row in json.loads(proc.stdout)}
    assert rows["good"]["status"] == "complete" and rows["good"]["tokens_used"] == 7
    assert rows["good"]["error"] is None
    bad = rows["bad"]
    assert bad["status"] == "unreadable", bad
    assert str(log) in bad["error"] and reason in bad["error"], bad
    assert "\n" not in bad["error"]
    assert bad["tokens_used"] is None and bad["runs"] is None

    table = subprocess.run(
        [*prefix, *SIGIL, "sessions"],
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert table.returncode == 0, table.stdout + table.stderr
    assert table.stderr == proc.stderr
    (row,) = [line for line in table.stdout.splitlines() if line.startswith("bad ")]
    assert row.split()[1] == "unreadable", table.stdout


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_an_unreadable_log_is_listed_beside_the_others(tmp_path: Path, kind: str) -> None:
    """A session whose log cannot be read is one row (status ``unreadable``, json
    ``error``) and one line on stderr; the other sessions are listed; exit 0."""
    home = tmp_path / "home"
    _finished(home / "logs" / "sessions" / "good", 7)
    log = _unreadable_log(home / "logs" / "sessions" / "bad", kind)
    _check_unreadable(home, log, "not a regular file")


@pytest.mark.parametrize("closed", ["log", "directory"])
def test_a_log_it_may_not_read_is_listed_as_unreadable(closed: str) -> None:
    """Permission denied on a session's log (or its directory): listed as
    unreadable, the rest read. As root (who may read anything) the command runs
    without the capabilities that override file permissions (root stays the owner
    of the installed package, which ``nobody`` may not be able to read)."""
    root = Path(tempfile.mkdtemp(prefix="sigil-perm-"))
    try:
        home = root / "home"
        _finished(home / "logs" / "sessions" / "good", 7)
        _finished(home / "logs" / "sessions" / "bad", 9)
        log = home / "logs" / "sessions" / "bad" / "execution.jsonl"
        for directory, _dirs, files in os.walk(root):
            os.chmod(directory, 0o755)
            for name in files:
                os.chmod(Path(directory) / name, 0o644)
        (log if closed == "log" else log.parent).chmod(0o000)
        caps = "-dac_override,-dac_read_search"
        argv = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
        _check_unreadable(home, log, "ermission denied", argv if os.geteuid() == 0 else None)
    finally:
        shutil.rmtree(root)


def test_reading_finished_sessions_opens_no_watcher(tmp_path: Path) -> None:
    """A finished session is read once: no tailer, so no inotify instance is
    created (closing 1,000 of them cost seconds of kernel time)."""
    strace = shutil.which("strace")
    assert strace is not None, "strace is needed (apt-get install strace)"
    home = tmp_path / "home"
    start = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(3):
        session = home / "logs" / "sessions" / f"done{i}"
        session.mkdir(parents=True)
        (session / "execution.jsonl").write_bytes(
            _event(start, 0, "session_start", budget=1000, run=1)
            + _event(start + timedelta(seconds=1), 1, "step_complete", 10 + i)
            + _event(start + timedelta(seconds=2), 2, "session_complete", status="complete")
        )
    trace = tmp_path / "trace.txt"
    proc = _run_traced(home, strace, trace)
    assert proc.returncode == 0, proc.stderr
    rows = {row["session_id"]: row for row in json.loads(proc.stdout)}
    assert {r["tokens_used"] for r in rows.values()} == {10, 11, 12}
    assert {r["status"] for r in rows.values()} == {"complete"}
    calls = [line for line in trace.read_text().splitlines() if "inotify_init" in line]
    assert calls == [], calls


def _run_traced(home: Path, strace: str, trace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [strace, "-f", "-qq", "-e", "trace=inotify_init,inotify_init1", "-o", str(trace),
         *SIGIL, "sessions", "--json"],
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip


def _fields(snap: Any) -> tuple[Any, ...]:
    return (
        snap.tokens,
        snap.entries,
        snap.status,
        snap.run_count,
        [(r.number, r.status, r.tokens, r.started_at, r.ended_at) for r in snap.runs],
        snap.first_timestamp,
        snap.last_timestamp,
        snap.malformed,
        snap.torn_tail,
        {name: c.tokens for name, c in snap.components.items()},
    )


def test_many_sessions_fold_as_each_alone(tmp_path: Path) -> None:
    """``snapshot_many`` (one native call over a thread pool) gives each session
    the model ``snapshot_at_rest`` gives it alone: rotated segments (sigil's and
    logrotate's, one gzip-compressed) before the live file, a session with no
    log yet, a torn last line; and for a log it cannot read, one line naming it."""
    from sigil.telemetry.log_parser import snapshot_at_rest, snapshot_many

    logs = tmp_path / "logs"
    start = datetime(2026, 1, 11, 10, 0, tzinfo=UTC)
    sessions = logs / "sessions"
    dirs = []
    for i in range(9):
        d = sessions / f"s{i}"
        d.mkdir(parents=True)
        lines = [
            _event(start + timedelta(seconds=n), n, "step_complete", 10 * i + n) for n in range(5)
        ]
        lines.insert(0, _event(start, 0, "session_start", budget=1000, run=1))
        if i % 3 == 1:  # rotated: an old sigil segment, a compressed logrotate one
            (d / "execution_20260111_100000.jsonl").write_bytes(b"".join(lines[:2]))
            (d / "execution.jsonl.1.gz").write_bytes(gzip.compress(b"".join(lines[2:4])))
            lines = lines[4:]
        if i % 3 == 2:
            lines.append(b'{"torn":')
        if i != 8:  # no log yet
            (d / "execution.jsonl").write_bytes(b"".join(lines))
        dirs.append(d)
    fifo_dir = sessions / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "execution.jsonl")
    many = snapshot_many([*dirs, fifo_dir], threads=2)
    assert len(many) == 10
    for d, snap in zip(dirs, many, strict=False):
        assert not isinstance(snap, str), snap
        assert _fields(snap) == _fields(snapshot_at_rest(d.name, logs)), d.name
    assert many[8].status == "waiting" and many[8].entries == 0
    assert isinstance(many[9], str) and str(fifo_dir / "execution.jsonl") in many[9]
    assert "not a regular file (a FIFO)" in many[9]
    assert snapshot_many([]) == []


def test_listing_without_archives_imports_no_archive_reader(tmp_path: Path) -> None:
    """Start-up is a large part of listing sessions: with no archive directory
    ``sigil sessions`` imports neither the archive reader (log_rotation, tarfile,
    gzip) nor the monitor, rich or asyncio."""
    home = tmp_path / "home"
    _finished(home / "logs" / "sessions" / "done", 3)
    probe = (
        "import sys\n"
        "from sigil.interfaces.cli.main import main\n"
        "sys.argv = ['sigil', 'sessions', '--json']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('sigil.telemetry.log_rotation', 'tarfile', 'gzip',\n"
        "         'sigil.interfaces.cli.monitor', 'rich', 'asyncio')\n"
        "print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(proc.stdout)[0]["tokens_used"] == 3, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr


def test_folding_many_sessions_lets_other_python_threads_run(tmp_path: Path) -> None:
    """``snapshot_many`` folds without the GIL: a Python thread ticking every
    2 ms beside it never stands still for long. The session is a compressed
    segment of 300 MB of events (30 gzip members), so the fold takes a while."""
    from sigil.telemetry.log_parser import snapshot_many
    from ticker import Ticker

    start = datetime(2026, 1, 11, 10, 0, tzinfo=UTC)
    line = _event(start, 1, "step_complete", 3)
    block = line * ((10 << 20) // len(line))
    session = tmp_path / "logs" / "sessions" / "heavy"
    session.mkdir(parents=True)
    (session / "execution.jsonl.1.gz").write_bytes(gzip.compress(block, 1) * 30)
    (session / "execution.jsonl").write_bytes(b"")

    with Ticker() as ticker:
        began = time.monotonic()
        (snap,) = snapshot_many([session], threads=1)
        took = time.monotonic() - began
    assert not isinstance(snap, str), snap
    assert snap.entries == 30 * (len(block) // len(line))
    gap = ticker.max_gap(began, began + took)
    # Held, the GIL would freeze the ticker for the whole fold (gap = took).
    assert took > 0.3, f"the fold took only {took:.2f}s: too short to tell"
    assert gap < min(0.25, took / 2), f"other Python threads froze for {gap:.2f}s of {took:.2f}s"


def test_unknown_usage_and_loops_are_listed(tmp_path: Path) -> None:
    """Issues 13 and 14: a loop marks the status, calls of unknown usage are
    counted beside the tokens (never as 0), in the table and in --json."""
    from test_monitor_modes import LOOP_INPUT, anomalous_session

    home = tmp_path / "home"
    anomalous_session(home / "logs", "anom")
    _finished(home / "logs" / "sessions" / "plain", 40)
    rows = _rows(home)
    row = rows["anom"]
    assert row["status"] == "complete" and row["tokens_used"] == 1320
    assert row["unknown_usage_calls"] == 1
    assert row["loops"] == [
        {"run": 1, "component": "planning", "input_sha256": LOOP_INPUT, "starts": 5,
         "seqs": [1, 2, 3, 4, 5]}
    ]  # fmt: skip
    assert rows["plain"]["unknown_usage_calls"] == 0 and rows["plain"]["loops"] == []
    proc = run_cli(home, "sessions")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert " complete+loop " in lines["anom"] and "1,320/10,000 +1 unknown" in lines["anom"]
    assert "loop" not in lines["plain"] and "unknown" not in lines["plain"]
    assert " complete " in lines["plain"]


def test_a_loop_outlives_the_session_in_the_ledger(tmp_path: Path) -> None:
    """One truth across views: a step loop listed while the session runs is
    still listed once it finished and its ledger (tokens.json) is the history."""
    from test_history_join import _ledger
    from test_monitor_modes import LOOP_INPUT, anomalous_session

    home = tmp_path / "home"
    session = anomalous_session(home / "logs", "anom", final=False)
    loop = {"run": 1, "component": "planning", "input_sha256": LOOP_INPUT, "starts": 5,
            "seqs": [1, 2, 3, 4, 5]}  # fmt: skip
    live = _rows(home)["anom"]
    assert live["status"] != "complete" and live["loops"] == [loop]
    anomalous_session(home / "logs", "anom")  # the run ends
    _ledger(session)  # the orchestrator's ledger at the run's end
    ledger = json.loads((session / "tokens.json").read_text())
    assert ledger["runs"][0]["loops"] == [loop]
    done = _rows(home)["anom"]
    assert done["status"] == "complete" and done["loops"] == [loop]
