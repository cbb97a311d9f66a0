"""Error categories, retry policy and error events (spec section 9).

The categories and severities are the spec's (9.1, 9.2). What differs from its
sample code, and why:

* The retry policy is configurable (``settings.errors``: ``max_retries``,
  ``backoff_base``, ``backoff_max``) and only *transient* errors are retried, with
  exponential backoff ``base * 2**retry`` capped at ``backoff_max``. Jitter (up to
  ``jitter`` of the delay, subtracted) spreads retries of parallel sessions apart;
  ``jitter=0`` makes delays exact for tests.
* A ``retry_after`` hint on an exception (an HTTP ``Retry-After``, in seconds) is
  honoured: the delay is at least the hint, up to ``retry_after_max``.
* An exception may state its own category through a ``category`` attribute (an
  :class:`ErrorCategory` or its value); the providers in :mod:`sigil.pipeline` do,
  so that an HTTP 401 is a config error whatever its message says.
* The spec's ``log_error`` writes ``event_type="error"``, which is not in its own
  schema (4.2.3). Here a retried failure is logged as ``retry_attempt`` and a final
  one as ``step_error``, both with ``tokens=0``: the tokens a failed attempt used are
  logged once, by the token tracker, on a ``token_consumption`` event (contract 2).
"""

from __future__ import annotations

import errno
import random
import traceback as _traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from sigil.core.config import Settings
    from sigil.core.events import EventLogger

__all__ = [
    "ErrorCategory",
    "ErrorContext",
    "ErrorHandler",
    "ErrorSeverity",
    "HandledError",
    "RetryPolicy",
]


class ErrorCategory(StrEnum):
    """Categories of errors for handling decisions (spec 9.1)."""

    TRANSIENT = "transient"  # Retry automatically
    LOGIC = "logic"  # Log and continue
    CONFIG = "config"  # Abort with message
    SYSTEM = "system"  # Abort and alert


class ErrorSeverity(StrEnum):
    """Severity levels for errors."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


#: The spec's suggestion text per category (9.2 ``_format_message``).
SUGGESTIONS: dict[ErrorCategory, str] = {
    ErrorCategory.TRANSIENT: "Will retry automatically",
    ErrorCategory.LOGIC: "Check input and try again",
    ErrorCategory.CONFIG: "Check configuration and restart",
    ErrorCategory.SYSTEM: "System resource issue - check disk/memory",
}

#: Suggestion once a transient error has used up its retries.
RETRIES_EXHAUSTED = "Retries exhausted - check the service and try again"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to wait before retrying one category of error."""

    max_retries: int
    backoff_base: float = 0.0
    backoff_max: float = 0.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError(f"retry policy values must be >= 0, got {self}")


@dataclass(slots=True)
class ErrorContext:
    """Context information for an error."""

    component: str
    operation: str
    session_id: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class HandledError:
    """Result of error handling: what happened and what to do about it."""

    original_error: BaseException
    category: ErrorCategory
    severity: ErrorSeverity
    message: str
    context: ErrorContext
    should_retry: bool
    retry_count: int
    max_retries: int
    traceback: str
    retry_delay: float = 0.0
    suggestion: str = ""
    timestamp: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def error_type(self) -> str:
        return type(self.original_error).__name__

    @property
    def fatal(self) -> bool:
        """Config and system errors stop the session (spec 9.1, "fatal errors")."""
        return self.category in (ErrorCategory.CONFIG, ErrorCategory.SYSTEM)

    def to_record(self) -> dict[str, Any]:
        """The error as one ``errors.jsonl`` record."""
        return {
            "timestamp": self.timestamp,
            "session_id": self.context.session_id,
            "component": self.context.component,
            "operation": self.context.operation,
            "category": self.category.value,
            "severity": self.severity.value,
            "error_type": self.error_type,
            "error": str(self.original_error),
            "message": self.message,
            "suggestion": self.suggestion,
            "retry_count": self.retry_count,
            "max_retries": self.max_retries,
            "should_retry": self.should_retry,
            "retry_delay_s": self.retry_delay,
            "metadata": dict(self.context.metadata),
            "traceback": self.traceback,
        }


