"""The native parser and fold: valid and malformed lines, huge lines, summaries (contract 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import run_py
from sigil import _native
from sigil._native import (
    Fold,
    MalformedLine,
    Tailer,
    fold_file,
    parse_bytes,
    parse_lines,
    tail_max_seq,
)
from sigil.telemetry import log_parser
from sigil.telemetry.execution_logger import LogEntry


def event(
    seq: int | None = 0,
    event_type: str = "step_complete",
    component: str = "routing",
    tokens: int = 0,
    message: str = "m",
    metadata: dict[str, Any] | None = None,
    timestamp: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    n = seq or 0
    d: dict[str, Any] = {
        "timestamp": timestamp or f"2026-01-11T10:{n // 60 % 60:02d}:{n % 60:02d}+00:00",
        "session_id": "s1",
        "event_type": event_type,
        "component": component,
        "message": message,
        "tokens": tokens,
        "metadata": metadata if metadata is not None else {},
    }
    if seq is not None:
        d["seq"] = seq
    d.update(extra)
    return d


def line(**kw: Any) -> bytes:
    return orjson.dumps(event(**kw))


# ---------------------------------------------------------------------------
# Valid lines

VALID = [
    event(seq=0, message="plain"),
    event(seq=1, message='quote " backslash \\ newline \n tab \t nul \x00 bell \x07'),
    event(seq=2, message="ünïcødé ✓ 日本語 🚀 \u2028", component="répondeur"),
    event(seq=3, tokens=2**53, metadata={"nested": {"a": [1, -2, 2.5, None, True]}}),
    event(seq=None, message="no seq"),
]


def test_valid_lines_with_escapes_and_unicode():
    lines = [orjson.dumps(d) for d in VALID]
    entries, bad = parse_lines(lines)
    assert bad == []
    assert [e.to_dict() for e in entries] == [{**d, "seq": d.get("seq")} for d in VALID]
    offset = 0
    for e, raw in zip(entries, lines, strict=True):
        assert e.offset == offset
        offset += len(raw) + 1
    assert entries[2].component == "répondeur"
    assert entries[3].tokens == 2**53
    assert entries[4].seq is None


def test_escaped_json_is_decoded():
    raw = (
        b'{"timestamp":"t","session_id":"s","event_type":"x","component":"c",'
        b'"message":"caf\\u00e9 \\ud83d\\ude80 \\"q\\" \\/ \\n","tokens":1,'
        b'"metadata":{"k\\u00e9y":"v\\u00e0l"},"seq":7}'
    )
    (entry,), bad = parse_lines([raw])
    assert bad == []
    assert entry.message == 'café 🚀 "q" / \n'
    assert entry.metadata == {"kéy": "vàl"}


def test_optional_fields_defaults_and_extra_keys():
    minimal = b'{"timestamp":"t","session_id":"s","event_type":"x","component":"c","message":"m"}'
    (e,), bad = parse_lines([minimal])
    assert bad == []
    assert (e.tokens, e.seq, e.metadata, e.metadata_json) == (0, None, {}, "{}")
    extra = orjson.dumps({**event(seq=5), "extra": {"ignored": [1, 2]}, "level": "info"})
    (e2,), bad = parse_lines([extra])
    assert bad == [] and e2.seq == 5


def test_line_endings_are_tolerated():
    raw = line(seq=1)
    entries, bad = parse_lines([raw + b"\n", raw + b"\r\n", raw + b"\r"])
    assert bad == [] and len(entries) == 3
    entries, bad = parse_bytes(raw + b"\r\n" + raw + b"\n")
    assert bad == [] and [e.offset for e in entries] == [0, len(raw) + 2]


def test_the_writers_layout_and_any_other_key_order_parse_the_same():
    """The fast path (the writer's exact layout) and the general parser agree."""
    d = event(seq=9, tokens=12, message="same", metadata={"latency_ms": 3.5, "x": [1]})
    fast = orjson.dumps(d)
    shuffled = orjson.dumps(dict(reversed(list(d.items()))))
    spaced = orjson.dumps(d, option=orjson.OPT_INDENT_2).replace(b"\n", b" ")
    entries, bad = parse_lines([fast, shuffled, spaced])
    assert bad == []
    assert entries[0].to_dict() == entries[1].to_dict() == entries[2].to_dict() == d


# Floats as orjson (and Python) print them: the shortest repr that reads back
# to the same double. A latency measured with perf_counter looks like these.
FLOATS = [
    943.3567169983137,
    13.114189588902203,
    900.9004917506227,
    100.00000000000001,
    2.7715077941825975e-163,
    0.1,
    5e-324,
    1.7976931348623157e308,
]


def test_metadata_floats_read_back_exactly():
    lines = [line(seq=i, metadata={"latency_ms": x}) for i, x in enumerate(FLOATS)]
    entries, bad = parse_lines(lines)
    assert bad == []
    got = [e.metadata["latency_ms"] for e in entries]
    assert got == FLOATS, [(x, y) for x, y in zip(FLOATS, got, strict=True) if x != y]
    for x in FLOATS:
        entry = LogEntry("t", "s", "step_complete", "c", "m", 0, {"latency_ms": x}, 0)
        assert LogEntry.from_json(entry.to_json()) == entry
        # the fold's per-component latency is the logged value too
        f = Fold(last_n=0)
        f.feed_bytes(line(seq=0, metadata={"latency_ms": x}) + b"\n")
        assert f.summary()["components"]["routing"]["latency_ms"] == x


# ---------------------------------------------------------------------------
# Malformed lines

BASE = event(seq=1)


def with_field(key: str, raw_value: bytes) -> bytes:
    """An event line whose ``key`` holds the raw JSON ``raw_value`` (the writer's layout)."""
    parts = [
        b'"%s":%s' % (k.encode(), raw_value if k == key else orjson.dumps(v))
        for k, v in BASE.items()
    ]
    if key not in BASE:
        parts.append(b'"%s":%s' % (key.encode(), raw_value))
    return b"{" + b",".join(parts) + b"}"


def without(key: str) -> bytes:
    return orjson.dumps({k: v for k, v in BASE.items() if k != key})


MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "empty line"),
    ("blank", b" \t ", "empty line"),
    ("not json", b"{not json", "invalid JSON"),
    ("truncated", line(seq=1)[:-5], "invalid JSON"),
    ("trailing garbage", line(seq=1) + b" x", "invalid JSON"),
    ("invalid utf-8", b"\xff\xfe{}", "invalid UTF-8"),
    ("invalid utf-8 in a string", with_field("message", b'"caf\xe9"'), "invalid UTF-8"),
    ("array", b"[1, 2]", "not a JSON object"),
    ("number", b"42", "not a JSON object"),
    ("string", b'"text"', "not a JSON object"),
    ("null", b"null", "not a JSON object"),
    ("missing message", without("message"), "missing field `message`"),
    ("missing timestamp", without("timestamp"), "missing field `timestamp`"),
    ("negative tokens", with_field("tokens", b"-5"), "invalid value"),
    ("float tokens", with_field("tokens", b"1.5"), "invalid type"),
    ("integral float tokens", with_field("tokens", b"2.0"), "invalid type"),
    ("exponent tokens", with_field("tokens", b"1e3"), "invalid type"),
    ("string tokens", with_field("tokens", b'"7"'), "invalid type"),
    ("bool tokens", with_field("tokens", b"true"), "invalid type"),
    ("huge tokens", with_field("tokens", b"18446744073709551616"), ""),
    ("negative seq", with_field("seq", b"-1"), "invalid value"),
    ("float seq", with_field("seq", b"1.5"), "invalid type"),
    ("list metadata", with_field("metadata", b"[1]"), "`metadata` is not an object"),
    ("string metadata", with_field("metadata", b'"x"'), "`metadata` is not an object"),
    ("number metadata", with_field("metadata", b"5"), "`metadata` is not an object"),
    ("invalid metadata", with_field("metadata", b'{"a":}'), "invalid JSON"),
    ("number timestamp", with_field("timestamp", b"1"), "invalid type"),
    ("null component", with_field("component", b"null"), "invalid type"),
]


