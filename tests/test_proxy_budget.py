"""The proxy's budget policy and stream reading, without a network.

The grants of :meth:`TokenTracker.reserve` are checked against a plain model
(what is left minus what is promised), and :class:`Meter` driven as the native
transport drives it (rust/proxy.rs, through ProxyServer.admit): a call the
meter tells to wait asks again each time a call settles, calls interleaved in
any order.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sigil.proxy.metering import BudgetExhausted, Call, Meter, PromptTooLarge
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

    def __init__(self, meter: Meter, wanted: int | None, prompt: int, least: int) -> None:
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

    def admit(self, wanted: int | None, prompt: int = 0, least: int = 1) -> Pending:
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
        return self.meter.start(
            component="m", endpoint="/v1/chat/completions", model="m", stream=False,
            granted=pending.result(), requested=pending.wanted, prompt=pending.prompt,
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


def _started(transport: Transport, wanted: int | None, prompt: int) -> Call:
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
        return server._count_prompt(body)

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
