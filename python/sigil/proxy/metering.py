"""Metering and budget enforcement of the calls that pass through the proxy.

Each call is one step of the session: ``step_start`` when it is forwarded,
then ``step_complete`` carrying its tokens (contract 2), or ``step_error``
(preceded by a ``token_consumption`` when a failed call still spent tokens, as
the orchestrator logs a failed attempt). Tokens reach the log only through
:meth:`TokenTracker.track`, so the tracker's total, the log's sum and the
session model agree, and the budget events (``budget_warning``,
``budget_exceeded``) are the tracker's.

The budget is the tracker's policy (sigil.telemetry.tokens): before a call is
forwarded it reserves its prompt's estimated tokens and a cap on its output
with :meth:`TokenTracker.reserve`, and the reservations of calls in flight
never add up to more than what is left, so calls in flight together overshoot
the budget by no more than their prompts were underestimated. A call whose
prompt does not fit in what is free waits for one in flight to settle; a prompt
that cannot fit even then is refused, and once the budget has run out
(``exceeded``) every call is refused. When a call settles its reservation is
given back and what it really used is recorded; a call whose usage stays
unknown keeps its reservation for the rest of the run (held: counted as spent,
never logged as tokens, shown as unknown).

Each call that reports usage is priced as it is recorded (``cost_usd``, from the
model the upstream answered with; see sigil.telemetry.pricing).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sigil.core.events import EventLogger
from sigil.proxy.policy import redact, usage_unknown
from sigil.proxy.usage import Usage
from sigil.telemetry.pricing import Pricer
from sigil.telemetry.tokens import TokenTracker

__all__ = ["BudgetExhausted", "Call", "Meter", "RecordingFailed"]


class BudgetExhausted(Exception):
    """The session's budget has run out: the call is refused."""

    def __init__(self, used: int, total: int, message: str | None = None) -> None:
        pct = used / total * 100 if total else 0.0
        super().__init__(
            message
            or f"the session's token budget is spent ({used:,} of {total:,} tokens, "
            f"{pct:.1f}%); sigil refuses further model calls in this session"
        )
        self.used = used
        self.total = total


class PromptTooLarge(BudgetExhausted):
    """The call's prompt does not fit in what is left of the budget: refused."""

    def __init__(self, prompt: int, left: int, used: int, total: int, outputs: int = 1) -> None:
        what = f"the call's prompt (~{prompt:,} tokens)"
        if outputs > 1:
            what += f" with one token for each of its {outputs:,} completions"
        super().__init__(
            used,
            total,
            f"{what} does not fit in what is left of the session's token budget "
            f"({left:,} of {total:,} tokens); sigil refuses it",
        )
        self.prompt = prompt
        self.left = left


