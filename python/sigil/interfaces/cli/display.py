"""What ``sigil monitor`` shows: renderers as functions of a :class:`SessionState`.

Every number comes from the state's snapshot of the native session model
(contract 12); this module formats, it does not count.

The formatting functions (``stream_line``, ``minimal_line``, ``state_to_dict``,
``summary_lines``, ``render_dashboard``) take a state and return text or a rich
renderable; they do no I/O, so they are tested by value at any width. The
``*Renderer`` classes below them only decide what to write where:

* data goes to stdout (frames, event lines, NDJSON objects, the final summary),
  progress and errors to stderr, in every mode;
* colour only on a terminal and never when ``NO_COLOR`` is set (no-color.org);
* rich is imported only on the dashboard paths, so the stream, minimal and json
  modes start without paying for it.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

    from sigil.interfaces.cli.monitor import EntryLike, MonitorPhase, SessionState

__all__ = [
    "DashboardRenderer",
    "DisplayOptions",
    "JsonRenderer",
    "MinimalRenderer",
    "Renderer",
    "StreamRenderer",
    "budget_level",
    "format_duration",
    "make_renderer",
    "minimal_line",
    "render_dashboard",
    "render_dashboard_text",
    "state_to_dict",
    "stream_line",
    "summary_lines",
    "use_color",
]

# The spec's pipeline order (4.3.2); other components follow in name order.
COMPONENT_ORDER = ("routing", "memory", "planning", "reasoning", "contracts", "validation")

# SGR colours for the stream view's component column (no rich import needed there).
_COMPONENT_SGR = {
    "orchestrator": "1",
    "routing": "36",
    "memory": "35",
    "planning": "34",
    "reasoning": "33",
    "contracts": "32",
    "validation": "92",
}
_PALETTE = ("36", "35", "34", "33", "32", "96", "95", "94")
_ALERT_EVENTS = frozenset({"step_error", "session_error", "budget_warning", "budget_exceeded"})

# Budget levels and their dashboard styles (spec 6.1 thresholds: 50 / 80 / 95 %).
_LEVEL_STYLE = {"ok": "green", "warning": "yellow", "critical": "red", "exceeded": "bold red"}


@dataclass(frozen=True, slots=True)
class DisplayOptions:
    """The ``monitoring`` settings (spec Appendix A) plus the budget thresholds."""

    show_component_breakdown: bool = True
    show_budget_bar: bool = True
    show_forecast: bool = True
    show_latency: bool = True
    highlight_slowest: bool = True
    latency_warning_ms: float = 5000.0
    warning_threshold: float = 0.5
    critical_threshold: float = 0.8
    exceeded_threshold: float = 0.95
    max_events: int = 8
    allocations: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any) -> DisplayOptions:
        """Options from a :class:`sigil.core.config.Settings`."""
        mon = settings.monitoring
        budget = settings.token_budget
        return cls(
            show_component_breakdown=bool(mon.show_component_breakdown),
            show_budget_bar=bool(mon.show_budget_bar),
            show_forecast=bool(mon.show_forecast),
            show_latency=bool(mon.show_latency),
            highlight_slowest=bool(mon.highlight_slowest),
            latency_warning_ms=float(mon.latency_warning_ms),
            warning_threshold=float(budget.warning_threshold),
            critical_threshold=float(budget.critical_threshold),
            exceeded_threshold=float(budget.exceeded_threshold),
            allocations=dict(budget.allocations or {}),
        )


def use_color(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never with ``NO_COLOR`` set (no-color.org)."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    if env.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _sgr(text: str, code: str, color: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if color and code else text


def _component_code(name: str) -> str:
    code = _COMPONENT_SGR.get(name)
    if code is None:
        code = _PALETTE[zlib.crc32(name.encode()) % len(_PALETTE)]  # stable per name
    return code


# -- small formatters -------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """``4.2s``, ``3m 05s``, ``2h 07m``: short enough for a 40-column line."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24:02d}h"


def format_latency(ms: float) -> str:
    return f"{ms:,.0f}ms" if ms < 10_000 else f"{ms / 1000:,.1f}s"


