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
from typing import TYPE_CHECKING, Any

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
    from sigil.core.moments import parse_moment

    return parse_moment(text)  # the same reading as sigil report's --since


#: The largest --tail honoured as given (more events than any log holds).
MAX_TAIL = 2**62


def parse_tail(text: str) -> int | None:
    """``--tail``: a whole number of events, 0 or more; None otherwise."""
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        return None
    # More than any log holds means every event; bounded so the deque and the
    # native scan's u64 take it.
    return min(int(text), MAX_TAIL)


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
    end: Any = None,
) -> Iterator[list[ParsedEntry]]:
    """The selected events among the session's first ``lines`` lines (those the
    model's catch-up folded: ``SessionSnapshot.lines``), oldest first, in
    batches. With ``tail`` only the last ``tail`` selected ones come, at the
    end (memory bounded by ``tail``).

    ``end``, the model's checkpoint where its catch-up stopped: with it,
    ``tail`` and ``since`` find where to start in the live file natively
    (reading back from ``end``, or bisecting on the timestamps) and read only
    from there; the whole history is read only when they reach back into the
    rotated segments.

    ``stopping``, a callable, is asked between batches: True ends the reading.
    """
    if end is not None and selection.tail is not None:
        last = _tail_from_the_end(session_id, log_path, selection, end, stopping)
        if last is not None:
            if last:
                yield last
            return
    elif end is not None and selection.since is not None:
        start = _since_from_the_end(session_id, log_path, selection.since, end)
        if start is not None:
            _, path = _live_file(session_id, log_path)
            for batch in _read_range(path, start, end, stopping):
                picked: list[ParsedEntry] = selection.select(batch)  # type: ignore[arg-type,assignment]
                if picked:
                    yield picked
            return
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


#: ``--tail`` with filters reads back this many times more lines each time it finds too few.
_TAIL_GROWTH = 8
#: Bytes of the log parsed at a time by ``--tail`` / ``--since``.
_READ_CHUNK = 4 << 20


def _live_file(session_id: str, log_path: str | os.PathLike[str]) -> tuple[Any, Any]:
    from sigil.core.paths import LOG_FILE_NAME, resolve_log_path

    session_dir = resolve_log_path(log_path) / "sessions" / session_id
    return session_dir, session_dir / LOG_FILE_NAME


def _tail_from_the_end(
    session_id: str,
    log_path: str | os.PathLike[str],
    selection: EventSelection,
    end: Any,
    stopping: object,
) -> list[ParsedEntry] | None:
    """``--tail``: the last selected events, read back from ``end`` (the
    model's checkpoint) in the live file, more each time too few are found;
    None when they may reach into a rotated segment or the file changed."""
    from sigil.core.paths import rotated_segments
    from sigil.telemetry import log_parser

    assert selection.tail is not None
    want = selection.tail
    if want == 0:
        return []
    session_dir, path = _live_file(session_id, log_path)
    back = want
    try:
        while True:
            found = log_parser.tail_start(path, end.offset, back, dev=end.dev, ino=end.ino)
            if found is None:
                return None
            start, count = found
            kept: deque[ParsedEntry] = deque(maxlen=want)
            for batch in _read_range(path, start, end, stopping):
                kept.extend(selection.select(batch))  # type: ignore[arg-type]
            if len(kept) >= want or count < back:
                break  # enough, or the live file's start was reached
            back *= _TAIL_GROWTH
    except OSError:
        return None
    if len(kept) < want and start == 0 and rotated_segments(session_dir):
        return None
    return list(kept)


def _since_from_the_end(
    session_id: str, log_path: str | os.PathLike[str], since: datetime, end: Any
) -> int | None:
    """``--since``: the offset of the first line of the live file
    at or after ``since`` (a second early: the events are filtered exactly
    afterwards), bisecting on the timestamps; None when earlier events may lie
    in a rotated segment or the file changed."""
    from sigil.core.paths import rotated_segments
    from sigil.telemetry import log_parser

    session_dir, path = _live_file(session_id, log_path)
    since_us = int(since.timestamp() * 1_000_000) - 1_000_000
    try:
        start = log_parser.since_start(path, end.offset, since_us, dev=end.dev, ino=end.ino)
    except OSError:
        return None
    if start is None or (start == 0 and rotated_segments(session_dir)):
        return None
    return int(start)


def _read_range(path: Any, start: int, end: Any, stopping: object) -> Iterator[list[ParsedEntry]]:
    """The events of the lines from ``start`` to ``end.offset`` of the live
    file ``path``, parsed natively a few MiB at a time; nothing when the file
    is no longer ``end``'s."""
    from sigil.telemetry import log_parser

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (end.dev, end.ino):
            return
        at, stop = start, end.offset
        carry = b""
        while at < stop and not (callable(stopping) and stopping()):
            data = os.pread(fd, min(_READ_CHUNK, stop - at), at)
            if not data:
                break
            base = at - len(carry)
            at += len(data)
            block = carry + data
            cut = block.rfind(b"\n") + 1
            carry = block[cut:]
            if cut:
                entries = log_parser.parse_bytes(block[:cut], base).entries
                if entries:
                    yield entries
    finally:
        os.close(fd)


