"""The native AppendWriter at its edges: failed fsyncs, slow disks, full disks,
forks, FIFOs, absurd sizes (issue 9 writer defects, issue 11 item 4).

Every fault is real: a child Python runs the writer with a C shim preloaded
(``fsfault.py``) that makes the kernel's fsync fail or sleep, or on a tmpfs
that is really full. Each scenario runs in its own process so that an abort
or a hang shows as a failed test, not a dead pytest.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import run_py
from fsfault import run_faulty
from sigil._native import fold_file, parse_bytes, parse_lines


def entries_of(path: Path) -> list[Any]:
    entries, bad = parse_bytes(path.read_bytes())
    assert bad == [], f"malformed lines in {path}: {bad[:3]}"
    return entries


# ---------------------------------------------------------------------------
# 1. A failed fsync is sticky ("fsyncgate")

STICKY_FLUSH = """
import json, os, sys
from sigil._native import AppendWriter
path, trigger = sys.argv[1], sys.argv[2]
w = AppendWriter(path, flush_interval=3600, buffer_bytes=1 << 20, session_id="s")
for i in range(5):
    w.write_event("s", "step", "c", f"synced {i}", tokens=1)
w.flush()  # durable
for i in range(5, 10):
    w.write_event("s", "step", "c", f"lost {i}", tokens=1)
with open(trigger, "w") as f:
    f.write("3")  # the disk fails three syncs, then works again
results = []
for attempt in range(4):
    try:
        w.flush()
        results.append(None)
    except OSError as e:
        results.append(e.errno)
    if attempt == 0:
        failing = dict(w.stats())
recovered = dict(w.stats())
w.write_event("s", "step", "c", "after", tokens=1)
w.close()
print(json.dumps({"results": results, "failing": failing, "recovered": recovered,
                  "closed": dict(w.stats())}))
"""


def test_a_failed_fsync_is_sticky_until_the_lost_bytes_are_rewritten(tmp_path: Path):
    path, trigger = tmp_path / "execution.jsonl", tmp_path / "eio"
    report = orjson.loads(run_faulty(STICKY_FLUSH, path, trigger, FSFAULT_EIO=str(trigger)).stdout)
    # Three failing syncs: the first flush and the two recovery attempts after it
    # raise; the fourth rewrites what the failed sync covered, syncs, and succeeds.
    assert report["results"] == [errno.EIO, errno.EIO, errno.EIO, None]
    failing = report["failing"]
    assert failing["sync_failed"] is True
    assert failing["last_errno"] == errno.EIO
    assert failing["last_error"] == "Input/output error"
    assert failing["fsync_failures"] == 1
    assert report["recovered"]["sync_failed"] is False
    assert report["recovered"]["fsync_failures"] == 3
    assert report["recovered"]["sync_recoveries"] == 1
    # The file holds every event exactly once, in seq order: nothing lost to the
    # dropped pages, nothing written twice.
    entries = entries_of(path)
    assert [e.seq for e in entries] == list(range(11))
    assert [e.message for e in entries][4:6] == ["synced 4", "lost 5"]
    assert entries[-1].message == "after"


STICKY_CLOSE = """
import json, os, sys
from sigil._native import AppendWriter
path, trigger = sys.argv[1], sys.argv[2]
w = AppendWriter(path, flush_interval=3600, buffer_bytes=1 << 20, session_id="s")
w.write_event("s", "step", "c", "first", tokens=1)
w.flush()
w.write_event("s", "step", "c", "second", tokens=1)
open(trigger, "w").write("1")
first = second = None
try:
    w.close()
except OSError as e:
    first = e.errno
try:
    w.close()
except OSError as e:
    second = e.errno
