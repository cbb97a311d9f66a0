"""Monitor states for display tests, built the way the monitor builds them:
events written as JSON lines into one native ``Fold``, whose snapshots a
:class:`SessionState` reads (contract 12). No Python arithmetic on the way."""

from __future__ import annotations

from typing import Any

from sigil import _native
from sigil.interfaces.cli.monitor import SessionState
from sigil.telemetry.execution_logger import LogEntry


class Fed:
    """One native fold and the monitor state that reads it, fed line by line."""

    def __init__(self, session_id: str = "demo-1", last_n: int = 100, **state: Any) -> None:
        self.fold = _native.Fold(last_n)
        self.state = SessionState(session_id, max_events=last_n, **state)
        self.offset = 0

    def feed(self, *items: LogEntry | bytes) -> list[Any]:
        """Feed events (or raw lines, e.g. malformed ones); returns the new entries."""
        data = b"".join((i if isinstance(i, bytes) else i.to_bytes()) + b"\n" for i in items)
        self.fold.feed_bytes(data, self.offset)
        self.offset += len(data)
        return self.state.update(self.fold.snapshot())


def state_of(*items: LogEntry | bytes, session_id: str = "demo-1", **state: Any) -> SessionState:
    fed = Fed(session_id, **state)
    fed.feed(*items)
    return fed.state
