"""Structured event log of a session (spec 4.2; ARCHITECTURE.md contracts 1 to 4).

:class:`ExecutionLogger` appends one JSON line per event to
``<log_path>/sessions/<id>/execution.jsonl`` through the native
:class:`~sigil._native.AppendWriter`: ``log_event`` formats the line and hands
it to an in-memory buffer, and a background thread writes and fsyncs it, so
logging waits for the disk only when a burst fills the bounded buffer while the
disk takes writes (backpressure, the GIL released; a failing disk drops and
counts instead). The spec's sample awaited ``aiofiles`` writes on the event
loop and never fsynced. Each event gets a ``seq`` that rises by
one across restarts of the writer, so a reader can tell a gap from a quiet
period.

Every open logger holds the session's lock (``sessions/<id>/.lock``,
ARCHITECTURE.md contract 7) from open to close, so readers know the session
is live while it is quiet, and a second writer of the session -- another
logger, or ``sigil orchestrate`` -- is refused with
:class:`~sigil.core.locks.SessionBusy` instead of duplicating ``seq``.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import re
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Protocol

import orjson

from sigil import _native
from sigil.core.limits import DEPTH_MARKER, MAX_METADATA_DEPTH, MAX_TOKENS
from sigil.core.locks import SessionBusy, SessionLock
from sigil.core.paths import (
    LOG_FILE_NAME,
    resolve_log_path,
    rotated_segments,
    validate_session_id,
)

__all__ = [
    "EventsDroppedError",
    "ExecutionLogger",
    "LogEntry",
    "SessionBusy",
    "SyncExecutionLogger",
    "log_execution_event",
]

_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
_orjson_dumps = orjson.dumps


def _default(obj: object) -> object:
    """Serialise what orjson cannot (paths, exceptions, sets) rather than lose the event."""
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def dumps(obj: object) -> bytes:
    """Serialise for the log; never raises, so an event is never lost to its content.

    orjson first. What it refuses (integers beyond 64 bits, circular references,
    nesting past its own limit) is rebuilt by :func:`_json_safe`, which replaces
    only the offending values; what orjson writes as ``null`` (NaN, infinities)
    is ``null`` on both paths.
    """
    try:
        return orjson.dumps(obj, default=_default, option=_OPTS)
    except (orjson.JSONEncodeError, TypeError):
        return _safe_dumps(obj)


def _safe_dumps(obj: object) -> bytes:
    try:
        return orjson.dumps(_json_safe(obj, 1, set()), option=_OPTS)
    except (orjson.JSONEncodeError, TypeError) as exc:  # pragma: no cover - _json_safe's output
        return orjson.dumps({"metadata_error": f"metadata could not be serialised: {exc}"})


#: The integers every JSON reader of the log takes exactly (orjson writes these).
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
CIRCULAR_MARKER = "[cut: circular reference]"


def _json_safe(value: Any, level: int, active: set[int]) -> Any:
    """``value`` as plain JSON data, each value the log cannot take replaced alone.

    ``level`` is the nesting level a container at this place would have (the
    metadata object is level 1): a container past MAX_METADATA_DEPTH becomes
    DEPTH_MARKER, a reference back to an enclosing container CIRCULAR_MARKER, a
    non-finite float ``null``, an integer outside 64 bits its decimal string.
    ``active`` holds the ids of the enclosing containers.
    """
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return int(value) if _INT_MIN <= value <= _INT_MAX else str(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping | list | tuple | set | frozenset):
        if level > MAX_METADATA_DEPTH:
            return DEPTH_MARKER
        if id(value) in active:
            return CIRCULAR_MARKER
        active.add(id(value))
        try:
            if isinstance(value, Mapping):
                return {_json_key(k): _json_safe(v, level + 1, active) for k, v in value.items()}
            return [_json_safe(v, level + 1, active) for v in value]
        finally:
            active.discard(id(value))
    # Anything else orjson knows (dataclasses, datetimes, numpy arrays...) as the
    # JSON it makes of it, then checked like the rest; failing that, its text.
    try:
        plain = orjson.loads(orjson.dumps(value, default=_default, option=_OPTS))
    except (orjson.JSONEncodeError, orjson.JSONDecodeError, TypeError):
        return str(value)
    return _json_safe(plain, level, active)


def _json_key(key: object) -> object:
    """A dict key orjson writes as the fast path would (OPT_NON_STR_KEYS), else its text."""
    if key is None or isinstance(key, str | bool):
        return key
    if isinstance(key, int):
        return int(key) if _INT_MIN <= key <= _INT_MAX else str(key)
    if isinstance(key, float) and math.isfinite(key):
        return key
    return str(key)


#: JSON strings, which may hold brackets that are not nesting.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"{}[]")
_OPENERS = frozenset(b"{[")


def _json_depth(encoded: bytes) -> int:
    """How deep containers nest in the JSON text ``encoded`` (a flat object is 1)."""
    brackets = _JSON_STRING.sub(b"", encoded).translate(None, _NOT_BRACKETS)
    return max(accumulate(1 if c in _OPENERS else -1 for c in brackets), default=0)


def _encode_metadata(metadata: Mapping[str, Any]) -> tuple[Mapping[str, Any], bytes]:
    """``metadata`` and its JSON, every value the log cannot take replaced alone
    (see :func:`_json_safe`); the mapping returned is the one encoded."""
    try:
        meta: bytes = _orjson_dumps(metadata, default=_default, option=_OPTS)
    except (orjson.JSONEncodeError, TypeError):
        pass
    else:
        # One opener per level at least: below the bound nothing can be too deep,
        # so the exact count is paid only by metadata with many containers.
        if (
            meta.count(b"{") + meta.count(b"[") <= MAX_METADATA_DEPTH
            or _json_depth(meta) <= MAX_METADATA_DEPTH
        ):
            return metadata, meta
    safe = _json_safe(metadata, 1, set())
    return safe, _safe_dumps(safe)


#: The longest line the writer produces: every reader (the tailer, the fold,
#: the orchestrator's history) skips longer lines, so a longer event would be
#: counted by the writer and by nobody else.
MAX_EVENT_BYTES = _native.MAX_LINE_BYTES - 4096
#: Below these sizes an event cannot come near the limit; nothing is measured.
_CHEAP_MESSAGE_CHARS = MAX_EVENT_BYTES // 16
_CHEAP_METADATA_BYTES = MAX_EVENT_BYTES // 4
#: A metadata value kept whole when the rest must go.
_SMALL_VALUE_BYTES = 1024


_MAX_NAME_CHARS = 256


def _bounded(
    event_type: str,
    component: str,
    message: str,
    metadata: Mapping[str, Any] | None,
    meta: bytes | None,
) -> tuple[str, str, str, bytes | None]:
    """Keep the line under the readers' limit, or its tokens would be counted by
    the writer and skipped by every reader (contract 2)."""
    event_type, component = event_type[:128], component[:128]
    message = _bounded_message(message)
    room = MAX_EVENT_BYTES - len(message.encode()) - 512
    if meta is not None and metadata and len(meta) > room:
        meta = _bounded_metadata(metadata, meta, room)
    return event_type, component, message, meta


def _bounded_message(message: str) -> str:
    """``message`` cut so that it takes at most a quarter of the line."""
    limit = MAX_EVENT_BYTES // 4
    raw = message.encode()
    if len(raw) <= limit:
        return message
    kept = raw[:limit].decode(errors="ignore")
    return f"{kept}… [{len(raw) - len(kept.encode())} bytes truncated]"


def _bounded_metadata(metadata: Mapping[str, Any], encoded: bytes, room: int) -> bytes:
    """Metadata that fits in ``room`` bytes: small values are kept (token counts,
    latency, model, status), large ones dropped and named."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    used = 256
    for key, value in metadata.items():
        piece = dumps({key: value})
        if len(piece) <= _SMALL_VALUE_BYTES and used + len(piece) <= room // 2:
            kept[key] = value
            used += len(piece)
        else:
            dropped.append(str(key)[:64])
    kept["metadata_truncated"] = {"original_bytes": len(encoded), "dropped_keys": dropped[:32]}
    return dumps(kept)


