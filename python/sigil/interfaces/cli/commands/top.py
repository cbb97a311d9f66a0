"""``sigil top``: every live session on the machine in one table, refreshed live.

A session is live while a writer holds its lock (contract 7): a ``sigil
orchestrate`` run, a ``sigil proxy``/``sigil run``, or code using the Python
API. Each live session is followed by its own native session model, fed
incrementally as its log grows (contract 12: every number on the screen is the
model's), and a session that ends while ``top`` watches stays listed with its
final status. Keys: ``q`` quit, ``s`` cycle the sort, up/down select, Enter
opens the selected session's monitor (``top`` comes back when it exits).
``sigil sessions --watch`` is the same view.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sigil.interfaces.cli.errors import UsageFailure

if TYPE_CHECKING:  # pragma: no cover
    from sigil.telemetry.log_parser import SessionModel, SessionSnapshot

#: The orders ``s`` cycles through (and ``--sort`` takes).
SORTS = ("tokens", "budget", "rate", "errors", "session")
#: Seconds of event time the recent rate covers (the monitor's window).
RATE_WINDOW_S = 60.0


@dataclass(slots=True)
class TopRow:
    """One session as the table shows it; every number from its snapshot."""

    session_id: str
    status: str
    live: bool
    run: int | None
    tokens: int
    budget: int | None
    #: tokens per minute over the last minute of event time (None: not yet known)
    rate_per_min: float | None
    errors: int
    step: str | None
    last_event: str | None
    #: the session's cost, as the model sums it (display.format_cost shows it)
    cost_nanousd: int = 0
    priced_events: int = 0
    unpriced_tokens: int = 0
    #: model calls whose usage the upstream did not report (never counted as 0)
    unknown_usage_calls: int = 0
    #: the model's step loops (``StepLoop.to_dict()``), oldest run first
    loops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def budget_fraction(self) -> float | None:
        return self.tokens / self.budget if self.budget else None

    def to_dict(self) -> dict[str, Any]:
        from sigil.telemetry.pricing import usd

        return {
            "session_id": self.session_id,
            "status": self.status,
            "live": self.live,
            "run": self.run,
            "tokens_used": self.tokens,
            "budget": self.budget,
            "budget_fraction": self.budget_fraction,
            "tokens_per_minute": self.rate_per_min,
            "errors": self.errors,
            "cost_usd": usd(self.cost_nanousd) if self.priced_events else None,
            "unpriced_tokens": self.unpriced_tokens,
            "unknown_usage_calls": self.unknown_usage_calls,
            "loops": self.loops,
            "step_in_flight": self.step,
            "last_event_at": self.last_event,
        }


def _row(session_id: str, snap: SessionSnapshot, live: bool) -> TopRow:
    from sigil.telemetry.log_parser import run_status

    idle = 0.0
    if live and snap.last_timestamp:
        try:
            last = datetime.fromisoformat(snap.last_timestamp)
            idle = max(0.0, (datetime.now(UTC) - last).total_seconds())
        except ValueError:
            idle = 0.0
    rate = snap.recent_tokens_per_second(RATE_WINDOW_S, idle)
    in_flight = snap.in_flight if live else None
    status = run_status(snap.run, writer_gone=not live) if snap.run_count else snap.status
    if live and status != "running" and snap.run.ended_at is None:
        status = "running"
    return TopRow(
        session_id=session_id,
        status=status,
        live=live,
        run=snap.run.number if snap.run_count else None,
        tokens=snap.tokens,
        budget=snap.budget,
        rate_per_min=None if rate is None else rate * 60.0,
        errors=snap.event_counts.get("step_error", 0),
        step=in_flight.component if in_flight is not None else None,
        last_event=snap.last_timestamp,
        cost_nanousd=snap.cost_nanousd,
        priced_events=snap.priced_events,
        unpriced_tokens=snap.unpriced_tokens,
        unknown_usage_calls=snap.unknown_usage_calls,
        loops=[loop.to_dict() for loop in snap.loops],
    )


class LiveSessions:
    """The live sessions under ``log_path``, each followed by its own model."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._models: dict[str, SessionModel] = {}
        #: sessions that ended while watched: their last row, kept on screen
        self._ended: dict[str, TopRow] = {}

    def _live_ids(self) -> list[str]:
        from sigil.core.locks import is_session_locked
        from sigil.core.paths import LOCK_FILE_NAME, SESSION_ID_RE

        root = os.path.join(self.log_path, "sessions")
        try:
            entries = list(os.scandir(root))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise UsageFailure(f"log path {str(self.log_path)!r} is not a directory") from None
        except PermissionError:
            raise UsageFailure(f"cannot list {root!r}: permission denied") from None
        live = []
        for entry in entries:
            if not SESSION_ID_RE.fullmatch(entry.name):
                continue
            if not os.path.exists(os.path.join(entry.path, LOCK_FILE_NAME)):
                continue
            if is_session_locked(entry.path):
                live.append(entry.name)
        return live

    def rows(self) -> list[TopRow]:
        from sigil.telemetry.log_parser import SessionModel

        live = set(self._live_ids())
        rows: dict[str, TopRow] = dict(self._ended)
        for session_id in sorted(live | set(self._models)):
            model = self._models.get(session_id)
            if model is None:
                try:
                    model = SessionModel(session_id, self.log_path, last_n=100)
                except OSError:
                    continue
                self._models[session_id] = model
            try:
                snap = model.update()
            except OSError:
                continue
            row = _row(session_id, snap, session_id in live)
            rows[session_id] = row
            if session_id not in live:
                # Its writer is gone: keep its final row, stop following it.
                self._ended[session_id] = row
                self._models.pop(session_id, None)
        return list(rows.values())

    def close(self) -> None:
        self._models.clear()


