"""Token jumps in the live view (issue 13: anomalies "in report, diff and the
live view ... each with the events that show it").

A history of finished sessions with known tokens per call is written and
indexed (``sigil report``); then a session still running whose reasoning jumps
far above its history is watched by ``sigil monitor``. The expected jump (the
rule, the history's p99 and the heaviest calls' seqs) is worked out by the
reference of ``tests/test_report.py`` from the steps written, never from the
native model or the index.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from test_report import (
    Run,
    Step,
    call_events,
    jump_events,
    reference_jumps,
    steady_runs,
    write_runs,
)

#: the live run's reasoning calls: 5x its history, the heaviest named by seq
LIVE_TOKENS = [2400, 1800, 2600, 1900, 2600, 2100, 900]


def history_and_live(log_path: Path, *, n: int = 9) -> tuple[list[Run], Run]:
    """``n`` finished sessions a day apart, then ``live``: its run started
    after them, no final event yet, reasoning far above its history."""
    runs = steady_runs(n, seed=21)
    live = Run(
        "live",
        1,
        runs[-1].start + timedelta(days=1),
        [
            Step("planning", 210, "ok", 10.0),
            *(Step("reasoning", t, "ok", 10.0) for t in LIVE_TOKENS),
        ],
        status=None,
    )
    write_runs(log_path, runs)
    return runs, live


def expected_live(runs: list[Run], live: Run) -> list[dict[str, Any]]:
    want = [j for j in reference_jumps([*runs, live]) if j["session"] == "live"]
    return [{**j, "tokens_per_call": pytest.approx(j["tokens_per_call"])} for j in want]


def monitor(home: Path, session: str, mode: str) -> str:
    """``sigil monitor --once`` on ``session`` while a writer holds its lock (it
    runs still: a snapshot, exit 0), or after it finished."""
    from sigil.core.locks import SessionLock

    with SessionLock(home / "logs" / "sessions" / session):
        proc = run_cli(home, "monitor", "--session", session, "--mode", mode, "--once")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def monitor_json(home: Path, session: str) -> dict[str, Any]:
    return json.loads(monitor(home, session, "json").splitlines()[-1])


def test_a_live_jump_is_in_json_and_minimal_with_its_seqs(sigil_home: Path, log_path: Path) -> None:
    runs, live = history_and_live(log_path)
    indexed = run_cli(sigil_home, "report", "--json", TZ="UTC")
    assert indexed.returncode == 0, indexed.stderr
    write_runs(log_path, [live])
    want = expected_live(runs, live)
    # Known answer: seq 0 is the start, planning 1, reasoning 2-8.
    assert [(j["component"], j["calls"], j["seqs"]) for j in want] == [
        ("reasoning", 7, [4, 6, 2, 7, 5])
    ]
    assert want[0]["heaviest_calls"][0] == {"seq": 4, "tokens": 2600}
    final = monitor_json(sigil_home, "live")
    assert final["token_jumps"] == want
    shown = monitor(sigil_home, "live", "minimal")
    line = next(x for x in shown.splitlines() if x.startswith("Tokens:"))
    assert "running | token jump: reasoning |" in line, line
    # The final summary names it with its seqs.
    assert "Anomaly:   token jump: reasoning" in shown
    assert "(seq 4, 6, 2, 7, 5, …)" in " ".join(shown.split())


def test_no_index_or_too_little_history_shows_no_live_jump(
    sigil_home: Path, log_path: Path
) -> None:
    runs, live = history_and_live(log_path, n=4)
    write_runs(log_path, [live])
    # No index: the monitor never builds one (it would refold every log).
    assert monitor_json(sigil_home, "live")["token_jumps"] == []
    assert not (log_path / "report_index.sqlite3").exists()
    # Four runs of history: fewer than the rule needs.
    assert run_cli(sigil_home, "report", "--json", TZ="UTC").returncode == 0
    assert expected_live(runs, live) == []
    assert monitor_json(sigil_home, "live")["token_jumps"] == []


def test_the_watched_run_is_not_its_own_history(sigil_home: Path, log_path: Path) -> None:
    """A finished session watched later is in the index: it is left out of the
    history it is judged against (with it, its own value would raise the p99)."""
    runs, live = history_and_live(log_path)
    live.status = "complete"
    write_runs(log_path, [live])
    assert run_cli(sigil_home, "report", "--json", TZ="UTC").returncode == 0
    assert monitor_json(sigil_home, "live")["token_jumps"] == expected_live(runs, live)


def test_the_index_file_name_is_the_reports() -> None:
    from sigil.reports import index, live

    assert live.INDEX_FILE_NAME == index.INDEX_FILE_NAME


# -- the dashboard ----------------------------------------------------------------------


def jumping_fed() -> Any:
    """A live run whose reasoning calls (seq 2-8) jump far above a history of
    ~400 tokens per call."""
    from model_state import Fed
    from sigil.reports.live import JumpHistory
    from test_dashboard_view import _seq
    from test_display import ev

    fed = Fed("live-1")
    events = [
        ev("session_start", budget=100_000, run=1),
        ev("step_complete", "planning", 210, 1, run=1, latency_ms=10),
        *(
            ev("step_complete", "reasoning", t, 2 + i, run=1, latency_ms=10)
            for i, t in enumerate(LIVE_TOKENS)
        ),
    ]
    fed.feed(*(_seq(e, i) for i, e in enumerate(events)))
    history = {
        "reasoning": [(f"s{i}", 1, 380.0 + 5 * i) for i in range(8)],
        "planning": [(f"s{i}", 1, 200.0) for i in range(8)],
    }
    fed.state.set_jump_history(JumpHistory(history))
    return fed


@pytest.mark.parametrize(("cols", "rows"), [(60, 20), (80, 24), (120, 40)])
def test_a_live_jump_is_one_warning_with_its_seqs(cols: int, rows: int) -> None:
    from sigil.interfaces.cli.display import DisplayOptions, render_dashboard_text
    from sigil.interfaces.cli.keys import DashboardView
    from sigil.interfaces.cli.monitor import MonitorPhase
    from sigil.interfaces.cli.screen import cells
    from test_display import T0

    fed = jumping_fed()
    calls = [(seq, t) for seq, t in enumerate(LIVE_TOKENS, start=2)]
    assert jump_events(calls)["seqs"] == [4, 6, 2, 7, 5]
    assert [j["component"] for j in fed.state.token_jumps] == ["reasoning"]

    def frame(view: DashboardView) -> str:
        return render_dashboard_text(
            fed.state, DisplayOptions(), width=cols, height=rows, now=T0 + timedelta(seconds=10),
            phase=MonitorPhase.TRACKING, view=view,
        )  # fmt: skip

    text = frame(DashboardView(keys=True))
    lines = text.splitlines()
    mine = [x for x in lines if "token jump: reasoning" in x]
    assert len(mine) == 1 and mine[0].startswith("! token jump: reasoning 2,043 "), lines
    assert "(seq 4, " in mine[0]
    if cols >= 120:
        assert mine[0] == (
            "! token jump: reasoning 2,043 tokens per call, above 415 (p99 of its last 8 runs)"
            " (seq 4, 6, 2, 7, 5, …)"
        )
    assert len(lines) == rows and all(cells(x) <= cols for x in lines)
    # Filtered to another component, it is not shown.
    other = DashboardView(keys=True)
    other.component = "planning"
    assert "token jump" not in frame(other)


def test_the_history_is_judged_once_per_run_not_per_frame() -> None:
    fed = jumping_fed()
    history = fed.state.jump_history
    assert history is not None
    first = fed.state.token_jumps
    assert fed.state.token_jumps is first  # the same snapshot: not judged again
    limits = history.thresholds("live-1", 1)
    assert history.thresholds("live-1", 1) is limits  # worked out once per run
    assert limits == {"reasoning": (415.0, 8), "planning": (200.0, 8)}


def test_call_events_reads_the_lines_written() -> None:
    runs = steady_runs(1, seed=1)
    events = call_events(runs)
    assert sorted(events) == [("s00", 1, c) for c in ("memory", "planning", "reasoning")]


@pytest.mark.slow
@pytest.mark.parametrize(("cols", "rows"), [(60, 20), (120, 40)])
def test_the_live_dashboard_shows_a_jump_on_a_terminal(
    sigil_home: Path, log_path: Path, cols: int, rows: int
) -> None:
    """On a real pseudo-terminal: ``sigil monitor`` on a running session shows
    its token jump (read from the index after the first frame) once among the
    errors and warnings with its seqs, still once after more events; ``q`` quits."""
    import orjson

    from conftest import SIGIL, isolated_env
    from sigil.core.locks import SessionLock
    from terminal import Terminal

    _runs, live = history_and_live(log_path)
    assert run_cli(sigil_home, "report", "--json", TZ="UTC").returncode == 0
    write_runs(log_path, [live])
    session_dir = log_path / "sessions" / "live"
    env = isolated_env(sigil_home, TERM="xterm-256color", NO_COLOR="1", TZ="UTC")
    with SessionLock(session_dir):
        term = Terminal(
            [*SIGIL, "monitor", "--session", "live", "--refresh-rate", "0.05"], env, cols, rows
        )
        try:

            def whole(screen: str, count: int = 1) -> bool:
                # pyte may be read mid-frame: wait for a frame drawn to its key line.
                lines = screen.splitlines()
                jumps = [x for x in lines if x.startswith("! token jump: reasoning 2,043 ")]
                return (
                    len(jumps) == 1
                    and "(seq 4, " in jumps[0]
                    and lines[-1].startswith("q quit")
                    and screen.count("token jump") == count
                )

            screen = term.wait_for(whole, timeout=20)
            lines = screen.splitlines()
            # Among the errors and warnings, before the events.
            at = next(i for i, x in enumerate(lines) if x.startswith("! token jump"))
            assert at < next(i for i, x in enumerate(lines) if x.startswith("Log"))
            with (session_dir / "execution.jsonl").open("a") as log:
                event = {
                    "timestamp": (live.start + timedelta(seconds=9)).isoformat(),
                    "session_id": "live", "event_type": "step_complete",
                    "component": "planning", "message": "planned", "tokens": 7,
                    "metadata": {"run": 1}, "seq": 9,
                }  # fmt: skip
                log.write(orjson.dumps(event).decode() + "\n")
            term.wait_for(lambda t: "14,517" in t and whole(t), timeout=20)
            term.press("q")
            assert term.wait() == 0
        finally:
            term.close()


def test_a_run_out_of_budget_is_in_the_live_json_and_summary_with_its_event(
    sigil_home: Path, log_path: Path
) -> None:
    """Issue 13's budget exhaustion in the live view too (report and diff:
    tests/test_report.py): the run that ended out of budget, with the seq of
    the final event that said so."""
    steps = [Step("reasoning", 600_000, "ok", 10.0), Step("reasoning", 500_000, "ok", 10.0)]
    start = steady_runs(1, seed=1)[0].start
    write_runs(
        log_path,
        [
            Run("b1", 1, start, steps[:1]),
            Run("b1", 2, start + timedelta(hours=1), steps, status="budget_exceeded"),
        ],
    )
    proc = run_cli(sigil_home, "monitor", "-s", "b1", "--mode", "json", "--once")
    assert proc.returncode == 3, proc.stderr  # the budget's exit code
    final = json.loads(proc.stdout.splitlines()[-1])
    # Run 2: its start is seq 3, its steps 4-5, its final event 6.
    assert final["budget_exhausted"] == [
        {"run": 2, "tokens": 1_100_000, "budget": 10**6, "seqs": [6]}
    ]
    proc = run_cli(sigil_home, "monitor", "-s", "b1", "--mode", "minimal", "--once")
    said = "Anomaly: budget exhausted in run 2: 1,100,000 of 1,000,000 tokens (seq 6)"
    assert said in " ".join(proc.stdout.split())
