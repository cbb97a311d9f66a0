"""Per-component allocations follow the session budget (issue 10, item 5).

The defaults are the spec's proportions of 256,000 (6.3) scaled to the budget;
allocations written in ``config.yaml`` are absolute and stay as given, and a set
of them larger than the budget is bad usage: one line naming the key and the
file, exit 2, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from sigil.telemetry.tokens import DEFAULT_ALLOCATIONS, TokenTracker, scaled_allocations

pytestmark = pytest.mark.slow

TASK = "Analyze Acme Corp"


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    if not root.exists():
        return {}
    return {
        str(p): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in [root, *root.rglob("*")]
    }


def _start_metadata(home: Path, sid: str) -> dict[str, object]:
    log = home / "logs" / "sessions" / sid / "execution.jsonl"
    starts = [
        json.loads(line) for line in log.read_text().splitlines() if '"session_start"' in line
    ]
    return starts[-1]["metadata"]


def test_default_allocations_scale_with_the_budget() -> None:
    assert scaled_allocations(256_000) == DEFAULT_ALLOCATIONS
    small = scaled_allocations(5_000)
    assert small == {
        "routing": 195,
        "memory": 585,
        "planning": 390,
        "reasoning": 2_929,
        "contracts": 195,
        "validation": 195,
    }
    assert sum(small.values()) <= 5_000
    assert TokenTracker(total_budget=5_000).allocations == small
    assert TokenTracker().allocations == DEFAULT_ALLOCATIONS


def test_orchestrate_budget_5000_scales_the_default_allocations(sigil_home: Path) -> None:
    proc = run_cli(sigil_home, "orchestrate", "--task", TASK, "--session", "small",
                   "--budget", "5000", "--json")  # fmt: skip
    assert proc.returncode in (0, 3), proc.stderr
    allocations = _start_metadata(sigil_home, "small")["allocations"]
    assert allocations == scaled_allocations(5_000)
    tokens = json.loads((sigil_home / "logs/sessions/small/tokens.json").read_text())
    assert tokens["components"]["reasoning"]["allocated"] == 2_929


def test_configured_allocations_stay_as_given(sigil_home: Path) -> None:
    sigil_home.mkdir(parents=True)
    (sigil_home / "config.yaml").write_text(
        "token_budget:\n  allocations:\n    reasoning: 3000\n    routing: 400\n"
    )
    proc = run_cli(sigil_home, "orchestrate", "--task", TASK, "--session", "given",
                   "--budget", "5000", "--json")  # fmt: skip
    assert proc.returncode in (0, 3), proc.stderr
    assert _start_metadata(sigil_home, "given")["allocations"] == {
        "reasoning": 3_000,
        "routing": 400,
    }


@pytest.mark.parametrize("where", ["flag", "config-total"])
def test_allocations_above_the_budget_are_bad_usage(sigil_home: Path, where: str) -> None:
    sigil_home.mkdir(parents=True)
    config = sigil_home / "config.yaml"
    text = "token_budget:\n  allocations:\n    reasoning: 4000\n    routing: 2000\n"
    args = ["orchestrate", "--task", TASK, "--session", "over"]
    if where == "flag":
        args += ["--budget", "5000"]
    else:
        text += "  default_total: 5000\n"
    config.write_text(text)
    before = _snapshot(sigil_home)
    proc = run_cli(sigil_home, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "token_budget.allocations" in lines[0] and str(config) in lines[0]
    assert "6,000" in lines[0] and "5,000" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _snapshot(sigil_home) == before


def test_allocations_above_the_sessions_recorded_budget_are_bad_usage(sigil_home: Path) -> None:
    first = run_cli(sigil_home, "orchestrate", "--task", TASK, "--session", "rec",
                    "--budget", "50000")  # fmt: skip
    assert first.returncode == 0, first.stderr
    config = sigil_home / "config.yaml"
    config.write_text("token_budget:\n  allocations:\n    reasoning: 60000\n")
    before = _snapshot(sigil_home)
    proc = run_cli(sigil_home, "orchestrate", "--task", TASK, "--session", "rec")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "token_budget.allocations" in lines[0], proc.stderr
    assert str(config) in lines[0] and "50,000" in lines[0]
    assert _snapshot(sigil_home) == before
