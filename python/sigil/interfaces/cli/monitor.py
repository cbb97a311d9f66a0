"""The live monitor behind ``sigil monitor`` (spec 3.5, 4.3, 5.2, 8.3).

Two halves, kept apart on purpose (STYLE.md "Pure state, separate I/O"):

* :class:`SessionState` is a pure fold of log events into what the screen
  shows. ``update_from_entry`` does no I/O, so it is tested without files, and
  :meth:`SessionState.from_summary` starts it from the native catch-up fold so a
  monitor started late on a 1,000,000-entry session does not replay it in
  Python. Both paths keep the same rules as the native fold (contract 2: a
  session's tokens are the sum of ``tokens`` over its events), so they agree.
* :class:`ExecutionMonitor` does the I/O: it waits for the log, catches up
  natively, tails through :class:`sigil.telemetry.log_parser.SessionTailer`
  (which follows rotation and truncation, contract 5), decides when the run has
  ended or its writer is gone (contract 7) and hands the state to a renderer
  from :mod:`sigil.interfaces.cli.display`.

The monitor only reads the session's log; the one file it writes is
``<log_path>/monitor.pid`` (spec 7.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from sigil.interfaces.cli.display import DisplayOptions, Renderer

__all__ = [
    "EXIT_BUDGET",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ComponentMetrics",
    "DisplayMode",
    "ExecutionMonitor",
    "MonitorPhase",
    "RunState",
    "SessionState",
]

# Exit codes shared with `sigil orchestrate` (INTERFACES.md).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUDGET = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

# The final statuses a run can record (contract 13).
FINAL_STATUSES = frozenset({"complete", "error", "budget_exceeded", "interrupted"})

# Bounds mirrored from the native fold (rust/fold.rs) so that folding in Python
# and folding natively give equal states even on hostile input.
MAX_NAMES = 256
OTHER = "(other)"
MAX_SAMPLES = 100

# Events whose metadata the fold reads; every other event's metadata is left
# unparsed (ParsedEntry parses it lazily, so not touching it is the fast path).
_META_EVENTS = frozenset(
    {"session_start", "session_complete", "session_error", "step_complete", "step_error",
     "events_dropped"}
)
_STEP_EVENTS = frozenset({"step_complete", "step_error"})
_WARNING_EVENTS = frozenset({"budget_warning", "budget_exceeded", "events_dropped"})
_U64_MAX = (1 << 64) - 1
# The native reader's reason for a line over the length bound (rust/lib.rs).
_OVERSIZE_REASON = "exceeds the line limit"


class DisplayMode(StrEnum):
    """Monitor display modes (spec 4.3.2, plus ``json`` for scripts and CI)."""

    DASHBOARD = "dashboard"  # full dashboard, redrawn in place
    STREAM = "stream"  # one line per event
    MINIMAL = "minimal"  # one line: tokens used / budget
    JSON = "json"  # NDJSON on stdout, one object per refresh


class MonitorPhase(StrEnum):
    """The spec's monitor states (3.5). UPDATING is a render, not a state here."""

    INITIAL = "initial"  # looking for the log file
    WAITING = "waiting"  # file found, no session_start yet (or waiting for the next run)
    TRACKING = "tracking"  # a run is in progress
    FINAL = "final"  # the run ended, or its writer is gone; the summary is shown