def _declined(*_args: object) -> None:
    """``AppendWriter.log_event`` of no writer: every event takes the Python path."""
    return None


class EventsDroppedError(OSError):
    """Events were dropped: the log could not be written (full or failing disk)
    and the writer's buffer reached ``max_buffer_bytes``. A burst on a disk
    that takes writes is never dropped: the call waits for the writer's
    background flush to make room (backpressure), for at most 10 seconds
    (``BACKPRESSURE_LIMIT`` in rust/writer.rs; past it the disk counts as
    stalled).

    Raised by ``log_event_sync``/``log_event`` by every call that finds drops
    not reported yet (so, while the disk stays full, by the calls whose events
    are dropped); ``dropped_events``/``dropped_tokens`` are those new drops.
    The event of that call was accepted all the same, with ``seq``: it is
    either queued or one of the dropped, whose count and tokens the log's
    ``events_dropped`` line carries (in its ``tokens`` field, so every reader's
    sum still includes them). Do not log it again: its tokens would count
    twice. ``errno`` is the disk's error (``ENOSPC``, ``EIO``...), or
    ``ENOBUFS`` when no error was reported: the disk took no write within the
    backpressure limit, or one event was larger than ``max_buffer_bytes``.
    """

    def __init__(
        self, code: int, message: str, *, seq: int, dropped_events: int, dropped_tokens: int
    ) -> None:
        super().__init__(code, message)
        self.seq = seq
        self.dropped_events = dropped_events
        self.dropped_tokens = dropped_tokens


