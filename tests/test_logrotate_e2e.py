"""Debian's ``logrotate`` rotating a session written by ``sigil orchestrate``
(issue 11 items 1-3, the reading side; ARCHITECTURE.md contract 13).

Real processes only: two ``sigil orchestrate`` runs on one session with a real
``logrotate -f`` between them (and one more after), in ``create`` and
``copytruncate`` modes, with ``compress`` on and off and ``dateext`` on and off.
Whatever is left on disk -- ``execution.jsonl.1``, ``.2.gz``,
``execution.jsonl-YYYYmmdd[.gz]`` -- every reader sees all of it, oldest first:
``fold_session``'s totals equal the sum of the tokens of the events on disk
(read here independently with ``gzip``), with no seq missing, and the second
run continues the session (run 2, the next seq) because the orchestrator's
history and the logger's next seq read the segments too.

logrotate is installed by the test setup when missing (``apt-get install -y
logrotate``, as ``make install`` does); these tests never skip.
"""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import SIGIL, isolated_env, run_cli, wait_for
from sigil._native import Fold, Tailer
from sigil.core.paths import LOG_FILE_NAME, rotated_segments
from sigil.telemetry.log_parser import SessionTailer, fold_session

SESSION = "rotated-by-logrotate"


@pytest.fixture(scope="session")
def logrotate() -> str:
    """The logrotate binary, installed with apt-get if it is missing."""
    found = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin:/sbin")
    if found is None:
        install = ["apt-get", "install", "-y", "-q", "logrotate"]
        if subprocess.run(install, capture_output=True, timeout=600, check=False).returncode:
            subprocess.run(
                ["apt-get", "update", "-q"], capture_output=True, timeout=600, check=True
            )
            subprocess.run(install, capture_output=True, timeout=600, check=True)
        found = shutil.which("logrotate", path="/usr/sbin:/sbin:/usr/bin")
    assert found is not None, "logrotate is required: apt-get install -y logrotate"
    return found


