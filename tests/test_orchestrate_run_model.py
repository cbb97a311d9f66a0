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
    assert proc.stdout, proc.stderr  # exit 1 for an incomplete session
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
    # One page left: the next run records its start and a step or two, then not.
    os.truncate(filler, filler.stat().st_size - 4096)
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
    assert proc.stdout, proc.stderr  # exit 1 for an incomplete session
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


# -- a model call in flight at kill -9 ---------------------------------------------


def test_a_model_call_in_flight_at_kill_9_holds_its_reservation(sigil_home: Path) -> None:
    """As through ``sigil proxy``: the call's start names it and what it reserves
    (its prompt and the output cap it is sent with); once its writer is dead it
    is a call of unknown usage holding that, in every view."""
    from proxy_upstream import Upstream

    sigil_home.mkdir(parents=True)
    log = _dir(sigil_home, "k9") / "execution.jsonl"
    with Upstream(slow_seconds=60) as upstream:
        env = isolated_env(
            sigil_home, SIGIL_BASE_URL=upstream.url, OPENAI_API_KEY="k", SIGIL_MODEL="slow"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "sigil", "orchestrate", "--task", TASK, "--session", "k9",
             "--provider", "openai", "--budget", "50000"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for("the model call", lambda: upstream.requests or proc.poll() is not None, 30)
        proc.kill()
        proc.wait()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    start = next(
        e for e in events if e["event_type"] == "step_start" and e["component"] == "reasoning"
    )
    meta = start["metadata"]
    spent = sum(e["tokens"] for e in events)
    reserved = meta["prompt_tokens_reserved"] + meta["max_tokens"]
    assert isinstance(meta["call"], int) and meta["model"] == "slow"
    # The cap the call was sent with: what was left once its prompt is counted,
    # at most the proxy's cap of a call that sets none.
    sent = upstream.requests[0]
    assert meta["max_tokens"] == sent.get("max_tokens", sent.get("max_completion_tokens"))
    assert meta["max_tokens"] == min(50000 - spent - meta["prompt_tokens_reserved"], 4096)

    view = _monitor(sigil_home, "k9")
    assert (view["unknown_usage_calls"], view["tokens_held"]) == (1, reserved)
    assert view["tokens_used"] == spent
    row = _sessions_row(sigil_home, "k9")
    assert row["unknown_usage_calls"] == 1 and row["tokens_used"] == spent


def test_a_model_call_that_ended_holds_nothing(sigil_home: Path) -> None:
    """The call's step_complete closes it: a finished run holds nothing."""
    from proxy_upstream import Upstream

    sigil_home.mkdir(parents=True)
    with Upstream() as upstream:
        proc = run_cli(
            sigil_home, "orchestrate", "--task", TASK, "--session", "ok", "--provider", "openai",
            "--json", SIGIL_BASE_URL=upstream.url, OPENAI_API_KEY="k", SIGIL_MODEL="m",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    total = json.loads(proc.stdout)["total_tokens"]
    view = _monitor(sigil_home, "ok")
    assert (view["unknown_usage_calls"], view["tokens_held"], view["tokens_used"]) == (0, 0, total)
    events = [json.loads(x) for x in (_dir(sigil_home, "ok") / "execution.jsonl").open()]
    calls = [e["metadata"].get("call") for e in events if e["component"] == "reasoning"]
    assert calls[0] is not None and set(calls) == {calls[0]}  # started and closed


def _resume_after_room(home: Path, fs: Path, filler: Path) -> tuple[dict[str, Any], list[dict]]:
    filler.unlink()
    proc = run_cli(home, "orchestrate", "--session", "full", "--log-path", str(fs), "--resume",
                   "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    log = fs / "sessions" / "full" / "execution.jsonl"
    events = []
    for line in log.read_bytes().split(b"\n"):
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # the line the full disk tore
    return json.loads(proc.stdout), events


def _after_resume(events: list[dict[str, Any]]) -> int:
    """Tokens the resuming process logged (after its resume marker)."""
    at = max(i for i, e in enumerate(events) if e["metadata"].get("resume") is True)
    return sum(e["tokens"] for e in events[at:])


@pytest.mark.parametrize("reserve", ["16384", "4096"], ids=["room-freed", "record-only"])
def test_tokens_a_full_disk_kept_from_the_log_count_after_resume(
    sigil_home: Path, tiny_fs: Path, reserve: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's end frees the session's reserve so that its writer can write
    what it holds; what still does not fit is recorded in the reserve and logged
    (an ``events_dropped`` line with its tokens) once there is room: nothing
    spent leaves the budget. ``record-only``: a reserve that holds only that
    record (nothing freed for the writer)."""
    monkeypatch.setenv("SIGIL_TEST_RESERVE_BYTES", reserve)
    result, first, filler = _full_disk_run(sigil_home, tiny_fs)
    spent = sum(s["tokens_used"] for s in result["steps"])
    assert result["total_tokens"] + result["unrecorded_tokens"] == first + spent
    if reserve == "4096":
        assert result["unrecorded_tokens"] > 0
    final, events = _resume_after_room(sigil_home, tiny_fs, filler)
    assert final["status"] == "complete" and final["run"] == 2 and final["resumed"]
    total = final["total_tokens"]
    assert total == result["total_tokens"] + result["unrecorded_tokens"] + _after_resume(events)
    assert sum(e["tokens"] for e in events) == total
    tokens = json.loads((tiny_fs / "sessions" / "full" / "tokens.json").read_text())
    assert tokens["total_used"] == total
    assert _views(sigil_home, tiny_fs) == (total, total)