class ErrorHandler:
    """Central error handling: categorise, decide on retries, log, suggest.

    One handler serves a whole session. It keeps no per-error state between calls:
    the caller passes the attempt number, so concurrent steps cannot confuse it.
    """

    # Error type to category (checked in order: the first isinstance match wins, so
    # subclasses of OSError come before OSError itself).
    ERROR_CATEGORIES: ClassVar[tuple[tuple[type[BaseException], ErrorCategory], ...]] = (
        (TimeoutError, ErrorCategory.TRANSIENT),
        (ConnectionError, ErrorCategory.TRANSIENT),
        (PermissionError, ErrorCategory.CONFIG),
        (FileNotFoundError, ErrorCategory.CONFIG),
        (ModuleNotFoundError, ErrorCategory.CONFIG),
        (MemoryError, ErrorCategory.SYSTEM),
        (KeyboardInterrupt, ErrorCategory.SYSTEM),
        (SystemExit, ErrorCategory.SYSTEM),
    )

    #: Disk and resource errnos that mean the machine, not the input, is at fault.
    SYSTEM_ERRNOS: ClassVar[frozenset[int]] = frozenset(
        {
            errno.ENOSPC,
            errno.EIO,
            errno.EDQUOT,
            errno.EMFILE,
            errno.ENFILE,
            errno.ENOMEM,
            errno.EROFS,
        }
    )

    # Category to retry policy (spec 9.2). Only TRANSIENT is ever retried; the
    # spec's LOGIC entry of 1 was never used by its own ``handle``.
    DEFAULT_RETRY_POLICY: ClassVar[Mapping[ErrorCategory, RetryPolicy]] = {
        ErrorCategory.TRANSIENT: RetryPolicy(max_retries=3, backoff_base=1.0, backoff_max=30.0),
        ErrorCategory.LOGIC: RetryPolicy(max_retries=0),
        ErrorCategory.CONFIG: RetryPolicy(max_retries=0),
        ErrorCategory.SYSTEM: RetryPolicy(max_retries=0),
    }

    def __init__(
        self,
        logger: EventLogger | None = None,
        *,
        max_retries: int = 3,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        jitter: float = 0.1,
        retry_after_max: float = 300.0,
        rng: random.Random | None = None,
    ) -> None:
        """
        Args:
            logger: execution logger for ``retry_attempt`` / ``step_error`` events.
            max_retries, backoff_base, backoff_max: the transient retry policy.
            jitter: fraction (0..1) of each delay that may be randomly taken off;
                0 gives exact, reproducible delays.
            retry_after_max: longest wait a ``retry_after`` hint may impose.
            rng: random source for the jitter (seed it for reproducible tests).
        """
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be within 0..1, got {jitter}")
        self.logger = logger
        self.retry_policy: dict[ErrorCategory, RetryPolicy] = dict(self.DEFAULT_RETRY_POLICY)
        self.retry_policy[ErrorCategory.TRANSIENT] = RetryPolicy(
            max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max
        )
        self.jitter = jitter
        self.retry_after_max = retry_after_max
        self._rng = rng or random.Random()
        self.handled: list[HandledError] = []

    @classmethod
    def from_settings(
        cls, settings: Settings, logger: EventLogger | None = None, **kwargs: Any
    ) -> ErrorHandler:
        """A handler with the retry policy of ``settings.errors``."""
        errors = settings.errors
        return cls(
            logger,
            max_retries=errors.max_retries,
            backoff_base=errors.backoff_base,
            backoff_max=errors.backoff_max,
            **kwargs,
        )

    # -- decisions -----------------------------------------------------------

    def categorize(self, error: BaseException) -> ErrorCategory:
        """Categorise an error: its own ``category``, then its type, then its message."""
        declared = getattr(error, "category", None)
        if declared is not None:
            try:
                return ErrorCategory(declared)
            except ValueError:
                pass
        if isinstance(error, OSError) and error.errno in self.SYSTEM_ERRNOS:
            return ErrorCategory.SYSTEM
        for error_type, category in self.ERROR_CATEGORIES:
            if isinstance(error, error_type):
                return category

        message = str(error).lower()
        if any(word in message for word in ("timeout", "timed out", "rate limit")):
            return ErrorCategory.TRANSIENT
        if any(word in message for word in ("api key", "credential", "unauthorized")):
            return ErrorCategory.CONFIG
        if any(word in message for word in ("out of memory", "disk full", "no space left")):
            return ErrorCategory.SYSTEM
        return ErrorCategory.LOGIC

    def policy_for(self, category: ErrorCategory) -> RetryPolicy:
        return self.retry_policy[category]

    def backoff_delay(self, retry_count: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry_count + 1``.

        ``min(backoff_max, backoff_base * 2**retry_count)``, less up to ``jitter`` of
        itself, and never less than a ``retry_after`` hint (itself capped at
        ``retry_after_max``).
        """
        policy = self.retry_policy[ErrorCategory.TRANSIENT]
        delay = min(policy.backoff_max, policy.backoff_base * (2.0 ** max(0, retry_count)))
        if self.jitter and delay > 0:
            delay -= delay * self.jitter * self._rng.random()
        if retry_after is not None and retry_after > 0:
            delay = max(delay, min(float(retry_after), self.retry_after_max))
        return delay

    def handle(
        self,
        error: BaseException,
        context: ErrorContext,
        retry_count: int = 0,
    ) -> HandledError:
        """Decide what to do about ``error`` on attempt ``retry_count + 1``."""
        category = self.categorize(error)
        policy = self.retry_policy[category]
        max_retries = policy.max_retries
        should_retry = category is ErrorCategory.TRANSIENT and retry_count < max_retries
        retry_delay = 0.0
        if should_retry:
            retry_delay = self.backoff_delay(retry_count, _retry_after_of(error))
        if category is ErrorCategory.TRANSIENT and not should_retry:
            suggestion = RETRIES_EXHAUSTED
        else:
            suggestion = SUGGESTIONS[category]
        handled = HandledError(
            original_error=error,
            category=category,
            severity=self._severity_for_category(category, retry_count),
            message=f"{type(error).__name__}: {error} ({suggestion})",
            context=context,
            should_retry=should_retry,
            retry_count=retry_count,
            max_retries=max_retries,
            traceback="".join(_traceback.format_exception(type(error), error, error.__traceback__)),
            retry_delay=retry_delay,
            suggestion=suggestion,
        )
        self.handled.append(handled)
        return handled

    def _severity_for_category(self, category: ErrorCategory, retry_count: int) -> ErrorSeverity:
        if category is ErrorCategory.SYSTEM:
            return ErrorSeverity.CRITICAL
        if category is ErrorCategory.CONFIG:
            return ErrorSeverity.ERROR
        if category is ErrorCategory.TRANSIENT:
            return ErrorSeverity.WARNING if retry_count == 0 else ErrorSeverity.ERROR
        return ErrorSeverity.WARNING

    # -- events ----------------------------------------------------------------

    @staticmethod
    def event_for(handled: HandledError) -> tuple[str, str, str, int, dict[str, Any]]:
        """The ``(event_type, component, message, tokens, metadata)`` of an error event."""
        event_type = "retry_attempt" if handled.should_retry else "step_error"
        metadata: dict[str, Any] = {
            "error": str(handled.original_error),
            "error_type": handled.error_type,
            "category": handled.category.value,
            "severity": handled.severity.value,
            "operation": handled.context.operation,
            "retry_count": handled.retry_count,
            "max_retries": handled.max_retries,
            "should_retry": handled.should_retry,
            "suggestion": handled.suggestion,
        }
        if handled.should_retry:
            metadata["retry_delay_s"] = round(handled.retry_delay, 6)
        metadata.update(handled.context.metadata)
        return event_type, handled.context.component, handled.message, 0, metadata

    async def log_error(self, handled: HandledError) -> int | None:
        """Log ``handled`` as ``retry_attempt`` (will retry) or ``step_error`` (final).

        ``handled.context.metadata`` is merged into the event's metadata (the
        orchestrator puts ``latency_ms`` and ``attempt`` there). Returns the seq.
        """
        if self.logger is None:
            return None
        return await self.logger.log_event(*self.event_for(handled))

    def log_error_sync(self, handled: HandledError) -> int | None:
        """Synchronous twin of :meth:`log_error`."""
        if self.logger is None:
            return None
        return self.logger.log_event_sync(*self.event_for(handled))


def _retry_after_of(error: BaseException) -> float | None:
    value = getattr(error, "retry_after", None)
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None
