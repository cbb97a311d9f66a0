"""The dashboard's pieces by value: key decoding, what each key does to the view,
the sparkline, the bar past 100 %, control characters, the layout at small sizes."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from model_state import Fed
from sigil.interfaces.cli.display import DisplayOptions, render_dashboard_text, sparkline
from sigil.interfaces.cli.keys import SORTS, DashboardView, decode_keys
from sigil.interfaces.cli.monitor import MonitorPhase
from sigil.interfaces.cli.screen import cells
from sigil.telemetry.execution_logger import LogEntry
from test_display import NOW, T0, ev, make_fed


def test_decode_keys() -> None:
    assert decode_keys(b"q") == ["q"]
    assert decode_keys(b"\x1b[A\x1b[B\x1b[5~\x1b[6~") == ["up", "down", "pgup", "pgdn"]
    assert decode_keys(b"\x1bOA") == ["up"]
    assert decode_keys(b"/ab\r\x7f\x1b") == ["/", "a", "b", "enter", "backspace", "esc"]
    assert decode_keys("é".encode()) == ["é"]
    # An unknown sequence is dropped whole, never read as Esc then letters.
    assert decode_keys(b"\x1b[15;2~q") == ["q"]


def test_each_key_changes_the_view() -> None:
    view = DashboardView()
    names = ["routing", "memory"]
    assert view.handle("q", names) == "quit"
    assert view.handle("p", names) == "redraw" and view.paused
    assert view.handle("p", names) == "redraw" and not view.paused
    assert view.handle("?", names) == "redraw" and view.help
    assert view.handle("x", names) == "redraw" and not view.help  # any key closes help
    assert view.handle("e", names) == "redraw" and view.errors_only
    for expected in ("routing", "memory", None):
        view.handle("c", names)
        assert view.component == expected
    for expected in (*SORTS[1:], SORTS[0]):
        view.handle("s", names)
        assert view.sort == expected
    view.page = 5
    view.handle("up", names)
    view.handle("pgup", names)
    assert view.scroll == 6
    view.handle("pgdn", names)
    view.handle("down", names)
    view.handle("down", names)
    assert view.scroll == 0
    view.handle("/", names)
    for key in "mem":
        view.handle(key, names)
    view.handle("q", names)  # typed, not quit
    view.handle("backspace", names)
    view.handle("enter", names)
    assert view.filter_text == "mem" and not view.typing
    view.handle("esc", names)
    assert view.filter_text == "" and not view.errors_only
    assert view.handle("z", names) is None


def test_sparkline_scales_to_the_largest() -> None:
    assert sparkline([0, 1, 4, 8]) == " ▂▅█"  # rounded up: any tokens show
    assert sparkline([0, 0]) == "  "


def test_a_component_over_its_allocation_is_capped_visibly() -> None:
    fed = Fed("over-1")
    fed.feed(
        ev("session_start", budget=100_000, run=1, allocations={"routing": 100, "memory": 100}),
        ev("step_complete", "routing", 110, 1, latency_ms=5),
        ev("step_complete", "memory", 210, 2, latency_ms=5),
    )
    text = render_dashboard_text(
        fed.state, DisplayOptions(), width=80, now=T0 + timedelta(seconds=3)
    )
    routing = next(line for line in text.splitlines() if line.startswith("routing"))
    memory = next(line for line in text.splitlines() if line.startswith("memory"))
    assert "110%" in routing and "210%" in memory
    # Both bars full and ending in ">": 100 % is where the bar stops.
    assert re.search(r"#+> ", routing) and re.search(r"#+> ", memory)
    assert routing.index(">") == memory.index(">")


def test_control_characters_never_reach_the_frame() -> None:
    fed = make_fed()
    fed.feed(ev("step_complete", "memory", 1, 8))
    bad = ev("step_complete", "memory", 1, 9)
    bad.message = "evil\x1b[2J\x07\x9b done"
    fed.feed(bad)
    text = render_dashboard_text(fed.state, DisplayOptions(), width=100, now=NOW, color=True)
    assert "evil[2J done" in re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "\x07" not in text and "\x1b[2J" not in text and "\x9b" not in text


def test_errors_come_before_events_at_60x20() -> None:
    text = render_dashboard_text(
        make_fed().state,
        DisplayOptions(),
        width=60,
        height=20,
        now=NOW,
        phase=MonitorPhase.TRACKING,
        view=DashboardView(keys=True),
    )
    lines = text.splitlines()
    assert len(lines) == 20 and all(len(line) <= 60 for line in lines)
    assert "schema mismatch in output" in text  # the error, whole
    assert lines[-1].startswith("q quit")


@pytest.mark.parametrize("rows", [5, 12, 20, 45])
def test_any_size_fits_its_terminal(rows: int) -> None:
    """Never wider or taller than the terminal, whatever the size and the view."""
    states = [make_fed().state, make_fed(final="budget_exceeded").state]
    views = [DashboardView(keys=True), DashboardView(keys=True, help=True, errors_only=True)]
    for cols in (20, 33, 40, 59, 60, 79, 80, 109, 110, 140, 200):
        for state in states:
            for view in views:
                text = render_dashboard_text(
                    state, DisplayOptions(), width=cols, height=rows, now=NOW, view=view
                )
                lines = text.splitlines()
                assert len(lines) <= rows, (cols, rows)
                assert all(cells(line) <= cols for line in lines), (cols, rows, text)


# -- anomalies, unknown usage and models (issues 13, 14, 12) ----------------------------


def _seq(entry: LogEntry, seq: int) -> LogEntry:
    entry.seq = seq
    return entry


def looping_fed() -> Fed:
    """A run whose planning step starts five times with one input (an agent loop),
    a proxy call of unknown usage and a reasoning step on two models."""
    fed = Fed("loop-1")
    events = [
        ev("session_start", budget=10_000, run=1, allocations={"planning": 2000}),
        *(
            ev("step_start", "planning", 0, i, run=1, input_sha256="h" * 64)
            for i in range(1, 6)
        ),
        ev("step_complete", "planning", 120, 6, run=1, latency_ms=50, model="gpt-4o",
           input_tokens=100, output_tokens=20),
        ev("step_complete", "planning", 0, 7, run=1, latency_ms=40, model="gpt-4o",
           usage="unknown"),
        ev("step_complete", "reasoning", 900, 8, run=1, latency_ms=90, model="big-model",
           input_tokens=800, output_tokens=100),
        ev("step_complete", "reasoning", 300, 9, run=1, latency_ms=70, model="small-model",
           input_tokens=250, output_tokens=50),
    ]  # fmt: skip
    fed.feed(*(_seq(e, i) for i, e in enumerate(events)))
    return fed


def _frame(fed: Fed, cols: int, rows: int | None = None) -> str:
    return render_dashboard_text(
        fed.state, DisplayOptions(), width=cols, height=rows, now=T0 + timedelta(seconds=10),
        phase=MonitorPhase.TRACKING, view=DashboardView(keys=True),
    )  # fmt: skip


@pytest.mark.parametrize(("cols", "rows"), [(60, 20), (80, 24), (120, 40)])
def test_a_loop_is_one_warning_with_its_seqs(cols: int, rows: int) -> None:
    fed = looping_fed()
    text = _frame(fed, cols, rows)
    # One line where it fits: at 60 columns, the shorter form.
    said = "started 5x, same input" if cols < 80 else "started 5 times with the same input"
    assert f"! loop: planning {said} (seq 1, 2, 3, 4, 5)" in text.splitlines()
    # Later frames and later events show it once still.
    fed.feed(_seq(ev("step_complete", "memory", 10, 11, run=1), 10))
    text = _frame(fed, cols, rows)
    assert text.count("loop: planning") == 1
    lines = text.splitlines()
    assert len(lines) == rows and all(cells(line) <= cols for line in lines)


@pytest.mark.parametrize(("cols", "rows"), [(60, 20), (80, 24), (120, 40)])
def test_unknown_usage_is_shown_never_folded_in_as_0(cols: int, rows: int) -> None:
    text = _frame(looping_fed(), cols, rows)
    lines = text.splitlines()
    tokens_line = next(line for line in lines if line.startswith("Tokens"))
    assert "1,320" in tokens_line and "+1 unknown" in tokens_line
    planning = next(line for line in lines if line.startswith("planning"))
    reasoning = next(line for line in lines if line.startswith("reasoning"))
    assert "+1 unknown" in planning and "unknown" not in reasoning
    assert len(lines) == rows and all(cells(line) <= cols for line in lines)


def test_the_model_column_is_the_main_model_and_how_many_more() -> None:
    lines = _frame(looping_fed(), 120, 40).splitlines()
    header = next(line for line in lines if line.startswith("component"))
    at = header.index("model")
    planning = next(line for line in lines if line.startswith("planning"))
    reasoning = next(line for line in lines if line.startswith("reasoning"))
    assert planning[at:].startswith("gpt-4o ") and "+" not in planning[at : at + 14]
    # The model with the most tokens first, then how many others it used.
    assert reasoning[at:].startswith("big-model +1")


def test_the_summary_counts_unknown_usage_and_loops() -> None:
    from sigil.interfaces.cli.display import summary_lines

    text = "\n".join(summary_lines(looping_fed().state, "snapshot", width=60))
    assert "1 call of unknown usage" in text
    assert "loop: planning started 5 times" in text


def test_the_burn_sparkline_spans_the_minutes_of_a_long_run() -> None:
    """Issue 12: "a sparkline of the last minutes". A run five minutes old whose
    tokens came four minutes ago and one minute ago still shows them as bars
    (a 64 s window showed an empty sparkline), in the order they came."""
    fed = Fed("demo-1")
    fed.feed(
        ev("session_start", budget=100_000, run=1, allocations={"reasoning": 100_000}),
        ev("step_complete", "reasoning", 4000, 60, latency_ms=900),
        ev("step_complete", "reasoning", 1000, 240, latency_ms=900),
    )
    now = T0 + timedelta(seconds=300)
    frame = render_dashboard_text(
        fed.state, DisplayOptions(), width=120, height=40, now=now,
        phase=MonitorPhase.TRACKING, view=DashboardView(keys=True),
    )  # fmt: skip
    burn = next(line for line in frame.splitlines() if line.startswith("Burn"))
    bars = [c for c in burn if c in "▁▂▃▄▅▆▇█"]
    assert bars[0] == "█" and len(bars) == 2, burn  # the larger, earlier one first
