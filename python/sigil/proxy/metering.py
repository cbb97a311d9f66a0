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
never logged as tokens, shown as unknown), and the tokens held by earlier runs
(the session model's ``tokens_held``, folded from the ``step_complete`` events'
``metadata.tokens_held``) stay held in every later run. When held tokens are
what runs the budget out, ``budget_exceeded`` is logged as when counted ones do.

Each call that reports usage is priced as it is recorded (``cost_usd``, from the
model the upstream answered with; see sigil.telemetry.pricing).

What a prompt is reserved at (:meth:`Meter.prompt`) is its UTF-8 length while
that is small beside what is free, else its ``cl100k_base`` count, raised by
what the upstream was seen to bill beyond that count (the calibration below),
so that near the end of the budget the reservations of calls in flight are a
bound of what the upstream bills them, and not only for OpenAI's tokenizers.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sigil.core.events import EventLogger
from sigil.proxy.policy import redact, usage_unknown
from sigil.proxy.usage import (
    Usage,
    count_tokens,
    prompt_estimate_text,
    prompt_overhead,
    utf8_size,
)
from sigil.telemetry.pricing import Pricer
from sigil.telemetry.tokens import TokenTracker

__all__ = ["BudgetExhausted", "Call", "Meter", "Prompt", "RecordingFailed"]

#: A prompt is reserved at its UTF-8 length while this many times that fits in
#: what is free of the budget (it costs nothing to read); nearer the end, where
#: the reservation decides what is admitted, at its calibrated count.
AMPLE = 4
#: Calls whose counted prompt is smaller are not learnt from: the tokens an
#: upstream's chat template adds to each call would pass for a ratio and raise
#: the reservation of every long prompt.
LEARN_FROM = 128
#: Calls of a model far from the end of the budget whose prompts are counted
#: (once each) while its ratio is not known yet, to learn it before the end...
SAMPLES = 8
#: ...when their text is no longer than this (~6 ms a count at most).
SAMPLE_BYTES = 64 * 1024
#: Models whose ratio is kept; the calls of any other stay uncalibrated
#: (reserved at their length, or one at a time near the end).
MAX_MODELS = 1024


@dataclass(slots=True)
class Prompt:
    """What a call's prompt is reserved at (:meth:`Meter.prompt`)."""

    #: tokens reserved for the prompt
    reserve: int
    #: its ``cl100k_base`` count with the chat format's tokens (0: not counted)
    counted: int = 0
    #: ``reserve`` may be below what the upstream bills: a count not calibrated
    #: yet, near the end of the budget (such calls are admitted one at a time)
    uncertain: bool = False
    #: the prompt's UTF-8 length with the chat format's tokens: a bound of its tokens
    bound: int = 0
    #: the model asked for (whose ratio calibrates the count)
    model: str = ""


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
    #: the prompt's ``cl100k_base`` count (0: not counted), learnt from once answered
    counted: int = 0
    #: admitted with an uncalibrated count near the end (:attr:`Prompt.uncertain`)
    uncertain: bool = False

    @property
    def reserved(self) -> int:
        """What the call holds of the budget until it settles."""
        return self.prompt + self.granted

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 3)


