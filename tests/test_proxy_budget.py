"""The proxy's budget policy and stream reading, without a network.

The grants of :meth:`TokenTracker.reserve` are checked against a plain model
(what is left minus what is promised), and :class:`Meter` driven as the native
transport drives it (rust/proxy.rs, through ProxyServer.admit): a call the
meter tells to wait asks again each time a call settles, calls interleaved in
any order.
"""

from __future__ import annotations

import math
import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigil.proxy.metering import (
    AMPLE,
    LEARN_FROM,
    SAMPLES,
    BudgetExhausted,
    Call,
    Meter,
    Prompt,
    PromptTooLarge,
)
from sigil.proxy.usage import CHAT, EMBEDDINGS, RESPONSES, StreamFollower, Usage, usage_of
from sigil.telemetry.tokens import TokenTracker


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, dict[str, Any]]] = []

    def log_event_sync(
        self, event_type: str, component: str, message: str, tokens: int = 0, metadata: Any = None
    ) -> int:
        self.events.append((event_type, component, tokens, dict(metadata or {})))
        return len(self.events)

    async def log_event(self, *args: Any, **kw: Any) -> int:  # pragma: no cover - unused
        raise AssertionError("the proxy logs from its native transport, synchronously")


class Pending:
    """One call being admitted: what :meth:`Meter.try_admit` answered last."""

    def __init__(self, meter: Meter, wanted: int | None, prompt: int | Prompt, least: int) -> None:
        self.meter, self.wanted, self.prompt, self.least = meter, wanted, prompt, least
        self.granted: int | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.granted is not None or self.error is not None

    def ask(self) -> None:
        try:
            self.granted = self.meter.try_admit(self.wanted, self.prompt, self.least)
        except BudgetExhausted as exc:
            self.error = exc

    def result(self) -> int:
        if self.error is not None:
            raise self.error
        assert self.granted is not None, "the call is still waiting"
        return self.granted


class Transport:
    """The native transport's admission loop (rust/proxy.rs ``metered``): a call
    the meter tells to wait (None) asks again whenever a call settles; a settle
    wakes every waiting call (``rnd``: in which order they ask)."""

    def __init__(self, meter: Meter, rnd: random.Random | None = None) -> None:
        self.meter = meter
        self.rnd = rnd
        self.waiting: list[Pending] = []

    def admit(self, wanted: int | None, prompt: int | Prompt = 0, least: int = 1) -> Pending:
        pending = Pending(self.meter, wanted, prompt, least)
        pending.ask()
        if not pending.done:
            self.waiting.append(pending)
        return pending

    def settled(self) -> list[Pending]:
        """Wake the waiting calls; returns those decided now."""
        woken, self.waiting = self.waiting, []
        if self.rnd is not None:
            self.rnd.shuffle(woken)
        for pending in woken:
            pending.ask()
            if not pending.done:
                self.waiting.append(pending)
        return [p for p in woken if p.done]

    def start(self, pending: Pending) -> Call:
        prompt = pending.prompt
        model = prompt.model if isinstance(prompt, Prompt) else "m"
        return self.meter.start(
            component="m", endpoint="/v1/chat/completions", model=model, stream=False,
            granted=pending.result(), requested=pending.wanted, prompt=prompt,
        )  # fmt: skip

    def complete(self, call: Call, usage: Usage | None) -> list[Pending]:
        self.meter.complete(call, usage)
        return self.settled()


@given(
    total=st.integers(1, 10_000),
    ops=st.lists(
        st.tuples(st.booleans(), st.integers(1, 5_000), st.integers(0, 5_000)), max_size=40
    ),
)
def test_grants_never_add_up_to_more_than_what_is_left(
    total: int, ops: list[tuple[bool, int, int]]
) -> None:
    tracker = TokenTracker(total_budget=total, allocations={})
    grants: list[int] = []
    for reserve, wanted, spent in ops:
        if reserve or not grants:
            granted = tracker.reserve(wanted)
            # the reference: what is left, minus what is promised, never below 0
            left = max(0, total - tracker.used) - sum(grants)
            assert granted == (min(wanted, max(0, left)) if tracker.can_continue() else 0)
            if granted:
                grants.append(granted)
        else:
            granted = grants.pop(0)
            tracker.track_sync("m", min(spent, granted), event_type="step_complete")
            tracker.release(granted)
        # calls that spend at most their grant can never take the session past its budget
        assert tracker.used + sum(grants) <= total
    assert tracker.budget.reserved == sum(grants)