@pytest.mark.parametrize(("case", "raw", "reason"), MALFORMED, ids=[c for c, _, _ in MALFORMED])
def test_each_kind_of_malformed_line_is_reported(case: str, raw: bytes, reason: str):
    entries, bad = parse_lines([raw], base_offset=100)
    assert entries == []
    assert len(bad) == 1, case
    offset, why = bad[0].offset, bad[0].reason
    assert offset == 100
    assert isinstance(why, str) and why
    assert reason in why, f"{case}: {why!r}"


def test_a_mixed_batch_never_raises_and_keeps_every_offset():
    good = line(seq=1)
    batch = [good]
    for _, raw, _ in MALFORMED:
        batch += [raw, good]
    entries, bad = parse_lines(batch, base_offset=1000)
    assert len(entries) == len(MALFORMED) + 1
    assert len(bad) == len(MALFORMED)
    offsets, at = [], 1000
    for raw in batch:
        offsets.append(at)
        at += len(raw) + 1
    assert [e.offset for e in entries] == offsets[0::2]
    assert [m.offset for m in bad] == offsets[1::2]

    # the same bytes as one block
    data = b"\n".join(batch) + b"\n"
    entries2, bad2 = parse_bytes(data, base_offset=1000)
    assert [e.offset for e in entries2] == offsets[0::2]
    assert [m.offset for m in bad2] == offsets[1::2]
    for m, raw in zip(bad2, batch[1::2], strict=True):
        assert data[m.offset - 1000 : m.offset - 1000 + len(raw)] == raw, m.reason


