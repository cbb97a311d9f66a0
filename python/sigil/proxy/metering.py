"""Metering and budget enforcement of the calls that pass through the proxy.

Each call is one step of the session: ``step_start`` when it is forwarded,
then ``step_complete`` carrying its tokens (contract 2), or ``step_error``
(preceded by a ``token_consumption`` when a failed call still spent tokens, as
the orchestrator logs a failed attempt). Tokens reach the log only through
:meth:`TokenTracker.track`, so the tracker's total, the log's sum and the
session model agree, and the budget events (``budget_warning``,
``budget_exceeded``) are the tracker's.

The budget is the tracker's policy (sigil.telemetry.tokens): before a call is
forwarded it is granted a cap on its output by :meth:`TokenTracker.reserve`,
and the grants of calls in flight never add up to more than what is left. A
call that finds everything left promised waits for one in flight to settle;
once the budget has run out (``exceeded``), calls are refused.

Each call that reports usage is priced as it is recorded (``cost_usd``, from the
model the upstream answered with; see sigil.telemetry.pricing).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

from sigil.core.events import EventLogger
from sigil.proxy.usage import Usage
from sigil.telemetry.pricing import Pricer
from sigil.telemetry.tokens import TokenTracker

__all__ = ["BudgetExhausted", "Call", "Meter"]


class BudgetExhausted(Exception):
    """The session's budget has run out: the call is refused."""

    def __init__(self, used: int, total: int) -> None:
        pct = used / total * 100 if total else 0.0
        super().__init__(
            f"the session's token budget is spent ({used:,} of {total:,} tokens, {pct:.1f}%); "
            "sigil refuses further model calls in this session"
        )
        self.used = used
        self.total = total


@dataclass(slots=True)
class Call:
    """One call in flight."""

    call_id: int
    component: str
    endpoint: str
    model: str
    stream: bool
    #: the output cap granted (0 for calls without output: embeddings)
    granted: int
    #: the cap the client asked for (None: it asked for none)
    requested: int | None
    started: float
    settled: bool = False

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 3)


