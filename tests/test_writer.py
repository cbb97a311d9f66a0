"""The native AppendWriter on real files and in real processes (contracts 3, 4, 8, 10).

No mocks: permissions are checked under real umasks, O_APPEND through
/proc/<pid>/fdinfo, a full disk through RLIMIT_FSIZE, a crash through SIGKILL.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import run_py, wait_for
from sigil._native import AppendWriter, fold_file, parse_bytes, parse_lines, tail_max_seq

NEVER = 3600.0  # a flush interval that never elapses during a test


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def events(path: Path) -> list[dict[str, Any]]:
    """Every line of the file as a dict; fails if any line is malformed."""
    entries, bad = parse_bytes(read(path))
    assert bad == [], bad
    return [e.to_dict() for e in entries]


# ---------------------------------------------------------------------------
# Opening: permissions, O_APPEND, torn tails, symlinks


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o777])
def test_file_is_0600_o_append_and_dirs_0700_whatever_the_umask(tmp_path: Path, umask: int):
    target = tmp_path / "a" / "b" / "c" / "execution.jsonl"
    out = run_py(
        """
        import os, sys
        os.umask(int(sys.argv[2]))
        from sigil._native import AppendWriter
        path = sys.argv[1]
        w = AppendWriter(path, flush_interval=3600)
        # The writer's own descriptor for the file: its flags say O_APPEND.
        flags = None
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == path:
                    with open(f"/proc/self/fdinfo/{fd}") as info:
                        for line in info:
                            if line.startswith("flags:"):
                                flags = int(line.split()[1], 8)
            except OSError:
                pass
        w.write("x")
        w.close()
        print(flags)
        """,
        target,
        umask,
    )
    flags = int(out.stdout.strip())
    assert flags & os.O_APPEND, f"flags {flags:o} lack O_APPEND"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert target.read_bytes() == b"x\n"


def test_an_existing_file_with_loose_permissions_is_made_0600(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"old\n")
    path.chmod(0o644)
    with AppendWriter(path) as w:
        w.write("new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"old\nnew\n"


def test_a_torn_tail_is_repaired_on_open(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"whole":1}\n{"torn')
    w = AppendWriter(path)
    w.write(b"next")
    w.close()
    assert path.read_bytes() == b'{"whole":1}\n{"torn\nnext\n'
    assert w.stats()["torn_tails_repaired"] == 1


@pytest.mark.parametrize("content", [b"", b"whole\n"])
def test_a_clean_file_gets_no_extra_newline(tmp_path: Path, content: bytes):
    path = tmp_path / "log.jsonl"
    path.write_bytes(content)
    with AppendWriter(path) as w:
        w.write("next")
    assert path.read_bytes() == content + b"next\n"
    assert w.stats()["torn_tails_repaired"] == 0


def test_a_symlink_in_place_of_the_log_is_refused(tmp_path: Path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious\n")
    link = tmp_path / "execution.jsonl"
    link.symlink_to(target)
    with pytest.raises(OSError, match="symlink"):
        AppendWriter(link)
    assert target.read_bytes() == b"precious\n"
    assert link.is_symlink()


def test_a_symlink_swapped_in_after_open_is_refused_and_the_data_kept(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    w = AppendWriter(path, flush_interval=NEVER, buffer_bytes=1 << 20)
    w.write("one")
    w.flush()
    path.rename(tmp_path / "rotated.jsonl")
    path.symlink_to(target)
    w.write("two")
    with pytest.raises(OSError, match="symlink"):
        w.flush()
    assert target.read_bytes() == b""
    path.unlink()
    w.close()  # the path is free again: the pending line goes to a new file
    assert path.read_bytes() == b"two\n"
    assert (tmp_path / "rotated.jsonl").read_bytes() == b"one\n"
    assert target.read_bytes() == b""


# ---------------------------------------------------------------------------
# write(): input forms


def test_str_and_bytes_lines_and_trailing_newlines(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    with AppendWriter(path) as w:
        w.write("héllo ✓")
        w.write(b"raw bytes")
        w.write("with newline\n")
        w.write(b"bytes newline\n")
        w.write("cr is kept\r")
    assert path.read_bytes() == (
        "héllo ✓\nraw bytes\nwith newline\nbytes newline\ncr is kept\r\n".encode()
    )
    assert w.stats()["lines"] == 5
    assert w.stats()["lines_written"] == 5


@pytest.mark.parametrize("bad", ["a\nb", b"a\nb", "two\n\n", b"\nlead"])
def test_an_embedded_newline_is_a_value_error(tmp_path: Path, bad: str | bytes):
    path = tmp_path / "log.jsonl"
    with AppendWriter(path) as w:
        w.write("before")
        with pytest.raises(ValueError, match="newline"):
            w.write(bad)
        w.write("after")
    assert path.read_bytes() == b"before\nafter\n"


def test_write_rejects_other_types(tmp_path: Path):
    with AppendWriter(tmp_path / "log.jsonl") as w, pytest.raises(TypeError):
        w.write(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# close(), context manager


def test_close_is_idempotent_and_write_after_close_is_a_value_error(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    w = AppendWriter(path, flush_interval=NEVER, buffer_bytes=1 << 20)
    w.write("one")
    assert not w.closed
    w.close()
    assert w.closed
    w.close()
    w.close()
    assert path.read_bytes() == b"one\n"
    with pytest.raises(ValueError, match="closed"):
        w.write("two")
    with pytest.raises(ValueError, match="closed"):
        w.write_event("s", "x", "c", "m")
    assert path.read_bytes() == b"one\n"


def test_context_manager_closes_and_flushes_also_on_error(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    with AppendWriter(path, flush_interval=NEVER, buffer_bytes=1 << 20) as w:
        w.write("inside")
        assert path.read_bytes() == b""
    assert w.closed
    assert path.read_bytes() == b"inside\n"

    with (
        pytest.raises(RuntimeError, match="boom"),
        AppendWriter(path, flush_interval=NEVER, buffer_bytes=1 << 20) as w2,
    ):
        w2.write("before the error")
        raise RuntimeError("boom")
    assert w2.closed
    assert path.read_bytes() == b"inside\nbefore the error\n"


def test_garbage_collection_closes_the_writer(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    w = AppendWriter(path, flush_interval=NEVER, buffer_bytes=1 << 20)
    w.write("kept")
    del w
    wait_for("the dropped writer's line", lambda: read(path) == b"kept\n")


# ---------------------------------------------------------------------------
# Flushing and fsync policy


@pytest.mark.parametrize(
    ("policy", "after_flush", "after_close"),
    [("always", 1, 1), ("interval", 1, 1), ("never", 0, 1)],
)
def test_flush_and_close_fsync_per_policy(
    tmp_path: Path, policy: str, after_flush: int, after_close: int
):
    path = tmp_path / "log.jsonl"
    w = AppendWriter(path, flush_interval=NEVER, buffer_bytes=1 << 20, fsync=policy)  # type: ignore[arg-type]
    for i in range(3):
        w.write(f"line {i}")
    assert w.stats()["flushes"] == 0
    assert w.stats()["buffered_bytes"] == 3 * len("line 0\n")
    w.flush()
    s = w.stats()
    assert (s["flushes"], s["lines_written"], s["fsyncs"]) == (1, 3, after_flush)
    assert s["buffered_bytes"] == 0
    w.flush()  # nothing new: no write, no fsync
    assert (w.stats()["flushes"], w.stats()["fsyncs"]) == (1, after_flush)
    w.close()  # close always leaves the data durable
    assert w.stats()["fsyncs"] == after_close
    assert path.read_bytes() == b"line 0\nline 1\nline 2\n"


def check_fsync_policy_of_the_background_flushes(tmp_path: Path) -> None:
    writers = {
        policy: AppendWriter(
            tmp_path / f"{policy}.jsonl", buffer_bytes=64, flush_interval=0.01, fsync=policy
        )
        for policy in ("always", "interval", "never")
    }
    for w in writers.values():
        for i in range(50):
            w.write(f"event number {i:04d}")
    for w in writers.values():
        wait_for("background flushes", lambda w=w: w.stats()["lines_written"] == 50)
    # always: each flush is followed by its fsync. stats() is a live view: the
    # last flush's write may be counted while its fsync still runs, so the check
    # is that the two meet once everything is written (a flush that skipped its
    # fsync would never be caught up, and the wait would fail).
    always = wait_for(
        "every flush's fsync",
        lambda: (s := writers["always"].stats())["fsyncs"] == s["flushes"] and s,
    )
    assert always["flushes"] >= 1
    # interval: the background thread fsyncs dirty data once the interval passed
    wait_for("an interval fsync", lambda: writers["interval"].stats()["fsyncs"] >= 1)
    assert writers["never"].stats()["fsyncs"] == 0
    for w in writers.values():
        w.close()
    assert writers["never"].stats()["fsyncs"] == 1


def test_fsync_policy_of_the_background_flushes(tmp_path: Path):
    check_fsync_policy_of_the_background_flushes(tmp_path)


SLOW_FSYNC_POLICY = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_writer import check_fsync_policy_of_the_background_flushes
check_fsync_policy_of_the_background_flushes(Path(sys.argv[1]))
"""


