"""Every view tells the same story about a damaged or partly deleted session
(issue 13, contract 12): an archive cut short, a live log deleted or cut while
its ledger (``tokens.json``) stays. Real files, real ``sigil`` subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from test_history_join import _ledger
from test_report import Run, day, steps_for, write_runs


def _demo(log_path: Path) -> Path:
    """Session ``demo``: four finished runs and the ledger the orchestrator writes."""
    runs = [
        Run("demo", i, day(f"2026-11-1{i}T09:00:00+00:00"), steps_for(3 + 2 * i))
        for i in range(1, 5)
    ]
    write_runs(log_path, runs)
    directory = log_path / "sessions" / "demo"
    _ledger(directory)
    return directory


def _report_row(home: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    proc = run_cli(home, "report", "session", "--json", TZ="UTC")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    rows = {r["session"]: r for r in doc["rows"]}
    damaged = {u["session"]: u for u in doc["unreadable"]}
    return rows["demo"], damaged.get("demo", {}), proc.stderr


def _diff_side(home: Path) -> tuple[dict[str, Any], str]:
    proc = run_cli(home, "diff", "demo", "demo", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["a"], proc.stderr


def _cut_archive(log_path: Path) -> tuple[Path, dict[str, Any]]:
    """Session ``demo`` archived (the ledger first, as the archiver writes it),
    its directory gone and the archive cut 300 bytes short; the archive and
    the whole session's ledger."""
    directory = _demo(log_path)
    where = log_path / "archive" / "2026-11-20"
    where.mkdir(parents=True)
    archive = where / "demo.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(directory / "tokens.json", arcname="demo/tokens.json")
        tar.add(directory / "execution.jsonl", arcname="demo/execution.jsonl")
    whole = json.loads((directory / "tokens.json").read_bytes())
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    os.truncate(archive, archive.stat().st_size - 300)
    return archive, whole


def test_a_truncated_archive_counts_its_readable_part_in_report_and_diff(
    sigil_home: Path, log_path: Path
) -> None:
    archive, whole = _cut_archive(log_path)

    row, damaged, stderr = _report_row(sigil_home)
    assert 0 < row["tokens"] <= whole["total_used"], (row, whole["total_used"])
    assert row["runs"] == 4
    assert damaged["path"] == str(archive) and damaged["runs_counted"] == 4
    assert str(archive) in damaged["error"] and "unreadable" in stderr
    side, warned = _diff_side(sigil_home)
    assert (side["tokens"], side["runs"], side["archived"]) == (row["tokens"], 4, True)
    assert damaged["error"] in warned and "readable part" in warned


def _sessions_row(home: Path) -> dict[str, Any]:
    proc = run_cli(home, "sessions", "--json")
    assert proc.returncode == 0, proc.stderr
    return next(r for r in json.loads(proc.stdout) if r["session_id"] == "demo")


def _monitor(home: Path) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess[str]]:
    proc = run_cli(home, "monitor", "-s", "demo", "--once", "--mode", "json")
    states = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return (states[-1] if states else None), proc


@pytest.mark.parametrize("damage", ["deleted", "cut"])
def test_a_log_deleted_or_cut_under_its_ledger_reads_the_same_in_every_view(
    sigil_home: Path, log_path: Path, damage: str
) -> None:
    """The ledger is the durable record of the finished runs: the runs it knows
    that the log lost count in every view, the runs the log holds count as the
    log has them (the native join, contract 12)."""
    directory = _demo(log_path)
    ledger = json.loads((directory / "tokens.json").read_bytes())
    log = directory / "execution.jsonl"
    if damage == "deleted":
        log.unlink()
    else:
        log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:23]))

    row, damaged, _ = _report_row(sigil_home)
    assert row["runs"] == 4 and not damaged
    if damage == "deleted":
        assert row["tokens"] == ledger["total_used"]
    side, _ = _diff_side(sigil_home)
    assert (side["tokens"], side["runs"]) == (row["tokens"], 4), side
    assert side["status"] == "complete"
    listed = _sessions_row(sigil_home)
    assert (listed["tokens_used"], listed["runs"]) == (row["tokens"], 4)
    state, proc = _monitor(sigil_home)
    assert state is not None, proc.stdout + proc.stderr
    assert (state["tokens_used"], state["status"]) == (row["tokens"], "complete"), state
    assert proc.returncode == 0, proc.stderr
    # replay plays the events it has; its final snapshot joins the ledger's runs
    # whose events are gone, and says so.
    replay = run_cli(sigil_home, "replay", "demo", "--speed", "max", "--mode", "json")
    assert replay.returncode == 0, replay.stderr
    final = [json.loads(line) for line in replay.stdout.splitlines() if line.startswith("{")][-1]
    assert (final["tokens_used"], final["status"], final["budget"]) == (
        row["tokens"],
        "complete",
        state["budget"],
    ), final
    assert "known only to its ledger" in replay.stderr