@dataclass(slots=True)
class LogEntry:
    """A single log entry for the execution log (spec 4.2.2, plus ``seq``)."""

    timestamp: str
    session_id: str
    event_type: str
    component: str
    message: str
    tokens: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "timestamp": self.timestamp,
            "session_id": self.session_id,
            "event_type": self.event_type,
            "component": self.component,
            "message": self.message,
            "tokens": self.tokens,
            "metadata": self.metadata,
        }
        if self.seq is not None:
            d["seq"] = self.seq
        return d

    def to_bytes(self) -> bytes:
        """The JSON line, without its newline."""
        return dumps(self.to_dict())

    def to_json(self) -> str:
        """The JSON line as text (spec interface)."""
        return self.to_bytes().decode()

    @classmethod
    def from_json(cls, line: str | bytes) -> LogEntry:
        """Parse one line, validated like the monitor validates it.

        Raises ``ValueError`` saying what is wrong with the line.
        """
        data = line.encode() if isinstance(line, str) else line
        entries, malformed = _native.parse_lines([data])
        if malformed:
            raise ValueError(f"malformed log line: {malformed[0].reason}")
        return cls.from_parsed(entries[0])

    @classmethod
    def from_parsed(cls, entry: _native.ParsedEntry) -> LogEntry:
        return cls(
            timestamp=entry.timestamp,
            session_id=entry.session_id,
            event_type=entry.event_type,
            component=entry.component,
            message=entry.message,
            tokens=entry.tokens,
            metadata=dict(entry.metadata),
            seq=entry.seq,
        )


class Sanitizer(Protocol):
    def sanitize_string(self, value: str) -> str: ...

    def sanitize_dict(self, data: dict[str, Any]) -> dict[str, Any]: ...


def _default_sanitizer() -> Sanitizer | None:
    from sigil.telemetry.sanitization import LogSanitizer

    return LogSanitizer()


def _is_builtin(sanitizer: Sanitizer | None) -> bool:
    """Whether ``sanitizer`` does exactly what the native writer's
    ``sanitize=True`` does (the built-in rules, no extra patterns)."""
    from sigil.telemetry.sanitization import LogSanitizer

    return type(sanitizer) is LogSanitizer and sanitizer.builtin_only


