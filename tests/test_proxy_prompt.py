"""What a call's prompt is reserved at, and what counting it costs (issue 14,
hostile review findings 3 and 6), end to end against the real ``sigil proxy``
and the small upstream of tests/proxy_upstream.py, and on the estimate itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest

import test_proxy
from proxy_upstream import Upstream
from test_proxy import Proxy, steps

upstream = test_proxy.upstream
start_proxy = test_proxy.start_proxy

MSGS = [{"role": "user", "content": "fill it"}]

#: A JSON schema of 100 described fields: ~2,700 cl100k_base tokens.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        f"field_{i}": {"type": "string", "description": "a field the model must fill " * 3}
        for i in range(100)
    },
}
#: Text the model reads, well over 1,000 tokens.
LONG = "the model reads every word of this sentence " * 300


def _schema_tokens() -> int:
    from sigil.pipeline.tokenizer import get_tokenizer

    return get_tokenizer().count(orjson.dumps(SCHEMA).decode())


def _refused(call: Callable[[], object]) -> None:
    with pytest.raises(openai.RateLimitError, match="does not fit"):
        call()


def test_every_field_the_model_reads_is_reserved(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Finding 3: a ``response_format`` schema of ~2,700 tokens was reserved as
    nothing, so 40 concurrent calls at a call cap of 100 spent 4x a budget of
    20,000. Each of these prompts alone exceeds a budget of 1,000: refused,
    nothing forwarded, whichever field carries the text."""
    assert _schema_tokens() > 2_000
    proxy = start_proxy("--budget", "1000", "--upstream", upstream.url)
    client = proxy.client(max_retries=0)
    rf: Any = {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}}
    _refused(lambda: client.chat.completions.create(model="m", messages=MSGS, response_format=rf))
    tool: Any = {"type": "function", "function": {"name": "fill", "parameters": SCHEMA}}
    _refused(lambda: client.chat.completions.create(model="m", messages=MSGS, tools=[tool]))
    fmt: Any = {"format": {"type": "json_schema", "name": "out", "schema": SCHEMA}}
    _refused(lambda: client.responses.create(model="m", input="fill it", text=fmt))
    _refused(lambda: client.responses.create(model="m", input="hi", instructions=LONG))
    _refused(lambda: client.completions.create(model="m", prompt="def f(", suffix=LONG))
    # A field no API has yet: read by the model until known otherwise.
    new: Any = {"documents": [{"title": "notes", "body": LONG}]}
    _refused(lambda: client.chat.completions.create(model="m", messages=MSGS, extra_body=new))
    _refused(lambda: client.responses.create(model="m", input="hi", extra_body=new))
    assert upstream.requests == []
    proxy.stop()


