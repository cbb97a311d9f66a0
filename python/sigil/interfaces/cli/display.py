"""What ``sigil monitor`` shows: renderers as functions of a :class:`SessionState`.

Every number comes from the state's snapshot of the native session model
(contract 12); this module formats, it does not count. The step in flight and
the sparkline's buckets come from the model too (``SessionSnapshot.in_flight``,
``rate_series``).

The formatting functions (``stream_line``, ``minimal_line``, ``state_to_dict``,
``summary_lines``, ``dashboard_lines``/``render_dashboard_text``) take a state
and return text; they do no I/O, so they are tested by value at any size. The
``*Renderer`` classes below them only decide what to write where:

* data goes to stdout (frames, event lines, NDJSON objects, the final summary),
  progress and errors to stderr, in every mode;
* colour only on a terminal and never when ``NO_COLOR`` is set (no-color.org);
* text from the log is shown without its control characters (``screen.printable``);
* the dashboard is plain SGR text built by ``screen.Line`` (no rich): a 120x40
  frame costs well under a millisecond and start-up pays for no framework.
  What the keys change lives in :class:`sigil.interfaces.cli.keys.DashboardView`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from sigil.interfaces.cli.keys import DashboardView
from sigil.interfaces.cli.screen import Line as _Line
from sigil.interfaces.cli.screen import cells as _cells
from sigil.interfaces.cli.screen import crop as _crop
from sigil.interfaces.cli.screen import printable, shown, span
from sigil.interfaces.cli.screen import wrap as _wrap
from sigil.telemetry.pricing import usd

if TYPE_CHECKING:
    from sigil.interfaces.cli.event_selection import EventSelection
    from sigil.interfaces.cli.monitor import EntryLike, MonitorPhase, SessionState, StepLoop
    from sigil.telemetry.log_parser import ModelSnapshot

__all__ = [
    "DashboardRenderer",
    "DashboardView",
    "DisplayOptions",
    "JsonRenderer",
    "MinimalRenderer",
    "Renderer",
    "StreamRenderer",
    "budget_level",
    "dashboard_lines",
    "format_duration",
    "make_renderer",
    "minimal_line",
    "render_dashboard_text",
    "sparkline",
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
    #: Run on each alert with its message as the last argument (e.g. ``notify-send``),
    #: detached, with ``SIGIL_ALERT_LEVEL``, ``SIGIL_SESSION_ID`` and
    #: ``SIGIL_ALERT_MESSAGE`` in its environment (``monitoring.alert_command``).
    alert_command: str | None = None

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
            # The environment's SIGIL_ALERT_COMMAND is merged into the setting.
            alert_command=getattr(mon, "alert_command", None) or None,
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


class Costed(Protocol):
    """What the session model says of a cost (a component, a run, a session)."""

    @property
    def cost_nanousd(self) -> int: ...
    @property
    def priced_events(self) -> int: ...
    @property
    def unpriced_tokens(self) -> int: ...


def has_cost(x: Costed) -> bool:
    """Whether ``x`` used a model at all: something priced, or tokens of an unpriced one."""
    return x.priced_events > 0 or x.unpriced_tokens > 0


def format_cost(x: Costed) -> str:
    """``$0.0123``; ``$0.0123+`` when some tokens are of unpriced models (the cost is
    at least that); ``unpriced`` when nothing is priced (never $0 for a model
    without a price); ``-`` without any model."""
    if x.priced_events == 0:
        return "unpriced" if x.unpriced_tokens else "-"
    dollars = usd(x.cost_nanousd)
    if dollars >= 1:
        text = f"${dollars:,.2f}"
    elif dollars > 0:
        # Three significant digits below a dollar: $0.0123, $0.000525, $0.0000024.
        decimals = min(9, 2 - math.floor(math.log10(dollars)))
        text = f"${dollars:.{decimals}f}".rstrip("0").rstrip(".")
    else:
        text = "$0"  # a priced model that spent nothing
    return text + "+" if x.unpriced_tokens else text


def cost_fields(x: Costed) -> dict[str, Any]:
    """The cost as JSON: ``cost_usd`` (None when nothing is priced) and the unpriced tokens."""
    return {
        "cost_usd": usd(x.cost_nanousd) if x.priced_events else None,
        "unpriced_tokens": x.unpriced_tokens,
    }


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
        lines.append(f"{shown(name)} {what}{suffix}: {shown(err.message)}")
    return lines


def loop_text(loop: StepLoop, runs: int = 1, width: int | None = None) -> str:
    """A step loop as one line: ``loop: planning started 5 times with the same
    input (seq 20, 21, 23, 24, 25, …)``; the run is named when there were several.
    Where that is wider than ``width``, the shorter ``started 5x, same input``
    and as many of its seqs as fit (at least the first)."""
    where = f" in run {loop.run}" if runs > 1 else ""

    def tail(n: int) -> str:
        seqs = loop.seqs[:n]
        more = ", …" if loop.starts > len(seqs) else ""
        return f" (seq {', '.join(map(str, seqs))}{more})" if seqs else ""

    component = shown(loop.component)
    text = f"loop: {component} started {loop.starts:,} times with the same input{where}"
    n = len(loop.seqs)
    if width is None or _cells(text + tail(n)) <= width:
        return text + tail(n)
    text = f"loop: {component} started {loop.starts:,}x, same input{where}"
    while n > 1 and _cells(text + tail(n)) > width:
        n -= 1
    return text + tail(n)


def jump_text(jump: Mapping[str, Any], runs: int = 1, width: int | None = None) -> str:
    """A live token jump as one line: ``token jump: reasoning 1,281 tokens per
    call, above 480 (p99 of its last 20 runs) (seq 13, 8, 10, …)``, the seqs its
    heaviest calls'; the run is named when there were several. Where that is
    wider than ``width``, the shorter ``1,281 tok/call > 480`` and as many seqs
    as fit (at least the first)."""
    where = f" in run {jump['run']}" if runs > 1 else ""
    seqs: list[int] = list(jump.get("seqs") or [])

    def tail(n: int) -> str:
        more = ", …" if jump.get("calls", 0) > n else ""
        return f" (seq {', '.join(map(str, seqs[:n]))}{more})" if seqs else ""

    value, p99 = jump["tokens_per_call"], jump["history_p99"]
    component = shown(jump["component"])
    text = (
        f"token jump: {component} {value:,.0f} tokens per call{where}, above"
        f" {p99:,.0f} (p99 of its last {jump['history_runs']} runs)"
    )
    n = len(seqs)
    if width is None or _cells(text + tail(n)) <= width:
        return text + tail(n)
    text = f"token jump: {component} {value:,.0f} tok/call > {p99:,.0f}{where}"
    while n > 1 and _cells(text + tail(n)) > width:
        n -= 1
    return text + tail(n)


def storm_text(storm: Mapping[str, Any], runs: int = 1, width: int | None = None) -> str:
    """A retry storm as one line: ``retry storm: reasoning retried 7 times (seq
    3, 5, 7, 9, 11, …)``, the seqs its first failed attempts'; as many seqs as
    fit ``width`` (at least the first)."""
    where = f" in run {storm['run']}" if runs > 1 else ""
    seqs: list[int] = list(storm.get("seqs") or [])

    def tail(n: int) -> str:
        more = ", …" if storm["retries"] > n else ""
        return f" (seq {', '.join(map(str, seqs[:n]))}{more})" if seqs else ""

    text = f"retry storm: {shown(storm['component'])} retried {storm['retries']:,} times{where}"
    n = len(seqs)
    while width is not None and n > 1 and _cells(text + tail(n)) > width:
        n -= 1
    return text + tail(n)


def anomaly_lines(state: SessionState) -> list[str]:
    """The session's anomalies (issue 13), each once: the model's step loops,
    then the current run's token jumps, retry storms and budget exhaustion."""
    return (
        [loop_text(loop, state.runs) for loop in state.loops]
        + [jump_text(jump, state.runs) for jump in state.token_jumps]
        + [storm_text(storm, state.runs) for storm in state.retry_storms]
        + [budget_text(run, state.runs) for run in state.budget_exhausted]
    )