def test_parse_bytes_reports_an_unterminated_last_line():
    good = line(seq=1)
    entries, bad = parse_bytes(good + b"\n" + good)
    assert len(entries) == 1
    assert bad == [MalformedLine(len(good) + 1, "incomplete last line (no newline)")]
    assert parse_bytes(b"") == ([], [])


def test_the_fold_and_the_parser_agree_on_what_is_valid():
    """The monitor's counts (fold) and its entries (parser) must not disagree.
    JSON allows duplicate keys (RFC 8259 says SHOULD be unique, orjson and
    Python's json take the last): the same event must be valid, or malformed,
    whatever the order of its keys."""
    lines = [
        line(seq=1, event_type="session_complete", metadata={"status": "complete"}).replace(
            b'{"status":"complete"}', b'{"status":"error","status":"complete"}'
        ),
        line(seq=2, event_type="step_complete", metadata={"latency_ms": 1}).replace(
            b'{"latency_ms":1}', b'{"latency_ms":1,"latency_ms":2}'
        ),
        line(seq=3, event_type="x", metadata={"a": 1}).replace(b'{"a":1}', b'{"a":1,"a":2}'),
    ]
    data = b"\n".join(lines) + b"\n"
    entries, bad = parse_bytes(data)
    fold = Fold(last_n=0)
    fold.feed_bytes(data)
    summary = fold.summary()
    assert (summary["entries"], summary["malformed"]) == (len(entries), len(bad)), (
        f"parser: {len(entries)} entries {bad}; fold: {summary['entries']} entries "
        f"{summary['malformed_samples']}"
    )


# ---------------------------------------------------------------------------
# A 50 MB line: counted as oversize, memory stays bounded

HUGE_LINE = """
import json, resource, sys
from sigil._native import Tailer, fold_file, MAX_LINE_BYTES
path = sys.argv[1]
size = int(sys.argv[2])
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
base = rss()
t = Tailer(path)
entries, bad = [], []
while True:
    e, b = t.read_entries()
    entries += e
    bad += b
    if t.stats()["bytes_read"] >= size:
        break
after_tailer = rss()
summary = fold_file(path)
after_fold = rss()
print(json.dumps({
    "max_line": MAX_LINE_BYTES,
    "seqs": [x.seq for x in entries],
    "bad": [[m.offset, m.kind, m.reason] for m in bad],
    "tailer_oversize": t.stats()["oversize_lines"],
    "fold": {k: summary[k] for k in ("entries", "oversize_lines", "malformed", "lines", "tokens")},
    "fold_samples": summary["malformed_samples"],
    "growth_tailer_kib": after_tailer - base,
    "growth_fold_kib": after_fold - base,
}))
"""