def test_fsync_policy_of_the_background_flushes_with_a_slow_disk(tmp_path: Path):
    """The same checks while every fsync takes 200 ms (a loaded machine, made
    certain): stats() is read while the background thread is between its write
    and its fsync, so a check must not assume a quiet writer."""
    from fsfault import run_faulty

    run_faulty(SLOW_FSYNC_POLICY, tmp_path, Path(__file__).parent, FSFAULT_SLEEP_MS="200")


def test_background_flush_within_the_interval_without_flush(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    w = AppendWriter(path, buffer_bytes=1 << 20, flush_interval=0.05)
    w.write("by the clock")
    wait_for("the interval flush", lambda: read(path) == b"by the clock\n")
    w.write("and again")
    wait_for("the second interval flush", lambda: read(path).endswith(b"and again\n"))
    assert w.stats()["flushes"] >= 2
    w.close()


def test_a_full_buffer_is_flushed_without_waiting_for_the_interval(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    w = AppendWriter(path, buffer_bytes=200, flush_interval=NEVER)
    w.write("small")
    assert w.stats()["flushes"] == 0  # below buffer_bytes: stays queued
    for i in range(20):
        w.write(f"filler line {i:02d}")
    wait_for("the size-triggered flush", lambda: read(path).startswith(b"small\n"))
    w.close()
    assert read(path).count(b"\n") == 21


FLUSHER_POLICY = """
import os, sys
from sigil._native import AppendWriter
before = set(os.listdir("/proc/self/task"))
w = AppendWriter(sys.argv[1])
new = set(os.listdir("/proc/self/task")) - before
print(os.sched_getscheduler(0), *(os.sched_getscheduler(int(t)) for t in new))
w.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")
def test_the_flush_thread_never_preempts_the_logging_thread(tmp_path: Path):
    """The flusher runs as SCHED_BATCH: woken once per buffer on the logging
    thread's CPU, a normal thread preempted the caller of log_event at each
    wake-up (the caller's wall time held the flusher's). The caller's own
    policy is left as it was."""
    out = run_py(FLUSHER_POLICY, tmp_path / "log.jsonl").stdout.split()
    assert [int(p) for p in out] == [os.SCHED_OTHER, os.SCHED_BATCH]


def test_write_does_not_wait_for_the_disk(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    w = AppendWriter(path, buffer_bytes=1 << 20, flush_interval=NEVER, fsync="always")
    for i in range(10_000):
        w.write(f"queued {i}")
    # Nothing reached the file yet: write() only queued (one syscall per flush, not per line).
    assert read(path) == b""
    assert w.stats()["flushes"] == 0
    w.flush()
    s = w.stats()
    assert (s["flushes"], s["fsyncs"], s["lines_written"]) == (1, 1, 10_000)
    w.close()


RACING_FLUSHES = """
import sys
from sigil._native import AppendWriter
w = AppendWriter(sys.argv[1], flush_interval=0.001, buffer_bytes=64, fsync="never")
for i in range(20_000):
    w.write("x" * 40)
    w.flush()
    w.stats()
w.close()
print(w.stats()["lines_written"])
"""


def test_flush_and_stats_racing_the_background_thread_do_not_deadlock(tmp_path: Path):
    """flush()/stats() while the background thread wakes every millisecond (runs in
    well under a second when correct; a lock-order inversion hangs it)."""
    path = tmp_path / "log.jsonl"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RACING_FLUSHES, str(path)],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("deadlock: flush()/stats() racing the background flush thread hung")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == 20_000
    assert path.read_bytes().count(b"\n") == 20_000


# ---------------------------------------------------------------------------
# write_event


def test_write_event_json_shape(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    before = datetime.now(UTC)
    with AppendWriter(path, start_seq=41, session_id="sess") as w:
        assert w.next_seq == 41
        seq = w.write_event(
            "sess",
            "step_complete",
            "routing",
            'a "quoted" \\ message\nwith\ttabs, \x01 and ünïcødé ✓ 🚀',
            tokens=50,
            metadata=orjson.dumps({"intent": "lead", "n": [1, 2.5, None], "nested": {"k": True}}),
        )
        seq2 = w.write_event("sess", "token_consumption", "memory", "plain")
        seq3 = w.write_event(
            "sess", "x", "c", "m", tokens=2**53, timestamp="2026-01-11T10:15:32.123456"
        )
        assert w.next_seq == 44
    assert (seq, seq2, seq3) == (41, 42, 43)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3
    first = orjson.loads(lines[0])
    assert list(first) == [
        "timestamp",
        "session_id",
        "event_type",
        "component",
        "message",
        "tokens",
        "metadata",
        "seq",
    ]
    assert first["session_id"] == "sess"
    assert first["event_type"] == "step_complete"
    assert first["component"] == "routing"
    assert first["message"] == 'a "quoted" \\ message\nwith\ttabs, \x01 and ünïcødé ✓ 🚀'
    assert first["tokens"] == 50
    assert first["metadata"] == {"intent": "lead", "n": [1, 2.5, None], "nested": {"k": True}}
    assert first["seq"] == 41
    ts = datetime.fromisoformat(first["timestamp"])
    assert ts.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=5) <= ts <= datetime.now(UTC) + timedelta(seconds=5)
    second = orjson.loads(lines[1])
    assert (second["metadata"], second["tokens"], second["seq"]) == ({}, 0, 42)
    third = orjson.loads(lines[2])
    assert third["timestamp"] == "2026-01-11T10:15:32.123456"
    assert third["tokens"] == 2**53
    # the native parser reads back exactly what was written
    assert events(path)[0] == first


def test_write_event_rejects_bad_input_without_using_a_seq(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    with AppendWriter(path) as w:
        with pytest.raises(ValueError, match="tokens"):
            w.write_event("s", "x", "c", "m", tokens=-1)
        for meta in (b"[1]", b'"text"', b'{"a":\n1}', b"", b"{"):
            with pytest.raises(ValueError, match="metadata"):
                w.write_event("s", "x", "c", "m", metadata=meta)
        assert w.next_seq == 0
        assert w.write_event("s", "x", "c", "m") == 0
    assert [e["seq"] for e in events(path)] == [0]


def test_write_event_never_writes_a_malformed_line(tmp_path: Path):
    """Contract 1: what the writer writes is one JSON object per line. Metadata that
    only looks like an object (starts with '{', ends with '}') must be refused."""
    path = tmp_path / "log.jsonl"
    accepted = []
    with AppendWriter(path) as w:
        for meta in (b'{"a":}', b'{"a":1}{"b":2}', b'{"a":1},"seq":99,"x":{}', b'{"a":1,}'):
            try:
                w.write_event("s", "x", "c", "m", metadata=meta)
                accepted.append(meta)
            except ValueError:
                pass
    _, bad = parse_bytes(read(path))
    assert bad == [], f"invalid metadata {accepted} was written as malformed lines: {bad}"


# ---------------------------------------------------------------------------
# Threads


def test_threads_writing_events_concurrently(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    threads_n, per_thread = 8, 2_500
    w = AppendWriter(path, buffer_bytes=4096, flush_interval=0.001, fsync="never")
    returned: dict[int, list[int]] = {}
    start = threading.Barrier(threads_n)

    def work(t: int) -> None:
        start.wait()
        got = returned.setdefault(t, [])
        for i in range(per_thread):
            got.append(w.write_event("s", "step_complete", f"t{t}", f"{t}:{i}", tokens=i))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    w.close()
    evs = events(path)
    total = threads_n * per_thread
    assert len(evs) == total
    # seq is file order: 0..N-1 strictly increasing
    assert [e["seq"] for e in evs] == list(range(total))
    # every (thread, i) once, each thread's events in its own order
    seen: dict[int, list[int]] = {}
    for e in evs:
        t, i = map(int, e["message"].split(":"))
        assert e["component"] == f"t{t}" and e["tokens"] == i
        seen.setdefault(t, []).append(i)
        assert returned[t][i] == e["seq"]
    assert seen == {t: list(range(per_thread)) for t in range(threads_n)}
    assert w.stats()["lines_written"] == total


def test_threads_writing_raw_lines_never_interleave(tmp_path: Path):
    path = tmp_path / "log.jsonl"
    w = AppendWriter(path, buffer_bytes=1024, flush_interval=0.001)

    def work(t: int) -> None:
        for i in range(500):
            w.write(f"{t}:{i}:" + chr(ord("a") + t) * (1 + (i * 37) % 3000))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    w.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    seen = set()
    for line in lines[:-1]:
        t, i, body = line.decode().split(":")
        assert body == chr(ord("a") + int(t)) * (1 + (int(i) * 37) % 3000)
        seen.add((int(t), int(i)))
    assert len(lines) - 1 == len(seen) == 6 * 500


# ---------------------------------------------------------------------------
# Rotation of the file under the writer


def test_rename_while_writing_reopens_the_path(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    w = AppendWriter(path, buffer_bytes=1 << 20, flush_interval=NEVER)
    w.write("1")
    w.flush()
    path.rename(tmp_path / "execution_1.jsonl")
    w.write("2")
    w.flush()
    assert w.stats()["reopens"] == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "execution_1.jsonl").read_bytes() == b"1\n"
    assert path.read_bytes() == b"2\n"
    w.close()


def test_renames_followed_by_the_background_flush(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    w = AppendWriter(path, buffer_bytes=1 << 20, flush_interval=0.005, session_id="s")
    for k in range(5):
        w.write_event("s", "x", "c", f"before rotation {k}")
        wait_for("the line in the live file", lambda: path.exists() and read(path) != b"")
        path.rename(tmp_path / f"execution_{k}.jsonl")
    w.write_event("s", "x", "c", "last")
    wait_for("the new live file", lambda: read(path) != b"")
    w.close()
    assert w.stats()["reopens"] == 5
    seqs = []
    for k in range(5):
        seqs += [e["seq"] for e in events(tmp_path / f"execution_{k}.jsonl")]
    seqs += [e["seq"] for e in events(path)]
    assert seqs == list(range(6))


# ---------------------------------------------------------------------------
# A real full disk: RLIMIT_FSIZE

DISK_FULL = """
import json, os, resource, signal, sys, time
from sigil._native import AppendWriter

# Without this the kernel kills the process with SIGXFSZ at the limit.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
w = AppendWriter(path, buffer_bytes=256, flush_interval=0.005, fsync="interval",
                 max_buffer_bytes=4096, session_id="full")
report = {}
for i in range(10):
    w.write_event("full", "step_complete", "c", f"event {i}", tokens=1)
w.flush()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
# Room for a few more lines, then the file cannot grow: the next write is cut
# half-way through a line, the ones after fail with EFBIG.
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 1000, hard))
for i in range(10, 3000):
    w.write_event("full", "step_complete", "c", f"event {i}", tokens=1)
