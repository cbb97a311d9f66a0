"""Every view tells the same story about a damaged or partly deleted session
(issue 13, contract 12): an archive cut short, a live log deleted or cut while
its ledger (``tokens.json``) stays. Real files, real ``sigil`` subprocesses."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

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


def test_a_truncated_archive_counts_its_readable_part_in_report_and_diff(
    sigil_home: Path, log_path: Path
) -> None:
    directory = _demo(log_path)
    where = log_path / "archive" / "2026-11-20"
    where.mkdir(parents=True)
    archive = where / "demo.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # the ledger first, as the archiver writes it
        tar.add(directory / "tokens.json", arcname="demo/tokens.json")
        tar.add(directory / "execution.jsonl", arcname="demo/execution.jsonl")
    whole = json.loads((directory / "tokens.json").read_bytes())
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    os.truncate(archive, archive.stat().st_size - 300)

    row, damaged, stderr = _report_row(sigil_home)
    assert 0 < row["tokens"] <= whole["total_used"], (row, whole["total_used"])
    assert row["runs"] == 4
    assert damaged["path"] == str(archive) and damaged["runs_counted"] == 4
    assert str(archive) in damaged["error"] and "unreadable" in stderr
    side, warned = _diff_side(sigil_home)
    assert (side["tokens"], side["runs"], side["archived"]) == (row["tokens"], 4, True)
    assert damaged["error"] in warned and "readable part" in warned