def budget_level(
    fraction: float, options: DisplayOptions, state: SessionState | None = None
) -> str:
    """``ok`` / ``warning`` / ``critical`` / ``exceeded`` for a used fraction of the budget.

    The session's own thresholds (``session_start`` metadata) win over the
    configured ones, so the monitor colours the bar where the orchestrator warns.
    """
    thresholds = state.thresholds if state is not None else {}
    exceeded = thresholds.get("exceeded", options.exceeded_threshold)
    critical = thresholds.get("critical", options.critical_threshold)
    warning = thresholds.get("warning", options.warning_threshold)
    if fraction >= exceeded:
        return "exceeded"
    if fraction >= critical:
        return "critical"
    if fraction >= warning:
        return "warning"
    return "ok"


def ordered_components(names: Iterable[str]) -> list[str]:
    """The spec's pipeline order first, then any other component by name."""
    present = set(names)
    first = [n for n in COMPONENT_ORDER if n in present]
    return first + sorted(present - set(COMPONENT_ORDER))


def _status_word(state: SessionState, phase: MonitorPhase | str | None) -> str:
    status = state.display_status
    phase_value = getattr(phase, "value", phase)
    if phase_value == "initial":
        return "WAITING FOR LOG"
    if status == "waiting":
        return "WAITING FOR START"
    return status.replace("_", " ").upper()


def read_problems(state: SessionState, *, include_malformed: bool = True) -> list[str]:
    """What could not be read, as short lines (contract 6: nothing dropped silently)."""
    problems: list[str] = []
    if state.malformed and include_malformed:
        where = ""
        if state.malformed_samples:
            where = f" (first at byte {state.malformed_samples[0][0]:,})"
        problems.append(f"{state.malformed:,} malformed lines skipped{where}")
    if state.oversize_lines:
        problems.append(f"{state.oversize_lines:,} oversize lines skipped")
    if state.torn_tail:
        problems.append("torn last line (writer died mid-write)")
    if state.seq_gaps:
        problems.append(f"{state.seq_gaps:,} seq gaps ({state.seq_missing:,} events missing)")
    if state.seq_regressions:
        problems.append(f"{state.seq_regressions:,} seq went backwards")
    if state.dropped_events:
        problems.append(f"writer dropped {state.dropped_events:,} events")
    if state.truncations:
        problems.append(f"log truncated {state.truncations:,} times")
    if state.rereads:
        problems.append(f"{state.rereads:,} events re-read after truncation (counted once)")
    return problems


def error_lines(state: SessionState, limit: int = 3) -> list[str]:
    """The last error of each component (the model's ``LastError``), latest first:
    which component, what went wrong, at which attempt."""
    lines: list[str] = []
    for name, err in state.last_errors()[:limit]:
        what = "retry" if err.event_type == "retry_attempt" else "error"
        detail = []
        if err.category:
            detail.append(err.category)
        if err.attempt is not None:
            detail.append(f"attempt {err.attempt}")
        suffix = f" ({', '.join(detail)})" if detail else ""
        lines.append(f"{name} {what}{suffix}: {err.message}")
    return lines


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


# -- stream and minimal -----------------------------------------------------------------


def stream_line(entry: EntryLike, color: bool = False) -> str:
    """One event as the spec's stream line: ``[HH:MM:SS] component: message (N tokens)``."""
    timestamp = entry.timestamp
    _, sep, rest = timestamp.partition("T")
    clock = rest[:8] if sep else timestamp[:8]
    component = _sgr(entry.component, _component_code(entry.component), color)
    message = entry.message
    if entry.event_type in _ALERT_EVENTS:
        message = _sgr(message, "31", color)
    return f"[{clock}] {component}: {message} ({entry.tokens:,} tokens)"


def minimal_line(state: SessionState, width: int = 80) -> str:
    """``Tokens: used / budget (percent)`` plus the status, cut to fit ``width``."""
    core = f"{state.tokens_used:,} / {state.total_budget:,} ({state.budget_percentage:.2f}%)"
    status = state.display_status.replace("_", " ")
    line = f"Tokens: {core} {status}"
    if len(line) >= width:
        line = f"{core} {status}"
    if len(line) >= width:
        line = core
    return line[: max(1, width - 1)]


# -- json -------------------------------------------------------------------------------