def rotate(binary: str, home: Path, session_dir: Path, options: list[str]) -> None:
    config = home / "logrotate.conf"
    body = "\n".join(["rotate 10", "missingok", "notifempty", *options])
    config.write_text(f"{session_dir / LOG_FILE_NAME} {{\n{body}\n}}\n")
    config.chmod(0o644)
    proc = subprocess.run(
        [binary, "-f", "-s", str(home / "logrotate.state"), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def orchestrate(home: Path) -> dict[str, Any]:
    proc = run_cli(
        home, "orchestrate", "--task", "Analyze Acme Corp", "--session", SESSION, "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def events_on_disk(session_dir: Path) -> list[dict[str, Any]]:
    """Every event left on disk, oldest file first, read without sigil's readers."""
    events = []
    for path in [*rotated_segments(session_dir), session_dir / LOG_FILE_NAME]:
        if not path.exists():
            continue
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        events += [json.loads(line) for line in data.splitlines() if line]
    return events


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("dateext", [False, True], ids=["numbered", "dateext"])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compress"])
@pytest.mark.parametrize("mode", ["create 0600", "copytruncate"], ids=["create", "copytruncate"])
def test_logrotate_between_runs_loses_nothing(
    tmp_path: Path, logrotate: str, mode: str, compress: bool, dateext: bool
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    session_dir = home / "logs" / "sessions" / SESSION
    options = [mode, "compress" if compress else "nocompress"]
    # Two rotations in one day need a finer dateformat than the default -%Y%m%d.
    options += ["dateext", "dateformat -%Y%m%d%H%M%S"] if dateext else ["nodateext"]

    first = orchestrate(home)
    rotate(logrotate, home, session_dir, options)
    second = orchestrate(home)
    if dateext:
        time.sleep(1.1)  # the next name differs by its seconds
    rotate(logrotate, home, session_dir, options)

    names = [p.name for p in rotated_segments(session_dir)]
    assert len(names) == 2, sorted(p.name for p in session_dir.iterdir())
    assert all(n.endswith(".gz") == compress for n in names), names
    assert all(("-" in n.removeprefix(LOG_FILE_NAME)) == dateext for n in names), names

    events = events_on_disk(session_dir)
    assert [e["seq"] for e in events] == list(range(len(events)))
    written = sum(e["tokens"] for e in events)
    assert written > 0
    assert first["success"] and second["success"]

    summary = fold_session(SESSION, home / "logs")
    assert summary.tokens_used == written
    assert summary.entries == len(events)
    assert summary.runs == 2 and summary.run.number == 2
    assert (summary.seq_missing, summary.seq_gaps, summary.malformed) == (0, 0, 0)
    assert summary.max_seq == len(events) - 1
    assert summary.status == "complete"
    assert [p.name for p in summary.files] == [*names, LOG_FILE_NAME]

    # A live reader started on the session now reads the same stream.
    tailer = SessionTailer(SESSION, home / "logs")
    seqs = [e.seq for batch in tailer.iter_existing() for e in batch.entries]
    assert seqs == list(range(len(events)))
    stats = tailer.stats()
    assert stats["compressed_segments"] == (2 if compress else 0)
    assert stats["corrupt_segments"] == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_events_deleted_by_logrotate_before_a_reader_saw_them_are_counted_missing(
    tmp_path: Path, logrotate: str
) -> None:
    """``rotate 1``: a reader that slept through two rotations finds the file it
    was reading gone and the next one deleted by the rotator. What it cannot
    read back is counted as missing events in the fold, never silently dropped."""
    home = tmp_path / "home"
    home.mkdir()
    session_dir = home / "logs" / "sessions" / SESSION
    options = ["create 0600", "nocompress", "rotate 1"]
    orchestrate(home)
    tailer = Tailer(session_dir / LOG_FILE_NAME)
    fold = Fold(0)
    tailer.fold_into(fold)
    run_1 = fold.summary()["entries"]
    rotate(logrotate, home, session_dir, options)  # run 1 -> .1
    orchestrate(home)
    run_2 = len(events_on_disk(session_dir)) - run_1
    rotate(logrotate, home, session_dir, options)  # run 2 -> .1, run 1 deleted
    orchestrate(home)
    tailer.fold_into(fold)
    summary = fold.summary()
    run_3 = summary["entries"] - run_1
    assert summary["seq_missing"] == run_2 > 0
    assert summary["seq_gaps"] == 1
    assert summary["max_seq"] == run_1 + run_2 + run_3 - 1


def _states(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_following_monitor_paused_across_rotations_counts_every_event(
    tmp_path: Path, logrotate: str
) -> None:
    """Issue 11 items 2 and 3: ``sigil monitor --follow`` stopped (SIGSTOP)
    while logrotate copytruncates (compressed), a second run writes, logrotate
    rotates again (create, compressed) and a third run writes. Resumed, it
    reads the rest of run 1 from the copy, run 2 from the file it held and run
    3 from the new file: every token, no rereads, nothing missing."""
    home = tmp_path / "home"
    home.mkdir()
    session_dir = home / "logs" / "sessions" / SESSION
    out = tmp_path / "monitor.out"
    with open(out, "w") as sink:
        monitor = subprocess.Popen(
            [*SIGIL, "monitor", "--session", SESSION, "--follow", "--mode", "json"],
            env=isolated_env(home),
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        time.sleep(0.5)
        orchestrate(home)
        wait_for(
            "the monitor to see run 1 end",
            lambda: any(s["run"]["status"] == "complete" for s in _states(out)),
            timeout=60,
        )
        monitor.send_signal(signal.SIGSTOP)
        rotate(logrotate, home, session_dir, ["copytruncate", "compress"])
        orchestrate(home)
        rotate(logrotate, home, session_dir, ["create 0600", "compress"])
        orchestrate(home)
        monitor.send_signal(signal.SIGCONT)
        events = events_on_disk(session_dir)
        written = sum(e["tokens"] for e in events)
        wait_for(
            "the monitor to catch up",
            lambda: any(s["tokens_used"] == written for s in _states(out)),
            timeout=60,
        )
        monitor.send_signal(signal.SIGINT)
        assert monitor.wait(timeout=30) == 130, monitor.stderr.read() if monitor.stderr else ""
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
    assert [e["seq"] for e in events] == list(range(len(events)))
    final = _states(out)[-1]
    assert final["tokens_used"] == written
    assert final["events"] == len(events)
    assert final["runs"] == 3
    assert (final["missing_events"], final["rereads"], final["seq_gaps"]) == (0, 0, 0)
