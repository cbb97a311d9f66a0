"""ErrorHandler (spec 9.2): categories, retry policy, backoff, error events."""

from __future__ import annotations

import asyncio
import errno
import random
from typing import Any

import pytest

from sigil.core.error_handling import (
    ErrorCategory,
    ErrorContext,
    ErrorHandler,
    ErrorSeverity,
    RetryPolicy,
)
from sigil.pipeline.base import StepError, TokenUsage
from sigil.pipeline.providers import (
    ProviderAuthError,
    ProviderRequestError,
    ProviderResponseError,
    ProviderTransientError,
)


def ctx(**metadata: Any) -> ErrorContext:
    return ErrorContext(
        component="reasoning", operation="reasoning.run", session_id="s1", metadata=metadata
    )


@pytest.mark.parametrize(
    ("error", "category"),
    [
        (TimeoutError("read timed out"), ErrorCategory.TRANSIENT),
        (ConnectionResetError("reset"), ErrorCategory.TRANSIENT),
        (PermissionError("denied"), ErrorCategory.CONFIG),
        (FileNotFoundError("no such file"), ErrorCategory.CONFIG),
        (ModuleNotFoundError("no module named x"), ErrorCategory.CONFIG),
        (MemoryError(), ErrorCategory.SYSTEM),
        (KeyboardInterrupt(), ErrorCategory.SYSTEM),
        (OSError(errno.ENOSPC, "No space left on device"), ErrorCategory.SYSTEM),
        (OSError(errno.EIO, "I/O error"), ErrorCategory.SYSTEM),
        (RuntimeError("upstream rate limit hit"), ErrorCategory.TRANSIENT),
        (RuntimeError("invalid API key"), ErrorCategory.CONFIG),
        (ValueError("bad input"), ErrorCategory.LOGIC),
        # The spec's patterns "memory"/"auth" were too broad: these are logic errors.
        (ValueError("memory step got an empty query"), ErrorCategory.LOGIC),
        (ValueError("author field missing"), ErrorCategory.LOGIC),
        (ProviderTransientError("HTTP 503"), ErrorCategory.TRANSIENT),
        (ProviderAuthError("HTTP 401"), ErrorCategory.CONFIG),
        (ProviderRequestError("HTTP 400"), ErrorCategory.LOGIC),
        (ProviderResponseError("not JSON"), ErrorCategory.TRANSIENT),
        (StepError("declared", category="system"), ErrorCategory.SYSTEM),
        (StepError("undeclared"), ErrorCategory.LOGIC),
    ],
)
def test_categorize(error: BaseException, category: ErrorCategory) -> None:
    assert ErrorHandler().categorize(error) is category


def test_only_transient_errors_are_retried_up_to_max() -> None:
    handler = ErrorHandler(max_retries=2, backoff_base=0.5, backoff_max=10, jitter=0)
    err = TimeoutError("timed out")
    decisions = [handler.handle(err, ctx(), retry_count=n).should_retry for n in range(4)]
    assert decisions == [True, True, False, False]
    for logic_or_fatal in (ValueError("x"), PermissionError("x"), MemoryError()):
        handled = handler.handle(logic_or_fatal, ctx())
        assert handled.should_retry is False and handled.max_retries == 0


