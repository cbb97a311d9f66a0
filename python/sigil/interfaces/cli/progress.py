"""The live step table ``sigil orchestrate`` shows on a terminal while it runs.

Each step of the run appears as it starts (a spinner and the time it has been
running, its attempt when retried) and when it finishes (ok or failed, its
tokens, latency and cost). The table reads the same native session model the monitor
follows (contract 12): a thread folds the run's own log as it grows, with the
GIL released while it waits, so the display never computes a number of its own
and never holds back the pipeline. It is transient: once the run ends the
command prints its result table, as it does when stdout is not a terminal.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import RenderableType

    from sigil.telemetry.log_parser import SessionSnapshot

#: Events the model keeps for the table (a run's steps and their retries).
LAST_N = 512
#: Seconds between two reads of the log when nothing wakes the reader.
POLL_S = 0.1


class StepProgress:
    """A live table of run ``run``'s steps in session ``session_id``."""

    def __init__(self, session_id: str, log_path: Path, run: int | None) -> None:
        self.session_id = session_id
        self.log_path = log_path
        self.run = run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Any = None
        #: The model's last snapshot: after :meth:`stop`, the whole run (the
        #: final summary's costs come from it).
        self.snapshot: SessionSnapshot | None = None

    def start(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._live = Live(
            self._render(None),
            console=Console(),
            refresh_per_second=10,
            transient=True,
        )
        self._live.start()
        self._thread = threading.Thread(target=self._follow, name="sigil-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following and clear the table (idempotent); :attr:`snapshot` then
        holds everything the run logged."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _follow(self) -> None:
        from sigil.telemetry.log_parser import SessionModel

        try:
            model = SessionModel(self.session_id, self.log_path, last_n=LAST_N)
            while not self._stop.is_set():
                snap = self.snapshot = model.update()
                live = self._live
                if live is not None:
                    live.update(self._render(snap))
                model.wait(POLL_S)
            self.snapshot = model.update()  # the run's last events too
        except Exception:  # the table is a convenience: the run goes on without it
            return

    def _render(self, snap: SessionSnapshot | None) -> RenderableType:
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, pad_edge=False, show_edge=False)
        table.add_column("step")
        table.add_column("status")
        table.add_column("tokens", justify="right")
        table.add_column("time", justify="right")
        table.add_column("cost", justify="right")
        steps = _steps(snap, self.run) if snap is not None else []
        if not steps:
            table.add_row(Spinner("dots", text=" starting"), "", "", "", "")
        now = time.time()
        for step in steps:
            cost = Text(step.cost, style="yellow" if step.cost == "unpriced" else "")
            if step.state == "running":
                elapsed = f"{max(0.0, now - step.started):.1f} s" if step.started else ""
                label = "running" if step.attempt <= 1 else f"attempt {step.attempt}"
                status: Any = Spinner("dots", text=Text(f" {label}", style="cyan"))
                table.add_row(step.name, status, f"{step.tokens:,}", elapsed, cost)
            else:
                style = "green" if step.state == "ok" else "red"
                latency = f"{step.latency_ms:.0f} ms" if step.latency_ms is not None else ""
                state = Text(step.state, style=style)
                table.add_row(step.name, state, f"{step.tokens:,}", latency, cost)
        return table


def step_cost(component: Any) -> str:
    """A step's cost as the tables show it: dollars where its model is priced,
    ``unpriced`` where it is not (never $0), empty when no model answered it.
    ``component``: the model's ``ComponentSnapshot`` (None: nothing yet)."""
    from sigil.interfaces.cli.display import format_cost, has_cost

    return format_cost(component) if component is not None and has_cost(component) else ""


class _Step:
    __slots__ = ("attempt", "cost", "latency_ms", "name", "started", "state", "tokens")

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = "running"
        self.attempt = 1
        self.started: float | None = None
        self.latency_ms: float | None = None
        self.tokens = 0
        self.cost = ""


def _epoch(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return None


def _steps(snap: SessionSnapshot, run: int | None) -> list[_Step]:
    """The run's steps in the order they started, each in its latest state.
    Tokens are the model's per-run component totals."""
    entries = list(snap.last_entries)
    start = None
    for i in range(len(entries) - 1, -1, -1):
        entry = entries[i]
        if entry.event_type == "session_start":
            meta = entry.metadata if isinstance(entry.metadata, dict) else {}
            if run is None or meta.get("run") == run:
                start = i
            break
    if start is None:
        return []
    current = snap.run
    totals = current.components if run is None or current.number == run else {}
    steps: dict[str, _Step] = {}
    for entry in entries[start + 1 :]:
        kind = entry.event_type
        if kind not in ("step_start", "step_complete", "step_error", "retry_attempt"):
            continue
        meta = entry.metadata if isinstance(entry.metadata, dict) else {}
        step = steps.get(entry.component)
        if step is None:
            step = steps[entry.component] = _Step(entry.component)
        if kind == "step_start":
            step.state, step.started = "running", _epoch(entry.timestamp)
        elif kind == "retry_attempt":
            attempt = meta.get("attempt")
            if isinstance(attempt, int) and not isinstance(attempt, bool):
                step.attempt = attempt + 1
            step.state = "running"
        else:
            step.state = "ok" if kind == "step_complete" else "failed"
            latency = meta.get("latency_ms")
            if isinstance(latency, int | float) and not isinstance(latency, bool):
                step.latency_ms = float(latency)
    for name, step in steps.items():
        component = totals.get(name)
        step.tokens = component.tokens if component is not None else 0
        step.cost = step_cost(component)
    return list(steps.values())
