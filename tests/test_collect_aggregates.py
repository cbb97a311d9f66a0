"""``sigil collect``: an agent's span that reports its model calls' usage again.

Some instrumentations put the usage of an agent's LLM calls on the agent's
span as well (GenAI semconv ``invoke_agent``, OpenInference ``AGENT``/``CHAIN``
with ``llm.token_count.*``). Every token is to be counted once: a session's
total is the sum of its leaf model calls, whatever order and batches the spans
arrive in, across a restart of collect and across its session being closed.

Children end, and so are usually exported, before their parent: that order is
covered by tests/test_collect_sessions.py. Here the parent arrives first (an
earlier export batch, or first in the same batch).

Real peers: the ``sigil collect`` command as a subprocess, fed OTLP/JSON and
protobuf over HTTP; totals read through ``sigil monitor --once --mode json``
and the native model.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import run_cli
from sigil.telemetry.log_parser import session_history
from test_collect import _json_request
from test_collect_sessions import LimitedCollector, _one_trace

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

JS = {"Content-Type": "application/json"}
PB = {"Content-Type": "application/x-protobuf"}
TRACE = "cd" * 16
SESSION = "agg-1"
ROOT, SUB, LLM_A, LLM_B = "1" * 16, "2" * 16, "3" * 16, "4" * 16
#: the leaves' usage: what the session counts
LEAVES = (100 + 10) + (200 + 20)

#: A parent arriving first is counted once by the pending rule (rust/otlp.rs,
#: ``SessionState::write``; sigil.collect.sink's module doc): a span that can
#: group model calls (GenAI ``invoke_agent``/``create_agent``/``execute_tool``,
#: OpenInference kinds other than ``LLM``/``EMBEDDING``) reporting usage with
#: no child known is written with 0 tokens (``reported_*``, ``pending: true``)
#: and held; a child reporting usage makes it an aggregate; still without one
#: when the grace passes (the idle tick) or its run ends, it is settled (one
#: ``token_consumption`` with its tokens and cost), and a child arriving after
#: that counts 0 (covered), and so do its own children. The sink rebuilds
#: pending and settled spans from the log on reopen.


def _attrs(**values: Any) -> list[dict[str, Any]]:
    out = []
    for key, value in values.items():
        name = key.replace("__", ".")
        if isinstance(value, int):
            out.append({"key": name, "value": {"intValue": str(value)}})
        else:
            out.append({"key": name, "value": {"stringValue": value}})
    return out


def _span(span: str, parent: str, name: str, attrs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": TRACE,
        "spanId": span,
        "name": name,
        "kind": 1,
        "attributes": attrs,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000001000000000",
    }
    if parent:
        out["parentSpanId"] = parent
    return out


def genai(span: str, parent: str, tokens: tuple[int, int], *, agent: bool) -> dict[str, Any]:
    """GenAI semconv: a ``chat`` call, or an ``invoke_agent`` span reporting
    its calls' usage again."""
    return _span(
        span,
        parent,
        "invoke_agent planner" if agent else "chat gpt-4o",
        _attrs(
            gen_ai__operation__name="invoke_agent" if agent else "chat",
            gen_ai__conversation__id=SESSION,
            gen_ai__agent__name="planner",
            gen_ai__request__model="gpt-4o",
            gen_ai__usage__input_tokens=tokens[0],
            gen_ai__usage__output_tokens=tokens[1],
        ),
    )


def openinference(span: str, parent: str, tokens: tuple[int, int], *, kind: str) -> dict[str, Any]:
    """OpenInference: an ``LLM`` call, or an ``AGENT``/``CHAIN`` span with the
    token totals of the calls under it (``llm.token_count.*``)."""
    return _span(
        span,
        parent,
        kind.lower(),
        _attrs(
            openinference__span__kind=kind,
            session__id=SESSION,
            llm__model_name="gpt-4o",
            llm__token_count__prompt=tokens[0],
            llm__token_count__completion=tokens[1],
            llm__token_count__total=tokens[0] + tokens[1],
        ),
    )


def genai_tree() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(parents, leaves): an agent over a sub-agent over two chat calls."""
    parents = [
        genai(ROOT, "", (300, 30), agent=True),
        genai(SUB, ROOT, (300, 30), agent=True),
    ]
    leaves = [genai(LLM_A, SUB, (100, 10), agent=False), genai(LLM_B, SUB, (200, 20), agent=False)]
    return parents, leaves


def openinference_tree() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(parents, leaves): an AGENT over a CHAIN over two LLM calls."""
    parents = [
        openinference(ROOT, "", (300, 30), kind="AGENT"),
        openinference(SUB, ROOT, (300, 30), kind="CHAIN"),
    ]
    leaves = [
        openinference(LLM_A, SUB, (100, 10), kind="LLM"),
        openinference(LLM_B, SUB, (200, 20), kind="LLM"),
    ]
    return parents, leaves


