"""The pipeline orchestrator (spec 4.1): runs the steps of a task under a token budget.

``Orchestrator(session_id, token_budget, log_path)`` and ``await execute(task, context)``
work as in the spec's 4.1.2 and Appendix D. Around the spec's sample code this
module keeps the contracts of ARCHITECTURE.md:

* **Tokens are logged once** (contract 2). A successful step's tokens are carried
  by its ``step_complete`` event; tokens spent by an attempt that then failed
  (a model answered, the answer was unusable) by a ``token_consumption`` event
  logged before the ``retry_attempt``/``step_error``. Every other event has
  ``tokens=0``. Both go through :meth:`TokenTracker.track`, so the tracker's total,
  ``PipelineResult.total_tokens``, ``tokens.json``'s ``total_used`` and the sum of
  ``tokens`` over the log are the same number in every outcome.
* **A session is a sequence of runs** (contract 11). A new ``execute`` on a session
  whose last run ended starts run N+1 in the same log; what earlier runs used stays
  used against the session budget, so ``total_tokens`` is the session's total and
  ``run_tokens`` this run's share.
* **The lock** (contract 7) is held from before the first write to after the last.
* **Resume** (spec 8.3.3): ``resume=True`` continues a run whose writer died. The
  log is read back, steps whose ``step_complete`` carries their output are not run
  again, ``seq`` continues (the logger does that) and the dead run's tokens stay
  counted -- they are in the log, and the log is the ledger.
* **The budget is hard between steps**: once it has run out (see
  :mod:`sigil.telemetry.tokens`) the step in flight completes, the next one does not
  start, and the run ends with status ``budget_exceeded`` (spec 9.3).
* **Every step goes through** :class:`~sigil.core.error_handling.ErrorHandler`:
  transient errors are retried with backoff, a failed optional step (memory,
  contracts, validation) is skipped, a failed required step or a config/system
  error ends the run with status ``error``.
* At the end of every run, whatever its outcome, ``tokens.json``, ``metrics.json``
  and (when there were errors) ``errors.jsonl`` are written atomically, 0600.

No blocking file I/O runs on the event loop: the lock, the log read-back, the
memory store and the summary files all go through ``asyncio.to_thread``; logging
itself only queues bytes for the native writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sigil.core.error_handling import ErrorContext, ErrorHandler, HandledError
from sigil.core.file_security import write_private_atomic
from sigil.core.locks import SessionLock
from sigil.core.paths import (
    LOG_FILE_NAME,
    resolve_log_path,
    rotated_segments,
    sigil_home,
    validate_session_id,
)
from sigil.pipeline.base import (
    CONTEXT_KEYS,
    STEP_ORDER,
    Step,
    StepConfigError,
    StepContext,
    StepOutput,
    is_required,
    load_step,
    usage_of,
)
from sigil.telemetry.execution_logger import ExecutionLogger
from sigil.telemetry.pricing import COST_KEY, Pricer, usd
from sigil.telemetry.tokens import TokenTracker

if TYPE_CHECKING:  # pragma: no cover
    from sigil.core.config import Settings
    from sigil.pipeline.providers import ChatProvider
    from sigil.telemetry.log_parser import (
        FedEvent,
        HistoryModel,
        HistorySnapshot,
        RunSnapshot,
        SessionSnapshot,
    )


class _SessionLogger(ExecutionLogger):
    """The run's logger: ``seq`` continues after the session's ledger too.

    The logger recovers the next ``seq`` from the log's tail; when an external
    rotator has deleted or compressed the segments holding it, the ledger
    (``tokens.json``'s ``last_seq``) still knows it, and ``seq`` must never go
    back (contract 1).
    """

    min_next_seq = 0

    def _recover_next_seq(self) -> int:
        return max(super()._recover_next_seq(), self.min_next_seq)


__all__ = [
    "BudgetConfigError",
    "BudgetExhaustedError",
    "Orchestrator",
    "OrchestratorError",
    "PipelineError",
    "PipelineResult",
    "PipelineStep",
    "ResumeError",
    "RunRecord",
    "StepResult",
    "read_session_history",
]

#: Largest step output (compact JSON) kept on its ``step_complete`` event for resume.
MAX_LOGGED_OUTPUT = 32 * 1024
#: ``tokens.json``'s ``ledger_version``: the file is the session's durable ledger.
LEDGER_VERSION = 1
ORCHESTRATOR = "orchestrator"
_FINAL_EVENTS = ("session_complete", "session_error")
#: Run statuses ``--resume`` continues: the writer died, or the run was interrupted.
_RESUMABLE = ("running", "interrupted")


class PipelineStep(StrEnum):
    """Pipeline execution steps."""

    ROUTING = "routing"
    MEMORY = "memory"
    PLANNING = "planning"
    REASONING = "reasoning"
    CONTRACTS = "contracts"
    VALIDATION = "validation"


class OrchestratorError(Exception):
    """Base of the orchestrator's own errors."""


class ResumeError(OrchestratorError, ValueError):
    """``--resume`` on a session that has no interrupted run (a usage error)."""


class BudgetConfigError(OrchestratorError, ValueError):
    """Configured allocations exceed the session's budget (a usage error)."""


def allocations_origin(settings: Settings) -> str:
    """Where ``token_budget.allocations`` was set, for error messages."""
    source = settings.source("token_budget.allocations")
    return str(settings.config_path) if source == "config" else "command line"


class PipelineError(OrchestratorError):
    """A run ended with status ``error`` (raised by :meth:`PipelineResult.raise_for_status`)."""


class BudgetExhaustedError(OrchestratorError):
    """A run ended because the token budget ran out."""


@dataclass
class StepResult:
    """Result from a single pipeline step.

    ``tokens_used`` is everything the step consumed in this run, failed attempts
    included; ``metadata`` has ``attempts``, ``input_tokens``, ``output_tokens``,
    ``model`` and, for a step recovered by ``--resume``, ``resumed: True``.
    """

    step: PipelineStep | str
    success: bool
    tokens_used: int
    latency_ms: float
    output: Any
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["step"] = str(self.step)
        return data


@dataclass
class PipelineResult:
    """Complete pipeline execution result.

    ``total_tokens`` is the *session's* consumption (all runs, including a run that
    died and was resumed): it equals the sum of ``tokens`` over the session's log
    and ``tokens.json``'s ``total_used``. ``run_tokens`` is this run's share.
    """

    session_id: str
    task: str
    success: bool
    steps: list[StepResult]
    total_tokens: int
    total_latency_ms: float
    final_output: Any
    quality_score: float | None = None
    recommended_action: str | None = None
    status: str = "complete"
    run: int = 1
    run_tokens: int = 0
    budget: int = 0
    error: str | None = None
    resumed: bool = False
    log_file: str | None = None
    #: events of the session that neither its log nor its ledger hold any more
    #: (a hole in ``seq``): ``total_tokens`` is then a lower bound
    missing_events: int = 0
    #: tokens this run spent that its log could not record (a full or failing
    #: disk, even after the session's reserve was freed for it): not in
    #: ``total_tokens``, which is what the log and every view say; recorded in
    #: the reserve, and logged by the session's next run once there is room
    unrecorded_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["steps"] = [s.to_dict() for s in self.steps]
        return data

    def raise_for_status(self) -> PipelineResult:
        """Raise :class:`BudgetExhaustedError` or :class:`PipelineError` unless complete."""
        if self.status == "budget_exceeded":
            raise BudgetExhaustedError(self.error or "token budget exhausted")
        if self.status != "complete":
            raise PipelineError(self.error or "pipeline failed")
        return self


# -- the session's history, read from the session model ----------------------------


@dataclass
class RunRecord:
    """One run of a session (contract 11's per-run breakdown), as the native
    session model folded it from the log (:meth:`from_snapshot`) or, for a run
    whose events an external rotator took away, as the ledger recorded it
    (``source == "ledger"``). Nothing here adds tokens up (contract 12)."""

    run: int
    status: str = "running"
    started_at: str | None = None
    ended_at: str | None = None
    last_at: str | None = None
    task: str | None = None
    budget: int | None = None
    tokens_used: int = 0
    #: the run's ``session_start`` allocations (for summaries rebuilt from the log)
    allocations: dict[str, int] | None = None
    #: seq range and number of the run's events (the ledger's)
    first_seq: int | None = None
    last_seq: int | None = None
    events: int = 0
    steps_completed: int = 0
    steps_failed: int = 0
    #: the run's cost (the model's: nano-dollars of priced events, and tokens of
    #: models without a price)
    cost_nanousd: int = 0
    priced_events: int = 0
    unpriced_tokens: int = 0
    #: name -> tokens, operations, errors, retries, latency_ms, cost (the model's values)
    components: dict[str, dict[str, float]] = field(default_factory=dict)
    #: component -> model -> tokens, calls, errors, cost... (``ModelSnapshot.to_dict``)
    models: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    duration_seconds: float = 0.0
    #: slot -> what its step_complete recorded (for resume)
    completed: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: step_error / retry_attempt events, as errors.jsonl records (for resume)
    error_events: list[dict[str, Any]] = field(default_factory=list)

    #: ``log`` (the model folded it from the log) or ``ledger`` (only tokens.json knows it)
    source: str = "log"

    @classmethod
    def from_snapshot(cls, snap: RunSnapshot) -> RunRecord:
        """A run of the session's history, from the log's model or the ledger."""
        meta = snap.start_metadata
        allocations = meta.get("allocations")
        return cls(
            run=snap.number,
            status=snap.status,
            started_at=snap.started_at,
            ended_at=snap.ended_at,
            last_at=snap.last_at,
            task=_text_or(meta.get("task"), None),
            budget=snap.budget,
            tokens_used=snap.tokens,
            allocations=(
                {str(k): v for k, v in allocations.items() if _is_count(v) or v == 0}
                if isinstance(allocations, dict)
                else None
            ),
            first_seq=snap.first_seq,
            last_seq=snap.last_seq,
            events=snap.events,
            steps_completed=snap.steps_completed,
            steps_failed=snap.steps_failed,
            cost_nanousd=snap.cost_nanousd,
            priced_events=snap.priced_events,
            unpriced_tokens=snap.unpriced_tokens,
            components={
                name: {
                    "tokens": c.tokens,
                    "operations": c.operations,
                    "errors": c.errors,
                    "retries": c.retries,
                    "latency_ms": c.latency_ms,
                    "failed_latency_ms": c.failed_latency_ms,
                    "cost_nanousd": c.cost_nanousd,
                    "priced_events": c.priced_events,
                    "unpriced_tokens": c.unpriced_tokens,
                    "unknown_usage_calls": c.unknown_usage_calls,
                    "tokens_held": c.tokens_held,
                }
                for name, c in snap.components.items()
            },
            models=_component_models(snap.component_models),
            duration_seconds=snap.duration_seconds or 0.0,
            source=snap.source,
        )

    def tokens_dict(self) -> dict[str, Any]:
        """The run's entry in ``tokens.json``: its totals and what the ledger needs
        to stand in for the run's events once the log has lost them."""
        return {
            "run": self.run,
            "status": self.status,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "budget": self.budget,
            "tokens_used": self.tokens_used,
            **_cost_doc(self.cost_nanousd, self.priced_events, self.unpriced_tokens),
            "components": {
                name: int(c["tokens"]) for name, c in self.components.items() if c["tokens"]
            },
            "task": self.task,
            "allocations": self.allocations,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "events": self.events,
            "steps_completed": self.steps_completed,
            "steps_failed": self.steps_failed,
            "duration_seconds": round(self.duration_seconds, 3),
            "component_stats": {
                name: {k: round(v, 3) if "latency" in k else int(v) for k, v in c.items()}
                for name, c in self.components.items()
            },
            # Per model (issue 13): what the ledger stands in with once the
            # run's events left the log.
            "model_stats": self.models,
        }

    def metrics_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "status": self.status,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_seconds": round(self.duration_seconds, 3),
            "steps_completed": self.steps_completed,
            "steps_failed": self.steps_failed,
            "tokens_used": self.tokens_used,
            "components": {
                name: {
                    "latency_ms": round(c["latency_ms"], 3),
                    "failed_latency_ms": round(c.get("failed_latency_ms", 0.0), 3),
                    "operations": int(c["operations"]),
                    "errors": int(c["errors"]),
                    "retries": int(c["retries"]),
                }
                for name, c in self.components.items()
                if name != ORCHESTRATOR
            },
        }