def test_a_50_mb_line_through_the_tailer_and_the_fold(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    first = line(seq=0, tokens=1) + b"\n"
    last = line(seq=1, tokens=2) + b"\n"
    big = 50 * 1024 * 1024
    with open(path, "wb") as f:
        f.write(first)
        chunk = b'{"timestamp":"' + b"x" * (1 << 20)
        written = 0
        while written < big:
            f.write(chunk[: big - written])
            written += min(len(chunk), big - written)
        f.write(b"\n")
        f.write(last)
    size = path.stat().st_size
    report = orjson.loads(run_py(HUGE_LINE, path, size, timeout=120).stdout)
    assert report["max_line"] == 1 << 20
    assert report["seqs"] == [0, 1]
    assert report["tailer_oversize"] == 1
    assert report["bad"] == [
        [len(first), "oversize", f"line of {big} bytes exceeds the line limit"]
    ]
    assert report["fold"] == {
        "entries": 2,
        "oversize_lines": 1,
        "malformed": 0,
        "lines": 3,
        "tokens": 3,
    }
    assert [o for o, _ in report["fold_samples"]] == [len(first)]
    # holding the line would cost 50 MiB; the bound is a few MiB of buffers
    assert report["growth_tailer_kib"] < 20 * 1024, report
    assert report["growth_fold_kib"] < 20 * 1024, report


# ---------------------------------------------------------------------------
# The fold's summary


def session_file(tmp_path: Path) -> tuple[Path, bytes, list[int]]:
    rows: list[bytes] = [
        line(
            seq=0,
            event_type="session_start",
            component="orchestrator",
            metadata={"budget": 1000, "allocations": {"routing": 100, "reasoning": 500}, "run": 1},
        ),
        line(seq=1, component="routing", tokens=50, metadata={"latency_ms": 12.5}),
        line(seq=2, event_type="token_consumption", component="reasoning", tokens=7),
        line(seq=3, event_type="step_error", component="reasoning", metadata={"latency_ms": 3}),
        # seq 4 is missing
        line(seq=5, component="reasoning", tokens=100, metadata={"latency_ms": "bad"}),
        b"garbage line",
        line(seq=6, event_type="budget_warning", component="orchestrator"),
        line(
            seq=7,
            event_type="session_error",
            component="orchestrator",
            metadata={"status": "budget_exceeded", "total_tokens": 157},
        ),
        line(
            seq=8,
            event_type="session_start",
            component="orchestrator",
            metadata={"budget": 2000, "run": 2},
        ),
        line(seq=9, component="routing", tokens=5, metadata={"latency_ms": 1.5}),
        line(
            seq=None,
            event_type="events_dropped",
            component="logger",
            metadata={"dropped": 3, "errno": 28},
        ),
        line(seq=10, event_type="token_consumption", component="memory", tokens=20),
    ]
    data = b"\n".join(rows) + b'\n{"timestamp":"2026'
    path = tmp_path / "execution.jsonl"
    path.write_bytes(data)
    starts = [0]
    for row in rows:
        starts.append(starts[-1] + len(row) + 1)
    # starts[i]: offset of row i; starts[-1]: the torn tail
    return path, data, starts


def test_fold_file_summary(tmp_path: Path):
    path, data, starts = session_file(tmp_path)
    s = fold_file(path, last_n=3)
    assert s["tokens"] == 50 + 7 + 100 + 5 + 20
    assert (s["lines"], s["entries"], s["malformed"]) == (12, 11, 1)
    assert s["malformed_samples"] == [(starts[5], s["malformed_samples"][0][1])]
    assert data[starts[5] :].startswith(b"garbage line")
    assert "invalid JSON" in s["malformed_samples"][0][1]
    assert s["torn_tail"] is True
    assert s["oversize_lines"] == 0
    assert s["event_counts"] == {
        "budget_warning": 1,
        "events_dropped": 1,
        "session_error": 1,
        "session_start": 2,
        "step_complete": 3,
        "step_error": 1,
        "token_consumption": 2,
    }
    assert s["components"] == {
        "logger": {"tokens": 0, "operations": 0, "latency_ms": 0.0, "errors": 0},
        "memory": {"tokens": 20, "operations": 0, "latency_ms": 0.0, "errors": 0},
        "orchestrator": {"tokens": 0, "operations": 0, "latency_ms": 0.0, "errors": 0},
        "reasoning": {"tokens": 107, "operations": 2, "latency_ms": 3.0, "errors": 1},
        "routing": {"tokens": 55, "operations": 2, "latency_ms": 14.0, "errors": 0},
    }
    assert s["status"] == "running"  # run 2 started after run 1 ended
    assert s["budget"] == 2000
    assert s["allocations"] == {"reasoning": 500, "routing": 100}
    assert s["runs"] == 2
    run = s["run"]
    assert run["number"] == 2
    assert run["status"] == "running"
    assert run["tokens"] == 25
    assert run["budget"] == 2000
    assert run["started_at"] == event(seq=8)["timestamp"]
    assert run["ended_at"] is None
    assert set(run["components"]) == {"orchestrator", "routing", "logger", "memory"}
    assert run["components"]["routing"]["tokens"] == 5
    assert s["first_timestamp"] == event(seq=0)["timestamp"]
    assert s["last_timestamp"] == event(seq=10)["timestamp"]
    assert (s["max_seq"], s["last_seq"]) == (10, 10)
    assert (s["seq_gaps"], s["seq_missing"], s["seq_regressions"]) == (1, 1, 0)
    assert s["gap_samples"] == [(3, 5)]
    assert s["dropped_events"] == 3
    last = s["last_entries"]
    assert [(e.event_type, e.seq) for e in last] == [
        ("step_complete", 9),
        ("events_dropped", None),
        ("token_consumption", 10),
    ]
    assert [e.offset for e in last] == starts[9:12]

    # the same through Fold, by file and by bytes, and through the typed wrapper
    for feed in ("file", "bytes"):
        f = Fold(last_n=3)
        end = f.feed_file(path) if feed == "file" else f.feed_bytes(data)
        assert end == starts[-1]
        assert summary_key(f.summary()) == summary_key(s)
    typed = log_parser.fold_file(path, last_n=3)
    assert typed.tokens_used == s["tokens"]
    assert typed.run.tokens_used == 25 and typed.run.number == 2
    assert typed.components["reasoning"] == log_parser.ComponentTotals(107, 2, 3.0, 1)
    assert typed.malformed_samples == [log_parser.MalformedLine(*s["malformed_samples"][0])]
    assert typed.files == [path]


def summary_key(s: dict[str, Any]) -> dict[str, Any]:
    """A summary with its entries made comparable."""
    out = dict(s)
    out["last_entries"] = [(e.offset, e.to_dict()) for e in s["last_entries"]]
    return out


def test_token_totals_never_wrap_around():
    """Each line's tokens are at most 2**53, their sum need not fit in u64: the
    total must not wrap to a small number (saturate, never under-count)."""
    big = 2**53  # the largest value a line may hold
    data = b"".join(line(seq=i, tokens=big) + b"\n" for i in range(2100))
    f = Fold(last_n=0)
    f.feed_bytes(data)
    s = f.summary()
    assert s["entries"] == 2100 and 2100 * big > 2**64
    assert s["tokens"] == 2**64 - 1
    assert s["components"]["routing"]["tokens"] == 2**64 - 1
    assert s["run"]["tokens"] == 2**64 - 1


@pytest.mark.parametrize(
    ("kind", "meta", "status"),
    [
        ("session_complete", {}, "complete"),
        ("session_complete", {"status": "budget_exceeded"}, "budget_exceeded"),
        ("session_error", {}, "error"),
        ("session_error", {"status": "budget_exceeded"}, "budget_exceeded"),
        ("session_error", {"status": "nonsense"}, "error"),
    ],
)
def test_fold_status_from_the_last_event(tmp_path: Path, kind: str, meta: dict, status: str):
    path = tmp_path / "execution.jsonl"
    rows = [
        line(seq=0, event_type="session_start", metadata={"budget": 10}),
        line(seq=1, event_type=kind, metadata=meta),
    ]
    path.write_bytes(b"\n".join(rows) + b"\n")
    s = fold_file(path)
    assert s["status"] == status
    assert s["run"]["status"] == status
    assert s["run"]["ended_at"] == event(seq=1)["timestamp"]
    assert s["torn_tail"] is False


def test_fold_of_an_empty_or_missing_file(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    with pytest.raises(FileNotFoundError):
        fold_file(path)
    path.write_bytes(b"")
    s = fold_file(path)
    assert (s["status"], s["entries"], s["tokens"], s["max_seq"], s["runs"]) == (
        "waiting",
        0,
        0,
        None,
        0,
    )
    assert s["last_entries"] == []


def big_session(rows_n: int) -> tuple[bytes, dict[str, Any]]:
    """A multi-run session of a few MiB with errors, gaps, drops and bad lines,
    plus what a straightforward Python fold makes of it."""
    rows: list[bytes] = []
    ref: dict[str, Any] = {"tokens": 0, "entries": 0, "malformed": 0, "counts": {}, "comps": {}}
    seq = 0
    run = 0
    for i in range(rows_n):
        if i % 20_000 == 0:
            run += 1
            meta: dict[str, Any] = {"budget": 1000 * run}
            if run % 2:
                meta["run"] = run  # every other run leaves its number implicit
            d = event(seq=seq, event_type="session_start", component="orchestrator", metadata=meta)
        elif i % 20_000 == 19_999:
            d = event(seq=seq, event_type="session_complete", component="orchestrator")
        elif i % 997 == 0:
            rows.append(b"not an event %d" % i)
            ref["malformed"] += 1
            continue
        elif i % 1_999 == 0:
            seq += 2  # a gap of two
            ref["gaps"] = ref.get("gaps", 0) + 1
            d = event(seq=seq, event_type="step_error", component=f"c{i % 5}")
            d["metadata"] = {"latency_ms": 0.5}
        else:
            kind = "step_complete" if i % 3 else "token_consumption"
            d = event(seq=seq, event_type=kind, component=f"c{i % 5}", tokens=i % 101)
            d["metadata"] = {"latency_ms": i % 7, "pad": "p" * (i % 50)}
        rows.append(orjson.dumps(d))
        seq += 1
        ref["entries"] += 1
        ref["tokens"] += d["tokens"]
        ref["counts"][d["event_type"]] = ref["counts"].get(d["event_type"], 0) + 1
        c = ref["comps"].setdefault(d["component"], [0, 0, 0])
        c[0] += d["tokens"]
        if d["event_type"] in ("step_complete", "step_error"):
            c[1] += 1
            c[2] += d["event_type"] == "step_error"
    ref["runs"] = run
    ref["max_seq"] = seq - 1
    return b"\n".join(rows) + b"\n", ref


def test_folding_a_large_file_matches_a_sequential_fold_and_a_python_reference(tmp_path: Path):
    """Files over a few MiB are folded in parallel parts; the result must equal
    the one-pass fold (Fold.feed_bytes) and what plain Python computes."""
    data, ref = big_session(90_000)
    assert len(data) > 12 << 20
    path = tmp_path / "execution.jsonl"
    path.write_bytes(data)
    whole = fold_file(path, last_n=5)
    seq_fold = Fold(last_n=5)
    seq_fold.feed_bytes(data)
    assert summary_key(whole) == summary_key(seq_fold.summary())
    assert whole["tokens"] == ref["tokens"]
    assert whole["entries"] == ref["entries"]
    assert whole["malformed"] == ref["malformed"]
    assert whole["event_counts"] == ref["counts"]
    comps = {k: [v["tokens"], v["operations"], v["errors"]] for k, v in whole["components"].items()}
    assert comps == ref["comps"]
    assert whole["runs"] == ref["runs"]
    assert whole["run"]["number"] == ref["runs"]
    assert whole["max_seq"] == ref["max_seq"]
    assert (whole["seq_gaps"], whole["seq_missing"]) == (ref["gaps"], 2 * ref["gaps"])
    assert whole["seq_regressions"] == 0


# ---------------------------------------------------------------------------
# Records: LogEntry and ParsedEntry


def test_log_entry_json_round_trip():
    entry = LogEntry(
        timestamp="2026-01-11T10:15:32.123456+00:00",
        session_id="s1",
        event_type="step_complete",
        component="routing",
        message='Intent "classified" ✓\nnext line',
        tokens=50,
        metadata={"intent": "lead_analysis", "scores": [0.5, 1], "deep": {"x": None}},
        seq=3,
    )
    text = entry.to_json()
    assert isinstance(text, str) and "\n" not in text
    assert LogEntry.from_json(text) == entry
    assert LogEntry.from_json(text.encode()) == entry
    no_seq = LogEntry("t", "s", "x", "c", "m")
    assert "seq" not in orjson.loads(no_seq.to_json())
    assert LogEntry.from_json(no_seq.to_json()) == no_seq
    for bad in ("", "{", "[]", text.replace('"tokens":50', '"tokens":-1')):
        with pytest.raises(ValueError, match="malformed"):
            LogEntry.from_json(bad)


def test_parsed_entry_metadata_and_to_dict():
    meta = {"latency_ms": 12.5, "n": -3, "big": 2**63, "list": [1, "two", None], "ok": False}
    (e,), _ = parse_lines([line(seq=4, tokens=9, metadata=meta)], base_offset=77)
    assert e.metadata == meta
    assert e.metadata is e.metadata  # parsed once, on first access
    assert orjson.loads(e.metadata_json) == meta
    assert e.to_dict() == event(seq=4, tokens=9, metadata=meta)
    assert list(e.to_dict()) == [
        "timestamp",
        "session_id",
        "event_type",
        "component",
        "message",
        "tokens",
        "metadata",
        "seq",
    ]
    assert e.offset == 77
    assert "seq=4" in repr(e)
    assert isinstance(e, log_parser.ParsedEntry)
    typed = log_parser.parse_lines([b"oops", line(seq=1)])
    assert [x.seq for x in typed.entries] == [1]
    assert typed.malformed == [log_parser.MalformedLine(0, typed.malformed[0].reason)]


# ---------------------------------------------------------------------------
# tail_max_seq: where a reopened log continues


def test_tail_max_seq(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    path.write_bytes(b"")
    assert tail_max_seq(path) is None
    with pytest.raises(FileNotFoundError):
        tail_max_seq(tmp_path / "missing.jsonl")
    rows = [line(seq=i, message="x" * (i % 300)) for i in range(5000)]
    body = b"\n".join(rows) + b"\n"
    path.write_bytes(body)
    assert tail_max_seq(path) == 4999
    # after the last event: lines without seq, garbage and a torn tail (> one 64 KiB block)
    trailer = b"".join(line(seq=None) + b"\n" for _ in range(300)) + b"junk\n" * 20_000
    path.write_bytes(body + trailer + b'{"timestamp":"20')
    assert tail_max_seq(path) == 4999
    assert tail_max_seq(path, max_scan_bytes=1024) is None
    # one last event much longer than the scan block
    path.write_bytes(body + line(seq=5000, message="y" * 200_000) + b"\n")
    assert tail_max_seq(path) == 5000


def test_native_module_surface():
    assert _native.MAX_LINE_BYTES == 1 << 20
    assert isinstance(Tailer, type) and isinstance(Fold, type)


def test_offsets_near_the_64_bit_limit_are_refused_not_wrapped() -> None:
    from sigil._native import Fold

    for call in (
        lambda: parse_lines([b"bad"] * 2, 2**64 - 1),
        lambda: parse_bytes(b"bad\n", 2**63),
        lambda: Fold().feed_bytes(b"bad\n", 2**63),
    ):
        with pytest.raises(ValueError, match="base_offset"):
            call()
    assert [m.offset for m in parse_lines([b"bad"] * 2, 2**62)[1]] == [2**62, 2**62 + 4]


# ---------------------------------------------------------------------------
# Defect 2 (issue 9): the fast path may only fall back to the general parser


def varied_lines(n: int, seed: int = 9) -> list[bytes]:
    """Compact valid event lines in the shapes other writers produce: keys after
    ``metadata`` (before ``seq``), keys in any order, escapes (``\\"``, ``\\n``,
    ``\\uXXXX``), non-ASCII names, and metadata that looks like the line's tail."""
    import json
    import random

    rng = random.Random(seed)
    names = ["routing", "mémoire", "計画", 'quo"te', "back\\slash", "tab\tc", "🚀"]
    kinds = ["step_complete", "step_error", "token_consumption", "session_start", "x"]
    tails = [{}, {"a": '},"seq":1}'}, {"n": [1, {"b": "]"}]}, {"s": '\\"{'}]
    out = []
    for i in range(n):
        meta: dict[str, Any] = dict(rng.choice(tails))
        if rng.random() < 0.5:
            meta["latency_ms"] = rng.randrange(0, 5000) / 4
        d: dict[str, Any] = {
            "timestamp": f"2026-01-11T10:{i // 60 % 60:02d}:{i % 60:02d}+00:00",
            "session_id": rng.choice(["s1", "sé", "s\u2028"]),
            "event_type": rng.choice(kinds),
            "component": rng.choice(names),
            "message": rng.choice(["ok", 'with "quotes" and \n', "ünï ✓", "\x01ctl"]),
            "tokens": rng.randrange(0, 1000),
            "metadata": meta,
        }
        shape = i % 4
        if shape == 0:  # the writer's layout with a key between metadata and seq
            d["extra"] = rng.choice([{}, {"k": [1, 2]}, "v", None, 3])
            d["seq"] = i
        elif shape == 1:  # any key order, extra keys anywhere
            d["seq"] = i
            d["level"] = "info"
            items = list(d.items())
            rng.shuffle(items)
            d = dict(items)
        elif shape == 2:  # the writer's layout, seq absent, a key at the end
            d["trailer"] = {"seq": 5}
        else:  # the writer's layout exactly
            d["seq"] = i
        if rng.random() < 0.3:  # \uXXXX escapes for every non-ASCII character
            out.append(json.dumps(d, separators=(",", ":")).encode())
        else:
            out.append(orjson.dumps(d))
    return out


def plain_json_totals(lines: list[bytes]) -> dict[str, Any]:
    """Totals computed the plain way: json.loads per line."""
    import json

    counts: dict[str, int] = {}
    comps: dict[str, int] = {}
    tokens = 0
    for raw in lines:
        d = json.loads(raw)
        tokens += d["tokens"]
        counts[d["event_type"]] = counts.get(d["event_type"], 0) + 1
        comps[d["component"]] = comps.get(d["component"], 0) + d["tokens"]
    return {"entries": len(lines), "tokens": tokens, "event_counts": counts, "components": comps}


def test_the_fold_counts_every_valid_line_whatever_its_key_order(tmp_path: Path):
    lines = varied_lines(20_000)
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / "execution.jsonl"
    path.write_bytes(data)
    want = plain_json_totals(lines)
    fold = Fold(last_n=0)
    fold.feed_bytes(data)
    for s in (fold_file(path, last_n=0), fold.summary()):
        assert s["malformed_samples"][:3] == [] and s["malformed"] == 0
        got = {
            "entries": s["entries"],
            "tokens": s["tokens"],
            "event_counts": s["event_counts"],
            "components": {k: v["tokens"] for k, v in s["components"].items()},
        }
        assert got == want
    entries, bad = parse_bytes(data)
    assert bad == [] and len(entries) == len(lines)


# ---------------------------------------------------------------------------
# Issue 11 items 11 and 12: one range for tokens, one depth bound, every reader


def every_reader(tmp_path: Path, raw: bytes) -> dict[str, Any]:
    """What each native reader makes of one line: valid (True) or the reason."""
    path = tmp_path / "one.jsonl"
    path.write_bytes(raw + b"\n")
    out: dict[str, Any] = {}
    entries, bad = parse_lines([raw])
    out["parse_lines"] = True if entries else bad[0].reason
    entries, bad = parse_bytes(raw + b"\n")
    out["parse_bytes"] = True if entries else bad[0].reason
    s = fold_file(path)
    out["fold_file"] = True if s["entries"] else s["malformed_samples"][0][1]
    f = Fold()
    f.feed_bytes(raw + b"\n")
    s = f.summary()
    out["Fold"] = True if s["entries"] else s["malformed_samples"][0][1]
    entries, bad = Tailer(path).read_entries()
    out["Tailer"] = True if entries else bad[0].reason
    out["tail_max_seq"] = tail_max_seq(path) is not None
    return out


def shuffled(raw: bytes) -> bytes:
    """The same event with its keys in another order (the general parser)."""
    return orjson.dumps(dict(reversed(list(orjson.loads(raw).items()))))


@pytest.mark.parametrize("tokens", [2**53 + 1, 2**63, 2**64 - 1])
def test_tokens_above_2_53_are_malformed_for_every_reader(tmp_path: Path, tokens: int):
    for make in (lambda t: line(seq=1, tokens=t), lambda t: shuffled(line(seq=1, tokens=t))):
        ok = every_reader(tmp_path, make(2**53))
        assert all(v is True for v in ok.values()), ok
        verdicts = every_reader(tmp_path, make(tokens))
        assert verdicts.pop("tail_max_seq") is False
        for reader, why in verdicts.items():
            assert why is not True, reader
            assert "tokens" in why and "2**53" in why, (reader, why)
    summary = fold_file(tmp_path / "one.jsonl")
    assert (summary["malformed"], summary["tokens"]) == (1, 0)


def nested(depth: int, kind: str = "dict") -> Any:
    """A value ``depth`` levels deep: {} is 1 level, {"k": {}} is 2."""
    value: Any = {} if kind == "dict" else []
    for _ in range(depth - 1):
        value = {"k": value} if kind == "dict" else [value]
    return value


def test_the_native_module_exposes_the_depth_bound():
    assert _native.MAX_DEPTH == 64


@pytest.mark.parametrize("kind", ["dict", "list"])
def test_metadata_deeper_than_max_depth_is_malformed_for_every_reader(tmp_path: Path, kind: str):
    import json

    deepest = {"x": nested(63, kind)}  # 64 levels with the metadata object itself
    for raw in (line(seq=1, metadata=deepest), shuffled(line(seq=1, metadata=deepest))):
        ok = every_reader(tmp_path, raw)
        assert all(v is True for v in ok.values()), ok
    too_deep = {"x": nested(64, kind)}
    for depth_line in (
        line(seq=1, metadata=too_deep),
        shuffled(line(seq=1, metadata=too_deep)),
        # orjson refuses to write more than 255 levels: json writes the rest
        json.dumps(event(seq=1, metadata={"x": nested(125, kind)})).encode(),  # the 126
        json.dumps(event(seq=1, metadata={"x": nested(900, kind)})).encode(),
        # any other value of the event is bounded the same way
        orjson.dumps({**event(seq=1), "extra": nested(65, kind)}),
    ):
        verdicts = every_reader(tmp_path, depth_line)
        assert verdicts.pop("tail_max_seq") is False
        for reader, why in verdicts.items():
            assert why is not True, reader
            assert "nested deeper than 64 levels" in why, (reader, why)
    # a line that is nothing but brackets is malformed too, never a crash
    verdicts = every_reader(tmp_path, b"[" * 100_000)
    assert not any(v is True for v in verdicts.values())
