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
import shutil
import subprocess
import sys
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
