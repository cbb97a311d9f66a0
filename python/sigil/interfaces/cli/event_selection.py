"""Which events ``sigil monitor`` lists, and where they are read from (issue 12).

``--all``, ``--tail N``, ``--since TIME``, ``--component``, ``--event-type`` and
``--errors`` *select* events for the modes that list them (``stream``, and
``json`` with ``--json-events``). They never add anything up: every number
still comes from the monitor's one native session model (contract 12).

Events are read by a second tailer of the same log, lined up with the model
by how many events each has read: :class:`EventFeed` starts where the model's
catch-up stopped (its checkpoint) and hands out, after each of the model's
updates, exactly the events the model has folded since, so a burst larger than
the model's recent-events ring is listed whole. :func:`history` reads the
events the catch-up folded, from the oldest rotated segment, for ``--all``,
``--tail`` and ``--since``.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sigil.interfaces.cli.monitor import EntryLike
    from sigil.telemetry.log_parser import ParsedEntry, SessionTailer

__all__ = ["ERROR_EVENTS", "EventFeed", "EventSelection", "history", "parse_since", "parse_tail"]

#: ``--errors``: the events of a failure and of a retry.
ERROR_EVENTS = frozenset({"step_error", "session_error", "retry_attempt"})

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, now: datetime | None = None) -> datetime | None:
    """``--since``: an ISO time (no offset: local time) or a duration back from
    ``now`` (``90s``, ``10m``, ``1h30m``, ``2d``); None when it is neither."""
    text = text.strip()
    if not text:
        return None
    if _DURATION.fullmatch(text) or re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+", text):
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(text))
        try:
            return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        except OverflowError:
            return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as a user types it
    return moment


def parse_tail(text: str) -> int | None:
    """``--tail``: a whole number of events, 0 or more; None otherwise."""
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        return None
    return int(text)


@dataclass(frozen=True, slots=True)
class EventSelection:
    """What the event-listing modes show: which events of the past (``all``,
    ``tail``, ``since``) and which kinds (``components``, ``event_types``,
    ``errors``: each an extra condition an event must meet)."""

    all: bool = False
    tail: int | None = None
    since: datetime | None = None
    components: frozenset[str] = frozenset()
    event_types: frozenset[str] = frozenset()
    errors: bool = False

    @property
    def history(self) -> bool:
        """Events from before the monitor caught up are listed (not only the last few)."""
        return self.all or self.tail is not None or self.since is not None

    @property
    def filters(self) -> bool:
        return bool(self.components or self.event_types or self.errors or self.since)

    @property
    def given(self) -> bool:
        return self.history or self.filters

    def accepts(self, entry: EntryLike) -> bool:
        if self.components and entry.component not in self.components:
            return False
        if self.event_types and entry.event_type not in self.event_types:
            return False
        if self.errors and entry.event_type not in ERROR_EVENTS:
            return False
        if self.since is not None:
            from sigil.interfaces.cli.monitor import parse_timestamp

            moment = parse_timestamp(entry.timestamp)
            if moment is None or moment < self.since:
                return False
        return True

    def select(self, entries: list[EntryLike]) -> list[EntryLike]:
        if not self.filters:
            return entries
        return [e for e in entries if self.accepts(e)]


def history(
    session_id: str,
    log_path: str | os.PathLike[str],
    lines: int,
    selection: EventSelection,
    *,
    stopping: object = None,
    batch_lines: int = 8192,
) -> Iterator[list[ParsedEntry]]:
    """The selected events among the session's first ``lines`` lines (those the
    model's catch-up folded: ``SessionSnapshot.lines``), oldest first, in
    batches. With ``tail`` only the last ``tail`` selected ones come, at the
    end (memory bounded by ``tail``).

    ``stopping``, a callable, is asked between batches: True ends the reading.
    """
    from sigil.telemetry.log_parser import SessionTailer

    reader = SessionTailer(session_id, log_path)
    remaining = lines
    kept: deque[ParsedEntry] | None = None
    if selection.tail is not None:
        kept = deque(maxlen=selection.tail)
    while remaining > 0 and not (callable(stopping) and stopping()):
        # A new generator each time reads at most the lines asked for (the
        # first one starts at the oldest rotated segment), never past ``lines``.
        result = next(reader.iter_existing(min(batch_lines, remaining)), None)
        if result is None:
            break
        remaining -= len(result.entries) + len(result.malformed)
        chosen: list[ParsedEntry] = selection.select(result.entries)  # type: ignore[arg-type,assignment]
        if kept is not None:
            kept.extend(chosen)
        elif chosen:
            yield chosen
    if kept:
        yield list(kept)


class EventFeed:
    """Every event the model folds after its catch-up, each once and in order:
    a tailer of the same log started at the model's checkpoint, read up to the
    model's count of lines (``SessionSnapshot.lines``: events and lines that are
    not) after each update."""

    def __init__(self, tailer: SessionTailer, folded: int) -> None:
        self._tailer = tailer
        #: lines of the session read (by the catch-up, then here) so far
        self.count = folded

    @classmethod
    def after_catch_up(
        cls,
        session_id: str,
        log_path: str | os.PathLike[str],
        model_tailer: SessionTailer,
        folded: int,
    ) -> EventFeed:
        from sigil.telemetry.log_parser import SessionTailer

        return cls(
            SessionTailer(session_id, log_path, checkpoint=model_tailer.checkpoint(), resume=True),
            folded,
        )

    def take(self, upto: int) -> list[ParsedEntry]:
        """The events of the lines after those read, up to the model's ``upto``."""
        taken: list[ParsedEntry] = []
        while self.count < upto:
            result = self._tailer.read(min(upto - self.count, 65536))
            read = len(result.entries) + len(result.malformed)
            if not read:
                break
            taken.extend(result.entries)
            self.count += read
        return taken