_ERROR_KEYS = (
    "error",
    "error_type",
    "category",
    "severity",
    "operation",
    "retry_count",
    "max_retries",
    "should_retry",
    "suggestion",
    "attempt",
    "latency_ms",
)

#: Events of the last run kept from the fold for ``--resume`` (a run has a few
#: dozen); a longer run is folded again with room for all of its events.
_RESUME_EVENTS = 512


@dataclass
class SessionHistory:
    """Everything earlier runs left, as the native history read it (the model
    of the log joined with the runs only the ledger still knows): every number
    here is the native one (contract 12), copied, never added up."""

    runs: list[RunRecord] = field(default_factory=list)
    tokens_used: int = 0
    #: tokens of the budget held for calls of unknown usage (the proxy's), all runs
    tokens_held: int = 0
    malformed: int = 0
    #: tokens logged outside any run the model or the ledger knows
    orphan_tokens: int = 0
    #: the highest seq of the session, from the log or the ledger (None: no event yet)
    last_seq: int | None = None
    #: events counted (the ledger's, then the log's after it)
    events: int = 0
    #: events the ledger and the log both lack (a hole in ``seq``): totals are a lower bound
    missing_events: int = 0
    #: the ledger's ``last_seq`` (None without a usable ledger)
    ledger_seq: int | None = None
    #: why tokens.json was not usable as a ledger (None when it was, or is absent)
    ledger_problem: str | None = None
    #: the native session model of what the log still holds (None: the ledger
    #: alone was the history, the log being as it last saw it)
    snapshot: SessionSnapshot | None = None
    #: the native history these fields come from
    model: HistorySnapshot | None = None
    #: the fold behind it, which the run's own events continue at its end
    source: HistoryModel | None = None

    @classmethod
    def of(cls, model: HistorySnapshot, source: HistoryModel | None = None) -> SessionHistory:
        return cls(
            runs=[RunRecord.from_snapshot(r) for r in model.runs],
            tokens_used=model.tokens,
            tokens_held=model.tokens_held,
            malformed=model.malformed,
            orphan_tokens=model.orphan_tokens,
            last_seq=model.last_seq,
            events=model.events,
            missing_events=model.missing_events,
            ledger_seq=model.ledger_seq,
            ledger_problem=model.ledger_problem,
            snapshot=model.snapshot,
            model=model,
            source=source,
        )

    @property
    def ledger_only(self) -> list[RunRecord]:
        """Runs that only the ledger knows (their events left the log)."""
        return [r for r in self.runs if r.source == "ledger"]

    @property
    def summaries_stale(self) -> bool:
        """True when tokens.json does not cover every event of the log (a writer
        died between its final event and tokens.json, or tokens.json is gone)."""
        if self.last_seq is None:
            return False
        return self.ledger_seq is None or self.ledger_seq < self.last_seq

    @property
    def open_run(self) -> RunRecord | None:
        """The last run, if it never logged a final event (its writer died)."""
        if self.runs and self.runs[-1].status == "running":
            return self.runs[-1]
        return None

    @property
    def resumable_run(self) -> RunRecord | None:
        """The last run, if ``--resume`` can continue it: its writer died, or it
        was interrupted (Ctrl-C, SIGTERM) and recorded so."""
        if self.runs and self.runs[-1].status in _RESUMABLE:
            return self.runs[-1]
        return None

    def component_totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """Tokens and operations per component over the whole session: the
        model's, with the ledger's for runs the log no longer holds (joined
        natively)."""
        if self.model is None:
            return {}, {}
        return self.model.component_tokens(), self.model.component_operations()


def read_session_history(session_dir: Path, *, use_ledger: bool = True) -> SessionHistory:
    """The session's history: the native session model of its log (rotated
    segments, logrotate's names and ``.gz`` included, then the live file),
    joined natively with its ledger (``tokens.json``; see rust/ledger.rs).

    Every run whose ``session_start`` the log still holds is taken from the
    model; runs whose events an external rotator renamed away, compressed or
    deleted keep the totals the ledger recorded for them. So the run number
    and ``seq`` continue and nothing is counted twice. A hole in ``seq`` that
    neither fills is counted in ``missing_events``. When the log is exactly as
    the ledger last saw it, the ledger alone is the history (no fold of a log
    that may hold millions of events). Blocking: run it in a thread.
    """
    from sigil.telemetry.log_parser import HistoryModel

    # The caller holds the session's lock: the last run's writer is gone.
    source = HistoryModel(
        session_dir, last_n=_RESUME_EVENTS, use_ledger=use_ledger, writer_gone=True
    )
    model = source.read()
    log_runs = [r for r in model.runs if r.source == "log"]
    if log_runs and log_runs[-1].status in _RESUMABLE and log_runs[-1].events > _RESUME_EVENTS:
        # A run --resume may continue, longer than the events kept: fold again
        # with room for all of its events (a finished run's are never read back).
        source = HistoryModel(
            session_dir, last_n=log_runs[-1].events + 1, use_ledger=use_ledger, writer_gone=True
        )
        model = source.read()
    history = SessionHistory.of(model, source)
    from_log = [r for r in history.runs if r.source == "log"]
    if from_log and history.snapshot is not None:
        _read_back_last_run(from_log[-1], history.snapshot)
    return history


def _log_files(session_dir: Path) -> list[dict[str, Any]]:
    """Name, size and mtime of each file of the session's log, oldest first:
    what the ledger records to know, later, that the log has not changed."""
    from sigil.telemetry.log_parser import log_files

    return [
        {"name": name, "size": size, "mtime_ns": mtime_ns}
        for name, size, mtime_ns in log_files(session_dir)
    ]


def _read_back_last_run(record: RunRecord, snap: SessionSnapshot) -> None:
    """What ``--resume`` needs of the last run: completed steps' outputs and its
    error records, from the model's last events."""
    entries = snap.last_entries
    start = 0
    for i in range(len(entries) - 1, -1, -1):
        if entries[i].event_type == "session_start":
            start = i
            break
    for entry in entries[start:]:
        event_type, component = entry.event_type, entry.component
        if event_type not in ("step_complete", "step_error", "retry_attempt"):
            continue
        metadata = entry.metadata if isinstance(entry.metadata, dict) else {}
        if event_type == "step_complete":
            record.completed[component] = _completed_entry(entry.tokens, metadata)
            continue
        if event_type == "step_error":
            record.completed.pop(component, None)
        if component != ORCHESTRATOR:
            record.error_events.append(
                {
                    "timestamp": entry.timestamp,
                    "run": record.run,
                    "component": component,
                    "event_type": event_type,
                    "message": entry.message,
                    **{k: metadata.get(k) for k in _ERROR_KEYS if k in metadata},
                    "recovered_from_log": True,
                }
            )


# -- the orchestrator ------------------------------------------------------------------


def _kill_after_event() -> int | None:
    """``SIGIL_TEST_KILL_AFTER_EVENT=N``: SIGKILL this process right after its Nth
    event is written and flushed. For the crash tests only, which walk every
    event boundary of a run with a real kill -9 (a step cannot reach the
    boundaries between the orchestrator's own events)."""
    text = os.environ.get("SIGIL_TEST_KILL_AFTER_EVENT")
    return int(text) if text and text.isdigit() else None