def budget_text(run: Mapping[str, Any], runs: int = 1) -> str:
    """A run out of budget: ``budget exhausted: 1,100,000 of 1,000,000 tokens
    (seq 6)``, the seq of the final event that said so."""
    where = f" in run {run['run']}" if runs > 1 else ""
    budget = "an unknown budget" if run.get("budget") is None else f"{run['budget']:,}"
    seqs = f" (seq {', '.join(map(str, run['seqs']))})" if run.get("seqs") else ""
    return f"budget exhausted{where}: {run['tokens']:,} of {budget} tokens{seqs}"


def unknown_text(calls: int) -> str:
    """Calls whose usage the upstream did not report (issue 14): ``+2 unknown``,
    beside the tokens that are known, never folded in as 0."""
    return f"+{calls:,} unknown"


def main_model(models: Mapping[str, ModelSnapshot] | None) -> str | None:
    """``gpt-4o`` or ``gpt-4o +2``: the model of most tokens (then calls) among a
    component's per-model totals, and how many others it used."""
    names = _model_names(models)
    if not names:
        return None
    return names[0] + (f" +{len(names) - 1}" if len(names) > 1 else "")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


# -- stream and minimal -----------------------------------------------------------------


def stream_line(entry: EntryLike, color: bool = False) -> str:
    """One event as the spec's stream line: ``[HH:MM:SS] component: message (N tokens)``."""
    timestamp = entry.timestamp
    _, sep, rest = timestamp.partition("T")
    clock = rest[:8] if sep else timestamp[:8]
    component = _sgr(printable(entry.component), _component_code(entry.component), color)
    message = printable(entry.message)
    if entry.event_type in _ALERT_EVENTS:
        message = _sgr(message, "31", color)
    return f"[{clock}] {component}: {message} ({entry.tokens:,} tokens)"


def minimal_line(
    state: SessionState,
    width: int = 80,
    *,
    options: DisplayOptions | None = None,
    color: bool = False,
    now: datetime | None = None,
) -> str:
    """``Tokens: used / budget (percent)`` and the status, then (when there is
    something to say) the recent rate, the forecast to the budget's end and the
    error count, cut to fit ``width`` (the forecast goes first, then the rate).

    With ``color``: the tokens in the budget level's colour (the session's
    thresholds), the forecast by how soon it comes, errors in red.
    """
    core = f"{state.tokens_used:,} / {state.total_budget:,} ({state.budget_percentage:.2f}%)"
    status = state.display_status.replace("_", " ")
    level = budget_level(state.budget_percentage / 100, options or DisplayOptions(), state)
    extras: list[tuple[str, str]] = []  # (text, SGR), dropped from the end to fit
    errors = state.snap.event_counts.get("step_error", 0)
    if errors:
        extras.append((f"{errors:,} error{'s' if errors != 1 else ''}", "1;31"))
    if state.unknown_usage_calls:
        extras.append((unknown_text(state.unknown_usage_calls), "33"))
    looping = list(dict.fromkeys(shown(loop.component) for loop in state.loops))
    if looping:
        extras.append((f"loop: {', '.join(looping)}", "1;33"))
    jumping = [shown(jump["component"]) for jump in state.token_jumps]
    if jumping:
        extras.append((f"token jump: {', '.join(jumping)}", "1;33"))
    storming = [shown(storm["component"]) for storm in state.retry_storms]
    if storming:
        extras.append((f"retry storm: {', '.join(storming)}", "1;33"))
    if state.live:
        rate = state.recent_rate(now)
        if rate is not None:
            extras.append((f"{rate * 60:,.0f} tok/min", "36"))
        to_end = state.seconds_to_budget_end(now)
        if to_end is not None:
            soon = "1;31" if to_end < 300 else "33" if to_end < 900 else "2"
            extras.append((f"budget ends in ~{format_duration(to_end)}", soon))
    # The error count, then what is unknown and the loops, outlive the rate and
    # the forecast when the line is short.
    rank = {"1;31": 0, "33": 1, "1;33": 1}
    extras.sort(key=lambda part: rank.get(part[1], 2))
    for head in (f"Tokens: {core} {status}", f"{core} {status}", core):
        kept = list(extras)
        while kept and _joined_width(head, kept) >= width:
            kept.pop()
        if _joined_width(head, kept) < width or head == core:
            break
    head = head[: max(1, width - 1)]
    if not color:
        return " | ".join([head, *(t for t, _ in kept)])
    tokens_end = head.find(")") + 1 if ")" in head else len(head)
    first = _sgr(head[:tokens_end], _level_sgr(level), True) + head[tokens_end:]
    return " | ".join([first, *(_sgr(part, code, True) for part, code in kept)])