def test_exponential_backoff_with_cap_is_exact_without_jitter() -> None:
    handler = ErrorHandler(backoff_base=1.0, backoff_max=5.0, jitter=0)
    assert [handler.backoff_delay(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_jitter_only_shortens_and_is_reproducible_with_a_seed() -> None:
    a = ErrorHandler(backoff_base=1.0, backoff_max=30.0, jitter=0.5, rng=random.Random(7))
    b = ErrorHandler(backoff_base=1.0, backoff_max=30.0, jitter=0.5, rng=random.Random(7))
    delays = [a.backoff_delay(n) for n in range(6)]
    assert delays == [b.backoff_delay(n) for n in range(6)]
    for n, delay in enumerate(delays):
        full = min(30.0, 2.0**n)
        assert full * 0.5 <= delay <= full


def test_retry_after_hint_is_honoured_and_capped() -> None:
    handler = ErrorHandler(backoff_base=0.01, backoff_max=0.1, jitter=0, retry_after_max=20)
    err = ProviderTransientError("HTTP 429", status=429, retry_after=7)
    assert handler.handle(err, ctx()).retry_delay == 7
    err = ProviderTransientError("HTTP 429", status=429, retry_after=3600)
    assert handler.handle(err, ctx()).retry_delay == 20
    err = ProviderTransientError("HTTP 429", status=429, retry_after=0)
    assert handler.handle(err, ctx()).retry_delay == 0.01


def test_settings_policy() -> None:
    from sigil.core.config import load_settings

    settings = load_settings(
        {"errors.max_retries": 1, "errors.backoff_base": 0.25, "errors.backoff_max": 0.5},
        env={},
        path="/nonexistent/config.yaml",
    )
    handler = ErrorHandler.from_settings(settings, jitter=0)
    policy = handler.policy_for(ErrorCategory.TRANSIENT)
    assert policy == RetryPolicy(max_retries=1, backoff_base=0.25, backoff_max=0.5)
    assert handler.handle(TimeoutError(), ctx(), 0).retry_delay == 0.25
    assert handler.handle(TimeoutError(), ctx(), 1).should_retry is False


def test_severity_message_and_suggestions() -> None:
    handler = ErrorHandler(jitter=0)
    first = handler.handle(TimeoutError("slow"), ctx(), 0)
    assert first.severity is ErrorSeverity.WARNING
    assert first.message == "TimeoutError: slow (Will retry automatically)"
    last = handler.handle(TimeoutError("slow"), ctx(), 3)
    assert last.severity is ErrorSeverity.ERROR and not last.should_retry
    assert "Retries exhausted" in last.message
    cfg = handler.handle(PermissionError("no key"), ctx())
    assert cfg.message.endswith("(Check configuration and restart)") and cfg.fatal
    sysd = handler.handle(MemoryError("oom"), ctx())
    assert sysd.severity is ErrorSeverity.CRITICAL and sysd.fatal
    assert "System resource issue" in sysd.message
    logic = handler.handle(ValueError("bad"), ctx())
    assert logic.message.endswith("(Check input and try again)") and not logic.fatal


def test_traceback_is_captured_from_the_exception() -> None:
    try:
        raise ValueError("deep")
    except ValueError as exc:
        error = exc
    handled = ErrorHandler().handle(error, ctx())
    assert "ValueError: deep" in handled.traceback and "raise ValueError" in handled.traceback


def test_log_error_writes_schema_event_types() -> None:
    events: list[tuple[str, str, str, int, dict[str, Any]]] = []

    class Log:
        async def log_event(self, *args: Any) -> int:
            events.append(args)
            return len(events)

        def log_event_sync(self, *args: Any) -> int:
            events.append(args)
            return len(events)

    handler = ErrorHandler(Log(), max_retries=1, backoff_base=0.5, jitter=0)
    err = StepError("flaky", usage=TokenUsage(3, 4), category="transient")
    retry = handler.handle(err, ctx(latency_ms=12.5, attempt=1), 0)
    final = handler.handle(err, ctx(latency_ms=30.0, attempt=2), 1)
    asyncio.run(handler.log_error(retry))
    handler.log_error_sync(final)

    (t1, c1, m1, tok1, meta1), (t2, c2, _, tok2, meta2) = events
    assert (t1, t2) == ("retry_attempt", "step_error")  # never the schema-less "error"
    assert c1 == c2 == "reasoning"
    assert tok1 == tok2 == 0  # failed attempts' tokens go on token_consumption, not here
    assert meta1["retry_delay_s"] == 0.5 and meta1["should_retry"] is True
    assert meta1["latency_ms"] == 12.5 and meta1["attempt"] == 1
    assert meta2["should_retry"] is False and "retry_delay_s" not in meta2
    assert meta2["category"] == "transient" and meta2["error_type"] == "StepError"
    assert "flaky" in m1


def test_errors_jsonl_record() -> None:
    handled = ErrorHandler().handle(ValueError("bad"), ctx(attempt=1))
    record = handled.to_record()
    assert record["category"] == "logic" and record["component"] == "reasoning"
    assert record["session_id"] == "s1" and record["metadata"] == {"attempt": 1}
    assert record["traceback"]


def test_invalid_policy_values() -> None:
    with pytest.raises(ValueError):
        ErrorHandler(jitter=2)
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)