class EventFeed:
    """Every event the model folds after its catch-up, each once and in order:
    a tailer of the same log started at the model's checkpoint, polled each
    time the model's tailer is (so both see a truncation or a rotation alike),
    its lines handed out up to the model's count of lines
    (``SessionSnapshot.lines``: events and lines that are not).

    After a truncation that kept the head of the file, the lines read again
    (an event whose ``seq`` is not past the last one seen before it) are
    skipped and not counted, as the model skips them.
    """

    def __init__(self, tailer: SessionTailer, folded: int, max_seq: int | None = None) -> None:
        self._tailer = tailer
        #: lines of the session handed out (by the catch-up, then here) so far
        self.count = folded
        #: lines read, not handed out yet: an event, or None for a line that is none
        self._pending: deque[ParsedEntry | None] = deque()
        #: the largest seq read (the catch-up's, to begin with)
        self._max_seq = max_seq
        self._truncations = int(tailer.stats().get("truncations", 0) or 0)
        #: after a truncation, events up to this seq are lines read again
        self._reread_upto: int | None = None

    @classmethod
    def after_catch_up(
        cls,
        session_id: str,
        log_path: str | os.PathLike[str],
        model_tailer: SessionTailer,
        folded: int,
        max_seq: int | None = None,
        last_offset: int | None = None,
    ) -> EventFeed:
        from sigil.telemetry.log_parser import SessionTailer

        checkpoint = model_tailer.checkpoint()
        back = _one_line_back(model_tailer, checkpoint, last_offset)
        if back is not None and checkpoint is not None:
            # Start at the last line the model read and read it again: the
            # tailer then knows the bytes before its offset (its mark), which
            # tell a truncation that kept the head of the file from a file
            # that grew (a tailer started at an offset has no mark yet).
            start = type(checkpoint)(
                checkpoint.dev, checkpoint.ino, back, checkpoint.fp_len, checkpoint.fp_crc
            )
            tailer = SessionTailer(session_id, log_path, checkpoint=start, resume=True)
            tailer.read(1)
        else:
            tailer = SessionTailer(session_id, log_path, checkpoint=checkpoint, resume=True)
        return cls(tailer, folded, max_seq)

    def poll(self) -> None:
        """Read every complete line there is now (blocking, a worker thread)."""
        while True:
            result = self._tailer.read(65536)
            if not result.entries and not result.malformed:
                return
            truncations = int(self._tailer.stats().get("truncations", 0) or 0)
            if truncations != self._truncations:
                self._truncations = truncations
                self._reread_upto = self._max_seq
            # A line that is no event only counts: it goes after the batch's
            # events (offsets do not order lines across a rotation), which at
            # worst lists an event one update early.
            lines: list[ParsedEntry | None] = [*result.entries]
            lines.extend(None for _ in result.malformed)
            for entry in lines:
                if entry is not None and entry.seq is not None:
                    upto = self._reread_upto
                    if upto is not None:
                        if entry.seq <= upto:
                            continue  # read again after the truncation
                        self._reread_upto = None
                    if self._max_seq is None or entry.seq > self._max_seq:
                        self._max_seq = entry.seq
                self._pending.append(entry)

    def take(self, upto: int) -> list[ParsedEntry]:
        """The events of the lines after those handed out, up to the model's ``upto``."""
        if len(self._pending) < upto - self.count:
            self.poll()
        taken: list[ParsedEntry] = []
        pending = self._pending
        while self.count < upto and pending:
            entry = pending.popleft()
            self.count += 1
            if entry is not None:
                taken.append(entry)
        return taken


def _one_line_back(tailer: SessionTailer, checkpoint: Any, last_offset: int | None) -> int | None:
    """``last_offset`` (where the model's last event starts) when the live file
    holds exactly that one line between it and ``checkpoint``, else None."""
    if checkpoint is None or last_offset is None or not 0 <= last_offset < checkpoint.offset:
        return None
    size = checkpoint.offset - last_offset
    if size > 1 << 20:
        return None
    try:
        fd = os.open(tailer.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (checkpoint.dev, checkpoint.ino):
            return None
        start = max(0, last_offset - 1)
        data = os.pread(fd, checkpoint.offset - start, start)
    except OSError:
        return None
    finally:
        os.close(fd)
    line = data[1:] if last_offset > 0 else data
    if last_offset > 0 and data[:1] != b"\n":
        return None  # not the start of a line
    if len(line) != size or line.find(b"\n") != size - 1:
        return None
    return last_offset