TREES = {"genai": genai_tree, "openinference": openinference_tree}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def _monitor_tokens(home: Path, log_path: Path) -> int:
    proc = run_cli(
        home,
        "monitor",
        "--session",
        SESSION,
        "--once",
        "--mode",
        "json",
        "--log-path",
        str(log_path),
    )
    assert proc.returncode == 0, proc.stderr
    return int(orjson.loads(proc.stdout.splitlines()[0])["tokens_used"])


def _collect(home: Path, log_path: Path, bodies: list[bytes], *, restart: bool = False) -> None:
    """POST ``bodies`` in order to ``sigil collect`` (a new process for each
    with ``restart``); then stop it."""
    groups = [[body] for body in bodies] if restart else [bodies]
    for group in groups:
        collector = LimitedCollector(home, log_path, 1024, "--idle", "600")
        try:
            with httpx.Client(timeout=30) as client:
                for body in group:
                    r = client.post(collector.url, content=body, headers=JS)
                    assert r.status_code == 200, r.text
            code, _, err = collector.stop()
        finally:
            collector.kill()
        assert code == 0, err


def _assert_leaves_counted_once(home: Path, log_path: Path) -> None:
    sdir = log_path / "sessions" / SESSION
    assert session_history(sdir).tokens == LEAVES
    assert _monitor_tokens(home, log_path) == LEAVES


# -- what holds today (and must go on holding) ---------------------------------------------


@pytest.mark.parametrize("tree", sorted(TREES))
def test_children_before_their_parents_count_the_leaves(
    home: Path, tmp_path: Path, tree: str
) -> None:
    parents, leaves = TREES[tree]()
    log_path = tmp_path / "collected"
    # bottom-up, as spans end: the leaves, then the sub-agent, then the agent
    _collect(home, log_path, [_json_request(*leaves), *[_json_request(p) for p in parents[::-1]]])
    _assert_leaves_counted_once(home, log_path)


@pytest.mark.parametrize("tree", sorted(TREES))
def test_an_agent_span_without_model_call_spans_counts_its_usage(
    home: Path, tmp_path: Path, tree: str
) -> None:
    """An instrumentation that reports usage on the agent's span alone: those
    tokens are the only report of them, and count."""
    parents, _ = TREES[tree]()
    log_path = tmp_path / "collected"
    _collect(home, log_path, [_json_request(parents[0])])
    assert session_history(log_path / "sessions" / SESSION).tokens == 330
    assert _monitor_tokens(home, log_path) == 330


# -- a parent arriving before its children --------------------------------------------------


def _top_down(tree: str) -> list[bytes]:
    parents, leaves = TREES[tree]()
    return [_json_request(p) for p in parents] + [_json_request(*leaves)]


ARRIVALS: dict[str, Callable[[str], list[bytes]]] = {
    # each span its own export batch, parents first
    "batches": _top_down,
    # one batch, parents ordered first
    "one_batch": lambda tree: [_json_request(*TREES[tree]()[0], *TREES[tree]()[1])],
    # the agent first, then the leaves, then the sub-agent between them
    "interleaved": lambda tree: [
        _json_request(TREES[tree]()[0][0]),
        _json_request(*TREES[tree]()[1]),
        _json_request(TREES[tree]()[0][1]),
    ],
}


@pytest.mark.parametrize("arrival", sorted(ARRIVALS))
@pytest.mark.parametrize("tree", sorted(TREES))
def test_parents_before_their_children_count_the_leaves(
    home: Path, tmp_path: Path, tree: str, arrival: str
) -> None:
    log_path = tmp_path / "collected"
    _collect(home, log_path, ARRIVALS[arrival](tree))
    _assert_leaves_counted_once(home, log_path)


@pytest.mark.parametrize("tree", sorted(TREES))
def test_parents_before_their_children_across_restarts(
    home: Path, tmp_path: Path, tree: str
) -> None:
    """Each batch to a new collect process: what the first wrote is all the
    next one knows."""
    log_path = tmp_path / "collected"
    _collect(home, log_path, _top_down(tree), restart=True)
    _assert_leaves_counted_once(home, log_path)


def test_a_parent_before_its_children_across_an_eviction(home: Path, tmp_path: Path) -> None:
    """Under 128 descriptors (4 sessions open, 16 parked) 40 other sessions
    push the agent's session out (its run ended); the children reopen it."""
    parents, leaves = genai_tree()
    log_path = tmp_path / "collected"
    collector = LimitedCollector(home, log_path, 128, "--idle", "600")
    try:
        with httpx.Client(timeout=30) as client:
            r = client.post(collector.url, content=_json_request(*parents), headers=JS)
            assert r.status_code == 200
            for i in range(1, 41):
                r = client.post(collector.url, content=_one_trace(i), headers=JS)
                assert r.status_code == 200
            r = client.post(collector.url, content=_json_request(*leaves), headers=JS)
            assert r.status_code == 200
        code, _, err = collector.stop()
    finally:
        collector.kill()
    assert code == 0, err
    assert len(session_history(log_path / "sessions" / SESSION).runs) == 2
    _assert_leaves_counted_once(home, log_path)


