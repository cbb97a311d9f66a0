"""The live monitor behind ``sigil monitor`` (spec 3.5, 4.3, 5.2, 8.3).

Two halves, kept apart on purpose (STYLE.md "Pure state, separate I/O"):

* :class:`SessionState` is what the screen shows: a frozen snapshot of the one
  native session model (contract 12) plus display-only state (recent events,
  warning messages, what happened to the files). It computes no totals.
* :class:`ExecutionMonitor` does the I/O: it waits for the log, then feeds a
  single native ``Fold`` through :class:`sigil.telemetry.log_parser.SessionModel`'s
  tailer (which follows rotation and truncation, contract 5) -- the catch-up and
  every line after it -- takes a snapshot when lines arrived, decides when the
  run has ended or its writer is gone (contract 7) and hands the state to a
  renderer from :mod:`sigil.interfaces.cli.display`.

The monitor only reads the session's log; the one file it writes is
``<log_path>/monitor.pid`` (spec 7.1).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    import asyncio

    from sigil.interfaces.cli.display import DisplayOptions, Renderer
    from sigil.interfaces.cli.event_selection import EventFeed, EventSelection
    from sigil.interfaces.cli.keys import TerminalKeys
    from sigil.reports.live import JumpHistory
    from sigil.telemetry.log_parser import (
        ComponentSnapshot,
        LastError,
        RunSnapshot,
        SessionModel,
        SessionSnapshot,
        StepInFlight,
    )

__all__ = [
    "EXIT_BUDGET",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "DisplayMode",
    "ExecutionMonitor",
    "MonitorPhase",
    "SessionState",
]

# Exit codes shared with `sigil orchestrate` (its --help and the README list them).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUDGET = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

# The final statuses a run can record (contract 13).
FINAL_STATUSES = frozenset({"complete", "error", "budget_exceeded", "interrupted"})

# Events whose message the dashboard keeps in its warnings panel.
_WARNING_EVENTS = frozenset({"budget_warning", "budget_exceeded", "events_dropped"})
#: The recent rate reads this many seconds of event time (the model keeps 64).
RATE_WINDOW_SECONDS = 60.0
#: A running session with no event for this long is shown as stalled.
STALL_AFTER_SECONDS = 5.0


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
    """What the views read from an event: a native ``ParsedEntry`` (or a ``LogEntry``)."""

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


def _empty_snapshot() -> SessionSnapshot:
    from sigil.telemetry.log_parser import empty_snapshot

    return empty_snapshot()


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


if TYPE_CHECKING:
    from collections.abc import Sequence

    from sigil.telemetry.log_parser import ModelSnapshot


class StepLoop(Protocol):
    """A step loop of the model (``StepLoop``): a component started 3+ times
    with one ``input_sha256`` in a run, and the ``seq``s of its first starts."""

    @property
    def run(self) -> int: ...
    @property
    def component(self) -> str: ...
    @property
    def input_sha256(self) -> str: ...
    @property
    def starts(self) -> int: ...
    @property
    def seqs(self) -> list[int]: ...
    def to_dict(self) -> dict[str, Any]: ...


class SessionState:
    """What the monitor shows: the native session model's latest snapshot, plus
    what only a display keeps (contract 12).

    Every number (tokens, runs, operations, errors, latency, rates, status)
    reads :attr:`snap`, a frozen ``SessionSnapshot`` of the one native fold the
    monitor feeds as the tailer delivers lines; nothing here adds anything up.
    Besides it the state keeps the recent events and warning messages shown,
    what happened to the files (rotations, truncations: the tailer's, not the
    events'), ``incomplete``, which the monitor sets when the writer is gone
    without a final event, and ``locked``, whether a writer held the session's
    lock when the monitor last looked (contract 7).
    """

    __slots__ = (
        "_allocations",
        "_component_models",
        "_components",
        "_jumps",
        "_last_spender",
        "_loops",
        "_run",
        "_storms",
        "_thresholds_of",
        "clock",
        "default_budget",
        "events",
        "incomplete",
        "jump_history",
        "locked",
        "max_events",
        "reader_base",
        "rereads",
        "rotated_segments",
        "rotations",
        "session_id",
        "snap",
        "task",
        "thresholds",
        "truncations",
        "unlisted",
        "warnings",
    )

    def __init__(
        self,
        session_id: str,
        *,
        default_budget: int = 256_000,
        max_events: int = 100,
        snapshot: SessionSnapshot | None = None,
    ) -> None:
        self.session_id = session_id
        self.default_budget = default_budget
        self.max_events = max_events
        self.snap: SessionSnapshot = snapshot if snapshot is not None else _empty_snapshot()
        self._take_parts()
        self.incomplete = False
        self.locked = False
        #: "now" when none is given (None: the wall clock; a replay's moment of the session)
        self.clock: Callable[[], datetime | None] | None = None
        self.rotations = 0
        self.truncations = 0
        self.rereads = 0
        self.rotated_segments = 0
        self.reader_base: dict[str, int] = {}
        self.events: deque[EntryLike] = deque(maxlen=max(1, max_events))
        #: Events of the latest update beyond the ones the model keeps to list.
        self.unlisted = 0
        self.warnings: deque[str] = deque(maxlen=20)
        self.thresholds: dict[str, float] = {}
        self.task: str | None = None
        #: The component of the latest event that carried tokens (which one
        #: crossed a session budget level: its warning names none).
        self._last_spender: str | None = None
        self._thresholds_of: tuple[int, str | None] | None = None
        #: The components' history the current run's token jumps are judged
        #: against (the report index's, read once by the monitor after its
        #: first frame; None until then, or without an index: no jumps).
        self.jump_history: JumpHistory | None = None
        if snapshot is not None:
            self._show(list(snapshot.last_entries))
            self._read_start()

    # -- taking a new snapshot -----------------------------------------------------------

    def update(self, snapshot: SessionSnapshot) -> list[EntryLike]:
        """Show ``snapshot``; returns the events new since the previous one (at
        most the ``last_n`` the model keeps: a larger burst is counted, not listed)."""
        new = snapshot.entries - self.snap.entries
        self.snap = snapshot
        self._take_parts()
        fresh: list[EntryLike] = []
        if new > 0:
            recent: list[EntryLike] = list(snapshot.last_entries)
            fresh = recent[-new:] if new < len(recent) else recent
            self._show(fresh)
        self.unlisted = max(0, new - len(fresh))
        self._read_start()
        return fresh

    def _take_parts(self) -> None:
        # Each getter of the snapshot builds a new dict or object: a frame reads
        # them many times, so they are taken once per snapshot.
        snap = self.snap
        self._components: dict[str, ComponentSnapshot] = snap.components
        self._allocations: dict[str, int] = snap.allocations
        self._run: RunSnapshot = snap.run
        # Read when a view asks (most frames of a session without them never do).
        self._loops: Sequence[StepLoop] | None = None
        self._jumps: list[dict[str, Any]] | None = None
        self._storms: list[dict[str, Any]] | None = None
        self._component_models: dict[str, dict[str, ModelSnapshot]] | None = None

    def _show(self, entries: list[EntryLike]) -> None:
        self.events.extend(entries)
        for entry in entries:
            if entry.event_type in _WARNING_EVENTS:
                text = f"{_clock(entry.timestamp)} {entry.message}"
                crossed = _component_of(entry) or (
                    self._last_spender if entry.event_type != "events_dropped" else None
                )
                if crossed and crossed not in entry.message:
                    text = f"{text} ({crossed})"
                self.warnings.append(text)
            elif entry.tokens and entry.component != "orchestrator":
                self._last_spender = entry.component

    def _read_start(self) -> None:
        """Thresholds and task from the current run's ``session_start`` metadata."""
        run = self._run
        key = (run.number, run.started_at)
        if key == self._thresholds_of:
            return
        self._thresholds_of = key
        meta = run.start_metadata
        thresholds = meta.get("thresholds")
        if isinstance(thresholds, Mapping):
            self.thresholds = {
                str(k): f for k, v in thresholds.items() if (f := _finite(v)) is not None
            }
        task = meta.get("task")
        if isinstance(task, str):
            self.task = task

    def note_reader_stats(self, stats: Mapping[str, Any], *, at_catch_up: bool = False) -> None:
        """Take the tailer's counters of what happened to the file (contract 5).

        Rotations are the session's: segments already rotated away when the
        monitor caught up plus those the tailer followed live since, so the
        count is the same whenever the monitor was started.
        """
        counts = {k: int(stats.get(k, 0) or 0) for k in ("rotations", "truncations", "rereads")}
        if at_catch_up:
            self.reader_base = counts
        base = self.reader_base
        self.rotations = self.rotated_segments + counts["rotations"] - base.get("rotations", 0)
        self.truncations = counts["truncations"] - base.get("truncations", 0)
        # Lines the tailer handed the fold again after a truncation that kept the
        # head, skipped by seq (never counted twice): shown, so it is not silent.
        self.rereads = counts["rereads"] - base.get("rereads", 0)

    # -- the model's numbers -------------------------------------------------------------

    @property
    def status(self) -> str:
        return self.snap.status

    @property
    def reason(self) -> str | None:
        """Why the latest run failed, when it did."""
        return self.snap.reason

    @property
    def tokens_used(self) -> int:
        return self.snap.tokens

    @property
    def budget_declared(self) -> bool:
        return self.snap.budget is not None

    @property
    def total_budget(self) -> int:
        """The budget of the latest ``session_start``, or the configured default."""
        budget = self.snap.budget
        return self.default_budget if budget is None else budget

    @property
    def components(self) -> dict[str, ComponentSnapshot]:
        return self._components

    @property
    def allocations(self) -> dict[str, int]:
        return self._allocations

    @property
    def loops(self) -> Sequence[StepLoop]:
        """The model's step loops (a component started 3+ times with one input in
        a run), oldest run first: each once, whatever the number of frames."""
        if self._loops is None:
            self._loops = self.snap.loops
        return self._loops

    @property
    def token_jumps(self) -> list[dict[str, Any]]:
        """The current run's components whose tokens per call so far jump far
        above their history (:attr:`jump_history`, the rule of ``sigil report``),
        each with its heaviest calls' seqs: judged once per snapshot."""
        if self._jumps is None:
            history = self.jump_history
            self._jumps = [] if history is None else history.judge(self.session_id, self._run)
        return self._jumps

    @property
    def budget_exhausted(self) -> list[dict[str, Any]]:
        """The current run, when it ended out of budget: its tokens, budget and
        the seq of the final event that said so (the rule of ``sigil report``)."""
        from sigil.reports.live import budget_exhausted

        return budget_exhausted(self.session_id, [self._run], label=False)

    @property
    def retry_storms(self) -> list[dict[str, Any]]:
        """The current run's retry storms (a component with 5+ failed attempts,
        the rule of ``sigil report``), each with its first failed attempts'
        seqs: once per snapshot."""
        if self._storms is None:
            from sigil.reports.live import retry_storms

            self._storms = retry_storms(self.session_id, [self._run], label=False)
        return self._storms

    def set_jump_history(self, history: JumpHistory | None) -> None:
        """Judge the token jumps against ``history`` from now on."""
        self.jump_history = history
        self._jumps = None

    @property
    def unknown_usage_calls(self) -> int:
        """Calls whose upstream reported no usage: counted apart, never as 0 tokens."""
        return self.snap.unknown_usage_calls

    @property
    def component_models(self) -> dict[str, dict[str, ModelSnapshot]]:
        """Each component's per-model totals (the model's ``component_models``)."""
        if self._component_models is None:
            self._component_models = self.snap.component_models
        return self._component_models

    @property
    def runs(self) -> int:
        return self.snap.run_count

    @property
    def run(self) -> RunSnapshot:
        return self._run

    @property
    def entries(self) -> int:
        return self.snap.entries

    @property
    def first_timestamp(self) -> str | None:
        return self.snap.first_timestamp

    @property
    def last_timestamp(self) -> str | None:
        return self.snap.last_timestamp

    @property
    def seq_gaps(self) -> int:
        return self.snap.seq_gaps

    @property
    def seq_missing(self) -> int:
        return self.snap.seq_missing

    @property
    def seq_regressions(self) -> int:
        return self.snap.seq_regressions

    @property
    def dropped_events(self) -> int:
        return self.snap.dropped_events

    @property
    def malformed(self) -> int:
        return self.snap.malformed

    @property
    def oversize_lines(self) -> int:
        return self.snap.oversize_lines

    @property
    def malformed_samples(self) -> list[tuple[int, str]]:
        return [(m.offset, m.reason) for m in self.snap.malformed_lines]

    @property
    def torn_tail(self) -> bool:
        """A last line without its newline, once no writer will complete it."""
        return self.snap.torn_tail and (self.ended or self.incomplete)

    @property
    def tokens_remaining(self) -> int:
        """Tokens left in the session budget: the model's (budget - used - held
        for calls of unknown usage, never below 0); against the configured
        default budget when the session declares none."""
        remaining = self.snap.tokens_remaining
        if remaining is not None:
            return int(remaining)
        return max(0, self.total_budget - self.tokens_used - self.snap.tokens_held)

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
    def live(self) -> bool:
        """A run is going and its writer is (as far as we know) still there."""
        return self.status == "running" and not self.incomplete

    @property
    def display_status(self) -> str:
        """The status to show: the model's, ``incomplete`` when the writer is gone,
        or ``running`` for a session a live writer is writing without a run (the
        README's Python API writes no ``session_start``): it holds the lock and
        has written events, so it is neither waiting nor gone (contract 7), as
        ``sigil sessions`` says too."""
        if self.incomplete and not self.ended:
            return "incomplete"
        if self.status == "waiting" and self.locked and self.entries:
            return "running"
        return self.status

    @property
    def run_display_status(self) -> str:
        """The current run's status to show: ``incomplete`` once its writer is gone
        without a final event, as the session's (and its OTLP root span) say."""
        from sigil.telemetry.log_parser import run_status

        return run_status(self._run, writer_gone=self.incomplete)

    @property
    def last_ended_run(self) -> RunSnapshot | None:
        """The latest run with a final event (the current one, or one before it)."""
        run = self._run
        if run.ended_at is not None:
            return run
        for earlier in reversed(self.snap.runs):
            if earlier.ended_at is not None:
                return earlier
        return None

    @property
    def ended_key(self) -> tuple[int, str | None, str | None] | None:
        """Which run ended last, and when: it changes when a run ends."""
        run = self.last_ended_run
        return None if run is None else (run.number, run.started_at, run.ended_at)

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
        if end is None and not self.live:
            end = parse_timestamp(self.run.last_at or self.last_timestamp)
        if end is None:
            end = now or self._now()
        return max(0.0, (end - start).total_seconds())

    @property
    def slowest_component(self) -> str | None:
        """The component whose successful steps take longest on average (spec 4.3.2),
        by the rule ``metrics.json`` uses, so the two never name different ones."""
        timed = {
            k: avg for k, c in self.components.items() if (avg := c.average_latency_ms) is not None
        }
        if not timed:
            return None
        return max(timed, key=lambda k: (timed[k], k))

    def idle_seconds(self, now: datetime | None = None) -> float:
        """Seconds since the latest event while a run is live (else 0: its clock stopped)."""
        if not self.live:
            return 0.0
        last = parse_timestamp(self.last_timestamp)
        if last is None:
            return 0.0
        return max(0.0, ((now or self._now()) - last).total_seconds())

    def _now(self) -> datetime:
        moment = self.clock() if self.clock is not None else None
        return moment if moment is not None else datetime.now(UTC)

    def stalled_seconds(self, now: datetime | None = None) -> float | None:
        """How long a live run has gone without an event, once that is long enough to say."""
        idle = self.idle_seconds(now)
        return idle if idle >= STALL_AFTER_SECONDS else None

    def recent_rate(self, now: datetime | None = None) -> float | None:
        """Tokens per second over the last minute of event time (the model's window),
        decaying while a live run is stalled; None before two event times."""
        return self.snap.recent_tokens_per_second(RATE_WINDOW_SECONDS, self.idle_seconds(now))

    @property
    def average_rate(self) -> float | None:
        """The session's tokens over its first-to-latest event time."""
        return self.snap.average_tokens_per_second

    def seconds_to_budget_end(self, now: datetime | None = None) -> float | None:
        """At the recent rate, seconds until the session budget runs out (None: never)."""
        if not self.live:
            return None
        rate = self.recent_rate(now)
        if not rate or rate <= 0:
            return None
        return self.tokens_remaining / rate

    @property
    def in_flight(self) -> StepInFlight | None:
        """The step running now (the model's ``StepInFlight``), while a run is live."""
        if not self.live:
            return None
        return self.snap.in_flight

    def rate_series(
        self, buckets: int = 16, bucket_seconds: float = 4.0, now: datetime | None = None
    ) -> list[int]:
        """The model's tokens per bucket over its rate window, oldest first, ending now."""
        return self.snap.rate_series(buckets, bucket_seconds, self.idle_seconds(now))

    def last_errors(self) -> list[tuple[str, LastError]]:
        """The last error of each component that reported one, latest first."""
        found = [(name, c.last_error) for name, c in self.components.items() if c.last_error]
        found.sort(key=lambda item: item[1].timestamp, reverse=True)
        return found


def _component_of(entry: EntryLike) -> str | None:
    """``metadata.component`` of a budget warning (a component over its allocation)."""
    try:
        value = entry.metadata.get("component")
    except (AttributeError, ValueError):
        return None
    return value if isinstance(value, str) and value else None


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


def _close_model(model: SessionModel) -> None:
    close = getattr(model.tailer, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


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
        keys: bool = True,
        stdin: TextIO | None = None,
        selection: EventSelection | None = None,
        json_events: bool = False,
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
            keys: Read keys on the dashboard (stdin a terminal, cbreak mode
                while running, restored on every exit path).
            stdin: Where keys come from (default ``sys.stdin``).
            selection: Which events the stream (or ``json_events``) lists
                (``--all``, ``--tail``, ``--since``, ``--component``,
                ``--event-type``, ``--errors``): it selects, never counts.
            json_events: The json mode writes one object per event too.
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
        self.keys = keys
        self._stdin = stdin
        self.selection = selection
        self.json_events = json_events
        #: Every event the model folds after the catch-up, for the modes that list them.
        self._feed: EventFeed | None = None
        #: where the catch-up stopped in the live file (``--tail``/``--since`` read back from it)
        self._caught_up_at: Any = None
        #: The log did not exist when this monitor first looked: the whole run is new.
        self._waited = False

        self.state = SessionState(
            session_id or "", default_budget=default_budget, max_events=last_n
        )
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
        #: What :meth:`first_frame` set up before the event loop: the keys it
        #: took, and the session it caught up on (its model and state).
        self._early_keys: TerminalKeys | None = None
        self._opened: tuple[str, SessionModel, SessionState] | None = None
        self._held_signals: dict[int, Any] = {}
        #: The components' history for live token jumps, read once (:meth:`_jump_history`).
        self._jumps_from: JumpHistory | None = None

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
        import asyncio

        assert self._stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), timeout=seconds)

    # -- the run -------------------------------------------------------------------------

    # -- the first frame, before the event loop ---------------------------------------------

    def first_frame(self) -> bool:
        """The dashboard's first frame, drawn before asyncio is imported (issue 12).

        On a terminal the dashboard takes the keys (cbreak mode), catches up on
        the session (the native fold the entry point started) and draws the
        state on this thread; :meth:`run` then takes the renderer, the keys and
        the model over. True when a frame was drawn; False (nothing left
        behind but the renderer) for any other mode, ``--once``, or a log that
        is not there yet, which :meth:`run` waits for as before.

        The terminal is restored on every path out: an exception here gives it
        back at once; SIGINT and SIGTERM meanwhile only :meth:`stop` the
        monitor (so :meth:`run` ends at once with 130 or 143 and restores it,
        as it does for a signal in its loop); and ``atexit`` covers the rest.
        """
        from sigil.interfaces.cli.display import DashboardRenderer, make_renderer

        if self._renderer is not None or self.once:
            return False
        if self.display_mode is not DisplayMode.DASHBOARD:
            return False
        renderer = make_renderer(
            self.display_mode,
            out=self._stdout or sys.stdout,
            err=self._stderr or sys.stderr,
            options=self._options,
        )
        renderer.select_events(self.selection, json_events=self.json_events)
        self._renderer = renderer
        if not isinstance(renderer, DashboardRenderer):
            return False
        self._hold_signals()
        try:
            self._early_keys = keys = self._enter_keys(renderer)
            if keys is not None and hasattr(signal, "SIGTSTP"):
                # Ctrl-Z: the terminal as it was, as the loop's handler does.
                with contextlib.suppress(ValueError, OSError):
                    self._held_signals[signal.SIGTSTP] = signal.signal(
                        signal.SIGTSTP, lambda _signum, _frame: self._suspend(keys)
                    )
            renderer.start(f"watching {self._target()}")
            found = None if self._stopping else self._probe()
            if found is None or self._stopping:
                return False
            model, state = self._open(found)
            self._opened = (found, model, state)
            self._replay(state)
            self._show_caught_up(state)
            return True
        except BaseException:
            self._release_early()
            raise

    def _hold_signals(self) -> None:
        """Until the event loop takes them: SIGINT and SIGTERM stop the monitor."""
        if self._held_signals:
            return
        codes = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}

        def held(signum: int, _frame: object) -> None:
            self.stop(codes[signal.Signals(signum)])

        for signum in codes:
            try:
                self._held_signals[signum] = signal.signal(signum, held)
            except (ValueError, OSError):  # not the main thread
                continue

    def _unhold_signals(self) -> None:
        held, self._held_signals = self._held_signals, {}
        for signum, previous in held.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, previous)

    def _release_early(self) -> None:
        """Undo :meth:`first_frame` (idempotent): the model, the screen, the keys."""
        opened, self._opened = self._opened, None
        if opened is not None:
            _close_model(opened[1])
        if self._renderer is not None:
            with contextlib.suppress(Exception):
                self._renderer.close()
        keys, self._early_keys = self._early_keys, None
        if keys is not None:
            from sigil.interfaces.cli.display import DashboardRenderer

            keys.restore()
            if isinstance(self._renderer, DashboardRenderer):
                self._renderer.view.keys = False
        self._unhold_signals()

    def close(self) -> None:
        """Give back what :meth:`first_frame` took if :meth:`run` never ran (idempotent)."""
        self._release_early()

    # -- the run -------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until the tracked run ends, its writer is gone, or the user stops it."""
        import asyncio

        from sigil.interfaces.cli.display import make_renderer

        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stop_code is not None:
            self._stop_event.set()
        if self._renderer is None:
            self._renderer = make_renderer(
                self.display_mode,
                out=self._stdout or sys.stdout,
                err=self._stderr or sys.stderr,
                options=self._options,
                inline=self.once,
            )
            self._renderer.select_events(self.selection, json_events=self.json_events)
        installed = self._install_signals(loop)
        # The loop's handlers replaced the ones first_frame held; a stop asked
        # meanwhile is already in _stop_code.
        self._held_signals = {}
        if self._stop_code is not None:
            self._stop_event.set()
        code = EXIT_FAILED
        keys = None
        try:
            keys = self._start_keys(loop)
            if not self.once:
                await asyncio.to_thread(self._write_pid)
            code = await self._run()
        except asyncio.CancelledError:
            # Cancelled from outside (e.g. asyncio.run on Ctrl-C without our handler).
            code = self._finish_interrupted(EXIT_INTERRUPTED)
        except BrokenPipeError:
            code = _quiet_broken_pipe()
        finally:
            # Every exit path (a return, an exception, SIGINT/SIGTERM, which stop
            # the loop above) gives the terminal back as it was.
            if keys is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(keys.fd)
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(signal.SIGTSTP)
            self._remove_signals(loop, installed)
            with contextlib.suppress(Exception):
                self._renderer.close()
            if keys is not None:
                keys.restore()
            self._release_early()
            if self._pid_written:
                await asyncio.to_thread(self._remove_pid)
        self.exit_code = code
        return code

    def _start_keys(self, loop: asyncio.AbstractEventLoop) -> TerminalKeys | None:
        """cbreak mode and a reader on stdin, for the dashboard on a terminal."""
        from sigil.interfaces.cli.display import DashboardRenderer

        renderer = self._renderer
        if not isinstance(renderer, DashboardRenderer):
            return None
        keys, self._early_keys = self._early_keys, None
        if keys is None:
            keys = self._enter_keys(renderer)
        if keys is None:
            return None
        try:
            loop.add_reader(keys.fd, self._on_keys, keys)
        except (NotImplementedError, RuntimeError, ValueError, OSError):
            keys.restore()
            renderer.view.keys = False
            return None
        if hasattr(signal, "SIGTSTP"):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGTSTP, self._suspend, keys)
        return keys

    def _enter_keys(self, renderer: Renderer) -> TerminalKeys | None:
        """cbreak mode on stdin when the dashboard reads keys; None when it does not."""
        from sigil.interfaces.cli.display import DashboardRenderer
        from sigil.interfaces.cli.keys import TerminalKeys

        if not self.keys or self.once or not isinstance(renderer, DashboardRenderer):
            return None
        stdin = self._stdin or sys.stdin
        try:
            fd = stdin.fileno()
        except (AttributeError, ValueError, OSError):
            return None
        keys = TerminalKeys(fd)
        if not keys.enter():
            return None
        renderer.view.keys = True
        return keys

    def _suspend(self, keys: TerminalKeys) -> None:
        """Ctrl-Z: the terminal as it was, stop; on ``fg``, cbreak and a whole frame again."""
        from sigil.interfaces.cli.display import DashboardRenderer

        renderer = self._renderer
        if isinstance(renderer, DashboardRenderer):
            renderer.suspend()
        keys.restore()
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once continued (SIGCONT)
        keys.enter()
        if isinstance(renderer, DashboardRenderer):
            with contextlib.suppress(Exception):
                renderer.refresh(self.state, self.phase, False)

    def _on_keys(self, keys: TerminalKeys) -> None:
        from sigil.interfaces.cli.display import DashboardRenderer

        renderer = self._renderer
        pressed = keys.read()
        if not isinstance(renderer, DashboardRenderer):
            return
        for key in pressed:
            if renderer.key(key, self.state, self.phase) == "quit":
                self.stop(EXIT_OK)
                return

    def run_once(self) -> int:
        """``--once`` without an event loop: catch up, show the state, return the code.

        The same steps as :meth:`run` with ``once=True``, on the calling thread:
        a one-shot reader has nothing to overlap, and not importing or starting
        asyncio is a third of ``sigil monitor --once``'s start-up. Ctrl-C shows
        the state so far and returns 130.
        """
        from sigil.interfaces.cli.display import make_renderer

        self.once = True
        self._renderer = make_renderer(
            self.display_mode,
            out=self._stdout or sys.stdout,
            err=self._stderr or sys.stderr,
            options=self._options,
            inline=True,
        )
        self._renderer.select_events(self.selection, json_events=self.json_events)
        code = EXIT_FAILED
        try:
            self._renderer.start(f"watching {self._target()}")
            found = self._probe()
            if found is None:
                self._renderer.error(self._no_log())
            else:
                code = self._catch_up(found)
        except KeyboardInterrupt:
            code = self._finish_interrupted(EXIT_INTERRUPTED)
        except BrokenPipeError:
            code = _quiet_broken_pipe()
        finally:
            with contextlib.suppress(Exception):
                self._renderer.close()
        self.exit_code = code
        return code

    def _target(self) -> str:
        if self.session_id:
            return f"session {self.session_id}"
        return f"the active session ({self.log_path / CURRENT_LINK_NAME})"

    def _no_log(self) -> str:
        what = f"session {self.session_id}" if self.session_id else "an active session"
        return f"sigil monitor: no log for {what} under {self.log_path}"

    async def _run(self) -> int:
        renderer = self._require_renderer()
        opened, self._opened = self._opened, None
        if opened is not None:
            # first_frame caught up and drew it: go on from there.
            session_id, model, state = opened
            if self._stopping:
                _close_model(model)
                return self._finish_interrupted(self._stop_code_or_interrupted())
            code = await self._track(session_id, (model, state))
            if code is not None:
                return code
            self.state = SessionState(
                "", default_budget=self.default_budget, max_events=self.last_n
            )
        else:
            renderer.start(f"watching {self._target()}")
        while True:
            found = await self._locate()
            if found is None:
                return self._finish_interrupted(self._stop_code_or_interrupted())
            if isinstance(found, int):
                return found  # --once with nothing to show
            code = await self._track(found)
            if code is not None:
                return code
            # --follow without --session: current.jsonl now points at another session.
            self.state = SessionState(
                "", default_budget=self.default_budget, max_events=self.last_n
            )

    def _require_renderer(self) -> Renderer:
        assert self._renderer is not None
        return self._renderer

    # -- INITIAL: find the log --------------------------------------------------------------

    async def _locate(self) -> str | int | None:
        """The session to track once its log exists; None if stopped first."""
        import asyncio

        renderer = self._require_renderer()
        self.phase = MonitorPhase.INITIAL
        self._waited = False
        while not self._stopping:
            found = await asyncio.to_thread(self._probe)
            if found is not None:
                return found
            self._waited = True
            if self.once:
                renderer.error(self._no_log())
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
            if (directory / "tokens.json").is_file():
                # The log was deleted, its ledger kept: the finished runs the
                # ledger records are the session's history (as report, diff
                # and sessions count them); a new run's log is followed.
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

    async def _track(
        self, session_id: str, opened: tuple[SessionModel, SessionState] | None = None
    ) -> int | None:
        """Catch up on ``session_id`` and tail it until its run is over.

        One native fold takes the whole session: the catch-up (rotated segments,
        then the live file) and every line the tailer delivers after it.
        Returns the exit code, or None when following ``current.jsonl`` with
        ``--follow`` and the link moved to another session.
        """
        import asyncio

        session_dir = self.log_path / "sessions" / session_id
        if opened is None:
            model, state = await asyncio.to_thread(self._open, session_id)
        else:
            model, state = opened  # caught up and shown by first_frame
        try:
            if opened is None:
                # The events of the past first (--all, --tail, --since), then the
                # state they lead to.
                await asyncio.to_thread(self._replay, state)
                self._show_caught_up(state)
            if self.once:
                return self._once(state)
            return await self._tail(model, state, session_dir)
        finally:
            self._feed = None
            _close_model(model)

    def _catch_up(self, session_id: str) -> int:
        """``--once`` on the calling thread: :meth:`_track` without the tail."""
        model, state = self._open(session_id)
        try:
            self._replay(state)
            self._show_caught_up(state)
            return self._once(state)
        finally:
            _close_model(model)

    def _open(self, session_id: str) -> tuple[SessionModel, SessionState]:
        """Blocking: the session's model and the state of everything it holds now."""
        from sigil.core.paths import rotated_segments
        from sigil.telemetry.log_parser import SessionModel

        model = SessionModel(session_id, self.log_path, last_n=self.last_n)
        try:
            segments = rotated_segments(self.log_path / "sessions" / session_id)
            state = SessionState(
                session_id,
                default_budget=self.default_budget,
                max_events=self.last_n,
                snapshot=model.update(),
            )
            state.rotated_segments = len(segments)
            state.note_reader_stats(model.tailer.stats(), at_catch_up=True)
            self._caught_up_at = model.tailer.checkpoint()
            state.locked = _session_locked(self.log_path / "sessions" / session_id)
            if self._lists_events() and not self.once:
                from sigil.interfaces.cli.event_selection import EventFeed

                self._feed = EventFeed.after_catch_up(
                    session_id,
                    self.log_path,
                    model.tailer,
                    state.snap.lines,
                    state.snap.max_seq,
                    state.events[-1].offset if state.events else None,  # type: ignore[attr-defined]
                )
        except BaseException:
            _close_model(model)
            raise
        return model, state

    def _lists_events(self) -> bool:
        renderer = self._renderer
        return renderer is not None and renderer.lists_events

    def _replay(self, state: SessionState) -> None:
        """Blocking: list the events the catch-up folded that the selection asks
        for (``--all``, ``--tail``, ``--since``), or every one when this monitor
        was started before the session's log existed (it shows the whole run)."""
        self.state = state  # what a Ctrl-C meanwhile summarizes
        selection = self.selection
        if not self._lists_events() or not state.entries:
            return
        from sigil.interfaces.cli.event_selection import EventSelection, history

        if selection is None or not selection.history:
            if not self._waited:
                return
            base = selection or EventSelection()
            selection = EventSelection(
                all=True,
                components=base.components,
                event_types=base.event_types,
                errors=base.errors,
            )
        renderer = self._require_renderer()
        for batch in history(
            state.session_id,
            self.log_path,
            state.snap.lines,
            selection,
            stopping=lambda: self._stopping,
            end=self._caught_up_at,
        ):
            renderer.write_events(batch)

    def _show_caught_up(self, state: SessionState) -> None:
        if self.once and state.status == "running" and not state.locked:
            # --once decides now, from the lock probed with the catch-up: its
            # writer is gone, and no line it prints says "running" (the tail
            # waits out a grace period instead, as a writer may be starting).
            state.incomplete = True
        if self.once:
            # --once has one frame: its token jumps are judged in it (a stat
            # where there is no index; the live modes read it after).
            state.set_jump_history(self._jump_history())
        self.state = state
        self.phase = self._phase_of(state)
        renderer = self._require_renderer()
        renderer.replaying = bool(
            (self.selection is not None and self.selection.history) or self._waited
        )
        renderer.caught_up(state, self.phase)

    @staticmethod
    def _phase_of(state: SessionState) -> MonitorPhase:
        if state.ended:
            return MonitorPhase.FINAL
        if state.status == "running":
            return MonitorPhase.TRACKING
        return MonitorPhase.WAITING

    def _jump_history(self) -> JumpHistory:
        """Blocking: the report index's history for live token jumps, read once
        per monitor (never before the first frame: :meth:`_tail` asks after it)."""
        if self._jumps_from is None:
            from sigil.reports.live import load_jump_history

            self._jumps_from = load_jump_history(self.log_path)
        return self._jumps_from

    def _once(self, state: SessionState) -> int:
        # The lock was probed once, with the catch-up (_open), and the writer
        # declared gone when shown (_show_caught_up): every line printed of this
        # state reads the same answer.
        renderer = self._require_renderer()
        outcome = self._outcome(state)
        # A run still going (or not started) is a snapshot, not a failure.
        ended = outcome in FINAL_STATUSES or outcome in ("incomplete", "incomplete_data")
        code = self._code_for(outcome) if ended else EXIT_OK
        renderer.refresh(state, self.phase, False)
        renderer.finish(state, self.phase, "snapshot" if outcome == "running" else outcome, code)
        return code

    async def _tail(
        self, model: SessionModel, state: SessionState, session_dir: Path
    ) -> int | None:
        import asyncio

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
        # The history of token jumps, after the first frame (it reads the index).
        state.set_jump_history(await asyncio.to_thread(self._jump_history))
        dirty = bool(state.token_jumps)

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
            snapshot = await asyncio.to_thread(_pull, model, timeout, self._feed)
            now = clock()
            if snapshot is not None:
                last_data = now
                lock_free_since = None
                state.note_reader_stats(model.tailer.stats())
                ended_code = self._take(state, snapshot)
                dirty = True
                if ended_code is not None and not self.follow:
                    return ended_code

            if dirty and now >= next_frame:
                renderer.refresh(state, self.phase, True)
                dirty = False
                next_frame = now + self.refresh_rate
                next_tick = now + _IDLE_TICK
            elif now >= next_tick:
                state.note_reader_stats(model.tailer.stats())
                renderer.refresh(state, self.phase, False)
                next_tick = now + _IDLE_TICK

            if now >= next_lock_check:
                next_lock_check = now + max(0.1, self.lock_grace / 2)
                if follow_link and self.phase is not MonitorPhase.TRACKING:
                    moved = await asyncio.to_thread(self._probe)
                    if isinstance(moved, str) and moved != state.session_id:
                        return None
                locked = await asyncio.to_thread(_session_locked, session_dir)
                if locked != state.locked:
                    # A writer came or went: a session written without a run
                    # (no session_start) shows as running only while it is held.
                    state.locked = locked
                    dirty = True
                if self.phase is not MonitorPhase.TRACKING:
                    continue
                if locked:
                    lock_free_since = None
                    continue
                if lock_free_since is None:
                    lock_free_since = now
                if now - lock_free_since < self.lock_grace or now - last_data < self.lock_grace:
                    continue
                # The writer is gone. Whatever it flushed before letting go is on disk:
                # drain it before deciding, so a final event is never missed.
                snapshot = await asyncio.to_thread(_pull, model, 0.0, self._feed)
                if snapshot is not None:
                    state.note_reader_stats(model.tailer.stats())
                    ended_code = self._take(state, snapshot)
                    if ended_code is not None and not self.follow:
                        return ended_code
                    if state.ended:
                        continue
                else:
                    # Nothing new, but the model knows whether the file now ends in
                    # a line no writer will complete (a torn tail).
                    state.update(await asyncio.to_thread(model.fold.snapshot))
                state.note_reader_stats(model.tailer.stats())
                state.incomplete = True
                code = self._end_run(state)
                if not self.follow:
                    return code
                lock_free_since = None
        return self._finish_interrupted(self._stop_code_or_interrupted())

    def _take(self, state: SessionState, snapshot: SessionSnapshot) -> int | None:
        """Show a new snapshot; at a run's final event, show its summary.

        Returns the exit code when a run ended. When the lines folded at once
        hold a run's end and the next run's start, the ended run's outcome
        decides the exit code (without ``--follow`` this monitor was watching it).
        """
        renderer = self._require_renderer()
        runs_before, ended_before = state.runs, state.ended_key
        fresh = state.update(snapshot)
        if self._feed is not None:
            # Every event folded since, read by the feed: a burst larger than
            # the model's recent ring is listed whole.
            fresh = list[EntryLike](self._feed.take(state.snap.lines))
            state.unlisted = 0
        ended_now = state.ended_key != ended_before
        started = state.runs > runs_before
        if started and ended_now and state.status == "running":
            # The tracked run ended first, then a new one started.
            renderer.on_events(state, fresh)
            ended = state.last_ended_run
            code = self._end_run(state, None if ended is None else ended.status)
            if not self.follow:
                return code
            self.phase = MonitorPhase.TRACKING
            return code
        if started or (state.status == "running" and self.phase is not MonitorPhase.TRACKING):
            # A new run, or `sigil orchestrate --resume` continuing the same run
            # (it writes no session_start): the writer is back.
            self.phase = MonitorPhase.TRACKING
            state.incomplete = False
        renderer.on_events(state, fresh)
        if ended_now and state.ended:
            return self._end_run(state)
        return None

    def _end_run(self, state: SessionState, status: str | None = None) -> int:
        """FINAL: show the summary of the run that just ended; back to WAITING with --follow.

        ``status`` is the ended run's, when the model's latest run is a newer one.
        """
        renderer = self._require_renderer()
        self.phase = MonitorPhase.FINAL
        outcome = self._outcome(state, status)
        code = self._code_for(outcome)
        renderer.finish(state, self.phase, outcome, code)
        if self.follow:
            self.phase = MonitorPhase.WAITING
            renderer.waiting(state, self.phase, "waiting for the next run (--follow)")
        return code

    @staticmethod
    def _outcome(state: SessionState, status: str | None = None) -> str:
        """The run's final status, unless the reader knows better.

        A run that says ``complete`` while events are missing (a seq gap that no
        segment fills, or events the writer dropped on a full disk) is
        ``incomplete_data``: its totals are a lower bound, never "complete".
        """
        if status is None and state.ended:
            status = state.status
        if status is not None:
            if status == "complete" and (state.seq_missing or state.dropped_events):
                return "incomplete_data"
            return status
        if state.incomplete:
            return "incomplete"
        return state.display_status

    @staticmethod
    def _code_for(outcome: str) -> int:
        if outcome == "complete":
            return EXIT_OK
        if outcome == "budget_exceeded":
            return EXIT_BUDGET
        if outcome == "interrupted":
            return EXIT_INTERRUPTED  # the run was stopped by a signal (the shell's 130)
        return EXIT_FAILED

    def _stop_code_or_interrupted(self) -> int:
        """The code :meth:`stop` was given (0 for the ``q`` key), else 130."""
        return EXIT_INTERRUPTED if self._stop_code is None else self._stop_code

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
        from sigil.core.file_security import write_private_atomic

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


def _quiet_broken_pipe() -> int:
    """The reader went away (``sigil monitor | head``): exit 0 without a word.

    stdout is pointed at /dev/null so that the interpreter's last flush does
    not complain about the closed pipe either.
    """
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_OK


def _pull(
    model: SessionModel, timeout: float, feed: EventFeed | None = None
) -> SessionSnapshot | None:
    """Blocking (worker thread): fold what is new now, or after waiting up to
    ``timeout``, into the session's one native fold; its snapshot, or None when
    no line arrived.

    ``wait`` releases the GIL and wakes on inotify, so an event reaches the
    screen without waiting out the timeout.
    """
    tailer, fold = model.tailer, model.fold
    folded = tailer.fold_into(fold)
    if not folded and timeout > 0 and tailer.wait(timeout):
        folded = tailer.fold_into(fold)
    if feed is not None:
        # At once, folded or not (a truncation folds nothing): both tailers
        # see the file in the same state.
        feed.poll()
    return fold.snapshot() if folded else None