class _RecordingLogger:
    """Forwards events to the real logger, keeping the seq of the last one and the
    first report of dropped events.

    The tracker, the error handler and the orchestrator all log through it. It
    adds nothing up: the summaries are built from the session model of the log
    once the run has closed it (contract 12). It keeps the run's events as it
    logged them (:attr:`written`): the session model continues with them when
    the log can no longer give them back (an external rotator deleted the file
    they went to, a full disk refused them).
    """

    def __init__(self, logger: ExecutionLogger) -> None:
        self._logger = logger
        #: seq of the last event this run wrote (the ledger's ``last_seq``)
        self.last_seq: int | None = None
        #: events this process wrote
        self.events = 0
        #: the logger's first report of dropped events (a full or failing disk)
        self.dropped: OSError | None = None
        #: the run's events as logged, oldest first (None past _KEPT_EVENTS)
        self.written: list[_Logged] | None = []
        self._kill_after = _kill_after_event()

    def _keep(
        self,
        stamp: str,
        event_type: str,
        component: str,
        message: str,
        tokens: int,
        metadata: dict[str, Any] | None,
        seq: int,
    ) -> None:
        written = self.written
        if written is None:
            return
        if len(written) >= _KEPT_EVENTS:
            self.written = None  # a run this long: the end reads the log anew
            return
        meta = dict(metadata) if metadata else None
        written.append(_Logged(stamp, event_type, component, message, tokens, meta, seq))

    def _after(self, seq: int) -> None:
        self.last_seq = seq
        self.events += 1
        if self.events == self._kill_after:
            # Test hook (see _kill_after_event): a real kill -9 at an exact boundary.
            self._logger.flush_sync()
            os.kill(os.getpid(), signal.SIGKILL)

    def _accepted_despite(self, exc: OSError) -> int:
        """The logger's report that earlier events were dropped on a failing disk
        (``EventsDroppedError``): this event was accepted all the same, with the
        ``seq`` the error carries, and must not be logged again. The drop is
        kept; the run starts no further step. Any other error propagates."""
        seq = getattr(exc, "seq", None)
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise exc
        self.dropped = self.dropped or exc
        return seq

    async def log_event(
        self,
        event_type: str,
        component: str,
        message: str,
        tokens: int = 0,
        metadata: dict[str, Any] | None = None,
    ) -> int:
        stamp = _now()
        try:
            seq = await self._logger.log_event(event_type, component, message, tokens, metadata)
        except OSError as exc:
            seq = self._accepted_despite(exc)
        self._keep(stamp, event_type, component, message, tokens, metadata, seq)
        self._after(seq)
        return seq

    def log_event_sync(
        self,
        event_type: str,
        component: str,
        message: str,
        tokens: int = 0,
        metadata: dict[str, Any] | None = None,
    ) -> int:
        stamp = _now()
        try:
            seq = self._logger.log_event_sync(event_type, component, message, tokens, metadata)
        except OSError as exc:
            seq = self._accepted_despite(exc)
        self._keep(stamp, event_type, component, message, tokens, metadata, seq)
        self._after(seq)
        return seq

    def fed_events(self, sanitizer: Any) -> list[FedEvent] | None:
        """The run's events as the session model is fed them (``Fold.feed_event``'s
        arguments), scrubbed as the log's lines are; None when not all were kept."""
        from sigil.telemetry.execution_logger import dumps

        if self.written is None:
            return None
        out: list[FedEvent] = []
        for e in self.written:
            message, meta = e.message, e.metadata or {}
            if sanitizer is not None:
                message = sanitizer.sanitize_string(message)
                meta = sanitizer.sanitize_dict(dict(meta)) if meta else meta
            try:
                meta_json = dumps(meta).decode() if meta else "{}"
            except (TypeError, ValueError):
                meta_json = "{}"
            out.append(
                (e.timestamp, e.event_type, e.component, e.tokens, e.seq, meta_json, message)
            )
        return out


#: The most events of a run its end keeps in memory (a pipeline run has a few
#: dozen; a longer one is read back from the log).
_KEPT_EVENTS = 10_000


@dataclass(slots=True)
class _Logged:
    """One event of the run, as :class:`_RecordingLogger` logged it."""

    timestamp: str
    event_type: str
    component: str
    message: str
    tokens: int
    metadata: dict[str, Any] | None
    seq: int