class EntryLike(Protocol):
    """What the fold reads from an event: a ``LogEntry`` or a native ``ParsedEntry``."""

    @property
    def timestamp(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def component(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def tokens(self) -> int: ...
    @property
    def seq(self) -> int | None: ...
    @property
    def metadata(self) -> Mapping[str, Any]: ...


def parse_timestamp(text: str | None) -> datetime | None:
    """An event timestamp as an aware datetime, or None if absent or unreadable.

    Contract 1: writers put a UTC offset on timestamps, but readers also accept
    the spec's offset-less form, which the spec's logger wrote in local time.
    """
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # naive: local time, as the spec's writer meant it
    return moment


# -- metadata readers with the native fold's typing rules (serde into u64 / f64) ---------


def _as_u64(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64_MAX:
        return value
    return None


def _as_f64(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _as_allocations(value: object) -> dict[str, int] | None:
    if not isinstance(value, Mapping):
        return None
    items: list[tuple[str, int]] = []
    for key, amount in value.items():
        checked = _as_u64(amount)
        if not isinstance(key, str) or checked is None:
            return None  # the native fold rejects the whole map, and so do we
        items.append((key, checked))
    items.sort()
    return dict(items[:MAX_NAMES])


def _bounded_key(mapping: Mapping[str, object], key: str) -> str:
    """``key``, or ``(other)`` once the map holds MAX_NAMES names (bounded memory)."""
    if key in mapping or len(mapping) < MAX_NAMES:
        return key
    return OTHER


@dataclass(slots=True)
class ComponentMetrics:
    """Metrics for one component (spec 4.3.2).

    ``tokens_used`` counts every event of the component (contract 2); operations,
    latency and errors come from ``step_complete`` / ``step_error`` events only.
    ``last_message`` and ``last_timestamp`` are display hints: they do not take
    part in equality because a native catch-up only knows them for recent events.
    """

    name: str
    tokens_used: int = 0
    operations: int = 0
    total_latency_ms: float = 0.0
    errors: int = 0
    last_message: str = field(default="", compare=False)
    last_timestamp: str | None = field(default=None, compare=False)

    @property
    def avg_latency_ms(self) -> float:
        """Average latency per operation."""
        if self.operations == 0:
            return 0.0
        return self.total_latency_ms / self.operations


@dataclass(slots=True)
class RunState:
    """Totals of one pipeline run: the events since its ``session_start`` (contract 11)."""

    number: int = 0
    started_at: str | None = None
    ended_at: str | None = None
    status: str = "waiting"
    tokens_used: int = 0
    budget: int | None = None
    components: dict[str, ComponentMetrics] = field(default_factory=dict)


@dataclass(slots=True)
class SessionState:
    """Accumulated state of a monitored session: a pure fold of its events.

    ``status`` follows the native fold: ``waiting`` until a ``session_start``,
    then ``running``, then the final event's ``complete`` / ``error`` /
    ``budget_exceeded``; a later ``session_start`` (a new run on the same
    session) makes it ``running`` again. ``incomplete`` is set by the monitor,
    not by the fold, when the writer is gone without a final event.

    Session totals (``tokens_used``, ``components``) cover all runs; ``run``
    holds the latest run's. ``total_budget`` is the session budget from the
    latest ``session_start`` (or the configured default before one is seen).
    """

    session_id: str
    status: str = "waiting"
    total_budget: int = 256_000
    budget_declared: bool = False
    tokens_used: int = 0
    components: dict[str, ComponentMetrics] = field(default_factory=dict)
    allocations: dict[str, int] = field(default_factory=dict)
    runs: int = 0
    run: RunState = field(default_factory=RunState)
    entries: int = 0
    event_counts: dict[str, int] = field(default_factory=dict)
    first_timestamp: str | None = None
    last_timestamp: str | None = None
    max_seq: int | None = None
    last_seq: int | None = None
    seq_gaps: int = 0
    seq_missing: int = 0
    seq_regressions: int = 0
    dropped_events: int = 0
    # What could not be read (contract 6); rotations/truncations come from the tailer.
    malformed: int = 0
    oversize_lines: int = 0
    torn_tail: bool = False
    incomplete: bool = False
    # What happened to the files, not what the events say: outside equality, since a
    # late monitor finds rotated segments where a live one followed rotations.
    rotations: int = field(default=0, compare=False)
    truncations: int = field(default=0, compare=False)
    #: After a truncation the reader starts the file again: events up to this seq
    #: were already folded and are skipped (counted in ``rereads``), never added twice.
    reread_up_to: int | None = field(default=None, compare=False)
    rereads: int = field(default=0, compare=False)
    rotated_segments: int = field(default=0, compare=False)
    reader_base: dict[str, int] = field(default_factory=dict, compare=False)
    # Display-only: not part of equality (a catch-up keeps only the recent ones).
    max_events: int = field(default=100, compare=False)
    events: deque[EntryLike] = field(default_factory=deque, compare=False)
    malformed_samples: list[tuple[int, str]] = field(default_factory=list, compare=False)
    warnings: deque[str] = field(default_factory=lambda: deque(maxlen=20), compare=False)
    thresholds: dict[str, float] = field(default_factory=dict, compare=False)
    task: str | None = field(default=None, compare=False)

    # -- the spec's derived values ------------------------------------------------------

    @property
    def tokens_remaining(self) -> int:
        """Tokens left in the session budget."""
        return max(0, self.total_budget - self.tokens_used)

    @property
    def budget_percentage(self) -> float:
        """Percentage of the session budget used."""
        if self.total_budget <= 0:
            return 0.0
        return self.tokens_used / self.total_budget * 100

    @property
    def start_time(self) -> datetime | None:
        """Start of the current run."""
        return parse_timestamp(self.run.started_at)

    @property
    def end_time(self) -> datetime | None:
        """End of the current run, if it ended."""
        return parse_timestamp(self.run.ended_at)

    @property
    def ended(self) -> bool:
        """True when the current run has a final event."""
        return self.status in FINAL_STATUSES

    @property
    def display_status(self) -> str:
        """The status to show: the fold's, or ``incomplete`` when the writer is gone."""
        if self.incomplete and not self.ended:
            return "incomplete"
        return self.status

    @property
    def elapsed_seconds(self) -> float:
        """Elapsed time of the current run (the spec's property, with ``now`` implied)."""
        return self.elapsed_at(None)

    def elapsed_at(self, now: datetime | None) -> float:
        """Elapsed time of the current run, measured up to ``now`` while it runs.

        A finished or abandoned run stops its clock at its last event, so the
        final summary's duration does not grow while the user reads it.
        """
        start = self.start_time
        if start is None:
            return 0.0
        end = self.end_time
        if end is None and self.incomplete:
            end = parse_timestamp(self.last_timestamp)
        if end is None:
            end = now or datetime.now(UTC)
        return max(0.0, (end - start).total_seconds())

    @property
    def slowest_component(self) -> str | None:
        """The component with the most latency in total (spec 4.3.2)."""
        timed = {k: c for k, c in self.components.items() if c.operations}
        if not timed:
            return None
        return max(timed, key=lambda k: timed[k].total_latency_ms)

    def tokens_per_second(self, now: datetime | None = None) -> float:
        """The current run's token rate (tokens over its elapsed time).

        Zero until a second has passed: a rate over milliseconds is noise.
        """
        elapsed = self.elapsed_at(now)
        if elapsed < 1.0:
            return 0.0
        return self.run.tokens_used / elapsed

    def seconds_to_budget_end(self, now: datetime | None = None) -> float | None:
        """At the current rate, seconds until the session budget runs out (None: never)."""
        rate = self.tokens_per_second(now)
        if rate <= 0 or self.ended or self.incomplete:
            return None
        return self.tokens_remaining / rate

    # -- the fold -----------------------------------------------------------------------

    def update_from_entry(self, entry: EntryLike) -> None:
        """Fold one event into the state. Pure: no I/O, no clock.

        Mirrors the native fold (rust/fold.rs) rule for rule: tokens add up over
        every event (never counted twice from summary events, which carry
        tokens=0, contract 2); component operations, latency and errors come from
        step events; a ``session_start`` opens a run; the final events close it.
        """
        kind = entry.event_type
        seq = entry.seq
        if seq is not None and self.reread_up_to is not None and seq <= self.reread_up_to:
            self.rereads += 1  # read before the truncation: already in the totals
            return
        tokens = entry.tokens
        timestamp = entry.timestamp
        self.entries += 1
        self.tokens_used += tokens
        if self.first_timestamp is None:
            self.first_timestamp = timestamp
        self.last_timestamp = timestamp
        key = _bounded_key(self.event_counts, kind)
        self.event_counts[key] = self.event_counts.get(key, 0) + 1
        if seq is not None:
            self._track_seq(seq)

        meta: Mapping[str, Any] = entry.metadata if kind in _META_EVENTS else {}
        if kind == "session_start":
            self._start_run(entry, meta)
        elif kind in ("session_complete", "session_error"):
            declared = meta.get("status")
            if declared in FINAL_STATUSES:
                status = str(declared)
            else:
                status = "complete" if kind == "session_complete" else "error"
            self.status = status
            self.run.status = status
            self.run.ended_at = timestamp
        elif kind == "events_dropped":
            dropped = _as_u64(meta.get("dropped")) or 0
            self.dropped_events += dropped
        if kind in _WARNING_EVENTS:
            self.warnings.append(f"{_clock(timestamp)} {entry.message}")

        is_step = kind in _STEP_EVENTS
        latency = 0.0
        if is_step:
            latency = _as_f64(meta.get("latency_ms")) or 0.0
        name = entry.component
        for totals in (self.components, self.run.components):
            comp_key = _bounded_key(totals, name)
            metrics = totals.get(comp_key)
            if metrics is None:
                metrics = totals[comp_key] = ComponentMetrics(name=comp_key)
            metrics.tokens_used += tokens
            if is_step:
                metrics.operations += 1
                metrics.total_latency_ms += latency
                if kind == "step_error":
                    metrics.errors += 1
            metrics.last_message = entry.message
            metrics.last_timestamp = timestamp
        self.run.tokens_used += tokens

        events = self.events
        events.append(entry)
        if len(events) > self.max_events:
            events.popleft()

    def update_from_entries(self, entries: Iterable[EntryLike]) -> int:
        """Fold a batch of events; returns how many."""
        count = 0
        for entry in entries:
            self.update_from_entry(entry)
            count += 1
        return count

    def _start_run(self, entry: EntryLike, meta: Mapping[str, Any]) -> None:
        self.runs += 1
        number = _as_u64(meta.get("run"))
        budget = _as_u64(meta.get("budget"))
        if budget is not None:
            self.total_budget = budget
            self.budget_declared = True
        allocations = _as_allocations(meta.get("allocations"))
        if allocations is not None:
            self.allocations = allocations
        self._apply_start_settings(meta)
        self.status = "running"
        self.incomplete = False
        self.run = RunState(
            # An undeclared run number follows the previous run's (as the native fold).
            number=number if number is not None else self.run.number + 1,
            started_at=entry.timestamp,
            status="running",
            budget=self.total_budget if self.budget_declared else None,
        )

    def _track_seq(self, seq: int) -> None:
        last = self.last_seq
        if last is not None:
            if seq > last + 1:
                self.seq_gaps += 1
                self.seq_missing += seq - last - 1
            elif seq <= last:
                self.seq_regressions += 1
        self.last_seq = seq
        if self.max_seq is None or seq > self.max_seq:
            self.max_seq = seq

    def note_malformed(self, malformed: Iterable[Any]) -> int:
        """Count lines the reader rejected (contract 6); keeps a few samples to show.

        The live reader reports lines over the length bound in the same list,
        with the native reason "... exceeds the line limit"; the native fold
        counts those apart (``oversize_lines``), and so do we.
        """
        count = 0
        for line in malformed:
            reason = str(getattr(line, "reason", ""))
            if reason.endswith(_OVERSIZE_REASON):
                self.oversize_lines += 1
            else:
                self.malformed += 1
            count += 1
            if len(self.malformed_samples) < MAX_SAMPLES:
                self.malformed_samples.append((int(getattr(line, "offset", 0)), reason))
        return count

    def note_reader_stats(self, stats: Mapping[str, Any], *, at_catch_up: bool = False) -> None:
        """Take the tailer's counters of what happened to the file (contract 5).

        Rotations are the session's: segments already rotated away when the
        monitor caught up (``rotated_segments``, from the summary) plus those
        the tailer followed live since, so the count is the same whenever the
        monitor was started. With ``at_catch_up`` the counters as they stand
        after the catch-up become the base, whether or not the tailer walked
        through the segments itself.
        """
        counts = {k: int(stats.get(k, 0) or 0) for k in ("rotations", "truncations")}
        if at_catch_up:
            self.reader_base = counts
        base = self.reader_base
        self.rotations = self.rotated_segments + counts["rotations"] - base.get("rotations", 0)
        truncations = counts["truncations"] - base.get("truncations", 0)
        if truncations > self.truncations and self.max_seq is not None:
            # The tailer restarted the file at 0: what it hands out next up to
            # the highest seq seen is a second read of events already counted.
            self.reread_up_to = self.max_seq
        self.truncations = truncations
        if stats.get("torn_lines"):
            self.torn_tail = True

    # -- starting from the native fold ---------------------------------------------------

    @classmethod
    def from_summary(
        cls,
        summary: Any,
        *,
        session_id: str | None = None,
        default_budget: int = 256_000,
        max_events: int = 100,
    ) -> SessionState:
        """A state equal to folding the summarised events one by one.

        ``summary`` is a :class:`sigil.telemetry.log_parser.SessionSummary`
        (``fold_session`` or ``SessionTailer.catch_up``). Its recent entries
        (``last_entries``) are replayed only for what the fold does not keep:
        the last events shown, per-component last messages, warnings.
        """
        budget = getattr(summary, "budget", None)
        state = cls(
            session_id=session_id or str(getattr(summary, "session_id", "") or ""),
            status=str(summary.status or "waiting"),
            total_budget=int(budget) if budget is not None else default_budget,
            budget_declared=budget is not None,
            tokens_used=int(summary.tokens_used),
            components=_components_from(summary.components),
            allocations={str(k): int(v) for k, v in dict(summary.allocations or {}).items()},
            runs=int(summary.runs),
            entries=int(summary.entries),
            event_counts={str(k): int(v) for k, v in dict(summary.event_counts).items()},
            first_timestamp=summary.first_timestamp,
            last_timestamp=summary.last_timestamp,
            max_seq=summary.max_seq,
            last_seq=getattr(summary, "last_seq", summary.max_seq),
            seq_gaps=int(summary.seq_gaps),
            seq_missing=int(getattr(summary, "seq_missing", 0) or 0),
            seq_regressions=int(getattr(summary, "seq_regressions", 0) or 0),
            dropped_events=int(getattr(summary, "dropped_events", 0) or 0),
            malformed=int(summary.malformed),
            oversize_lines=int(getattr(summary, "oversize_lines", 0) or 0),
            torn_tail=bool(getattr(summary, "torn_tail", False)),
            max_events=max_events,
        )
        run = getattr(summary, "run", None)
        if run is not None:  # events before any session_start fold into run 0
            run_budget = getattr(run, "budget", None)
            state.run = RunState(
                number=int(run.number),
                started_at=run.started_at,
                ended_at=run.ended_at,
                status=str(run.status or "waiting"),
                tokens_used=int(getattr(run, "tokens_used", getattr(run, "tokens", 0))),
                budget=int(run_budget) if run_budget is not None else None,
                components=_components_from(run.components),
            )
            start = getattr(run, "start_metadata", None)
            if isinstance(start, Mapping):
                # The run's start may be older than the last events kept.
                state._apply_start_settings(start)
        files = list(getattr(summary, "files", ()) or ())
        state.rotated_segments = state.rotations = max(0, len(files) - 1)
        for sample in list(getattr(summary, "malformed_samples", ()))[:MAX_SAMPLES]:
            state.malformed_samples.append(
                (int(getattr(sample, "offset", 0)), str(getattr(sample, "reason", "")))
            )
        state._replay_recent(list(getattr(summary, "last_entries", ()) or ()))
        return state

    def _replay_recent(self, recent: list[EntryLike]) -> None:
        """Fill the display-only fields from the last events of a catch-up."""
        for entry in recent[-self.max_events :]:
            self.events.append(entry)
        for entry in recent:
            kind = entry.event_type
            for totals in (self.components, self.run.components):
                metrics = totals.get(entry.component)
                if metrics is not None:
                    metrics.last_message = entry.message
                    metrics.last_timestamp = entry.timestamp
            if kind in _WARNING_EVENTS:
                self.warnings.append(f"{_clock(entry.timestamp)} {entry.message}")
            elif kind == "session_start":
                self._apply_start_settings(entry.metadata)

    def _apply_start_settings(self, meta: Mapping[str, Any]) -> None:
        """Thresholds and task from a run's ``session_start`` metadata."""
        thresholds = meta.get("thresholds")
        if isinstance(thresholds, Mapping):
            self.thresholds = {
                str(k): float(v) for k, v in thresholds.items() if _as_f64(v) is not None
            }
        task = meta.get("task")
        if isinstance(task, str):
            self.task = task

    def snapshot(self) -> dict[str, Any]:
        """The comparable totals as plain data (for tests, JSON output and debugging)."""
        return {
            "status": self.status,
            "tokens_used": self.tokens_used,
            "budget": self.total_budget,
            "components": {k: _metrics_dict(c) for k, c in sorted(self.components.items())},
            "run": {
                "number": self.run.number,
                "status": self.run.status,
                "tokens_used": self.run.tokens_used,
                "components": {
                    k: _metrics_dict(c) for k, c in sorted(self.run.components.items())
                },
            },
            "runs": self.runs,
            "entries": self.entries,
            "malformed": self.malformed,
            "seq_gaps": self.seq_gaps,
        }


def _metrics_dict(metrics: ComponentMetrics) -> dict[str, Any]:
    return {
        "tokens": metrics.tokens_used,
        "operations": metrics.operations,
        "latency_ms": metrics.total_latency_ms,
        "errors": metrics.errors,
    }


def _components_from(totals: Mapping[str, Any] | None) -> dict[str, ComponentMetrics]:
    components: dict[str, ComponentMetrics] = {}
    for name, value in dict(totals or {}).items():
        components[str(name)] = ComponentMetrics(
            name=str(name),
            tokens_used=int(value.tokens),
            operations=int(value.operations),
            total_latency_ms=float(value.latency_ms),
            errors=int(value.errors),
        )
    return components


def _clock(timestamp: str) -> str:
    """``HH:MM:SS`` of an ISO timestamp, without parsing it (the stream view's column)."""
    _, sep, rest = timestamp.partition("T")
    return rest[:8] if sep else timestamp[:8]


# ---------------------------------------------------------------------------------------
# The monitor process: waiting, catching up, tailing, deciding when it is over.
# ---------------------------------------------------------------------------------------

CURRENT_LINK_NAME = "current.jsonl"
PID_FILE_NAME = "monitor.pid"

# How long one wait on the tailer may block a worker thread. It bounds how late a
# Ctrl-C or a lock check is noticed; events themselves wake the wait at once (inotify).
_MAX_WAIT = 0.25
# How often the file is looked for while it does not exist (INITIAL).
_FIND_INTERVAL = 0.1
# The dashboard's clock is redrawn this often when nothing happens, so an idle
# monitor costs next to no CPU (the 10 Hz refresh rate applies to changes).
_IDLE_TICK = 1.0


def _session_locked(session_dir: Path) -> bool:
    """Contract 7: is a writer holding the session's lock?"""
    from sigil.core.locks import is_session_locked

    return bool(is_session_locked(session_dir))


class ExecutionMonitor:
    """Real-time monitor of one session's log (spec 4.3).

    Usage (spec Appendix D)::

        monitor = ExecutionMonitor(session_id="test-1", display_mode=DisplayMode.DASHBOARD)
        await monitor.run()

    ``run`` goes through the spec's states (3.5): INITIAL (no log yet), WAITING
    (log found, no ``session_start``), TRACKING, then the final summary. It
    returns the exit code (0 complete, 1 error or incomplete, 3 budget exceeded,
    130 interrupted) and also keeps it in :attr:`exit_code`.

    With ``session_id=None`` it follows ``<log_path>/current.jsonl``, the link
    to the active session's log (spec 7.1). With ``follow=True`` it does not
    exit when a run ends but waits for the session's next run. With
    ``once=True`` it catches up, shows the state once and returns.
    """

    def __init__(
        self,
        session_id: str | None,
        log_path: str | os.PathLike[str] | None = None,
        display_mode: DisplayMode | str = DisplayMode.DASHBOARD,
        refresh_rate: float = 0.1,
        *,
        follow: bool = False,
        once: bool = False,
        options: DisplayOptions | None = None,
        default_budget: int = 256_000,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        lock_grace: float = 0.5,
        last_n: int = 100,
    ) -> None:
        """
        Args:
            session_id: Session to monitor; None follows ``current.jsonl``.
            log_path: Base log directory (default ``<sigil home>/logs``).
            display_mode: How to display output.
            refresh_rate: Seconds between display updates (> 0).
            follow: Keep watching for the next run instead of exiting.
            once: Show the current state once and exit.
            options: What the dashboard shows (``monitoring`` settings).
            default_budget: Budget shown before a ``session_start`` says otherwise.
            lock_grace: How long the lock must stay free, with no new events,
                before the writer is declared gone.
            last_n: Recent events kept for display.
        """
        from sigil.core.paths import resolve_log_path, validate_session_id

        if session_id is not None:
            validate_session_id(session_id)
        if not refresh_rate > 0:
            raise ValueError(f"refresh rate must be above 0 seconds, got {refresh_rate!r}")
        self.session_id = session_id
        self.log_path = resolve_log_path(log_path)
        self.display_mode = DisplayMode(display_mode)
        self.refresh_rate = float(refresh_rate)
        self.follow = follow
        self.once = once
        self.default_budget = default_budget
        self.lock_grace = lock_grace
        self.last_n = last_n
        self._options = options
        self._stdout = stdout
        self._stderr = stderr

        self.state = SessionState(session_id=session_id or "", total_budget=default_budget,
                                  max_events=last_n)
        self.phase = MonitorPhase.INITIAL
        self.exit_code: int | None = None
        self._renderer: Renderer | None = None
        self._stop_code: int | None = None
        self._stop_event: asyncio.Event | None = None
        self._pid_written = False
        #: When this monitor started (wall clock, to compare with log mtimes).
        self._started_wall = time.time()
        #: The ended session current.jsonl pointed at, while waiting for a new one.
        self._ended_link: str | None = None

    # -- paths ---------------------------------------------------------------------------

    @property
    def log_file(self) -> Path:
        """The log file this monitor reads (``current.jsonl`` until a session is known)."""
        if self.session_id is None:
            return self.log_path / CURRENT_LINK_NAME
        return self.log_path / "sessions" / self.session_id / "execution.jsonl"

    @property
    def session_dir(self) -> Path | None:
        if self.session_id is None:
            return None
        return self.log_path / "sessions" / self.session_id

    @property
    def pid_file(self) -> Path:
        return self.log_path / PID_FILE_NAME

    # -- control -------------------------------------------------------------------------

    def stop(self, exit_code: int = EXIT_INTERRUPTED) -> None:
        """Ask the monitor to stop; ``run`` prints the summary so far and returns."""
        if self._stop_code is None:
            self._stop_code = exit_code
        if self._stop_event is not None:
            self._stop_event.set()

    @property
    def _stopping(self) -> bool:
        return self._stop_code is not None

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on :meth:`stop`."""
        assert self._stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), timeout=seconds)

    # -- the run -------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until the tracked run ends, its writer is gone, or the user stops it."""
        from sigil.interfaces.cli.display import make_renderer

        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stop_code is not None:
            self._stop_event.set()
        self._renderer = make_renderer(
            self.display_mode,
            out=self._stdout or sys.stdout,
            err=self._stderr or sys.stderr,
            options=self._options,
        )
        installed = self._install_signals(loop)
        code = EXIT_FAILED
        try:
            if not self.once:
                await asyncio.to_thread(self._write_pid)
            code = await self._run()
        except asyncio.CancelledError:
            # Cancelled from outside (e.g. asyncio.run on Ctrl-C without our handler).
            code = self._finish_interrupted(EXIT_INTERRUPTED)
        finally:
            self._remove_signals(loop, installed)
            with contextlib.suppress(Exception):
                self._renderer.close()
            if self._pid_written:
                await asyncio.to_thread(self._remove_pid)
        self.exit_code = code
        return code

    async def _run(self) -> int:
        renderer = self._require_renderer()
        target = (
            f"session {self.session_id}" if self.session_id
            else f"the active session ({self.log_path / CURRENT_LINK_NAME})"
        )
        renderer.start(f"watching {target}")
        while True:
            found = await self._locate()
            if found is None:
                return self._finish_interrupted(self._stop_code or EXIT_INTERRUPTED)
            if isinstance(found, int):
                return found  # --once with nothing to show
            code = await self._track(found)
            if code is not None:
                return code
            # --follow without --session: current.jsonl now points at another session.
            self.state = SessionState(session_id="", total_budget=self.default_budget,
                                      max_events=self.last_n)

    def _require_renderer(self) -> Renderer:
        assert self._renderer is not None
        return self._renderer

    # -- INITIAL: find the log --------------------------------------------------------------

    async def _locate(self) -> str | int | None:
        """The session to track once its log exists; None if stopped first."""
        renderer = self._require_renderer()
        self.phase = MonitorPhase.INITIAL
        while not self._stopping:
            found = await asyncio.to_thread(self._probe)
            if found is not None:
                return found
            if self.once:
                what = f"session {self.session_id}" if self.session_id else "an active session"
                renderer.error(f"sigil monitor: no log for {what} under {self.log_path}")
                return EXIT_FAILED
            if self._ended_link is not None:
                why = (
                    f"waiting for the next run (the last session, {self._ended_link}, "
                    "has ended; `--session ID` shows it)"
                )
            else:
                why = f"waiting for {self.log_file}"
            renderer.waiting(self.state, self.phase, why)
            await self._sleep(_FIND_INTERVAL)
        return None

    def _probe(self) -> str | None:
        """Blocking (worker thread): the session whose log exists now, else None.

        With ``--session`` its log (or a rotated segment) must exist; without,
        ``current.jsonl`` must resolve to an existing log, whose directory names
        the session.
        """
        from sigil.core.paths import rotated_segments, validate_session_id

        if self.session_id is not None:
            directory = self.log_path / "sessions" / self.session_id
            if (directory / "execution.jsonl").exists() or rotated_segments(directory):
                return self.session_id
            return None
        link = self.log_path / CURRENT_LINK_NAME
        try:
            target = Path(os.path.realpath(link))
        except OSError:
            return None
        if not target.exists() or target == link:
            return None
        candidate = target.parent.name
        try:
            validate_session_id(candidate)
        except ValueError:
            return None
        if not self.once and not _session_locked(target.parent):
            # The link still names the last session, which has ended (its lock is
            # free) and was not written since this monitor started: that is not
            # the active session. Wait for the next run instead of replaying it.
            try:
                written = target.stat().st_mtime
            except OSError:
                return None
            if written < self._started_wall:
                self._ended_link = candidate
                return None
        self._ended_link = None
        return candidate

    # -- WAITING / TRACKING ------------------------------------------------------------------

    async def _track(self, session_id: str) -> int | None:
        """Catch up on ``session_id`` and tail it until its run is over.

        Returns the exit code, or None when following ``current.jsonl`` with
        ``--follow`` and the link moved to another session.
        """
        from sigil.telemetry.log_parser import SessionTailer

        renderer = self._require_renderer()
        session_dir = self.log_path / "sessions" / session_id
        tailer = await asyncio.to_thread(SessionTailer, session_id, self.log_path)
        try:
            summary = await asyncio.to_thread(tailer.catch_up, self.last_n)
            state = SessionState.from_summary(
                summary, session_id=session_id, default_budget=self.default_budget,
                max_events=self.last_n,
            )
            state.note_reader_stats(tailer.stats(), at_catch_up=True)
            self.state = state
            self.phase = self._phase_of(state)
            renderer.caught_up(state, self.phase)
            if self.once:
                return await self._once(state, session_dir)
            return await self._tail(tailer, state, session_dir)
        finally:
            close = getattr(tailer, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    @staticmethod
    def _phase_of(state: SessionState) -> MonitorPhase:
        if state.ended:
            return MonitorPhase.FINAL
        if state.status == "running":
            return MonitorPhase.TRACKING
        return MonitorPhase.WAITING

    async def _once(self, state: SessionState, session_dir: Path) -> int:
        renderer = self._require_renderer()
        changed = False  # since caught_up() showed the state
        if state.status == "running" and not await asyncio.to_thread(_session_locked, session_dir):
            state.incomplete = changed = True
        outcome = self._outcome(state)
        # A run still going (or not started) is a snapshot, not a failure.
        ended = outcome in FINAL_STATUSES or outcome in ("incomplete", "incomplete_data")
        code = self._code_for(outcome) if ended else EXIT_OK
        renderer.refresh(state, self.phase, changed)
        renderer.finish(state, self.phase, "snapshot" if outcome == "running" else outcome, code)
        return code

    async def _tail(self, tailer: Any, state: SessionState, session_dir: Path) -> int | None:
        renderer = self._require_renderer()
        clock = time.monotonic
        now = clock()
        next_frame = now  # the first change is drawn at once
        next_tick = now + _IDLE_TICK
        last_data = now
        next_lock_check = now
        lock_free_since: float | None = None
        dirty = False
        follow_link = self.follow and self.session_id is None

        if state.ended:
            code = self._end_run(state)
            if not self.follow:
                return code

        while not self._stopping:
            now = clock()
            # Block in the tailer (GIL released) no longer than the next thing due.
            due = [next_lock_check, now + _MAX_WAIT]
            due.append(next_frame if dirty else next_tick)
            timeout = max(0.0, min(due) - now)
            result = await asyncio.to_thread(_pull, tailer, timeout)
            now = clock()
            if result is not None and (result.entries or result.malformed):
                last_data = now
                lock_free_since = None
                state.note_malformed(result.malformed)
                state.note_reader_stats(tailer.stats())
                ended_code = self._fold(state, result.entries)
                dirty = True
                if ended_code is not None and not self.follow:
                    return ended_code

            if dirty and now >= next_frame:
                renderer.refresh(state, self.phase, True)
                dirty = False
                next_frame = now + self.refresh_rate
                next_tick = now + _IDLE_TICK
            elif now >= next_tick:
                state.note_reader_stats(tailer.stats())
                renderer.refresh(state, self.phase, False)
                next_tick = now + _IDLE_TICK

            if now >= next_lock_check:
                next_lock_check = now + max(0.1, self.lock_grace / 2)
                if follow_link and self.phase is not MonitorPhase.TRACKING:
                    moved = await asyncio.to_thread(self._probe)
                    if isinstance(moved, str) and moved != state.session_id:
                        return None
                if self.phase is not MonitorPhase.TRACKING:
                    continue
                locked = await asyncio.to_thread(_session_locked, session_dir)
                if locked:
                    lock_free_since = None
                    continue
                if lock_free_since is None:
                    lock_free_since = now
                if now - lock_free_since < self.lock_grace or now - last_data < self.lock_grace:
                    continue
                # The writer is gone. Whatever it flushed before letting go is on disk:
                # drain it before deciding, so a final event is never missed.
                result = await asyncio.to_thread(_pull, tailer, 0.0)
                if result is not None and (result.entries or result.malformed):
                    state.note_malformed(result.malformed)
                    state.note_reader_stats(tailer.stats())
                    ended_code = self._fold(state, result.entries)
                    if ended_code is not None and not self.follow:
                        return ended_code
                    if state.ended:
                        continue
                state.note_reader_stats(tailer.stats())
                if await asyncio.to_thread(_has_partial_line, tailer):
                    state.torn_tail = True
                state.incomplete = True
                code = self._end_run(state)
                if not self.follow:
                    return code
                lock_free_since = None
        return self._finish_interrupted(self._stop_code or EXIT_INTERRUPTED)

    def _fold(self, state: SessionState, entries: Iterable[EntryLike]) -> int | None:
        """Fold new events; at a run's final event, show its summary.

        Without ``--follow`` folding stops at the final event of the tracked run
        (a later run in the same batch belongs to another monitor invocation).
        Returns the exit code when a run ended.
        """
        renderer = self._require_renderer()
        batch: list[EntryLike] = []
        code: int | None = None
        for entry in entries:
            kind = entry.event_type
            state.update_from_entry(entry)
            batch.append(entry)
            if kind == "session_start" or (
                state.status == "running" and self.phase is not MonitorPhase.TRACKING
            ):
                # A new run, or `sigil orchestrate --resume` continuing the same run
                # (it writes no session_start): the writer is back.
                self.phase = MonitorPhase.TRACKING
                state.incomplete = False
            elif kind in ("session_complete", "session_error"):
                renderer.on_events(state, batch)
                batch = []
                code = self._end_run(state)
                if not self.follow:
                    return code
        if batch:
            renderer.on_events(state, batch)
        return code

    def _end_run(self, state: SessionState) -> int:
        """FINAL: show the summary of the run that just ended; back to WAITING with --follow."""
        renderer = self._require_renderer()
        self.phase = MonitorPhase.FINAL
        outcome = self._outcome(state)
        code = self._code_for(outcome)
        renderer.finish(state, self.phase, outcome, code)
        if self.follow:
            self.phase = MonitorPhase.WAITING
            renderer.waiting(state, self.phase, "waiting for the next run (--follow)")
        return code

    @staticmethod
    def _outcome(state: SessionState) -> str:
        """The run's final status, unless the reader knows better.

        A run that says ``complete`` while events are missing (a seq gap that no
        segment fills, or events the writer dropped on a full disk) is
        ``incomplete_data``: its totals are a lower bound, never "complete".
        """
        if state.ended:
            if state.status == "complete" and (state.seq_missing or state.dropped_events):
                return "incomplete_data"
            return state.status
        if state.incomplete:
            return "incomplete"
        return state.status

    @staticmethod
    def _code_for(outcome: str) -> int:
        if outcome == "complete":
            return EXIT_OK
        if outcome == "budget_exceeded":
            return EXIT_BUDGET
        if outcome == "interrupted":
            return EXIT_INTERRUPTED  # the run was stopped by a signal (the shell's 130)
        return EXIT_FAILED

    def _finish_interrupted(self, code: int) -> int:
        """Ctrl-C: the summary so far, then 130 (143 for SIGTERM)."""
        renderer = self._require_renderer()
        with contextlib.suppress(Exception):
            renderer.finish(self.state, self.phase, "stopped", code)
        return code

    # -- signals and the pid file ---------------------------------------------------------

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        installed: list[int] = []
        handlers: list[tuple[int, Any]] = [
            (signal.SIGINT, lambda: self.stop(EXIT_INTERRUPTED)),
            (signal.SIGTERM, lambda: self.stop(EXIT_TERMINATED)),
        ]
        if hasattr(signal, "SIGWINCH"):
            handlers.append((signal.SIGWINCH, self._on_resize))
        for signum, handler in handlers:
            try:
                loop.add_signal_handler(signum, handler)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread: asyncio.run's own Ctrl-C handling applies
            installed.append(signum)
        return installed

    @staticmethod
    def _remove_signals(loop: asyncio.AbstractEventLoop, installed: list[int]) -> None:
        for signum in installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)

    def _on_resize(self) -> None:
        if self._renderer is not None:
            self._renderer.resized()
            with contextlib.suppress(Exception):
                self._renderer.refresh(self.state, self.phase, False)

    def _write_pid(self) -> None:
        """``<log_path>/monitor.pid`` (spec 7.1), 0600 in a 0700 directory (contract 8).

        Replaced atomically, so a symlink planted at the name is replaced rather
        than followed (it would make the monitor write its PID outside its home).
        """
        from sigil.telemetry.file_security import write_private_atomic

        try:
            self.log_path.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private_atomic(self.pid_file, f"{os.getpid()}\n".encode(), durable=False)
            self._pid_written = True
        except OSError as exc:
            # A read-only log directory can still be monitored; say why there is no pid file.
            if self._renderer is not None:
                self._renderer.notice(f"note: cannot write {self.pid_file}: {exc.strerror}")

    def _remove_pid(self) -> None:
        """Remove the pid file if it is still ours (another monitor may have replaced it)."""
        try:
            fd = os.open(self.pid_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as file:
                content = file.read(64).strip()
            if content == str(os.getpid()).encode():
                self.pid_file.unlink()
        except OSError:
            pass


def _pull(tailer: Any, timeout: float) -> Any:
    """Blocking (worker thread): new events now, or after waiting up to ``timeout``.

    ``wait`` releases the GIL and wakes on inotify, so an event reaches the
    screen without waiting out the timeout.
    """
    result = tailer.read()
    if result.entries or result.malformed or timeout <= 0:
        return result
    if tailer.wait(timeout):
        return tailer.read()
    return result


def _has_partial_line(tailer: Any) -> bool:
    """Blocking: does the live file end in a line without its newline (a torn tail)?

    The tailer holds such a line back (contract 3); once the writer is gone it
    will never be completed, so the monitor reports it instead of waiting.
    """
    checkpoint = tailer.checkpoint()
    if checkpoint is None:
        return False
    try:
        size = os.stat(tailer.path).st_size
    except OSError:
        return False
    return bool(size > checkpoint.offset)