class Meter:
    """Admits, caps and records the calls of one session run.

    Used from one thread at a time (the proxy's native transport calls it
    with the GIL held), logging through the logger's ``log_event_sync``; a
    caller of :meth:`try_admit` that is told to wait asks again once a call
    settles (rust/proxy.rs wakes its waiting calls whenever one does)."""

    def __init__(
        self,
        tracker: TokenTracker,
        logger: EventLogger,
        *,
        run: int,
        pricer: Pricer | None = None,
        held_before: int = 0,
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
        #: tokens held by earlier runs' calls of unknown usage (the session
        #: model's), reserved for the whole run
        self.held_before = held_before
        if held_before:
            tracker.reserve(held_before)
        #: ``budget_exceeded`` logged for held tokens (once)
        self._held_announced = False
        #: the last call asked for was refused because its prompt could not fit
        #: in what was left (a call admitted after it clears this)
        self.starved = False
        #: calls admitted with a reservation and not settled yet
        self._inflight = 0
        #: of them, those admitted with an uncalibrated count (at most one)
        self._uncertain = 0
        #: per model asked for: the most the upstream billed a prompt, as a
        #: multiple of its count (``(billed, counted)``, at least 1; :meth:`prompt`)
        self.ratios: dict[str, tuple[int, int]] = {}
        #: per model not calibrated yet: prompts counted far from the end
        self._sampled: dict[str, int] = {}
        self._ids = itertools.count(1)
        #: why the session's log cannot be written now (None: it can); set by the session
        self.unrecorded: Callable[[], OSError | None] = _recorded
        #: calls refused because the log could not be written (none of them logged)
        self.unrecorded_refused = 0
        #: waits until the settled call's record has reached the OS (set by the session)
        self.written: Callable[[], None] = _written

    @property
    def exhausted(self) -> bool:
        """True once the budget has run out (no further call is admitted): the
        tokens used, with those held for calls of unknown usage, reach the
        ``exceeded`` threshold."""
        used, _, ok = self.tracker.standing()
        return self._exhausted(used, ok)

    def _exhausted(self, used: int, can_continue: bool) -> bool:
        """:attr:`exhausted` of the tracker's ``used`` and ``can_continue()``."""
        if not can_continue:
            return True
        holding = self.held_before + self.held
        if not holding:
            return False
        budget = self.tracker.budget
        return used + holding >= budget.exceeded_threshold * budget.total

    @property
    def holding(self) -> int:
        """Tokens held for calls of unknown usage, this run's and earlier runs'."""
        return self.held_before + self.held

    @property
    def free(self) -> int:
        """Tokens of the budget neither used nor reserved (may be negative
        while calls that spent more than they reserved are being recorded)."""
        return self.tracker.remaining - self.tracker.budget.reserved

    def prompt(self, body: Mapping[str, Any]) -> Prompt:
        """What to reserve for the prompt of a request (``body``, parsed), with
        the chat format's own tokens (:func:`~sigil.proxy.usage.prompt_overhead`).

        * Far from the end of the budget (:data:`AMPLE` times the prompt's UTF-8
          length is free): that length. It is a bound of the prompt's tokens
          under any byte-level BPE (a token covers at least one byte) and costs
          nothing, where counting costs ~0.1 us a character on the transport's
          one thread, which every call shares. Its excess is given back when
          the call settles.
        * Nearer the end, where the reservation decides what is admitted: its
          ``cl100k_base`` count (:func:`~sigil.proxy.usage.count_tokens`, exact
          up to ``EXACT_CHARS`` characters, the length past them) times the
          model's ratio, never above the length.

        The ratio: the count is exact only for OpenAI's tokenizers; another
        upstream bills more for the same text (one billing a token per 4 bytes
        bills ~10% more JSON than cl100k_base, and 10 calls at a time near the
        end, each reserved at the count, passed a budget of 20,000 by 150 to
        370 with a cap of 100). Each answered call whose prompt was counted compares what the
        upstream billed (its ``prompt_tokens``) with that count; the model's
        ratio is the most it was (never below 1.0), so the reservation is the
        count as the upstream was seen to bill, and at most the length, which
        bounds it anyway. Only prompts of :data:`LEARN_FROM` tokens or more are
        learnt from (a small one's ratio is the chat template's tokens). The
        first :data:`SAMPLES` prompts of a model far from the end are counted
        to learn it early (those of :data:`SAMPLE_BYTES` at most), so that
        calls reaching the end find it known.

        Before a model's first such answer, near the end its count is not known
        to be a bound (:attr:`Prompt.uncertain`): those calls are admitted one
        at a time (:meth:`try_admit`), each reserved at its length as far as
        what is free beyond its whole output cap allows (the length is ~4x the
        count: taken from the output, it would cut the call's answer short).
        So only a call that fits just barely, alone of its kind, can pass the
        budget, by what its prompt was underestimated; its answer calibrates
        the calls behind it, which then go on together. (An upstream that
        reports no usage never calibrates: its calls near the end stay one
        at a time.) What stays open: a
        prompt the upstream bills at more than the model's largest ratio seen
        so far (text unlike the prompts before it) is underestimated by that
        difference, and an upstream billing more than the prompt's length
        (not a byte-level BPE, or tokens of its own added) is bounded by nothing
        the proxy can read."""
        text = prompt_estimate_text(body)
        overhead = prompt_overhead(body)
        size = utf8_size(text)
        bound = size + overhead
        model = body.get("model")
        key = model if isinstance(model, str) else "unknown"
        ratio = self.ratios.get(key)
        if bound * AMPLE <= self.free:
            if ratio is not None:
                return Prompt(bound, 0, False, bound, key)
            sampled = self._sampled.get(key, 0)
            if sampled >= SAMPLES or size > SAMPLE_BYTES or len(self._sampled) >= MAX_MODELS:
                return Prompt(bound, 0, False, bound, key)
            self._sampled[key] = sampled + 1
            return Prompt(bound, count_tokens(text, size) + overhead, False, bound, key)
        counted = count_tokens(text, size) + overhead
        if ratio is None:
            return Prompt(counted, counted, True, bound, key)
        return Prompt(_scaled(counted, ratio, bound), counted, False, bound, key)

    def _learn(self, call: Call, usage: Usage) -> None:
        """Raise the call's model's ratio to what the upstream billed its
        counted prompt (:meth:`prompt`)."""
        counted = call.counted
        if counted < LEARN_FROM or usage.estimated:
            return
        billed = usage.input_tokens
        ratios = self.ratios
        known = ratios.get(call.model)
        if known is None:
            if len(ratios) >= MAX_MODELS:
                return
            ratios[call.model] = (billed, counted) if billed > counted else (1, 1)
            self._sampled.pop(call.model, None)
        elif billed * known[1] > known[0] * counted:
            ratios[call.model] = (billed, counted)

    def _refusal(self) -> BudgetExhausted:
        return BudgetExhausted(self.tracker.used + self.holding, self.tracker.total)

    def try_admit(self, wanted: int | None, prompt: int | Prompt = 0, least: int = 1) -> int | None:
        """Reserve ``prompt`` tokens (the prompt's estimate: :meth:`prompt`) and an output cap
        of ``wanted`` tokens at most (None: a call without output); returns the
        output cap granted (0 for a call without output), or None when the
        call must wait for one in flight to settle (ask again once one has).

        The prompt is reserved whole, with at least ``least`` tokens of output
        (one per completion the call generates); the cap is lowered to what is
        free. Raises :class:`PromptTooLarge` when the prompt cannot fit even
        once the calls in flight settle, and :class:`BudgetExhausted` once the
        budget has run out; :class:`RecordingFailed` while the log cannot be
        written.

        A :class:`Prompt` reserved at a count not calibrated yet
        (:attr:`Prompt.uncertain`) is calibrated here if its model's ratio was
        learnt while it waited; otherwise it waits while another such call is
        in flight, and its reservation takes, up to the prompt's length (a
        bound), what is free beyond its whole output cap: only a call that
        fits just barely is reserved at the count alone."""
        estimate: Prompt | None = None
        if isinstance(prompt, Prompt):
            estimate = prompt
            if estimate.uncertain:
                ratio = self.ratios.get(estimate.model)
                if ratio is not None:  # calibrated while it waited
                    estimate.reserve = _scaled(estimate.counted, ratio, estimate.bound)
                    estimate.uncertain = False
                else:
                    estimate.reserve = estimate.counted
            prompt = estimate.reserve
        failure = self.unrecorded()
        if failure is not None:
            self.unrecorded_refused += 1
            raise RecordingFailed(failure)
        if least < 1:
            least = 1
        if wanted is None:
            out, need = 0, prompt
        else:
            out, need = (wanted if wanted > least else least), prompt + least
        tracker = self.tracker
        # One read of the tracker (the meter is its only writer while it runs).
        used, reserved, ok = tracker.standing()
        if self._exhausted(used, ok):
            raise self._refusal()
        total = tracker.budget.total
        remaining = total - used if used < total else 0
        left = remaining - self.held_before - self.held
        free = remaining - reserved
        if need > left or (self._inflight == 0 and (need > free or free <= 0)):
            self.starved = True
            raise PromptTooLarge(prompt, max(0, left), used, total, need - prompt)
        if need <= free and free > 0:
            uncertain = estimate is not None and estimate.uncertain
            if uncertain:
                assert estimate is not None
                if self._uncertain:
                    return None  # one at a time: the one in flight calibrates this one
                spare = min(free - prompt - out, estimate.bound - prompt)
                if spare > 0:
                    prompt += spare
                    estimate.reserve = prompt
            granted = tracker.reserve(prompt + out) if prompt + out else 0
            if granted:
                self._inflight += 1
                if uncertain:
                    self._uncertain += 1
            self.starved = False  # a refusal followed by calls that fit is that call's
            return max(0, granted - prompt)
        return None

    def _release(self, call: Call, *, hold: bool = False) -> None:
        """Give the call's reservation back (``hold``: keep it, the usage is
        unknown), once; waiting callers of :meth:`try_admit` ask again (the
        transport wakes them)."""
        if call.settled:
            return
        call.settled = True
        reserved = call.prompt + call.granted
        if reserved:
            self._inflight -= 1
            if call.uncertain:
                self._uncertain -= 1
            if hold:
                self.held += reserved
            else:
                self.tracker.release(reserved)
        if hold and self.exhausted:
            self.announce_held("tokens held for calls of unknown usage")
        # The call is answered once its record is written (issue 14 review, finding 2).
        self.written()

    def announce_held(self, reason: str) -> None:
        """Log ``budget_exceeded`` once when the held tokens run the budget out
        (counted tokens that do are the tracker's to announce)."""
        event = self._held_notice(reason)
        if event is not None:
            self.logger.log_event_sync(*event)

    def _held_notice(self, reason: str) -> tuple[str, str, str, int, dict[str, Any]] | None:
        tracker = self.tracker
        if self._held_announced or not tracker.can_continue():
            return None
        self._held_announced = True
        notice = tracker.exhausted_notice()
        used, total = tracker.used, tracker.total
        meta = notice.metadata() | {"tokens_held": self.holding, "reason": reason}
        meta["budget_remaining"] = max(0, total - used - self.holding)
        message = (
            f"Token budget exhausted: {used:,} tokens used and {self.holding:,} held for "
            f"calls of unknown usage, of {total:,}; no further step will start"
        )
        return notice.event_type, tracker.budget_component, message, 0, meta

    def start(
        self,
        *,
        component: str,
        endpoint: str,
        model: str,
        stream: bool,
        granted: int,
        requested: int | None,
        prompt: int | Prompt = 0,
        secrets: tuple[str, ...] = (),
    ) -> Call:
        """Log the call's ``step_start`` (it has been admitted with ``prompt`` and
        ``granted`` reserved: the :class:`Prompt` :meth:`try_admit` was given);
        ``secrets`` are the keys it carries, never logged."""
        call, event = self._started(
            component, endpoint, model, stream, granted, requested, prompt, secrets
        )
        self.logger.log_event_sync(*event)
        return call

    def _started(
        self,
        component: str,
        endpoint: str,
        model: str,
        stream: bool,
        granted: int,
        requested: int | None,
        prompt: int | Prompt,
        secrets: tuple[str, ...] = (),
    ) -> tuple[Call, tuple[str, str, str, int, dict[str, Any]]]:
        if isinstance(prompt, Prompt):
            call = Call(
                next(self._ids), component, endpoint, model, stream, granted, requested,
                time.perf_counter(), prompt.reserve, secrets=secrets, counted=prompt.counted,
                uncertain=prompt.uncertain,
            )  # fmt: skip
            prompt = prompt.reserve
        else:
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
        return call, ("step_start", component, f"{endpoint} {model} started", 0, meta)

    def complete(
        self,
        call: Call,
        usage: Usage | None,
        *,
        model: str | None = None,
        status: int = 200,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Record a call that returned: its tokens, or unknown usage (its
        reservation then stays held against the budget). A call is recorded
        once: a call already settled is left as it was recorded."""
        if call.settled:
            return
        try:
            meta = self._meta(call, usage, model, status)
            if extra:
                meta.update(extra)
            if usage is not None:
                self._price(meta, usage)
                if call.counted:
                    self._learn(call, usage)
            tokens, message = self._completed(call, usage, meta)
            self.tracker.track_sync(
                call.component, tokens, event_type="step_complete", message=message, metadata=meta
            )
        finally:
            self._release(call, hold=usage is None)

    def _completed(self, call: Call, usage: Usage | None, meta: dict[str, Any]) -> tuple[int, str]:
        """The tokens and message of a call's ``step_complete``."""
        if usage is None:
            self.unknown += 1
            meta["tokens_held"] = call.reserved
            return 0, (
                f"{call.endpoint} {meta['model']}: usage unknown (the upstream reported "
                f"none); {call.reserved:,} tokens of the budget held for it"
            )
        return usage.total, (
            f"{call.endpoint} {meta['model']}: {usage.input_tokens:,} in + "
            f"{usage.output_tokens:,} out tokens" + (" (estimated)" if usage.estimated else "")
        )

    def fail(
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
        ``usage: "none"``. A call is recorded once: one already settled (say,
        failed by a policy error, then ended by its stream) is left as it was."""
        if call.settled:
            return
        self.failed += 1
        error, unknown = self._failure(call, error, category, status, usage)
        try:
            meta = self._fail_meta(call, usage, model, status, unknown)
            if usage is not None and call.counted:
                self._learn(call, usage)
            if usage is not None and usage.total:
                self._price(meta, usage)
                self.tracker.track_sync(
                    call.component, usage.total, event_type="token_consumption",
                    message=self._spent_message(call, usage, meta),
                    metadata=meta | {"outcome": "failed_call"},
                )  # fmt: skip
            self.logger.log_event_sync(*self._error_event(call, meta, error, category))
        finally:
            self._release(call, hold=unknown)

    @staticmethod
    def _failure(
        call: Call, error: str, category: str, status: int | None, usage: Usage | None
    ) -> tuple[str, bool]:
        """The error to log of a failed call (its keys cut out) and whether its
        usage is unknown (its reservation then stays held)."""
        if call.secrets:
            error = redact(error, call.secrets)
        return error, usage_unknown(category, status, usage is not None)

    def _fail_meta(
        self,
        call: Call,
        usage: Usage | None,
        model: str | None,
        status: int | None,
        unknown: bool,
    ) -> dict[str, Any]:
        meta = self._meta(call, usage, model, status)
        if usage is None and not unknown:
            meta["usage"] = "none"
        elif unknown:
            self.unknown += 1
            meta["tokens_held"] = call.reserved
        return meta

    @staticmethod
    def _spent_message(call: Call, usage: Usage, meta: dict[str, Any]) -> str:
        return f"{call.endpoint} {meta['model']} failed; it used {usage.total:,} tokens" + (
            " (estimated from what arrived)" if usage.estimated else ""
        )

    @staticmethod
    def _error_event(
        call: Call, meta: dict[str, Any], error: str, category: str
    ) -> tuple[str, str, str, int, dict[str, Any]]:
        meta = {
            k: v
            for k, v in meta.items()
            if k not in ("input_tokens", "output_tokens", "cached_input_tokens", "cost_usd")
        }
        meta.update(error=error, category=category)
        return "step_error", call.component, f"{call.endpoint} failed: {error}", 0, meta

    def refuse(
        self, *, component: str, endpoint: str, model: str, stream: bool, error: str
    ) -> None:
        """Record a call refused because the budget has run out (never forwarded)."""
        call, event = self._started(component, endpoint, model, stream, 0, None, 0)
        self.logger.log_event_sync(*event)
        self.logger.log_event_sync(*self._refused(call, error))

    def _refused(self, call: Call, error: str) -> tuple[str, str, str, int, dict[str, Any]]:
        self.refused += 1
        self.failed += 1
        call.settled = True
        return (
            "step_error",
            call.component,
            f"{call.endpoint} refused: {error}",
            0,
            {
                "run": self.run,
                "call": call.call_id,
                "endpoint": call.endpoint,
                "model": call.model,
                "status": 429,
                "error": error,
                "category": "budget",
                "latency_ms": call.elapsed_ms(),
            },
        )

    def _price(self, meta: dict[str, Any], usage: Usage | None) -> None:
        """Add the call's ``cost_usd`` to ``meta`` when its model is priced (it
        may wait once for the price table's import)."""
        if usage is None:
            return
        model = meta.get("model")
        pricer = self.pricer
        cost = pricer.price(
            model if isinstance(model, str) else None,
            usage.input_tokens,
            usage.output_tokens,
            usage.cached_input_tokens,
        )
        if cost is not None:
            meta.update(pricer.cost_meta(cost))

    def _meta(
        self, call: Call, usage: Usage | None, model: str | None, status: int | None
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "run": self.run,
            "call": call.call_id,
            "endpoint": call.endpoint,
            "model": model or call.model,
            "stream": call.stream,
            "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
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


def _scaled(counted: int, ratio: tuple[int, int], bound: int) -> int:
    """``counted`` times ``ratio`` (``(billed, counted)``), rounded up, at most ``bound``."""
    scaled = -(-counted * ratio[0] // ratio[1])
    return scaled if scaled < bound else bound


def _recorded() -> OSError | None:
    """A log that never fails (a meter without a session: tests)."""
    return None


def _written() -> None:
    """Nothing to wait for (a meter without a session: tests)."""