def state_to_dict(
    state: SessionState,
    *,
    phase: MonitorPhase | str | None = None,
    final: bool = False,
    exit_code: int | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The state as one JSON object (``--mode json``): what the dashboard shows, as data."""
    allocations = state.allocations
    components = {
        name: {
            "tokens": c.tokens,
            "allocated": allocations.get(name),
            "operations": c.operations,
            "errors": c.errors,
            "retries": c.retries,
            "latency_ms": round(c.latency_ms, 3),
            "avg_latency_ms": _round(c.average_latency_ms),
            "p95_latency_ms": _round(c.p95_latency_ms),
            "last_error": c.last_error.to_dict() if c.last_error else None,
        }
        for name, c in ((n, state.components[n]) for n in ordered_components(state.components))
    }
    run = state.run
    run_components = {name: c.tokens for name, c in sorted(run.components.items())}
    remaining = state.seconds_to_budget_end(now)
    stalled = state.stalled_seconds(now)
    obj: dict[str, Any] = {
        "type": "final" if final else "state",
        "session_id": state.session_id,
        "status": state.display_status,
        "reason": state.reason,
        "phase": getattr(phase, "value", phase),
        "tokens_used": state.tokens_used,
        "budget": state.total_budget,
        "tokens_remaining": state.tokens_remaining,
        "budget_percentage": round(state.budget_percentage, 4),
        "components": components,
        "run": {
            "number": run.number,
            "status": state.run_display_status,
            "reason": run.reason,
            "tokens_used": run.tokens,
            "components": run_components,
            "started_at": run.started_at,
            "ended_at": run.ended_at,
        },
        "runs": state.runs,
        "elapsed_seconds": round(state.elapsed_at(now), 3),
        "tokens_per_second": _round(state.recent_rate(now)),
        "average_tokens_per_second": _round(state.average_rate),
        "stalled_seconds": None if stalled is None else round(stalled, 1),
        "seconds_to_budget_end": None if remaining is None else round(remaining, 1),
        "events": state.entries,
        "malformed": state.malformed,
        "oversize_lines": state.oversize_lines,
        "torn_tail": state.torn_tail,
        "rotations": state.rotations,
        "truncations": state.truncations,
        "rereads": state.rereads,
        "seq_gaps": state.seq_gaps,
        "missing_events": state.seq_missing,
        "dropped_events": state.dropped_events,
        "incomplete": state.incomplete and not state.ended,
        "last_timestamp": state.last_timestamp,
    }
    if exit_code is not None:
        obj["exit_code"] = exit_code
    return obj


def _labelled(label: str, text: str, width: int) -> list[str]:
    """``label`` then ``text``, wrapped under itself to stay within ``width`` (never cut)."""
    import textwrap

    room = max(20, width - 1 - len(label))
    wrapped = textwrap.wrap(text, room, break_long_words=True, break_on_hyphens=False) or [""]
    pad = " " * len(label)
    return [label + wrapped[0], *(pad + line for line in wrapped[1:])]


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# -- the final summary (spec _display_final_summary), every mode ------------------------

_TITLES = {
    "complete": "EXECUTION COMPLETE",
    "error": "EXECUTION FAILED",
    "budget_exceeded": "BUDGET EXCEEDED",
    "incomplete": "SESSION INCOMPLETE",
    "incomplete_data": "DATA MISSING",  # the run says complete, but events are missing
    "interrupted": "RUN INTERRUPTED",  # the run was stopped by SIGINT/SIGTERM
    "stopped": "MONITOR STOPPED",  # the user stopped the monitor
    "snapshot": "SESSION RUNNING",  # --once on a run in progress
    "waiting": "WAITING FOR START",  # --once before the first session_start
}


def summary_lines(
    state: SessionState,
    outcome: str,
    *,
    width: int = 60,
    color: bool = False,
    now: datetime | None = None,
) -> list[str]:
    """The final summary as lines no wider than ``width`` where possible.

    ``outcome`` is the run's final status, ``incomplete`` (writer gone) or
    ``interrupted`` (the user stopped the monitor; the numbers are "so far").
    """
    rule = "=" * max(10, min(width - 1, 60))
    title = _TITLES.get(outcome, outcome.upper())
    title_code = {
        "complete": "1;32", "incomplete": "1;33", "incomplete_data": "1;33",
        "interrupted": "1;33", "stopped": "1",
    }.get(outcome, "1;31")  # fmt: skip
    run = state.run
    lines = [rule, _sgr(title, title_code, color), rule]
    run_text = f" (run {run.number} of {state.runs})" if state.runs > 1 else ""
    lines.append(f"Session:   {state.session_id}{run_text}")
    lines.append(f"Status:    {_status_word(state, None)}")
    if state.reason and state.ended:
        lines.extend(_labelled("Reason:    ", state.reason, width))
    lines.append(f"Duration:  {format_duration(state.elapsed_at(now))}")
    lines.append(
        f"Tokens:    {state.tokens_used:,} / {state.total_budget:,} "
        f"({state.budget_percentage:.2f}%)"
    )
    lines.append(f"Remaining: {state.tokens_remaining:,}")
    if state.runs > 1:
        lines.append(f"This run:  {run.tokens:,}")
    average = state.average_rate
    if average is not None:
        lines.append(f"Rate:      {_rate(average)} tok/s")
    if state.components:
        lines.append("Components:")
        for name in ordered_components(state.components):
            comp = state.components[name]
            if not comp.tokens and not comp.operations and not comp.errors:
                continue  # e.g. the orchestrator's bookkeeping events
            avg = comp.average_latency_ms
            latency = f" {format_latency(avg)}/op" if avg is not None else ""
            label = name if len(name) <= 12 else name[:11] + "~"
            line = f"  {label:<12}{comp.tokens:>10,} tok{latency}"
            failed = f" {comp.errors:,} err" if comp.errors else ""
            lines.append(line + failed if len(line + failed) < width else line)
    for error in error_lines(state):
        lines.extend(_labelled("Error:     ", error, width))
    # One count per line: short enough for 40 columns, easy to grep.
    lines.append(f"Events:    {state.entries:,}")
    lines.append(f"Malformed: {state.malformed:,}")
    lines.append(f"Rotations: {state.rotations:,}")
    # The malformed count has its own line above, always shown.
    lines.extend(f"Warning:   {p}" for p in read_problems(state, include_malformed=False))
    if outcome in ("incomplete", "interrupted"):
        if outcome == "incomplete":
            lines.append("The writer stopped without a final")
            lines.append("event (its lock is free).")
        else:
            lines.append("The run was stopped by a signal.")
        lines.append(f"Last event: {state.last_timestamp or 'none'}")
        lines.append("Resume the session with:")
        command = f"sigil orchestrate --session {state.session_id} --resume"
        if len(command) < width:
            lines.append(command)
        else:  # still one shell command when pasted
            lines.append("sigil orchestrate \\")
            lines.append(f"  --session {state.session_id} --resume")
    elif outcome == "incomplete_data":
        lines.append("Events are missing from the log:")
        lines.append("the totals are a lower bound.")
    elif outcome == "stopped":
        lines.append("Totals so far (it may still be running).")
    lines.append(rule)
    return lines


# -- the dashboard (rich, imported lazily) ----------------------------------------------


def render_dashboard(
    state: SessionState,
    options: DisplayOptions,
    *,
    phase: MonitorPhase | str | None = None,
    width: int = 80,
    height: int | None = None,
    now: datetime | None = None,
    notice: str | None = None,
) -> RenderableType:
    """The dashboard frame (spec 4.3.2) for a terminal ``width`` x ``height``.

    Below 60 columns the component table drops the allocation and latency
    columns and the latency gets its own short section, so nothing is cut
    mid-number at 40 columns. The recent-events list takes what height is left.
    """
    from rich.console import Group
    from rich.rule import Rule
    from rich.table import Table
    from rich.text import Text

    wide = width >= 60
    rows: list[RenderableType] = []

    # Header: who, what, how long.
    header = Text(no_wrap=True, overflow="ellipsis")
    header.append("SIGIL MONITOR", style="bold cyan")
    header.append(f"  {state.session_id}", style="bold")
    if state.run.number:
        header.append(f"  run {state.run.number}", style="dim")
    rows.append(header)
    status = _status_word(state, phase)
    status_style = {
        "RUNNING": "bold green",
        "COMPLETE": "bold green",
        "INCOMPLETE": "bold yellow",
        "WAITING FOR START": "yellow",
        "WAITING FOR LOG": "yellow",
    }.get(status, "bold red")
    line = Text(no_wrap=True, overflow="ellipsis")
    line.append("Status  ", style="dim")
    line.append(status, style=status_style)
    line.append("  Elapsed ", style="dim")
    line.append(format_duration(state.elapsed_at(now)))
    rows.append(line)
    if state.reason and state.ended:
        why = Text(no_wrap=True, overflow="ellipsis")
        why.append("Reason  ", style="dim")
        why.append(state.reason, style="red")
        rows.append(why)
    if notice:
        rows.append(Text(notice, style="yellow", overflow="fold"))

    # Budget.
    fraction = state.tokens_used / state.total_budget if state.total_budget > 0 else 0.0
    level = budget_level(fraction, options, state)
    level_style = _LEVEL_STYLE[level]
    used = Text(no_wrap=True, overflow="ellipsis")
    used.append("Tokens  ", style="dim")
    used.append(f"{state.tokens_used:,}", style="bold")
    used.append(f" / {state.total_budget:,} ")
    used.append(f"({state.budget_percentage:.2f}%)", style=level_style)
    rows.append(used)
    if options.show_budget_bar:
        bar_width = max(4, width - 10)
        bar = Text(no_wrap=True)
        bar.append("Budget  ", style="dim")
        bar.append_text(_bar_text(fraction, bar_width, level_style))
        rows.append(bar)
    left = Text(no_wrap=True, overflow="ellipsis")
    left.append("Left    ", style="dim")
    left.append(f"{state.tokens_remaining:,}")
    if state.runs > 1:
        left.append(f"  run {state.run.tokens:,}", style="dim")
    rows.append(left)
    if options.show_forecast:
        # The recent rate (last minute of event time), the session's average, and
        # the forecast from the recent rate: a long model call shows as a stall
        # instead of dragging an average down.
        forecast = Text(no_wrap=True, overflow="ellipsis")
        forecast.append("Rate    ", style="dim")
        forecast.append(f"{_rate(state.recent_rate(now))} tok/s")
        forecast.append(f"  avg {_rate(state.average_rate)}", style="dim")
        rows.append(forecast)
        more: list[tuple[str, str]] = []
        stalled = state.stalled_seconds(now)
        if stalled is not None:
            more.append((f"stalled {format_duration(stalled)}", "yellow"))
        to_end = state.seconds_to_budget_end(now)
        if to_end is not None:
            more.append((f"budget ends in ~{format_duration(to_end)}", level_style))
        for text, style in more:
            if forecast.cell_len + 2 + len(text) > width:  # narrow: a line of its own
                forecast = Text(" " * 8, no_wrap=True, overflow="ellipsis")
                rows.append(forecast)
            else:
                forecast.append("  ")
            forecast.append(text, style=style)

    # Components: tokens against allocation, latency, slowest highlighted.
    allocations = dict(options.allocations)
    allocations.update(state.allocations)
    names = ordered_components(
        set(state.components) | {n for n in allocations if n in COMPONENT_ORDER}
    )
    names = [n for n in names if n != "orchestrator" or state.components[n].tokens]
    slowest = state.slowest_component if options.highlight_slowest else None
    if options.show_component_breakdown and names:
        rows.append(Rule("Components", style="dim", align="left"))
        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column("name", no_wrap=True, overflow="ellipsis", max_width=12)
        table.add_column("tokens", justify="right", no_wrap=True)
        table.add_column("bar", ratio=1, no_wrap=True, min_width=3)
        show_latency_col = options.show_latency and wide
        if show_latency_col:
            table.add_column("latency", justify="right", no_wrap=True)
        for name in names:
            comp = state.components.get(name)
            tokens = comp.tokens if comp else 0
            allocated = allocations.get(name)
            tokens_text = f"{tokens:,} / {allocated:,}" if wide and allocated else f"{tokens:,}"
            share = tokens / allocated if allocated else 0.0
            comp_level = budget_level(share, options) if allocated else "ok"
            cells: list[RenderableType] = [
                Text(name, style="bold" if comp and comp.errors == 0 else "bold red"),
                Text(tokens_text),
                _Bar(share, _LEVEL_STYLE[comp_level]) if allocated else Text(""),
            ]
            if show_latency_col:
                cells.append(_latency_text(comp, name == slowest, options, p95=width >= 100))
            table.add_row(*cells)
        rows.append(table)
    if options.show_latency and not wide and slowest is not None:
        comp = state.components[slowest]
        slow = Text(no_wrap=True, overflow="ellipsis")
        slow.append("Slowest ", style="dim")
        slow.append(f"{slowest} ")
        slow.append_text(_latency_text(comp, True, options))
        rows.append(slow)

    # Warnings: what could not be read, budget warnings, errors, the writer gone.
    warnings: list[str] = read_problems(state)
    warnings.extend(list(state.warnings)[-3:])
    warnings.extend(error_lines(state))
    if state.incomplete and not state.ended:
        warnings.append("writer gone without a final event")
    if warnings:
        rows.append(Rule("Warnings", style="yellow", align="left"))
        rows.extend(Text(f"! {w}", style="yellow", overflow="fold") for w in warnings)
    counts = [
        f"{state.entries:,} events",
        f"{state.malformed:,} malformed",
        f"{state.rotations:,} rotations",
    ]
    for i, packed in enumerate(_pack(counts, width - 8, " · ")):
        info = Text(no_wrap=True, overflow="ellipsis")
        info.append("Log     " if i == 0 else " " * 8, style="dim")
        info.append(packed)
        rows.append(info)

    # Recent events, as many as fit.
    used_lines = len(rows) + (len(names) if options.show_component_breakdown else 0) + 2
    available = options.max_events
    if height is not None:
        available = min(available, height - used_lines - 1)
    if available > 0 and state.events:
        rows.append(Rule("Recent events", style="dim", align="left"))
        for entry in list(state.events)[-available:]:
            rows.append(_event_text(entry))
    return Group(*rows)


def render_dashboard_text(
    state: SessionState,
    options: DisplayOptions,
    *,
    width: int = 80,
    height: int | None = None,
    color: bool = False,
    phase: MonitorPhase | str | None = None,
    now: datetime | None = None,
) -> str:
    """The dashboard frame as a string (tests, ``--once`` and benchmarks)."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width,
        height=height or 25,
        force_terminal=color,
        no_color=not color,
        color_system="truecolor" if color else None,
        highlight=False,
        emoji=False,
        legacy_windows=False,
    )
    console.print(
        render_dashboard(state, options, phase=phase, width=width, height=height, now=now)
    )
    return buffer.getvalue()