def test_a_truncated_archive_replays_its_readable_part_to_the_report_totals(
    sigil_home: Path, log_path: Path
) -> None:
    _cut_archive(log_path)
    row, damaged, _ = _report_row(sigil_home)
    replay = run_cli(sigil_home, "replay", "demo", "--speed", "max", "--mode", "json")
    assert replay.returncode == 0, replay.stderr
    states = [json.loads(line) for line in replay.stdout.splitlines() if line.startswith("{")]
    assert len(states) >= 2  # events were played before the final frame
    assert (states[-1]["tokens_used"], states[-1]["status"]) == (row["tokens"], "complete")
    assert damaged["error"] in replay.stderr and "readable part is replayed" in replay.stderr


def test_a_truncated_archive_reads_the_same_in_every_view(sigil_home: Path, log_path: Path) -> None:
    """``sessions`` reads a cut archive as report, diff and replay do: its
    readable part (the native archive fold), joined with its ledger, and says
    it is damaged with the same reason; never the ledger's whole total beside
    the others' readable part."""
    archive, whole = _cut_archive(log_path)
    row, damaged, _ = _report_row(sigil_home)
    assert row["tokens"] < whole["total_used"]  # the cut lost tokens the ledger counted

    proc = run_cli(sigil_home, "sessions", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = next(r for r in json.loads(proc.stdout) if r["session_id"] == "demo")
    assert (listed["tokens_used"], listed["runs"], listed["archived"]) == (row["tokens"], 4, True)
    side, _ = _diff_side(sigil_home)
    assert listed["status"] == side["status"] == "complete"
    assert listed["error"] == damaged["error"] and str(archive) in listed["error"]
    assert damaged["error"] in proc.stderr and "readable part" in proc.stderr
    assert sum(r["tokens_used"] for r in listed["run_details"]) == row["tokens"]

    table = run_cli(sigil_home, "sessions", TZ="UTC")
    assert table.returncode == 0, table.stderr
    line = next(t for t in table.stdout.splitlines() if t.startswith("demo"))
    assert f"{row['tokens']:,}" in line and "damaged" in line, line
    replay = run_cli(sigil_home, "replay", "demo", "--speed", "max", "--mode", "json")
    final = [json.loads(t) for t in replay.stdout.splitlines() if t.startswith("{")][-1]
    assert side["tokens"] == final["tokens_used"] == listed["tokens_used"]


def test_an_archived_run_without_its_final_event_is_incomplete_in_every_view(
    sigil_home: Path, log_path: Path
) -> None:
    """An archive's writer is long gone: a run it left without a final event
    is ``incomplete`` in ``sessions`` as in ``diff`` (never ``running``)."""
    write_runs(log_path, [Run("dead", 1, day("2026-11-07T10:00:00+00:00"), steps_for(5), None)])
    directory = log_path / "sessions" / "dead"
    where = log_path / "archive" / "2026-11-20"
    where.mkdir(parents=True)
    with tarfile.open(where / "dead.tar.gz", "w:gz") as tar:
        tar.add(directory / "execution.jsonl", arcname="dead/execution.jsonl")
    (directory / "execution.jsonl").unlink()
    directory.rmdir()
    proc = run_cli(sigil_home, "sessions", "--json")
    assert proc.returncode == 0, proc.stderr
    (listed,) = json.loads(proc.stdout)
    diffed = run_cli(sigil_home, "diff", "dead", "dead", "--json")
    assert diffed.returncode == 0, diffed.stderr
    side = json.loads(diffed.stdout)["a"]
    assert (listed["status"], listed["tokens_used"]) == ("incomplete", side["tokens"])
    assert side["status"] == "incomplete"
    assert [r["status"] for r in listed["run_details"]] == ["incomplete"]