def test_the_reservation_covers_a_response_format_schema(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Finding 3, far from the end of the budget: the prompt is reserved at its
    UTF-8 length, which must include the schema (it was ~20 tokens)."""
    proxy = start_proxy("--budget", "1000000", "--upstream", upstream.url)
    rf: Any = {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}}
    proxy.client(max_retries=0).chat.completions.create(
        model="m", messages=MSGS, response_format=rf
    )
    assert proxy.stop()[0] == 0
    start = steps(proxy.events(), "step_start")[0]["metadata"]
    assert start["prompt_tokens_reserved"] >= len(orjson.dumps(SCHEMA))


def test_the_estimate_reads_every_field_but_the_known_settings() -> None:
    """Finding 3, robust by construction: every string of every field counts,
    at any depth, but for a short list of fields known not to reach the model."""
    from sigil.proxy.usage import prompt_estimate_text

    deep: Any = "deep-in-a-message"
    for _ in range(40):
        deep = [deep]
    deeper: Any = {"k": "deepest-in-a-new-field"}
    for _ in range(300):  # past what orjson writes
        deeper = {"k": deeper}
    body = {
        "model": "MODEL-NAME", "user": "USER-ID", "metadata": {"run": "META-VALUE"},
        "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.5,
        "max_tokens": 10, "seed": 3, "stop": ["STOP-SEQ"], "service_tier": "TIER",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "question"},
                      {"type": "image_url", "image_url": {"url": "data:IMAGE-BYTES"}}]},
                     {"role": "user", "content": deep}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {
            "properties": {"answer_field": {"description": "schema-description"}}}}},
        "tool_choice": {"type": "function", "function": {"name": "tool-choice-name"}},
        "text": {"format": {"name": "text-format-name"}},
        "brand_new_field": {"nested": ["new-field-text"]},
        "brand_new_string": "new-string-text",
        "deeply_new": deeper,
    }  # fmt: skip
    text = prompt_estimate_text(body)
    for word in (
        "question", "deep-in-a-message", "answer_field", "schema-description",
        "tool-choice-name", "text-format-name", "new-field-text", "new-string-text",
        "deepest-in-a-new-field",
    ):  # fmt: skip
        assert word in text, word
    for word in ("MODEL-NAME", "USER-ID", "META-VALUE", "STOP-SEQ", "TIER", "IMAGE-BYTES"):
        assert word not in text, word


def test_counting_a_huge_text_is_bounded_and_never_below_the_count() -> None:
    """Finding 6: a 30 MB prompt was tokenized whole on the transport's thread
    (3.3 s during which no other call moved). Past EXACT_CHARS characters each
    UTF-8 byte counts as a token: an upper bound that costs a length."""
    from sigil.pipeline.tokenizer import get_tokenizer
    from sigil.proxy.usage import EXACT_CHARS, count_tokens

    tokenizer = get_tokenizer()
    small = "héllo wörld, " * 1000
    assert count_tokens(small) == tokenizer.count(small)
    huge = "lorem ipsum dolor sit amet, çà et là " * (4 * EXACT_CHARS // 37)
    counted = count_tokens(huge)
    head, tail = huge[:EXACT_CHARS], huge[EXACT_CHARS:]
    assert counted == tokenizer.count(head) + len(tail.encode())
    assert counted >= tokenizer.count(huge)


def test_a_long_stream_is_counted_as_it_comes_and_not_held() -> None:
    """Finding 6 (and 5's memory): the text of a stream was kept whole and
    tokenized whole once it broke (2 s for 20 MB, on the transport's thread).
    It is counted as it comes: at most ~64 Ki characters are held."""
    from sigil.pipeline.tokenizer import get_tokenizer
    from sigil.proxy.usage import CHAT, StreamFollower

    follower = StreamFollower(CHAT)
    piece = "some words of an answer that goes on, "
    event = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]})
    pieces = 40_000  # ~1.5 MB of text
    held = 0
    for _ in range(pieces // 100):
        follower.feed((event + b"\n\n") * 100)
        held = max(held, len(follower.text))
    assert held <= 64 * 1024 + len(piece) * 100
    exact = get_tokenizer().count(piece * pieces)
    # Counted in pieces: a token may end where a piece is cut (~25 pieces here).
    assert exact <= follower.output_tokens() <= exact + 100


def _waves(proxy: Proxy, calls: int, waves: int, **kw: Any) -> list[bool]:
    """``waves`` rounds of ``calls`` concurrent chat calls (each waits for the
    round before); whether each was answered (False: refused by the budget)."""
    import asyncio

    async def one(client: openai.AsyncOpenAI) -> bool:
        try:
            await client.chat.completions.create(model="m", messages=MSGS, **kw)
        except openai.RateLimitError:
            return False
        return True

    async def main() -> list[bool]:
        client = proxy.async_client(max_retries=0)
        answered: list[bool] = []
        for _ in range(waves):
            answered += await asyncio.gather(*(one(client) for _ in range(calls)))
        await client.close()
        return answered

    return asyncio.run(main())


@pytest.mark.parametrize("warm", [False, True], ids=["first-calls-near-the-end", "calibrated"])
def test_an_upstream_counting_more_than_cl100k_overshoots_by_one_cap_at_most(
    start_proxy: Callable[..., Proxy], warm: bool
) -> None:
    """The hostile repro (issue 14): an upstream that bills one token per 4 bytes
    of the request (~10% more than cl100k_base for this schema) and 10 calls at
    a time, each with a ~2,700-token schema and a cap of 100, against a budget
    of 20,000. Near the end the prompts were reserved at their cl100k_base
    count, which this upstream exceeds on every call: 20,150 were spent. The
    session may pass its budget by one call's cap at most, whether the calls
    near the end come first (``first-calls-near-the-end``) or after calls far
    from it that the upstream answered (``calibrated``)."""
    budget, cap = 20_000, 100
    rf: Any = {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}}
    with Upstream(bytes_per_token=4, pieces=cap) as up:
        if warm:
            budget += 200_000
        proxy = start_proxy("--budget", str(budget), "--call-cap", str(cap), "--upstream", up.url)
        answered = _waves(proxy, 10, 12 if warm else 4, response_format=rf)
        assert proxy.stop()[0] == 3
        billed = [r.input_tokens for r in up.reported]
        # The upstream does bill more than the count the proxy reserved near the end.
        assert min(billed) > _schema_tokens() * 1.05
        spent = up.totals()
    assert sum(answered) == len(billed) and not all(answered)
    assert spent <= budget + cap, f"{spent:,} spent of a budget of {budget:,}"
    # The budget was used, not refused early: calls stop once 95% is spent
    # (the tracker's ``exceeded``) or what is left holds no more prompt.
    assert spent > min(0.95 * budget, budget - 3_500)