def _now() -> str:
    """The timestamp as the writer writes it (microseconds, ``+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass
class _Prepared:
    history: SessionHistory
    run: RunRecord
    task: str
    budget: int
    resumed: bool
    #: error events the dead process logged in the run being resumed (for errors.jsonl)
    dead_errors: list[dict[str, Any]] = field(default_factory=list)
    #: the fold of the log at rest, done in a thread while the run goes on when
    #: the ledger spared it at the start (its end continues it, see _history_at_end)
    resting: asyncio.Future[None] | None = None
    #: what the run logged through (its events, kept for its end)
    log: _RecordingLogger | None = None


class Orchestrator:
    """
    Main pipeline orchestrator for Sigil v2 CLI execution.

    Responsibilities:
    - Coordinate pipeline step execution
    - Manage token budgets across steps (and across the runs of a session)
    - Log all operations for monitoring
    - Handle errors with graceful degradation

    Attributes:
        session_id: Unique identifier for this execution session
        token_budget: Total token budget of the session
        execution_logger: Logger for monitor observation
        token_tracker: Tracks token consumption
        steps: the pipeline's components by slot, in order
    """

    def __init__(
        self,
        session_id: str,
        token_budget: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        *,
        components: Mapping[str, Step] | None = None,
        provider: ChatProvider | str | None = None,
        settings: Settings | None = None,
        resume: bool = False,
        error_handler: ErrorHandler | None = None,
        home: str | os.PathLike[str] | None = None,
        export_otlp: bool = False,
    ) -> None:
        """
        Initialize the orchestrator.

        Args:
            session_id: Unique session identifier (``^[A-Za-z0-9_-]{1,64}$``).
            token_budget: Session budget; default: the session's recorded budget if it
                has one, else ``token_budget.default_total`` (256K).
            log_path: Log directory (default ``logging.path``, i.e. ~/.sigil/logs).
            components: steps to use instead of the built-in ones, by slot
                (``routing``, ``memory``, ``planning``, ``reasoning``, ``contracts``,
                ``validation``); config's ``pipeline.steps`` can do the same.
            provider: ``"offline"``, ``"openai"`` or a provider object; default from
                settings (``provider.name``).
            settings: effective settings; loaded from config/env when omitted
                (this reads ``config.yaml`` once, synchronously).
            resume: continue the session's interrupted run instead of starting one.
            error_handler: replaces the handler built from ``settings.errors``.
            home: where ``memory.db`` lives (default: the sigil home).
            export_otlp: also send the run's spans over OTLP while it runs (to
                ``export.otlp_endpoint``, else ``http://localhost:4318``); without
                this flag spans are sent only when an endpoint is configured
                (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``config.yaml``).
        """
        self.session_id = validate_session_id(session_id)
        if token_budget is not None and (
            isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1
        ):
            raise ValueError(f"token budget must be a positive integer, got {token_budget!r}")
        if settings is None:
            from sigil.core.config import load_settings

            settings = load_settings()
        self.settings = settings
        self._budget_explicit = token_budget is not None
        self.token_budget: int = (
            token_budget if token_budget is not None else settings.token_budget.default_total
        )
        self.log_path = resolve_log_path(log_path or settings.logging.path)
        self.session_dir = self.log_path / "sessions" / self.session_id
        self.home = Path(home) if home is not None else sigil_home()
        self.resume = resume
        self.provider = self._make_provider(provider)
        self.steps: dict[str, Step] = self._make_steps(components)
        #: prices each model call's event (``cost_usd``): config's overrides, then the table
        self.pricer = Pricer.from_settings(settings)

        from sigil.telemetry.sanitization import sanitizer_from_settings

        sanitizer = sanitizer_from_settings(settings)
        #: scrubs the task at input and every record of the summary files (issue 11 item 9)
        self._sanitizer = sanitizer
        # One lock per session and process (contract 7): taken here before the
        # history is read, handed to the logger, released when the run ends.
        self._lock = SessionLock(self.session_dir)
        self.execution_logger: ExecutionLogger = _SessionLogger(
            session_id=self.session_id,
            log_path=self.log_path,
            buffer_size=settings.logging.buffer_size_bytes,
            flush_interval=settings.logging.flush_interval_seconds,
            fsync=settings.logging.fsync,
            sanitizer=sanitizer if sanitizer is not None else False,
            lock=self._lock,
        )
        #: tokens earlier runs hold for calls of unknown usage (set by a run)
        self._held_before = 0
        self.token_tracker = TokenTracker.from_settings(
            settings, total_budget=self.token_budget, logger=self.execution_logger
        )
        self.error_handler = error_handler or ErrorHandler.from_settings(settings)
        self._executed = False
        #: set when a new run starts on a session whose previous run never ended
        self.abandoned_run: int | None = None
        #: set when a new run starts on a session whose previous run was interrupted
        self.interrupted_run: int | None = None
        #: events of the session lost from both its log and its ledger (see read_session_history)
        self.missing_events = 0
        #: set when the log or the summaries could not be written (a full disk): the
        #: run stopped before its next step; the CLI exits 1 saying so
        self.recording_error: OSError | None = None
        #: the run this orchestrator executes (known once the session is locked)
        self.run_number: int | None = None
        self.export_otlp = export_otlp
        #: what live OTLP export sent (None when it was off); see ``LiveExportReport``
        self.otlp_report: Any = None
        self._exporter: Any = None

    # -- spec 4.1.2's injectable component attributes ------------------------------

    @property
    def router(self) -> Step:
        return self.steps["routing"]

    @router.setter
    def router(self, step: Step) -> None:
        self.steps["routing"] = step

    @property
    def memory_manager(self) -> Step:
        return self.steps["memory"]

    @memory_manager.setter
    def memory_manager(self, step: Step) -> None:
        self.steps["memory"] = step

    @property
    def planner(self) -> Step:
        return self.steps["planning"]

    @planner.setter
    def planner(self, step: Step) -> None:
        self.steps["planning"] = step

    @property
    def reasoning_manager(self) -> Step:
        return self.steps["reasoning"]

    @reasoning_manager.setter
    def reasoning_manager(self, step: Step) -> None:
        self.steps["reasoning"] = step

    @property
    def contract_executor(self) -> Step:
        return self.steps["contracts"]

    @contract_executor.setter
    def contract_executor(self, step: Step) -> None:
        self.steps["contracts"] = step

    @property
    def sanitizer(self) -> Any:
        """The run's :class:`~sigil.telemetry.sanitization.LogSanitizer` (None when
        sanitization is off): what the CLI prints goes through it too."""
        return self._sanitizer

    @property
    def log_file(self) -> Path:
        return self.session_dir / LOG_FILE_NAME

    @property
    def provider_name(self) -> str:
        return "offline" if self.provider is None else str(getattr(self.provider, "name", "custom"))

    # -- construction helpers ----------------------------------------------------------

    def _make_provider(self, provider: ChatProvider | str | None) -> ChatProvider | None:
        name = self.settings.provider.name if provider is None else provider
        if not isinstance(name, str):
            return name
        if name == "offline":
            return None
        if name == "openai":
            from sigil.pipeline.providers import OpenAIChatProvider

            return OpenAIChatProvider.from_settings(self.settings)
        raise ValueError(f"unknown provider {name!r}: use 'offline' or 'openai'")

    def _make_steps(self, components: Mapping[str, Step] | None) -> dict[str, Step]:
        from sigil.pipeline.offline import default_steps

        steps = default_steps()
        for slot, path in _configured_steps(self.settings).items():
            if slot not in steps:
                raise StepConfigError(
                    f"pipeline.steps: unknown step {slot!r}; use one of {', '.join(STEP_ORDER)}"
                )
            steps[slot] = load_step(path, slot)
        for slot, step in (components or {}).items():
            if slot not in steps:
                raise ValueError(f"unknown pipeline step {slot!r}; use one of {STEP_ORDER}")
            if not callable(getattr(step, "run", None)):
                raise TypeError(f"component for {slot!r} has no run(ctx) method")
            steps[slot] = step
        return steps

    # -- execution ---------------------------------------------------------------------------

    async def execute(
        self,
        task: str | None = None,
        context: dict[str, Any] | None = None,
        *,
        on_ready: Callable[[Orchestrator], None] | None = None,
        keep_exporting: bool = False,
    ) -> PipelineResult:
        """
        Execute the full pipeline for a task.

        Args:
            task: The user's task description (optional with ``resume=True``: the
                interrupted run's task is read from the log).
            context: Optional context dictionary, visible to every step.
            on_ready: called once the session is locked and the run accepted, just
                before its first event (the CLI prints the session ID there, so
                nothing is printed for a run that is refused).
            keep_exporting: return as soon as the run ends and leave live OTLP
                export sending in the background; call :meth:`finish_export`
                later (the CLI prints the result first, so a slow or absent
                collector never holds it back).

        Returns:
            PipelineResult with execution details. A failed step or an exhausted
            budget is reported in the result (``status``/``success``); call
            :meth:`PipelineResult.raise_for_status` to turn it into an exception.

        Raises:
            SessionBusy: another process is running this session.
            ResumeError: ``resume=True`` but there is no interrupted run.
            ValueError: an empty task.
        """
        if self._executed:
            raise OrchestratorError("an Orchestrator runs once; create a new one for a new run")
        if task is not None and (not isinstance(task, str) or not task.strip()):
            raise ValueError("task must be a non-empty string")
        if task is None and not self.resume:
            raise ValueError("task must be a non-empty string")
        if task is not None and self._sanitizer is not None:
            # Once, before any step sees it: a step that splits the task into words
            # (the memory step's query terms) would cut a secret from its context.
            task = self._sanitizer.sanitize_string(task)
        self._executed = True
        try:
            # Cancelling the await would leave the thread taking the lock and
            # opening the log behind our back: let it finish, then give it all back.
            prepared = await _to_the_end(asyncio.to_thread(self._prepare, task))
        except asyncio.CancelledError:
            await asyncio.to_thread(self._abandon_prepared)
            raise
        exporter = None
        try:
            # Before the run's first event: the exporter follows the log from here.
            exporter = await asyncio.to_thread(self._start_otlp_export)
            if on_ready is not None:
                on_ready(self)
            return await self._run(prepared, dict(context or {}))
        finally:
            if exporter is not None:
                # The run has closed its log, so the exporter reads it to the end.
                self._exporter = exporter
                if not keep_exporting:
                    await asyncio.to_thread(self.finish_export)
            await asyncio.to_thread(self._lock.release)

    def finish_export(self, timeout: float = 5.0) -> Any:
        """Let live OTLP export send what is left (at most ``timeout`` seconds) and
        return its report (None when export was off). Blocking; idempotent."""
        exporter, self._exporter = self._exporter, None
        if exporter is not None:
            self.otlp_report = exporter.shutdown(timeout)
        return self.otlp_report

    def _start_otlp_export(self) -> Any:
        """The live OTLP exporter, when export is asked for or configured.

        Export never fails the run: without the optional packages, or with an
        endpoint the exporter cannot use, the run goes on and the report says why.
        """
        export = self.settings.export
        endpoint = export.otlp_endpoint or ("http://localhost:4318" if self.export_otlp else None)
        if endpoint is None:
            return None
        from sigil.telemetry.otlp import LiveExportReport, LiveOtlpExporter, OtlpUnavailable

        try:
            return LiveOtlpExporter(
                self.session_id,
                endpoint,
                export.otlp_headers,
                export.otlp_protocol,
                log_path=self.log_path,
            )
        except (OtlpUnavailable, ValueError) as exc:
            self.otlp_report = LiveExportReport(
                self.session_id,
                complete=False,
                error=str(exc),
                log_path=os.fspath(self.log_path),
            )
            return None

    def _prepare(self, task: str | None) -> _Prepared:
        """Lock the session and read its history (blocking: runs in a thread).

        Everything that can refuse the run is checked before anything is written.
        """
        # An archived ID names its history: refused, --resume or not (contract 11).
        self._lock.refuse_if_archived()
        if self.resume and not (
            (self.session_dir / LOG_FILE_NAME).exists() or rotated_segments(self.session_dir)
        ):
            raise ResumeError(
                f"session {self.session_id!r} has no log to resume in {self.log_path}"
            )
        self._lock.acquire(record_pid=False)
        try:
            # Tokens an earlier run spent that a full disk kept from the log:
            # logged now (there may be room again), before the history is read.
            log_unrecorded(self.log_path, self.session_id, self._lock)
            keep_reserve(self.session_dir)
            history = read_session_history(self.session_dir)
            if history.summaries_stale:
                # The log is the truth: a writer died between its final event and
                # tokens.json (or it is gone). Whoever notices rebuilds it.
                self._rebuild_summaries(history)
            self.missing_events = history.missing_events
            open_run = history.resumable_run if self.resume else history.open_run
            if self.resume:
                if open_run is None:
                    last = history.runs[-1].status if history.runs else "no run"
                    raise ResumeError(
                        f"session {self.session_id!r} has no interrupted run to resume "
                        f"(last run: {last}); run without --resume to start a new run"
                    )
                run = open_run
                task = task or open_run.task
                if not task:
                    raise ResumeError("the interrupted run's task is not in the log; pass --task")
            else:
                if open_run is not None:
                    # Its writer died and the user chose a new run: the dead run's
                    # tokens stay used; it is reported as incomplete.
                    open_run.status = "incomplete"
                    self.abandoned_run = open_run.run
                number = (history.runs[-1].run + 1) if history.runs else 1
                run = RunRecord(run=number, started_at=datetime.now(UTC).isoformat(), task=task)
                previous = history.runs[-1] if history.runs else None
                if previous is not None and previous.status == "interrupted":
                    self.interrupted_run = previous.run
            budget = self.token_budget
            if not self._budget_explicit:
                recorded = (open_run.budget if self.resume and open_run else None) or next(
                    (r.budget for r in reversed(history.runs) if r.budget), None
                )
                budget = recorded or budget
                if recorded:
                    from sigil.core.config import ConfigError, check_allocations

                    try:
                        check_allocations(
                            self.settings, recorded, "the session's recorded budget",
                            allocations_origin(self.settings),
                        )  # fmt: skip
                    except ConfigError as exc:
                        raise BudgetConfigError(exc.format_message()) from None
            run.budget = budget
            self.token_budget = budget
            self.run_number = run.run
            if history.last_seq is not None and isinstance(self.execution_logger, _SessionLogger):
                self.execution_logger.min_next_seq = history.last_seq + 1
            # Open the log before the run is accepted: a log that cannot be opened
            # refuses the run here, before anything else is written.
            self.execution_logger.initialize_sync()
            # The run is accepted: from here on it may write.
            self._lock.record_pid()
            self._make_current_link()
        except BaseException:
            self._lock.release()
            raise
        assert task is not None
        # A run that was interrupted wrote its own errors.jsonl records; only a
        # dead writer's are recovered from the log.
        dead_errors = list(run.error_events) if self.resume and run.status == "running" else []
        return _Prepared(history, run, task, budget, self.resume, dead_errors)

    def _abandon_prepared(self) -> None:
        """Undo a :meth:`_prepare` whose run was cancelled before its first event."""
        try:
            self.execution_logger.close_sync()
        finally:
            self._lock.release()

    def _make_current_link(self) -> None:
        """Point ``<log_path>/current.jsonl`` at this session's log (atomically)."""
        link = self.log_path / "current.jsonl"
        target = Path("sessions") / self.session_id / LOG_FILE_NAME
        tmp = self.log_path / f".current.{os.getpid()}.tmp"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, link)
        except OSError:
            tmp.unlink(missing_ok=True)  # a missing convenience link must not stop a run

    async def _run(self, prep: _Prepared, context: dict[str, Any]) -> PipelineResult:
        history, record = prep.history, prep.run
        self.token_budget = prep.budget
        if history.source is not None:
            # The run's end continues the fold of the log at rest with the run's
            # own events. When the ledger spared that fold at the start (the log
            # was as it last saw it), it is done now, beside the steps.
            prep.resting = asyncio.ensure_future(asyncio.to_thread(history.source.fold_at_rest))
        # The tracker starts from what the log already holds: earlier runs, and on
        # resume the dead part of this run. The log is the ledger (contract 2).
        tracker = TokenTracker.from_settings(self.settings, total_budget=prep.budget)
        comp_tokens, comp_ops = history.component_totals()
        tracker.restore(history.tokens_used, comp_tokens, comp_ops)
        # Tokens earlier runs hold for calls of unknown usage (the model's): not
        # the model calls' to take (what every view says is left excludes them).
        self._held_before = history.tokens_held
        log = _RecordingLogger(self.execution_logger)
        prep.log = log
        tracker.logger = log
        self.token_tracker = tracker
        handler = self.error_handler
        handler.logger = log
        handled_before = len(handler.handled)
        tokens_before_run = history.tokens_used - (record.tokens_used if prep.resumed else 0)

        from sigil.pipeline.tokenizer import TOKENIZER_NAME, load_tokenizer

        # Building the tokenizer takes ~150 ms: do it in a thread while the log opens
        # and session_start goes out, so a monitor sees the run start at once.
        tokenizer_future = asyncio.ensure_future(load_tokenizer())
        if self.provider is not None:
            # A model answers this run's steps: load the price table meanwhile, so
            # that pricing the first step's event does not wait for its import.
            self.pricer.warm()
        try:
            return await self._run_steps(
                prep,
                context,
                log,
                tracker,
                handled_before,
                tokens_before_run,
                tokenizer_future,
                TOKENIZER_NAME,
            )
        finally:
            if not tokenizer_future.done():
                tokenizer_future.cancel()
            elif not tokenizer_future.cancelled():
                tokenizer_future.exception()  # retrieved: no "never retrieved" warning

    async def _run_steps(
        self,
        prep: _Prepared,
        context: dict[str, Any],
        log: _RecordingLogger,
        tracker: TokenTracker,
        handled_before: int,
        tokens_before_run: int,
        tokenizer_future: asyncio.Future[Any],
        tokenizer_name: str,
    ) -> PipelineResult:
        record = prep.run
        tokenizer: Any = None
        started = time.perf_counter()
        steps: list[StepResult] = []
        outputs: dict[str, Any] = {}
        status, error = "complete", None
        exhausted_at_start = not tracker.can_continue()
        budget_event_logged = False

        async def finish() -> PipelineResult:
            # Reads status and error when called: the outcome decided below.
            return await self._finish(
                prep, log, tracker, steps, status, error, started, handled_before,
                tokens_before_run,
            )  # fmt: skip

        if prep.resumed:
            recovered = [s for s in self.steps if record.completed.get(s, {}).get("has_output")]
            await log.log_event(
                "retry_attempt",
                ORCHESTRATOR,
                f"Resuming run {record.run} of session {self.session_id}: "
                f"{len(recovered)} completed steps recovered from the log",
                0,
                {
                    "resume": True,
                    "run": record.run,
                    "recovered_steps": recovered,
                    "tokens_before_resume": tracker.used,
                    "budget": prep.budget,
                },
            )
        else:
            await log.log_event(
                "session_start",
                ORCHESTRATOR,
                f"Starting pipeline for: {prep.task}",
                0,
                {
                    "task": prep.task,
                    "budget": prep.budget,
                    "allocations": tracker.allocations,
                    "run": record.run,
                    "thresholds": tracker.thresholds,
                    "provider": self.provider_name,
                    "model": self._model_name(tokenizer_name),
                    "tokenizer": tokenizer_name,
                    "steps": list(self.steps),
                    "context_keys": sorted(str(k) for k in context),
                    "tokens_before_run": tracker.used,
                },
            )
            record.started_at = datetime.now(UTC).isoformat()

        try:
            for slot, step in self.steps.items():
                done = record.completed.get(slot) if prep.resumed else None
                if done and done.get("has_output"):
                    result = StepResult(
                        step=_step_name(slot),
                        success=True,
                        tokens_used=int(done["tokens"]),
                        latency_ms=float(done["latency_ms"]),
                        output=done["output"],
                        metadata={"resumed": True, "attempts": 0},
                    )
                    steps.append(result)
                    outputs[slot] = result.output
                    context[CONTEXT_KEYS.get(slot, slot)] = result.output
                    continue
                if not tracker.can_continue():
                    status = "budget_exceeded"
                    error = (
                        f"token budget exhausted before step {slot}: "
                        f"{tracker.used:,} of {prep.budget:,} tokens used"
                    )
                    if exhausted_at_start and not budget_event_logged:
                        notice = tracker.exhausted_notice()
                        meta = notice.metadata() | {"reason": "spent by earlier runs"}
                        await log.log_event(
                            notice.event_type, ORCHESTRATOR, notice.message, 0, meta
                        )
                        budget_event_logged = True
                    break
                # A pipeline that cannot record what it spends starts no further
                # step: what the log holds so far must be on disk first.
                unrecorded = await self._log_failure(log)
                if unrecorded is not None:
                    self.recording_error = unrecorded
                    status, error = "interrupted", describe_write_error(unrecorded, self.log_file)
                    break
                if tokenizer is None:
                    tokenizer = await tokenizer_future
                result, handled = await self._execute_step(
                    slot, step, prep.task, context, outputs, tokenizer, record.run, tracker
                )
                steps.append(result)
                if result.success:
                    outputs[slot] = result.output
                    context[CONTEXT_KEYS.get(slot, slot)] = result.output
                    continue
                if result.metadata.get("stopped_by_budget"):
                    status, error = "budget_exceeded", f"step {slot} failed: {result.error}"
                    break
                fatal = handled is not None and handled.fatal
                if fatal or is_required(slot, step):
                    status = "error"
                    error = f"step {slot} failed: {result.error}"
                    break
        except BaseException as exc:
            # Cancelled, interrupted or a bug in the orchestrator itself: still end the
            # run properly (final event, summary files) so the log says what happened.
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                # Ctrl-C / SIGTERM: recorded as such, so --resume can continue it.
                status, error = "interrupted", "interrupted"
            else:
                status, error = "error", f"internal error: {type(exc).__name__}: {exc}"
            await _to_the_end(finish(), absorb=True)
            raise
        # The run is over: a cancellation now must not cut its final path short
        # (no tokens.json), and the outcome the log records stands.
        return await _to_the_end(finish(), absorb=True)

    async def _log_failure(self, log: _RecordingLogger) -> OSError | None:
        """Flush and fsync the log; the error if the disk refused it (ENOSPC, EIO)."""
        if log.dropped is not None:
            return log.dropped
        try:
            await asyncio.to_thread(self.execution_logger.flush_sync)
        except OSError as exc:
            return exc
        stats = self.execution_logger.stats()
        if stats.get("dropped_events") or stats.get("dropped_lines"):
            number = stats.get("last_errno") or errno.EIO
            return OSError(number, str(stats.get("last_error") or os.strerror(number)))
        return None

    async def _usage_meta(
        self, input_tokens: int, output_tokens: int, model: str | None
    ) -> tuple[dict[str, Any], bool]:
        """A model call's metadata: its tokens, its model and, where priced,
        ``cost_usd``; and whether the run was cancelled while it was priced (the
        caller records the call, then raises ``CancelledError``)."""
        meta: dict[str, Any] = {"input_tokens": input_tokens, "output_tokens": output_tokens}
        cancelled = False
        if model is not None:
            meta["model"] = model
            cost, cancelled = await self.pricer.ameta(model, input_tokens, output_tokens)
            meta.update(cost)
        return meta, cancelled

    def _model_name(self, tokenizer_name: str) -> str:
        if self.provider is not None:
            return str(getattr(self.provider, "model", "unknown"))
        return f"offline ({tokenizer_name})"

    def _left(self, tracker: TokenTracker) -> int:
        """What is left of the budget for the run's model calls: the tracker's
        remaining less the tokens earlier runs hold for calls of unknown usage
        (budget - used - held, as the monitor and the end line say it)."""
        return max(0, tracker.remaining - self._held_before)

    async def _execute_step(
        self,
        slot: str,
        step: Step,
        task: str,
        context: dict[str, Any],
        outputs: dict[str, Any],
        tokenizer: Any,
        run: int,
        tracker: TokenTracker,
    ) -> tuple[StepResult, HandledError | None]:
        """Run one step with retries; log its events; never raises for a step failure."""
        log = tracker.logger
        assert log is not None
        title = slot.replace("_", " ").title()
        # The step's input and output hashes (issue 13): a step started again
        # with the same input is a loop; a changed output hash a changed step.
        input_hash = _sha256_of({"task": task, "context": context, "outputs": outputs})
        start_meta: dict[str, Any] = {"run": run, "input_sha256": input_hash}
        call = self._model_call(slot, step, task, context, outputs, tokenizer, run, tracker)
        if call is not None:
            start_meta.update(call)
        await log.log_event("step_start", slot, f"{title} started", 0, start_meta)
        # The step's step_complete or step_error closes its model call.
        closes = {"call": call["call"]} if call is not None else {}
        step_started = time.perf_counter()
        # The step's tokens, failed attempts included, are what the tracker
        # recorded for its component meanwhile (no running sum kept here).
        used_before = tracker.component_used(slot)
        attempt = 0
        while True:
            attempt += 1
            ctx = StepContext(
                task=task,
                session_id=self.session_id,
                step=slot,
                attempt=attempt,
                context=context,
                outputs=dict(outputs),
                tokenizer=tokenizer,
                provider=self.provider,
                home=self.home,
                run=run,
                settings=self.settings,
                tokens_remaining=self._left(tracker),
            )
            attempt_started = time.perf_counter()
            try:
                out = await step.run(ctx)
                if not isinstance(out, StepOutput):
                    raise TypeError(f"step {slot} returned {type(out).__name__}, not a StepOutput")
            except Exception as exc:
                now = time.perf_counter()
                usage = usage_of(exc)
                if usage is not None:
                    spent, cancelled = await self._usage_meta(
                        usage.input_tokens, usage.output_tokens, usage.model
                    )
                    await tracker.track(
                        slot,
                        usage.total,
                        event_type="token_consumption",
                        message=f"{title} attempt {attempt} failed; it used {usage.total} tokens",
                        metadata=spent
                        | {"attempt": attempt, "outcome": "failed_attempt", "run": run},
                    )
                    if cancelled:
                        raise asyncio.CancelledError from exc  # its tokens recorded first
                handled = self.error_handler.handle(
                    exc,
                    ErrorContext(
                        component=slot,
                        operation=f"{slot}.run",
                        session_id=self.session_id,
                        metadata={
                            "attempt": attempt,
                            "run": run,
                            "latency_ms": round((now - step_started) * 1000, 3),
                            "attempt_latency_ms": round((now - attempt_started) * 1000, 3),
                            **closes,
                        },
                    ),
                    retry_count=attempt - 1,
                )
                # A step that refused its own call for the budget (the model
                # call's prompt leaves no token for the answer) ends the run as
                # out of budget, as the proxy's refusal does.
                stopped_by_budget = bool(getattr(exc, "budget_exhausted", False))
                if handled.should_retry and not tracker.can_continue():
                    # No new attempt once the budget has run out (spec 9.3).
                    handled.should_retry = False
                    handled.suggestion = "Token budget exhausted - not retrying"
                    handled.message = f"{handled.error_type}: {exc} ({handled.suggestion})"
                    stopped_by_budget = True
                await self.error_handler.log_error(handled)
                if handled.should_retry:
                    await asyncio.sleep(handled.retry_delay)
                    continue
                return (
                    StepResult(
                        step=_step_name(slot),
                        success=False,
                        tokens_used=tracker.component_used(slot) - used_before,
                        latency_ms=(now - step_started) * 1000,
                        output=None,
                        error=handled.message,
                        metadata={
                            "attempts": attempt,
                            "category": handled.category.value,
                            "error_type": handled.error_type,
                            "required": is_required(slot, step),
                            "stopped_by_budget": stopped_by_budget,
                        },
                    ),
                    handled,
                )
            now = time.perf_counter()
            latency_ms = (now - step_started) * 1000
            spent, cancelled = await self._usage_meta(
                out.input_tokens, out.output_tokens, out.model
            )
            meta: dict[str, Any] = {
                "run": run,
                **closes,
                "attempt": attempt,
                "latency_ms": round(latency_ms, 3),
                "attempt_latency_ms": round((now - attempt_started) * 1000, 3),
                **spent,
                "tokenizer": tokenizer.name if out.model is None else None,
            }
            if meta["tokenizer"] is None:
                del meta["tokenizer"]
            for key, value in out.metadata.items():
                # A cost comes from the price table only (one rule): a step's own
                # ``cost_usd`` would make an unpriced model look priced.
                if key != COST_KEY:
                    meta.setdefault(key, value)
            _attach_output(meta, out.output)
            meta["output_sha256"] = _sha256_of(out.output)
            await tracker.track(
                slot,
                out.tokens,
                event_type="step_complete",
                message=out.message or f"{title} completed",
                metadata=meta,
            )
            if cancelled:
                raise asyncio.CancelledError  # the step's tokens recorded first
            return (
                StepResult(
                    step=_step_name(slot),
                    success=True,
                    tokens_used=tracker.component_used(slot) - used_before,
                    latency_ms=latency_ms,
                    output=out.output,
                    metadata={
                        "attempts": attempt,
                        **spent,
                        **{k: v for k, v in out.metadata.items() if k != COST_KEY},
                    },
                ),
                None,
            )

    def _model_call(
        self,
        slot: str,
        step: Step,
        task: str,
        context: dict[str, Any],
        outputs: dict[str, Any],
        tokenizer: Any,
        run: int,
        tracker: TokenTracker,
    ) -> dict[str, Any] | None:
        """The model call a step's ``step_start`` announces, as the proxy's call
        starts do (rust/fold.rs reads them): ``call`` (the ``seq`` of that
        ``step_start``: unique in the session), ``model`` and what the call
        reserves: its prompt as the proxy counts it (``prompt_tokens_reserved``,
        when the step shows its prompt) and the output cap it is sent with
        (``max_tokens``: what the budget has left once the prompt is counted, at
        most the proxy's cap of a call that sets none). The step's
        ``step_complete`` or ``step_error`` names the same call and closes it; a
        call its run never closed (the process was killed, the run interrupted
        in it) is a call of unknown usage holding that reservation in every
        view, as through ``sigil proxy``. None for a step that calls no model,
        or whose call would not be sent (its prompt alone takes what is left)."""
        if self.provider is None or not _calls_model(step):
            return None
        from sigil.pipeline.base import StepBudgetError
        from sigil.pipeline.calls import DEFAULT_CALL_CAP
        from sigil.pipeline.providers import output_cap
        from sigil.proxy.usage import prompt_tokens

        remaining = self._left(tracker)
        prompt, cap = 0, min(remaining, DEFAULT_CALL_CAP)
        show = getattr(step, "prompt", None)
        if callable(show):
            ctx = StepContext(
                task=task, session_id=self.session_id, step=slot, attempt=1, context=context,
                outputs=dict(outputs), tokenizer=tokenizer, provider=self.provider,
                home=self.home, run=run, settings=self.settings, tokens_remaining=remaining,
            )  # fmt: skip
            try:
                messages = show(ctx)
                body: dict[str, Any] = {"messages": [dict(m) for m in messages]}
                prompt = prompt_tokens(body)
                cap = output_cap(messages, remaining)  # the step's call's own cap
            except StepBudgetError:
                return None  # the call will not be sent
            except Exception:
                prompt = 0  # the step's own prompt() failed: its run() will say why
        call: dict[str, Any] = {
            "call": self.execution_logger.next_seq,
            "model": str(getattr(self.provider, "model", "unknown")),
            "max_tokens": cap,
        }
        if prompt:
            call["prompt_tokens_reserved"] = prompt
        return call

    async def _finish(
        self,
        prep: _Prepared,
        log: _RecordingLogger,
        tracker: TokenTracker,
        steps: list[StepResult],
        status: str,
        error: str | None,
        started: float,
        handled_before: int,
        tokens_before_run: int,
    ) -> PipelineResult:
        """Final event, close the log, write the summary files; build the result."""
        record = prep.run
        run_latency = sum(s.latency_ms for s in steps if not s.metadata.get("resumed"))
        # The session model's numbers (contract 12), else the tracker's.
        end = end_numbers(
            await self._model_before_end(prep, log),
            record.run,
            prep.budget,
            (tracker.used, tracker.used - tokens_before_run, prep.history.tokens_held),
        )
        total = end.total
        validation = next((s for s in steps if str(s.step) == "validation" and s.success), None)
        reasoning = next((s for s in steps if str(s.step) == "reasoning" and s.success), None)
        quality = validation.metadata.get("quality_score") if validation else None
        action = (validation.metadata.get("action") if validation else None) or (
            reasoning.metadata.get("action") if reasoning else None
        )
        final_output = (
            validation.output if validation else (reasoning.output if reasoning else None)
        )
        failed = [str(s.step) for s in steps if not s.success]
        summary_meta = {
            "status": status,
            "run": record.run,
            "total_tokens": total,
            "run_tokens": end.run_tokens,
            "budget": prep.budget,
            "budget_remaining": end.budget_remaining,
            "total_latency_ms": round(run_latency, 3),
            "wall_time_ms": round((time.perf_counter() - started) * 1000, 3),
            "steps_completed": sum(1 for s in steps if s.success),
            "steps_failed": len(failed),
            "failed_steps": failed,
            "quality_score": quality,
            "recommended_action": action,
        }
        if error:
            summary_meta["error"] = error
        try:
            if status == "complete":
                message = "Pipeline completed successfully" + (
                    f" (skipped failed optional steps: {', '.join(failed)})" if failed else ""
                )
                await log.log_event("session_complete", ORCHESTRATOR, message, 0, summary_meta)
            elif status == "interrupted":
                message = f"Pipeline interrupted; continue it with --resume (run {record.run})"
                await log.log_event("session_error", ORCHESTRATOR, message, 0, summary_meta)
            else:
                await log.log_event(
                    "session_error", ORCHESTRATOR, f"Pipeline failed: {error}", 0, summary_meta
                )
        finally:
            record.status = status
            errors = self.error_handler.handled[handled_before:]
            try:
                await self.execution_logger.close()
            except OSError as exc:
                self.recording_error = self.recording_error or exc
            writer_stats = self.execution_logger.stats()
            dropped = writer_stats.get("dropped_events") or writer_stats.get("dropped_lines")
            self.recording_error = self.recording_error or log.dropped
            if dropped and self.recording_error is None:
                number = writer_stats.get("last_errno") or errno.EIO
                self.recording_error = OSError(number, os.strerror(number))
            if prep.resting is not None:
                try:
                    await prep.resting
                except Exception:
                    # Its end folds the log anew instead (_history_at_end).
                    prep.history.source = None
                except asyncio.CancelledError:
                    if not prep.resting.cancelled():
                        raise
                    prep.history.source = None
            if self.recording_error is None:
                try:
                    await asyncio.to_thread(self._write_summaries, prep, errors, writer_stats)
                except OSError as exc:
                    # The log holds the run; the next reader or writer rebuilds the
                    # summaries from it (they are then older than the log).
                    self.recording_error = exc
            # else: the log lacks events; a ledger claiming them would disagree with
            # it, so the summaries are rebuilt from the log once there is room.
        if self.recording_error is not None and error is None:
            error = describe_write_error(self.recording_error, self.session_dir)
        run_tokens, unrecorded = end.run_tokens, 0
        if self.recording_error is not None:
            # The log lacks events: the result says what the session model of
            # the log says (every view's number), and names what it lacks.
            numbers = await asyncio.to_thread(self._unrecorded_end, prep)
            if numbers is not None and numbers[2]:
                numbers = await self._rescue(prep, numbers)
            if numbers is not None:
                total, run_tokens, unrecorded = numbers
        return PipelineResult(
            session_id=self.session_id,
            task=prep.task,
            success=status == "complete",
            steps=steps,
            total_tokens=total,
            total_latency_ms=run_latency,
            final_output=final_output,
            quality_score=quality,
            recommended_action=action,
            status=status,
            run=record.run,
            run_tokens=run_tokens,
            budget=prep.budget,
            error=error,
            resumed=prep.resumed,
            log_file=str(self.log_file),
            missing_events=prep.history.missing_events,
            unrecorded_tokens=unrecorded,
        )

    async def _rescue(
        self, prep: _Prepared, numbers: tuple[int, int, int]
    ) -> tuple[int, int, int] | None:
        """The log lacks tokens the run spent (``numbers[2]``) on a full disk:
        record them in the session's reserve (in place: no new space needed),
        free the rest of the reserve and let the writer write what it still
        holds. What the log then still lacks stays recorded; the session's
        next run logs it (:func:`log_unrecorded`). The numbers after."""
        session_dir, run = self.session_dir, prep.run.run
        recorded = await asyncio.to_thread(record_unrecorded, session_dir, run, numbers[2])
        await asyncio.to_thread(free_reserve, session_dir, recorded)
        with contextlib.suppress(OSError):
            await self.execution_logger.close()  # writes what it holds, if it fits now
        after = await asyncio.to_thread(self._unrecorded_end, prep)
        if after is None:
            return numbers
        if recorded:
            await asyncio.to_thread(record_unrecorded, session_dir, run, after[2])
        return after

    def _unrecorded_end(self, prep: _Prepared) -> tuple[int, int, int] | None:
        """A run whose log lacks events (a full or failing disk): the session's
        tokens and the run's as the session model of the log says them (as
        every view reads it), and the tokens the run spent that the log does not
        hold: the model continued with the run's own events, less the model of
        the log. None when either cannot be had (the caller keeps its counts)."""
        source = prep.history.source
        own = prep.log.fed_events(self._sanitizer) if prep.log is not None else None
        try:
            kept = source.continued_with(own) if source is not None and own is not None else None
            model = read_session_history(self.session_dir).model
        except (OSError, ValueError):
            return None
        if model is None:
            return None
        runs = [r for r in model.runs if r.number == prep.run.run]
        run_tokens = runs[-1].tokens if runs else 0
        unrecorded = max(0, kept.tokens - model.tokens) if kept is not None else 0
        return model.tokens, run_tokens, unrecorded

    # -- summary files ------------------------------------------------------------------

    def _write_summaries(
        self,
        prep: _Prepared,
        errors: list[HandledError],
        writer_stats: Mapping[str, Any],
    ) -> None:
        """tokens.json, metrics.json and errors.jsonl (blocking: runs in a thread).

        The run has closed its log: the summaries are built from the session
        model of the log (and the ledger's older runs), exactly as any later
        reader would compute them, so they agree with the monitor.
        """
        history = self._history_at_end(prep)
        self._write_history(history, writer_stats)
        records: list[dict[str, Any]] = []
        records += prep.dead_errors
        records += [{**h.to_record(), "run": prep.run.run} for h in errors]
        if self._sanitizer is not None:
            # A step's error text is what an HTTP client put there, keys included.
            records = [self._sanitizer.sanitize_dict(r) for r in records]
        if records:
            path = self.session_dir / "errors.jsonl"
            try:
                previous = path.read_bytes()
            except FileNotFoundError:
                previous = b""
            if previous and not previous.endswith(b"\n"):
                previous += b"\n"
            body = b"".join(_json_bytes(r, indent=False) + b"\n" for r in records)
            _atomic_write(path, previous + body)

    def _history_at_end(self, prep: _Prepared) -> SessionHistory:
        """The session's history once the run has closed its log: the fold of the
        log at rest continued with the run's own events (no refold of a log that
        may hold millions of events), joined with the ledger, as any later
        reader would read it. If an external rotator moved the live file during
        the run, the fold goes on with the events the run kept as it logged
        them: a refold of what the log still holds would lose the run's events
        that left it (``rotate 0`` deletes them), and their tokens would leave
        the budget. Only without a fold at rest, or with more events than were
        kept, is the log read anew."""
        model = self._continued_model(prep)
        if model is None:
            return read_session_history(self.session_dir)
        return SessionHistory.of(model)

    def _continued_model(self, prep: _Prepared, *, closed: bool = True) -> HistorySnapshot | None:
        """The fold of the log at rest continued to the run's last event logged
        so far: from the live file, or, when the live file is not the one the
        run's events went to (a rotator renamed, deleted or recreated it; it may
        even have the same inode), with the events the run kept as it logged
        them. None without a fold at rest, or when the run's events are neither
        in the live file nor all kept: the caller reads the log anew.

        Before the run has closed its log (``closed`` False: the final event's
        numbers) the events kept are the answer when there are: the fold at
        rest moves on with the live file once, at the end; moved on earlier, it
        would have taken a recreated live file's lines for the run's."""
        source = prep.history.source
        if source is None:
            return None
        own = prep.log.fed_events(self._sanitizer) if prep.log is not None else None
        kept = model = None
        try:
            # Before at_run_end, which moves a compressed log's model on.
            kept = source.continued_with(own) if own is not None else None
            if kept is not None and not closed:
                return kept
            model = source.at_run_end()
        except OSError:
            model = None
        if kept is not None and not _holds_the_same(model, kept):
            model = kept
        return model

    async def _model_before_end(
        self, prep: _Prepared, log: _RecordingLogger
    ) -> HistorySnapshot | None:
        """The session model just before the run's final event (contract 12):
        what the final event and the end's summary say of the tokens and of
        what is left of the budget, as every view shows the run once it ended.

        The run's events are written out first, then the fold of the log at
        rest (the one the end continues, :meth:`_history_at_end`) goes on with
        them. The history reads the run's writer as gone (``writer_gone``):
        the calls the run leaves open (a proxy's, not recorded by the end of
        its abort wait) hold their reservations as calls of unknown usage, as
        once its final event is written; the final event adds no tokens. None
        when the log lacks events or cannot be read or written in time: the
        caller says its own counts then."""
        if self.recording_error is not None or log.dropped is not None:
            return None
        try:
            await asyncio.to_thread(self.execution_logger.wait_written, None, _END_WAIT_SECONDS)
        except (OSError, ValueError):
            return None  # TimeoutError too: a slow disk, the events still queued
        if prep.resting is not None:
            resting, prep.resting = prep.resting, None
            try:
                await resting
            except Exception:
                prep.history.source = None
            except asyncio.CancelledError:
                if not resting.cancelled():
                    raise
                prep.history.source = None
        if prep.history.source is None:
            from sigil.telemetry.log_parser import HistoryModel

            # The end then continues this fold (no second fold of the log).
            prep.history.source = HistoryModel(
                self.session_dir, last_n=_RESUME_EVENTS, writer_gone=True
            )
        try:
            model = await asyncio.to_thread(self._continued_model, prep, closed=False)
            if model is None:  # neither in the live file nor kept: the log read anew
                model = (await asyncio.to_thread(read_session_history, self.session_dir)).model
        except Exception:
            return None
        return model

    def _rebuild_summaries(self, history: SessionHistory) -> None:
        """tokens.json and metrics.json from the history alone (no run in progress)."""
        try:
            self._write_history(history, {"rebuilt_from_log": True})
        except OSError:
            pass  # still stale; the next reader or writer tries again
        else:
            history.ledger_seq = history.last_seq

    def _write_history(self, history: SessionHistory, writer_stats: Mapping[str, Any]) -> None:
        if not history.runs:
            return
        last = history.runs[-1]
        budget = next((r.budget for r in reversed(history.runs) if r.budget), None)
        tb = self.settings.token_budget
        # The budget view of tokens.json (allocated, used, utilisation per
        # component) is the tracker's, restored from the model's totals.
        tracker = TokenTracker(
            total_budget=budget or self.token_budget,
            allocations=last.allocations,
            warning_threshold=tb.warning_threshold,
            critical_threshold=tb.critical_threshold,
            exceeded_threshold=tb.exceeded_threshold,
        )
        comp_tokens, comp_ops = history.component_totals()
        tracker.restore(history.tokens_used, comp_tokens, comp_ops)
        write_summaries(
            self.session_dir, self.session_id, history, tracker, writer_stats=writer_stats
        )