def test_a_parent_first_in_one_protobuf_request(home: Path, tmp_path: Path) -> None:
    """The OpenTelemetry SDK's encoding: the same spans as protobuf."""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    parents, leaves = genai_tree()
    # protobuf's JSON mapping has bytes in base64 where OTLP/JSON has hex IDs
    raw = _json_request(*parents, *leaves).decode()
    for hex_id in (TRACE, ROOT, SUB, LLM_A, LLM_B):
        raw = raw.replace(f'"{hex_id}"', f'"{base64.b64encode(bytes.fromhex(hex_id)).decode()}"')
    request = ExportTraceServiceRequest()
    json_format.Parse(raw, request)
    log_path = tmp_path / "collected"
    collector = LimitedCollector(home, log_path, 1024, "--idle", "600")
    try:
        body = request.SerializeToString()
        r = httpx.post(collector.url, content=body, headers=PB)
        assert r.status_code == 200
        code, _, err = collector.stop()
    finally:
        collector.kill()
    assert code == 0, err
    _assert_leaves_counted_once(home, log_path)


# -- the pending rule through the sink (in process) -----------------------------------------


def _ingest(sink: Any, *spans: dict[str, Any]) -> None:
    from sigil.collect.decode import decode_request

    sink.ingest(decode_request(_json_request(*spans), False))


def _done_events(log_path: Path) -> list[dict[str, Any]]:
    lines = (log_path / "sessions" / SESSION / "execution.jsonl").read_bytes().splitlines()
    events = [orjson.loads(line) for line in lines]
    return [e for e in events if e["event_type"] in ("step_complete", "token_consumption")]


@pytest.mark.parametrize("tree", sorted(TREES))
def test_a_pending_parent_settles_after_the_grace_while_its_run_goes_on(
    tmp_path: Path, tree: str
) -> None:
    import time

    from sigil.collect.sink import SessionSink

    parents, leaves = TREES[tree]()
    sink = SessionSink(tmp_path, idle_seconds=600, settle_seconds=5)
    sdir = tmp_path / "sessions" / SESSION
    try:
        _ingest(sink, parents[0])
        assert sink.settle(time.monotonic() - 5) == 0  # within the grace
        sink.close_idle(time.monotonic() + 10)
        assert sink.open_sessions == [SESSION]  # its run goes on
        sink.flush()
        assert session_history(sdir).tokens == 330
        settled = _done_events(tmp_path)[-1]
        assert settled["event_type"] == "token_consumption"
        assert settled["tokens"] == 330
        assert settled["metadata"]["settled"] is True
        assert settled["metadata"]["input_tokens"] == 300
        assert "cost_usd" in settled["metadata"]
        # the fold counts it once, as the agent's component, priced
        history = session_history(sdir)
        assert history.component_tokens()[settled["component"]] == 330
        assert settled["component"] == ("planner" if tree == "genai" else "agent")
        assert history.cost_nanousd > 0 and history.unpriced_tokens == 0
        # the sub-agent and the calls arrive late: covered by the settled count
        _ingest(sink, parents[1])
        _ingest(sink, *leaves)
    finally:
        sink.close()
    events = _done_events(tmp_path)
    assert [e["metadata"].get("covered") for e in events[-3:]] == [True] * 3
    assert session_history(sdir).tokens == 330


def test_a_parked_session_s_pending_parent_settles(tmp_path: Path) -> None:
    import time

    from sigil.collect.sink import SessionSink

    parents, _ = genai_tree()
    sink = SessionSink(tmp_path, idle_seconds=600, settle_seconds=5, max_open=1, max_parked=4)
    try:
        _ingest(sink, parents[0])
        other = genai(LLM_A, "", (1, 1), agent=False)
        other["attributes"][1]["value"]["stringValue"] = "agg-other"
        _ingest(sink, other)
        assert sink.parked_sessions == [SESSION]
        assert sink.settle(time.monotonic() + 10) == 1
        assert sink.parked_sessions == [SESSION]
        assert session_history(tmp_path / "sessions" / SESSION).tokens == 330
    finally:
        sink.close()
    assert session_history(tmp_path / "sessions" / SESSION).tokens == 330


@pytest.mark.parametrize("children", [True, False])
def test_pending_parents_are_rebuilt_after_a_crash(tmp_path: Path, children: bool) -> None:
    """collect killed with spans pending (its run left open): the next one
    rebuilds them from the log; they become aggregates or settle once."""
    from sigil.collect.sink import SessionSink

    parents, leaves = genai_tree()
    crashed = SessionSink(tmp_path, idle_seconds=600)
    _ingest(crashed, *parents)
    held = crashed._sessions[SESSION]
    assert held.state.pending() == 1  # the sub-agent (the agent is its aggregate)
    held.writer.close()
    held.lock.release()  # no settling, no session_complete: as if killed
    sink = SessionSink(tmp_path, idle_seconds=600)
    try:
        if children:
            _ingest(sink, *leaves)
        else:
            _ingest(sink, genai(ROOT, "", (300, 30), agent=True))  # a retry: opens it
        assert sink._sessions[SESSION].state.pending() == (0 if children else 1)
    finally:
        sink.close()
    sdir = tmp_path / "sessions" / SESSION
    assert session_history(sdir).tokens == 330
    assert len(session_history(sdir).runs) == 1