def _pack(items: list[str], width: int, sep: str) -> list[str]:
    """Join ``items`` into lines of at most ``width``, never splitting an item."""
    lines: list[str] = []
    current = ""
    for item in items:
        candidate = f"{current}{sep}{item}" if current else item
        if current and len(candidate) > width:
            lines.append(current)
            current = item
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def _bar_text(fraction: float, width: int, style: str) -> Any:
    from rich.text import Text

    width = max(1, width)
    filled = min(width, round(max(0.0, fraction) * width))
    if fraction > 0 and filled == 0:
        filled = 1  # something used shows as something
    bar = Text(no_wrap=True)
    bar.append("#" * filled, style=style)
    bar.append("." * (width - filled), style="dim")
    return bar


class _Bar:
    """A bar that fills whatever width its table cell gets (so it follows resizes)."""

    def __init__(self, fraction: float, style: str) -> None:
        self.fraction = fraction
        self.style = style

    def __rich_console__(self, console: Console, options: Any) -> Any:
        yield _bar_text(self.fraction, options.max_width, self.style)

    def __rich_measure__(self, console: Console, options: Any) -> Any:
        from rich.measure import Measurement

        return Measurement(3, options.max_width)


def _latency_text(
    comp: Any, is_slowest: bool, options: DisplayOptions, *, p95: bool = False
) -> Any:
    """The model's average latency of successful steps (and, when there is room,
    its p95 from the latency histogram, as ``metrics.json`` reports them)."""
    from rich.text import Text

    avg = None if comp is None else comp.average_latency_ms
    if avg is None:
        return Text("-", style="dim")
    text = Text(format_latency(avg) + "/op")
    if is_slowest and avg >= options.latency_warning_ms:
        text = Text(format_latency(avg) + "/op slow", style="bold red")
    elif is_slowest:
        text.stylize("bold")
    if p95 and comp.p95_latency_ms is not None:
        text.append(f" p95 {format_latency(comp.p95_latency_ms)}", style="dim")
    return text


