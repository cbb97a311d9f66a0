"""The native Tailer on real files, with real writers and real rotation (contract 5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from conftest import run_py, wait_for
from sigil._native import AppendWriter, Checkpoint, Tailer
from ticker import Ticker

NEVER = 3600.0


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def drain(tailer: Tailer) -> list[bytes]:
    """Everything the tailer has now (several batches if need be)."""
    out: list[bytes] = []
    while True:
        batch = tailer.read_lines()
        if not batch:
            return out
        out += batch


def seq_of(line: bytes) -> int:
    return orjson.loads(line)["seq"]


# ---------------------------------------------------------------------------
# Following a path


def test_waits_for_a_missing_file(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    t = Tailer(path)
    assert t.read_lines() == []
    assert t.checkpoint() is None
    assert t.wait(0.05) is False
    timer = threading.Timer(0.1, lambda: path.write_bytes(b"first\n"))
    timer.start()
    try:
        assert t.wait(30) is True
    finally:
        timer.join()
    wait_for("the first line", lambda: drain(t) == [b"first"])
    assert t.checkpoint() is not None


def test_waits_for_a_missing_directory(tmp_path: Path):
    path = tmp_path / "sessions" / "s1" / "execution.jsonl"
    t = Tailer(path)
    assert t.read_lines() == []
    assert t.wait(0.05) is False
    with AppendWriter(path) as w:
        w.write("created later")
    assert t.wait(30) is True
    assert drain(t) == [b"created later"]


def test_a_line_is_handed_out_only_once_its_newline_arrives(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"")
    t = Tailer(path)
    append(path, b'{"half": ')
    assert t.read_lines() == []
    assert t.read_lines() == []
    append(path, b'"way"}')
    assert t.read_lines() == []
    append(path, b'\n{"next"')
    assert t.read_lines() == [b'{"half": "way"}']
    assert t.read_lines() == []
    # one byte at a time
    for b in b": 1}\n":
        assert t.read_lines() == []
        append(path, bytes([b]))
    assert t.read_lines() == [b'{"next": 1}']
    assert t.read_lines() == []
    assert t.stats()["lines"] == 2


def test_read_lines_honours_max_lines_without_losing_any(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(1000)))
    t = Tailer(path)
    got: list[bytes] = []
    while batch := t.read_lines(max_lines=7):
        assert len(batch) <= 7
        got += batch
    assert got == [b"line %d" % i for i in range(1000)]


def test_read_entries_parses_and_reports_offsets(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    good = (
        b'{"timestamp":"t","session_id":"s","event_type":"x","component":"c",'
        b'"message":"m","tokens":3,"metadata":{},"seq":0}'
    )
    path.write_bytes(good + b"\nnot json\n" + good.replace(b'"seq":0', b'"seq":1') + b"\n")
    entries, bad = Tailer(path).read_entries()
    assert [(e.seq, e.offset, e.tokens) for e in entries] == [(0, 0, 3), (1, len(good) + 10, 3)]
    assert len(bad) == 1 and bad[0].offset == len(good) + 1 and "invalid JSON" in bad[0].reason
    assert bad[0].kind == "malformed"


def test_start_at_end_skips_what_is_there(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"old 1\nold 2\npart")
    t = Tailer(path, start="end")
    assert t.read_lines() == []
    append(path, b"ial\nnew 1\n")
    assert drain(t) == [b"new 1"]  # the rest of the line it joined mid-way is not handed out
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"old\n")
    t2 = Tailer(clean, start="end")
    append(clean, b"new\n")
    assert drain(t2) == [b"new"]


def test_start_at_end_reads_a_file_created_after_the_start_from_its_beginning(tmp_path: Path):
    """'end' skips what existed when the tailer started. A file that did not exist
    yet holds only new lines: skipping them would lose, depending only on when the
    first poll happens, the events written before it (session_start first of all)."""
    later = tmp_path / "later.jsonl"
    t = Tailer(later, start="end")
    assert t.read_lines() == []
    later.write_bytes(b"first\n")
    append(later, b"second\n")
    assert drain(t) == [b"first", b"second"]


def test_bad_arguments_are_value_errors(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    with pytest.raises(ValueError):
        Tailer(path, start="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Tailer(path, max_line_bytes=0)
    for args in [(1, -2, 3), (1, 2, 3, 4, 2**40), ("a", 2, 3), (1, 2, 2**63), (-1, 2, 3)]:
        with pytest.raises(ValueError):
            Checkpoint(*args)  # type: ignore[arg-type]
    # the position is a typed Checkpoint, never a tuple read by index
    with pytest.raises(TypeError):
        Tailer(path, checkpoint=(1, 2, 3))  # type: ignore[arg-type]
    t = Tailer(path)
    for timeout in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            t.wait(timeout)


# ---------------------------------------------------------------------------
# Rotation and truncation


def test_rotation_by_rename_then_recreate(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    old = tmp_path / "execution_1.jsonl"
    path.write_bytes(b"1\n2\n")
    t = Tailer(path)
    assert drain(t) == [b"1", b"2"]
    append(path, b"3\n")
    path.rename(old)
    append(old, b"4\n")  # the writer finishes the old file after the rename
    path.write_bytes(b"")  # an empty new file: the old one may still be written
    append(old, b"5\n")
    assert drain(t) == [b"3", b"4", b"5"]
    assert t.stats()["rotations"] == 0
    append(path, b"6\n")
    assert drain(t) == [b"6"]
    assert t.stats()["rotations"] == 1
    append(path, b"7\n")
    assert drain(t) == [b"7"]


def test_a_partial_line_at_rotation_is_completed_from_the_old_file(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    old = tmp_path / "execution_1.jsonl"
    path.write_bytes(b"a\nhal")
    t = Tailer(path)
    assert drain(t) == [b"a"]
    path.rename(old)
    append(old, b"f\n")
    path.write_bytes(b"new\n")
    assert drain(t) == [b"half", b"new"]
    assert t.stats()["torn_lines"] == 0


ROTATING_WRITER = """
import json, os, sys, time
from sigil._native import AppendWriter
path, stop = sys.argv[1], sys.argv[2]
w = AppendWriter(path, buffer_bytes=1 << 16, flush_interval=0.002, fsync="never",
                 session_id="rot")
