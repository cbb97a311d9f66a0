"""The proxy's per-call policy path, made cheaper, decides as it did.

Each shortcut of the hot path (sigil.proxy.policy, sigil.proxy.usage,
sigil.proxy.metering, sigil.telemetry.tokens) is checked against the plain
computation it replaces: the call's keys remembered per header set, the
tracker's one-step reads.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sigil.proxy.policy import secrets_of
from sigil.telemetry.tokens import BudgetWarningLevel, TokenTracker

_text = st.text(max_size=20)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["authorization", "Authorization", "api-key", "x-api-key", "accept"]),
            st.sampled_from(["Bearer sk-one-123", "sk-two-4567", "basic abcd", "tok", ""]),
        ),
        max_size=4,
    ),
    st.lists(st.one_of(st.none(), st.sampled_from(["proxy-key-1", "tokn"])), max_size=2),
)
def test_the_keys_of_a_call_are_the_same_asked_twice(
    pairs: list[tuple[str, str]], extra: list[str | None]
) -> None:
    # The first answer for a header set is remembered; a mapping is never.
    first = secrets_of(pairs, *extra)
    assert secrets_of(list(pairs), *extra) == first
    assert secrets_of(tuple(pairs), *extra) == first
    assert secrets_of(iter(pairs), *extra) == first
    # Headers with the extras moved are a different call.
    assert secrets_of([], *extra) == secrets_of(iter([]), *extra)


def test_the_keys_of_a_call_without_headers_but_with_the_proxys_key() -> None:
    assert secrets_of([("authorization", "Bearer sk-a-1")], None) == ("Bearer sk-a-1", "sk-a-1")
    assert secrets_of([], "Bearer sk-a-1") == ("Bearer sk-a-1",)


def test_standing_reads_used_reserved_and_whether_a_step_may_start() -> None:
    tracker = TokenTracker(total_budget=100, allocations={})
    assert tracker.standing() == (0, 0, True)
    assert tracker.reserve(30) == 30
    tracker.track_sync("m", 94, event_type="step_complete")
    assert tracker.standing() == (94, 30, True)
    tracker.track_sync("m", 1, event_type="step_complete")
    assert tracker.standing() == (95, 30, False)
    assert tracker.budget.warning_level is BudgetWarningLevel.EXCEEDED


@given(st.lists(st.integers(0, 60), max_size=12), st.integers(0, 120))
def test_each_level_is_still_announced_once_in_order(spends: list[int], restored: int) -> None:
    """The shortcut that skips the threshold check when the level reached is
    announced queues the same notices as checking on every consumption."""
    tracker = TokenTracker(total_budget=100, allocations={})
    tracker.restore(restored)
    seen: list[str] = []
    for tokens in spends:
        tracker.budget.consume("m", tokens)
        seen += [n.level.value for n in tracker.budget.drain_notices() if n.scope == "session"]
    order = ["elevated", "critical", "exceeded"]
    assert seen == sorted(set(seen), key=order.index)
    util = tracker.budget.used / 100
    reached = [lv for lv, th in zip(order, (0.5, 0.8, 0.95), strict=True) if util >= th]
    before = [lv for lv, th in zip(order, (0.5, 0.8, 0.95), strict=True) if restored / 100 >= th]
    assert seen == [lv for lv in reached if lv not in before]


_chunk = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["m", "gpt-x"]),
        "choices": st.lists(
            st.fixed_dictionaries(
                {"index": st.just(0), "delta": st.fixed_dictionaries({"content": _text})}
            ),
            max_size=2,
        ),
    }
)


@given(st.lists(_chunk, max_size=5), st.sampled_from(["\n", "\r\n", "\r"]), st.booleans())
def test_a_stream_reads_alike_whatever_its_line_ends(
    chunks: list[dict[str, Any]], end: str, spaced: bool
) -> None:
    """An event of one ``data:`` line (read without splitting it into lines)
    reads as the same event with its line ends and field spacing varied, or
    split over two ``data:`` lines of a multi-line event."""
    import orjson

    from sigil.proxy.usage import CHAT, StreamFollower

    usage = {"prompt_tokens": 3, "completion_tokens": 4}
    payloads = [orjson.dumps(c) for c in chunks] + [orjson.dumps({"choices": [], "usage": usage})]
    sep = b"data: " if spaced else b"data:"

    def read(stream: bytes) -> tuple[Any, ...]:
        f = StreamFollower(CHAT)
        out = f.feed(stream) + f.flush()
        return f.usage, f.model, f.text, f.done, f.events, out.count(b"data:")

    one_line = b"".join(sep + p + (end * 2).encode() for p in payloads) + b"data: [DONE]\n\n"
    # a JSON object split after its first byte over two data lines is the same object
    two_lines = (
        b"".join(b"data: " + p[:1] + b"\ndata: " + p[1:] + b"\n\n" for p in payloads)
        + b"data: [DONE]\n\n"
    )
    a, b = read(one_line), read(two_lines)
    assert a[:5] == b[:5]
    assert a[0] is not None and a[0].total == 7 and a[3]


@given(
    st.text(alphabet=st.sampled_from('ab cd,é{}"\n語'), max_size=800),
    st.integers(0, 12_000),
    st.one_of(st.none(), st.tuples(st.integers(1, 5_000), st.integers(1, 5_000))),
)
@settings(deadline=None)  # the first example builds the tokenizer
def test_a_prompt_is_reserved_as_the_plain_rule_says(
    text: str, total: int, ratio: tuple[int, int] | None
) -> None:
    """Meter.prompt, against the rule it implements computed plainly (exact
    fractions, the tokenizer's count): the length while AMPLE times it is
    free; else the count times the model's ratio (at least 1), rounded up, at
    most the length; a count with no ratio is uncertain."""
    import math
    from fractions import Fraction

    from sigil.pipeline.tokenizer import get_tokenizer
    from sigil.proxy.metering import AMPLE, Meter
    from sigil.proxy.usage import prompt_estimate_text, prompt_overhead

    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    tracker = TokenTracker(total_budget=max(total, 1), allocations={})
    meter = Meter(tracker, tracker.logger, run=1)
    meter._sampled["m"] = 10**6  # far from the end, no sampling: the plain rule
    if ratio is not None:
        meter.ratios["m"] = ratio if ratio[0] > ratio[1] else (1, 1)
    estimate = prompt_estimate_text(body)
    length = len(estimate.encode()) + prompt_overhead(body)
    count = get_tokenizer().count(estimate) + prompt_overhead(body)
    got = meter.prompt(body)
    assert (got.bound, got.model) == (length, "m")
    if length * AMPLE <= meter.free:
        assert (got.reserve, got.counted, got.uncertain) == (length, 0, False)
    elif ratio is None:
        assert (got.reserve, got.counted, got.uncertain) == (count, count, True)
    else:
        scaled = math.ceil(count * max(Fraction(*ratio), Fraction(1)))
        assert (got.reserve, got.counted, got.uncertain) == (min(length, scaled), count, False)
