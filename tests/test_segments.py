"""Rotated segments under every rotator's names, plain or gzip-compressed
(ARCHITECTURE.md contract 13; issue 11 items 1-3, the reading side).

The naming rule lives in ``rust/segments.rs`` (the tailer follows it from one
segment to the next) and is mirrored by ``sigil.core.paths.rotated_segments``
(the core layer cannot import the native module). The first test checks that
both put any set of names in the same order.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil._native import Checkpoint, Fold, Tailer, tail_max_seq
from sigil.core.paths import LOG_FILE_NAME, rotated_segments, segment_sort_key
from sigil.telemetry.log_parser import fold_session

digits = st.text("0123456789", min_size=1, max_size=3)
stamp = st.tuples(
    st.integers(20200101, 20291231).map(str),
    st.integers(0, 235959).map(lambda n: f"{n:06d}"),
    st.none() | st.integers(1, 12),
)
sigil_name = stamp.map(
    lambda t: f"execution_{t[0]}_{t[1]}" + (f"_{t[2]}" if t[2] else "") + ".jsonl"
)
numbered_name = st.integers(1, 30).map(lambda n: f"execution.jsonl.{n}")
dateext_name = st.sampled_from(
    ["-20251230", "-20251231", "-2025123112", "-2026-01-01", "-20260101_1200", "-20240229"]
).map(lambda d: f"execution.jsonl{d}")
junk_name = st.sampled_from(
    [
        "execution.jsonl.tmp",
        "execution.jsonl.1.bz2",
        "execution_foo.jsonl",
        "execution_20260101_0000.jsonl",
        "execution.jsonl-abc",
        "execution.jsonl-1234",
        "other.jsonl.1",
        "execution.jsonl.",
        "execution.jsonl.\u0661",  # a non-ASCII digit is not a number here
        "tokens.json",
    ]
)
segment_name = st.tuples(
    st.one_of(sigil_name, numbered_name, dateext_name, junk_name), st.booleans()
).map(lambda t: t[0] + (".gz" if t[1] else ""))


def write_segment(path: Path, text: bytes) -> None:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text))
    else:
        path.write_bytes(text)


def drain(tailer: Tailer) -> list[bytes]:
    out: list[bytes] = []
    while batch := tailer.read_lines():
        out += batch
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.sets(segment_name, min_size=1, max_size=8))
def test_python_and_the_native_tailer_agree_on_the_segment_order(names: set[str]) -> None:
    directory = Path(tempfile.mkdtemp(prefix="segments-"))
    try:
        for name in names:
            write_segment(directory / name, name.encode() + b"\n")
        live = directory / LOG_FILE_NAME
        live.write_bytes(b"live\n")
        ordered = [p.name for p in rotated_segments(directory)]
        assert set(ordered) == {n for n in names if segment_sort_key(LOG_FILE_NAME, n)}
        if not ordered:
            assert drain(Tailer(live)) == [b"live"]
            return
        first = (directory / ordered[0]).lstat()
        # Started on the oldest segment, the native tailer walks the chain by its own rule.
        tailer = Tailer(live, checkpoint=Checkpoint(first.st_dev, first.st_ino, 0))
        assert drain(tailer) == [n.encode() for n in ordered] + [b"live"]
        compressed = sum(n.endswith(".gz") for n in ordered)
        assert tailer.stats()["compressed_segments"] == compressed
    finally:
        shutil.rmtree(directory)


def test_the_order_of_all_three_schemes() -> None:
    names = [
        "execution.jsonl.1",
        "execution.jsonl.10.gz",
        "execution.jsonl.2.gz",
        "execution_20260101_000000_10.jsonl",
        "execution_20260101_000000_2.jsonl",
        "execution_20260101_000000.jsonl",
        "execution.jsonl-20251231",
        "execution.jsonl-20251230.gz",
    ]
    keyed = sorted(names, key=lambda n: segment_sort_key(LOG_FILE_NAME, n) or ())
    assert keyed == [
        "execution.jsonl-20251230.gz",
        "execution.jsonl-20251231",
        "execution_20260101_000000.jsonl",
        "execution_20260101_000000_2.jsonl",
        "execution_20260101_000000_10.jsonl",
        "execution.jsonl.10.gz",
        "execution.jsonl.2.gz",
        "execution.jsonl.1",
    ]


def event(seq: int, tokens: int = 5, event_type: str = "step_complete") -> bytes:
    return (
        orjson.dumps(
            {
                "timestamp": "2026-01-01T00:00:00+00:00",
                "session_id": "s1",
                "event_type": event_type,
                "component": "reasoning",
                "message": "m",
                "tokens": tokens,
                "metadata": {},
                "seq": seq,
            }
        )
        + b"\n"
    )


def session(tmp_path: Path) -> Path:
    directory = tmp_path / "logs" / "sessions" / "s1"
    directory.mkdir(parents=True)
    return directory


def test_fold_session_reads_logrotate_segments_compressed_or_not(tmp_path: Path) -> None:
    directory = session(tmp_path)
    # logrotate with compress and delaycompress after three rotations: the two
    # oldest compressed, the newest rotated one still plain.
    write_segment(directory / "execution.jsonl.3.gz", b"".join(event(s) for s in range(0, 100)))
    write_segment(directory / "execution.jsonl.2.gz", b"".join(event(s) for s in range(100, 200)))
    write_segment(directory / "execution.jsonl.1", b"".join(event(s) for s in range(200, 300)))
    (directory / LOG_FILE_NAME).write_bytes(b"".join(event(s) for s in range(300, 310)))
    summary = fold_session("s1", tmp_path / "logs")
    assert summary.entries == 310 and summary.tokens_used == 310 * 5
    assert summary.max_seq == 309 and summary.seq_missing == 0 and summary.malformed == 0
    assert [p.name for p in summary.files] == [
        "execution.jsonl.3.gz",
        "execution.jsonl.2.gz",
        "execution.jsonl.1",
        LOG_FILE_NAME,
    ]
    # The writer's next seq comes from the newest file that has one.
    assert tail_max_seq(directory / "execution.jsonl.2.gz") == 199
    assert tail_max_seq(directory / "execution.jsonl.1") == 299


def test_a_segment_deleted_by_the_rotator_is_counted_as_missing_events(tmp_path: Path) -> None:
    directory = session(tmp_path)
    write_segment(directory / "execution.jsonl-20260101.gz", b"".join(event(s) for s in range(50)))
    # execution.jsonl-20260102 (seq 50..79) was removed by `rotate 1`.
    write_segment(directory / "execution.jsonl-20260103", b"".join(event(s) for s in range(80, 90)))
    (directory / LOG_FILE_NAME).write_bytes(event(90))
    summary = fold_session("s1", tmp_path / "logs")
    assert summary.entries == 61
    assert summary.seq_missing == 30 and summary.seq_gaps == 1


def test_a_damaged_gzip_segment_is_read_up_to_the_damage_and_counted(tmp_path: Path) -> None:
    directory = session(tmp_path)
    whole = gzip.compress(b"".join(event(s) for s in range(1000)))
    (directory / "execution.jsonl.2.gz").write_bytes(whole[: len(whole) // 2])
    write_segment(directory / "execution.jsonl.1", event(1000))
    live = directory / LOG_FILE_NAME
    live.write_bytes(event(1001))
    oldest = (directory / "execution.jsonl.2.gz").lstat()
    tailer = Tailer(live, checkpoint=Checkpoint(oldest.st_dev, oldest.st_ino, 0))
    fold = Fold(0)
    tailer.fold_into(fold)
    summary = fold.summary()
    assert tailer.stats()["corrupt_segments"] == 1
    assert summary["max_seq"] == 1001
    assert 0 < summary["entries"] < 1002 and summary["seq_missing"] > 0


def test_a_gzip_segment_checkpoint_resumes_mid_stream(tmp_path: Path) -> None:
    directory = session(tmp_path)
    write_segment(directory / "execution.jsonl.1.gz", b"".join(event(s) for s in range(10)))
    live = directory / LOG_FILE_NAME
    live.write_bytes(event(10))
    seg = (directory / "execution.jsonl.1.gz").lstat()
    tailer = Tailer(live, checkpoint=Checkpoint(seg.st_dev, seg.st_ino, 0))
    first = tailer.read_lines(max_lines=4)
    assert [orjson.loads(line)["seq"] for line in first] == [0, 1, 2, 3]
    checkpoint = tailer.checkpoint()
    assert checkpoint is not None and checkpoint.offset == sum(len(event(s)) for s in range(4))
    resumed = Tailer(live, checkpoint=checkpoint)
    assert [orjson.loads(line)["seq"] for line in drain(resumed)] == list(range(4, 11))


def test_symlinked_and_fifo_segments_are_ignored(tmp_path: Path) -> None:
    directory = session(tmp_path)
    elsewhere = tmp_path / "secret.jsonl"
    elsewhere.write_bytes(event(0, tokens=999))
    (directory / "execution.jsonl.2").symlink_to(elsewhere)
    os.mkfifo(directory / "execution.jsonl.1")
    (directory / LOG_FILE_NAME).write_bytes(event(0))
    assert rotated_segments(directory) == []
    summary = fold_session("s1", tmp_path / "logs")
    assert summary.tokens_used == 5


def _compress_in_place(path: Path) -> None:
    """What logrotate's ``compress`` does: a new ``.gz`` file, the original removed."""
    Path(f"{path}.gz").write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()


