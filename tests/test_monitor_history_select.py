"""``--tail N`` / ``--since TIME`` find where to start natively (issue 12).

``history(..., end=checkpoint)`` reads back from the model's checkpoint in the
live file (``_native.tail_start``) or bisects it on the timestamps
(``_native.since_start``), then parses only from there; the events it lists
are exactly those the full read lists. It reads the whole history only when
the answer may lie in a rotated segment.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sigil import _native
from sigil.interfaces.cli.event_selection import EventSelection, history
from sigil.telemetry.log_parser import SessionTailer

T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
COMPONENTS = ("routing", "memory", "reasoning", "validation")


def _line(session: str, i: int, *, moment: datetime | None = None) -> bytes:
    kind = "step_error" if i % 37 == 0 else "step_complete"
    return (
        json.dumps(
            {
                "timestamp": (moment or T0 + timedelta(seconds=i)).isoformat(),
                "session_id": session,
                "event_type": kind,
                "component": COMPONENTS[i % 4] if i % 97 else "rare",
                "message": f"event {i}",
                "tokens": i % 50,
                "metadata": {},
                "seq": i,
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
    )


def _session(log: Path, session: str, n: int, *, junk_every: int = 0) -> Path:
    directory = log / "sessions" / session
    directory.mkdir(parents=True)
    path = directory / "execution.jsonl"
    with path.open("wb") as f:
        for i in range(n):
            f.write(_line(session, i))
            if junk_every and i % junk_every == 0:
                f.write(b"not an event\n")
    return path


def _caught_up(log: Path, session: str) -> tuple[int, _native.Checkpoint]:
    tailer = SessionTailer(session, log)
    summary = tailer.catch_up()
    cp = tailer.checkpoint()
    assert cp is not None
    return summary.lines, cp


def _seqs(batches: object) -> list[int | None]:
    return [e.seq for batch in batches for e in batch]  # type: ignore[attr-defined]


def _both(log: Path, session: str, selection: EventSelection) -> tuple[list, list]:  # type: ignore[type-arg]
    lines, cp = _caught_up(log, session)
    full = _seqs(history(session, log, lines, selection))
    fast = _seqs(history(session, log, lines, selection, end=cp))
    return full, fast


@pytest.fixture
def no_full_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path never reads the log from the start."""

    def refuse(self: SessionTailer, batch_lines: int = 65536) -> object:
        raise AssertionError("the whole history was read")

    monkeypatch.setattr(SessionTailer, "iter_existing", refuse)


@pytest.mark.parametrize("n", [1, 5, 100, 2999, 3000, 5000])
def test_tail_from_the_end_lists_what_the_full_read_lists(tmp_path: Path, n: int) -> None:
    _session(tmp_path, "t-1", 3000, junk_every=11)
    full, fast = _both(tmp_path, "t-1", EventSelection(tail=n))
    assert fast == full == list(range(max(0, 3000 - n), 3000))


@pytest.mark.parametrize(
    "selection",
    [
        EventSelection(tail=3, components=frozenset({"rare"})),
        EventSelection(tail=50, errors=True),
        EventSelection(tail=10, event_types=frozenset({"nothing"})),
        EventSelection(tail=4, components=frozenset({"memory"})),
    ],
)
def test_tail_with_filters_reads_back_until_it_has_enough(
    tmp_path: Path, selection: EventSelection
) -> None:
    _session(tmp_path, "t-2", 3000)
    full, fast = _both(tmp_path, "t-2", selection)
    assert fast == full


@pytest.mark.parametrize("seconds", [-10, 0, 1, 777, 2048, 2999, 3000, 5000])
def test_since_bisects_to_what_the_full_read_lists(tmp_path: Path, seconds: int) -> None:
    _session(tmp_path, "s-1", 3000, junk_every=13)
    full, fast = _both(tmp_path, "s-1", EventSelection(since=T0 + timedelta(seconds=seconds)))
    assert fast == full == list(range(max(0, seconds), 3000))
    with_filter = EventSelection(since=T0 + timedelta(seconds=seconds), errors=True)
    full, fast = _both(tmp_path, "s-1", with_filter)
    assert fast == full


def test_the_fast_path_reads_no_history(tmp_path: Path, no_full_read: None) -> None:
    _session(tmp_path, "f-1", 20_000)
    lines, cp = _caught_up(tmp_path, "f-1")
    tail = _seqs(history("f-1", tmp_path, lines, EventSelection(tail=100), end=cp))
    assert tail == list(range(19_900, 20_000))
    since = EventSelection(since=T0 + timedelta(seconds=19_990))
    assert _seqs(history("f-1", tmp_path, lines, since, end=cp)) == list(range(19_990, 20_000))


def test_lines_written_after_the_catch_up_are_not_listed(tmp_path: Path) -> None:
    path = _session(tmp_path, "w-1", 500)
    lines, cp = _caught_up(tmp_path, "w-1")
    with path.open("ab") as f:
        f.write(_line("w-1", 500))
    assert _seqs(history("w-1", tmp_path, lines, EventSelection(tail=2), end=cp)) == [498, 499]
    since = EventSelection(since=T0 + timedelta(seconds=498))
    assert _seqs(history("w-1", tmp_path, lines, since, end=cp)) == [498, 499]


def test_a_rotated_segment_is_read_when_the_answer_may_be_there(tmp_path: Path) -> None:
    directory = tmp_path / "sessions" / "r-1"
    directory.mkdir(parents=True)
    with (directory / "execution_20261129_095959.jsonl").open("wb") as f:
        for i in range(100):
            f.write(_line("r-1", i))
    with (directory / "execution.jsonl").open("wb") as f:
        for i in range(100, 150):
            f.write(_line("r-1", i))
    full, fast = _both(tmp_path, "r-1", EventSelection(tail=80))
    assert fast == full == list(range(70, 150))
    full, fast = _both(tmp_path, "r-1", EventSelection(tail=20))
    assert fast == full == list(range(130, 150))
    full, fast = _both(tmp_path, "r-1", EventSelection(since=T0 + timedelta(seconds=50)))
    assert fast == full == list(range(50, 150))


def test_a_replaced_file_falls_back_to_the_full_read(tmp_path: Path) -> None:
    path = _session(tmp_path, "x-1", 300)
    _, cp = _caught_up(tmp_path, "x-1")
    assert _native.tail_start(path, cp.offset, 5, dev=cp.dev, ino=cp.ino + 1) is None
    assert _native.since_start(path, cp.offset, 0, dev=cp.dev + 1, ino=cp.ino) is None
    start, count = _native.tail_start(path, cp.offset, 5, dev=cp.dev, ino=cp.ino) or (0, 0)
    assert count == 5 and path.read_bytes()[start:].count(b"\n") == 5
    with pytest.raises(FileNotFoundError):
        _native.tail_start(tmp_path / "missing", 10, 1)
