"""Golden files of every view of one fixed session, at 40, 80 and 120 columns.

The dashboard, the stream, the minimal line and the final summary of a fixed,
finished session are rendered by the real ``sigil monitor --once`` on a real
pseudo-terminal read by pyte, and compared whole with ``tests/golden/*.txt``
(rich's ``tests/test_panel.py`` compares entire expected strings the same way),
so any change of layout or of a number is a reviewed diff.

To accept a deliberate change: ``SIGIL_UPDATE_GOLDEN=1 pytest tests/test_golden_views.py``,
then read the diff of ``tests/golden/`` before committing it.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from conftest import SIGIL, isolated_env
from terminal import Terminal

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden"
SESSION = "golden-1"
UPDATE = bool(os.environ.get("SIGIL_UPDATE_GOLDEN"))


def _event(
    seq: int,
    at: float,
    kind: str,
    component: str,
    message: str,
    tokens: int,
    meta: dict[str, object],
) -> dict[str, object]:
    whole, frac = divmod(round(at * 1_000_000), 1_000_000)
    minutes, seconds = divmod(whole, 60)
    return {
        "timestamp": f"2026-01-15T10:{minutes:02d}:{seconds:02d}.{frac:06d}+00:00",
        "session_id": SESSION,
        "event_type": kind,
        "component": component,
        "message": message,
        "tokens": tokens,
        "metadata": meta,
        "seq": seq,
    }


def fixed_session() -> list[dict[str, object]]:
    """One finished run: six steps, a failed reasoning attempt and its retry, a warning."""
    allocations = {"routing": 400, "memory": 1200, "planning": 800, "reasoning": 6000,
                   "contracts": 400, "validation": 400}  # fmt: skip
    events: list[tuple[float, str, str, str, int, dict[str, object]]] = [
        (0.0, "session_start", "orchestrator", "Starting pipeline for: Analyze Acme Corp", 0,
         {"task": "Analyze Acme Corp", "budget": 10000, "allocations": allocations, "run": 1,
          "thresholds": {"warning": 0.5, "critical": 0.8, "exceeded": 0.95}}),
        (0.1, "step_start", "routing", "Routing started", 0, {"run": 1}),
        (0.4, "step_complete", "routing", "Intent classified", 120,
         {"run": 1, "attempt": 1, "latency_ms": 300.0, "input_tokens": 100,
          "output_tokens": 20, "model": "offline"}),
        (0.5, "step_start", "memory", "Memory started", 0, {"run": 1}),
        (1.7, "step_complete", "memory", "Retrieved 3 relevant memories", 640,
         {"run": 1, "attempt": 1, "latency_ms": 1200.0, "input_tokens": 600,
          "output_tokens": 40, "model": "offline"}),
        (1.8, "step_start", "planning", "Planning started", 0, {"run": 1}),
        (2.6, "step_complete", "planning", "Plan of 4 steps", 510,
         {"run": 1, "attempt": 1, "latency_ms": 800.0, "input_tokens": 400,
          "output_tokens": 110, "model": "offline"}),
        (2.7, "step_start", "reasoning", "Reasoning started", 0, {"run": 1}),
        (15.7, "step_error", "reasoning", "Reasoning failed: upstream timed out", 0,
         {"run": 1, "attempt": 1, "latency_ms": 13000.0, "category": "timeout",
          "error": "upstream timed out after 13 s"}),
        (15.7, "token_consumption", "reasoning", "Tokens of a failed attempt", 350,
         {"run": 1, "attempt": 1}),
        (15.8, "retry_attempt", "reasoning", "Retrying reasoning (attempt 2)", 0,
         {"run": 1, "attempt": 2, "delay_s": 0.1, "category": "timeout",
          "error": "upstream timed out after 13 s"}),
        (15.9, "step_start", "reasoning", "Reasoning started", 0, {"run": 1, "attempt": 2}),
        (19.9, "step_complete", "reasoning", "Analysis complete", 3900,
         {"run": 1, "attempt": 2, "latency_ms": 4000.0, "input_tokens": 2900,
          "output_tokens": 1000, "model": "offline"}),
        (19.9, "budget_warning", "orchestrator", "Budget 50% used", 0,
         {"run": 1, "level": "warning", "used": 5520, "total": 10000, "component": "reasoning"}),
        (20.0, "step_start", "contracts", "Contracts started", 0, {"run": 1}),
        (20.5, "step_complete", "contracts", "Contracts checked", 300,
         {"run": 1, "attempt": 1, "latency_ms": 500.0, "input_tokens": 250,
          "output_tokens": 50, "model": "offline"}),
        (20.6, "step_start", "validation", "Validation started", 0, {"run": 1}),
        (21.0, "step_complete", "validation", "Quality 0.82", 210,
         {"run": 1, "attempt": 1, "latency_ms": 400.0, "input_tokens": 180,
          "output_tokens": 30, "model": "offline"}),
        (21.1, "session_complete", "orchestrator", "Pipeline complete", 0,
         {"run": 1, "status": "complete", "total_tokens": 6030, "budget": 10000}),
    ]  # fmt: skip
    return [
        _event(seq, at, kind, comp, msg, tokens, meta)
        for seq, (at, kind, comp, msg, tokens, meta) in enumerate(events)
    ]


@pytest.fixture
def golden_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    session = home / "logs" / "sessions" / SESSION
    session.mkdir(parents=True, mode=0o700)
    lines = b"".join(orjson.dumps(e) + b"\n" for e in fixed_session())
    (session / "execution.jsonl").write_bytes(lines)
    return home


def _render(home: Path, mode: str, cols: int, rows: int = 80) -> str:
    env = isolated_env(home, TERM="xterm-256color", NO_COLOR="1", TZ="UTC")
    term = Terminal(
        [*SIGIL, "monitor", "--session", SESSION, "--mode", mode, "--once"],
        env,
        cols=cols,
        rows=rows,
    )
    try:
        code = term.wait(30)
        text = term.text()
    finally:
        term.close()
    lines = text.rstrip("\n").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return f"exit {code}\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("cols", [40, 80, 120])
@pytest.mark.parametrize("mode", ["dashboard", "stream", "minimal"])
def test_view_matches_its_golden_file(golden_home: Path, mode: str, cols: int) -> None:
    got = _render(golden_home, mode, cols)
    path = GOLDEN / f"{mode}-{cols}.txt"
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"no golden file {path.name}; run with SIGIL_UPDATE_GOLDEN=1 and review it")
        path.write_text(got)
    assert got == path.read_text(), f"{path.name} changed; see the module docstring"


def test_json_view_of_the_fixed_session(golden_home: Path) -> None:
    """The json mode's final object, whole (numbers only: stable across layouts)."""
    import subprocess

    proc = subprocess.run(
        [*SIGIL, "monitor", "--session", SESSION, "--mode", "json", "--once"],
        env=isolated_env(golden_home, TZ="UTC"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    path = GOLDEN / "json.txt"
    got = f"exit {proc.returncode}\n{proc.stdout}"
    if UPDATE:
        path.write_text(got)
    assert got == path.read_text(), f"{path.name} changed; see the module docstring"


@pytest.mark.parametrize(("cols", "rows"), [(60, 20), (80, 24), (120, 40)])
def test_live_dashboard_layout_matches_its_golden_file(cols: int, rows: int) -> None:
    """The live frame mid-run (reasoning's second attempt in flight, stalled), at the
    sizes issue 12 names: what runs now, burn, components, errors before events,
    the key line on the bottom row, the height used whole."""
    from datetime import UTC, datetime

    from model_state import Fed
    from sigil.interfaces.cli.display import DisplayOptions, render_dashboard_text
    from sigil.interfaces.cli.keys import DashboardView
    from sigil.interfaces.cli.monitor import MonitorPhase

    fed = Fed(SESSION)
    fed.feed(*(orjson.dumps(e) for e in fixed_session()[:12]))
    now = datetime(2026, 1, 15, 10, 0, 24, tzinfo=UTC)
    text = render_dashboard_text(
        fed.state,
        DisplayOptions(),
        width=cols,
        height=rows,
        now=now,
        phase=MonitorPhase.TRACKING,
        view=DashboardView(keys=True),
        clock=True,
    )
    lines = text.splitlines()
    assert len(lines) == rows and all(len(line) <= cols for line in lines)
    path = GOLDEN / f"dashboard-live-{cols}x{rows}.txt"
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed; see the module docstring"


@pytest.mark.parametrize(("cols", "rows"), [(60, 20), (80, 24), (120, 40)])
def test_live_dashboard_on_a_terminal_shows_anomalies(tmp_path: Path, cols: int, rows: int) -> None:
    """Issues 13, 14, 12 on a real pseudo-terminal: ``sigil monitor`` on a live
    session in a loop that made a call of unknown usage shows the loop once (with
    its seqs) before the events, "+1 unknown" on the tokens line and the planning
    row, and still once after more events arrive; ``q`` quits."""
    from sigil.core.locks import SessionLock
    from test_monitor_modes import anomalous_session

    home = tmp_path / "home"
    session_dir = anomalous_session(home / "logs", "anom-t", final=False)
    env = isolated_env(home, TERM="xterm-256color", NO_COLOR="1", TZ="UTC")
    with SessionLock(session_dir):
        term = Terminal(
            [*SIGIL, "monitor", "--session", "anom-t", "--refresh-rate", "0.05"], env, cols, rows
        )
        try:
            said = "5x, same input" if cols < 80 else "5 times with the same input"
            loop = f"! loop: planning started {said} (seq 1, 2, 3, 4, 5)"

            def whole(screen: str) -> bool:
                # pyte may be read mid-frame: wait for a frame drawn to its key line.
                lines = screen.splitlines()
                return (
                    loop in lines
                    and lines[-1].startswith("q quit")
                    and any(x.startswith("planning") and "+1 unknown" in x for x in lines)
                )

            screen = term.wait_for(whole, timeout=20)
            lines = screen.splitlines()
            assert "+1 unknown" in next(x for x in lines if x.startswith("Tokens"))
            # Errors and warnings before the events, whatever the size.
            assert lines.index(loop) < next(i for i, x in enumerate(lines) if x.startswith("Log"))
            with (session_dir / "execution.jsonl").open("a") as log:
                event = {
                    "timestamp": datetime.now(UTC).isoformat(), "session_id": "anom-t",
                    "event_type": "step_complete", "component": "memory",
                    "message": "memory recalled", "tokens": 7, "metadata": {"run": 1},
                    "seq": 10,
                }  # fmt: skip
                log.write(orjson.dumps(event).decode() + "\n")
            # Once after more events: a frame read mid-redraw may mix two frames,
            # so wait for a whole one (a doubled warning never passes: it times out).
            term.wait_for(
                lambda t: (
                    "1,327 / 10,000" in t
                    and t.splitlines()[-1].startswith("q quit")
                    and t.count("loop: planning") == 1
                ),
                timeout=20,
            )
            term.press("q")
            assert term.wait() == 0
        finally:
            term.close()


@pytest.mark.parametrize(("cols", "rows"), [(60, 20), (80, 24), (120, 40)])
def test_live_dashboard_with_anomalies_matches_its_golden_file(cols: int, rows: int) -> None:
    """The live frame of a session in a loop, with a call of unknown usage and a
    component on two models, at the sizes issue 12 names."""
    from model_state import Fed
    from sigil.interfaces.cli.display import DisplayOptions, render_dashboard_text
    from sigil.interfaces.cli.keys import DashboardView
    from sigil.interfaces.cli.monitor import MonitorPhase

    fed = Fed(SESSION)
    events = fixed_session()[:8]  # to reasoning's first start, given its input's hash
    events[7]["metadata"] = {"run": 1, "input_sha256": "cd" * 32}
    at = 2.8
    for seq in range(8, 12):  # reasoning started four more times with the same input
        events.append(_event(seq, at, "step_start", "reasoning", "Reasoning started", 0,
                             {"run": 1, "input_sha256": "cd" * 32}))  # fmt: skip
        at += 0.1
    for meta in ({"run": 1, "latency_ms": 400.0, "model": "gpt-4o", "usage": "unknown"},
                 {"run": 1, "latency_ms": 300.0, "model": "gpt-4o-mini", "input_tokens": 90,
                  "output_tokens": 30}):  # fmt: skip
        tokens = 0 if "usage" in meta else 120
        events.append(_event(len(events), at, "step_complete", "reasoning", "Proxy call", tokens,
                             meta))  # fmt: skip
        at += 0.5
    fed.feed(*(orjson.dumps(e) for e in events))
    now = datetime(2026, 1, 15, 10, 0, 6, tzinfo=UTC)
    text = render_dashboard_text(
        fed.state, DisplayOptions(), width=cols, height=rows, now=now,
        phase=MonitorPhase.TRACKING, view=DashboardView(keys=True), clock=True,
    )  # fmt: skip
    lines = text.splitlines()
    assert len(lines) == rows and all(len(line) <= cols for line in lines)
    assert text.count("loop: reasoning started 5") == 1
    path = GOLDEN / f"dashboard-anomalies-{cols}x{rows}.txt"
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"no golden file {path.name}; run with SIGIL_UPDATE_GOLDEN=1 and review it")
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} changed; see the module docstring"