def test_a_reader_paused_across_compressed_rotations_reads_every_event(tmp_path: Path) -> None:
    """logrotate (create, compress) twice while a reader sleeps: the file it
    holds is gone from the directory (now ``.2.gz``, a new inode), yet it finds
    its place by the file's first bytes and reads ``.1.gz`` before the new file."""
    directory = session(tmp_path)
    live = directory / LOG_FILE_NAME
    live.write_bytes(b"".join(event(s) for s in range(10)))
    tailer = Tailer(live)
    assert len(tailer.read_lines(max_lines=4)) == 4
    with open(live, "ab") as f:
        f.write(b"".join(event(s) for s in range(10, 20)))
    live.rename(directory / "execution.jsonl.1")
    _compress_in_place(directory / "execution.jsonl.1")
    live.write_bytes(b"".join(event(s) for s in range(20, 30)))
    (directory / "execution.jsonl.1.gz").rename(directory / "execution.jsonl.2.gz")
    live.rename(directory / "execution.jsonl.1")
    _compress_in_place(directory / "execution.jsonl.1")
    live.write_bytes(b"".join(event(s) for s in range(30, 35)))
    seqs = [orjson.loads(line)["seq"] for line in drain(tailer)]
    assert seqs == list(range(4, 35))
    assert tailer.stats()["compressed_segments"] == 1


def test_copytruncate_while_a_reader_is_behind_loses_nothing(tmp_path: Path) -> None:
    """logrotate copytruncate (and compress) while a reader has read only part
    of the file: it reads the rest from the copy, then the file from its start."""
    directory = session(tmp_path)
    live = directory / LOG_FILE_NAME
    live.write_bytes(b"".join(event(s) for s in range(10)))
    tailer = Tailer(live)
    assert len(tailer.read_lines(max_lines=3)) == 3
    with open(live, "ab") as f:
        f.write(b"".join(event(s) for s in range(10, 20)))
    shutil.copyfile(live, directory / "execution.jsonl.1")
    with open(live, "r+b") as f:
        f.truncate(0)
    _compress_in_place(directory / "execution.jsonl.1")
    with open(live, "ab") as f:
        f.write(b"".join(event(s) for s in range(20, 25)))
    seqs = [orjson.loads(line)["seq"] for line in drain(tailer)]
    assert seqs == list(range(3, 25))
    stats = tailer.stats()
    assert (stats["truncations"], stats["copies_followed"]) == (1, 1)
