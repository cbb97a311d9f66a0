"""A session's accounting survives external rotation of its log (issue 11, items 1-3).

Debian's ``logrotate`` (installed by the test setup; ``apt-get install logrotate``)
renames, compresses or deletes ``execution.jsonl`` between two runs, in
``create`` and ``copytruncate`` modes, with and without ``compress`` and
``dateext``; plain renames to ``execution.jsonl.1`` too. A new ``sigil
orchestrate`` run on the session must continue the run number, ``seq`` and the
budget's use: a 4,000-token budget stays enforced (exit 3). ``tokens.json`` is
the session's ledger; a hole in ``seq`` that neither the ledger nor the log can
fill is reported as missing events, never as complete data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow

TASK = "Analyze Acme Corp"
LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"


def _dir(home: Path, sid: str) -> Path:
    return home / "logs" / "sessions" / sid


def _run(home: Path, sid: str, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = run_cli(home, "orchestrate", "--task", TASK, "--session", sid, "--json", *args)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tokens(home: Path, sid: str) -> dict[str, Any]:
    return json.loads((_dir(home, sid) / "tokens.json").read_text())


def _logrotate(tmp: Path, log: Path, *options: str) -> None:
    conf = tmp / "logrotate.conf"
    body = "\n    ".join(["rotate 3", "missingok", *options])
    conf.write_text(f"{log} {{\n    {body}\n}}\n")
    proc = subprocess.run(
        [LOGROTATE, "-f", "-s", str(tmp / "logrotate.state"), str(conf)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_logrotate_is_installed() -> None:
    proc = subprocess.run([LOGROTATE, "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, "install logrotate (apt-get install -y logrotate)"


ROTATIONS = {
    "create": ["create 0600"],
    "create-compress": ["create 0600", "compress"],
    "create-dateext-compress": ["create 0600", "dateext", "compress"],
    "copytruncate": ["copytruncate"],
    "copytruncate-compress": ["copytruncate", "compress"],
    "deleted": ["rotate 0"],
}


@pytest.mark.parametrize("mode", list(ROTATIONS))
def test_a_new_run_after_logrotate_continues_run_seq_and_budget(
    sigil_home: Path, tmp_path: Path, mode: str
) -> None:
    sid = f"rot-{mode}"
    code, one, _ = _run(sigil_home, sid, "--budget", "4000")
    assert code == 0 and one["run"] == 1
    log = _dir(sigil_home, sid) / "execution.jsonl"
    last_seq = _lines(log)[-1]["seq"]

    _logrotate(tmp_path, log, *ROTATIONS[mode])
    assert not log.exists() or log.stat().st_size == 0

    code, two, stderr = _run(sigil_home, sid)
    assert code == 3, stderr  # run 1's tokens still count: 4,000 is not enough for two
    assert two["run"] == 2 and two["budget"] == 4000 and two["status"] == "budget_exceeded"
    assert two["total_tokens"] == one["total_tokens"] + two["run_tokens"]
    events = _lines(log)
    assert [e["seq"] for e in events] == list(range(last_seq + 1, last_seq + 1 + len(events)))
    assert sum(e["tokens"] for e in events) == two["run_tokens"]
    start = events[0]
    assert start["event_type"] == "session_start" and start["metadata"]["run"] == 2
    assert start["metadata"]["tokens_before_run"] == one["total_tokens"]

    tokens = _tokens(sigil_home, sid)
    assert tokens["total_used"] == two["total_tokens"]
    assert [(r["run"], r["tokens_used"]) for r in tokens["runs"]] == [
        (1, one["total_tokens"]),
        (2, two["run_tokens"]),
    ]
    assert tokens["last_seq"] == events[-1]["seq"] and tokens["missing_events"] == 0


def test_a_plain_rename_to_dot_1_between_runs(sigil_home: Path) -> None:
    code, one, _ = _run(sigil_home, "renamed", "--budget", "4000")
    assert code == 0
    log = _dir(sigil_home, "renamed") / "execution.jsonl"
    last_seq = _lines(log)[-1]["seq"]
    log.rename(log.with_name("execution.jsonl.1"))
    code, two, stderr = _run(sigil_home, "renamed")
    assert code == 3, stderr
    assert two["run"] == 2 and two["total_tokens"] == one["total_tokens"] + two["run_tokens"]
    assert _lines(log)[0]["seq"] == last_seq + 1

    # And again: .1 -> .2, the live log -> .1; run 3 is refused its first step.
    (log.with_name("execution.jsonl.1")).rename(log.with_name("execution.jsonl.2"))
    log.rename(log.with_name("execution.jsonl.1"))
    code, three, _ = _run(sigil_home, "renamed")
    assert code == 3 and three["run"] == 3 and three["steps"] == []
    assert three["total_tokens"] == two["total_tokens"]
    assert [r["run"] for r in _tokens(sigil_home, "renamed")["runs"]] == [1, 2, 3]


def test_ledger_and_log_together_count_nothing_twice(sigil_home: Path) -> None:
    """Segments the readers know (sigil's own names) are read; the ledger covers
    the same events: each is counted once."""
    code, one, _ = _run(sigil_home, "both", "--budget", "100000")
    assert code == 0
    log = _dir(sigil_home, "both") / "execution.jsonl"
    log.rename(log.with_name("execution_20260101_000000.jsonl"))
    code, two, _ = _run(sigil_home, "both")
    assert code == 0 and two["run"] == 2
    assert two["total_tokens"] == one["total_tokens"] + two["run_tokens"]
    assert _tokens(sigil_home, "both")["total_used"] == two["total_tokens"]


def test_a_hole_nothing_can_fill_is_reported_as_missing_events(sigil_home: Path) -> None:
    code, _, _ = _run(sigil_home, "holed", "--budget", "100000")
    assert code == 0
    d = _dir(sigil_home, "holed")
    first_events = len(_lines(d / "execution.jsonl"))
    (d / "execution.jsonl").rename(d / "execution.jsonl.1")
    code, two, _ = _run(sigil_home, "holed")
    assert code == 0 and two["run"] == 2
    # Run 1's segment and the ledger are both lost.
    (d / "execution.jsonl.1").unlink()
    (d / "tokens.json").unlink()
    code, three, stderr = _run(sigil_home, "holed")
    assert three["run"] == 3
    assert three["missing_events"] == first_events
    assert f"{first_events} events" in stderr and "missing" in stderr
    tokens = _tokens(sigil_home, "holed")
    assert tokens["missing_events"] == first_events and tokens["data"] == "incomplete"
    # What remains is still counted exactly once.
    assert three["total_tokens"] == two["run_tokens"] + three["run_tokens"]
