"""The end of an orchestrate run says what the session model says (contract 12),
whatever happened to its log meanwhile: real processes, real files.

* An external rotator (Debian's ``logrotate`` with ``rotate 0``: the old file
  deleted) runs while the run's step is in flight. The run's end continues the
  session model with the run's own events, not a refold of what the log still
  holds: ``tokens.json`` is written, nothing the run counted leaves the budget,
  and the next run starts from the same total.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import isolated_env, run_cli, wait_for

pytestmark = pytest.mark.slow

TASK = "Analyze Acme Corp"
LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"
GATED_PLANNING = (
    "errors:\n  max_retries: 0\npipeline:\n  steps:\n    planning: orchestrate_steps:SlowPlanning\n"
)


def _dir(home: Path, sid: str) -> Path:
    return home / "logs" / "sessions" / sid


def _sessions_row(home: Path, sid: str) -> dict[str, Any]:
    proc = run_cli(home, "sessions", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    rows = rows["sessions"] if isinstance(rows, dict) else rows
    return next(r for r in rows if r["session_id"] == sid)


def _monitor(home: Path, sid: str) -> dict[str, Any]:
    proc = run_cli(home, "monitor", "-s", sid, "--mode", "json", "--once")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[0])


def _logrotate(tmp: Path, log: Path, *options: str) -> None:
    conf = tmp / "logrotate.conf"
    body = "\n    ".join(["missingok", *options])
    conf.write_text(f"{log} {{\n    {body}\n}}\n")
    proc = subprocess.run(
        [LOGROTATE, "-f", "-s", str(tmp / "logrotate.state"), str(conf)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "options", [["rotate 0", "create 0600"], ["rotate 1", "create 0600"]], ids=["deleted", "kept"]
)
def test_logrotate_during_a_run_loses_nothing_from_the_budget(
    sigil_home: Path, tmp_path: Path, options: list[str]
) -> None:
    sid = "rotmid"
    sigil_home.mkdir(parents=True)
    (sigil_home / "config.yaml").write_text(GATED_PLANNING)
    gate = tmp_path / "gate"
    log = _dir(sigil_home, sid) / "execution.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigil", "orchestrate", "--task", TASK, "--session", sid, "--json"],
        env=isolated_env(sigil_home, SIGIL_TEST_GATE=str(gate)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def planning_started() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"orchestrate exited early: {proc.communicate()}")
        return log.exists() and '"step_start","component":"planning"' in log.read_text()

    wait_for("the planning step", planning_started, timeout=30)
    _logrotate(tmp_path, log, *options)  # the run's first events leave the live file
    gate.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    one = json.loads(out)
    assert one["status"] == "complete" and one["run"] == 1
    total = one["total_tokens"]
    assert total == one["run_tokens"] > 0

    # The ledger was written, with the whole run: nothing it counted is gone.
    tokens = json.loads((_dir(sigil_home, sid) / "tokens.json").read_text())
    assert tokens["total_used"] == total
    assert [(r["run"], r["tokens_used"], r["status"]) for r in tokens["runs"]] == [
        (1, total, "complete")
    ]
    assert _sessions_row(sigil_home, sid)["tokens_used"] == total
    assert _monitor(sigil_home, sid)["tokens_used"] == total

    # The next run starts from the same total: run 2, and every token of run 1 counted.
    (sigil_home / "config.yaml").write_text("")
    proc2 = run_cli(sigil_home, "orchestrate", "--task", TASK, "--session", sid, "--json")
    assert proc2.returncode == 0, proc2.stderr
    two = json.loads(proc2.stdout)
    assert two["run"] == 2
    assert two["total_tokens"] == total + two["run_tokens"]
    tokens = json.loads((_dir(sigil_home, sid) / "tokens.json").read_text())
    assert tokens["total_used"] == two["total_tokens"]
    assert _sessions_row(sigil_home, sid)["tokens_used"] == two["total_tokens"]


# -- a full disk -------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only: CI runs as root)."""
    if os.geteuid() != 0:
        pytest.fail("the disk-full tests mount a tmpfs: run them as root (CI does)")
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(fs)],
                   check=True)  # fmt: skip
    yield fs
    subprocess.run(["umount", str(fs)], check=False)


def _fill(fs: Path) -> Path:
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def _full_disk_run(home: Path, fs: Path) -> tuple[dict[str, Any], int, Path]:
    """Run 1 with room; the disk filled; run 2 (``--json``): its result, run 1's
    total and the filler."""
    home.mkdir(parents=True, exist_ok=True)
    args = ["--task", TASK, "--session", "full", "--log-path", str(fs), "--json"]
    proc = run_cli(home, "orchestrate", *args)
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout)["total_tokens"]
    filler = _fill(fs)
    proc = run_cli(home, "orchestrate", *args)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "disk full" in proc.stderr and "Traceback" not in proc.stderr
    return json.loads(proc.stdout), first, filler


def _views(home: Path, fs: Path) -> tuple[int, int]:
    proc = run_cli(home, "monitor", "-s", "full", "--log-path", str(fs), "--mode", "json", "--once")
    assert proc.returncode == 0, proc.stderr
    monitor = json.loads(proc.stdout.splitlines()[0])["tokens_used"]
    proc = run_cli(home, "sessions", "--log-path", str(fs), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    rows = rows["sessions"] if isinstance(rows, dict) else rows
    return monitor, next(r for r in rows if r["session_id"] == "full")["tokens_used"]


def test_on_a_full_disk_the_result_is_what_every_view_says(sigil_home: Path, tiny_fs: Path) -> None:
    result, first, _ = _full_disk_run(sigil_home, tiny_fs)
    assert result["status"] == "interrupted" and result["run"] == 2
    # Everything the run spent is either counted or named as not recorded.
    spent = sum(s["tokens_used"] for s in result["steps"])
    assert result["total_tokens"] + result["unrecorded_tokens"] == first + spent
    # The total is the session model's: what monitor and sessions show.
    monitor, sessions = _views(sigil_home, tiny_fs)
    assert monitor == sessions == result["total_tokens"]
    assert result["run_tokens"] == result["total_tokens"] - first
