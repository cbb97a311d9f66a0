"""Issue 12 (Cost): the native session model sums each event's ``cost_usd`` exactly.

Writers store a call's cost as a JSON number of dollars, to the nano-dollar
(sigil.telemetry.pricing); the fold reads each number's text into whole
nano-dollars and adds integers, so the total is the decimal sum of what the
events say, whatever the order split and multi-threaded folds merge in. The
reference is plain ``Decimal`` arithmetic over the same texts
(tests/session_reference.py).
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_reference import fold_reference
from sigil._native import Fold

COMPONENTS = ["routing", "reasoning", "validation"]
MODELS = ["gpt-4o-mini", "house-model", "echo-1"]


def event_line(
    seq: int, component: str, tokens: int, model: str | None, cost_text: str | None
) -> bytes:
    """A step_complete in the writer's layout, its cost written as ``cost_text``."""
    meta = [f'"latency_ms":{seq % 7 + 1}.5', f'"input_tokens":{tokens}', '"output_tokens":0']
    if model is not None:
        meta.append(f'"model":"{model}"')
    if cost_text is not None:
        meta.append(f'"cost_usd":{cost_text}')
    return (
        f'{{"timestamp":"2026-01-11T10:00:{seq % 60:02d}.000001+00:00","session_id":"s",'
        f'"event_type":"step_complete","component":"{component}","message":"m",'
        f'"tokens":{tokens},"metadata":{{{",".join(meta)}}},"seq":{seq}}}\n'
    ).encode()


def texts_of(cost: Decimal) -> st.SearchStrategy[str]:
    """Ways a writer may spell the same number of dollars (at most 9 decimals)."""
    plain = format(cost, "f")
    exponent = format(cost, "e")
    return st.sampled_from([plain, exponent, exponent.upper(), repr(float(plain))])


_cost = st.decimals(0, 10**6, places=9)
_event = st.tuples(
    st.sampled_from(COMPONENTS),
    st.integers(0, 5000),
    st.sampled_from([*MODELS, None]),
    st.one_of(st.none(), _cost.flatmap(lambda c: texts_of(c).map(lambda t: (c, t)))),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(_event, max_size=60), cuts=st.lists(st.integers(0, 60), max_size=3))
def test_the_native_cost_sum_is_the_decimal_sum(
    events: list[tuple[str, int, str | None, tuple[Decimal, str] | None]], cuts: list[int]
) -> None:
    lines = [
        event_line(i, comp, tokens, model, None if cost is None else cost[1])
        for i, (comp, tokens, model, cost) in enumerate(events)
    ]
    # Each float text is the decimal it was made from only to 17 digits: the
    # reference reads the text itself.
    spelled = [None if cost is None else Decimal(cost[1]) for (_, _, _, cost) in events]
    fold = Fold(last_n=0)
    offset, start = 0, 0
    for end in sorted({min(c, len(lines)) for c in cuts} | {len(lines)}):
        chunk = b"".join(lines[start:end])
        fold.feed_bytes(chunk, offset)
        offset, start = offset + len(chunk), end
    snap = fold.snapshot()
    priced = [c for c in spelled if c is not None]
    nano = [int(c.scaleb(9)) for c in priced]  # at most 9 decimals: whole nano-dollars
    assert snap.cost_nanousd == sum(nano)
    assert snap.priced_events == len(priced)
    for name in COMPONENTS:
        mine = [
            int(c.scaleb(9))
            for (comp, _, _, _), c in zip(events, spelled, strict=True)
            if comp == name and c is not None
        ]
        if name in snap.components:
            assert snap.components[name].cost_nanousd == sum(mine)
    unpriced = sum(t for (_, t, m, c) in events if c is None and m is not None)
    assert snap.unpriced_tokens == unpriced
    # Fold.cost (the span mapping's, no snapshot built) is the snapshot's cost.
    assert fold.cost() == (snap.cost_nanousd, snap.priced_events, snap.unpriced_tokens)
    expected = fold_reference(b"".join(lines))
    got = snap.to_dict()
    for key in ("cost_nanousd", "priced_events", "unpriced_tokens", "unpriced_models"):
        assert got[key] == expected[key], key
        assert got["run"][key] == expected["run"][key], key
    assert got["components"] == expected["components"]


def test_a_multi_threaded_fold_of_a_large_log_sums_the_same(tmp_path: Path) -> None:
    """Large enough to fold on several threads, which merge their parts' costs."""
    block = b"".join(
        event_line(i, COMPONENTS[i % 3], 7, MODELS[i % 3], f"0.{i % 1000:09d}" if i % 3 else None)
        for i in range(3000)
    )
    data = block * (9 * 2**20 // len(block) + 1)
    path = tmp_path / "priced.jsonl"
    path.write_bytes(data)
    fold = Fold(last_n=0)
    fold.feed_file(path)
    snap = fold.snapshot()
    rounds = data.count(b"\n") // 3000
    per_block = sum(i % 1000 for i in range(3000) if i % 3)
    assert snap.cost_nanousd == per_block * rounds
    assert snap.priced_events == 2000 * rounds
    assert snap.unpriced_tokens == 1000 * 7 * rounds
    assert fold.cost() == (snap.cost_nanousd, snap.priced_events, snap.unpriced_tokens)
    assert snap.unpriced_models == ["gpt-4o-mini"]
    assert snap.components["routing"].unpriced_models == ["gpt-4o-mini"]
    expected = fold_reference(data)
    assert snap.to_dict()["components"] == expected["components"]


def test_unusual_numbers_and_types_follow_the_rules() -> None:
    """Truncated to the nano-dollar, saturating, negative or non-numbers ignored
    (with a model and tokens, such an event is unpriced)."""
    texts = {
        "0.0000000019": 1,
        "1e-10": 0,
        "2.5E+1": 25_000_000_000,
        "-0": 0,
        "18446744073.709551616": 2**64 - 1,
    }
    for text, nano in texts.items():
        fold = Fold(last_n=0)
        fold.feed_bytes(event_line(1, "r", 5, "m", text))
        snap = fold.snapshot()
        assert (snap.cost_nanousd, snap.priced_events, snap.unpriced_tokens) == (nano, 1, 0)
    for text in ("-1", '"0.5"', "true", "null", "{}"):
        fold = Fold(last_n=0)
        fold.feed_bytes(event_line(1, "r", 5, "m", text))
        snap = fold.snapshot()
        assert (snap.cost_nanousd, snap.priced_events, snap.unpriced_tokens) == (0, 0, 5), text
        assert snap.unpriced_models == ["m"]
    # A repeated key (the general parser's path): the last one counts, read exactly.
    line = event_line(1, "r", 5, "m", "0.1").replace(
        b'"cost_usd":0.1', b'"cost_usd":0.1,"cost_usd":0.30000000000000004'
    )
    fold = Fold(last_n=0)
    fold.feed_bytes(line)
    assert fold.snapshot().cost_nanousd == 300_000_000