class ExecutionLogger:
    """Asynchronous (and synchronous) logger for pipeline execution events.

    ``log_event`` formats the event and queues it (it waits, the GIL released,
    only while a burst has filled the bounded buffer on a disk that takes
    writes); the native writer flushes every ``flush_interval`` seconds or when
    ``buffer_size`` bytes are queued, and fsyncs per the ``fsync`` policy
    (``always`` | ``interval`` | ``never``). ``close()`` flushes and fsyncs.

    ``sanitizer``: ``True`` (default) scrubs secrets from every message and
    metadata value with :class:`~sigil.telemetry.sanitization.LogSanitizer`;
    ``False``/``None`` turns it off; or pass your own object with
    ``sanitize_string`` and ``sanitize_dict``.

    Opening the log (the first event, ``initialize``, ``with`` or ``async with
    .session()``) takes the session's lock and ``close()`` releases it; logging
    after ``close()`` opens and locks again. While another process or another
    logger holds the lock, opening raises :class:`~sigil.core.locks.SessionBusy`
    and nothing is written. ``lock``: a :class:`~sigil.core.locks.SessionLock` of
    this session that the caller already holds (``sigil orchestrate`` locks the
    session before it reads its history); the logger uses it and leaves its
    release to the caller.
    """

    def __init__(
        self,
        session_id: str,
        log_path: str | os.PathLike[str] | None = None,
        buffer_size: int = 1024,
        flush_interval: float = 0.1,
        *,
        fsync: str = "interval",
        sanitizer: Sanitizer | bool | None = True,
        max_buffer_bytes: int = 8 << 20,
        lock: SessionLock | None = None,
    ) -> None:
        self.session_id = validate_session_id(session_id)
        self.log_path = resolve_log_path(log_path)
        self.buffer_size = buffer_size
        self.flush_interval = flush_interval
        self.fsync = fsync
        # The bound on what the writer keeps is never below one buffer.
        self.max_buffer_bytes = max(max_buffer_bytes, buffer_size)
        if fsync not in ("always", "interval", "never"):
            raise ValueError(f"fsync must be 'always', 'interval' or 'never', not {fsync!r}")
        if sanitizer is True:
            sanitizer = _default_sanitizer()
        elif sanitizer is False:
            sanitizer = None
        #: Scrubs what is cut to size (before the cut, so no cut secret escapes).
        self._scrubber: Sanitizer | None = sanitizer
        #: The writer scrubs each event while formatting it when the sanitizer is
        #: the built-in one; otherwise the Python object runs per event.
        self._native_sanitize = _is_builtin(sanitizer)
        self._sanitizer = None if self._native_sanitize else sanitizer
        if lock is not None and os.path.abspath(lock.session_dir) != os.path.abspath(
            self.session_dir
        ):
            raise ValueError(f"the lock given is for another session ({lock.session_dir})")
        self._session_lock = lock if lock is not None else SessionLock(self.session_dir)
        #: True while this logger holds a lock it took itself (and so must release)
        self._took_lock = False
        self._writer: _native.AppendWriter | None = None
        self._open_lock = threading.Lock()
        # Drops already reported by EventsDroppedError (per writer).
        self._drops_writer: _native.AppendWriter | None = None
        self._drops_reported = 0
        self._drop_tokens_reported = 0
        #: The open writer's ``log_event`` while the native path can take events
        #: (no Python sanitizer), else a function that declines every event.
        self._log_native: Any = _declined

    # -- paths -------------------------------------------------------------

    @property
    def session_dir(self) -> Path:
        return self.log_path / "sessions" / self.session_id

    @property
    def log_file(self) -> Path:
        """The current session's log file path."""
        return self.session_dir / LOG_FILE_NAME

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next event will get (opens the log if needed)."""
        return self._open().next_seq

    @property
    def initialized(self) -> bool:
        return self._writer is not None and not self._writer.closed

    # -- opening -----------------------------------------------------------

    def _open(self) -> _native.AppendWriter:
        writer = self._writer
        if writer is not None and not writer.closed:
            return writer
        with self._open_lock:
            if self._writer is None or self._writer.closed:
                # The lock comes first: the next seq is read from the log under it,
                # so two writers can never both continue from the same event.
                took = not self._session_lock.held
                if took:
                    self._session_lock.acquire()  # SessionBusy when another writer holds it
                try:
                    self._writer = _native.AppendWriter(
                        self.log_file,
                        buffer_bytes=self.buffer_size,
                        flush_interval=self.flush_interval,
                        fsync=self.fsync,  # type: ignore[arg-type]  # validated by the writer
                        max_buffer_bytes=self.max_buffer_bytes,
                        session_id=self.session_id,
                        start_seq=self._recover_next_seq(),
                        sanitize=self._native_sanitize,
                    )
                except BaseException:
                    if took:
                        self._session_lock.release()
                    raise
                self._took_lock = self._took_lock or took
                if self._sanitizer is None:
                    self._log_native = self._writer.log_event
            return self._writer

    def _recover_next_seq(self) -> int:
        """Continue ``seq`` after the last event of the live file or, if it has
        none yet (just rotated), of the newest rotated segment."""
        candidates = [self.log_file, *reversed(rotated_segments(self.session_dir))]
        for path in candidates:
            try:
                last = _native.tail_max_seq(path)
            except FileNotFoundError:
                continue
            if last is not None:
                return last + 1
        return 0

    def initialize_sync(self) -> None:
        """Create the directories and open the file (idempotent)."""
        self._open()

    async def initialize(self) -> None:
        """Create the directories and open the file, off the event loop."""
        if not self.initialized:
            await asyncio.to_thread(self._open)

    # -- logging -----------------------------------------------------------

    def log_event_sync(
        self,
        event_type: str,
        component: str,
        message: str,
        tokens: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> int:
        """Log one event; returns its ``seq``. Never waits for a failing disk;
        waits (with the GIL released) only while the writer's buffer is full
        and the disk takes writes, so that a burst is not dropped.

        Raises :class:`EventsDroppedError` (an ``OSError``) when events were
        dropped on a full or failing disk since the last such report; the event
        itself was accepted (see there: do not log it again).

        This is the hot path (well under a microsecond): one native call that
        encodes the metadata exactly as :func:`dumps` would, scrubs it with the
        built-in sanitizer and queues the line. What it declines (a custom
        sanitizer, metadata of other types, oversized content, a closed or
        unopened writer, invalid tokens) takes :meth:`_log_event_slow`.
        """
        seq = self._log_native(
            event_type, component, message, tokens, metadata, self._drops_reported
        )
        if seq is not None and seq >= 0:
            return seq
        if seq is None:
            return self._log_event_slow(event_type, component, message, tokens, metadata)
        # Written, and the writer has dropped events not reported yet.
        seq = -1 - seq
        self._report_drops(self._log_native.__self__, seq)
        return seq

    def _log_event_slow(
        self,
        event_type: str,
        component: str,
        message: str,
        tokens: int,
        metadata: Mapping[str, Any] | None,
    ) -> int:
        """``log_event_sync`` for every event the native fast path declines."""
        if type(tokens) is not int or not 0 <= tokens <= MAX_TOKENS:
            # The one valid range (contract 2): every reader takes it exactly.
            raise ValueError(f"tokens must be an int in 0..=2**53, not {tokens!r}")
        sanitizer = self._sanitizer
        meta: bytes | None = None
        if sanitizer is not None:
            event_type = sanitizer.sanitize_string(event_type)
            component = sanitizer.sanitize_string(component)
            message = sanitizer.sanitize_string(message)
            if metadata:
                # As plain JSON data first, so what is scrubbed is what is
                # written: a value JSON cannot hold (a set, bytes, an exception,
                # a path) is written as its text, and a secret in that text was
                # made after the scrub. Circular or very deep parts are cut.
                metadata = sanitizer.sanitize_dict(_json_safe(metadata, 1, set()))
        if metadata:
            # _encode_metadata's common case inline (the hot path): orjson took
            # it, and it is too short or has too few openers to nest too deep.
            try:
                meta = _orjson_dumps(metadata, default=_default, option=_OPTS)
            except (orjson.JSONEncodeError, TypeError):
                metadata, meta = _encode_metadata(metadata)
            else:
                if (
                    len(meta) > MAX_METADATA_DEPTH
                    and meta.count(b"{") + meta.count(b"[") > MAX_METADATA_DEPTH
                    and _json_depth(meta) > MAX_METADATA_DEPTH
                ):
                    metadata, meta = _encode_metadata(metadata)
        if (
            len(message) > _CHEAP_MESSAGE_CHARS
            or len(event_type) + len(component) > _MAX_NAME_CHARS
            or (meta is not None and len(meta) > _CHEAP_METADATA_BYTES)
        ):
            scrubber = self._scrubber
            if self._native_sanitize and scrubber is not None:
                # Cutting to size may cut a secret short of its rule: scrub first.
                event_type = scrubber.sanitize_string(event_type)
                component = scrubber.sanitize_string(component)
                message = scrubber.sanitize_string(message)
                if metadata:
                    metadata, meta = _encode_metadata(scrubber.sanitize_dict(dict(metadata)))
            event_type, component, message, meta = _bounded(
                event_type, component, message, metadata, meta
            )
        writer = self._writer
        if writer is None:
            writer = self._open()
        try:
            seq = writer.write_event(self.session_id, event_type, component, message, tokens, meta)
        except ValueError:
            if not writer.closed:
                raise
            # Logging after close() reopens the log (spec: log_event initialises).
            writer = self._open()
            seq = writer.write_event(self.session_id, event_type, component, message, tokens, meta)
        if writer.dropped_events != self._drops_reported:
            self._report_drops(writer, seq)
        return seq

    def _report_drops(self, writer: _native.AppendWriter, seq: int) -> None:
        """Raise :class:`EventsDroppedError` for drops not reported yet."""
        if writer is not self._drops_writer:
            self._drops_writer, self._drops_reported, self._drop_tokens_reported = writer, 0, 0
        stats = writer.stats()
        dropped, tokens = stats["dropped_events"], stats["dropped_tokens"]
        new, new_tokens = dropped - self._drops_reported, tokens - self._drop_tokens_reported
        self._drops_reported, self._drop_tokens_reported = dropped, tokens
        if new <= 0:
            return
        code = stats["last_errno"] or errno.ENOBUFS
        cause = stats["last_error"] or "the write buffer is full"
        raise EventsDroppedError(
            code,
            f"{new} events carrying {new_tokens} tokens could not be written to "
            f"{self.log_file} ({cause}); the log's events_dropped line counts them",
            seq=seq,
            dropped_events=new,
            dropped_tokens=new_tokens,
        )

    async def log_event(
        self,
        event_type: str,
        component: str,
        message: str,
        tokens: int = 0,
        metadata: Mapping[str, Any] | None = None,
    ) -> int:
        """Log one execution event (spec 4.2.2); returns its ``seq``.

        The event is queued and written by the native writer's background
        thread; the call waits only while the writer's buffer is full and the
        disk takes writes (backpressure: a burst is held back, not dropped),
        as :meth:`log_event_sync` does.
        """
        if not self.initialized:
            await self.initialize()
        return self.log_event_sync(event_type, component, message, tokens, metadata)

    # -- flushing and closing ---------------------------------------------

    def wait_written(self, seq: int | None = None, timeout: float = 5.0) -> None:
        """Wait until the event ``seq`` (None: every event logged so far) has
        reached the OS (the writer's ``write(2)`` done: a ``kill -9`` of this
        process no longer loses it; fsync stays on the ``fsync`` policy's
        schedule). Blocks with the GIL released, at most ``timeout`` seconds.

        The events are written at once, not at the writer's next interval:
        by the waiting thread itself when the writer is idle (no hand-off),
        else by the write under way or the writer's thread; one write covers
        every event queued by then, so threads waiting together share it
        (group commit). Raises ``TimeoutError`` when
        the write did not complete in time (a hung disk), ``OSError`` with the
        disk's errno when it failed or the event was dropped (at once while
        the writer's writes are failing). Returns at once when nothing was
        logged or everything is written.
        """
        writer = self._writer
        if writer is not None:
            writer.wait_written(seq, timeout)

    def flush_sync(self) -> None:
        """Write and fsync what is queued; raises ``OSError`` if the disk fails."""
        if self._writer is not None and not self._writer.closed:
            self._writer.flush()

    async def flush(self) -> None:
        await asyncio.to_thread(self.flush_sync)

    def close_sync(self) -> None:
        """Flush, fsync, close and release the session's lock (if this logger took
        it). Idempotent; raises ``OSError`` if the disk fails."""
        with self._open_lock:
            writer = self._writer
            self._log_native = _declined
            try:
                if writer is not None:
                    writer.close()
            finally:
                # Released even when the last flush failed: the process is done
                # writing, and a held lock would keep the session "live".
                if self._took_lock:
                    self._took_lock = False
                    self._session_lock.release()

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    def stats(self) -> dict[str, Any]:
        """The writer's counters: lines, bytes, flushes, fsyncs, dropped lines, last error."""
        if self._writer is None:
            return {}
        return dict(self._writer.stats())

    @asynccontextmanager
    async def session(self) -> AsyncIterator[ExecutionLogger]:
        """``async with logger.session() as log:`` opens, yields, then closes."""
        await self.initialize()
        try:
            yield self
        finally:
            await self.close()

    def __enter__(self) -> ExecutionLogger:
        self.initialize_sync()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_sync()


#: The same class, used through its ``*_sync`` methods by code without an event loop.
SyncExecutionLogger = ExecutionLogger


async def log_execution_event(
    session_id: str,
    event_type: str,
    component: str,
    message: str,
    tokens: int = 0,
    metadata: Mapping[str, Any] | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> int:
    """Log a single event with a temporary logger (spec 4.2.2). Returns its ``seq``."""
    logger = ExecutionLogger(session_id=session_id, log_path=log_path)
    async with logger.session():
        return await logger.log_event(event_type, component, message, tokens, metadata)
