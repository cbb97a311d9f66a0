"""``sigil replay``: a finished session played through the monitor's views (issue 13).

Two halves, as in the monitor:

* :class:`Timeline` is the session's log as lines, in the order the live reader
  folds them (rotated segments oldest first, gunzipped when they are gzip,
  then the live file), streamed from the session's directory or from its
  archive (nothing extracted) in bounded chunks: however long the session,
  the replay holds a few chunks of it. Each line comes with the moment it was
  written (its event's timestamp, read by the native parser) for pacing only.
* :class:`Player` feeds those lines, as bytes, into one native ``Fold`` -- the
  model the monitor feeds -- at the chosen speed, and shows its snapshots with
  the monitor's :class:`SessionState` and renderers (every ``--mode``: the
  dashboard, the stream, the minimal line, json). Every number shown is the
  fold's (contract 12); this module only decides *when* a line is fed.

The writer: every frame before the end is history, drawn as a live monitor
drew it then (the run's writer there, its open proxy calls in flight); the end
of the log is drawn with the writer gone (the model's ``writer_gone``), as
``monitor``, ``sessions`` and ``report`` read a session nobody holds: those
calls then hold their reservations, unknown usage (see :meth:`Player._end`).

Pacing: the gap between two events' timestamps divided by the speed, each gap
capped (``max_gap``, 2 s by default) so that a long idle stretch does not stall
a demo; ``speed=None`` is ``--speed max``. The views' clock (elapsed time,
"stalled", rates) reads the replay's moment of the session, not the wall clock.
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
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

if TYPE_CHECKING:
    from types import FrameType

    from sigil.interfaces.cli.display import Renderer
    from sigil.interfaces.cli.keys import TerminalKeys
    from sigil.interfaces.cli.monitor import MonitorPhase, SessionState
    from sigil.reports.sources import Source
    from sigil.telemetry.archived import Fold
    from sigil.telemetry.log_parser import Ledger, ParsedEntry, SessionSnapshot

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
#: The recent events the replay's session model keeps (the monitor's list).
DEFAULT_LAST_N = 100
#: Keys that advance one event (pausing first when playing).
STEP_KEYS = frozenset({"n", "."})
#: An archived log member larger than this is not read (as ``reports.sources``).
_MAX_MEMBER_BYTES = 1 << 30
#: All the log an archive's replay reads (its members, segments gunzipped), together.
_MAX_TOTAL_BYTES = 1 << 30
_LOG = "execution.jsonl"
#: Bytes read from a log at a time.
_CHUNK = 1 << 20
#: A line longer than this is cut there (the native readers' bound): the fold
#: counts it oversize, and the replay holds no more of it.
_MAX_LINE = 1 << 20
#: Lines folded at most per step of the player (``--speed max`` folds in steps).
_BATCH = 4096


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
# The session's files, streamed
# ---------------------------------------------------------------------------------------


def _too_large(archive: str) -> NoReturn:
    """An archive whose logs together pass :data:`_MAX_TOTAL_BYTES`: a usage
    error (exit 2, one line), refused before it is read or while the replay
    counts its lines (before anything is shown)."""
    from sigil.interfaces.cli.errors import UsageFailure

    raise UsageFailure(
        f"cannot replay {archive}: its logs are larger than {_MAX_TOTAL_BYTES} bytes in all"
    )


def _too_long(where: str, name: str) -> Callable[[], NoReturn]:
    def over() -> NoReturn:
        raise ReplayError(f"cannot read {where}: {name} is larger than {_MAX_MEMBER_BYTES} bytes")

    return over


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Reader(io.RawIOBase):
    """``head``, then at most ``limit`` bytes of ``inner`` (all when None),
    each byte counted in ``counter``; past ``cap`` bytes counted, ``over()``
    (which raises)."""

    def __init__(
        self,
        inner: _Readable,
        *,
        head: bytes = b"",
        limit: int | None = None,
        cap: int | None = None,
        over: Callable[[], NoReturn] | None = None,
        counter: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.head = head
        self.left = limit
        self.cap = cap
        self.over = over
        self.counter = counter if counter is not None else [0]

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = _CHUNK
        if self.head:
            data, self.head = self.head[:size], self.head[size:]
        else:
            if self.left is not None:
                size = min(size, self.left)
                if size <= 0:
                    return b""
            data = self.inner.read(size)
            if self.left is not None:
                self.left -= len(data)
        self.counter[0] += len(data)
        if self.cap is not None and self.counter[0] > self.cap and self.over is not None:
            self.over()
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _text_of(stream: _Readable, over: Callable[[], NoReturn]) -> _Readable:
    """A rotated segment's text: gunzipped when its contents are gzip (not its
    name), at most :data:`_MAX_MEMBER_BYTES` of it (a gzip bomb is refused)."""
    head = b""
    while len(head) < 2:
        more = stream.read(2 - len(head))
        if not more:
            break
        head += more
    whole = _Reader(stream, head=head)
    if head != b"\x1f\x8b":
        return whole
    inflated = gzip.GzipFile(fileobj=whole)
    return _Reader(inflated, cap=_MAX_MEMBER_BYTES, over=over)


#: What a log file is read as: its name, where it is (for errors), its text.
_Opened = tuple[str, str, _Readable]


class _Files:
    """A session's log files as streams of their text, in fold order; each is
    read to its end before the next is asked for."""

    #: the files' names, in fold order
    names: list[str]

    def open_all(self) -> Iterator[_Opened]:
        raise NotImplementedError


class _MemoryFiles(_Files):
    def __init__(self, files: Sequence[tuple[str, bytes]]) -> None:
        self.files = list(files)
        self.names = [name for name, _ in self.files]

    def open_all(self) -> Iterator[_Opened]:
        for name, data in self.files:
            yield name, "memory", io.BytesIO(data)


class _DirectoryFiles(_Files):
    """A session directory's rotated segments, oldest first, then its live
    file, each read up to the size it had when the replay began (a log that
    still grows is played as it was)."""

    def __init__(self, directory: Path) -> None:
        from sigil.core.paths import rotated_segments

        self.directory = directory
        self.files: list[tuple[Path, bool, int]] = []
        for path, segment in [*((p, True) for p in rotated_segments(directory)),
                              (directory / _LOG, False)]:  # fmt: skip
            try:
                size = os.stat(path, follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ReplayError(f"cannot read {path}: {exc.strerror or exc}") from None
            self.files.append((path, segment, size))
        self.names = [path.name for path, _, _ in self.files]

    def open_all(self) -> Iterator[_Opened]:
        where = str(self.directory)
        for path, segment, size in self.files:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ReplayError(f"cannot read {path}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "rb") as f:
                stream: _Readable = _Reader(f, limit=size)
                if segment:
                    stream = _text_of(stream, _too_long(where, path.name))
                yield path.name, where, stream


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


class _ArchiveFiles(_Files):
    """An archived session's log members, streamed from its tar.gz in fold
    order, nothing extracted. The archive holds them by name, not in that
    order: a member due before the one the stream is at is read from the
    archive once more (the live file, stored first, is one more pass).

    At most :data:`_MAX_TOTAL_BYTES` of log in all: the members' sizes are
    summed over the headers first, so an archive over it is refused before
    any of it is read; gunzipped segments count as they are read."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        found: list[tuple[tuple[int, Any], int, str]] = []
        budget = _MAX_TOTAL_BYTES
        #: why the archive cannot be read to its end (it breaks, cut short or
        #: corrupt), when it breaks after a member was seen: what comes before
        #: the break is played, as every view counts it (the native archive fold)
        self.problem: str | None = None
        #: the archive index of the last member seen before the break
        self.broken_at: int | None = None
        last = -1
        try:
            with self._tar(to_the_end=True) as tar:
                for index, member in enumerate(tar):
                    last = index
                    log = _log_member(member)
                    if log is None:
                        continue
                    order, name = log
                    if member.size > _MAX_MEMBER_BYTES:
                        raise ReplayError(
                            f"cannot read {archive}: {name} is larger than"
                            f" {_MAX_MEMBER_BYTES} bytes"
                        )
                    if member.size > budget:
                        _too_large(str(archive))
                    budget -= member.size
                    found.append((order, index, name))
        except ReplayError as exc:
            if not found or "is larger than" in str(exc):
                raise
            self.problem, self.broken_at = str(exc), last
        found.sort(key=lambda item: item[0])
        self.members = [(index, name, order[0] == 0) for order, index, name in found]
        self.names = [name for _, name, _ in self.members]

    @contextlib.contextmanager
    def _tar(self, *, to_the_end: bool = False) -> Iterator[tarfile.TarFile]:
        """The archive as a tar stream. ``to_the_end``: once its members are
        read, the rest of the gzip stream too, so that its end is checked (a
        tar cut within a header ends quietly, as if it had no more members)."""
        try:
            fd = os.open(self.archive, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with (
                os.fdopen(fd, "rb") as raw,
                _Gunzip(raw) as gz,
                tarfile.open(fileobj=gz, mode="r|") as tar,
            ):
                yield tar
                if to_the_end:
                    while gz.read(_CHUNK):
                        pass
        except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:
            raise ReplayError(f"cannot read {self.archive}: {exc}") from None

    def open_all(self) -> Iterator[_Opened]:
        where = str(self.archive)
        counter = [0]  # the log read, gunzipped, against the total

        def over_total() -> NoReturn:
            _too_large(where)

        pending = deque(self.members)
        while pending:
            with self._tar() as tar:
                at = -1
                members = iter(tar)
                while pending and pending[0][0] > at:
                    index, name, segment = pending.popleft()
                    found = None
                    for member in members:
                        at += 1
                        if at == index:
                            found = member
                            break
                    if found is None:
                        return  # the archive changed while it was replayed
                    extracted = tar.extractfile(found)
                    if extracted is None:
                        continue
                    stream: _Readable = extracted
                    if index == self.broken_at:
                        # The member the archive breaks in: read up to the break.
                        stream = _UpToBreak(stream)
                    if segment:
                        stream = _text_of(stream, _too_long(where, name))
                        if index == self.broken_at:
                            # A compressed segment cut short ends there too.
                            stream = _UpToBreak(stream)
                    counted = _Reader(stream, cap=_MAX_TOTAL_BYTES, over=over_total,
                                      counter=counter)  # fmt: skip
                    yield name, where, counted


class _Gunzip(io.RawIOBase):
    """A gzip stream (its members one after the other) inflated as it is
    read, that gives every byte inflated before a break (the file cut short,
    a corrupt block) and then the error, as the native archive reader does:
    :class:`gzip.GzipFile` keeps back what it inflated from a cut stream."""

    def __init__(self, raw: _Readable) -> None:
        super().__init__()
        self.raw = raw
        self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        #: input read and not inflated yet (at most a chunk and a member's rest)
        self.tail = b""
        self.pending = b""
        self.error: Exception | None = None
        #: the current gzip member has begun (its end is then due)
        self.started = False

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        want = _CHUNK if size is None or size < 0 else max(1, size)
        while len(self.pending) < want and self.error is None:
            if not self.tail:
                self.tail = self.raw.read(_CHUNK)
                if not self.tail:
                    if self.started:
                        self.error = EOFError(
                            "compressed file ended before the end-of-stream marker was reached"
                        )
                    break
            self.started = True
            try:
                self.pending += self.inflate.decompress(self.tail, want)
            except zlib.error as exc:
                self.error = exc
                break
            self.tail = self.inflate.unconsumed_tail
            if self.inflate.eof:
                # The next gzip member, if any, starts with what is left.
                self.tail = self.inflate.unused_data + self.tail
                self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self.started = False
        if not self.pending and self.error is not None:
            raise self.error
        data, self.pending = self.pending[:want], self.pending[want:]
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


#: the read size in the member an archive breaks in (what a read meeting the
#: break loses: at most this, a line or so, which the native fold keeps)
_BREAK_READ = 512


class _UpToBreak(io.RawIOBase):
    """A member's bytes up to where the archive breaks: the error there is
    the end (the archive's reason is said once, by the command)."""

    def __init__(self, inner: _Readable) -> None:
        super().__init__()
        self.inner = inner
        self.broken = False

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.broken:
            return b""
        # Small reads: tarfile drops the bytes of a read that meets the break.
        want = _BREAK_READ if size is None or size < 0 else min(size, _BREAK_READ)
        try:
            return self.inner.read(want)
        except (OSError, EOFError, zlib.error, tarfile.TarError):
            self.broken = True
            return b""

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _pieces(opened: _Opened) -> Iterator[tuple[int, bytes]]:
    """A file's text as blocks of whole lines (the file's last may have no
    newline), each with where it starts in the file, at most about
    :data:`_CHUNK` bytes each. A line longer than :data:`_MAX_LINE` comes as
    its first bytes and a newline, alone (the fold counts it oversize); the
    rest of it is skipped."""
    name, where, stream = opened
    errors = (OSError, EOFError, zlib.error, tarfile.TarError)
    offset, carry = 0, b""
    skipping = False
    while True:
        try:
            data = stream.read(_CHUNK)
        except errors as exc:
            raise ReplayError(f"cannot read {where}: {name}: {exc}") from None
        if not data:
            break
        if skipping:
            nl = data.find(b"\n")
            if nl < 0:
                offset += len(data)
                continue
            offset += nl + 1
            data = data[nl + 1 :]
            skipping = False
        block = carry + data if carry else data
        cut = block.rfind(b"\n") + 1
        if cut == 0:
            if len(block) > _MAX_LINE:
                yield offset, block[: _MAX_LINE + 1] + b"\n"
                offset += len(block)
                carry, skipping = b"", True
            else:
                carry = block
            continue
        yield offset, block[:cut]
        offset += cut
        carry = block[cut:]
    if carry:
        yield offset, carry


def _count_lines(block: bytes) -> int:
    return block.count(b"\n") + (0 if block.endswith(b"\n") else 1)


@dataclass(slots=True)
class _Line:
    #: which file (in fold order: the rotated segments before it, the monitor's rotations)
    file: int
    #: the block of whole lines this line is in, and where in it
    block: bytes
    start: int
    end: int
    #: where the line starts in its file
    offset: int
    #: the event's time (seconds since the epoch), None for a line that is no event
    at: float | None
    #: seconds since the event before it (0 when either has no time)
    gap: float
    #: a ``session_start`` (where a run may begin)
    opens_run: bool
    #: how many lines (more than one: a run of them, for ``--speed max``)
    count: int = 1


def _runs_of(lines: Sequence[_Line]) -> Iterator[tuple[bytes, int]]:
    """Lines as byte blocks: each run of lines next to each other in one block
    (so in one file) as one slice, with where it starts in its file."""
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        j = i
        while j + 1 < n and lines[j + 1].block is line.block and lines[j + 1].start == lines[j].end:
            j += 1
        yield line.block[line.start : lines[j].end], line.offset
        i = j + 1


def feed_lines(fold: Fold, lines: Sequence[_Line]) -> None:
    """Fold ``lines`` (each file's run of them in one call)."""
    for block, offset in _runs_of(lines):
        fold.feed_bytes(block, offset)


def entries_of(lines: Sequence[_Line]) -> list[ParsedEntry]:
    """The events of ``lines``, parsed natively."""
    from sigil.telemetry.log_parser import parse_bytes

    found: list[ParsedEntry] = []
    for block, offset in _runs_of(lines):
        found.extend(parse_bytes(block, offset).entries)
    return found


def _split(run: _Line, lines: int) -> tuple[_Line, _Line]:
    """A run of lines as its first ``lines`` lines and the rest."""
    end = run.start
    for _ in range(lines):
        end = run.block.index(b"\n", end) + 1
    head = _Line(run.file, run.block, run.start, end, run.offset, None, 0.0, False, lines)
    rest = _Line(run.file, run.block, end, run.end, run.offset + (end - run.start), None, 0.0,
                 False, run.count - lines)  # fmt: skip
    return head, rest


class Timeline:
    """A session's log lines in fold order, each with its event's moment,
    streamed: :meth:`stream` reads the files once more each time."""

    def __init__(self, session_id: str, files: Sequence[tuple[str, bytes]] | _Files) -> None:
        self.session_id = session_id
        self._files = files if isinstance(files, _Files) else _MemoryFiles(files)
        self._count: int | None = None

    @classmethod
    def of(cls, source: Source, *, empty_ok: bool = False) -> Timeline:
        """The session's timeline, its lines counted (every file read once:
        what cannot be read is said now, before anything is shown). A session
        with no log is an error unless ``empty_ok`` (its ledger still records
        its finished runs: nothing to play, their totals to show)."""
        path = Path(source.key)
        files: _Files = _ArchiveFiles(path) if source.archived else _DirectoryFiles(path)
        timeline = cls(source.session_id, files)
        if not files.names and not empty_ok:
            raise ReplayError(f"session {source.session_id!r} has no log to replay")
        timeline.count  # noqa: B018 (read every file now)
        return timeline

    @property
    def problem(self) -> str | None:
        """Why an archive cannot be read to its end, when it breaks after some
        of its log: the lines before the break are the timeline."""
        return self._files.problem if isinstance(self._files, _ArchiveFiles) else None

    @property
    def count(self) -> int:
        """How many lines the session's log has (counted once)."""
        if self._count is None:
            total = 0
            for opened in self._files.open_all():
                for _, block in _pieces(opened):
                    total += _count_lines(block)
            self._count = total
        return self._count

    def stream(self) -> Iterator[_Line]:
        """Every line from the first, each with its event's moment."""
        from sigil.interfaces.cli.monitor import parse_timestamp
        from sigil.telemetry.log_parser import parse_bytes

        last: float | None = None
        for file, opened in enumerate(self._files.open_all()):
            for offset, block in _pieces(opened):
                # Only each event's time and type are kept (a line's event is
                # parsed again, natively, when a view lists it).
                by_pos = {
                    e.offset: (e.timestamp, e.event_type == "session_start")
                    for e in parse_bytes(block).entries
                }
                pos, size = 0, len(block)
                while pos < size:
                    nl = block.find(b"\n", pos)
                    end = size if nl < 0 else nl + 1
                    stamp, opens_run = by_pos.get(pos, (None, False))
                    moment = parse_timestamp(stamp)
                    at = moment.timestamp() if moment is not None else None
                    gap = 0.0 if at is None or last is None else max(0.0, at - last)
                    if at is not None:
                        last = at
                    yield _Line(file, block, pos, end, offset + pos, at, gap, opens_run)
                    pos = end

    def blocks(self, cuts: Sequence[int] = ()) -> Iterator[_Line]:
        """Every line from the first, as runs of lines (a block read at a time),
        without their moments (``--speed max`` waits for none): cut at each
        line number in ``cuts``, so that a run never spans one."""
        marks = sorted(set(cuts))
        k, index = 0, 0
        for file, opened in enumerate(self._files.open_all()):
            for offset, block in _pieces(opened):
                start, left = 0, _count_lines(block)
                while k < len(marks) and marks[k] <= index:
                    k += 1
                while k < len(marks) and marks[k] < index + left:
                    take = marks[k] - index
                    end = start
                    for _ in range(take):
                        end = block.index(b"\n", end) + 1
                    yield _Line(file, block, start, end, offset + start, None, 0.0, False, take)
                    index, left, start = index + take, left - take, end
                    k += 1
                if left:
                    yield _Line(file, block, start, len(block), offset + start, None, 0.0, False,
                                left)  # fmt: skip
                    index += left

    @property
    def lines(self) -> list[_Line]:
        """Every line at once (for a test: the replay itself streams them)."""
        return list(self.stream())

    def run_range(self, number: int, last_n: int = DEFAULT_LAST_N) -> tuple[int, int, Fold]:
        """The lines of run ``number`` (as the model numbers runs): from its
        ``session_start`` up to the next one, and the session model of the
        lines before it (a ``Fold(last_n)``: the player goes on from it, so
        those lines are folded once). Raises :class:`ReplayError`.

        One read of the log, a block at a time: only a block that holds a
        ``session_start`` is parsed (natively), and the fold is fed up to each
        one; a copy of it folds the ``session_start`` to learn which run it
        opened (the fold before it is the history when it is run ``number``)."""
        from sigil.telemetry.archived import Fold
        from sigil.telemetry.log_parser import parse_bytes

        fold = Fold(last_n)
        history = fold
        numbers: list[int] = []
        start: int | None = None
        index = 0  # the line number of the block's first line
        for run in self.blocks():
            block, offset = run.block[run.start : run.end], run.offset
            opens = []
            if b"session_start" in block:
                opens = [e.offset for e in parse_bytes(block).entries
                         if e.event_type == "session_start"]  # fmt: skip
            pos, line = 0, index
            for at in opens:
                line += block.count(b"\n", pos, at)
                if start is not None:
                    return start, line, history
                if at > pos:
                    fold.feed_bytes(block[pos:at], offset + pos)
                # The model says which run a session_start opens: a copy folds it.
                nl = block.find(b"\n", at)
                end = len(block) if nl < 0 else nl + 1
                opened = fold.copy()
                opened.feed_bytes(block[at:end], offset + at)
                got = opened.snapshot().run.number
                numbers.append(got)
                if got == number:
                    start, history = line, fold
                fold = opened
                pos, line = end, line + 1
            if start is None and pos < len(block):
                fold.feed_bytes(block[pos:], offset + pos)
            index += run.count
        if start is not None:
            return start, index, history
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
    ``first`` are folded at once, or are ``history``: the fold of exactly
    them, e.g. from :meth:`Timeline.run_range`) through a renderer, reading
    keys when given."""

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
        last_n: int = DEFAULT_LAST_N,
        keys: TerminalKeys | None = None,
        label: str = "",
        start_paused: bool = False,
        clock: Callable[[], float] = time.monotonic,
        ledger: Ledger | None = None,
        final: SessionSnapshot | None = None,
        history: Fold | None = None,
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
        self.stop = timeline.count if stop is None else stop
        self.refresh_rate = refresh_rate
        self.keys = keys
        self.label = label
        self.start_paused = start_paused
        self._clock = clock
        #: the session's ledger, joined at the end (the whole session played):
        #: the runs only it knows (their events deleted or rotated away) count
        #: in the final totals, as every other view counts them, unplayed
        self.ledger = ledger
        #: the session model every other view counts, shown at the end instead
        #: of the played fold's (an archive that breaks: the native fold of
        #: its readable part, which Python's gzip may stop short of)
        self.final = final
        #: how many runs the final snapshot has that were not played
        self.ledger_only_runs = 0
        from sigil.telemetry.archived import Fold

        self.fold = Fold(last_n) if history is None else history
        #: ``--speed max``: runs of lines are folded as read (cut where a step
        #: ends), with no line's moment (the clock is the latest event's the fold saw)
        self._fast = speed is None
        #: the lines from the cursor on, read ahead of it (a few batches at most)
        self._lines = timeline.blocks((first, self.stop)) if self._fast else timeline.stream()
        self._ahead: deque[_Line] = deque()
        self.cursor = 0
        #: the file of the latest line folded (the segments before it are rotations)
        self._file = 0
        #: the time of the latest event folded
        self._last_at: float | None = None
        self._fold_history(first, folded=history is not None)
        self.state: SessionState = SessionState(
            timeline.session_id,
            default_budget=default_budget,
            max_events=last_n,
            snapshot=self.fold.snapshot(),
        )
        # A replayed writer is there until the last line (contract 7's "running").
        self.state.locked = True
        self.state.rotations = self._file
        if self._fast:
            self._note_moment()
        self.phase = _phase_of(self.state)
        self.paused = False
        self.finished = False
        #: when the line at the cursor is due (monotonic seconds)
        self.next_due = 0.0
        self._paused_left = 0.0
        #: the moment shown while paused
        self._frozen_at: float | None = None
        self._resized = False
        #: lines were folded since the state took the fold's snapshot (``--speed max``)
        self._stale = False
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
        line = self._line(index)
        return 0.0 if line is None else min(line.gap / self.speed, self.max_gap)

    def moment(self) -> datetime | None:
        """The moment of the session the replay has reached (the dashboard's 'now'):
        between the latest event folded and the next, as the wait for it goes by."""
        last = self._last_at
        if last is None:
            return None
        at = last
        if self._frozen_at is not None:
            at = self._frozen_at
        elif not self.finished and not self._fast and (line := self._line(self.cursor)) is not None:
            wait = self.delay(self.cursor)
            if line.at is not None and line.at > last and wait > 0:
                left = max(0.0, self.next_due - self._clock())
                at = last + (line.at - last) * max(0.0, min(1.0, 1 - left / wait))
        return datetime.fromtimestamp(at).astimezone()

    # -- feeding ---------------------------------------------------------------------------

    def _line(self, index: int) -> _Line | None:
        """Line ``index`` (at or after the cursor), read ahead up to it; None
        past the end (a log found shorter than counted ends the replay there)."""
        k = index - self.cursor
        if k < 0 or index >= self.stop:
            return None
        ahead = self._ahead
        while len(ahead) <= k:
            line = next(self._lines, None)
            if line is None:
                self.stop = self.cursor + len(ahead)
                return None
            ahead.append(line)
        return ahead[k]

    def _take(self, upto: int) -> list[_Line]:
        """The lines from the cursor up to ``upto``, which the cursor passes."""
        upto = min(upto, self.stop)
        if upto <= self.cursor:
            return []
        if self._fast:
            return self._take_runs(upto)
        self._line(upto - 1)
        ahead = self._ahead
        taken = [ahead.popleft() for _ in range(min(upto - self.cursor, len(ahead)))]
        self.cursor += len(taken)
        if taken:
            self._file = taken[-1].file
        for line in reversed(taken):
            if line.at is not None:
                self._last_at = line.at
                break
        return taken

    def _take_runs(self, upto: int) -> list[_Line]:
        """``--speed max``: runs of lines up to ``upto`` (a run cut there; what
        is left of it is read next)."""
        taken: list[_Line] = []
        while self.cursor < upto:
            run = self._ahead.popleft() if self._ahead else next(self._lines, None)
            if run is None:
                self.stop = self.cursor  # the log was shorter than counted
                break
            need = upto - self.cursor
            if run.count > need:
                run, rest = _split(run, need)
                self._ahead.appendleft(rest)
            taken.append(run)
            self.cursor += run.count
        if taken:
            self._file = taken[-1].file
        return taken

    def _note_moment(self) -> None:
        """``--speed max``: the clock is the latest event's time the fold saw."""
        from sigil.interfaces.cli.monitor import parse_timestamp

        moment = parse_timestamp(self.state.last_timestamp)
        if moment is not None:
            self._last_at = moment.timestamp()

    def _fold_history(self, first: int, *, folded: bool = False) -> None:
        """Fold the lines before ``first`` at once, a batch at a time; when the
        fold holds them already (``folded``), only pass them."""
        while self.cursor < first:
            taken = self._take(min(first, self.cursor + _BATCH))
            if not taken:
                break
            if not folded:
                feed_lines(self.fold, taken)

    def _advance(self, upto: int) -> None:
        """Fold the lines before ``upto`` not folded yet; show the new snapshot."""
        lines = self._take(upto)
        if not lines:
            return
        feed_lines(self.fold, lines)
        # The state takes the fold's snapshot (which grows with the session's
        # runs) when a frame is drawn, as the monitor's does, not per batch.
        self._stale = True
        if self.renderer.lists_events:
            # Every event fed, even a burst larger than the model's recent ring.
            self.renderer.on_events(self.state, entries_of(lines))

    def _sync(self, *, writer_gone: bool = False) -> None:
        """The state takes the fold's snapshot (``writer_gone``: the calls the
        last run left open hold their reservations, see :meth:`_end`)."""
        state = self.state
        state.update(self.fold.snapshot(writer_gone=writer_gone))
        if self.renderer.lists_events:
            state.unlisted = 0  # every event was listed as it was fed
        state.rotations = self._file
        if self._fast:
            self._note_moment()
        self.phase = _phase_of(state)
        self._stale = False

    def _due(self, now: float) -> int:
        """The index past the last line due at ``now`` (a batch at most);
        ``next_due`` moves along."""
        limit = min(self.stop, self.cursor + _BATCH)
        if self.speed is None:
            return limit
        i, due = self.cursor, self.next_due
        while i < limit and due <= now:
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
        """The last line is in: the writer is gone, as a live monitor would find.

        So the end's snapshot is taken with ``writer_gone`` (the model's rule,
        contract 12): the proxy calls the played run left open (a ``kill -9``
        leaves their ``step_start`` only) hold their reservations as calls of
        unknown usage, as ``monitor``, ``sessions`` and ``report`` count them.
        The writer is gone whatever was played: a session still locked is not
        replayed, and the run ``--run N`` plays ended, was followed by a later
        one, or its writer is gone too. A snapshot before the end is history:
        the calls open then were in flight then, and are shown so."""
        self.finished = True
        self._frozen_at = None
        self._sync(writer_gone=True)
        state = self.state
        joined: SessionSnapshot | None = self.final
        if joined is None and self.ledger is not None and self.ledger.present:
            joined = self.fold.snapshot(self.ledger, writer_gone=True)
        if joined is not None:
            played = self.fold.snapshot(writer_gone=True)
            self.ledger_only_runs = max(0, joined.run_count - played.run_count)
            if self.ledger_only_runs or self.final is not None:
                state.update(joined)
                self.phase = _phase_of(state)
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
        if self._stale:
            self._sync()
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
                if timeout > 0:
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