def test_outputs_capped_at_their_grants_never_pass_the_budget() -> None:
    tracker = TokenTracker(total_budget=1000, allocations={})
    grants = [tracker.reserve(300) for _ in range(5)]
    assert grants == [300, 300, 300, 100, 0]
    for g in grants[:4]:
        tracker.track_sync("m", g, event_type="step_complete")  # each spends its whole cap
        tracker.release(g)
    assert tracker.used == 1000 and tracker.budget.reserved == 0
    assert tracker.reserve(1) == 0 and not tracker.can_continue()


def test_a_call_waits_while_everything_left_is_promised() -> None:
    tracker, log, meter = _meter(1000)
    transport = Transport(meter)
    first = transport.admit(800)
    assert first.result() == 800
    call = transport.start(first)
    second = transport.admit(500)
    assert second.result() == 200
    waiting = transport.admit(100)
    assert not waiting.done  # nothing left unpromised
    assert transport.settled() == [] and not waiting.done  # asking again changes nothing
    assert transport.complete(call, Usage(10, 90)) == [waiting]
    assert waiting.result() == 100
    assert tracker.budget.reserved == 300
    kinds = [e[0] for e in log.events]
    assert kinds == ["step_start", "step_complete"]
    assert log.events[1][2] == 100 and log.events[1][3]["input_tokens"] == 10


def test_waiting_calls_are_refused_once_the_budget_runs_out() -> None:
    _, log, meter = _meter(100)
    transport = Transport(meter)
    first = transport.admit(1000)
    assert first.result() == 100
    call = meter.start(
        component="m", endpoint="/v1/chat/completions", model="m", stream=False,
        granted=first.result(), requested=None,
    )  # fmt: skip
    waiting = transport.admit(10)
    assert not waiting.done
    assert transport.complete(call, Usage(20, 80)) == [waiting]
    with pytest.raises(BudgetExhausted, match="100 of 100"):
        waiting.result()
    with pytest.raises(BudgetExhausted):
        transport.admit(None).result()  # embeddings too
    assert "budget_exceeded" in [e[0] for e in log.events]


def test_unknown_usage_is_logged_as_unknown() -> None:
    _, log, meter = _meter(100)
    call = meter.start(
        component="m", endpoint="/v1/embeddings", model="m", stream=False, granted=0,
        requested=None,
    )  # fmt: skip
    meter.complete(call, None)
    kind, _, tokens, meta = log.events[-1]
    assert (kind, tokens, meta["usage"]) == ("step_complete", 0, "unknown")
    assert "input_tokens" not in meta


def test_usage_of_each_endpoint() -> None:
    assert usage_of(CHAT, {"prompt_tokens": 3, "completion_tokens": 4}) == Usage(3, 4)
    assert usage_of(CHAT, {"prompt_tokens": 3, "total_tokens": 10}) == Usage(3, 7)
    assert usage_of(RESPONSES, {"input_tokens": 1, "output_tokens": 2}) == Usage(1, 2)
    assert usage_of(EMBEDDINGS, {"prompt_tokens": 9, "total_tokens": 9}) == Usage(9, 0)
    for bad in (None, {}, {"prompt_tokens": -1, "completion_tokens": 1},
                {"prompt_tokens": 1.5, "completion_tokens": 1},
                {"prompt_tokens": True, "completion_tokens": 1},
                {"prompt_tokens": 2**53, "completion_tokens": 1}):  # fmt: skip
        assert usage_of(CHAT, bad) is None


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


