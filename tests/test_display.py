"""The monitor's renderers, as functions of a state (no processes, no files).

Widths tested: 40 columns (the narrowest the issue asks for) and 120.
"""

from __future__ import annotations

import io
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from model_state import Fed
from sigil.interfaces.cli.display import (
    DashboardRenderer,
    DisplayOptions,
    JsonRenderer,
    MinimalRenderer,
    StreamRenderer,
    budget_level,
    format_duration,
    make_renderer,
    minimal_line,
    render_dashboard_text,
    state_to_dict,
    stream_line,
    summary_lines,
    use_color,
)
from sigil.interfaces.cli.monitor import MonitorPhase, SessionState
from sigil.telemetry.execution_logger import LogEntry

T0 = datetime(2026, 1, 11, 10, 15, 32, tzinfo=UTC)
NOW = T0 + timedelta(seconds=10)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
COLOR_SGR = re.compile(r"\x1b\[[0-9;]*(3[0-9]|9[0-7]|38;)[0-9;]*m")


class TtyStringIO(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def ev(
    kind: str, component: str = "orchestrator", tokens: int = 0, at: float = 0, **meta: Any
) -> LogEntry:
    return LogEntry(
        timestamp=(T0 + timedelta(seconds=at)).isoformat(),
        session_id="demo-1",
        event_type=kind,
        component=component,
        message=f"{component} {kind.replace('_', ' ')}",
        tokens=tokens,
        metadata=meta,
    )


def make_fed(*, final: str | None = None, slow_ms: float = 2100) -> Fed:
    fed = Fed("demo-1")
    fed.feed(
        ev(
            "session_start",
            budget=2000,
            run=1,
            allocations={"routing": 100, "memory": 300, "reasoning": 1500},
        ),
        ev("step_complete", "routing", 50, 1, latency_ms=1100),
        ev("step_complete", "memory", 150, 2, latency_ms=1200),
        ev("token_consumption", "reasoning", 200, 3),
        ev("step_complete", "reasoning", 250, 4, latency_ms=slow_ms),
        b"{not json",
        ev(
            "step_error",
            "validation",
            0,
            5,
            latency_ms=100,
            category="validation",
            error="schema mismatch in output",
            attempt=1,
        ),
        ev("budget_warning", "orchestrator", 0, 6),
    )
    fed.state.rotations = 2
    if final == "complete":
        fed.feed(ev("session_complete", at=7, status="complete"))
    elif final == "budget_exceeded":
        fed.feed(
            ev(
                "session_error",
                at=7,
                status="budget_exceeded",
                reason="budget of 2,000 tokens exhausted by reasoning",
            )
        )
    return fed


def make_state(*, final: str | None = None, slow_ms: float = 2100) -> SessionState:
    return make_fed(final=final, slow_ms=slow_ms).state


# -- small pieces -----------------------------------------------------------------------


def test_use_color_needs_a_terminal_and_no_NO_COLOR() -> None:
    assert not use_color(io.StringIO(), {})
    assert use_color(TtyStringIO(), {})
    assert not use_color(TtyStringIO(), {"NO_COLOR": "1"})
    assert use_color(TtyStringIO(), {"NO_COLOR": ""})  # no-color.org: set and non-empty
    assert not use_color(TtyStringIO(), {"TERM": "dumb"})


@pytest.mark.parametrize(
    ("fraction", "level"),
    [
        (0.0, "ok"),
        (0.4999, "ok"),
        (0.5, "warning"),
        (0.79, "warning"),
        (0.8, "critical"),
        (0.9499, "critical"),
        (0.95, "exceeded"),
        (1.2, "exceeded"),
    ],
)
def test_budget_levels_at_50_80_95(fraction: float, level: str) -> None:
    assert budget_level(fraction, DisplayOptions()) == level


def test_the_sessions_own_thresholds_win() -> None:
    state = SessionState(session_id="s")
    state.thresholds = {"warning": 0.2}
    assert budget_level(0.3, DisplayOptions(), state) == "warning"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (4.25, "4.2s"),
        (65, "1m 05s"),
        (3 * 3600 + 120, "3h 02m"),
        (50 * 3600, "2d 02h"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_stream_line_is_the_specs_format() -> None:
    line = stream_line(ev("step_complete", "routing", 1234, 1))
    assert line == "[10:15:33] routing: routing step complete (1,234 tokens)"
    colored = stream_line(ev("step_complete", "routing", 5, 1), color=True)
    assert "\x1b[36mrouting\x1b[0m" in colored
    assert ANSI.sub("", colored) == "[10:15:33] routing: routing step complete (5 tokens)"
    assert "\x1b[31m" in stream_line(ev("step_error", "memory"), color=True)


def test_stream_line_accepts_the_offset_less_timestamp() -> None:
    entry = ev("step_start", "memory")
    entry.timestamp = "2026-01-11T10:15:32.123456"
    assert stream_line(entry).startswith("[10:15:32] memory:")


@pytest.mark.parametrize("width", [24, 40, 120])
def test_minimal_line_fits(width: int) -> None:
    line = minimal_line(make_state(), width)
    assert len(line) < width
    assert "650 / 2,000 (32.50%)" in line
    if width == 40:
        assert line == "Tokens: 650 / 2,000 (32.50%) running"
    if width > 40:  # then the error count and the recent rate, as room allows
        assert line == "Tokens: 650 / 2,000 (32.50%) running | 1 error | 0 tok/min"


# -- json -------------------------------------------------------------------------------


def test_state_to_dict_carries_the_same_state() -> None:
    state = make_state()
    obj = orjson.loads(orjson.dumps(state_to_dict(state, phase=MonitorPhase.TRACKING, now=NOW)))
    assert obj["type"] == "state"
    assert obj["status"] == "running" and obj["phase"] == "tracking"
    assert obj["tokens_used"] == 650 and obj["budget"] == 2000
    assert obj["components"]["reasoning"] == {
        "tokens": 450,
        "allocated": 1500,
        "operations": 1,
        "errors": 0,
        "retries": 0,
        "unknown_usage_calls": 0,
        "tokens_held": 0,
        "latency_ms": 2100.0,
        "avg_latency_ms": 2100.0,
        "p95_latency_ms": 2100.0,
        "last_error": None,
        # No model ran: no cost, and nothing unpriced (issue 12, Cost).
        "cost_usd": None,
        "unpriced_tokens": 0,
        "unpriced_models": [],
        "models": [],
    }
    assert obj["cost_usd"] is None and obj["unpriced_tokens"] == 0
    assert (obj["models"], obj["unknown_usage_calls"], obj["loops"]) == ({}, 0, [])
    assert list(obj["components"])[:3] == ["routing", "memory", "reasoning"]
    assert obj["components"]["validation"]["errors"] == 1
    assert (obj["malformed"], obj["rotations"], obj["events"]) == (1, 2, 7)
    assert obj["run"]["number"] == 1 and obj["run"]["tokens_used"] == 650
    assert obj["elapsed_seconds"] == pytest.approx(10.0)
    # 650 tokens over 6 s of event time; 4 s since the last event at NOW: the
    # recent rate counts the idle seconds (650 / 10 s), the average does not.
    assert obj["tokens_per_second"] == pytest.approx(65.0)
    assert obj["average_tokens_per_second"] == pytest.approx(650 / 6, abs=0.01)
    assert obj["stalled_seconds"] is None
    assert obj["seconds_to_budget_end"] == pytest.approx(1350 / 65, abs=0.1)
    assert sum(c["tokens"] for c in obj["components"].values()) == obj["tokens_used"]


def test_final_object_has_the_exit_code() -> None:
    obj = state_to_dict(make_state(final="budget_exceeded"), final=True, exit_code=3)
    assert (obj["type"], obj["status"], obj["exit_code"]) == ("final", "budget_exceeded", 3)


# -- the final summary ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("final", "outcome", "title"),
    [
        ("complete", "complete", "EXECUTION COMPLETE"),
        ("budget_exceeded", "budget_exceeded", "BUDGET EXCEEDED"),
        (None, "incomplete", "SESSION INCOMPLETE"),
        (None, "stopped", "MONITOR STOPPED"),
    ],
)
@pytest.mark.parametrize("width", [40, 120])
def test_summary(final: str | None, outcome: str, title: str, width: int) -> None:
    state = make_state(final=final)
    if outcome == "incomplete":
        state.incomplete = True
    lines = summary_lines(state, outcome, width=width, now=NOW)
    text = "\n".join(lines)
    assert title in text
    assert "Tokens:    650 / 2,000 (32.50%)" in text
    assert "Malformed: 1" in text and "Rotations: 2" in text
    assert re.search(r"reasoning\s+450 tok 2,100ms", text)
    assert all(len(line) <= 40 for line in lines if width == 40)
    assert "\x1b" not in text
    if outcome == "incomplete":
        assert "INCOMPLETE" in text
        # At 40 columns the command is split with a shell line continuation.
        assert "sigil orchestrate --session demo-1 --resume" in text.replace("\\\n  ", "")
    if outcome == "stopped":
        assert "so far" in text


def test_summary_in_color_colours_only_the_title() -> None:
    lines = summary_lines(make_state(final="complete"), "complete", color=True)
    assert lines[1] == "\x1b[1;32mEXECUTION COMPLETE\x1b[0m"
    assert not any("\x1b" in line for i, line in enumerate(lines) if i != 1)


# -- the dashboard ----------------------------------------------------------------------


@pytest.mark.parametrize("width", [40, 120])
def test_dashboard_fits_the_width(width: int) -> None:
    text = render_dashboard_text(
        make_state(), DisplayOptions(), width=width, height=50, now=NOW, phase=MonitorPhase.TRACKING
    )
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    assert "\x1b" not in text
    assert lines[0].startswith("SIGIL MONITOR  demo-1")
    assert "RUNNING" in lines[1] and "Elapsed 10.0s" in lines[1]
    assert "650 / 2,000 (32.50%)" in text
    assert ("left 1,350" if width >= 60 else "Left    1,350") in text
    assert "Burn    3,900 tok/min" in text  # the recent rate, 65 tok/s, per minute
    assert "avg 6,500/min" in text
    assert "budget ends in ~20.8s" in text
    for name in ("routing", "memory", "reasoning", "validation"):
        assert name in text
    assert "1 malformed" in text and "2 rotations" in text
    # The errors panel: component, category, attempt, time, then the whole message.
    assert re.search(
        r"! validation error\s+validation · attempt 1 · 10:15:37", text.replace("\n", "")
    )
    assert "    schema mismatch in output" in lines
    assert "10:15:38 orchestrator budget warning (reasoning)" in " ".join(
        line.strip(" !") for line in lines
    )  # who crossed the level
    if width >= 60:
        assert re.search(r"reasoning\s+450 / 1,500 30% #+\.+ 2,100ms 2,100ms", text)
        assert re.search(r"component\s+tokens\s+%\s+p50\s+p95\s+in/out\s+model\s+err\s+rty", text)
    else:
        assert re.search(r"reasoning\s+450 ", text)
        assert "Slowest reasoning 2,100ms/op" in text


def test_dashboard_in_color() -> None:
    text = render_dashboard_text(make_state(), DisplayOptions(), width=100, color=True, now=NOW)
    assert COLOR_SGR.search(text)
    assert "SIGIL MONITOR" in ANSI.sub("", text)


def test_slowest_is_highlighted_past_the_latency_warning() -> None:
    options = DisplayOptions(latency_warning_ms=5000)
    calm = render_dashboard_text(make_state(slow_ms=2100), options, width=100, now=NOW)
    slow = render_dashboard_text(make_state(slow_ms=6100), options, width=100, now=NOW)
    assert "slow" not in calm
    assert re.search(r"reasoning.*6,100ms slow", slow)


def test_settings_turn_parts_off() -> None:
    options = DisplayOptions(
        show_budget_bar=False,
        show_forecast=False,
        show_component_breakdown=False,
        show_latency=False,
    )
    text = render_dashboard_text(make_state(), options, width=100, now=NOW)
    assert "Budget" not in text and "tok/min" not in text and "Components" not in text
    assert "650 / 2,000" in text


def test_budget_bar_fills_with_the_budget() -> None:
    text = render_dashboard_text(make_state(), DisplayOptions(), width=50, now=NOW)
    bar = next(line for line in text.splitlines() if line.startswith("Budget"))
    cells = bar[len("Budget  ") :].rstrip()
    assert cells.count("#") == round(0.325 * len(cells))


def test_recent_events_take_what_height_is_left() -> None:
    fed = make_fed()
    fed.feed(*(ev("step_complete", "memory", 1, 7 + i) for i in range(30)))
    state = fed.state
    tall = render_dashboard_text(state, DisplayOptions(max_events=8), width=80, height=60, now=NOW)
    short = render_dashboard_text(state, DisplayOptions(max_events=8), width=80, height=24, now=NOW)
    unsized = render_dashboard_text(state, DisplayOptions(max_events=8), width=80, now=NOW)
    # A terminal's height is used whole (issue 12: 8 events above 20 empty rows at 140x45).
    assert tall.count("memory step complete") == 31  # all of them: the height has room
    assert len(short.splitlines()) <= 24 and "memory step complete" in short
    assert unsized.count("memory step complete") == 8  # no height: max_events


def test_waiting_frames() -> None:
    state = SessionState(session_id="demo-1")
    text = render_dashboard_text(state, DisplayOptions(), width=40, phase=MonitorPhase.INITIAL)
    assert "WAITING FOR LOG" in text
    text = render_dashboard_text(state, DisplayOptions(), width=40, phase=MonitorPhase.WAITING)
    assert "WAITING FOR START" in text


def test_incomplete_frame() -> None:
    state = make_state()
    state.incomplete = True
    text = render_dashboard_text(state, DisplayOptions(), width=60, now=NOW)
    assert "INCOMPLETE" in text and "writer gone" in text


def test_a_frame_renders_fast() -> None:
    state = make_state()
    render_dashboard_text(state, DisplayOptions(), width=120, height=40)  # imports
    started = time.perf_counter()
    for _ in range(20):
        render_dashboard_text(state, DisplayOptions(), width=120, height=40)
    assert (time.perf_counter() - started) / 20 < 0.05


# -- renderers: where output goes -------------------------------------------------------


def test_dashboard_falls_back_to_stream_without_a_terminal() -> None:
    assert isinstance(make_renderer("dashboard", out=io.StringIO()), StreamRenderer)
    assert isinstance(make_renderer("dashboard", out=TtyStringIO()), DashboardRenderer)
    with pytest.raises(ValueError):
        make_renderer("fancy")


def test_stream_renderer_data_on_stdout_progress_on_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    renderer = StreamRenderer(out, err, DisplayOptions())
    fed = Fed("s")
    fed.feed(*(ev("step_complete", "routing", 1, i) for i in range(25)))
    state = fed.state
    renderer.start("watching session s")
    renderer.caught_up(state, MonitorPhase.TRACKING)
    renderer.on_events(state, fed.feed(ev("step_complete", "memory", 7, 30)))
    fed.feed(ev("session_complete", at=31))
    renderer.finish(state, MonitorPhase.FINAL, "complete", 0)
    lines = out.getvalue().splitlines()
    assert len([line for line in lines if line.startswith("[")]) == 21
    assert lines[20] == "[10:16:02] memory: memory step complete (7 tokens)"
    assert "EXECUTION COMPLETE" in out.getvalue()
    assert "(5 earlier events folded, not shown)" in err.getvalue()
    assert "watching session s" in err.getvalue()
    assert "\x1b" not in out.getvalue()


def test_minimal_renderer_rewrites_one_line_on_a_terminal() -> None:
    out, err = TtyStringIO(), io.StringIO()
    renderer = MinimalRenderer(out, err, DisplayOptions())
    fed = make_fed()
    state = fed.state
    renderer.refresh(state, MonitorPhase.TRACKING, True)
    renderer.refresh(state, MonitorPhase.TRACKING, True)  # unchanged: nothing written
    fed.feed(ev("step_complete", "routing", 150, 8))
    renderer.refresh(state, MonitorPhase.TRACKING, True)
    written = out.getvalue()
    assert written.count("\r") == 2 and "\n" not in written
    # The tokens in the budget level's colour (green: under 50 %), errors red.
    assert written.endswith(
        "\r\x1b[32mTokens: 800 / 2,000 (40.00%)\x1b[0m running"
        " | \x1b[1;31m1 error\x1b[0m | \x1b[36m0 tok/min\x1b[0m\x1b[K"
    )
    renderer.close()
    assert out.getvalue().endswith("\n")


def test_minimal_renderer_prints_lines_when_piped() -> None:
    out = io.StringIO()
    renderer = MinimalRenderer(out, io.StringIO(), DisplayOptions())
    state = make_state(final="complete")
    renderer.finish(state, MonitorPhase.FINAL, "complete", 0)
    text = out.getvalue()
    assert text.startswith("Tokens: 650 / 2,000 (32.50%) complete | 1 error\n")
    assert "\r" not in text and "\x1b" not in text and "EXECUTION COMPLETE" in text


def test_json_renderer_keeps_stdout_pure_ndjson() -> None:
    out, err = io.StringIO(), io.StringIO()
    renderer = JsonRenderer(out, err, DisplayOptions())
    fed = make_fed()
    state = fed.state
    renderer.start("watching")
    renderer.caught_up(state, MonitorPhase.TRACKING)
    renderer.refresh(state, MonitorPhase.TRACKING, False)  # nothing new: no object
    renderer.refresh(state, MonitorPhase.TRACKING, True)  # the state did not change: none
    fed.feed(ev("step_complete", "routing", 0, 7))
    renderer.refresh(state, MonitorPhase.TRACKING, True)  # it changed: one
    fed.feed(ev("session_complete", at=8, status="complete"))
    renderer.finish(state, MonitorPhase.FINAL, "complete", 0)
    objects = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [o["type"] for o in objects] == ["state", "state", "final"]
    assert objects[1]["events"] == objects[0]["events"] + 1
    assert objects[-1]["exit_code"] == 0 and objects[-1]["outcome"] == "complete"
    assert objects[-1]["tokens_used"] == 650
    assert "EXECUTION COMPLETE" in err.getvalue()


def test_dashboard_renderer_respects_NO_COLOR(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setenv("LINES", "40")
    for no_color, expect_color in (("1", False), (None, True)):
        if no_color:
            monkeypatch.setenv("NO_COLOR", no_color)
        else:
            monkeypatch.delenv("NO_COLOR", raising=False)
        monkeypatch.setenv("TERM", "xterm-256color")
        out = TtyStringIO()
        renderer = DashboardRenderer(out, io.StringIO(), DisplayOptions())
        fed = make_fed()
        state = fed.state
        renderer.caught_up(state, MonitorPhase.TRACKING)
        fed.feed(ev("session_complete", at=8, status="complete"))
        renderer.finish(state, MonitorPhase.FINAL, "complete", 0)
        renderer.close()
        text = out.getvalue()
        assert bool(COLOR_SGR.search(text)) is expect_color
        plain = ANSI.sub("", text)
        assert "SIGIL MONITOR" in plain and "EXECUTION COMPLETE" in plain
        assert all(len(line) <= 60 for line in plain.splitlines())