def _event_text(entry: EntryLike) -> Any:
    from rich.text import Text

    timestamp = entry.timestamp
    _, sep, rest = timestamp.partition("T")
    clock = rest[:8] if sep else timestamp[:8]
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(clock + " ", style="dim")
    text.append(entry.component, style=_rich_component_style(entry.component))
    style = "red" if entry.event_type in _ALERT_EVENTS else ""
    text.append(f": {entry.message}", style=style)
    if entry.tokens:
        text.append(f" ({entry.tokens:,})", style="dim")
    return text


_SGR_TO_RICH = {
    "1": "bold",
    "31": "red",
    "32": "green",
    "33": "yellow",
    "34": "blue",
    "35": "magenta",
    "36": "cyan",
    "92": "bright_green",
    "94": "bright_blue",
    "95": "bright_magenta",
    "96": "bright_cyan",
}


def _rich_component_style(name: str) -> str:
    return _SGR_TO_RICH.get(_component_code(name), "")


# -- renderers: where each mode writes --------------------------------------------------


class Renderer:
    """Writes one mode's output. The monitor decides when; the renderer decides how.

    Calls, in order: ``start`` once; ``waiting`` while there is no run;
    ``caught_up`` after the native catch-up; ``on_events`` for each batch of new
    events and ``refresh`` when a frame is due (never faster than the refresh
    rate); ``finish`` with the final summary (once per run with ``--follow``);
    ``close`` once at the end, whatever happened.
    """

    def __init__(self, out: TextIO, err: TextIO, options: DisplayOptions) -> None:
        self.out = out
        self.err = err
        self.options = options
        self.color = use_color(out)
        self._last_notice: str | None = None

    @property
    def width(self) -> int:
        try:
            return os.get_terminal_size(self.out.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):
            return 80

    def notice(self, message: str) -> None:
        """A progress line on stderr, not repeated when unchanged."""
        if message == self._last_notice:
            return
        self._last_notice = message
        self.err.write(message + "\n")
        self.err.flush()

    def error(self, message: str) -> None:
        """An error line on stderr, in every mode (the dashboard included)."""
        self.err.write(message + "\n")
        self.err.flush()

    def start(self, target: str) -> None:
        self.notice(f"sigil monitor: {target}")

    def waiting(self, state: SessionState, phase: MonitorPhase, message: str) -> None:
        self.notice(message)

    def caught_up(self, state: SessionState, phase: MonitorPhase) -> None:
        return None

    def on_events(self, state: SessionState, entries: Sequence[EntryLike]) -> None:
        return None

    def refresh(self, state: SessionState, phase: MonitorPhase, changed: bool) -> None:
        return None

    def resized(self) -> None:
        return None

    def finish(
        self, state: SessionState, phase: MonitorPhase, outcome: str, exit_code: int
    ) -> None:
        self._write_summary(self.out, state, outcome)

    def close(self) -> None:
        return None

    def _write_summary(self, stream: TextIO, state: SessionState, outcome: str) -> None:
        color = use_color(stream)
        lines = summary_lines(state, outcome, width=self.width, color=color)
        stream.write("\n".join(lines) + "\n")
        stream.flush()


