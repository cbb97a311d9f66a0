"""Type stubs for the private native module ``sigil._native`` (Rust, PyO3).

Use the typed wrappers in ``sigil.telemetry.execution_logger`` and
``sigil.telemetry.log_parser`` instead of importing this module.
"""

from os import PathLike
from types import TracebackType
from typing import Any, Literal

MAX_LINE_BYTES: int
#: The largest ``buffer_bytes``/``max_buffer_bytes`` an AppendWriter accepts (256 MiB).
MAX_BUFFER_BYTES: int
# How deep an event's metadata (or any value) may nest, the value itself being
# level 1: {} is 1, {"a": [1]} is 2. Deeper lines are malformed for every reader.
MAX_DEPTH: int
# The largest `tokens` a line may hold (2**53); above it the line is malformed.
MAX_TOKENS: int

_Path = str | PathLike[str]
_Malformed = tuple[int, str]
_Checkpoint = tuple[int, int, int, int, int]

class ParsedEntry:
    @property
    def timestamp(self) -> str: ...
    @property
    def session_id(self) -> str: ...
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
    def offset(self) -> int: ...
    @property
    def metadata(self) -> dict[str, Any]: ...
    @property
    def metadata_json(self) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...

def parse_lines(
    lines: list[bytes], base_offset: int = 0
) -> tuple[list[ParsedEntry], list[_Malformed]]: ...
def parse_bytes(
    data: bytes, base_offset: int = 0
) -> tuple[list[ParsedEntry], list[_Malformed]]: ...
def fold_file(path: _Path, last_n: int = 100, max_line_bytes: int = ...) -> dict[str, Any]: ...
def tail_max_seq(path: _Path, max_scan_bytes: int = ...) -> int | None: ...

class Fold:
    def __init__(self, last_n: int = 100) -> None: ...
    def feed_file(self, path: _Path, max_line_bytes: int = ...) -> int: ...
    def feed_bytes(self, data: bytes, base_offset: int = 0) -> int: ...
    def summary(self) -> dict[str, Any]: ...

class AppendWriter:
    """Buffered append-only line writer; a background thread writes and fsyncs.

    Sizes above ``MAX_BUFFER_BYTES`` (or below 1) are a ``ValueError``. A failed
    fsync is sticky: ``flush()``/``close()`` raise ``OSError`` until what it
    covered has been written again and synced (``stats()["sync_failed"]``).
    On a full disk, lines past ``max_buffer_bytes`` are dropped and counted
    (``dropped_events``, ``stats()["dropped_tokens"]``) and one
    ``events_dropped`` line carries their count and, in ``tokens``, their tokens.
    In a forked child every use raises ``RuntimeError`` and ``close()`` does
    nothing: the parent writes what it queued.
    """

    def __init__(
        self,
        path: _Path,
        *,
        buffer_bytes: int = 1024,
        flush_interval: float = 0.1,
        fsync: Literal["always", "interval", "never"] = "interval",
        max_buffer_bytes: int = ...,
        session_id: str = "",
        start_seq: int = 0,
    ) -> None: ...
    def write(self, line: bytes | str) -> None: ...
    def write_event(
        self,
        session_id: str,
        event_type: str,
        component: str,
        message: str,
        tokens: int = 0,
        metadata: bytes | None = None,
        timestamp: str | None = None,
    ) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def path(self) -> str: ...
    @property
    def next_seq(self) -> int: ...
    @property
    def dropped_events(self) -> int: ...
    def stats(self) -> dict[str, Any]: ...
    def __enter__(self) -> AppendWriter: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

class Tailer:
    def __init__(
        self,
        path: _Path,
        *,
        start: Literal["beginning", "end"] = "beginning",
        checkpoint: tuple[int, int, int] | _Checkpoint | None = None,
        max_line_bytes: int = ...,
    ) -> None: ...
    def read_lines(self, max_lines: int = 65536, max_bytes: int = ...) -> list[bytes]: ...
    def read_entries(
        self, max_lines: int = 65536, max_bytes: int = ...
    ) -> tuple[list[ParsedEntry], list[_Malformed]]: ...
    def fold_into(self, fold: Fold) -> int: ...
    def wait(self, timeout: float) -> bool: ...
    def checkpoint(self) -> _Checkpoint | None: ...
    @property
    def path(self) -> str: ...
    def stats(self) -> dict[str, Any]: ...