class RecordingFailed(Exception):
    """The session's log cannot be written: a call the proxy could not record is refused."""

    def __init__(self, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        super().__init__(
            f"the session's log cannot be written ({reason}); sigil refuses the calls it "
            "could not record"
        )
        self.cause = cause


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
    #: the prompt's estimated tokens, reserved with the grant
    prompt: int = 0
    settled: bool = False
    #: the keys the call carried: cut out of any text logged about it
    secrets: tuple[str, ...] = ()

    @property
    def reserved(self) -> int:
        """What the call holds of the budget until it settles."""
        return self.prompt + self.granted

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
        #: calls whose usage stayed unknown, and the tokens they hold of the budget
        self.unknown = 0
        self.held = 0
        #: a call was refused because its prompt could not fit in what was left
        self.starved = False
        #: calls admitted with a reservation and not settled yet
        self._inflight = 0
        #: calls waiting in :meth:`admit` for one in flight to settle
        self._waiting = 0
        self._ids = itertools.count(1)
        self._settled = asyncio.Condition()
        #: why the session's log cannot be written now (None: it can); set by the session
        self.unrecorded: Callable[[], OSError | None] = _recorded
        #: calls refused because the log could not be written (none of them logged)
        self.unrecorded_refused = 0

    @property
    def exhausted(self) -> bool:
        """True once the budget has run out (no further call is admitted): the
        tokens used, with those held for calls of unknown usage, reach the
        ``exceeded`` threshold."""
        tracker = self.tracker
        if not tracker.can_continue():
            return True
        if not self.held:
            return False
        return tracker.used + self.held >= tracker.thresholds["exceeded"] * tracker.total

    @property
    def free(self) -> int:
        """Tokens of the budget neither used nor reserved (may be negative
        while calls that spent more than they reserved are being recorded)."""
        return self.tracker.remaining - self.tracker.budget.reserved

    def _refusal(self) -> BudgetExhausted:
        return BudgetExhausted(self.tracker.used + self.held, self.tracker.total)

    async def admit(self, wanted: int | None, prompt: int = 0, least: int = 1) -> int:
        """Reserve ``prompt`` tokens (the prompt's estimate) and an output cap
        of ``wanted`` tokens at most (None: a call without output); returns the
        output cap granted (0 for a call without output).

        The prompt is reserved whole, with at least ``least`` tokens of output
        (one per completion the call generates); the cap is lowered to what is
        free. Waits while what is free is promised to
        calls in flight; raises :class:`PromptTooLarge` when the prompt cannot
        fit even once they settle, and :class:`BudgetExhausted` once the budget
        has run out; :class:`RecordingFailed` while the log cannot be written."""
        failure = self.unrecorded()
        if failure is not None:
            self.unrecorded_refused += 1
            raise RecordingFailed(failure)
        least = max(1, least)
        out = 0 if wanted is None else max(least, wanted)
        need = prompt + (0 if wanted is None else least)
        # Nothing below awaits until a call must wait: decided on the event
        # loop at once, the condition's lock is only taken to wait.
        granted = self._try_admit(prompt, out, need)
        if granted is not None:
            return granted
        async with self._settled:
            while True:
                granted = self._try_admit(prompt, out, need)
                if granted is not None:
                    return granted
                self._waiting += 1
                try:
                    await self._settled.wait()
                finally:
                    self._waiting -= 1

    def _try_admit(self, prompt: int, out: int, need: int) -> int | None:
        """The output cap granted now, None when the call must wait for one in
        flight to settle; raises when it is refused."""
        tracker = self.tracker
        if self.exhausted:
            raise self._refusal()
        left = tracker.remaining - self.held
        free = tracker.remaining - tracker.budget.reserved
        if need > left or (self._inflight == 0 and (need > free or free <= 0)):
            self.starved = True
            raise PromptTooLarge(prompt, max(0, left), tracker.used, tracker.total, need - prompt)
        if need <= free and free > 0:
            granted = tracker.reserve(prompt + out) if prompt + out else 0
            if granted:
                self._inflight += 1
            return max(0, granted - prompt)
        return None

    async def _release(self, call: Call, *, hold: bool = False) -> None:
        """Give the call's reservation back (``hold``: keep it, the usage is unknown)."""
        if call.settled:
            return
        call.settled = True
        if call.reserved:
            self._inflight -= 1
            if hold:
                self.held += call.reserved
            else:
                self.tracker.release(call.reserved)
        if self._waiting:
            async with self._settled:
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
        prompt: int = 0,
        secrets: tuple[str, ...] = (),
    ) -> Call:
        """Log the call's ``step_start`` (it has been admitted with ``prompt`` and
        ``granted`` reserved); ``secrets`` are the keys it carries, never logged."""
        call = Call(
            next(self._ids), component, endpoint, model, stream, granted, requested,
            time.perf_counter(), prompt, secrets=secrets,
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
        if prompt:
            meta["prompt_tokens_reserved"] = prompt
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
        """Record a call that returned: its tokens, or unknown usage (its
        reservation then stays held against the budget)."""
        try:
            meta = self._meta(call, usage, model, status) | (extra or {})
            cancelled = await self._price(meta, usage)
            if usage is None:
                self.unknown += 1
                meta["tokens_held"] = call.reserved
                message = (
                    f"{call.endpoint} {meta['model']}: usage unknown (the upstream reported "
                    f"none); {call.reserved:,} tokens of the budget held for it"
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
            await self._release(call, hold=usage is None)

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
        """Record a call that failed; ``usage`` is what it spent all the same.
        ``error`` may quote the upstream: the call's keys are cut out of it.

        Without ``usage``, a call that may have spent tokens (:func:`usage_unknown`)
        is logged with ``usage: "unknown"`` and keeps its reservation held, as a
        call answered without usage does; one known to have spent nothing says
        ``usage: "none"``."""
        self.failed += 1
        if call.secrets:
            error = redact(error, call.secrets)
        unknown = usage_unknown(category, status, usage is not None)
        try:
            meta = self._meta(call, usage, model, status)
            if usage is None and not unknown:
                meta["usage"] = "none"
            elif unknown:
                self.unknown += 1
                meta["tokens_held"] = call.reserved
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
                if k not in ("input_tokens", "output_tokens", "cached_input_tokens", "cost_usd")
            }
            meta.update(error=error, category=category)
            await self.logger.log_event(
                "step_error", call.component, f"{call.endpoint} failed: {error}", 0, meta
            )
            if cancelled:
                raise asyncio.CancelledError  # the call's tokens recorded first
        finally:
            await self._release(call, hold=unknown)

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
            model if isinstance(model, str) else None,
            usage.input_tokens,
            usage.output_tokens,
            usage.cached_input_tokens,
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
            if usage.cached_input_tokens:
                meta["cached_input_tokens"] = usage.cached_input_tokens
            if usage.estimated:
                meta["usage_estimated"] = True
        return meta


def _recorded() -> OSError | None:
    """A log that never fails (a meter without a session: tests)."""
    return None
