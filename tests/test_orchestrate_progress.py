"""``sigil orchestrate`` on a terminal shows each step as it starts and finishes
(issue 12): a live table read from the session model, cleared when the run ends
and followed by the result. Piped, it stays quiet. Driven on a real
pseudo-terminal read by pyte."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from conftest import SIGIL, isolated_env
from terminal import Terminal

GATED = (
    "errors:\n  max_retries: 0\npipeline:\n  steps:\n    planning: orchestrate_steps:SlowPlanning\n"
)


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(GATED)
    return home


def test_each_step_shows_as_it_runs_then_the_result(tmp_path: Path) -> None:
    home = _home(tmp_path)
    gate = tmp_path / "gate"
    env = isolated_env(home, SIGIL_TEST_GATE=str(gate))
    env.pop("SIGIL_NO_PROGRESS", None)
    term = Terminal(
        [*SIGIL, "orchestrate", "--task", "Analyze Acme Corp", "--session", "live-1"],
        env,
        cols=80,
        rows=50,
    )
    try:
        # Planning waits at the gate: the steps before it are done, it runs.
        screen = term.wait_for(
            lambda t: "planning" in t and "running" in t and "memory" in t, timeout=60
        )
        rows = {line.split()[0]: line for line in screen.splitlines() if line.strip()}
        assert " ok " in f" {rows['routing']} " and " ok " in f" {rows['memory']} "
        assert "running" in rows["planning"]
        assert "reasoning" not in rows  # not started yet
        # The elapsed time of the step in flight moves while it waits.
        first = rows["planning"].split()[-2]
        term.wait_for(lambda t: _elapsed(t) not in (None, first), timeout=10)
        gate.touch()
        assert term.wait(60) == 0
        final = term.wait_for("Status: complete")
    finally:
        term.close()
    # The live table is gone; the result table lists every step once.
    assert "running" not in final and "starting" not in final
    assert sum(1 for line in final.splitlines() if line.strip().startswith("planning")) == 1
    assert "Run 1" in final and "Log:" in final


def _elapsed(screen: str) -> str | None:
    for line in screen.splitlines():
        if line.strip().startswith("planning") and "running" in line:
            return line.split()[-2]
    return None


def test_piped_or_json_output_has_no_live_table(tmp_path: Path) -> None:
    home = _home(tmp_path)
    gate = tmp_path / "gate"
    gate.touch()
    env = isolated_env(home, SIGIL_TEST_GATE=str(gate))
    proc = subprocess.run(
        [*SIGIL, "orchestrate", "--task", "Analyze Acme Corp", "--session", "piped-1"],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert b"\x1b[" not in proc.stdout  # no cursor movement, no spinner frames
    assert proc.stdout.decode().startswith("Session: piped-1\n")
    assert os.path.exists(home / "logs" / "sessions" / "piped-1" / "tokens.json")


def test_ctrl_c_during_the_table_restores_the_cursor(tmp_path: Path) -> None:
    """The table hides the cursor while it draws; an interrupted run (exit 130)
    shows it again and says how to resume."""
    home = _home(tmp_path)
    env = isolated_env(home, SIGIL_TEST_GATE=str(tmp_path / "never"))
    env.pop("SIGIL_NO_PROGRESS", None)
    term = Terminal(
        [*SIGIL, "orchestrate", "--task", "Analyze Acme Corp", "--session", "int-1"],
        env,
        cols=80,
        rows=50,
    )
    try:
        term.wait_for(lambda t: "planning" in t and "running" in t, timeout=60)
        os.killpg(term.proc.pid, signal.SIGINT)
        assert term.wait(60) == 130
        screen = term.wait_for("--resume")
    finally:
        term.close()
    raw = bytes(term.raw)
    assert raw.rfind(b"\x1b[?25h") > raw.rfind(b"\x1b[?25l") >= 0
    assert "running" not in screen


PRICED = """errors:
  max_retries: 0
pipeline:
  steps:
    routing: orchestrate_steps:UnpricedRouting
    reasoning: orchestrate_steps:PricedReasoning
    validation: orchestrate_steps:GatedValidation
pricing:
  models:
    sigil-test-priced: {input_per_mtok: 1000, output_per_mtok: 2000}
"""


def test_the_live_table_and_the_summary_show_cost_unpriced_never_zero(tmp_path: Path) -> None:
    """Each step's cost from the session model (priced models in dollars, a model
    without a price "unpriced", never $0), in the live table and the final summary."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(PRICED)
    gate = tmp_path / "gate"
    env = isolated_env(home, SIGIL_TEST_GATE=str(gate))
    env.pop("SIGIL_NO_PROGRESS", None)
    term = Terminal(
        [*SIGIL, "orchestrate", "--task", "Analyze Acme Corp", "--session", "cost-1"],
        env,
        cols=100,
        rows=50,
    )
    try:
        screen = term.wait_for(
            lambda t: "validation" in t and "running" in t and "reasoning" in t, timeout=60
        )
        rows = {line.split()[0]: line for line in screen.splitlines() if line.strip()}
        assert "cost" in rows["step"]
        assert "unpriced" in rows["routing"] and "$" not in rows["routing"]
        assert re.search(r"\$\d[\d,]*\.\d*[1-9]", rows["reasoning"]), rows["reasoning"]
        assert "$" not in rows["memory"] and "unpriced" not in rows["memory"]  # no model
        gate.touch()
        assert term.wait(60) == 0
        final = term.wait_for("Status: complete")
    finally:
        term.close()
    rows = {line.split()[0]: line for line in final.splitlines() if line.strip()}
    assert "cost" in rows["step"]
    assert "unpriced" in rows["routing"]
    assert re.search(r"\$\d[\d,]*\.\d*[1-9]", rows["reasoning"]), rows["reasoning"]
    cost = next(line for line in final.splitlines() if line.startswith("Cost:"))
    assert re.search(r"\$\d[\d,]*\.\d*[1-9]\+ this run", cost), cost  # + : some tokens unpriced
    assert "unpriced" in cost and "$0 " not in final and "$0\n" not in final
