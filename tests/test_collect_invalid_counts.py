"""``sigil collect`` and token counts that are not counts.

A span whose input or output count is negative, fractional, or text that is
no number reported usage that cannot be trusted: the whole call's usage is
unknown (``metadata.usage: "unknown"``, 0 tokens added), as ``sigil proxy``
treats ``prompt_tokens: -5``, never the valid half alone. The native decoder
and the Python reference agree event for event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from test_collect import (
    TRACE,
    Collector,
    _json_request,
    _json_span,
    _pb_request,
    assert_native_matches_python,
    steps,
    wait_for,
)

pytestmark = [pytest.mark.timeout(60)]

PB = "application/x-protobuf"
JS = "application/json"


def _attrs(**counts: Any) -> dict[str, Any]:
    return {"gen_ai.operation.name": "chat", "gen_ai.conversation.id": "bad", **counts}


INVALID: list[dict[str, Any]] = [
    {"gen_ai.usage.input_tokens": -100, "gen_ai.usage.output_tokens": 50},
    {"gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": -1},
    {"gen_ai.usage.input_tokens": 2.5, "gen_ai.usage.output_tokens": 5},
    {"gen_ai.usage.input_tokens": "lots", "gen_ai.usage.output_tokens": 5},
    {"gen_ai.usage.prompt_tokens": "-7", "gen_ai.usage.completion_tokens": 5},
    {"llm.token_count.prompt": -3, "llm.token_count.completion": 9},
    {"llm.token_count.total": -12},
    # the first name present decides: an invalid one is not skipped for the next
    {"gen_ai.usage.input_tokens": -5, "gen_ai.usage.prompt_tokens": 10},
]

VALID: list[tuple[dict[str, Any], int]] = [
    ({"gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": 2}, 42),
    ({"gen_ai.usage.input_tokens": "12", "gen_ai.usage.output_tokens": 3.0}, 15),
    ({"gen_ai.usage.output_tokens": 7}, 7),
    ({"llm.token_count.total": 9}, 9),
]


def _spans() -> list[dict[str, Any]]:
    out = [{"span": f"{i + 1:016x}", "attrs": _attrs(**c)} for i, c in enumerate(INVALID)]
    out += [{"span": f"{i + 101:016x}", "attrs": _attrs(**c)} for i, (c, _) in enumerate(VALID)]
    # No operation, only an invalid count: not a GenAI span (as before), ignored.
    out.append(
        {
            "span": "00000000000000ff",
            "attrs": {"gen_ai.conversation.id": "bad", "gen_ai.usage.input_tokens": -1},
        }
    )
    return out


def test_native_and_python_agree_on_invalid_counts() -> None:
    body = _pb_request(_spans())
    assert assert_native_matches_python(PB, body) == len(INVALID) + len(VALID)


def test_an_invalid_count_makes_the_calls_usage_unknown(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    collector = Collector(home, tmp_path / "collected", "--idle", "600")
    try:
        r = httpx.post(collector.url, content=_pb_request(_spans()), headers={"Content-Type": PB})
        assert r.status_code == 200, r.text
        # The same first case as OTLP/JSON (counts as JSON numbers and strings).
        js = _json_span(TRACE, "00000000000000aa", tokens=(-100, 50), sid="bad-json")
        r = httpx.post(collector.url, content=_json_request(js), headers={"Content-Type": JS})
        assert r.status_code == 200, r.text
        sdir = collector.session_dir("bad")
        want = len(INVALID) + len(VALID)
        wait_for("all steps", lambda: len(steps(sdir)) == want)
        wait_for("the json step", lambda: len(steps(collector.session_dir("bad-json"))) == 1)
        collector.stop()
    finally:
        if collector.proc.poll() is None:
            collector.proc.kill()
            collector.proc.wait()
    done = {e["metadata"]["span_id"]: e for e in steps(sdir)}
    for i in range(len(INVALID)):
        event = done[f"{i + 1:016x}"]
        assert event["tokens"] == 0, (INVALID[i], event)
        assert event["metadata"].get("usage") == "unknown", (INVALID[i], event)
        assert "input_tokens" not in event["metadata"], event
        assert "output_tokens" not in event["metadata"], event
    for i, (counts, tokens) in enumerate(VALID):
        event = done[f"{i + 101:016x}"]
        assert event["tokens"] == tokens, (counts, event)
        assert "usage" not in event["metadata"], event
    assert "00000000000000ff" not in done
    (json_step,) = steps(collector.session_dir("bad-json"))
    assert json_step["tokens"] == 0 and json_step["metadata"]["usage"] == "unknown"