print(json.dumps({"first": first, "second": second, "stats": dict(w.stats())}))
"""


def test_a_failed_fsync_in_close_is_rewritten_by_the_next_close(tmp_path: Path):
    path, trigger = tmp_path / "execution.jsonl", tmp_path / "eio"
    report = orjson.loads(run_faulty(STICKY_CLOSE, path, trigger, FSFAULT_EIO=str(trigger)).stdout)
    assert (report["first"], report["second"]) == (errno.EIO, None)
    assert [e.message for e in entries_of(path)] == ["first", "second"]
    assert report["stats"]["sync_failed"] is False


STICKY_BACKGROUND = """
import json, os, sys, time
from sigil._native import AppendWriter
path, trigger = sys.argv[1], sys.argv[2]
w = AppendWriter(path, flush_interval=0.02, buffer_bytes=1 << 20, session_id="s")
w.write_event("s", "step", "c", "first", tokens=1)
w.flush()
open(trigger, "w").write("1")
w.write_event("s", "step", "c", "second", tokens=1)
deadline = time.monotonic() + 20
while os.path.exists(trigger):  # the background thread's fsync takes the failure
    assert time.monotonic() < deadline, "the background thread never synced"
    time.sleep(0.005)
failed = dict(w.stats())
w.close()
print(json.dumps({"failed": failed, "closed": dict(w.stats())}))
"""


def test_the_background_thread_records_a_failed_fsync(tmp_path: Path):
    path, trigger = tmp_path / "execution.jsonl", tmp_path / "eio"
    report = orjson.loads(
        run_faulty(STICKY_BACKGROUND, path, trigger, FSFAULT_EIO=str(trigger)).stdout
    )
    assert report["failed"]["fsync_failures"] == 1
    assert report["failed"]["last_errno"] == errno.EIO
    # close() succeeded, so what the failed sync covered is in the file.
    assert [e.message for e in entries_of(path)] == ["first", "second"]
    assert report["closed"]["sync_failed"] is False


STICKY_ROTATION = """
import json, os, sys
from sigil._native import AppendWriter
path, trigger = sys.argv[1], sys.argv[2]
# Policy "never": flush() writes without syncing, so the old file holds unsynced
# lines at rotation, and the writer syncs it before moving to the new file.
w = AppendWriter(path, fsync="never", flush_interval=3600, buffer_bytes=1 << 20,
                 session_id="s")
for i in range(3):
    w.write_event("s", "step", "c", f"old {i}", tokens=1)
w.flush()
os.rename(path, path + ".1")
open(trigger, "w").write("1")  # the old file's sync at reopen fails
w.write_event("s", "step", "c", "new", tokens=1)
results = []
for _ in range(2):
    try:
        w.flush()
        results.append(None)
    except OSError as e:
        results.append(e.errno)
w.close()
print(json.dumps({"results": results, "stats": dict(w.stats())}))
"""


def test_the_old_files_fsync_error_at_reopen_is_not_dropped(tmp_path: Path):
    path, trigger = tmp_path / "execution.jsonl", tmp_path / "eio"
    report = orjson.loads(
        run_faulty(STICKY_ROTATION, path, trigger, FSFAULT_EIO=str(trigger)).stdout
    )
    assert report["results"] == [errno.EIO, None]
    old = entries_of(Path(f"{path}.1"))
    new = entries_of(path)
    # Every event exactly once across the two files, in order.
    assert [e.seq for e in old + new] == list(range(4))
    assert new[-1].message == "new"


STICKY_NEVER = """
import json, sys
from sigil._native import AppendWriter
path, trigger = sys.argv[1], sys.argv[2]
# Policy "never" keeps at most max_buffer_bytes of unsynced bytes aside; past
# that, what a failed sync covered cannot be written again.
w = AppendWriter(path, fsync="never", flush_interval=3600, buffer_bytes=1024,
                 max_buffer_bytes=4096)
for i in range(200):
    w.write("x" * 99)
    if i % 10 == 0:
        w.flush()
w.flush()
open(trigger, "w").write("1")
errors = []
for _ in range(3):
    try:
        w.close()
        errors.append(None)
    except OSError as e:
        errors.append(e.errno)
print(json.dumps({"errors": errors, "stats": dict(w.stats())}))
"""


def test_a_failed_sync_of_bytes_not_kept_is_never_reported_durable(tmp_path: Path):
    path, trigger = tmp_path / "f", tmp_path / "eio"
    report = orjson.loads(run_faulty(STICKY_NEVER, path, trigger, FSFAULT_EIO=str(trigger)).stdout)
    # Only the first close's sync fails, yet no later close may report success.
    assert report["errors"] == [errno.EIO] * 3
    assert report["stats"]["sync_failed"] is True
    assert report["stats"]["fsync_failures"] == 1


# ---------------------------------------------------------------------------
# 3. Absurd buffer sizes


HUGE = """
import sys
from sigil._native import AppendWriter
path = sys.argv[1]
try:
    AppendWriter(path, buffer_bytes=2**40, max_buffer_bytes=2**40)
    raise SystemExit("accepted a 1 TiB buffer")