STREAM = (
    _sse({"model": "m-1", "choices": [{"index": 0, "delta": {"content": "Hel"}}], "usage": None})
    + _sse({"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]})
    + _sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    + b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("step", [1, 3, 7, len(STREAM)])
@pytest.mark.parametrize("crlf", [False, True])
def test_the_stream_follower_reads_events_across_chunks(step: int, crlf: bool) -> None:
    data = STREAM.replace(b"\n", b"\r\n") if crlf else STREAM
    for drop in (False, True):
        follower = StreamFollower(CHAT, drop_usage_only=drop)
        out = b"".join(follower.feed(data[i : i + step]) for i in range(0, len(data), step))
        out += follower.flush()
        assert follower.usage == Usage(5, 2)
        assert (follower.text, follower.model, follower.done) == ("Hello", "m-1", True)
        assert follower.finish_reason == "stop"
        assert (b'"completion_tokens"' in out) is not drop
        assert out.count(b"data:") == (3 if drop else 4)


def test_the_stream_follower_reads_responses_events() -> None:
    follower = StreamFollower(RESPONSES)
    follower.feed(
        b"event: response.output_text.delta\n"
        + _sse({"type": "response.output_text.delta", "delta": "hi"})
        + b"event: response.completed\n"
        + _sse(
            {
                "type": "response.completed",
                "response": {"model": "r-1", "usage": {"input_tokens": 4, "output_tokens": 1}},
            }
        )
    )
    assert (follower.usage, follower.text, follower.model, follower.done) == (
        Usage(4, 1), "hi", "r-1", True,
    )  # fmt: skip


def _meter(total: int) -> tuple[TokenTracker, Recorder, Meter]:
    tracker = TokenTracker(total_budget=total, allocations={})
    log = Recorder()
    tracker.logger = log
    return tracker, log, Meter(tracker, log, run=1)


def _started(transport: Transport, wanted: int | None, prompt: int | Prompt) -> Call:
    """A call admitted at once and started."""
    return transport.start(transport.admit(wanted, prompt))


def test_a_prompt_is_reserved_with_the_cap_and_one_that_cannot_fit_is_refused() -> None:
    tracker, _, meter = _meter(1000)
    transport = Transport(meter)
    # The prompt is reserved whole; the cap gets what is left after it.
    assert transport.admit(5000, 600).result() == 400
    assert tracker.budget.reserved == 1000
    # A prompt larger than what is left is refused at once, not admitted once.
    with pytest.raises(PromptTooLarge, match="does not fit"):
        transport.admit(10, 1001).result()
    assert meter.starved and not meter.exhausted
    # One that fits once the call in flight settles waits for it.
    waiting = transport.admit(100, 300)
    assert not waiting.done and transport.waiting == [waiting]


def test_a_prompt_that_fits_only_what_calls_in_flight_hold_waits_then_is_refused() -> None:
    tracker, _, meter = _meter(1000)
    transport = Transport(meter)
    call = _started(transport, 500, 100)
    waiting = transport.admit(10, 700)
    assert not waiting.done
    # 500 used: 700 no longer fits
    assert transport.complete(call, Usage(100, 400)) == [waiting]
    with pytest.raises(PromptTooLarge):
        waiting.result()
    assert tracker.budget.reserved == 0 and tracker.used == 500


@given(
    total=st.integers(50, 5_000),
    calls=st.lists(
        st.tuples(st.integers(0, 2_000), st.integers(1, 2_000), st.integers(0, 2_000)),
        min_size=1,
        max_size=30,
    ),
    parallel=st.integers(1, 8),
    rnd=st.randoms(use_true_random=False),
)
def test_concurrent_calls_whose_prompts_were_estimated_exactly_never_pass_the_budget(
    total: int, calls: list[tuple[int, int, int]], parallel: int, rnd: random.Random
) -> None:
    """Each call spends its prompt (as estimated) and at most its cap: whatever
    the interleaving (up to ``parallel`` calls open at once, settling in any
    order, the waiting ones asking again in any order), the session never
    spends more than its budget, and no call waits forever."""
    tracker, _, meter = _meter(total)
    transport = Transport(meter, rnd)
    queue = list(calls)
    #: calls in flight, with the output each spends
    flying: list[tuple[Call, int]] = []
    outs: dict[Pending, int] = {}

    def decided(pending: Pending) -> None:
        out = outs.pop(pending)
        try:
            pending.result()
        except BudgetExhausted:
            return
        assert tracker.used + tracker.budget.reserved <= total
        flying.append((transport.start(pending), out))

    while queue or flying or transport.waiting:
        # a call waits only while another is in flight: one settles, it asks again
        assert flying or not transport.waiting
        if (
            queue
            and len(flying) + len(transport.waiting) < parallel
            and (not flying or rnd.random() < 0.5)
        ):
            prompt, wanted, out = queue.pop()
            pending = transport.admit(wanted, prompt)
            outs[pending] = out
            if pending.done:
                decided(pending)
            continue
        call, out = flying.pop(rnd.randrange(len(flying)))
        for pending in transport.complete(call, Usage(call.prompt, min(out, call.granted))):
            decided(pending)
        assert tracker.used <= total
    assert tracker.budget.reserved == 0 and tracker.used <= total


def test_unknown_usage_keeps_its_reservation_and_counts_toward_the_budget() -> None:
    tracker, log, meter = _meter(1000)
    transport = Transport(meter)
    call = _started(transport, 300, 100)
    transport.complete(call, None)
    kind, _, tokens, meta = log.events[-1]
    assert (kind, tokens, meta["usage"], meta["tokens_held"]) == (
        "step_complete", 0, "unknown", 400,
    )  # fmt: skip
    # Never logged as tokens, but held: the next call gets only what is free.
    assert (tracker.used, meter.unknown, meter.held) == (0, 1, 400)
    assert transport.admit(5000, 100).result() == 500
    # Held tokens bring the budget to its end like used ones.
    tracker2, _, meter2 = _meter(100)
    transport2 = Transport(meter2)
    call = _started(transport2, None, 96)
    transport2.complete(call, None)
    assert meter2.exhausted and tracker2.used == 0
    with pytest.raises(BudgetExhausted):
        transport2.admit(1, 0).result()


def test_usage_of_reads_the_cached_input_tokens() -> None:
    chat = {"prompt_tokens": 30, "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 20}}  # fmt: skip
    assert usage_of(CHAT, chat) == Usage(30, 4, cached_input_tokens=20)
    resp = {"input_tokens": 30, "output_tokens": 4, "input_tokens_details": {"cached_tokens": 8}}
    assert usage_of(RESPONSES, resp) == Usage(30, 4, cached_input_tokens=8)
    # More cached than input, or not a count: not believed.
    bad = {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 9},
    }
    assert usage_of(CHAT, bad) == Usage(3, 4)
    bad["prompt_tokens_details"] = {"cached_tokens": None}
    assert usage_of(CHAT, bad) == Usage(3, 4)


def test_a_prompt_is_reserved_at_its_length_while_the_budget_is_ample_else_counted() -> None:
    from sigil.pipeline.tokenizer import get_tokenizer
    from sigil.proxy import ProxyConfig, ProxyServer

    body = {"model": "m", "messages": [{"role": "user", "content": "hello world " * 100}]}
    text = "user\n" + "hello world " * 100
    overhead = 4 + 3  # one message, and the reply's priming

    def reserved(total: int) -> int:
        _, _, meter = _meter(total)
        server = ProxyServer(meter, ProxyConfig(upstream="http://127.0.0.1:9/v1"))
        return server._count_prompt(body).reserve

    # Far from the end of the budget: the UTF-8 length, an upper bound that costs nothing.
    assert reserved(1_000_000) == len(text) + overhead
    # Near it: the tokenizer's count, far below the length.
    counted = reserved(2_000)
    assert counted == get_tokenizer().count(text) + overhead < len(text) // 4


def test_a_call_is_recorded_once_however_often_it_is_settled() -> None:
    """A stream whose policy call raised is failed by the guard (usage unknown,
    its reservation held), then ended again by the transport's stream end with
    an estimate: the second record must log and count nothing (review of the
    native transport: it logged a second step_error and counted the estimate on
    top of the held reservation)."""
    tracker, log, meter = _meter(1000)
    transport = Transport(meter)
    call = _started(transport, 300, 100)
    meter.fail(call, "proxy error: feed raised", category="proxy")
    events, used, held, failed = len(log.events), tracker.used, meter.held, meter.failed
    assert held == 400
    meter.fail(call, "upstream stream broke", category="upstream_stream", usage=Usage(100, 20))
    meter.complete(call, Usage(100, 20))
    assert (len(log.events), tracker.used, meter.held, meter.failed) == (events, used, held, failed)
    assert [e[0] for e in log.events].count("step_error") == 1


# -- what a prompt is reserved at, as the upstream bills it ---------------------------


def _body(words: int, model: str = "m") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "word " * words}]}