def write_summaries(
    session_dir: Path,
    session_id: str,
    history: SessionHistory,
    tracker: TokenTracker,
    *,
    writer_stats: Mapping[str, Any],
) -> None:
    """Write the session's ``tokens.json`` (the ledger) and ``metrics.json``.

    Every number comes from the session model (``history.snapshot``) and, for
    runs an external rotator took out of the log, from the ledger. ``tokens.json``
    is the session's durable ledger (ARCHITECTURE.md contract 11): per-run totals
    and the last ``seq`` they cover, written atomically (temporary file, fsync,
    rename, fsync of the directory). A later run combines it with whatever log
    remains (:func:`read_session_history`). Blocking.
    """
    now = datetime.now(UTC).isoformat()
    runs = history.runs
    last = runs[-1]
    snap = history.snapshot
    status_info = tracker.get_status()
    components: dict[str, dict[str, Any]] = {}
    for name, c in status_info["components"].items():
        if c["allocated"] or c["used"]:
            components[name] = {
                "allocated": c["allocated"],
                "used": c["used"],
                "utilization": round(c["utilization"], 2),
            }
    comp_tokens, comp_ops = history.component_totals()
    model = history.model
    comp_costs = dict(model.components) if model is not None else {}
    loops = {r.number: [lp.to_dict() for lp in r.loops] for r in model.runs} if model else {}
    first_timestamp = next((r.started_at for r in runs if r.started_at), None)
    last_timestamp = (snap.last_timestamp if snap else None) or last.ended_at
    tokens_doc = {
        "session_id": session_id,
        "timestamp": now,
        "status": last.status,
        "run": last.run,
        "total_budget": tracker.total,
        "total_used": history.tokens_used,
        "total_remaining": max(0, tracker.total - history.tokens_used),
        **_cost_doc(
            model.cost_nanousd if model else 0,
            model.priced_events if model else 0,
            model.unpriced_tokens if model else 0,
        ),
        "unpriced_models": list(model.unpriced_models) if model else [],
        "utilization_percentage": round(status_info["utilization"], 2),
        "warning_level": status_info["warning_level"],
        "thresholds": status_info["thresholds"],
        "components": components,
        # Each run's loops as the model gives them (issue 13): they outlive the
        # run's events in the log.
        "runs": [{**r.tokens_dict(), "loops": loops.get(r.run, [])} for r in runs],
        "first_timestamp": first_timestamp,
        "last_timestamp": last_timestamp,
        "ledger_version": LEDGER_VERSION,
        "last_seq": history.last_seq,
        # What a new run restores its budget tracker from while the log below is
        # unchanged (the model's per-component totals, ledger-only runs included).
        "component_totals": {
            name: {
                "tokens": comp_tokens[name],
                "operations": comp_ops.get(name, 0),
                **_component_cost(comp_costs.get(name)),
                **_component_held(comp_costs.get(name)),
            }
            for name in comp_tokens
        },
        # Per model over the whole session (the model's, ledger-only runs included).
        "model_totals": _component_models(model.component_models) if model is not None else {},
        "log_files": _log_files(session_dir),
        "events": history.events,
        # A hole in seq that neither the log nor the ledger could fill: the
        # totals above are then a lower bound.
        "missing_events": history.missing_events,
        "data": "incomplete" if history.missing_events else "complete",
    }
    _atomic_write(session_dir / "tokens.json", _json_bytes(tokens_doc))

    # Per component, as the monitor shows it: operations are successful steps;
    # latency (total, average, p50, p95) is theirs, from the model's histogram.
    metric_components: dict[str, dict[str, Any]] = {}
    for name, c in (snap.components if snap else {}).items():
        if name == ORCHESTRATOR:
            continue
        metric_components[name] = {
            "latency_ms": round(c.latency_ms, 3),
            "operations": c.operations,
            "errors": c.errors,
            "retries": c.retries,
            "average_latency_ms": _rounded(c.average_latency_ms),
            "p50_latency_ms": _rounded(c.p50_latency_ms),
            "p95_latency_ms": _rounded(c.p95_latency_ms),
            "failed_latency_ms": round(c.failed_latency_ms, 3),
        }
    timed = {n: a for n, a in metric_components.items() if a["average_latency_ms"] is not None}
    counts = snap.event_counts if snap else {}
    metrics_doc = {
        "session_id": session_id,
        "timestamp": now,
        "status": last.status,
        "run": last.run,
        "started_at": first_timestamp,
        "duration_seconds": _rounded(snap.duration_seconds if snap else None),
        "steps_completed": counts.get("step_complete", 0),
        "steps_failed": counts.get("step_error", 0),
        "components": metric_components,
        # Runs whose events left the log count in tokens.json (the ledger); the
        # component numbers above are the model's of what the log holds.
        "components_cover_runs": [r.run for r in runs if r.source == "log"],
        "slowest_component": max(
            timed, key=lambda n: (timed[n]["average_latency_ms"], n), default=None
        ),
        "fastest_component": min(
            timed, key=lambda n: (timed[n]["average_latency_ms"], n), default=None
        ),
        "runs": [r.metrics_dict() for r in runs],
        "log": dict(writer_stats),
        "last_seq": history.last_seq,
    }
    _atomic_write(session_dir / "metrics.json", _json_bytes(metrics_doc))