except ValueError as e:
    assert "buffer_bytes" in str(e), e
from sigil._native import MAX_BUFFER_BYTES
for kwargs in ({"max_buffer_bytes": MAX_BUFFER_BYTES + 1},
               {"buffer_bytes": 0}):
    try:
        AppendWriter(path, **kwargs)
        raise SystemExit(f"accepted {kwargs}")
    except ValueError as e:
        assert "buffer_bytes" in str(e), e
# The largest sizes allowed cost nothing until lines arrive.
w = AppendWriter(path, buffer_bytes=MAX_BUFFER_BYTES, max_buffer_bytes=MAX_BUFFER_BYTES)
w.write("x")
w.close()
# VmHWM, not ru_maxrss: the latter keeps the parent's peak across exec.
with open("/proc/self/status") as f:
    peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
assert peak_kb < 200 * 1024, f"preallocated: peak RSS {peak_kb} kB"
print(MAX_BUFFER_BYTES)
"""


def test_huge_buffer_sizes_are_a_value_error_not_an_abort(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-c", HUGE, str(tmp_path / "f")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert int(proc.stdout) == 256 << 20
    assert (tmp_path / "f").read_bytes() == b"x\n"


# ---------------------------------------------------------------------------
# 4. Other Python threads run while the writer waits for the disk

TICKER = """
import threading, time
gaps = [0.0]
stop = False
def tick():
    last = time.monotonic()
    while not stop:
        time.sleep(0.002)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
ticker = threading.Thread(target=tick)
"""

SLOW_FSYNC_STATS = (
    TICKER
    + """
import json, sys
from sigil._native import AppendWriter
w = AppendWriter(sys.argv[1], flush_interval=3600, fsync="always")
w.write("x")
flusher = threading.Thread(target=w.flush)
flusher.start()
time.sleep(0.2)  # the flush is now inside its 1.5 s fsync
ticker.start()
t0 = time.monotonic()
stats = w.stats()
stats_took = time.monotonic() - t0
time.sleep(0.3)
stop = True
ticker.join()
flusher.join()
print(json.dumps({"max_gap": max(gaps), "stats_took": stats_took}))
"""
)

SLOW_FSYNC_DEALLOC = (
    TICKER
    + """
import json, sys
from sigil._native import AppendWriter
w = AppendWriter(sys.argv[1], flush_interval=3600)
w.write("x")
ticker.start()
time.sleep(0.05)
t0 = time.monotonic()
del w  # unclosed: the final flush and its 1.5 s fsync happen now
dealloc_took = time.monotonic() - t0
time.sleep(0.3)
stop = True
ticker.join()
print(json.dumps({"max_gap": max(gaps), "dealloc_took": dealloc_took}))
"""
)


def test_stats_during_a_slow_fsync_does_not_freeze_other_threads(tmp_path: Path):
    report = orjson.loads(
        run_faulty(SLOW_FSYNC_STATS, tmp_path / "f", FSFAULT_SLEEP_MS="1500").stdout
    )
    # A frozen interpreter would show a gap of about 1.3 s; the margin is for a loaded machine.
    assert report["max_gap"] < 0.6, report
    assert report["stats_took"] < 0.6, report


def test_dropping_an_unclosed_writer_does_not_freeze_other_threads(tmp_path: Path):
    path = tmp_path / "f"
    report = orjson.loads(run_faulty(SLOW_FSYNC_DEALLOC, path, FSFAULT_SLEEP_MS="1500").stdout)
    assert report["max_gap"] < 0.6, report
    assert path.read_bytes() == b"x\n"


# ---------------------------------------------------------------------------
# 6. fork

FORK = """
import gc, json, os, sys
from sigil._native import AppendWriter
path = sys.argv[1]
w = AppendWriter(path, flush_interval=3600, buffer_bytes=1 << 20, session_id="f")
for i in range(3):
    w.write_event("f", "step", "c", f"parent {i}", tokens=1)  # queued, not written