deadline = time.monotonic() + 10
while w.stats()["last_errno"] is None and time.monotonic() < deadline:
    time.sleep(0.005)
try:
    w.flush()
    report["flush_errno"] = None
except OSError as e:
    report["flush_errno"] = e.errno
report["failing"] = dict(w.stats())
report["size_at_limit"] = os.path.getsize(path)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
w.flush()
report["recovered"] = dict(w.stats())
for i in range(3000, 3010):
    w.write_event("full", "step_complete", "c", f"event {i}", tokens=1)
w.close()
report["closed"] = dict(w.stats())
print(json.dumps(report))
"""


def test_a_full_disk_drops_and_counts_and_recovers(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    report = orjson.loads(run_py(DISK_FULL, path).stdout)
    failing, recovered = report["failing"], report["recovered"]
    # write() never raised (the script would have failed) and the process lived.
    assert report["flush_errno"] == errno.EFBIG
    assert failing["last_errno"] == errno.EFBIG
    assert failing["dropped_lines"] > 0
    assert failing["lines"] == 3000
    assert failing["buffered_bytes"] > 0  # kept, to be written once the disk recovers
    dropped = failing["dropped_lines"]
    assert recovered["dropped_lines"] == dropped
    assert recovered["buffered_bytes"] == 0

    # The file stays parseable: the half-written line was completed.
    entries, bad = parse_bytes(path.read_bytes())
    assert bad == []
    notices = [i for i, e in enumerate(entries) if e.event_type == "events_dropped"]
    assert len(notices) == 1
    notice = entries[notices[0]]
    assert notice.session_id == "full"
    # Each dropped event carried 1 token: the notice carries them (contract 2).
    assert notice.metadata == {"dropped": dropped, "dropped_tokens": dropped, "errno": errno.EFBIG}
    assert notice.tokens == dropped
    assert str(dropped) in notice.message

    # What is missing is exactly what was counted, and the notice sits where it went missing.
    seqs = [e.seq for e in entries if e.event_type == "step_complete"]
    assert seqs == sorted(set(seqs))
    missing = sorted(set(range(3010)) - set(seqs))
    assert len(missing) == dropped
    assert missing == list(range(missing[0], missing[-1] + 1))  # one contiguous gap
    before = [e.seq for e in entries[: notices[0]] if e.seq is not None]
    after = [e.seq for e in entries[notices[0] + 1 :] if e.seq is not None]
    assert max(before) < missing[0] and min(after) > missing[-1]
    assert set(range(3000, 3010)) <= set(after)

    summary = fold_file(path)
    assert summary["dropped_events"] == dropped
    assert summary["malformed"] == 0
    assert (summary["seq_gaps"], summary["seq_missing"]) == (1, dropped)


FLAPPING_DISK = """
import json, os, resource, signal, sys, threading, time
from sigil._native import AppendWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path, limit = sys.argv[1], int(sys.argv[2])
w = AppendWriter(path, buffer_bytes=limit // 2, flush_interval=0.001, max_buffer_bytes=limit,
                 fsync="never")
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
stop = False
peak = 0

