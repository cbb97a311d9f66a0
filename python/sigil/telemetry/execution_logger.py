"""Structured event log of a session (spec 4.2; ARCHITECTURE.md contracts 1 to 4).

:class:`ExecutionLogger` appends one JSON line per event to
``<log_path>/sessions/<id>/execution.jsonl`` through the native
:class:`~sigil._native.AppendWriter`: ``log_event`` formats the line and hands
it to an in-memory buffer, and a background thread writes and fsyncs it, so
logging never waits for the disk (the spec's sample awaited ``aiofiles`` writes
on the event loop and never fsynced). Each event gets a ``seq`` that rises by
one across restarts of the writer, so a reader can tell a gap from a quiet
period.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from sigil import _native
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
    "SyncExecutionLogger",
    "log_execution_event",
]

_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _default(obj: object) -> object:
    """Serialise what orjson cannot (paths, exceptions, sets) rather than lose the event."""
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def dumps(obj: object) -> bytes:
    """Serialise for the log; never raises, so an event is never lost to its content.

    orjson first; it refuses integers beyond 64 bits and circular references,
    which then go through the standard library (arbitrary integers) or, failing
    that, are replaced by a note saying why.
    """
    try:
        return orjson.dumps(obj, default=_default, option=_OPTS)
    except (orjson.JSONEncodeError, TypeError) as exc:
        try:
            text = json.dumps(
                obj, default=str, ensure_ascii=False, allow_nan=False, separators=(",", ":")
            )
            return text.encode()
        except (ValueError, TypeError, RecursionError):
            return orjson.dumps({"metadata_error": f"metadata could not be serialised: {exc}"})


#: The longest line the writer produces: every reader (the tailer, the fold,
#: the orchestrator's history) skips longer lines, so a longer event would be
#: counted by the writer and by nobody else.
MAX_EVENT_BYTES = _native.MAX_LINE_BYTES - 4096
#: Below these sizes an event cannot come near the limit; nothing is measured.
_CHEAP_MESSAGE_CHARS = MAX_EVENT_BYTES // 16
_CHEAP_METADATA_BYTES = MAX_EVENT_BYTES // 4
#: A metadata value kept whole when the rest must go.
_SMALL_VALUE_BYTES = 1024


_orjson_dumps = orjson.dumps
_TOKENS_LIMIT = 1 << 63
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


class EventsDroppedError(OSError):
    """Events were dropped: the log could not be written (full or failing disk)
    and the writer's buffer reached ``max_buffer_bytes``.

    Raised by ``log_event_sync``/``log_event`` by every call that finds drops
    not reported yet (so, while the disk stays full, by the calls whose events
    are dropped); ``dropped_events``/``dropped_tokens`` are those new drops.
    The event of that call was accepted all the same, with ``seq``: it is
    either queued or one of the dropped, whose count and tokens the log's
    ``events_dropped`` line carries (in its ``tokens`` field, so every reader's
    sum still includes them). Do not log it again: its tokens would count
    twice. ``errno`` is the disk's error (``ENOSPC``, ``EIO``...), or
    ``ENOBUFS`` when the buffer filled before the disk reported one.
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
            raise ValueError(f"malformed log line: {malformed[0][1]}")
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


class ExecutionLogger:
    """Asynchronous (and synchronous) logger for pipeline execution events.

    ``log_event`` is non-blocking: it formats the event and queues it; the
    native writer flushes every ``flush_interval`` seconds or when
    ``buffer_size`` bytes are queued, and fsyncs per the ``fsync`` policy
    (``always`` | ``interval`` | ``never``). ``close()`` flushes and fsyncs.

    ``sanitizer``: ``True`` (default) scrubs secrets from every message and
    metadata value with :class:`~sigil.telemetry.sanitization.LogSanitizer`;
    ``False``/``None`` turns it off; or pass your own object with
    ``sanitize_string`` and ``sanitize_dict``.
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
            self._sanitizer: Sanitizer | None = _default_sanitizer()
        elif sanitizer is False or sanitizer is None:
            self._sanitizer = None
        else:
            self._sanitizer = sanitizer
        self._writer: _native.AppendWriter | None = None
        self._open_lock = threading.Lock()
        # Drops already reported by EventsDroppedError (per writer).
        self._drops_writer: _native.AppendWriter | None = None
        self._drops_reported = 0
        self._drop_tokens_reported = 0

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
                self._writer = _native.AppendWriter(
                    self.log_file,
                    buffer_bytes=self.buffer_size,
                    flush_interval=self.flush_interval,
                    fsync=self.fsync,
                    max_buffer_bytes=self.max_buffer_bytes,
                    session_id=self.session_id,
                    start_seq=self._recover_next_seq(),
                )
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
        """Log one event; returns its ``seq``. Never waits for the disk.

        Raises :class:`EventsDroppedError` (an ``OSError``) when events were
        dropped on a full or failing disk since the last such report; the event
        itself was accepted (see there: do not log it again).

        This is the hot path (about a microsecond): one serialisation and one
        hand-off to the native writer; the rare slow cases (oversized content,
        a closed or unopened writer) are handled off the common path.
        """
        if type(tokens) is not int or not 0 <= tokens < _TOKENS_LIMIT:
            raise ValueError(f"tokens must be a non-negative int below 2**63, not {tokens!r}")
        sanitizer = self._sanitizer
        meta: bytes | None = None
        if sanitizer is not None:
            message = sanitizer.sanitize_string(message)
            if metadata:
                try:
                    metadata = sanitizer.sanitize_dict(dict(metadata))
                except RecursionError:  # a circular structure
                    metadata = {"metadata_error": "metadata is circular; not logged"}
        if metadata:
            try:
                meta = _orjson_dumps(metadata, default=_default, option=_OPTS)
            except (orjson.JSONEncodeError, TypeError):
                meta = dumps(metadata)
        if (
            len(message) > _CHEAP_MESSAGE_CHARS
            or len(event_type) + len(component) > _MAX_NAME_CHARS
            or (meta is not None and len(meta) > _CHEAP_METADATA_BYTES)
        ):
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

        Non-blocking: the event is queued and written by the native writer's
        background thread.
        """
        if not self.initialized:
            await self.initialize()
        return self.log_event_sync(event_type, component, message, tokens, metadata)

    # -- flushing and closing ---------------------------------------------

    def flush_sync(self) -> None:
        """Write and fsync what is queued; raises ``OSError`` if the disk fails."""
        if self._writer is not None and not self._writer.closed:
            self._writer.flush()

    async def flush(self) -> None:
        await asyncio.to_thread(self.flush_sync)

    def close_sync(self) -> None:
        """Flush, fsync and close. Idempotent; raises ``OSError`` if the disk fails."""
        writer = self._writer
        if writer is not None:
            writer.close()

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