class Meter:
    """Admits, caps and records the calls of one session run (one event loop)."""

    def __init__(
        self,
        tracker: TokenTracker,
        logger: EventLogger,
        *,
        run: int,
        pricer: Pricer | None = None,
    ) -> None:
        self.tracker = tracker
        self.logger = logger
        self.run = run
        #: prices each call's event; the table loads in the background meanwhile
        self.pricer = pricer if pricer is not None else Pricer()
        self.pricer.warm()
        self.calls = 0
        self.failed = 0
        self.refused = 0
        self._ids = itertools.count(1)
        self._settled = asyncio.Condition()

    @property
    def exhausted(self) -> bool:
        """True once the budget has run out (no further call is admitted)."""
        return not self.tracker.can_continue()

    def _refusal(self) -> BudgetExhausted:
        return BudgetExhausted(self.tracker.used, self.tracker.total)

    async def admit(self, wanted: int | None) -> int:
        """The output cap granted to a call that asks for ``wanted`` tokens at
        most (None: a call without output, which only needs the budget not to
        have run out). Waits while everything left is promised to calls in
        flight; raises :class:`BudgetExhausted` once the budget has run out."""
        if wanted is None:
            if self.exhausted:
                raise self._refusal()
            return 0
        async with self._settled:
            while True:
                granted = self.tracker.reserve(max(1, wanted))
                if granted:
                    return granted
                if self.exhausted:
                    raise self._refusal()
                await self._settled.wait()

    async def _release(self, call: Call) -> None:
        if call.settled:
            return
        call.settled = True
        async with self._settled:
            if call.granted:
                self.tracker.release(call.granted)
            self._settled.notify_all()

    async def start(
        self,
        *,
        component: str,
        endpoint: str,
        model: str,
        stream: bool,
        granted: int,
        requested: int | None,
    ) -> Call:
        """Log the call's ``step_start`` (it has been admitted with ``granted``)."""
        call = Call(
            next(self._ids), component, endpoint, model, stream, granted, requested,
            time.perf_counter(),
        )  # fmt: skip
        self.calls += 1
        meta: dict[str, Any] = {
            "run": self.run,
            "call": call.call_id,
            "endpoint": endpoint,
            "model": model,
            "stream": stream,
        }
        if granted:
            meta["max_tokens"] = granted
            if requested is not None:
                meta["requested_max_tokens"] = requested
        await self.logger.log_event("step_start", component, f"{endpoint} {model} started", 0, meta)
        return call

    async def complete(
        self,
        call: Call,
        usage: Usage | None,
        *,
        model: str | None = None,
        status: int = 200,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Record a call that returned: its tokens, or unknown usage."""
        try:
            meta = self._meta(call, usage, model, status) | (extra or {})
            cancelled = await self._price(meta, usage)
            if usage is None:
                message = (
                    f"{call.endpoint} {meta['model']}: usage unknown (the upstream reported none)"
                )
            else:
                message = (
                    f"{call.endpoint} {meta['model']}: {usage.input_tokens:,} in + "
                    f"{usage.output_tokens:,} out tokens"
                    + (" (estimated)" if usage.estimated else "")
                )
            await self.tracker.track(
                call.component,
                usage.total if usage is not None else 0,
                event_type="step_complete",
                message=message,
                metadata=meta,
            )
            if cancelled:
                raise asyncio.CancelledError  # the call's tokens recorded first
        finally:
            await self._release(call)

    async def fail(
        self,
        call: Call,
        error: str,
        *,
        category: str,
        status: int | None = None,
        usage: Usage | None = None,
        model: str | None = None,
    ) -> None:
        """Record a call that failed; ``usage`` is what it spent all the same."""
        self.failed += 1
        try:
            meta = self._meta(call, usage, model, status)
            cancelled = False
            if usage is not None and usage.total:
                cancelled = await self._price(meta, usage)
                await self.tracker.track(
                    call.component,
                    usage.total,
                    event_type="token_consumption",
                    message=(
                        f"{call.endpoint} {meta['model']} failed; it used {usage.total:,} tokens"
                        + (" (estimated from what arrived)" if usage.estimated else "")
                    ),
                    metadata=meta | {"outcome": "failed_call"},
                )
            meta = {
                k: v
                for k, v in meta.items()
                if k not in ("input_tokens", "output_tokens", "cost_usd")
            }
            meta.update(error=error, category=category)
            await self.logger.log_event(
                "step_error", call.component, f"{call.endpoint} failed: {error}", 0, meta
            )
            if cancelled:
                raise asyncio.CancelledError  # the call's tokens recorded first
        finally:
            await self._release(call)

    async def refuse(
        self, *, component: str, endpoint: str, model: str, stream: bool, error: str
    ) -> None:
        """Record a call refused because the budget has run out (never forwarded)."""
        self.refused += 1
        call = await self.start(
            component=component, endpoint=endpoint, model=model, stream=stream,
            granted=0, requested=None,
        )  # fmt: skip
        self.failed += 1
        call.settled = True
        await self.logger.log_event(
            "step_error",
            component,
            f"{endpoint} refused: {error}",
            0,
            {
                "run": self.run,
                "call": call.call_id,
                "endpoint": endpoint,
                "model": model,
                "status": 429,
                "error": error,
                "category": "budget",
                "latency_ms": call.elapsed_ms(),
            },
        )

    async def _price(self, meta: dict[str, Any], usage: Usage | None) -> bool:
        """Add the call's ``cost_usd`` to ``meta`` when its model is priced; True when
        the call was cancelled meanwhile (the caller records it, then raises)."""
        if usage is None:
            return False
        model = meta.get("model")
        cost, cancelled = await self.pricer.ameta(
            model if isinstance(model, str) else None, usage.input_tokens, usage.output_tokens
        )
        meta.update(cost)
        return cancelled

    def _meta(
        self, call: Call, usage: Usage | None, model: str | None, status: int | None
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "run": self.run,
            "call": call.call_id,
            "endpoint": call.endpoint,
            "model": model or call.model,
            "stream": call.stream,
            "latency_ms": call.elapsed_ms(),
        }
        if status is not None:
            meta["status"] = status
        if call.granted:
            meta["max_tokens"] = call.granted
        if usage is None:
            meta["usage"] = "unknown"
        else:
            meta["input_tokens"] = usage.input_tokens
            meta["output_tokens"] = usage.output_tokens
            if usage.estimated:
                meta["usage_estimated"] = True
        return meta