def hammer():
    while not stop:
        w.write("x" * 99)

def watch():
    global peak
    while not stop:
        peak = max(peak, w.stats()["buffered_bytes"])

threads = [threading.Thread(target=hammer), threading.Thread(target=watch)]
for t in threads:
    t.start()
end = time.monotonic() + 6.0
while time.monotonic() < end and peak <= limit:
    # the disk fills up and recovers, again and again
    resource.setrlimit(resource.RLIMIT_FSIZE, (max(1, os.path.getsize(path)), hard))
    time.sleep(0.0005)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    time.sleep(0.0005)
stop = True
for t in threads:
    t.join()
w.close()
print(json.dumps({"peak": peak, "stats": dict(w.stats())}))
"""


def test_the_buffer_stays_within_max_buffer_bytes_while_the_disk_flaps(tmp_path: Path):
    """Contract 4: the buffer stays within its bound whatever the disk does,
    including lines queued while a failing flush is in progress."""
    limit = 8192
    report = orjson.loads(run_py(FLAPPING_DISK, tmp_path / "log.jsonl", limit).stdout)
    assert report["stats"]["dropped_lines"] > 0  # the disk really was full
    assert report["peak"] <= limit, f"buffer reached {report['peak']} > {limit} bytes"
    # and the file holds whole lines only: the hammered ones and the drop notices
    data = (tmp_path / "log.jsonl").read_bytes()
    assert data.endswith(b"\n")
    others = [x for x in data.split(b"\n")[:-1] if x != b"x" * 99]
    entries, bad = parse_lines(others)
    assert bad == []
    assert {e.event_type for e in entries} <= {"events_dropped"}


TORN_AND_FULL = """
import os, resource, signal, sys
from sigil._native import AppendWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
# A torn tail on a full disk: the repair newline cannot be written yet.
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path), hard))
w = AppendWriter(path, flush_interval=3600, buffer_bytes=1 << 20, session_id="t")
w.write_event("t", "x", "c", "after the crash")
try:
    w.flush()
    raise SystemExit("flush on a full disk did not fail")