def sort_rows(rows: list[TopRow], order: str) -> list[TopRow]:
    """Live sessions first, then by ``order`` (largest first; ``session`` by name)."""
    if order == "session":
        return sorted(rows, key=lambda r: (not r.live, r.session_id))
    key = {
        "tokens": lambda r: r.tokens,
        "budget": lambda r: r.budget_fraction or 0.0,
        "rate": lambda r: r.rate_per_min or 0.0,
        "errors": lambda r: r.errors,
    }[order]
    return sorted(rows, key=lambda r: (not r.live, -key(r), r.session_id))


_HEADERS = (
    "SESSION", "STATUS", "RUN", "TOKENS", "BUDGET", "USED", "TOK/MIN", "COST", "ERR", "NOW",
)  # fmt: skip


def table_lines(rows: list[TopRow]) -> list[str]:
    """The table as plain text lines (header first), columns sized to fit."""
    from sigil.interfaces.cli.display import format_cost, unknown_text
    from sigil.interfaces.cli.screen import shown

    cells = [_HEADERS]
    for r in rows:
        fraction = r.budget_fraction
        unknown = f" {unknown_text(r.unknown_usage_calls)}" if r.unknown_usage_calls else ""
        cells.append(
            (
                r.session_id,
                r.status + ("+loop" if r.loops else ""),
                "-" if r.run is None else str(r.run),
                f"{r.tokens:,}{unknown}",
                "-" if r.budget is None else f"{r.budget:,}",
                "-" if fraction is None else f"{fraction * 100:.1f}%",
                "-" if r.rate_per_min is None else f"{r.rate_per_min:,.0f}",
                format_cost(r),
                str(r.errors),
                shown(r.step) if r.step else "-",
            )
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(_HEADERS))]
    right = {2, 3, 4, 5, 6, 7, 8}
    return [
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in cells
    ]