# -- the session's reserve: room for the end of a run on a full disk ------------------

#: A small file kept in every session's directory, made when there is room: on
#: a full disk the end of a run records in it what its log lacks (in place:
#: no new space needed), then frees the rest of it for the writer.
RESERVE_FILE_NAME = ".reserve"
_RESERVE_BYTES = 16 << 10
_RECORD_BYTES = 4096


def _reserve_bytes() -> int:
    """16 KiB; ``SIGIL_TEST_RESERVE_BYTES`` (tests) sets another size."""
    text = os.environ.get("SIGIL_TEST_RESERVE_BYTES", "")
    return max(_RECORD_BYTES, int(text)) if text.isdigit() else _RESERVE_BYTES


def keep_reserve(session_dir: Path) -> None:
    """Make the session's reserve if it is missing or short (best effort: on a
    full disk there is none, and the run goes on without)."""
    path = session_dir / RESERVE_FILE_NAME
    size = _reserve_bytes()
    try:
        st = path.lstat()
        if st.st_size >= size or pending_unrecorded(session_dir) is not None:
            return  # made already, or holding a record the disk kept from the log
        start = st.st_size
    except FileNotFoundError:
        start = 0
    except OSError:
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:
        return
    try:
        os.pwrite(fd, b"\0" * (size - start), start)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)  # what part of it was made is given back
    finally:
        os.close(fd)


