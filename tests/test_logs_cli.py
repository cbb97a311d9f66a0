"""`sigil logs ...` and `sigil sessions`, run as the real command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import pytest

from sigil.core.locks import SessionLock
from sigil.telemetry.log_rotation import archived_sessions

Run = Callable[..., subprocess.CompletedProcess[str]]
DAY = 86400


def make_session(
    log_path: Path, session_id: str, files: dict[str, bytes], age_days: float = 0
) -> Path:
    session = log_path / "sessions" / session_id
    session.mkdir(parents=True, exist_ok=True)
    when = time.time() - age_days * DAY
    for name, data in files.items():
        (session / name).write_bytes(data)
        os.utime(session / name, (when, when))
    os.utime(session, (when, when))
    return session


def event(seq: int, event_type: str, tokens: int = 0, **metadata: object) -> bytes:
    record = {
        "timestamp": f"2026-01-11T10:15:{30 + seq:02d}.000000+00:00",
        "session_id": "s",
        "event_type": event_type,
        "component": "orchestrator" if event_type.startswith("session") else "reasoning",
        "message": event_type,
        "tokens": tokens,
        "metadata": metadata,
        "seq": seq,
    }
    return json.dumps(record).encode() + b"\n"


SUMMARIES = {
    "execution.jsonl": event(0, "session_start", budget=1000, run=1)
    + event(1, "step_complete", 650),
    "tokens.json": json.dumps(
        {
            "session_id": "done",
            "timestamp": "2026-01-11T10:15:38.789012+00:00",
            "total_budget": 256000,
            "total_used": 650,
            "status": "complete",
            "runs": 1,
        }
    ).encode(),
    "metrics.json": json.dumps(
        {"duration_seconds": 5.1, "steps_completed": 5, "status": "complete", "runs": 1}
    ).encode(),
}


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- sigil logs ---------------------------------------------------------------


def test_rotate_dry_run_then_for_real(sigil_home: Path, log_path: Path, run_sigil: Run) -> None:
    (sigil_home / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (sigil_home / "config.yaml").write_text("logging:\n  max_file_size_mb: 0.001\n")
    session = make_session(log_path, "big", {"execution.jsonl": b"{}\n" * 1000})

    dry = run_sigil("logs", "rotate", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True and len(planned["rotated"]) == 1
    assert (session / "execution.jsonl").exists()

    real = run_sigil("logs", "rotate")
    assert real.returncode == 0, real.stderr
    assert "rotated: " in real.stdout and "1 log rotated" in real.stdout
    assert not (session / "execution.jsonl").exists()
    segments = sorted(p.name for p in session.iterdir() if p.name.startswith("execution_"))
    assert len(segments) == 1 and segments[0] in real.stdout


def test_archive_and_log_path_option(tmp_path: Path, run_sigil: Run) -> None:
    elsewhere = tmp_path / "elsewhere"
    make_session(elsewhere, "old", SUMMARIES, age_days=10)
    make_session(elsewhere, "new", SUMMARIES, age_days=1)
    result = run_sigil("logs", "archive", "--json", "--log-path", str(elsewhere))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    archive = elsewhere / "archive" / date.today().isoformat() / "old.tar.gz"
    assert summary["sessions_archived"] == 1
    assert summary["archived_paths"] == [str(archive)]
    assert summary["errors"] == []
    assert archive.is_file()
    assert not (elsewhere / "sessions" / "old").exists()
    assert (elsewhere / "sessions" / "new").is_dir()


def test_archive_skips_a_running_session(log_path: Path, run_sigil: Run) -> None:
    session = make_session(log_path, "busy", SUMMARIES, age_days=10)
    with SessionLock(session):
        make_session(log_path, "busy", {}, age_days=10)
        result = run_sigil("logs", "archive")
    assert result.returncode == 0, result.stderr
    assert "0 sessions archived" in result.stdout
    assert (session / "execution.jsonl").exists()


def test_cleanup_removes_old_archive_days(log_path: Path, run_sigil: Run) -> None:
    old = log_path / "archive" / (date.today() - timedelta(days=45)).isoformat()
    recent = log_path / "archive" / (date.today() - timedelta(days=3)).isoformat()
    for directory in (old, recent):
        directory.mkdir(parents=True)
        (directory / "s.tar.gz").write_bytes(b"x")
    dry = run_sigil("logs", "cleanup", "--dry-run")
    assert dry.returncode == 0 and old.exists()
    assert f"would be removed: {old}" in dry.stdout and "dry run" in dry.stdout
    result = run_sigil("logs", "cleanup", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cleaned_paths"] == [str(old)]
    assert not old.exists() and recent.exists()


def test_maintain_reports_the_spec_summary(log_path: Path, run_sigil: Run) -> None:
    make_session(log_path, "old", SUMMARIES, age_days=10)
    result = run_sigil("logs", "maintain", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"sessions_archived", "archives_cleaned", "archived_paths", "cleaned_paths"} <= set(
        summary
    )
    assert summary["rotated"] == [] and summary["sessions_archived"] == 1


def test_a_planted_symlink_is_an_error_line_and_exit_1(
    tmp_path: Path, log_path: Path, run_sigil: Run
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (log_path / "sessions").mkdir(parents=True)
    (log_path / "sessions" / "evil").symlink_to(outside)
    result = run_sigil("logs", "maintain")
    assert result.returncode == 1
    line = one_line_error(result)
    assert line.startswith("error: ") and "evil" in line
    assert (outside / "keep").read_text() == "keep"


def test_bad_config_is_one_line_exit_2(sigil_home: Path, run_sigil: Run) -> None:
    sigil_home.mkdir(parents=True, exist_ok=True)
    (sigil_home / "config.yaml").write_text("logging:\n  retention_days: '7'\n")
    result = run_sigil("logs", "archive")
    assert result.returncode == 2
    line = one_line_error(result)
    assert "logging.retention_days" in line and "config.yaml" in line


def test_log_path_that_is_a_file(tmp_path: Path, run_sigil: Run) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for command in ("rotate", "archive", "cleanup", "maintain"):
        result = run_sigil("logs", command, "--log-path", str(a_file))
        assert result.returncode == 2  # bad usage, as for `sigil sessions`
        assert "is not a directory" in one_line_error(result)


# -- sigil sessions -------------------------------------------------------------


def test_sessions_lists_live_and_archived(log_path: Path, run_sigil: Run) -> None:
    make_session(log_path, "done", SUMMARIES)
    make_session(log_path, "gone", {**SUMMARIES, "tokens.json": SUMMARIES["tokens.json"]}, 10)
    assert run_sigil("logs", "archive").returncode == 0
    make_session(log_path, "empty", {})

    result = run_sigil("sessions", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["session_id"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"done", "gone", "empty"}
    done = rows["done"]
    assert (done["status"], done["tokens_used"], done["budget"]) == ("complete", 650, 256000)
    assert done["duration_seconds"] == 5.1 and done["runs"] == 1
    assert done["started_at"].startswith("2026-01-11T10:15:33.6")
    assert done["archived"] is False and done["size_bytes"] > 0
    gone = rows["gone"]
    assert gone["archived"] is True and gone["tokens_used"] == 650
    assert gone["path"] == str(archived_sessions(log_path)["gone"][0])
    assert rows["empty"]["status"] == "waiting"

    table = run_sigil("sessions")
    assert table.returncode == 0
    header, *lines = table.stdout.splitlines()
    assert header.split() == [
        "ID", "STATUS", "STARTED", "DURATION", "TOKENS", "COST", "SIZE", "ARCHIVED"
    ]  # fmt: skip
    done_line = next(line for line in lines if line.startswith("done "))
    assert "650/256,000" in done_line and "5.1s" in done_line
    # A summary from before the ledger names no priced model: its cost is unknown.
    assert done_line.split()[6] in ("-", "unpriced"), done_line
    gone_line = next(line for line in lines if line.startswith("gone "))
    assert gone_line.rstrip().endswith(date.today().isoformat())


def test_sessions_folds_the_log_when_there_is_no_summary(log_path: Path, run_sigil: Run) -> None:
    log = event(0, "session_start", budget=1000, run=1) + event(1, "step_complete", 120)
    make_session(log_path, "crashed", {"execution.jsonl": log})
    make_session(
        log_path,
        "finished",
        {"execution.jsonl": log + event(2, "session_complete", status="complete")},
    )
    live = make_session(log_path, "live", {"execution.jsonl": log})
    with SessionLock(live):
        result = run_sigil("sessions", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["session_id"]: row for row in json.loads(result.stdout)}
    assert rows["crashed"]["status"] == "incomplete"  # no final event, lock free
    assert rows["live"]["status"] == "running"
    assert rows["finished"]["status"] == "complete"
    assert rows["finished"]["tokens_used"] == 120 and rows["finished"]["budget"] == 1000
    assert rows["finished"]["duration_seconds"] == 2.0


def test_stale_summary_is_ignored_after_a_new_run(log_path: Path, run_sigil: Run) -> None:
    session = make_session(log_path, "again", SUMMARIES)
    old = time.time() - 60
    os.utime(session / "tokens.json", (old, old))
    with (session / "execution.jsonl").open("ab") as log:
        log.write(event(2, "session_start", budget=1000, run=2))
    rows = json.loads(run_sigil("sessions", "--json").stdout)
    assert rows[0]["runs"] == 2 and rows[0]["status"] == "incomplete"


@pytest.mark.parametrize("args", [["sessions"], ["sessions", "--json"]])
def test_sessions_with_nothing_there(args: list[str], run_sigil: Run) -> None:
    result = run_sigil(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("[]",) or result.stdout.startswith("no sessions in ")