except OSError as e:
    assert e.errno == 27, e
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
w.close()
"""


def test_a_torn_tail_is_repaired_once_even_if_the_first_flush_fails(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    path.write_bytes(b'{"torn')
    run_py(TORN_AND_FULL, path)
    data = path.read_bytes()
    assert data.startswith(b'{"torn\n{"timestamp"'), data[:40]
    _, bad = parse_bytes(data)
    assert [m.offset for m in bad] == [0], f"expected only the torn line to be malformed: {bad}"


HALF_LINE_THEN_ROTATION = """
import os, resource, signal, sys
from sigil._native import AppendWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
w = AppendWriter(path, flush_interval=3600, buffer_bytes=1 << 20, session_id="t")
w.write_event("t", "x", "c", "first")
w.flush()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 10, hard))
w.write_event("t", "x", "c", "second")
for attempt in range(2):  # the first attempt writes 10 bytes, the second none
    try:
        w.flush()
        raise SystemExit("flush on a full disk did not fail")
    except OSError as e:
        assert e.errno == 27, e
os.rename(path, path + ".1")  # rotated while the line was half-written
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
w.write_event("t", "x", "c", "third")
w.close()
"""


def test_the_rest_of_a_half_written_line_never_lands_in_a_rotated_in_file(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    run_py(HALF_LINE_THEN_ROTATION, path)
    # The new file must start with a whole event, not with the tail of "second".
    entries, bad = parse_bytes(path.read_bytes())
    assert bad == [], f"garbage in the new file: {path.read_bytes()[:80]!r}"
    assert [e.message for e in entries][-1] == "third"


CLOSE_ON_A_FULL_DISK = """
import json, os, resource, signal, sys
from sigil._native import AppendWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
w = AppendWriter(path, flush_interval=3600, buffer_bytes=1 << 20, session_id="t")
w.write_event("t", "x", "c", "first")
w.flush()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path), hard))
w.write_event("t", "x", "c", "second")
try:
    w.close()
    raise SystemExit("close on a full disk did not fail")
