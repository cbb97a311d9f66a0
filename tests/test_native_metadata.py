"""The logger's native hot path (``AppendWriter.log_event``, issue 9).

It encodes an event's metadata itself instead of calling orjson, and scrubs it
in the same walk. Byte for byte it must write what the Python path writes:
``orjson.dumps(metadata, option=OPT_NON_STR_KEYS)``, scrubbed as the writer
scrubs orjson's bytes (``write_event(..., metadata_bytes)`` with
``sanitize=True``); and whatever it does not take (other types, big integers,
deep nesting, oversized parts) it declines, having written nothing.
"""

from __future__ import annotations

import math
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil import _native
from sigil.telemetry.execution_logger import ExecutionLogger

OPTS = orjson.OPT_NON_STR_KEYS
TS = "2026-11-29T04:00:00.000000+00:00"

# Strings with what orjson escapes (quotes, backslashes, every control
# character), what it writes raw (DEL, U+2028, non-ASCII, astral), and secrets.
_SPECIAL = st.sampled_from(
    [
        '"',
        "\\",
        "\x00",
        "\x1f",
        "\n\r\t\b\f",
        "\x7f",
        "\u2028",
        "é",
        "☃",
        "𝄞",
        "sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789",
        "https://admin:s3cr3t-P4ss@api.example.com",
        "Bearer 0123456789abcdef0123456789abcdef",
        "password=hunter2",
        "AKIAIOSFODNN7EXAMPLE",
        "4111 1111 1111 1111",
        "token: 512",
    ]
)
_TEXT = st.lists(
    st.one_of(_SPECIAL, st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=8)),
    max_size=5,
).map("".join)
_KEYS = st.one_of(
    st.sampled_from(["password", "api_key", "token", "Authorization", "model", "error", ""]),
    _TEXT,
)
_FLOATS = st.one_of(
    st.floats(),  # NaN and infinities included: null on both paths
    st.sampled_from([0.0, -0.0, 1e16, 1e15, 1.5e-5, 1e-7, 5e-324, 1.7976931348623157e308]),
)
_SCALARS = st.one_of(
    _TEXT,
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.sampled_from([-(1 << 63), (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0, -1]),
    _FLOATS,
    st.booleans(),
    st.none(),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(_KEYS, inner, max_size=4),
    ),
    max_leaves=16,
)
_METADATA = st.dictionaries(_KEYS, _VALUES, max_size=6)


def _metadata_of(line: bytes) -> bytes:
    """The metadata's bytes in a line the writer formatted (seq is the last key)."""
    start = line.index(b',"metadata":') + len(b',"metadata":')
    return line[start : line.rindex(b',"seq":')]


def _without_timestamp(line: bytes) -> bytes:
    return line[line.index(b',"session_id":') :]


def _native_lines(
    events: list[tuple[str, dict[str, Any]]], sanitize: bool
) -> tuple[list[int | None], list[bytes]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.jsonl"
        writer = _native.AppendWriter(path, session_id="s", sanitize=sanitize)
        seqs = [writer.log_event("step", "c", message, 7, meta) for message, meta in events]
        writer.close()
        return seqs, path.read_bytes().splitlines()


def _orjson_lines(events: list[tuple[str, dict[str, Any]]], sanitize: bool) -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.jsonl"
        writer = _native.AppendWriter(path, session_id="s", sanitize=sanitize)
        for message, meta in events:
            writer.write_event("s", "step", "c", message, 7, orjson.dumps(meta, option=OPTS), TS)
        writer.close()
        return path.read_bytes().splitlines()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_METADATA, min_size=1, max_size=4))
def test_native_metadata_is_orjson_byte_for_byte(metadatas: list[dict[str, Any]]) -> None:
    events = [("m", meta) for meta in metadatas]
    seqs, lines = _native_lines(events, sanitize=False)
    assert seqs == list(range(len(events)))
    assert [_metadata_of(line) for line in lines] == [
        orjson.dumps(meta, option=OPTS) if meta else b"{}" for meta in metadatas
    ]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_TEXT, _METADATA), min_size=1, max_size=4))