def record_unrecorded(session_dir: Path, run: int, tokens: int) -> bool:
    """Write in the reserve's first page that run ``run`` spent ``tokens`` the
    log lacks (0: nothing; the record is cleared). In place: it needs no new
    space. False when there is no reserve to hold it."""
    path = session_dir / RESERVE_FILE_NAME
    line = b"\0" * _RECORD_BYTES
    if tokens:
        record = json.dumps({"run": run, "unrecorded_tokens": tokens}).encode()
        line = b"".join((record, b"\n")).ljust(_RECORD_BYTES, b"\0")
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size < _RECORD_BYTES:
            return False
        os.pwrite(fd, line, 0)
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def free_reserve(session_dir: Path, keep_record: bool) -> None:
    """Give the reserve's space to the writer (its record's page kept)."""
    with contextlib.suppress(OSError):
        os.truncate(session_dir / RESERVE_FILE_NAME, _RECORD_BYTES if keep_record else 0)


def pending_unrecorded(session_dir: Path) -> dict[str, int] | None:
    """The reserve's record of tokens a run spent that its log lacks, if any."""
    try:
        with open(session_dir / RESERVE_FILE_NAME, "rb") as f:
            head = f.read(_RECORD_BYTES)
    except OSError:
        return None
    line, _, _ = head.partition(b"\n")
    if not line.startswith(b"{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    tokens, run = record.get("unrecorded_tokens"), record.get("run")
    if not _is_count(tokens) or not tokens or not _is_count(run):
        return None
    return {"run": int(run), "unrecorded_tokens": int(tokens)}


def log_unrecorded(log_path: Path, session_id: str, lock: SessionLock) -> None:
    """Log the tokens the reserve records as spent and not in the log: one
    ``events_dropped`` event carrying them in ``tokens`` (as the writer's own
    line does, so that every reader counts them, in the run they were spent
    in: the last one of the log), then clear the record. While the disk is
    still full the record stays. The caller holds the session's ``lock``."""
    session_dir = log_path / "sessions" / session_id
    record = pending_unrecorded(session_dir)
    if record is None:
        return
    tokens, run = record["unrecorded_tokens"], record["run"]
    logger = ExecutionLogger(session_id, log_path, fsync="always", lock=lock)
    try:
        logger.log_event_sync(
            "events_dropped",
            "logger",
            f"{tokens} tokens run {run} spent could not be written to the log "
            "(the disk was full); counted now",
            tokens,
            {"dropped": 0, "dropped_tokens": tokens, "run": run, "unrecorded": True},
        )
        logger.close_sync()
    except OSError:
        with contextlib.suppress(OSError):
            logger.close_sync()
        return  # still no room: the record stays for the next run
    record_unrecorded(session_dir, run, 0)


def _calls_model(step: Step) -> bool:
    """Whether a step may call the run's model: its own ``calls_model`` when it
    says so; else every step but the built-in ones that never do."""
    declared = getattr(step, "calls_model", None)
    if isinstance(declared, bool):
        return declared
    from sigil.pipeline.offline import (
        ContractsStep,
        MemoryStep,
        PlanningStep,
        RoutingStep,
        ValidationStep,
    )

    return not isinstance(
        step, RoutingStep | MemoryStep | PlanningStep | ContractsStep | ValidationStep
    )


def _holds_the_same(model: HistorySnapshot | None, kept: HistorySnapshot) -> bool:
    """Whether the model read from the log holds every event the run kept (the
    same events, last ``seq`` and tokens as the model continued with them)."""
    return (
        model is not None
        and model.events == kept.events
        and model.last_seq == kept.last_seq
        and model.tokens == kept.tokens
        and model.missing_events == kept.missing_events
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


#: How long the end of a run waits for its events to reach the log before it
#: folds them (a slow disk: the final event then says the writer's own counts).
_END_WAIT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class EndNumbers:
    """What a run's final event and its end line say of the tokens."""

    #: tokens used by the whole session
    total: int
    #: tokens used by this run
    run_tokens: int
    #: the budget less the tokens used and those held for calls of unknown usage
    budget_remaining: int
    #: this run's calls of unknown usage and the tokens held for them
    unknown_calls: int = 0
    tokens_held: int = 0
    #: from the session model (False: the writer's own counts)
    from_model: bool = False


def end_numbers(
    model: HistorySnapshot | None,
    run: int,
    budget: int,
    own: tuple[int, int, int],
    own_unknown: tuple[int, int] = (0, 0),
) -> EndNumbers:
    """A run's end numbers from the session model just before its final event
    (:meth:`Orchestrator._model_before_end`): the session's tokens, run
    ``run``'s tokens and calls of unknown usage, and what the model leaves of
    the session's budget (``HistorySnapshot.tokens_remaining``: budget - used
    - held, as the monitor shows it). Without the model (the log lacks events
    or could not be read; the run's budget not in it), what is left of
    ``budget`` by the writer's ``own`` ``(session tokens, run tokens, tokens
    held)``, and ``own_unknown`` ``(calls, tokens held)`` of the run."""
    runs = [] if model is None else [r for r in model.runs if r.number == run]
    if model is not None and runs and model.tokens_remaining is not None:
        r = runs[-1]
        return EndNumbers(
            total=model.tokens,
            run_tokens=r.tokens,
            budget_remaining=model.tokens_remaining,
            unknown_calls=r.unknown_usage_calls,
            tokens_held=r.tokens_held,
            from_model=True,
        )
    total, run_tokens, held = own
    return EndNumbers(
        total=total,
        run_tokens=run_tokens,
        budget_remaining=max(0, budget - total - held),
        unknown_calls=own_unknown[0],
        tokens_held=own_unknown[1],
    )


async def _to_the_end(aw: Any, *, absorb: bool = False) -> Any:
    """Await ``aw`` to its end even if this task is cancelled meanwhile.

    The final path of a run (final event, close, summary files) and the lock
    taken by ``_prepare`` must not be cut in half by a second Ctrl-C. A
    cancellation that arrives meanwhile is re-raised once ``aw`` is done, or,
    with ``absorb``, dropped (the task's cancel request is withdrawn).
    """
    inner = asyncio.ensure_future(aw)
    cancelled = 0
    while True:
        try:
            result = await asyncio.shield(inner)
            break
        except asyncio.CancelledError:
            if inner.done():
                if inner.cancelled():
                    raise
                result = inner.result()
                break
            cancelled += 1
    if cancelled:
        task = asyncio.current_task()
        if not absorb:
            raise asyncio.CancelledError
        if task is not None:
            for _ in range(cancelled):
                task.uncancel()
    return result


def _configured_steps(settings: Any) -> dict[str, str]:
    """``pipeline.steps`` (slot -> ``"module:attribute"``) from the settings."""
    steps = getattr(getattr(settings, "pipeline", None), "steps", None)
    if not isinstance(steps, Mapping):
        return {}
    return {str(slot): str(path) for slot, path in steps.items()}


def _step_name(slot: str) -> PipelineStep | str:
    try:
        return PipelineStep(slot)
    except ValueError:
        return slot


def _cost_doc(nanousd: int, priced: int, unpriced_tokens: int) -> dict[str, Any]:
    """A cost in tokens.json: ``cost_usd`` for people (None when nothing is
    priced: never $0 for a model without a price) and the model's exact integers,
    which the ledger reads back (rust/ledger.rs)."""
    return {
        "cost_usd": usd(nanousd) if priced else None,
        "cost_nanousd": nanousd,
        "priced_events": priced,
        "unpriced_tokens": unpriced_tokens,
    }


def _sha256_of(value: Any) -> str:
    """sha256 (hex) of a step's input or output as canonical JSON text (sorted
    keys; what JSON cannot hold, by its ``str``)."""
    import hashlib

    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):  # keys of mixed types, a cycle
        text = repr(value)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _component_models(pairs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The model's per-component, per-model totals as plain data (the ledger's)."""
    return {c: {n: m.to_dict() for n, m in models.items()} for c, models in pairs.items()}


def _component_cost(c: Any) -> dict[str, int]:
    if c is None:
        return {}
    return {
        "cost_nanousd": c.cost_nanousd,
        "priced_events": c.priced_events,
        "unpriced_tokens": c.unpriced_tokens,
    }


def _component_held(c: Any) -> dict[str, int]:
    """The tokens a component's calls of unknown usage held (the model's), kept in
    the ledger so that a later run still holds them."""
    return {"tokens_held": c.tokens_held} if c is not None and c.tokens_held else {}


def _attach_output(meta: dict[str, Any], output: Any) -> None:
    """Keep the step's output on its event (for ``--resume``) when it is small and JSON."""
    try:
        size = len(json.dumps(output, separators=(",", ":"), ensure_ascii=False))
    except (TypeError, ValueError):
        meta["output_omitted"] = "not JSON-serialisable"
        return
    if size > MAX_LOGGED_OUTPUT:
        meta["output_omitted"] = f"{size} bytes > {MAX_LOGGED_OUTPUT}"
        return
    meta["output"] = output


def describe_write_error(exc: OSError, path: Path) -> str:
    """ "disk full: cannot write PATH (...)" for ENOSPC/EDQUOT, else the error as is."""
    where = exc.filename or path
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: cannot write {where} ({reason})"
    return f"cannot write {where} ({reason})"


def _completed_entry(tokens: int, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What a step_complete event recorded, as ``--resume`` uses it."""
    return {
        "tokens": tokens,
        "latency_ms": _number(metadata.get("latency_ms")),
        "has_output": "output" in metadata,
        "output": metadata.get("output"),
        "metadata": dict(metadata),
    }


def _text_or(value: Any, default: str | None) -> str | None:
    return value if isinstance(value, str) else default


def _number(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return 0.0


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _json_bytes(doc: Any, indent: bool = True) -> bytes:
    text = json.dumps(doc, indent=2 if indent else None, ensure_ascii=False, default=str)
    return text.encode() + (b"\n" if indent else b"")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` as 0600, fsynced, never half-written nor through a planted link."""
    try:
        write_private_atomic(path, data)
    except OSError as exc:
        if exc.filename is not None:
            raise
        # Say which file did not fit (a full disk fails the write, not the open).
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