def _joined_width(head: str, parts: list[tuple[str, str]]) -> int:
    """Characters of ``head`` and ``parts`` joined by `` | `` (plain text)."""
    return len(" | ".join([head, *(text for text, _ in parts)]))


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
    per_model = state.component_models
    components = {
        name: {
            "tokens": c.tokens,
            "allocated": allocations.get(name),
            "operations": c.operations,
            "errors": c.errors,
            "retries": c.retries,
            "unknown_usage_calls": c.unknown_usage_calls,
            "tokens_held": c.tokens_held,
            "latency_ms": round(c.latency_ms, 3),
            "avg_latency_ms": _round(c.average_latency_ms),
            "p95_latency_ms": _round(c.p95_latency_ms),
            "last_error": c.last_error.to_dict() if c.last_error else None,
            **cost_fields(c),
            "unpriced_models": list(c.unpriced_models),
            "models": _model_names(per_model.get(name)),
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
            **cost_fields(run),
        },
        "runs": state.runs,
        **cost_fields(state.snap),
        "unpriced_models": list(state.snap.unpriced_models),
        "models": {name: model_fields(m) for name, m in sorted(state.snap.models.items())},
        "unknown_usage_calls": state.unknown_usage_calls,
        # The budget held for them (issue 14): spent for the budget, not tokens.
        "tokens_held": state.snap.tokens_held,
        "loops": [loop.to_dict() for loop in state.loops],
        "token_jumps": state.token_jumps,
        "retry_storms": state.retry_storms,
        "budget_exhausted": state.budget_exhausted,
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


def model_fields(m: ModelSnapshot) -> dict[str, Any]:
    """One model's totals as JSON (the model's ``ModelSnapshot``), cost in dollars."""
    return {
        "tokens": m.tokens,
        "input_tokens": m.input_tokens,
        "output_tokens": m.output_tokens,
        "calls": m.calls,
        "errors": m.errors,
        "unknown_usage_calls": m.unknown_usage_calls,
        **cost_fields(m),
        "unpriced_calls": m.unpriced_calls,
    }


def _model_names(models: Mapping[str, ModelSnapshot] | None) -> list[str]:
    """A component's models, the one of most tokens (then calls) first."""
    if not models:
        return []
    ranked = sorted(models.values(), key=lambda m: (-m.tokens, -m.calls, m.name))
    return [m.name for m in ranked]


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
    lines.append(f"Session:   {shown(state.session_id)}{run_text}")
    lines.append(f"Status:    {_status_word(state, None)}")
    if state.reason and state.ended:
        lines.extend(_labelled("Reason:    ", shown(state.reason), width))
    lines.append(f"Duration:  {format_duration(state.elapsed_at(now))}")
    lines.append(
        f"Tokens:    {state.tokens_used:,} / {state.total_budget:,} "
        f"({state.budget_percentage:.2f}%)"
    )
    lines.append(f"Remaining: {state.tokens_remaining:,}")
    unknown = state.unknown_usage_calls
    if unknown:
        lines.append(f"Unknown:   {unknown:,} call{'s' if unknown != 1 else ''} of unknown usage")
    if state.runs > 1:
        lines.append(f"This run:  {run.tokens:,}")
    if has_cost(state.snap):
        lines.append(f"Cost:      {format_cost(state.snap)}")
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
            label = shown(name)
            label = label if len(label) <= 12 else label[:11] + "~"
            line = f"  {label:<12}{comp.tokens:>10,} tok{latency}"
            failed = f" {comp.errors:,} err" if comp.errors else ""
            lines.append(line + failed if len(line + failed) < width else line)
    for error in error_lines(state):
        lines.extend(_labelled("Error:     ", error, width))
    for anomaly in anomaly_lines(state):
        lines.extend(_labelled("Anomaly:   ", anomaly, width))
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


# -- the dashboard ----------------------------------------------------------------------
#
# Built as lines of (text, SGR) segments without rich: a frame at 120x40 costs
# well under a millisecond, and the dashboard starts without importing rich.

_SPARK = "▁▂▃▄▅▆▇█"
_KEYS_HINT = "q quit  p pause  ? help  e errors  c component  s sort  ↑↓ scroll  / find"
_KEYS_HINT_SHORT = "q quit  p pause  ? help  e errors  c comp  s sort  / find"
HELP_LINES = (
    "q          quit (the summary so far; exit 0)",
    "p          pause / resume the display (reading goes on)",
    "?          this help (any key closes it)",
    "e          errors only: the event list shows failures and warnings",
    "c          cycle a component filter (events and errors)",
    "s          cycle the component sort: pipeline, tokens, % allocation, p95, errors",
    "↑ ↓ PgUp PgDn  scroll the event list (End or Home: back to the newest)",
    "/          filter events by text (Enter applies, Esc clears)",
)


def _rule(title: str, width: int, style: str = "2") -> _Line:
    line = _Line(title, "1" if style == "2" else style)
    fill = width - _cells(title) - 1
    if fill > 0:
        line.add(" " + "─" * fill, style)
    return line


def _short(n: int) -> str:
    """``950``, ``12.3k``, ``4.5M``: a token count in five cells or so."""
    if n < 10_000:
        return f"{n:,}"
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"


def sparkline(values: Sequence[int]) -> str:
    """One cell per value, scaled to the largest; zero is a blank cell."""
    top = max(values, default=0)
    if top <= 0:
        return " " * len(values)
    last = len(_SPARK) - 1
    return "".join(
        " " if v <= 0 else _SPARK[min(last, (v * last + top - 1) // top)] for v in values
    )


def _clock_of(timestamp: str) -> str:
    _, sep, rest = timestamp.partition("T")
    return rest[:8] if sep else timestamp[:8]


def _level_sgr(level: str) -> str:
    return {"ok": "32", "warning": "33", "critical": "31", "exceeded": "1;31"}[level]


def _status_line(state: SessionState, phase: MonitorPhase | str | None, now: datetime | None,
                 view: DashboardView) -> _Line:  # fmt: skip
    status = _status_word(state, phase)
    style = {
        "RUNNING": "1;32", "COMPLETE": "1;32", "INCOMPLETE": "1;33",
        "WAITING FOR START": "33", "WAITING FOR LOG": "33",
    }.get(status, "1;31")  # fmt: skip
    line = _Line("Status  ", "2").add(status, style)
    line.add("  Elapsed ", "2").add(format_duration(state.elapsed_at(now)))
    if view.paused:
        line.add("  PAUSED", "1;7")
    return line


def _now_line(state: SessionState, phase: MonitorPhase | str | None, now: datetime | None,
              width: int) -> _Line:  # fmt: skip
    """What is running right now, for how long, and whether anything arrives."""
    line = _Line("Now     ", "2")
    phase_value = getattr(phase, "value", phase)
    if phase_value == "initial" or state.display_status == "waiting":
        line.add("waiting for a run to start", "2")
        return line
    if state.ended or (state.incomplete and not state.ended):
        last = state.last_timestamp
        line.add(f"run over{' at ' + _clock_of(last) if last else ''}", "2")
        return line
    step = state.in_flight
    if step is not None:
        line.add(step.component, "1")
        from sigil.interfaces.cli.monitor import parse_timestamp

        started = parse_timestamp(step.started_at)
        moment = now or datetime.now(UTC)
        running = None if started is None else max(0.0, (moment - started).total_seconds())
        line.add(f"  attempt {step.attempt}")
        if running is not None:
            line.add(f"  {format_duration(running)}")
    else:
        line.add("between steps", "2")
    stalled = state.stalled_seconds(now)
    if stalled is not None:
        line.add(f"  stalled {stalled:.0f}s", "1;33")
    return line


#: The time the burn sparkline spans: the run so far, within these bounds (s).
_SPARK_MIN_SECONDS = 64.0
_SPARK_MAX_SECONDS = 480.0


def _burn_lines(state: SessionState, options: DisplayOptions, now: datetime | None,
                width: int, level_sgr: str) -> list[_Line]:  # fmt: skip
    """Recent rate (tokens/min) with a sparkline of the run so far (at least the
    last minute, at most the last eight; the model's rate window holds 30), the
    session average, and the forecast to the budget's end from the recent rate."""
    rate = state.recent_rate(now)
    average = state.average_rate
    buckets = 16 if width >= 60 else 8
    # Whole seconds per bar, so the bars line up with the model's 1 s slots.
    span = min(max(state.elapsed_at(now), _SPARK_MIN_SECONDS), _SPARK_MAX_SECONDS)
    series = state.rate_series(buckets, max(1, round(span / buckets)), now)
    line = _Line("Burn    ", "2")
    line.add(f"{_rate(None if rate is None else rate * 60)} tok/min ")
    line.add(sparkline(series), "36")
    parts: list[tuple[str, str]] = [
        (f"avg {_rate(None if average is None else average * 60)}/min", "2")
    ]
    to_end = state.seconds_to_budget_end(now)
    if to_end is not None:
        parts.append((f"budget ends in ~{format_duration(to_end)}", level_sgr))
    lines = [line]
    for text, style in parts:
        if lines[-1].cells + 2 + _cells(text) > width:
            lines.append(_Line(" " * 8))
        else:
            lines[-1].add("  ")
        lines[-1].add(text, style)
    return lines


def _cost_line(state: SessionState, width: int) -> _Line:
    """The session's cost (and this run's when there were several), and the
    tokens of models without a price, never shown as $0."""
    snap = state.snap
    line = _Line("Cost    ", "2")
    line.add(format_cost(snap), "1" if snap.priced_events else "33")
    if state.runs > 1 and has_cost(state.run):
        line.add(f"  run {format_cost(state.run)}", "2")
    if snap.priced_events and snap.unpriced_tokens:
        models = ", ".join(snap.unpriced_models)
        text = f"  + {snap.unpriced_tokens:,} tok unpriced" + (f" ({models})" if models else "")
        if line.cells + _cells(text) <= width:
            line.add(text, "33")
    elif not snap.priced_events and snap.unpriced_models:
        text = f"  no price for {', '.join(snap.unpriced_models)}"
        if line.cells + _cells(text) <= width:
            line.add(text, "2")
    return line


def _sort_key(sort: str, state: SessionState, allocations: Mapping[str, int]) -> Any:
    def key(name: str) -> Any:
        comp = state.components.get(name)
        if sort == "tokens":
            return -(comp.tokens if comp else 0)
        if sort == "allocation":
            allocated = allocations.get(name)
            return -((comp.tokens if comp else 0) / allocated) if allocated else 0.0
        if sort == "p95":
            p95 = comp.p95_latency_ms if comp else None
            return -(p95 or 0.0)
        return -(comp.errors + comp.retries if comp else 0)

    return key


def _component_lines(state: SessionState, options: DisplayOptions, width: int,
                     view: DashboardView) -> list[_Line]:  # fmt: skip
    """The components table: tokens against allocation (% and a bar capped
    visibly at 100 %), latency p50/p95, input/output tokens, model, errors and
    retries; columns drop out as the width shrinks, never mid-number."""
    allocations = dict(options.allocations)
    allocations.update(state.allocations)
    names = ordered_components(
        set(state.components) | {n for n in allocations if n in COMPONENT_ORDER}
    )
    names = [n for n in names if n != "orchestrator" or state.components[n].tokens]
    if not names:
        return []
    if view.sort != "pipeline":
        names.sort(key=_sort_key(view.sort, state, allocations))
    slowest = state.slowest_component if options.highlight_slowest else None
    show_lat = options.show_latency
    wide_tokens = width >= 80
    cols_p50 = show_lat and width >= 80
    cols_p95 = show_lat and width >= 60
    cols_io = width >= 110
    cols_model = width >= 110
    cols_cost = width >= 110 and has_cost(state.snap)
    cols_retry = width >= 80
    cols_unknown = any(
        (c := state.components.get(n)) is not None and c.unknown_usage_calls for n in names
    )
    models = state.component_models if cols_model else {}
    name_w = min(12, max(len(n) for n in names))

    rows: list[dict[str, tuple[str, str]]] = []
    bars: list[tuple[float | None, str]] = []  # each row's share of its allocation, style
    for name in names:
        comp = state.components.get(name)
        tokens = comp.tokens if comp else 0
        allocated = allocations.get(name)
        share = tokens / allocated if allocated else None
        over = share is not None and share > 1.0
        comp_level = budget_level(share, options) if share is not None else "ok"
        marked = view.component == name
        row: dict[str, tuple[str, str]] = {
            "name": (("▸" if marked else "") + name, "1;7" if marked else "1"),
            "tokens": (
                f"{tokens:,} / {allocated:,}" if wide_tokens and allocated else f"{tokens:,}",
                "",
            ),
            "pct": (
                "-" if share is None else f"{share * 100:.0f}%",
                "1;31" if over else _level_sgr(comp_level) if share is not None else "2",
            ),
        }
        if cols_unknown:
            unknown = comp.unknown_usage_calls if comp else 0
            row["unk"] = (unknown_text(unknown) if unknown else "", "33")
        if cols_p50:
            p50 = comp.p50_latency_ms if comp else None
            row["p50"] = ("-" if p50 is None else format_latency(p50), "" if p50 else "2")
        if cols_p95:
            p95 = comp.p95_latency_ms if comp else None
            style = "" if p95 else "2"
            avg = comp.average_latency_ms if comp else None
            text = "-" if p95 is None else format_latency(p95)
            if name == slowest and avg is not None:
                style = "1"
                if avg >= options.latency_warning_ms:
                    style, text = "1;31", text + " slow"
            row["p95"] = (text, style)
        if cols_io:
            row["io"] = (
                f"{_short(comp.input_tokens)}/{_short(comp.output_tokens)}"
                if comp and (comp.input_tokens or comp.output_tokens)
                else "-",
                "" if comp and (comp.input_tokens or comp.output_tokens) else "2",
            )
        if cols_model:
            model = main_model(models.get(name)) or (comp.model if comp else None)
            row["model"] = (model or "-", "" if model else "2")
        if cols_cost:
            text = format_cost(comp) if comp else "-"
            row["cost"] = (text, "33" if text == "unpriced" else "" if text != "-" else "2")
        errors = comp.errors if comp else 0
        row["err"] = (str(errors), "1;31" if errors else "2")
        if cols_retry:
            retries = comp.retries if comp else 0
            row["rty"] = (str(retries), "33" if retries else "2")
        bars.append((share, "1;31" if over else _level_sgr(comp_level)))
        rows.append(row)

    heads = {"name": "component", "tokens": "tokens", "unk": "", "pct": "%", "p50": "p50",
             "p95": "p95", "io": "in/out", "model": "model", "cost": "cost", "err": "err",
             "rty": "rty"}  # fmt: skip
    order = [
        c
        for c in ("tokens", "unk", "pct", "p50", "p95", "io", "model", "cost", "err", "rty")
        if c in rows[0]
    ]
    lead = 3 if "unk" in order else 2  # the columns before the bar
    widths = {c: max(len(heads[c]), *(_cells(r[c][0]) for r in rows)) for c in order}
    if "model" in widths:
        widths["model"] = min(widths["model"], 14)
    name_w = max(name_w, 4)
    fixed = name_w + span(widths[c] + 1 for c in order)
    bar_w = width - fixed - 2
    show_bar = options.show_budget_bar and bar_w >= 6
    if not show_bar:
        bar_w = 0

    def line_of(cells: dict[str, tuple[str, str]], bar: tuple[float | None, str] | None) -> _Line:
        header = bar is None
        name_text, name_style = cells["name"]
        line = _Line(_crop(name_text, name_w).ljust(name_w), "2" if header else name_style)
        for c in order[:lead]:  # tokens, unknown usage, %
            text, style = cells[c]
            if c == "unk":
                line.add(" " + text.ljust(widths[c]), "2" if header else style)
            else:
                line.add(" " + text.rjust(widths[c]), "2" if header else style)
        if show_bar:
            line.add(" ")
            if bar is None:
                line.add(" " * bar_w)
            else:
                line.parts.extend(_bar_parts(bar[0], bar_w, bar[1]))
        for c in order[lead:]:
            text, style = cells[c]
            if c == "model":
                line.add(" " + _fit_model(text, widths[c]).ljust(widths[c]),
                         "2" if header else style)  # fmt: skip
            else:
                line.add(" " + text.rjust(widths[c]), "2" if header else style)
        return line

    title = "Components" if view.sort == "pipeline" else f"Components (by {view.sort})"
    header_cells = {c: (text, "2") for c, text in heads.items()}
    out = [_rule(title, width), line_of(header_cells, None)]
    out.extend(line_of(r, bar) for r, bar in zip(rows, bars, strict=True))
    return out


def _fit_model(text: str, width: int) -> str:
    """A model cell cut to ``width``, keeping its ``+N`` (how many other models)."""
    name, sep, more = text.rpartition(" +")
    if not sep or not more.isdigit() or _cells(text) <= width:
        return _crop(text, width)
    room = width - len(sep) - len(more)
    return _crop(name, room) + sep + more if room >= 2 else _crop(text, width)


def _bar_parts(share: float | None, width: int, style: str) -> list[tuple[str, str]]:
    """A bar of ``width`` cells; past 100 % it is full and ends in a red ``>``."""
    if share is None:
        return [(" " * width, "")]
    if share > 1.0:
        return [("#" * (width - 1), style), (">", "1;31")]
    filled = min(width, round(max(0.0, share) * width))
    if share > 0 and filled == 0:
        filled = 1
    return [("#" * filled, style), ("." * (width - filled), "2")]


def _budget_bar(fraction: float, width: int, level_sgr: str) -> _Line:
    line = _Line("Budget  ", "2")
    line.parts.extend(_bar_parts(min(fraction, 1.0) if fraction <= 1.0 else fraction,
                                 max(4, width - 8), level_sgr))  # fmt: skip
    return line


def _problem_lines(state: SessionState, width: int, view: DashboardView) -> list[_Line]:
    """The errors panel: what could not be read, budget warnings (with the
    component that crossed), the last error of each component (category,
    attempt, time, the message wrapped, never cut), the writer gone."""
    out: list[_Line] = []
    for problem in read_problems(state):
        out.extend(_Line(("! " if i == 0 else "  ") + part, "33")
                   for i, part in enumerate(_wrap(problem, width - 2)))  # fmt: skip
    for loop in state.loops:
        if view.component is not None and loop.component != view.component:
            continue
        text = loop_text(loop, state.runs, width - 2)
        out.extend(_Line(("! " if i == 0 else "  ") + part, "33")
                   for i, part in enumerate(_wrap(text, width - 2)))  # fmt: skip
    for jump, text_of in [(j, jump_text) for j in state.token_jumps] + [
        (s, storm_text) for s in state.retry_storms
    ]:
        if view.component is not None and jump["component"] != view.component:
            continue
        text = text_of(jump, state.runs, width - 2)
        out.extend(_Line(("! " if i == 0 else "  ") + part, "33")
                   for i, part in enumerate(_wrap(text, width - 2)))  # fmt: skip
    for warning in list(state.warnings)[-3:]:
        out.extend(_Line(("! " if i == 0 else "  ") + part, "33")
                   for i, part in enumerate(_wrap(warning, width - 2)))  # fmt: skip
    for name, err in state.last_errors():
        if view.component is not None and name != view.component:
            continue
        what = "retry" if err.event_type == "retry_attempt" else "error"
        head = _Line("! ", "31").add(name, "1").add(f" {what}", "31")
        detail = [d for d in (err.category,) if d]
        if err.attempt is not None:
            detail.append(f"attempt {err.attempt}")
        detail.append(_clock_of(err.timestamp))
        text = " · ".join(detail)
        if head.cells + 2 + len(text) <= width:
            head.add("  " + text, "2")
            out.append(head)
        else:  # narrow: the details on a line of their own, never cut
            out.append(head)
            out.extend(_Line("    " + part, "2") for part in _wrap(text, width - 4))
        out.extend(_Line("    " + part) for part in _wrap(err.message, width - 4))
    if state.incomplete and not state.ended:
        out.append(_Line("! writer gone without a final event", "33"))
    return out


def _event_line(entry: EntryLike) -> _Line:
    line = _Line(_clock_of(entry.timestamp) + " ", "2")
    line.add(entry.component, _component_code(entry.component))
    style = "31" if entry.event_type in _ALERT_EVENTS else ""
    line.add(f": {entry.message}", style)
    if entry.tokens:
        line.add(f" ({entry.tokens:,})", "2")
    return line


def dashboard_lines(
    state: SessionState,
    options: DisplayOptions,
    *,
    phase: MonitorPhase | str | None = None,
    width: int = 80,
    height: int | None = None,
    now: datetime | None = None,
    notice: str | None = None,
    view: DashboardView | None = None,
    clock: bool = False,
) -> list[_Line]:
    """The dashboard frame (spec 4.3.2, issue 12) as lines for ``width`` x ``height``.

    Nothing essential is cut: the header, what runs now, the budget, the burn
    rate, the components and the errors panel come first; the event list takes
    the height that is left (without a height, ``options.max_events``).
    """
    view = view or DashboardView()
    width = max(20, width)
    top: list[_Line] = []
    header = _Line("SIGIL MONITOR", "1;36").add(f"  {state.session_id}", "1")
    if state.run.number:
        header.add(f"  run {state.run.number}", "2")
    if clock:
        moment = now or datetime.now(UTC).astimezone()  # a given moment keeps its zone
        stamp = moment.strftime("%H:%M:%S")
        pad = width - header.cells - len(stamp)
        if pad >= 2:
            header.add(" " * pad + stamp, "2")
    top.append(header)
    top.append(_status_line(state, phase, now, view))
    if state.reason and state.ended:
        top.extend(_Line(("Reason  " if i == 0 else " " * 8) + part, "31")
                   for i, part in enumerate(_wrap(state.reason, width - 8)))  # fmt: skip
    if notice:
        top.extend(_Line(part, "33") for text in notice.splitlines()
                   for part in _wrap(text, width))  # fmt: skip
    top.append(_now_line(state, phase, now, width))

    fraction = state.tokens_used / state.total_budget if state.total_budget > 0 else 0.0
    level = budget_level(fraction, options, state)
    level_sgr = _level_sgr(level)
    used = _Line("Tokens  ", "2").add(f"{state.tokens_used:,}", "1")
    used.add(f" / {state.total_budget:,} ").add(f"({state.budget_percentage:.2f}%)", level_sgr)
    # Calls of unknown usage beside the known tokens, on a line of their own when narrow.
    unknown_line: _Line | None = None
    if state.unknown_usage_calls:
        unknown = unknown_text(state.unknown_usage_calls)
        if used.cells + 2 + _cells(unknown) <= width:
            used.add("  " + unknown, "33")
        else:
            unknown_line = _Line(" " * 8).add(unknown, "33")
    run_part = f"  run {state.run.tokens:,}" if state.runs > 1 else ""
    left = f"  left {state.tokens_remaining:,}{run_part}"
    cost = _cost_line(state, width) if has_cost(state.snap) else None
    if width >= 60 and used.cells + _cells(left) <= width:
        used.add(left, "2")
        short = f"  cost {format_cost(state.snap)}"
        if cost is not None and used.cells + _cells(short) <= width:
            # The session's cost where it fits, on the tokens' line (a row saved).
            used.add(short, "2")
            cost = None
        top.append(used)
        if options.show_budget_bar:
            top.append(_budget_bar(fraction, width, level_sgr))
    else:
        top.append(used)
        if options.show_budget_bar:
            top.append(_budget_bar(fraction, width, level_sgr))
        top.append(_Line("Left    ", "2").add(f"{state.tokens_remaining:,}"))
    if unknown_line is not None:
        top.insert(top.index(used) + 1, unknown_line)
    if cost is not None:
        top.append(cost)
    if options.show_forecast:
        top.extend(_burn_lines(state, options, now, width, level_sgr))

    middle: list[_Line] = []
    if view.help:
        middle.append(_rule("Keys", width))
        middle.extend(_Line(part) for text in HELP_LINES for part in _wrap(text, width))
    elif options.show_component_breakdown and not view.errors_only:
        # (Errors only: the table gives its rows to the errors and error events.)
        middle.extend(_component_lines(state, options, width, view))
        if options.show_latency and width < 60 and state.slowest_component is not None:
            name = state.slowest_component
            avg = state.components[name].average_latency_ms or 0.0
            slow = _Line("Slowest ", "2").add(f"{name} ")
            flag = avg >= options.latency_warning_ms
            slow.add(
                format_latency(avg) + "/op" + (" slow" if flag else ""), "1;31" if flag else "1"
            )
            middle.append(slow)

    problems = [] if view.help else _problem_lines(state, width, view)
    counts = [f"{state.entries:,} events", f"{state.malformed:,} malformed",
              f"{state.rotations:,} rotations"]  # fmt: skip
    log_lines = [
        _Line("Log     " if i == 0 else " " * 8, "2").add(packed)
        for i, packed in enumerate(_pack(counts, width - 8, " · "))
    ]
    footer: list[_Line] = []
    if view.typing:
        footer.append(_Line("/", "1").add(view.typed).add("_", "7").add(
            "  Enter apply · Esc clear", "2"))  # fmt: skip
    elif view.keys:
        footer.append(_Line(_KEYS_HINT if width >= len(_KEYS_HINT) else _KEYS_HINT_SHORT, "2"))

    # The events take what is left; the problems panel shrinks before anything above it.
    fixed = len(top) + len(middle) + len(log_lines) + len(footer)
    if height is not None:
        room = height - fixed
        problem_room = room - (1 if problems else 0)
        if len(problems) > problem_room:
            keep = max(0, problem_room - 1)
            hidden = len(problems) - keep
            problems = [*problems[:keep], _Line(f"  … {hidden} more lines (e: errors only)", "33")]
            if keep == 0:
                problems = problems[-1:] if problem_room >= 1 else []
    body = top + middle
    if problems:
        title = "Errors & warnings"
        body.append(_rule(title, width, "33"))
        body.extend(problems)
    body.extend(log_lines)
    available = options.max_events if height is None else height - len(body) - len(footer) - 1
    entries = [e for e in state.events if view.shows(e)]
    if available > 0 and not view.help and (entries or view.filter_text or view.errors_only
                                            or view.component):  # fmt: skip
        view.page = available
        view.scroll = min(view.scroll, max(0, len(entries) - available))
        end = len(entries) - view.scroll
        shown = entries[max(0, end - available) : end]
        what = []
        if view.errors_only:
            what.append("errors only")
        if view.component:
            what.append(view.component)
        if view.filter_text:
            what.append(f"/{view.filter_text}")
        if view.scroll:
            what.append(f"{view.scroll} newer below")
        title = "Recent events" + (f" ({', '.join(what)})" if what else "")
        body.append(_rule(title, width))
        body.extend(_event_line(e) for e in shown)
        if not shown:
            body.append(_Line("  (no event matches)", "2"))
    if height is not None and footer:
        # The key line sits on the bottom row, as in htop and less.
        body.extend(_Line() for _ in range(height - len(body) - len(footer)))
    body.extend(footer)
    if height is not None and len(body) > height:
        body = body[:height]
    return body


def render_dashboard_text(
    state: SessionState,
    options: DisplayOptions,
    *,
    width: int = 80,
    height: int | None = None,
    color: bool = False,
    phase: MonitorPhase | str | None = None,
    now: datetime | None = None,
    notice: str | None = None,
    view: DashboardView | None = None,
    clock: bool = False,
) -> str:
    """The dashboard frame as a string (tests, ``--once`` and benchmarks)."""
    lines = dashboard_lines(
        state, options, phase=phase, width=width, height=height, now=now, notice=notice,
        view=view, clock=clock,
    )  # fmt: skip
    return "".join(line.render(width, color) + "\n" for line in lines)


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
        #: Which events the modes that list them show (None: every one).
        self.selection: EventSelection | None = None
        self.json_events = False
        #: The monitor lists the caught-up events itself (``--all``, ``--tail``,
        #: ``--since``, or the whole run for a monitor started before it).
        self.replaying = False

    def select_events(self, selection: EventSelection | None, *, json_events: bool) -> None:
        self.selection = selection
        self.json_events = json_events

    @property
    def lists_events(self) -> bool:
        """This mode writes events (the monitor then reads each one for it)."""
        return False

    def _selected(self, entries: Sequence[EntryLike]) -> list[EntryLike]:
        if self.selection is None:
            return list(entries)
        return self.selection.select(list(entries))

    def write_events(self, entries: Sequence[EntryLike]) -> None:
        """Write events already selected (the monitor's replay of the past)."""
        return None

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

    @property
    def lists_events(self) -> bool:
        return True

    def caught_up(self, state: SessionState, phase: MonitorPhase) -> None:
        if self.replaying:
            return  # the monitor lists them (write_events)
        recent = list(state.events)
        shown = self._selected(recent)[-self.catch_up_lines :]
        filtered = self.selection is not None and self.selection.filters
        earlier = state.entries - (len(recent) if filtered else len(shown))
        if earlier > 0:
            self.notice(
                f"({earlier:,} earlier events folded, not shown): --all or --tail N lists them"
            )
        self.write_events(shown)

    def on_events(self, state: SessionState, entries: Sequence[EntryLike]) -> None:
        if state.unlisted and entries:
            # A burst larger than the model keeps: counted in every total, not listed.
            self.notice(f"({state.unlisted:,} events folded, not shown)")
        self.write_events(self._selected(entries))

    def write_events(self, entries: Sequence[EntryLike]) -> None:
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
        if not self.tty and not changed:
            # Piped, a line per change of the session, not per tick of the
            # clock (which moves the rate and the forecast).
            return
        line = minimal_line(state, self.width, options=self.options, color=self.color)
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

    #: What changes with the clock alone, not with the state: a snapshot that
    #: differs from the last one written only here is not written again.
    _CLOCK_FIELDS = frozenset(
        {"elapsed_seconds", "tokens_per_second", "stalled_seconds", "seconds_to_budget_end"}
    )

    def __init__(self, out: TextIO, err: TextIO, options: DisplayOptions) -> None:
        super().__init__(out, err, options)
        self.color = False
        self._last_state: dict[str, Any] | None = None

    @property
    def lists_events(self) -> bool:
        return self.json_events

    def _emit(self, obj: dict[str, Any]) -> None:
        import orjson

        self.out.write(orjson.dumps(obj).decode() + "\n")
        self.out.flush()

    def _emit_state(self, state: SessionState, phase: MonitorPhase) -> None:
        """A state snapshot, only when the state changed since the last one."""
        obj = state_to_dict(state, phase=phase)
        key = {k: v for k, v in obj.items() if k not in self._CLOCK_FIELDS}
        if key == self._last_state:
            return
        self._last_state = key
        self._emit(obj)

    def caught_up(self, state: SessionState, phase: MonitorPhase) -> None:
        self._emit_state(state, phase)

    def on_events(self, state: SessionState, entries: Sequence[EntryLike]) -> None:
        if self.json_events:
            self.write_events(self._selected(entries))

    def write_events(self, entries: Sequence[EntryLike]) -> None:
        """One object per event: the event as logged, plus ``"type": "event"``."""
        if not entries:
            return
        import orjson

        lines = []
        for entry in entries:
            obj = entry.to_dict()  # type: ignore[attr-defined]
            obj["type"] = "event"
            lines.append(orjson.dumps(obj).decode())
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()

    def refresh(self, state: SessionState, phase: MonitorPhase, changed: bool) -> None:
        if changed:
            self._emit_state(state, phase)

    def finish(
        self, state: SessionState, phase: MonitorPhase, outcome: str, exit_code: int
    ) -> None:
        obj = state_to_dict(state, phase=phase, final=True, exit_code=exit_code)
        obj["outcome"] = outcome
        self._emit(obj)
        self._write_summary(self.err, state, outcome)


class DashboardRenderer(Renderer):
    """The dashboard on a terminal: full-screen frames, drawn in place.

    Live, it draws on the alternate screen (so no old frame reaches the
    scrollback, on resize either) with synchronized output (DEC mode 2026:
    a terminal that knows it shows each frame whole, one that does not
    ignores it), and leaves it for the final summary. ``inline`` (``--once``)
    prints one frame and the summary in the normal screen instead.

    Alerts: crossing each budget level (the session's thresholds, else 50/80/95 %)
    or a failed step rings the bell once, and runs ``options.alert_command``
    if one is set; levels crossed before the monitor caught up do not ring.
    """

    def __init__(
        self, out: TextIO, err: TextIO, options: DisplayOptions, *, inline: bool = False
    ) -> None:
        super().__init__(out, err, options)
        self.inline = inline
        self.view = DashboardView()
        self._notice: str | None = None
        self._resized = False
        self._on_screen = False
        self._frame_second: int | None = None
        self._rung: set[str] | None = None
        self._failed_seen: tuple[int, int] | None = None
        self._last: tuple[SessionState, MonitorPhase] | None = None
        self._alert_procs: list[Any] = []
        #: The first failure of the alert command, shown in each frame from then on.
        self._alert_problem: str | None = None
        #: What "now" is for a frame (None: the wall clock); ``sigil replay``
        #: gives the moment of the session it has played up to.
        self.clock: Callable[[], datetime | None] | None = None

    def size(self) -> tuple[int, int]:
        """The terminal's columns and rows (``COLUMNS``/``LINES`` when it has none)."""
        try:
            size = os.get_terminal_size(self.out.fileno())
            if size.columns and size.lines:
                return (size.columns, size.lines)
        except (AttributeError, ValueError, OSError):
            pass
        env = os.environ
        cols = int(env["COLUMNS"]) if env.get("COLUMNS", "").isdigit() else 0
        rows = int(env["LINES"]) if env.get("LINES", "").isdigit() else 0
        return (cols or 80, rows or 24)

    @property
    def width(self) -> int:
        return self.size()[0]

    def frame_text(
        self, state: SessionState, phase: MonitorPhase, now: datetime | None = None
    ) -> str:
        """One full-screen frame: home, each line cleared and drawn, the rest erased."""
        cols, rows = self.size()
        notice = "\n".join(filter(None, (self._alert_problem, self._notice))) or None
        lines = dashboard_lines(
            state, self.options, phase=phase, width=cols, height=rows, now=now,
            notice=notice, view=self.view, clock=True,
        )  # fmt: skip
        color = self.color
        parts = ["\x1b[?2026h"]
        if self._resized:
            self._resized = False
            parts.append("\x1b[2J")
        parts.append("\x1b[H")
        parts.append("\r\n".join("\x1b[2K" + line.render(cols, color) for line in lines))
        if len(lines) < rows:
            parts.append("\r\n\x1b[J")  # a fresh line below the frame, then erase the rest
        parts.append("\x1b[?2026l")
        return "".join(parts)

    def _show(self, state: SessionState, phase: MonitorPhase, *, force: bool = False) -> None:
        self._last = (state, phase)
        if self.inline or (self.view.paused and not force):
            return
        if not self._on_screen:
            self.out.write("\x1b[?1049h\x1b[?25l")  # alternate screen, cursor hidden
            self._on_screen = True
            self._resized = True
        now = self.clock() if self.clock is not None else None
        self.out.write(self.frame_text(state, phase, now))
        self.out.flush()
        self._frame_second = int(time.time())

    def redraw(self, state: SessionState, phase: MonitorPhase) -> None:
        """A frame now, also while paused (``sigil replay`` stepping one event)."""
        self._show(state, phase, force=True)

    def suspend(self) -> None:
        """Ctrl-Z: give the screen back; the next frame takes it again, redrawn whole."""
        self._leave_screen()

    def _leave_screen(self) -> None:
        if self._on_screen:
            self._on_screen = False
            self.out.write("\x1b[?25h\x1b[?1049l")
            self.out.flush()

    # -- keys ------------------------------------------------------------------------------

    def key(self, key: str, state: SessionState, phase: MonitorPhase) -> str | None:
        """Apply a key; redraws at once (also while paused); ``"quit"`` to stop."""
        names = ordered_components(n for n in state.components if n != "orchestrator")
        action = self.view.handle(key, names)
        if action == "redraw":
            self._show(state, phase, force=True)
        return action

    # -- alerts ----------------------------------------------------------------------------

    def _levels_crossed(self, state: SessionState) -> set[str]:
        if state.total_budget <= 0:
            return set()
        fraction = state.tokens_used / state.total_budget
        order = ("warning", "critical", "exceeded")
        level = budget_level(fraction, self.options, state)
        return set(order[: order.index(level) + 1]) if level in order else set()

    def _alert(self, state: SessionState) -> None:
        self._reap_alerts()
        crossed = self._levels_crossed(state)
        failed = (state.run.number, state.run.steps_failed)
        if self._rung is None or self._failed_seen is None:
            self._rung, self._failed_seen = crossed, failed  # history does not ring
            return
        levels: list[str] = [lvl for lvl in ("warning", "critical", "exceeded")
                             if lvl in crossed - self._rung]  # fmt: skip
        # A step failed: more failures in the same run, or any in a newer run.
        if failed[1] and failed > self._failed_seen:
            levels.append("step_failed")
        self._rung |= crossed
        self._failed_seen = failed
        if not levels:
            return
        self.out.write("\a" * len(levels))
        self.out.flush()
        if self.options.alert_command:
            for level in levels:
                self._run_alert(state.session_id, level)

    def _run_alert(self, session_id: str, level: str) -> None:
        """Start the alert command for one level, detached; never waits for it.

        The facts reach it as its last argument and in its environment, never
        through a shell: text from the log cannot become a command.
        """
        import shlex
        import subprocess

        command = self.options.alert_command or ""
        reason = "step failed" if level == "step_failed" else f"budget {level}"
        message = f"sigil {session_id}: {reason}"
        env = dict(os.environ)
        env.update(SIGIL_ALERT_LEVEL=level, SIGIL_SESSION_ID=session_id,
                   SIGIL_ALERT_MESSAGE=message)  # fmt: skip
        try:
            proc = subprocess.Popen(
                [*shlex.split(command), message],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                close_fds=True,
                start_new_session=True,
            )
        except (OSError, ValueError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._alert_failed(f"{detail}")
            return
        self._alert_procs.append(proc)

    def _reap_alerts(self) -> None:
        """Collect finished alert commands (no zombies); a failure is shown once."""
        running = []
        for proc in self._alert_procs:
            code = proc.poll()
            if code is None:
                running.append(proc)
            elif code != 0:
                self._alert_failed(f"exit status {code}" if code > 0 else f"signal {-code}")
        self._alert_procs = running

    def _alert_failed(self, detail: str) -> None:
        if self._alert_problem is None:
            self._alert_problem = f"alert command failed ({detail}): {self.options.alert_command}"

    # -- the renderer calls ----------------------------------------------------------------

    def notice(self, message: str) -> None:
        # On the dashboard, progress is part of the frame, not a stray stderr line.
        self._notice = message

    def start(self, target: str) -> None:
        self._notice = target

    def waiting(self, state: SessionState, phase: MonitorPhase, message: str) -> None:
        # Redrawn when the message changes, and once a second for the clock.
        changed = message != self._notice or not self._on_screen
        changed = changed or self._frame_second != int(time.time())
        self._notice = message
        if changed:
            self._show(state, phase)

    def caught_up(self, state: SessionState, phase: MonitorPhase) -> None:
        self._notice = None
        self._alert(state)
        self._show(state, phase)

    def refresh(self, state: SessionState, phase: MonitorPhase, changed: bool) -> None:
        self._alert(state)
        self._show(state, phase)

    def resized(self) -> None:
        self._resized = True

    def finish(
        self, state: SessionState, phase: MonitorPhase, outcome: str, exit_code: int
    ) -> None:
        self._alert(state)
        if self.inline:
            cols, _ = self.size()
            lines = dashboard_lines(state, self.options, phase=phase, width=cols,
                                    notice=self._notice, view=self.view)  # fmt: skip
            self.out.write("".join(line.render(cols, self.color) + "\n" for line in lines))
        else:
            self._leave_screen()
        self._write_summary(self.out, state, outcome)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._leave_screen()


def make_renderer(
    mode: str,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    options: DisplayOptions | None = None,
    inline: bool = False,
) -> Renderer:
    """The renderer for ``mode``; the dashboard falls back to stream output off a terminal.

    ``inline`` (``--once``): the dashboard prints one frame in the normal screen.
    """
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
            return DashboardRenderer(out, err, options, inline=inline)
        return StreamRenderer(out, err, options)
    if mode == "stream":
        return StreamRenderer(out, err, options)
    if mode == "minimal":
        return MinimalRenderer(out, err, options)
    if mode == "json":
        return JsonRenderer(out, err, options)
    raise ValueError(f"unknown display mode {mode!r}")
