"""What code below ``telemetry`` needs from an event logger.

:class:`~sigil.telemetry.execution_logger.ExecutionLogger` provides it; the error
handler (and the token tracker) take any object that does, so ``core`` depends on
this protocol rather than on ``telemetry`` (ARCHITECTURE.md, Layers).
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["EventLogger"]


class EventLogger(Protocol):
    """Logs one event; returns its ``seq``."""

    async def log_event(
        self,
        event_type: str,
        component: str,
        message: str,
        tokens: int = 0,
        metadata: dict[str, Any] | None = None,
    ) -> int: ...

    def log_event_sync(
        self,
        event_type: str,
        component: str,
        message: str,
        tokens: int = 0,
        metadata: dict[str, Any] | None = None,
    ) -> int: ...