@click.command("top", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-path", "-l", metavar="DIR", help="Base log directory (default: logging.path).")
@click.option(
    "--refresh-rate",
    type=click.FloatRange(0.05, 60.0),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between redraws.",
)
@click.option("--sort", "order", type=click.Choice(SORTS), default="tokens", show_default=True)
@click.option("--once", is_flag=True, help="Print the table once and exit (no terminal needed).")
@click.option("--json", "as_json", is_flag=True, help="With --once: one JSON array of sessions.")
def top(log_path: str | None, refresh_rate: float, order: str, once: bool, as_json: bool) -> None:
    """Every live session on this machine: tokens, budget used, recent rate,
    status, errors and the step in flight, refreshed live.

    \b
    Keys: q quit, s cycle the sort, up/down select, Enter open the session's
    monitor (top comes back when it exits).

    \b
    Examples:
      sigil top
      sigil top --sort rate --refresh-rate 0.5
      sigil top --once --json
    """
    from sigil.core.config import load_settings

    if as_json and not once:
        raise UsageFailure("--json needs --once (the live table is for a terminal)")
    settings = load_settings({"logging.path": log_path})
    sessions = LiveSessions(Path(settings.logging.path))
    if once:
        rows = sort_rows(sessions.rows(), order)
        if as_json:
            import json

            click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        elif rows:
            for line in table_lines(rows):
                click.echo(line)
        else:
            click.echo(f"no live sessions in {settings.logging.path}")
        return
    if not (sys.stdout.isatty() and sys.stdin.isatty()):
        raise UsageFailure("sigil top needs a terminal; use --once (or --once --json) otherwise")
    _Screen(sessions, refresh_rate, order).run()


class _Screen:
    """The live table on the terminal: the alternate screen, synchronized
    output, keys in cbreak mode; the terminal restored on every way out."""

    def __init__(self, sessions: LiveSessions, refresh_rate: float, order: str) -> None:
        self.sessions = sessions
        self.refresh_rate = refresh_rate
        self.order = order
        self.selected = 0
        self.rows: list[TopRow] = []

    def run(self) -> None:
        import signal

        from sigil.interfaces.cli.keys import TerminalKeys

        def stop(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, stop)
        keys = TerminalKeys(sys.stdin.fileno())
        try:
            self._enter(keys)
            self._loop(keys)
        except KeyboardInterrupt:
            pass
        finally:
            self._leave(keys)
            signal.signal(signal.SIGTERM, previous)
            self.sessions.close()

    def _enter(self, keys: Any) -> None:
        keys.enter()
        sys.stdout.write("\x1b[?1049h\x1b[?25l")
        sys.stdout.flush()

    def _leave(self, keys: Any) -> None:
        sys.stdout.write("\x1b[?25h\x1b[?1049l")
        sys.stdout.flush()
        keys.restore()

    def _loop(self, keys: Any) -> None:
        import select

        next_refresh = 0.0
        while True:
            now = time.monotonic()
            if now >= next_refresh:
                self.rows = sort_rows(self.sessions.rows(), self.order)
                next_refresh = now + self.refresh_rate
            self._draw()
            timeout = max(0.0, next_refresh - time.monotonic())
            try:
                ready, _, _ = select.select([keys.fd], [], [], timeout)
            except InterruptedError:
                continue
            if not ready:
                continue
            for key in keys.read():
                if key == "q":
                    return
                if key == "s":
                    self.order = SORTS[(SORTS.index(self.order) + 1) % len(SORTS)]
                    self.rows = sort_rows(self.rows, self.order)
                elif key == "up":
                    self.selected = max(0, self.selected - 1)
                elif key == "down":
                    self.selected = min(max(0, len(self.rows) - 1), self.selected + 1)
                elif key == "enter" and self.rows:
                    self._open(keys, self.rows[min(self.selected, len(self.rows) - 1)])
                    next_refresh = 0.0

    def _open(self, keys: Any, row: TopRow) -> None:
        """The session's monitor in this terminal; top comes back when it exits."""
        import signal
        import subprocess

        self._leave(keys)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the monitor's
        try:
            argv = [sys.executable, "-m", "sigil", "monitor", "--session", row.session_id]
            argv += ["--log-path", str(self.sessions.log_path)]
            subprocess.run(argv, check=False, preexec_fn=_default_sigint)
        finally:
            signal.signal(signal.SIGINT, previous)
            self._enter(keys)

    def _draw(self) -> None:
        import shutil

        from sigil.interfaces.cli.screen import crop

        cols, lines = shutil.get_terminal_size((80, 24))
        clock = datetime.now().strftime("%H:%M:%S")
        live = sum(1 for r in self.rows if r.live)
        head = f"SIGIL TOP  {live} live session{'s' if live != 1 else ''}  sort: {self.order}"
        out = [head + clock.rjust(max(1, cols - len(head)))]
        body = table_lines(self.rows) if self.rows else ["", "  no live sessions"]
        room = max(1, lines - 3)
        out.append(body[0])
        self.selected = min(self.selected, max(0, len(self.rows) - 1))
        for i, text in enumerate(body[1:room]):
            line = crop(text, cols)
            if self.rows and i == self.selected:
                line = "\x1b[7m" + line.ljust(cols) + "\x1b[0m"
            out.append(line)
        while len(out) < lines - 1:
            out.append("")
        out.append(crop("q quit  s sort  ↑↓ select  enter monitor", cols))
        esc = "\x1b"
        frame = "\x1b[H" + "\n".join((x if esc in x else crop(x, cols)) + "\x1b[K" for x in out)
        sys.stdout.write("\x1b[?2026h" + frame + "\x1b[J\x1b[?2026l")
        sys.stdout.flush()


def _default_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