i = 0
while not os.path.exists(stop) and i < 400_000:
    for _ in range(20):
        w.write_event("rot", "step_complete", "c", "m", tokens=i % 97)
        i += 1
    time.sleep(0.0005)
w.close()
print(json.dumps({"written": i, "stats": dict(w.stats())}))
"""


def test_renamed_and_recreated_100_times_while_a_subprocess_writes(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    stop = tmp_path / "stop"
    proc = subprocess.Popen(
        [sys.executable, "-c", ROTATING_WRITER, str(path), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t = Tailer(path)
    seqs: list[int] = []
    rotations = 0
    deadline = time.monotonic() + 60
    try:
        while rotations < 100:
            assert time.monotonic() < deadline, f"only {rotations} rotations in 60 s"
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            seqs += [seq_of(line) for line in t.read_lines()]
            cp = t.checkpoint()
            try:
                st = os.stat(path)
            except FileNotFoundError:
                t.wait(0.05)
                continue
            # Rotate once the tailer follows the file now at the path (it may not
            # have read all of it: it keeps reading the renamed file by descriptor).
            if cp is not None and (cp.dev, cp.ino) == (st.st_dev, st.st_ino) and st.st_size > 0:
                os.rename(path, tmp_path / f"execution_{rotations:03d}.jsonl")
                if rotations % 2 == 0:  # recreate it ourselves; otherwise the writer does
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))
                rotations += 1
            else:
                t.wait(0.05)
    finally:
        stop.touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = orjson.loads(out)
    written = report["written"]
    assert report["stats"]["reopens"] == 100
    wait_deadline = time.monotonic() + 30
    while len(seqs) < written and time.monotonic() < wait_deadline:
        seqs += [seq_of(line) for line in t.read_lines()]
        if len(seqs) < written:
            t.wait(0.05)
    assert len(seqs) == written, f"{len(seqs)} lines read of {written}"
    assert seqs == list(range(written))  # every line exactly once, in order
    stats = t.stats()
    assert stats["rotations"] == 100
    assert stats["truncations"] == 0
    assert stats["torn_lines"] == 0
    # and the files hold exactly what was written
    on_disk: list[int] = []
    for k in range(100):
        on_disk += [seq_of(x) for x in (tmp_path / f"execution_{k:03d}.jsonl").read_bytes().split()]
    on_disk += [seq_of(x) for x in path.read_bytes().split()]
    assert on_disk == list(range(written))


def test_truncation_restarts_at_zero_and_is_counted(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"aaaa\nbbbb\ncccc\n")
    t = Tailer(path)
    assert drain(t) == [b"aaaa", b"bbbb", b"cccc"]
    os.truncate(path, 0)
    assert drain(t) == []
    append(path, b"new\n")
    assert drain(t) == [b"new"]
    assert t.stats()["truncations"] == 1
    # truncated while a partial line was pending
    append(path, b"half a li")
    assert drain(t) == []
    os.truncate(path, 0)
    append(path, b"x\n")
    assert drain(t) == [b"x"]
    s = t.stats()
    assert (s["truncations"], s["torn_lines"]) == (2, 1)


def test_copytruncate_under_a_live_writer(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    w = AppendWriter(path, flush_interval=NEVER, buffer_bytes=1 << 20, session_id="ct")

    def log(seqs: range) -> None:
        for i in seqs:
            assert w.write_event("ct", "step_complete", "c", f"event {i}") == i
        w.flush()

    log(range(10))
    t = Tailer(path)
    assert [seq_of(x) for x in drain(t)] == list(range(10))

    # logrotate's copytruncate: copy, then truncate in place; the writer's O_APPEND
    # descriptor continues at the new end.
    shutil.copyfile(path, tmp_path / "execution.jsonl.1")
    with open(path, "r+b") as f:
        f.truncate(0)
    log(range(10, 15))  # shorter than what the tailer had read
    assert [seq_of(x) for x in drain(t)] == list(range(10, 15))
    assert t.stats()["truncations"] == 1

    shutil.copyfile(path, tmp_path / "execution.jsonl.2")
    with open(path, "r+b") as f:
        f.truncate(0)
    log(range(15, 60))  # refilled past the old offset before the tailer looked
    assert [seq_of(x) for x in drain(t)] == list(range(15, 60))
    s = t.stats()
    assert s["truncations"] == 2
    assert s["fingerprint_changes"] == 1
    w.close()
    copies = (tmp_path / "execution.jsonl.1").read_bytes() + (
        tmp_path / "execution.jsonl.2"
    ).read_bytes()
    assert [seq_of(x) for x in copies.split(b"\n") if x] == list(range(15))


# ---------------------------------------------------------------------------
# Oversize lines


def test_oversize_lines_are_skipped_and_counted(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    exact = b"e" * 100
    path.write_bytes(b"a\n" + b"x" * 10_000 + b"\n" + exact + b"\n" + b"y" * 101 + b"\nb\n")
    t = Tailer(path, max_line_bytes=100)
    assert drain(t) == [b"a", exact, b"b"]
    assert t.stats()["oversize_lines"] == 2
    _, bad = Tailer(path, max_line_bytes=100).read_entries()
    oversize = [(m.offset, m.reason) for m in bad if m.kind == "oversize"]
    assert [off for off, _ in oversize] == [2, 2 + 10_001 + 101]
    assert "10000 bytes" in oversize[0][1]


def test_an_oversize_line_arriving_in_pieces_is_never_held(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    out = run_py(
        """
        import json, resource, sys
        from sigil._native import Tailer
        path = sys.argv[1]
        with open(path, "wb") as f:
            f.write(b'{"small":1}\\n')
        t = Tailer(path, max_line_bytes=1024)
        assert t.read_lines() == [b'{"small":1}']
        chunk = b"x" * (1 << 20)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with open(path, "ab", buffering=0) as f:
            for _ in range(40):
                f.write(chunk)
                assert t.read_lines() == []
            f.write(b'\\n{"after":1}\\n')
        lines = []
        while batch := t.read_lines():
            lines += batch
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"lines": [x.decode() for x in lines], "growth_kib": peak - base,
                          "stats": dict(t.stats())}))
        """,
        path,
    )
    report = orjson.loads(out.stdout)
    assert report["lines"] == ['{"after":1}']
    assert report["stats"]["oversize_lines"] == 1
    # a 40 MiB line went through; holding it would cost 40 MiB
    assert report["growth_kib"] < 12 * 1024, report


# ---------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_restores_with_and_without_a_fingerprint(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"1\n2\npart")
    t = Tailer(path)
    assert drain(t) == [b"1", b"2"]
    cp = t.checkpoint()
    assert cp is not None and cp.fp_len > 0
    st = os.stat(path)
    # the unfinished line is read again
    assert (cp.dev, cp.ino, cp.offset) == (st.st_dev, st.st_ino, 4)
    assert cp == Checkpoint(cp.dev, cp.ino, cp.offset, cp.fp_len, cp.fp_crc)
    assert len({cp, t.checkpoint()}) == 1  # frozen and hashable: a key for saved positions
    append(path, b"ial\n3\n")
    for checkpoint in (cp, Checkpoint(cp.dev, cp.ino, cp.offset)):
        t2 = Tailer(path, checkpoint=checkpoint)
        assert drain(t2) == [b"partial", b"3"]
        assert t2.stats()["checkpoint_restored"] is True
    # a checkpoint's file that was rotated away is found beside the path and finished first
    path.rename(tmp_path / "log.jsonl.1")
    path.write_bytes(b"4\n")
    t3 = Tailer(path, checkpoint=cp)
    assert drain(t3) == [b"partial", b"3", b"4"]
    assert t3.stats()["rotations"] == 1


def test_a_checkpoint_for_a_file_that_is_gone_starts_over(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"old\n")
    t = Tailer(path)
    drain(t)
    cp = t.checkpoint()
    assert cp is not None
    other = tmp_path / "unrelated"
    other.write_bytes(b"keep the old inode busy\n")
    os.replace(other, path)  # a different file (different inode) at the path
    t2 = Tailer(path, checkpoint=cp, start="end")
    assert drain(t2) == [b"keep the old inode busy"]
    assert t2.stats()["checkpoint_restored"] is False


def test_a_checkpoint_whose_inode_was_reused_is_not_trusted(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    first = b"".join(b"first file, line %d\n" % i for i in range(5))
    path.write_bytes(first)
    t = Tailer(path)
    assert len(drain(t)) == 5
    cp = t.checkpoint()
    assert cp is not None and cp.offset == len(first)
    del t
    second = b"".join(b"SECOND file with other content, line %d\n" % i for i in range(10))
    assert len(second) > len(first)  # the size check alone would not notice
    # A different file with the same (dev, ino): ext4 hands a freed inode to the
    # next file created; failing that, rewrite the same inode in place.
    for _ in range(20):
        path.unlink()
        path.write_bytes(second)
        if os.stat(path).st_ino == cp.ino:
            break
    else:
        with open(path, "r+b") as f:
            f.write(second)
    assert (os.stat(path).st_dev, os.stat(path).st_ino) == (cp.dev, cp.ino)
    assert path.read_bytes() == second

    t2 = Tailer(path, checkpoint=cp)
    assert drain(t2) == second.splitlines()  # from the start, not from the old offset
    assert t2.stats()["checkpoint_restored"] is False
    # a checkpoint without a fingerprint is trusted as given
    t3 = Tailer(path, checkpoint=Checkpoint(cp.dev, cp.ino, cp.offset))
    assert t3.stats()["checkpoint_restored"] is True
    assert drain(t3) != second.splitlines()


# ---------------------------------------------------------------------------
# wait()


def test_wait_returns_true_soon_after_an_append_and_false_on_timeout(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"x\n")
    t = Tailer(path)
    assert t.wait(30) is True  # unread data: at once
    drain(t)
    start = time.monotonic()
    assert t.wait(0.2) is False
    assert time.monotonic() - start >= 0.15
    timer = threading.Timer(0.1, append, (path, b"y\n"))
    start = time.monotonic()
    timer.start()
    try:
        assert t.wait(30) is True
    finally:
        timer.join()
    assert time.monotonic() - start < 10  # woken by the append, not by the 30 s timeout
    assert drain(t) == [b"y"]
    # a rotation wakes it too
    path.rename(tmp_path / "log.jsonl.1")
    timer = threading.Timer(0.1, path.write_bytes, (b"z\n",))
    start = time.monotonic()
    timer.start()
    try:
        assert t.wait(30) is True
    finally:
        timer.join()
    assert time.monotonic() - start < 10
    assert drain(t) == [b"z"]


def test_wait_releases_the_gil(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"")
    t = Tailer(path)
    with Ticker() as ticker:
        start = time.monotonic()
        assert t.wait(1.0) is False
        end = time.monotonic()
    assert end - start >= 0.9
    during = ticker.between(start + 0.2, end - 0.2)
    # The other thread ran while wait() blocked (it would be frozen if wait held the GIL).
    assert len(during) > 20, f"{len(during)} ticks during a {end - start:.2f}s wait"