class StreamRenderer(Renderer):
    """One line per event on stdout (spec ``_display_stream``), component coloured."""

    catch_up_lines = 20

    def caught_up(self, state: SessionState, phase: MonitorPhase) -> None:
        shown = list(state.events)[-self.catch_up_lines :]
        earlier = state.entries - len(shown)
        if earlier > 0:
            self.notice(f"({earlier:,} earlier events folded, not shown)")
        self.on_events(state, shown)

    def on_events(self, state: SessionState, entries: Sequence[EntryLike]) -> None:
        if state.unlisted and entries:
            # A burst larger than the model keeps: counted in every total, not listed.
            self.notice(f"({state.unlisted:,} events folded, not shown)")
        if not entries:
            return
        color = self.color
        self.out.write("".join(stream_line(e, color) + "\n" for e in entries))
        self.out.flush()


class MinimalRenderer(Renderer):
    """One line, rewritten in place on a terminal; one line per change otherwise."""

    def __init__(self, out: TextIO, err: TextIO, options: DisplayOptions) -> None:
        super().__init__(out, err, options)
        try:
            self.tty = out.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._last = ""
        self._open_line = False

    def refresh(self, state: SessionState, phase: MonitorPhase, changed: bool) -> None:
        line = minimal_line(state, self.width)
        if line == self._last:
            return
        self._last = line
        if self.tty:
            # CR + erase-to-end-of-line keeps it one line; the line is cut to the width
            # so it never wraps (a wrapped line cannot be rewritten with CR).
            self.out.write("\r" + line + "\x1b[K")
            self._open_line = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def caught_up(self, state: SessionState, phase: MonitorPhase) -> None:
        self.refresh(state, phase, True)

    def _end_line(self) -> None:
        if self._open_line:
            self.out.write("\n")
            self._open_line = False
            self._last = ""

    def waiting(self, state: SessionState, phase: MonitorPhase, message: str) -> None:
        if message != self._last_notice:
            self._end_line()
        super().waiting(state, phase, message)

    def finish(
        self, state: SessionState, phase: MonitorPhase, outcome: str, exit_code: int
    ) -> None:
        self.refresh(state, phase, True)
        self._end_line()
        super().finish(state, phase, outcome, exit_code)

    def close(self) -> None:
        self._end_line()
        self.out.flush()