def test_native_scrubbing_is_the_writers_scrubbing_of_orjson_bytes(
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    """With the sanitizer on, the one native walk writes the line the writer
    writes from orjson's bytes (scrubbed by ``sanitize_json``), byte for byte."""
    seqs, lines = _native_lines(events, sanitize=True)
    assert seqs == list(range(len(events)))
    expected = _orjson_lines(events, sanitize=True)
    assert [_without_timestamp(line) for line in lines] == [
        _without_timestamp(line) for line in expected
    ]


class _Str(str):
    pass


class _Int(int):
    pass


_CIRCULAR: list[Any] = []
_CIRCULAR.append(_CIRCULAR)


def _nested(depth: int) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for _ in range(depth - 1):
        meta = {"d": meta}
    return meta


@pytest.mark.parametrize(
    "metadata",
    [
        {"n": 1 << 64},
        {"n": -(1 << 63) - 1},
        {1: "int key"},
        {None: "none key"},
        {_Str("k"): 1},
        {"v": _Str("x")},
        {"v": _Int(3)},
        {"v": {1, 2}},
        {"v": Path("/tmp")},
        {"v": "\ud800"},
        {"v": _CIRCULAR},
        OrderedDict(a=1),
        _nested(65),
        {"big": "x" * ((_native.MAX_LINE_BYTES - 4096) // 4)},
    ],
    ids=lambda m: type(m).__name__,
)
def test_what_the_native_path_declines_it_leaves_unwritten(tmp_path: Path, metadata: Any) -> None:
    writer = _native.AppendWriter(tmp_path / "log.jsonl", session_id="s")
    assert writer.log_event("step", "c", "m", 0, metadata) is None
    assert writer.next_seq == 0
    writer.close()
    assert (tmp_path / "log.jsonl").read_bytes() == b""


def test_the_deepest_metadata_taken_is_the_limit(tmp_path: Path) -> None:
    writer = _native.AppendWriter(tmp_path / "log.jsonl", session_id="s")
    assert writer.log_event("step", "c", "m", 0, _nested(64)) == 0
    writer.close()
    assert _metadata_of((tmp_path / "log.jsonl").read_bytes().rstrip()) == orjson.dumps(_nested(64))


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("step", "c", "m", True, None), "bool tokens"),
        (("step", "c", "m", -1, None), "negative tokens"),
        (("step", "c", "m", (1 << 53) + 1, None), "tokens past 2**53"),
        (("step", "c", "m", 1.0, None), "float tokens"),
        (("step", "c", "m" * ((_native.MAX_LINE_BYTES - 4096) // 16 + 1), 0, None), "message"),
        (("e" * 200, "c" * 57, "m", 0, None), "names"),
        (("step", "c", "m", 0, [1]), "a list as metadata"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_arguments_the_python_path_checks_are_declined(
    tmp_path: Path, args: tuple[Any, ...], why: str
) -> None:
    writer = _native.AppendWriter(tmp_path / "log.jsonl", session_id="s")
    assert writer.log_event(*args) is None, why
    writer.close()


_ODD_VALUES = st.one_of(
    _VALUES,
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from([{1, 2}, frozenset(), _Str("sub"), _Int(5), math.inf, Path("/p")]),
    st.dictionaries(st.one_of(st.integers(), st.none(), st.booleans()), _SCALARS, max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(_TEXT, st.dictionaries(_KEYS, _ODD_VALUES, max_size=4)), max_size=4),
    st.booleans(),
)
def test_the_logger_writes_what_its_python_path_writes(
    events: list[tuple[str, dict[str, Any]]], sanitize: bool
) -> None:
    """Whatever the metadata holds, ``log_event_sync`` (native or declined)
    writes the line the Python path writes."""
    with tempfile.TemporaryDirectory() as tmp:
        fast = ExecutionLogger("fast", Path(tmp), sanitizer=sanitize)
        slow = ExecutionLogger("slow", Path(tmp), sanitizer=sanitize)
        for message, meta in events:
            fast.log_event_sync("step", "c", message, 3, meta)
            slow.initialize_sync()
            slow._log_event_slow("step", "c", message, 3, meta)
        fast.close_sync()
        slow.close_sync()
        got = fast.log_file.read_bytes().splitlines() if events else []
        want = slow.log_file.read_bytes().splitlines() if events else []
    strip = _without_timestamp
    assert [strip(line).replace(b'"fast"', b'"slow"', 1) for line in got] == [
        strip(line) for line in want
    ]