def _count(body: dict[str, Any]) -> int:
    """The prompt's cl100k_base count with the chat format's tokens."""
    from sigil.pipeline.tokenizer import get_tokenizer
    from sigil.proxy.usage import prompt_estimate_text, prompt_overhead

    return get_tokenizer().count(prompt_estimate_text(body)) + prompt_overhead(body)


def _length(body: dict[str, Any]) -> int:
    from sigil.proxy.usage import prompt_estimate_text, prompt_overhead, utf8_size

    return utf8_size(prompt_estimate_text(body)) + prompt_overhead(body)


def test_near_the_end_a_count_is_reserved_as_the_upstream_was_seen_to_bill_it() -> None:
    """The hostile repro's upstream billed ~10% more than cl100k_base: every
    count reserved near the end was short of what it billed. Once a call was
    answered, the model's counts are reserved at the ratio it billed, never
    above the prompt's length; another model is not calibrated by it."""
    _, _, meter = _meter(2_000)
    transport = Transport(meter)
    body = _body(400)
    counted, length = _count(body), _length(body)
    assert counted >= LEARN_FROM and length * AMPLE > 2_000  # near the end: counted
    first = meter.prompt(body)
    assert (first.counted, first.uncertain) == (counted, True)
    call = _started(transport, 100, first)
    billed = math.ceil(counted * 1.1)
    transport.complete(call, Usage(billed, 100))
    assert meter.ratios == {"m": (billed, counted)}
    again = meter.prompt(body)
    assert not again.uncertain and again.reserve == billed
    # A ratio past the length: the length bounds the reservation.
    meter.ratios["m"] = (50, 1)
    assert meter.prompt(body).reserve == length
    # Billed less than counted: the count is still reserved (the ratio is never below 1).
    other = meter.prompt(_body(400, "other"))
    call = _started(transport, 10, other)
    transport.complete(call, Usage(counted // 2, 10))
    assert meter.ratios["other"] == (1, 1) and meter.prompt(_body(400, "other")).reserve == counted


def test_uncalibrated_counts_near_the_end_are_admitted_one_at_a_time() -> None:
    """Before a model's first answer its counts are not known to be a bound:
    one call at a time, reserved at its length as far as what is free beyond
    its cap allows; the calls behind it are calibrated by its answer, then
    go on together."""
    tracker, _, meter = _meter(2_500)
    transport = Transport(meter)
    body = _body(400)
    counted, length = _count(body), _length(body)
    prompts = [meter.prompt(body) for _ in range(3)]
    assert all(p.uncertain and p.reserve == counted for p in prompts)
    first = transport.admit(100, prompts[0])
    # Reserved at its length (what is free allows it) with its whole cap.
    assert first.result() == 100 and prompts[0].reserve == length
    call = transport.start(first)
    assert call.prompt == length and tracker.budget.reserved == length + 100
    behind = [transport.admit(100, p) for p in prompts[1:]]
    assert not any(p.done for p in behind)  # they fit, but wait for its answer
    billed = math.ceil(counted * 1.2)
    assert transport.complete(call, Usage(billed, 100)) == behind
    # Calibrated while they waited: reserved at what the upstream billed, together.
    assert all(p.result() == 100 for p in behind)
    assert [p.reserve for p in prompts[1:]] == [billed, billed]
    assert not any(p.uncertain for p in prompts[1:])
    assert tracker.budget.reserved == 2 * (billed + 100)


def test_an_uncalibrated_count_that_fits_just_barely_is_reserved_at_the_count() -> None:
    """What is free beyond the call's cap is less than its length: the
    reservation takes what there is, and no output is taken for it."""
    body = _body(400)
    counted = _count(body)
    _, _, meter = _meter(counted + 100 + 30)
    prompt = meter.prompt(body)
    assert prompt.uncertain
    assert meter.try_admit(100, prompt) == 100 and prompt.reserve == counted + 30
    # A count that fits with its least output is admitted, whatever its length;
    # one that does not is refused.
    _, _, meter = _meter(counted + 10)
    assert meter.try_admit(100, meter.prompt(body)) == 10
    _, _, meter = _meter(counted)
    with pytest.raises(PromptTooLarge):
        meter.try_admit(100, meter.prompt(body))


def test_far_from_the_end_the_first_prompts_are_counted_to_learn_the_ratio() -> None:
    """Far from the end a prompt is reserved at its length and not counted
    (counting costs the transport's thread); the first SAMPLES of a model are
    counted all the same, so that the calls reaching the end find it known."""
    _, _, meter = _meter(1_000_000)
    transport = Transport(meter)
    body = _body(400)
    counted, length = _count(body), _length(body)
    # A long prompt is not counted to learn from (each count costs the transport's thread).
    assert meter.prompt(_body(14_000)).counted == 0
    sampled = [meter.prompt(body) for _ in range(SAMPLES + 2)]
    assert [p.counted for p in sampled] == [counted] * SAMPLES + [0, 0]
    assert all(p.reserve == length and not p.uncertain for p in sampled)
    call = _started(transport, 100, sampled[0])
    transport.complete(call, Usage(math.ceil(counted * 1.15), 50))
    assert meter.ratios["m"] == (math.ceil(counted * 1.15), counted)
    # Calibrated: no more counting far from the end.
    assert meter.prompt(body).counted == 0
    # Small prompts teach nothing: the chat template's tokens would pass for a ratio.
    small = _body(3, "tiny")
    assert _count(small) < LEARN_FROM
    call = _started(transport, 100, meter.prompt(small))
    transport.complete(call, Usage(5 * _count(small), 50))
    assert "tiny" not in meter.ratios


@given(
    total=st.integers(500, 12_000),
    calls=st.lists(
        st.tuples(st.integers(0, 600), st.integers(1, 400), st.integers(0, 1)),
        min_size=1,
        max_size=25,
    ),
    ratios=st.tuples(st.floats(1.0, 1.6), st.floats(1.0, 1.6)),
    parallel=st.integers(1, 8),
    rnd=st.randoms(use_true_random=False),
)
@settings(deadline=None)
def test_calls_billed_above_their_count_pass_the_budget_by_one_underestimate_at_most(
    total: int,
    calls: list[tuple[int, int, int]],
    ratios: tuple[float, float],
    parallel: int,
    rnd: random.Random,
) -> None:
    """An upstream bills each model's prompts at a fixed multiple of their
    cl100k_base count (never above their length) and every call spends its
    whole cap. Whatever the interleaving, the session passes its budget by no
    more than one prompt's underestimate (an uncalibrated call that fit just
    barely, alone of its kind), where counts alone passed it by one per call
    in flight."""
    tracker, _, meter = _meter(total)
    transport = Transport(meter, rnd)
    queue = list(calls)
    flying: list[tuple[Call, int]] = []
    bills: dict[Pending, int] = {}
    worst = 0

    def decided(pending: Pending) -> None:
        billed = bills.pop(pending)
        try:
            pending.result()
        except BudgetExhausted:
            return
        flying.append((transport.start(pending), billed))

    while queue or flying or transport.waiting:
        assert flying or not transport.waiting
        if (
            queue
            and len(flying) + len(transport.waiting) < parallel
            and (not flying or rnd.random() < 0.5)
        ):
            words, wanted, which = queue.pop()
            body = _body(words, f"m{which}")
            billed = min(_length(body), math.ceil(_count(body) * ratios[which]))
            worst = max(worst, billed - _count(body))
            pending = transport.admit(wanted, meter.prompt(body))
            bills[pending] = billed
            if pending.done:
                decided(pending)
            continue
        call, billed = flying.pop(rnd.randrange(len(flying)))
        for pending in transport.complete(call, Usage(billed, call.granted)):
            decided(pending)
    assert tracker.budget.reserved == 0
    assert tracker.used <= total + worst