class JsonRenderer(Renderer):
    """NDJSON on stdout: one object per refresh with changes, and a final one.

    The human summary goes to stderr so that stdout stays pure JSON for ``jq``.
    """

    def __init__(self, out: TextIO, err: TextIO, options: DisplayOptions) -> None:
        super().__init__(out, err, options)
        self.color = False

    def _emit(self, obj: dict[str, Any]) -> None:
        import orjson

        self.out.write(orjson.dumps(obj).decode() + "\n")
        self.out.flush()

    def caught_up(self, state: SessionState, phase: MonitorPhase) -> None:
        self._emit(state_to_dict(state, phase=phase))

    def refresh(self, state: SessionState, phase: MonitorPhase, changed: bool) -> None:
        if changed:
            self._emit(state_to_dict(state, phase=phase))

    def finish(
        self, state: SessionState, phase: MonitorPhase, outcome: str, exit_code: int
    ) -> None:
        obj = state_to_dict(state, phase=phase, final=True, exit_code=exit_code)
        obj["outcome"] = outcome
        self._emit(obj)
        self._write_summary(self.err, state, outcome)


class DashboardRenderer(Renderer):
    """The rich dashboard, redrawn in place (rich.live.Live) at most at the refresh rate."""

    def __init__(self, out: TextIO, err: TextIO, options: DisplayOptions) -> None:
        super().__init__(out, err, options)
        from rich.console import Console

        # rich reads NO_COLOR and the terminal size itself; size is re-read per frame,
        # which is how a resize is followed.
        self.console = Console(file=out, highlight=False, emoji=False)
        self._live: Live | None = None
        self._notice: str | None = None
        self._resized = False

    @property
    def width(self) -> int:
        # rich's idea of the width (the terminal's, or COLUMNS), as the frames use.
        return self.console.size.width

    def _frame(self, state: SessionState, phase: MonitorPhase) -> RenderableType:
        size = self.console.size
        return render_dashboard(
            state,
            self.options,
            phase=phase,
            width=size.width,
            height=size.height,
            notice=self._notice,
        )

    def _show(self, state: SessionState, phase: MonitorPhase) -> None:
        from rich.live import Live

        frame = self._frame(state, phase)
        if self._resized:
            # Lines drawn at the old width have re-wrapped; redraw from a clean screen.
            self._resized = False
            self.console.clear()
        if self._live is None:
            self._live = Live(
                frame,
                console=self.console,
                auto_refresh=False,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
                vertical_overflow="crop",
            )
            self._live.start(refresh=True)
        else:
            self._live.update(frame, refresh=True)

    def notice(self, message: str) -> None:
        # On the dashboard, progress is part of the frame, not a stray stderr line.
        self._notice = message

    def start(self, target: str) -> None:
        self._notice = target

    def waiting(self, state: SessionState, phase: MonitorPhase, message: str) -> None:
        changed = message != self._notice or self._live is None
        self._notice = message
        if changed:
            self._show(state, phase)

    def caught_up(self, state: SessionState, phase: MonitorPhase) -> None:
        self._notice = None
        self._show(state, phase)

    def refresh(self, state: SessionState, phase: MonitorPhase, changed: bool) -> None:
        self._show(state, phase)

    def resized(self) -> None:
        self._resized = True

    def finish(
        self, state: SessionState, phase: MonitorPhase, outcome: str, exit_code: int
    ) -> None:
        self._show(state, phase)
        self._stop_live()
        self._write_summary(self.out, state, outcome)

    def _stop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def close(self) -> None:
        self._stop_live()


def make_renderer(
    mode: str,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    options: DisplayOptions | None = None,
) -> Renderer:
    """The renderer for ``mode``; the dashboard falls back to stream output off a terminal."""
    out = out or sys.stdout
    err = err or sys.stderr
    options = options or DisplayOptions()
    mode = getattr(mode, "value", mode)
    if mode == "dashboard":
        try:
            tty = out.isatty()
        except (AttributeError, ValueError):
            tty = False
        if tty and os.environ.get("TERM") != "dumb":
            return DashboardRenderer(out, err, options)
        return StreamRenderer(out, err, options)
    if mode == "stream":
        return StreamRenderer(out, err, options)
    if mode == "minimal":
        return MinimalRenderer(out, err, options)
    if mode == "json":
        return JsonRenderer(out, err, options)
    raise ValueError(f"unknown display mode {mode!r}")