pid = os.fork()
if pid == 0:
    report = {}
    try:
        w.write_event("f", "step", "c", "child", tokens=1)
        report["write"] = "accepted"
    except RuntimeError as e:
        report["write"] = str(e)
    try:
        w.flush()
        report["flush"] = "ok"
    except RuntimeError as e:
        report["flush"] = str(e)
    try:
        w.close()
        report["close"] = "ok"
    except Exception as e:
        report["close"] = repr(e)
    del w
    gc.collect()
    with open(path + ".child", "w") as f:
        json.dump(report, f)
    os._exit(0)
_, status = os.waitpid(pid, 0)
w.write_event("f", "step", "c", "parent after fork", tokens=1)
w.close()
print(json.dumps({"status": status}))
"""


def test_a_forked_child_refuses_the_parents_writer_and_writes_nothing(tmp_path: Path):
    path = tmp_path / "execution.jsonl"
    report = orjson.loads(run_py(FORK, path).stdout)
    assert report["status"] == 0
    child = orjson.loads(Path(f"{path}.child").read_bytes())
    assert "fork" in child["write"], child
    assert "fork" in child["flush"], child
    assert child["close"] == "ok", child
    # The parent's queued lines are written once, by the parent.
    messages = [e.message for e in entries_of(path)]
    assert messages == ["parent 0", "parent 1", "parent 2", "parent after fork"]
    assert [e.seq for e in entries_of(path)] == [0, 1, 2, 3]


FORK_STORM = """
import os, sys, threading, time
from sigil._native import AppendWriter
path = sys.argv[1]
w = AppendWriter(path, flush_interval=0.001, buffer_bytes=64, fsync="always")
stop = False
def hammer():
    while not stop:
        w.write("y" * 50)