except OSError as e:
    assert e.errno == 27, e
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
second_close = None
try:
    w.close()
except OSError as e:
    second_close = e.errno
print(json.dumps({"second_close": second_close, "stats": dict(w.stats())}))
"""


def test_close_after_a_failed_close_does_not_lose_events_silently(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    report = orjson.loads(run_py(CLOSE_ON_A_FULL_DISK, path).stdout)
    messages = [e["message"] for e in events(path)]
    stats = report["stats"]
    # Either the retried close wrote the event, or it failed / counted it as dropped.
    delivered = messages == ["first", "second"]
    reported = report["second_close"] is not None or stats["dropped_lines"] > 0
    assert delivered or reported, (
        f"second close() returned success but 'second' is not in the file and not "
        f"counted: {messages}, {stats}"
    )


# ---------------------------------------------------------------------------
# kill -9 in the middle of writing

KILLED_WRITER = """
import sys
from sigil._native import AppendWriter
w = AppendWriter(sys.argv[1], buffer_bytes=512, flush_interval=0.001, fsync="never",
                 session_id="k")
i = 0
while True:
    w.write_event("k", "step_complete", "c", "m" * (i % 700), tokens=i,
                  metadata=b'{"i":%d}' % i)
    i += 1
"""


def test_kill_9_mid_write_leaves_whole_lines_and_the_next_writer_repairs(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)])
    try:
        wait_for("the writer to write", lambda: path.exists() and path.stat().st_size > 400_000)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    data = path.read_bytes()
    torn = not data.endswith(b"\n")
    complete_end = data.rfind(b"\n") + 1
    entries, bad = parse_bytes(data)
    # every line parses, except at most the one torn last line
    if torn:
        assert [(m.offset, m.reason) for m in bad] == [
            (complete_end, "incomplete last line (no newline)")
        ]
    else:
        assert bad == []
    assert [e.seq for e in entries] == list(range(len(entries)))
    assert all(e.tokens == e.seq and e.metadata == {"i": e.seq} for e in entries)
    last_seq = entries[-1].seq
    assert tail_max_seq(path) == last_seq

    if not torn:  # the kill landed between two writes: leave the torn line a crash can leave
        with open(path, "ab") as f:
            f.write(data[: len(data) // 3].split(b"\n")[-1] or b'{"timestamp":"2026')
    torn_at = path.stat().st_size - len(path.read_bytes().rsplit(b"\n", 1)[-1])
    assert tail_max_seq(path) == last_seq

    with AppendWriter(path, start_seq=last_seq + 1, session_id="k") as w:
        w.write_event("k", "session_start", "orchestrator", "resumed")
    assert w.stats()["torn_tails_repaired"] == 1
    entries2, bad2 = parse_bytes(path.read_bytes())
    assert len(bad2) == 1 and bad2[0].offset == torn_at and "incomplete" not in bad2[0].reason
    assert entries2[-1].message == "resumed"
    assert entries2[-1].seq == last_seq + 1
    assert [e.seq for e in entries2] == list(range(last_seq + 2))


def test_a_start_seq_near_the_64_bit_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="start_seq"):
        AppendWriter(tmp_path / "f", start_seq=2**64 - 1)
    assert not (tmp_path / "f").exists()
