"""Rotation, archival and clean-up on real files, including archives killed with -9."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import pytest

from sigil.core.locks import SessionLock
from sigil.core.paths import rotated_segments
from sigil.telemetry.file_security import UnsafePathError
from sigil.telemetry.log_rotation import (
    ARCHIVE_PHASES,
    MAINTENANCE_LOCK_NAME,
    LogRotator,
    MaintenanceBusy,
    archived_sessions,
    directory_manifest,
    read_archived_summaries,
    read_manifest,
)

DAY = 86400
ROTATED_RE = re.compile(r"^execution_\d{8}_\d{6}(_\d+)?\.jsonl$")


def make_session(
    log_path: Path, session_id: str, files: dict[str, bytes], age_days: float | None = None
) -> Path:
    """A session directory with ``files``; with ``age_days``, everything in it that old."""
    session = log_path / "sessions" / session_id
    session.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (session / name).parent.mkdir(parents=True, exist_ok=True)
        (session / name).write_bytes(data)
    if age_days is not None:
        age(session, age_days)
    return session


def age(path: Path, days: float) -> None:
    when = time.time() - days * DAY
    for root, dirs, files in os.walk(path, topdown=False):
        for name in (*files, *dirs):
            os.utime(os.path.join(root, name), (when, when), follow_symlinks=False)
    os.utime(path, (when, when))


def events(n: int, start: int = 0) -> bytes:
    return b"".join(
        json.dumps({"seq": i, "event_type": "step_complete", "tokens": 1}).encode() + b"\n"
        for i in range(start, start + n)
    )


FILES = {
    "execution.jsonl": events(2000),
    "execution_20260101_000000.jsonl": events(100),
    "tokens.json": b'{"total_used": 2100, "total_budget": 256000, "status": "complete"}',
    "metrics.json": b'{"duration_seconds": 5.1, "status": "complete", "runs": 1}',
    "errors.jsonl": b"",
}


# -- rotation ---------------------------------------------------------------------


def test_should_rotate_thresholds(tmp_path: Path) -> None:
    rotator = LogRotator(tmp_path, max_file_size_mb=1)
    log = tmp_path / "execution.jsonl"
    assert not rotator.should_rotate(log)
    log.write_bytes(b"x" * (1024 * 1024 - 1))
    assert not rotator.should_rotate(log)
    log.write_bytes(b"x" * (1024 * 1024))
    assert rotator.should_rotate(log)
    link = tmp_path / "link.jsonl"
    link.symlink_to(log)
    assert not rotator.should_rotate(link)


def test_rotate_is_a_rename_and_does_not_recreate_the_file(tmp_path: Path) -> None:
    session = make_session(tmp_path, "s1", {"execution.jsonl": events(10)})
    log = session / "execution.jsonl"
    inode = os.stat(log).st_ino
    rotated = LogRotator(tmp_path).rotate(log)
    assert ROTATED_RE.match(rotated.name), rotated.name
    assert rotated.parent == session
    assert os.stat(rotated).st_ino == inode  # the same file, renamed: not a copy
    assert rotated.read_bytes() == events(10)
    assert not log.exists()  # the writer recreates it; a touch here would race it
    assert rotated_segments(session) == [rotated]


def test_rotate_missing_file_returns_it(tmp_path: Path) -> None:
    missing = tmp_path / "sessions" / "s1" / "execution.jsonl"
    assert LogRotator(tmp_path).rotate(missing) == missing


def test_rotations_never_overwrite_and_sort_in_order(tmp_path: Path) -> None:
    session = make_session(tmp_path, "s1", {})
    log = session / "execution.jsonl"
    rotator = LogRotator(tmp_path)
    produced = []
    for i in range(4):  # several within the same second
        log.write_bytes(events(1, start=i))
        produced.append(rotator.rotate(log))
    assert len(set(produced)) == 4
    assert rotated_segments(session) == produced
    assert [p.read_bytes() for p in produced] == [events(1, start=i) for i in range(4)]


def test_rotation_sorts_after_a_segment_from_the_future(tmp_path: Path) -> None:
    """A clock stepped back must not put a new segment before an older one."""
    session = make_session(
        tmp_path, "s1", {"execution_29991231_235959.jsonl": b"old\n", "execution.jsonl": b"new\n"}
    )
    rotated = LogRotator(tmp_path).rotate(session / "execution.jsonl")
    assert rotated.name == "execution_29991231_235959_1.jsonl"
    assert rotated_segments(session)[-1] == rotated


@pytest.mark.parametrize("other", ["execution.jsonl-29991231", "execution.jsonl-29991231.gz"])
def test_rotation_sorts_after_a_dated_segment_of_logrotate(tmp_path: Path, other: str) -> None:
    """Segments named by logrotate's dateext are in the same order as sigil's:
    the rotator names its segment after the latest of either kind."""
    session = make_session(tmp_path, "s1", {other: b"old\n", "execution.jsonl": b"new\n"})
    rotated = LogRotator(tmp_path).rotate(session / "execution.jsonl")
    assert rotated.name == "execution_29991231_000000_1.jsonl"
    assert rotated_segments(session) == [session / other, rotated]


def test_rotate_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    session = make_session(tmp_path, "s1", {})
    (session / "execution.jsonl").symlink_to(target)
    with pytest.raises(UnsafePathError):
        LogRotator(tmp_path).rotate(session / "execution.jsonl")
    assert target.read_text() == "keep"
    assert (session / "execution.jsonl").is_symlink()


def test_rotate_large_logs_and_dry_run(tmp_path: Path) -> None:
    big = make_session(tmp_path, "big", {"execution.jsonl": b"x" * 2048})
    make_session(tmp_path, "small", {"execution.jsonl": b"x" * 10})
    rotator = LogRotator(tmp_path, max_file_size_mb=1 / 1024)  # 1 KiB
    planned = rotator.rotate_large_logs(dry_run=True)
    assert [p.parent for p in planned] == [big]
    assert (big / "execution.jsonl").exists() and rotated_segments(big) == []
    done = rotator.rotate_large_logs()
    assert [p.parent for p in done] == [big] and done[0].exists()
    assert not (big / "execution.jsonl").exists()
    assert (tmp_path / "sessions" / "small" / "execution.jsonl").exists()


# The native writer runs outside the GIL: a hang there cannot be interrupted by a
# signal, so these two tests use pytest-timeout's thread method (stack dump, exit).
@pytest.mark.timeout(60, method="thread")
def test_rotation_while_the_writer_runs_loses_nothing(tmp_path: Path) -> None:
    """The real ExecutionLogger writes while the live file is rotated again and again."""
    from sigil.telemetry.execution_logger import ExecutionLogger

    total = 6000
    logger = ExecutionLogger("live", tmp_path, flush_interval=0.005, fsync="never")
    logger.initialize_sync()
    rotator = LogRotator(tmp_path)

    def write() -> None:
        for i in range(total):
            logger.log_event_sync("step_complete", "reasoning", f"event {i}", tokens=1)
            if i % 200 == 0:
                time.sleep(0.002)

    writer = threading.Thread(target=write)
    writer.start()
    rotations = 0
    while writer.is_alive() or rotations < 3:
        time.sleep(0.01)
        if logger.log_file.exists() and logger.log_file.stat().st_size > 0:
            rotator.rotate(logger.log_file)
            rotations += 1
        if not writer.is_alive() and rotations >= 3:
            break
    writer.join()
    logger.close_sync()

    files = [*rotated_segments(logger.session_dir), logger.log_file]
    seqs = [
        json.loads(line)["seq"]
        for path in files
        if path.exists()
        for line in path.read_bytes().splitlines()
    ]
    assert rotations >= 3
    assert seqs == list(range(total))


@pytest.mark.timeout(60, method="thread")
def test_tailer_follows_rotation_exactly_once(tmp_path: Path) -> None:
    """What `sigil monitor` relies on: every event once, in order, across renames."""
    from sigil.telemetry.execution_logger import ExecutionLogger
    from sigil.telemetry.log_parser import SessionTailer

    logger = ExecutionLogger("tailed", tmp_path, flush_interval=0.005, fsync="never")
    logger.initialize_sync()
    tailer = SessionTailer("tailed", tmp_path)
    tailer.catch_up()
    rotator = LogRotator(tmp_path)
    seen: list[int] = []

    def read_until(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(seen) < count and time.monotonic() < deadline:
            tailer.wait(0.05)
            seen.extend(e.seq for e in tailer.read().entries)

    for batch in range(5):
        for _ in range(300):
            logger.log_event_sync("step_complete", "memory", "m", tokens=2)
        read_until(batch * 400 + 150)  # the tailer is mid-file when the rename comes
        rotator.rotate(logger.log_file)
        for _ in range(100):
            logger.log_event_sync("step_complete", "memory", "m", tokens=2)
        read_until((batch + 1) * 400)
    logger.close_sync()
    seen.extend(e.seq for e in tailer.read().entries)
    assert seen == list(range(2000))
    assert tailer.stats()["rotations"] >= 5


@pytest.mark.timeout(60, method="thread")
def test_tailer_follows_two_rotations_between_reads(tmp_path: Path) -> None:
    from sigil.telemetry.execution_logger import ExecutionLogger
    from sigil.telemetry.log_parser import SessionTailer

    logger = ExecutionLogger("twice", tmp_path, flush_interval=0.005, fsync="never")
    logger.initialize_sync()
    tailer = SessionTailer("twice", tmp_path)
    tailer.catch_up()
    rotator = LogRotator(tmp_path)
    seen: list[int] = []

    def write(n: int) -> None:
        for _ in range(n):
            logger.log_event_sync("step_complete", "memory", "m", tokens=1)
        time.sleep(0.1)  # twenty flush intervals: the lines are on disk

    write(10)
    seen.extend(e.seq for e in tailer.read().entries)
    rotator.rotate(logger.log_file)
    write(10)
    rotator.rotate(logger.log_file)  # the tailer has not looked since the first rename
    write(10)
    logger.close_sync()
    for _ in range(5):
        tailer.wait(0.05)
        seen.extend(e.seq for e in tailer.read().entries)
    assert seen == list(range(30))


# -- archival ---------------------------------------------------------------------


def test_archive_old_session(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        session = make_session(tmp_path, "old", FILES, age_days=10)
        make_session(tmp_path, "fresh", FILES, age_days=1)
        original = directory_manifest(session)
        archived = LogRotator(tmp_path, retention_days=7).archive_old_sessions()
    finally:
        os.umask(previous)
    expected = tmp_path / "archive" / date.today().isoformat() / "old.tar.gz"
    assert archived == [expected]
    assert not session.exists()
    assert (tmp_path / "sessions" / "fresh").is_dir()
    assert read_manifest(expected) == original
    assert stat.S_IMODE(os.stat(expected).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(expected.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "archive").st_mode) == 0o700
    with tarfile.open(expected) as tar:
        names = tar.getnames()
        log = tar.extractfile("old/execution.jsonl")
        assert log is not None and log.read() == FILES["execution.jsonl"]
    assert names[:3] == ["old", "old/metrics.json", "old/tokens.json"]  # summaries first
    assert "old/.lock" not in names
    assert read_archived_summaries(expected) == {
        "tokens.json": FILES["tokens.json"],
        "metrics.json": FILES["metrics.json"],
    }
    assert archived_sessions(tmp_path) == {"old": [expected]}


def test_age_comes_from_the_newest_file_not_the_directory(tmp_path: Path) -> None:
    session = make_session(tmp_path, "busy", FILES, age_days=30)
    os.utime(session / "execution.jsonl")  # appended to just now
    assert LogRotator(tmp_path).archive_old_sessions() == []
    assert session.is_dir()


def test_a_locked_session_is_never_archived(tmp_path: Path) -> None:
    session = make_session(tmp_path, "running", FILES, age_days=30)
    rotator = LogRotator(tmp_path)
    with SessionLock(session):
        age(session, 30)
        assert rotator.archive_old_sessions(dry_run=True) == []
        assert rotator.archive_old_sessions() == []
        assert (session / "execution.jsonl").read_bytes() == FILES["execution.jsonl"]
        assert not (tmp_path / "archive").exists() or archived_sessions(tmp_path) == {}
    age(session, 30)
    assert len(rotator.archive_old_sessions()) == 1
    assert not session.exists()


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    session = make_session(tmp_path, "old", FILES, age_days=10)
    before = directory_manifest(session)
    planned = LogRotator(tmp_path).archive_old_sessions(dry_run=True)
    assert planned == [tmp_path / "archive" / date.today().isoformat() / "old.tar.gz"]
    assert directory_manifest(session) == before
    assert not (tmp_path / "archive").exists()
    assert not (tmp_path / MAINTENANCE_LOCK_NAME).exists()


def test_a_symlinked_session_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    age(outside, 30)
    (tmp_path / "logs" / "sessions").mkdir(parents=True)
    (tmp_path / "logs" / "sessions" / "evil").symlink_to(outside)
    rotator = LogRotator(tmp_path / "logs")
    assert rotator.archive_old_sessions() == []
    assert (outside / "precious.txt").read_text() == "keep"
    assert (tmp_path / "logs" / "sessions" / "evil").is_symlink()
    assert any("evil" in error and "symbolic link" in error for error in rotator.errors)


def test_a_session_holding_a_symlink_is_left_alone(tmp_path: Path) -> None:
    session = make_session(tmp_path, "odd", FILES)
    (session / "link").symlink_to("/etc/hostname")
    age(session, 30)
    rotator = LogRotator(tmp_path)
    assert rotator.archive_old_sessions() == []
    assert session.is_dir() and (session / "execution.jsonl").exists()
    assert len(rotator.errors) == 1 and "odd" in rotator.errors[0]
    assert [p.name for p in (tmp_path / "archive").rglob("*") if p.is_file()] == []


def test_recreated_session_gets_its_own_archive(tmp_path: Path) -> None:
    rotator = LogRotator(tmp_path)
    make_session(tmp_path, "dup", FILES, age_days=10)
    first = rotator.archive_old_sessions()[0]
    first_manifest = read_manifest(first)
    session = make_session(tmp_path, "dup", {"execution.jsonl": events(5)}, age_days=10)
    second_manifest = directory_manifest(session)
    second = rotator.archive_old_sessions()[0]
    assert second.name == "dup.2.tar.gz"
    assert read_manifest(first) == first_manifest
    assert read_manifest(second) == second_manifest
    assert archived_sessions(tmp_path)["dup"] == [second, first]


def test_recovery_removes_a_directory_already_archived(tmp_path: Path) -> None:
    """The state a crash between "archive renamed" and "directory removed" leaves."""
    session = make_session(tmp_path, "half", FILES, age_days=10)
    original = directory_manifest(session)
    rotator = LogRotator(tmp_path)
    archive = rotator.archive_old_sessions()[0]
    make_session(tmp_path, "half", FILES, age_days=10)  # put the directory back as it was
    assert rotator.archive_old_sessions() == [archive]
    assert not session.exists()
    assert [p.name for p in archive.parent.iterdir()] == ["half.tar.gz"]
    assert read_manifest(archive) == original


def test_recovery_of_renamed_aside_directories(tmp_path: Path) -> None:
    rotator = LogRotator(tmp_path)
    session = make_session(tmp_path, "gone", FILES, age_days=10)
    rotator.archive_old_sessions()
    # Archived, then the crash left it renamed aside: delete it.
    trash = tmp_path / "sessions" / ".gone.removing"
    trash.mkdir()
    (trash / "execution.jsonl").write_bytes(b"partial")
    # Renamed aside but no archive exists: put it back.
    orphan = tmp_path / "sessions" / ".orphan.removing"
    orphan.mkdir()
    (orphan / "execution.jsonl").write_bytes(events(3))
    rotator.archive_old_sessions()
    assert not trash.exists() and not session.exists()
    restored = tmp_path / "sessions" / "orphan"
    assert (restored / "execution.jsonl").read_bytes() == events(3)
    assert any("orphan" in error and "restored" in error for error in rotator.errors)


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    day_dir = tmp_path / "archive" / date.today().isoformat()
    day_dir.mkdir(parents=True)
    stale = day_dir / ".s1.12345.tmp"
    stale.write_bytes(b"\x1f\x8b half an archive")
    LogRotator(tmp_path).archive_old_sessions()
    assert not stale.exists()


def test_a_second_maintenance_run_is_refused(tmp_path: Path) -> None:
    make_session(tmp_path, "old", FILES, age_days=10)
    fd = os.open(tmp_path / MAINTENANCE_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(MaintenanceBusy):
            LogRotator(tmp_path).run_maintenance()
    finally:
        os.close(fd)
    assert (tmp_path / "sessions" / "old").is_dir()


# -- clean-up and the whole cycle --------------------------------------------------


def test_cleanup_old_archives(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    today = date.today()
    days = {n: archive / (today - timedelta(days=n)).isoformat() for n in (0, 29, 30, 31, 90)}
    for directory in days.values():
        directory.mkdir(parents=True)
        (directory / "s.tar.gz").write_bytes(b"x")
    (archive / "notes").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (archive / "2000-01-01").symlink_to(outside)
    rotator = LogRotator(tmp_path, archive_retention_days=30)
    assert rotator.cleanup_old_archives(dry_run=True) == [days[90], days[31]]
    assert days[90].exists()
    assert rotator.cleanup_old_archives() == [days[90], days[31]]
    assert not days[90].exists() and not days[31].exists()
    assert days[30].exists() and days[29].exists() and days[0].exists()
    assert (archive / "notes").exists() and (outside / "keep.txt").exists()


def test_run_maintenance_summary(tmp_path: Path) -> None:
    make_session(tmp_path, "big", {"execution.jsonl": b"x" * 300 * 1024})
    make_session(tmp_path, "old", FILES, age_days=10)  # its log is under the limit
    old_day = tmp_path / "archive" / (date.today() - timedelta(days=40)).isoformat()
    old_day.mkdir(parents=True)
    rotator = LogRotator(tmp_path, max_file_size_mb=0.25)
    summary = rotator.run_maintenance()
    assert summary["sessions_archived"] == 1
    assert summary["archives_cleaned"] == 1
    assert summary["archived_paths"] == [
        str(tmp_path / "archive" / date.today().isoformat() / "old.tar.gz")
    ]
    assert summary["cleaned_paths"] == [str(old_day)]
    assert len(summary["rotated"]) == 1 and "/big/execution_" in summary["rotated"][0]
    assert summary["errors"] == []


# -- kill -9 in the middle of an archive ------------------------------------------


def start_archive(log_path: Path, pause: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("SIGIL_TEST_ARCHIVE_PAUSE", None)
    if pause is not None:
        env["SIGIL_TEST_ARCHIVE_PAUSE"] = pause
    return subprocess.Popen(
        [sys.executable, "-m", "sigil", "logs", "archive", "--log-path", str(log_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_pause(proc: subprocess.Popen[bytes], phase: str, timeout: float = 20) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
            if f"paused at {phase}".encode() in seen:
                return
    proc.kill()
    raise AssertionError(f"archive never reached {phase!r}: {seen.decode(errors='replace')}")


def assert_whole(log_path: Path, session_id: str, original: dict[str, object]) -> None:
    """The session directory or one of its archives holds exactly the original."""
    session = log_path / "sessions" / session_id
    if session.is_dir() and directory_manifest(session) == original:
        return
    for archive in archived_sessions(log_path).get(session_id, []):
        if read_manifest(archive) == original:
            return
    raise AssertionError(f"neither {session} nor an archive of it is whole")


def assert_finished(log_path: Path, session_id: str, original: dict[str, object]) -> None:
    archives = archived_sessions(log_path)[session_id]
    assert len(archives) == 1
    assert read_manifest(archives[0]) == original
    assert list((log_path / "sessions").iterdir()) == []  # neither the dir nor its trash
    leftovers = [p for p in (log_path / "archive").rglob(".*")]
    assert leftovers == []


@pytest.mark.parametrize("phase", ARCHIVE_PHASES)
def test_archive_killed_at_each_phase(tmp_path: Path, phase: str) -> None:
    session = make_session(tmp_path, "victim", FILES, age_days=10)
    original = directory_manifest(session)
    proc = start_archive(tmp_path, pause=phase)
    try:
        wait_for_pause(proc, phase)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert_whole(tmp_path, "victim", original)
    rerun = LogRotator(tmp_path)
    rerun.archive_old_sessions()
    assert rerun.errors == []
    assert_finished(tmp_path, "victim", original)


def test_archive_killed_at_arbitrary_moments(tmp_path: Path) -> None:
    """No pause: kill -9 after growing delays; each time the data must be whole.

    The delays step through interpreter start-up and the archive itself until a
    run gets to finish, so the kills land all over the archive's steps.
    """
    big = events(60_000)  # ~4 MB
    session = make_session(tmp_path, "victim", {**FILES, "execution.jsonl": big}, age_days=10)
    original = directory_manifest(session)
    for step in range(60):
        delay = 0.05 + step * 0.015
        proc = start_archive(tmp_path)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert_whole(tmp_path, "victim", original)
        if not (tmp_path / "sessions" / "victim").exists():
            break  # archived before the kill: nothing left to interrupt
    LogRotator(tmp_path).archive_old_sessions()
    assert_finished(tmp_path, "victim", original)