t = threading.Thread(target=hammer)
t.start()
hung = 0
for _ in range(40):
    pid = os.fork()
    if pid == 0:
        # Whatever lock the flush thread held at the fork, the child must not block.
        try:
            w.stats()
        except RuntimeError:
            pass
        w.close()
        os._exit(0)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert status == 0, status
            break
        if time.monotonic() > deadline:
            hung += 1
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.001)
stop = True
t.join()
w.close()
print(hung)
"""


def test_forking_while_the_flush_thread_holds_its_locks_never_hangs_the_child(tmp_path: Path):
    out = run_py(FORK_STORM, tmp_path / "f", timeout=300)
    assert out.stdout.strip() == "0"
    # Whole lines only: the hammered ones and the notices of what a busy disk dropped.
    lines = (tmp_path / "f").read_bytes().split(b"\n")
    assert lines[-1] == b""
    entries, bad = parse_lines([x for x in lines[:-1] if x != b"y" * 50])
    assert bad == []
    assert {e.event_type for e in entries} <= {"events_dropped"}


# ---------------------------------------------------------------------------
# 7. A FIFO (or anything but a regular file) at the log path


def test_a_fifo_at_the_log_path_is_a_prompt_clear_error(tmp_path: Path):
    fifo = tmp_path / "execution.jsonl"
    os.mkfifo(fifo)
    out = run_py(
        """
        import sys
        from sigil._native import AppendWriter
        try:
            AppendWriter(sys.argv[1])
        except OSError as e:
            print(str(e))
        else:
            raise SystemExit("a FIFO was accepted")
        """,
        fifo,
        timeout=20,
    )
    message = out.stdout.strip()
    assert "not a regular file" in message
    assert message.count(str(fifo)) == 1, message


# ---------------------------------------------------------------------------
# 10. The directory of a new file is fsynced

DIR_SYNC = """
import os, sys
from sigil._native import AppendWriter
path = sys.argv[1]
w = AppendWriter(path, flush_interval=3600)  # creates the file
w.write("a")
w.flush()
os.rename(path, path + ".1")
w.write("b")
w.flush()  # creates the file again
w.close()
"""


def test_the_directory_is_fsynced_when_the_writer_creates_the_file(tmp_path: Path):
    log = tmp_path / "calls.log"
    path = tmp_path / "d" / "execution.jsonl"
    run_faulty(DIR_SYNC, path, FSFAULT_LOG=str(log))
    calls = [line.split(" ", 3) for line in log.read_text().splitlines()]
    dir_syncs = [c for c in calls if c[1] == "dir" and c[3] == str(path.parent)]
    assert len(dir_syncs) == 2, calls
    assert all(c[2] == "0" for c in dir_syncs)
    # The created directory's own entry is made durable in its parent too.
    assert any(c[1] == "dir" and c[3] == str(tmp_path) for c in calls), calls


def test_an_existing_file_costs_no_directory_fsync(tmp_path: Path):
    log = tmp_path / "calls.log"
    path = tmp_path / "execution.jsonl"
    path.write_bytes(b"")
    run_faulty(
        "import sys\nfrom sigil._native import AppendWriter\nAppendWriter(sys.argv[1]).close()",
        path,
        FSFAULT_LOG=str(log),
    )
    calls = log.read_text().splitlines() if log.exists() else []
    assert not [c for c in calls if c.split(" ")[1] == "dir"], calls


# ---------------------------------------------------------------------------
# 11. Clean error messages


def test_error_messages_are_clean(tmp_path: Path):
    target = tmp_path / "target"
    target.write_bytes(b"")
    link = tmp_path / "link"
    link.symlink_to(target)
    out = run_py(
        """
        import json, os, resource, signal, sys
        from sigil._native import AppendWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        report = {}
        try:
            AppendWriter(sys.argv[1])
        except OSError as e:
            report["symlink"] = str(e)
        w = AppendWriter(sys.argv[2], flush_interval=3600)
        w.write("x")
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
        try:
            w.flush()
        except OSError as e:
            report["flush"] = str(e)
        report["last_error"] = w.stats()["last_error"]
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        w.close()
        print(json.dumps(report))
        """,
        link,
        tmp_path / "log.jsonl",
    )
    report = orjson.loads(out.stdout)
    assert report["symlink"].count(str(link)) == 1, report
    assert "symlink" in report["symlink"]
    assert report["last_error"] == "File too large", report
    assert "os error" not in report["flush"], report


# ---------------------------------------------------------------------------
# Issue 11 item 4: a full disk drops events; their tokens are not lost


@contextlib.contextmanager
def small_disk(where: Path, size_kb: int) -> Iterator[dict[str, str]]:
    """A really full disk: a tmpfs of ``size_kb`` when we may mount one; otherwise
    the shim answers ENOSPC for files under ``where`` while the test says so."""
    where.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs", str(where)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    try:
        yield {"mounted": "1"} if mounted else {"FSFAULT_PREFIX": str(where)}
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


FULL_DISK = """
import errno, json, os, sys
from sigil.telemetry.execution_logger import EventsDroppedError, ExecutionLogger
base, mounted, full_flag = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
filler = os.path.join(base, "filler")
log = ExecutionLogger("full", log_path=base, buffer_size=1024, flush_interval=0.005,
                      max_buffer_bytes=16 * 1024, sanitizer=False)
log.log_event_sync("session_start", "orchestrator", "start", 0)
log.flush_sync()
# Fill the disk.
if mounted:
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
else:
    open(full_flag, "w").close()
sent = 0
raised = []
seqs = []
for i in range(3000):
    tokens = 7 + i % 5
    try:
        seqs.append(log.log_event_sync("step_complete", "reasoning", f"event {i}", tokens,
                                       {"i": i, "pad": "p" * 200}))
    except EventsDroppedError as e:
        raised.append({"errno": e.errno, "seq": e.seq, "dropped": e.dropped_events,
                       "dropped_tokens": e.dropped_tokens})
        seqs.append(e.seq)
    sent += tokens
stats = dict(log.stats())
# The disk recovers.
if mounted:
    os.unlink(filler)
else:
    os.unlink(full_flag)
log.close_sync()
print(json.dumps({"sent": sent, "raised": raised, "seqs": seqs, "stats": stats,
                  "closed": dict(log.stats())}))
