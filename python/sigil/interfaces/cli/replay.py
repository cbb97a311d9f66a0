"""``sigil replay``: a finished session played through the live dashboard (issue 13).

Two halves, as in the monitor:

* :class:`Timeline` is the session's log as lines, in the order the live reader
  folds them (rotated segments oldest first, then the live file), read from
  the session's directory or from its archive in memory (nothing extracted),
  each line with the moment it was written (its event's timestamp, read by the
  native parser) for pacing only.
* :class:`Player` feeds those lines, as bytes, into one native ``Fold`` -- the
  model the monitor feeds -- at the chosen speed, and shows its snapshots with
  the monitor's :class:`SessionState` and renderers. Every number on the screen
  is the fold's (contract 12); this module only decides *when* a line is fed.

Pacing: the gap between two events' timestamps divided by the speed, each gap
capped (``max_gap``, 2 s by default) so that a long idle stretch does not stall
a demo; ``speed=None`` is ``--speed max``. The dashboard's clock, elapsed time,
"stalled" and rates read the replay's moment of the session, not the wall clock.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import select
import signal
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from types import FrameType

    from sigil.interfaces.cli.display import Renderer
    from sigil.interfaces.cli.keys import TerminalKeys
    from sigil.interfaces.cli.monitor import MonitorPhase, SessionState
    from sigil.reports.sources import Source
    from sigil.telemetry.archived import Fold
    from sigil.telemetry.log_parser import ParsedEntry

__all__ = [
    "DEFAULT_MAX_GAP",
    "STEP_KEYS",
    "Player",
    "ReplayError",
    "Timeline",
    "parse_speed",
]

#: The longest pause between two events on screen, in seconds, whatever their gap.
DEFAULT_MAX_GAP = 2.0
#: Keys that advance one event (pausing first when playing).
STEP_KEYS = frozenset({"n", "."})
#: An archived log member larger than this is not read (as ``reports.sources``).
_MAX_MEMBER_BYTES = 1 << 30
#: All the log an archive's replay reads (its members, segments gunzipped), together.
_MAX_TOTAL_BYTES = 1 << 30
_LOG = "execution.jsonl"


class ReplayError(Exception):
    """Why a session cannot be replayed, in one line."""


def parse_speed(text: str) -> float | None:
    """``10x``, ``10``, ``0.5x`` -> the factor; ``max`` -> None (no waiting).
    Raises :class:`ValueError` for anything else."""
    value = text.strip().lower()
    if value == "max":
        return None
    number = float(value.removesuffix("x"))  # ValueError when not a number
    if not 0 < number < float("inf"):
        raise ValueError(text)
    return number


# ---------------------------------------------------------------------------------------
# The session's lines
# ---------------------------------------------------------------------------------------


def _inflate(name: str, data: bytes, where: str, budget: int = _MAX_MEMBER_BYTES) -> bytes:
    """A segment's text: gunzipped when its contents are gzip (not its name),
    bounded (by ``budget`` too: what is left of an archive's total)."""
    if not data.startswith(b"\x1f\x8b"):
        return data
    cap = min(budget, _MAX_MEMBER_BYTES)
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as inner:
            text = inner.read(cap + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise ReplayError(f"cannot read {where}: {name}: {exc}") from None
    if len(text) > cap:
        if cap < _MAX_MEMBER_BYTES:
            _too_large(where)
        raise ReplayError(f"cannot read {where}: {name} is larger than {_MAX_MEMBER_BYTES} bytes")
    return text


def _too_large(archive: str) -> NoReturn:
    """An archive whose logs together pass :data:`_MAX_TOTAL_BYTES`: a usage
    error (exit 2, one line), refused before it is read or after the read
    that passed the total."""
    from sigil.interfaces.cli.errors import UsageFailure

    raise UsageFailure(
        f"cannot replay {archive}: its logs are larger than {_MAX_TOTAL_BYTES} bytes in all"
    )


def _directory_files(directory: Path) -> list[tuple[str, bytes]]:
    from sigil.core.paths import rotated_segments

    files: list[tuple[str, bytes]] = []
    for path, segment in [*((p, True) for p in rotated_segments(directory)),
                          (directory / _LOG, False)]:  # fmt: skip
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ReplayError(f"cannot read {path}: {exc.strerror or exc}") from None
        files.append((path.name, _inflate(path.name, data, str(directory)) if segment else data))
    return files


def _log_member(member: tarfile.TarInfo) -> tuple[tuple[int, Any], str] | None:
    """Where an archive member sorts among the session's log files, and its
    name, or None when it is not one of them."""
    from sigil.core.paths import segment_sort_key

    parts = member.name.split("/")
    if len(parts) != 2 or not member.isfile():
        return None
    name = parts[1]
    if name == _LOG:
        return (1, ()), name
    key = segment_sort_key(_LOG, name)
    return None if key is None else ((0, key), name)


def _archive_files(archive: Path) -> list[tuple[str, bytes]]:
    """The log files of an archived session, read from its tar.gz in memory:
    at most :data:`_MAX_TOTAL_BYTES` in all. The members' sizes are summed in
    a first pass over the headers (nothing kept), so that an archive over the
    total is refused before any of it is read."""
    found: list[tuple[tuple[int, Any], str, bytes]] = []
    try:
        for reading in (False, True):
            budget = _MAX_TOTAL_BYTES
            fd = os.open(archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
                for member in tar:
                    log = _log_member(member)
                    if log is None:
                        continue
                    order, name = log
                    if member.size > _MAX_MEMBER_BYTES:
                        raise ReplayError(
                            f"cannot read {archive}: {name} is larger than "
                            f"{_MAX_MEMBER_BYTES} bytes"
                        )
                    if member.size > budget:
                        _too_large(str(archive))
                    if not reading:
                        budget -= member.size
                        continue
                    extracted = tar.extractfile(member)
                    if extracted is None:
                        continue
                    data = extracted.read()
                    if order[0] == 0:
                        data = _inflate(name, data, str(archive), budget)
                    budget -= len(data)
                    found.append((order, name, data))
    except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:
        raise ReplayError(f"cannot read {archive}: {exc}") from None
    found.sort(key=lambda item: item[0])
    return [(name, data) for _, name, data in found]


@dataclass(slots=True)
class _Line:
    file: int
    start: int
    end: int
    #: the event's time (seconds since the epoch), None for a line that is no event
    at: float | None
    #: seconds since the event before it (0 when either has no time)
    gap: float
    #: a ``session_start`` (where a run may begin)
    opens_run: bool


class Timeline:
    """A session's log lines in fold order, each with its event's moment."""

    def __init__(self, session_id: str, files: list[tuple[str, bytes]]) -> None:
        from sigil.interfaces.cli.monitor import parse_timestamp
        from sigil.telemetry.log_parser import parse_bytes

        self.session_id = session_id
        self.files = [data for _, data in files]
        self.lines: list[_Line] = []
        last: float | None = None
        for index, data in enumerate(self.files):
            # Only each event's time and type are kept (a line's event is parsed
            # again, natively, when a view lists it): a long session stays small.
            by_offset = {
                e.offset: (e.timestamp, e.event_type == "session_start")
                for e in parse_bytes(data).entries
            }
            pos, size = 0, len(data)
            while pos < size:
                nl = data.find(b"\n", pos)
                end = size if nl < 0 else nl + 1
                stamp, opens_run = by_offset.get(pos, (None, False))
                moment = parse_timestamp(stamp)
                at = moment.timestamp() if moment is not None else None
                gap = 0.0 if at is None or last is None else max(0.0, at - last)
                if at is not None:
                    last = at
                self.lines.append(_Line(index, pos, end, at, gap, opens_run))
                pos = end

    def moment_before(self, index: int) -> float | None:
        """The time of the latest event before line ``index``."""
        for i in range(min(index, len(self.lines)) - 1, -1, -1):
            at = self.lines[i].at
            if at is not None:
                return at
        return None

    @classmethod
    def of(cls, source: Source) -> Timeline:
        if source.archived:
            files = _archive_files(Path(source.key))
        else:
            files = _directory_files(Path(source.key))
        if not files:
            raise ReplayError(f"session {source.session_id!r} has no log to replay")
        return cls(source.session_id, files)

    def _blocks(self, first: int, stop: int) -> Iterator[tuple[bytes, int]]:
        """Lines ``first`` up to ``stop`` as blocks of bytes, one per file, and
        where each starts in its file."""
        i = first
        while i < stop:
            line = self.lines[i]
            j = i
            while j + 1 < stop and self.lines[j + 1].file == line.file:
                j += 1
            yield self.files[line.file][line.start : self.lines[j].end], line.start
            i = j + 1

    def feed(self, fold: Fold, first: int, stop: int) -> None:
        """Fold lines ``first`` up to ``stop`` (each file's run of them in one call)."""
        for block, offset in self._blocks(first, stop):
            fold.feed_bytes(block, offset)

    def entries(self, first: int, stop: int) -> list[ParsedEntry]:
        """The events of lines ``first`` up to ``stop``, parsed natively."""
        from sigil.telemetry.log_parser import parse_bytes

        found: list[ParsedEntry] = []
        for block, offset in self._blocks(first, stop):
            found.extend(parse_bytes(block, offset).entries)
        return found

    def run_range(self, number: int) -> tuple[int, int]:
        """The lines of run ``number`` (as the model numbers runs): from its
        ``session_start`` up to the next one. Raises :class:`ReplayError`."""
        from sigil.telemetry.archived import Fold

        starts = [i for i, line in enumerate(self.lines) if line.opens_run]
        fold = Fold(0)
        done = 0
        numbers: list[int] = []
        for k, start in enumerate(starts):
            # The model says which run a session_start opened: fold up to it.
            self.feed(fold, done, start + 1)
            done = start + 1
            got = fold.snapshot().run.number
            numbers.append(got)
            if got == number:
                end = starts[k + 1] if k + 1 < len(starts) else len(self.lines)
                return start, end
        known = ", ".join(str(n) for n in numbers) or "none"
        raise ReplayError(f"session {self.session_id!r} has no run {number} (its runs: {known})")


# ---------------------------------------------------------------------------------------
# The player
# ---------------------------------------------------------------------------------------


class _Terminated(Exception):
    pass


def _phase_of(state: SessionState) -> MonitorPhase:
    from sigil.interfaces.cli.monitor import MonitorPhase

    if state.ended:
        return MonitorPhase.FINAL
    if state.status == "running":
        return MonitorPhase.TRACKING
    return MonitorPhase.WAITING


def _outcome(state: SessionState) -> str:
    """The played run's final status, as the monitor words it."""
    if state.ended:
        if state.status == "complete" and (state.seq_missing or state.dropped_events):
            return "incomplete_data"
        return state.status
    if state.incomplete:
        return "incomplete"
    return state.display_status


class Player:
    """Plays a :class:`Timeline` (lines ``first`` to ``stop``; those before
    ``first`` are folded at once) through a renderer, reading keys when given."""

    def __init__(
        self,
        timeline: Timeline,
        renderer: Renderer,
        *,
        speed: float | None,
        max_gap: float = DEFAULT_MAX_GAP,
        first: int = 0,
        stop: int | None = None,
        refresh_rate: float = 0.05,
        default_budget: int = 256_000,
        last_n: int = 100,
        keys: TerminalKeys | None = None,
        label: str = "",
        start_paused: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from sigil.interfaces.cli.display import DashboardRenderer
        from sigil.interfaces.cli.monitor import SessionState

        self.timeline = timeline
        self.renderer = renderer
        self.dashboard = renderer if isinstance(renderer, DashboardRenderer) else None
        # The lines before ``first`` are history: a stream lists only those played.
        renderer.replaying = True
        self.speed = speed
        self.max_gap = max(0.0, max_gap)
        self.first = first
        self.stop = len(timeline.lines) if stop is None else stop
        self.refresh_rate = refresh_rate
        self.keys = keys
        self.label = label
        self.start_paused = start_paused
        self._clock = clock
        from sigil.telemetry.archived import Fold

        self.fold = Fold(last_n)
        timeline.feed(self.fold, 0, first)
        self.cursor = first
        self.state: SessionState = SessionState(
            timeline.session_id,
            default_budget=default_budget,
            max_events=last_n,
            snapshot=self.fold.snapshot(),
        )
        # A replayed writer is there until the last line (contract 7's "running").
        self.state.locked = True
        self.phase = _phase_of(self.state)
        self.paused = False
        self.finished = False
        #: when the line at the cursor is due (monotonic seconds)
        self.next_due = 0.0
        self._paused_left = 0.0
        #: the moment shown while paused
        self._frozen_at: float | None = None
        #: the time of the latest event folded
        self._last_at = timeline.moment_before(first)
        self._resized = False
        if self.dashboard is not None:
            self.dashboard.clock = self.moment
        # Every mode's clock (elapsed, stalled, rates) is the replay's moment.
        self.state.clock = self.moment

    # -- pacing ----------------------------------------------------------------------------

    def delay(self, index: int) -> float:
        """Seconds to wait before line ``index``: its gap since the event before
        it, divided by the speed, at most ``max_gap``."""
        if self.speed is None or index >= self.stop:
            return 0.0
        return min(self.timeline.lines[index].gap / self.speed, self.max_gap)

    def moment(self) -> datetime | None:
        """The moment of the session the replay has reached (the dashboard's 'now'):
        between the latest event folded and the next, as the wait for it goes by."""
        last = self._last_at
        if last is None:
            return None
        at = last
        if self._frozen_at is not None:
            at = self._frozen_at
        elif not self.finished and self.cursor < self.stop:
            line = self.timeline.lines[self.cursor]
            wait = self.delay(self.cursor)
            if line.at is not None and line.at > last and wait > 0:
                left = max(0.0, self.next_due - self._clock())
                at = last + (line.at - last) * max(0.0, min(1.0, 1 - left / wait))
        return datetime.fromtimestamp(at).astimezone()

    # -- feeding ---------------------------------------------------------------------------

    def _advance(self, upto: int) -> None:
        """Fold the lines before ``upto`` not folded yet; show the new snapshot."""
        upto = min(upto, self.stop)
        first = self.cursor
        if upto <= first:
            return
        self.timeline.feed(self.fold, first, upto)
        self.cursor = upto
        self._last_at = self.timeline.moment_before(upto) or self._last_at
        state = self.state
        fresh: list[Any] = list(state.update(self.fold.snapshot()))
        if self.renderer.lists_events:
            # Every event fed, even a burst larger than the model's recent ring.
            fresh = list(self.timeline.entries(first, upto))
            state.unlisted = 0
        self.phase = _phase_of(state)
        self.renderer.on_events(state, fresh)

    def _due(self, now: float) -> int:
        """The index past the last line due at ``now``; ``next_due`` moves along."""
        i, due = self.cursor, self.next_due
        while i < self.stop and due <= now:
            i += 1
            due += self.delay(i)
        self.next_due = due
        return i

    def step(self) -> None:
        """One line further (pausing first); its frame drawn at once."""
        if self.finished:
            return
        self.pause()
        self._advance(self.cursor + 1)
        self._frozen_at = self._last_at
        self._paused_left = self.delay(self.cursor)
        if self.cursor >= self.stop:
            self._end()
        self._draw(force=True)

    def pause(self) -> None:
        if self.paused:
            return
        moment = self.moment()
        self._frozen_at = moment.timestamp() if moment is not None else None
        self._paused_left = max(0.0, self.next_due - self._clock())
        self.paused = True
        if self.dashboard is not None:
            self.dashboard.view.paused = True

    def resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        self._frozen_at = None
        self.next_due = self._clock() + self._paused_left
        if self.dashboard is not None:
            self.dashboard.view.paused = False

    def _end(self) -> None:
        """The last line is in: the writer is gone, as a live monitor would find."""
        self.finished = True
        self._frozen_at = None
        state = self.state
        state.locked = False
        if state.status == "running":
            state.incomplete = True
        self.phase = _phase_of(state)

    # -- the screen ------------------------------------------------------------------------

    def status_text(self) -> str:
        total = self.stop - self.first
        done = self.cursor - self.first
        speed = "max" if self.speed is None else f"{self.speed:g}x"
        if self.finished:
            return f"replay {self.label}: finished, {done:,} of {total:,} lines · q quits"
        text = f"replay {self.label} at {speed}: {done:,} of {total:,} lines"
        if self.paused:
            text += " · paused: n steps one event, p plays"
        elif self.dashboard is not None and self.dashboard.view.help:
            text += " · p pauses the replay, n or . steps one event"
        return text

    def _draw(self, *, force: bool = False, changed: bool = True) -> None:
        dashboard = self.dashboard
        if dashboard is None:
            # As the monitor: ``changed`` when events came in since the last
            # frame (a pipe gets a line per change, not per tick of the clock).
            self.renderer.refresh(self.state, self.phase, changed)
            return
        dashboard.notice(self.status_text())
        if force:
            dashboard.redraw(self.state, self.phase)
        else:
            dashboard.refresh(self.state, self.phase, True)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Play to the end (or until ``q``); returns the exit code."""
        from sigil.interfaces.cli.monitor import EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED

        renderer = self.renderer
        installed = self._install_signals()
        code, outcome = EXIT_OK, "stopped"
        try:
            renderer.caught_up(self.state, self.phase)
            if self.cursor >= self.stop:
                self._end()
            self.next_due = self._clock() + self.delay(self.cursor)
            if self.start_paused and not self.finished:
                self.pause()
            code, outcome = self._loop()
        except KeyboardInterrupt:
            code, outcome = EXIT_INTERRUPTED, "stopped"
        except _Terminated:
            code, outcome = EXIT_TERMINATED, "stopped"
        finally:
            self._remove_signals(installed)
        with contextlib.suppress(Exception):
            renderer.finish(self.state, self.phase, outcome, code)
        return code

    def _loop(self) -> tuple[int, str]:
        from sigil.interfaces.cli.monitor import EXIT_OK

        keys = self.keys
        next_frame = 0.0
        dirty = True
        while True:
            now = self._clock()
            playing = not self.paused and not self.finished
            if playing:
                upto = self._due(now)
                if upto > self.cursor:
                    self._advance(upto)
                    dirty = True
                if self.cursor >= self.stop:
                    self._end()
                    playing, dirty = False, True
            if self._resized:
                self._resized = False
                self.renderer.resized()
                dirty = True
            if self.finished and keys is None:
                self._draw(force=True)
                return EXIT_OK, _outcome(self.state)
            # While playing, a frame each refresh (the clock moves along);
            # paused or at the end, a frame when something changed.
            if (playing and now >= next_frame) or (dirty and not playing):
                self._draw(force=True, changed=dirty)
                dirty = False
                next_frame = now + self.refresh_rate
            timeout = 0.25
            if playing:
                timeout = max(0.0, min(next_frame, self.next_due) - now)
            if keys is None:
                time.sleep(min(timeout, 0.25))
                continue
            try:
                ready, _, _ = select.select([keys.fd], [], [], min(timeout, 0.25))
            except InterruptedError:
                continue
            if not ready:
                continue
            for key in keys.read():
                if self._key(key) == "quit":
                    return EXIT_OK, _outcome(self.state) if self.finished else "stopped"
                dirty = True

    def _key(self, key: str) -> str | None:
        dashboard = self.dashboard
        if dashboard is None:
            if key in STEP_KEYS:
                self.step()
            return "quit" if key == "q" else None
        view = dashboard.view
        if key in STEP_KEYS and not (view.typing or view.help):
            self.step()
            return None
        was_paused = view.paused
        action = dashboard.key(key, self.state, self.phase)
        if view.paused != was_paused:
            # p pauses the replay itself, not only the screen.
            view.paused = was_paused
            if was_paused:
                self.resume()
            else:
                self.pause()
            self._draw(force=True)
        return action

    # -- signals ---------------------------------------------------------------------------

    def _install_signals(self) -> list[tuple[int, Any]]:
        installed: list[tuple[int, Any]] = []

        def term(signum: int, frame: FrameType | None) -> None:
            raise _Terminated

        def winch(signum: int, frame: FrameType | None) -> None:
            self._resized = True

        def tstp(signum: int, frame: FrameType | None) -> None:
            suspend = getattr(self.renderer, "suspend", None)
            if suspend is not None:
                suspend()
            if self.keys is not None:
                self.keys.restore()
            os.kill(os.getpid(), signal.SIGSTOP)  # returns once continued
            if self.keys is not None:
                self.keys.enter()
            self._resized = True

        handlers: list[tuple[int, Any]] = [(signal.SIGTERM, term)]
        if hasattr(signal, "SIGWINCH"):
            handlers.append((signal.SIGWINCH, winch))
        if self.keys is not None and hasattr(signal, "SIGTSTP"):
            handlers.append((signal.SIGTSTP, tstp))
        for signum, handler in handlers:
            try:
                installed.append((signum, signal.signal(signum, handler)))
            except (ValueError, OSError):
                continue
        return installed

    @staticmethod
    def _remove_signals(installed: list[tuple[int, Any]]) -> None:
        for signum, previous in installed:
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, previous)
