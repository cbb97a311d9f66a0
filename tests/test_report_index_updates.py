"""The report index kept up to date when a run ends and by ``sigil logs maintain``
(issue 13, "How"), only where an index already exists.

The real commands run in subprocesses. "No rebuild" is shown two ways: a marker
table planted in the index survives (a rebuild makes the file anew), and a
refresh right after finds nothing left to refold.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import isolated_env, run_cli
from test_report import Run, _age, day, reference, report, steps_for, write_runs

INDEX = "report_index.sqlite3"


def orchestrate(home: Path, session: str) -> tuple[int, str]:
    proc = run_cli(home, "orchestrate", "--task", "Analyze Acme", "--session", session, "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line.lower()]


def plant_marker(index: Path) -> None:
    with sqlite3.connect(index) as conn:
        conn.execute("CREATE TABLE marker(x)")


def has_marker(index: Path) -> bool:
    conn = sqlite3.connect(index)
    try:
        return bool(conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'marker'").fetchone())
    finally:
        conn.close()


def nothing_left_to_refold(log_path: Path) -> bool:
    from sigil.reports.index import refresh

    conn = sqlite3.connect(log_path / INDEX, isolation_level=None)
    try:
        state = refresh(conn, log_path)
    finally:
        conn.close()
    return state.refolded == 0 and state.removed == 0


def test_orchestrate_makes_no_index_when_there_is_none(sigil_home: Path, log_path: Path) -> None:
    code, stderr = orchestrate(sigil_home, "plain")
    assert code == 0, stderr
    assert not warnings(stderr)
    assert (log_path / "sessions" / "plain").is_dir()
    assert not (log_path / INDEX).exists()


def test_a_run_updates_the_existing_index_without_a_rebuild(
    sigil_home: Path, log_path: Path
) -> None:
    code, stderr = orchestrate(sigil_home, "first")
    assert code == 0, stderr
    before = report(sigil_home, "session")
    assert [r["session"] for r in before["rows"]] == ["first"]
    index = log_path / INDEX
    plant_marker(index)

    code, stderr = orchestrate(sigil_home, "second")
    assert code == 0, stderr
    assert not warnings(stderr), stderr
    # The run's own command put the new session in the index, in place.
    assert has_marker(index)
    conn = sqlite3.connect(index)
    rows = dict(conn.execute("SELECT session_id, count(*) FROM runs GROUP BY session_id"))
    conn.close()
    assert rows == {"first": 1, "second": 1}
    assert nothing_left_to_refold(log_path)
    # A second run of an existing session too.
    code, stderr = orchestrate(sigil_home, "first")
    assert code == 0, stderr
    assert nothing_left_to_refold(log_path)

    after = report(sigil_home, "session")
    assert has_marker(index)
    by_session = {r["session"]: r for r in after["rows"]}
    assert by_session["first"]["runs"] == 2 and by_session["second"]["runs"] == 1
    assert by_session["second"]["tokens"] > 0
    assert after["total"]["runs"] == 3
    # The same answer as an index built from nothing.
    index.unlink()
    assert report(sigil_home, "session") == after


def test_an_interrupted_run_is_in_the_index_too(sigil_home: Path, log_path: Path) -> None:
    from test_orchestrate_e2e import SIGIL, TASK, steps_config, write_config

    code, stderr = orchestrate(sigil_home, "first")
    assert code == 0, stderr
    report(sigil_home, "session")
    plant_marker(log_path / INDEX)
    write_config(sigil_home, steps_config(planning="SlowPlanning"))
    proc = subprocess.Popen(
        [*SIGIL, "--task", TASK, "--session", "termed"],
        env=isolated_env(sigil_home, SIGIL_TEST_SLOW_SECONDS="60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = log_path / "sessions" / "termed" / "execution.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if log.exists() and '"component":"planning"' in log.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 143, stderr
    assert not warnings(stderr), stderr
    assert has_marker(log_path / INDEX)
    conn = sqlite3.connect(log_path / INDEX)
    status = conn.execute("SELECT status FROM runs WHERE session_id = 'termed'").fetchall()
    conn.close()
    assert status == [("interrupted",)]
    assert nothing_left_to_refold(log_path)


@pytest.mark.parametrize("damage", ["corrupt", "unwritable", "locked"])
def test_an_index_that_cannot_be_updated_is_one_warning_and_exit_0(
    sigil_home: Path, log_path: Path, damage: str
) -> None:
    code, stderr = orchestrate(sigil_home, "first")
    assert code == 0, stderr
    report(sigil_home, "session")
    index = log_path / INDEX
    holder: sqlite3.Connection | None = None
    if damage == "corrupt":
        index.write_bytes(b"not a database at all" * 100)
    elif damage == "unwritable":
        # Its rollback journal cannot be made (a directory is in the way): no
        # write can happen, whoever runs the command (root ignores file modes).
        (log_path / f"{INDEX}-journal").mkdir()
    else:
        holder = sqlite3.connect(index, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
    content = index.read_bytes() if damage != "locked" else b""
    try:
        code, stderr = orchestrate(sigil_home, "second")
    finally:
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
    assert code == 0, stderr
    lines = warnings(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("warning: report index not updated:"), lines
    assert str(index) in lines[0]
    if damage != "locked":
        assert index.read_bytes() == content  # left alone for the next report
    if damage == "unwritable":
        (log_path / f"{INDEX}-journal").rmdir()
    # The next report still answers with both sessions.
    doc = report(sigil_home, "session")
    assert {r["session"] for r in doc["rows"]} == {"first", "second"}


@pytest.fixture
def history(log_path: Path) -> list[Run]:
    runs = [
        Run("alpha", 1, day("2026-11-01T09:00:00+00:00"), steps_for(1)),
        Run("alpha", 2, day("2026-11-02T10:00:00+00:00"), steps_for(2), status="error"),
        Run("beta", 1, day("2026-11-01T12:00:00+00:00"), steps_for(3)),
        Run("gamma", 1, day("2026-11-02T15:30:00+00:00"), steps_for(5)),
    ]
    write_runs(log_path, runs)
    return runs


def maintain(home: Path) -> dict[str, object]:
    proc = run_cli(home, "logs", "maintain", "--json")
    assert proc.returncode == 0, proc.stderr
    assert not warnings(proc.stderr), proc.stderr
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def test_maintain_moves_archived_sessions_in_the_index(
    sigil_home: Path, log_path: Path, history: list[Run]
) -> None:
    before = report(sigil_home, "daily")
    assert before["total"] == reference(history)
    index = log_path / INDEX
    plant_marker(index)
    _age(log_path / "sessions" / "alpha", 30)
    _age(log_path / "sessions" / "beta", 30)

    doc = maintain(sigil_home)
    assert doc["sessions_archived"] == 2
    # Two archives folded in, the two live directories dropped.
    assert doc["report_index"] == {
        "updated": True,
        "rebuilt": False,
        "sources": 3,
        "refolded": 2,
        "removed": 2,
    }
    assert has_marker(index)
    assert nothing_left_to_refold(log_path)
    conn = sqlite3.connect(index)
    archived = dict(
        conn.execute("SELECT session_id, count(*) FROM runs WHERE archived GROUP BY session_id")
    )
    duplicates = conn.execute("SELECT count(*) FROM runs WHERE duplicate").fetchone()[0]
    conn.close()
    assert archived == {"alpha": 2, "beta": 1} and duplicates == 0
    # Neither lost nor counted twice.
    assert report(sigil_home, "daily") == before
    sessions = report(sigil_home, "session")
    assert {r["session"] for r in sessions["rows"]} == {"alpha", "beta", "gamma"}

    # Nothing more to do: the index is as it was.
    assert maintain(sigil_home)["report_index"] == {
        "updated": True,
        "rebuilt": False,
        "sources": 3,
        "refolded": 0,
        "removed": 0,
    }


def test_maintain_without_an_index_makes_none(
    sigil_home: Path, log_path: Path, history: list[Run]
) -> None:
    _age(log_path / "sessions" / "alpha", 30)
    doc = maintain(sigil_home)
    assert doc["sessions_archived"] == 1
    assert doc["report_index"] is None
    assert not (log_path / INDEX).exists()


def test_maintain_rebuilds_a_corrupt_index(
    sigil_home: Path, log_path: Path, history: list[Run]
) -> None:
    before = report(sigil_home, "daily")
    (log_path / INDEX).write_bytes(b"not a database at all" * 100)
    doc = maintain(sigil_home)
    assert doc["report_index"] == {
        "updated": True,
        "rebuilt": True,
        "sources": 3,
        "refolded": 3,
        "removed": 0,
    }
    assert nothing_left_to_refold(log_path)
    assert report(sigil_home, "daily") == before


def test_maintain_says_so_on_a_terminal_too(
    sigil_home: Path, log_path: Path, history: list[Run]
) -> None:
    report(sigil_home, "daily")
    _age(log_path / "sessions" / "gamma", 30)
    proc = run_cli(sigil_home, "logs", "maintain")
    assert proc.returncode == 0, proc.stderr
    assert "report index updated: 1 refolded, 1 removed" in proc.stdout.splitlines()