"""


def test_a_full_disk_drop_carries_its_tokens_and_tells_the_caller(tmp_path: Path):
    base = tmp_path / "disk"
    with small_disk(base, 256) as env:
        mounted = env.pop("mounted", "0")
        flag = tmp_path / "full"
        report = orjson.loads(
            run_faulty(FULL_DISK, base, mounted, flag, FSFAULT_ENOSPC=str(flag), **env).stdout
        )
        data = (base / "sessions" / "full" / "execution.jsonl").read_bytes()
    path = tmp_path / "execution.jsonl"  # a copy, readable after the unmount
    path.write_bytes(data)
    stats = report["stats"]
    assert stats["dropped_events"] > 0, stats  # the disk really was full
    assert stats["dropped_tokens"] > 0
    # The caller was told by each call that found drops not reported yet, with an
    # OSError subclass that carries the errno of the failing disk (ENOBUFS if the
    # buffer filled before the disk said anything).
    raised = report["raised"]
    assert raised, "log_event_sync never said that events were dropped"
    assert {r["errno"] for r in raised} <= {errno.ENOSPC, errno.ENOBUFS}
    assert errno.ENOSPC in {r["errno"] for r in raised}
    assert all(r["dropped"] > 0 for r in raised)
    assert 0 < sum(r["dropped"] for r in raised) <= stats["dropped_events"]
    assert sum(r["dropped_tokens"] for r in raised) <= stats["dropped_tokens"]
    # seq still rises by one per event, dropped or not.
    assert report["seqs"] == list(range(1, 3001))

    entries, bad = parse_bytes(data)
    assert bad == []
    notices = [e for e in entries if e.event_type == "events_dropped"]
    assert notices
    assert sum(n.metadata["dropped"] for n in notices) == report["closed"]["dropped_events"]
    assert sum(n.tokens for n in notices) == report["closed"]["dropped_tokens"]
    assert all(n.metadata["dropped_tokens"] == n.tokens for n in notices)
    # Contract 2: every reader's plain sum includes what was dropped.
    summary = fold_file(path)
    assert summary["tokens"] == report["sent"]
    assert summary["dropped_events"] == report["closed"]["dropped_events"]


# ---------------------------------------------------------------------------
# No panic crosses into Python


def test_odd_inputs_are_python_errors_not_panics(tmp_path: Path):
    out = run_py(
        textwrap.dedent(
            """
            import sys
            from sigil._native import AppendWriter
            w = AppendWriter(sys.argv[1], flush_interval=3600, session_id="s")
            odd = [
                lambda: w.write_event("s", "x", "c", "m", tokens=2**64),
                lambda: w.write_event("s", "x", "c", "m", tokens=-1),
                lambda: w.write_event("s", "x", "c", "m", metadata=b"{" * 100000),
                lambda: w.write_event("s", "x", "c", "m", metadata=b'{"a":1}{'),
                lambda: w.write_event("s", "x", "c", "\\ud800"),
                lambda: w.write("\\ud800"),
                lambda: w.write(b"a\\nb"),
                lambda: AppendWriter(sys.argv[1], flush_interval=float("nan")),
                lambda: AppendWriter(sys.argv[1], buffer_bytes=-1),
                lambda: AppendWriter(sys.argv[1], start_seq=-1),
                lambda: AppendWriter("", flush_interval=1),
                lambda: AppendWriter(sys.argv[1] + "\\0x"),
            ]
            for f in odd:
                try:
                    f()
                except (ValueError, TypeError, OverflowError, UnicodeEncodeError, OSError):
                    pass
            seq = w.write_event("s", "x", "c", "m", timestamp="t" * 10000)
            w.close()
            print(seq)
            """
        ),
        tmp_path / "f",
    )
    assert out.stdout.strip() == "0"
    assert "internal error" not in out.stderr and "panicked" not in out.stderr, out.stderr


@pytest.mark.parametrize("tokens", [2**53 + 1, 2**63, 2**64 - 1])
def test_the_writer_refuses_tokens_that_every_reader_would_call_malformed(
    tmp_path: Path, tokens: int
):
    """The writer accepts exactly the token range the readers accept (0..=2**53):
    a line it wrote can never be one that the fold then skips as malformed."""
    from sigil._native import MAX_TOKENS, AppendWriter, fold_file

    path = tmp_path / "f.jsonl"
    w = AppendWriter(path, flush_interval=3600, session_id="s")
    with pytest.raises(ValueError, match=r"tokens must be an int from 0 to 2\*\*53"):
        w.write_event("s", "x", "c", "m", tokens=tokens)
    w.write_event("s", "x", "c", "m", tokens=MAX_TOKENS)
    w.close()
    summary = fold_file(path)
    assert (summary["entries"], summary["tokens"], summary["malformed"]) == (1, MAX_TOKENS, 0)
