"""Hostile archives for the native archive fold (``rust/archive.rs``).

Real tar.gz files written here, read by ``sigil.reports.sources.archive_snapshot``
and by ``sigil report``: a hostile archive is one line of reason (or a fold
that ignores what is no log), never a panic into Python, a hang or an
unbounded read, and the other sessions are still reported.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sigil.reports.sources import archive_snapshot
from sigil.telemetry.log_parser import snapshot_many

pytestmark = [pytest.mark.timeout(60)]


def _line(seq: int, component: str, tokens: int = 1, kind: str = "step_complete") -> bytes:
    return (
        json.dumps(
            {
                "timestamp": f"2026-01-11T10:{seq // 60 % 60:02d}:{seq % 60:02d}.000000+00:00",
                "session_id": "arch",
                "event_type": kind,
                "component": component,
                "message": f"{kind} {seq}",
                "tokens": tokens,
                "metadata": {},
                "seq": seq,
            }
        ).encode()
        + b"\n"
    )


def _tgz(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT, compresslevel=1) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _snapshot(path: Path) -> dict[str, Any]:
    snap = archive_snapshot(path)
    assert not isinstance(snap, str), snap
    return snap.to_dict()


def test_many_members_after_one_with_too_many_names_fold_in_linear_time(tmp_path: Path) -> None:
    """One segment with over 256 component names, then thousands of tiny
    segments after it: each of those used to be read by a walk of its own from
    the archive's start (quadratic: 2,000 members took 4 s, 10,000 minutes).
    Only the overflowed member needs its second read; the result stays the
    directory's."""
    directory = tmp_path / "sessions" / "arch"
    directory.mkdir(parents=True)
    count = 2500
    seq = 0
    members: list[tarfile.TarInfo | tuple[str, bytes]] = []
    # The highest number is the oldest: .4000 first, then .3999 (the big one)...
    for number in range(count, 0, -1):
        if number == count - 1:
            data = b"".join(_line(seq + i, f"name{i}") for i in range(300))
            seq += 300
        else:
            data = _line(seq, "tiny")
            seq += 1
        (directory / f"execution.jsonl.{number}").write_bytes(data)
    (directory / "execution.jsonl").write_bytes(_line(seq, "live"))
    # The archive in name order (the rotator's), not the fold's.
    for path in sorted(directory.iterdir()):
        members.append((f"arch/{path.name}", path.read_bytes()))
    archive = _tgz(tmp_path / "a.tar.gz", members)
    (want,) = snapshot_many([directory])
    assert not isinstance(want, str)
    started = time.monotonic()
    got = _snapshot(archive)
    took = time.monotonic() - started
    assert got == want.to_dict()
    assert took < 2.0, f"{count} members took {took:.1f} s"


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def test_links_traversal_names_binary_and_empty_members(tmp_path: Path) -> None:
    """Symlink and hardlink members named like the log are not read (nothing is
    followed, nothing extracted); binary bytes in a member named like a log are
    malformed lines; an empty member is an empty file."""
    real = _line(0, "routing", 5) + _line(1, "memory", 7)
    archive = _tgz(
        tmp_path / "a.tar.gz",
        [
            _link("arch/execution.jsonl.3", tarfile.SYMTYPE, "/etc/passwd"),
            _link("arch/execution.jsonl.2", tarfile.LNKTYPE, "arch/execution.jsonl"),
            ("arch/execution.jsonl.1", b"\x00\xff\xfe binary \x89PNG\r\n\x1a\n" * 50),
            ("arch/execution.jsonl.4", b""),
            ("arch/execution.jsonl", real),
        ],
    )
    got = _snapshot(archive)
    assert got["tokens"] == 12
    assert got["entries"] == 2
    assert got["malformed"] >= 1
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert listing == ["a.tar.gz"]  # nothing extracted

    # A name climbing out of the session: read from memory only, never written.
    climbing = _tgz(tmp_path / "b.tar.gz", [("../execution.jsonl", real)])
    snap = archive_snapshot(climbing)
    assert not isinstance(snap, str)
    assert not (tmp_path.parent / "execution.jsonl").exists()


@pytest.mark.parametrize(
    "mangle",
    ["truncated_gzip", "gzip_trailer_only", "zero_bytes", "garbage_tail", "huge_pax_size"],
)
def test_a_broken_archive_is_one_line(tmp_path: Path, mangle: str) -> None:
    data = b"".join(_line(i, f"c{i % 3}") for i in range(3000))
    whole = _tgz(tmp_path / "ok.tar.gz", [("arch/execution.jsonl", data)]).read_bytes()
    path = tmp_path / "bad.tar.gz"
    if mangle == "truncated_gzip":
        path.write_bytes(whole[: len(whole) * 2 // 3])
    elif mangle == "gzip_trailer_only":
        path.write_bytes(whole[:10])
    elif mangle == "zero_bytes":
        path.write_bytes(b"")
    elif mangle == "garbage_tail":
        path.write_bytes(whole + b"\x1f\x8b\x08garbage" * 10)
    else:
        # A pax header claiming an exabyte for the log member.
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("arch/execution.jsonl")
            info.size = 10
            info.pax_headers = {"size": str(10**18)}
            tar.addfile(info, io.BytesIO(b"0123456789"))
        path.write_bytes(gzip.compress(raw.getvalue()))
    started = time.monotonic()
    got = archive_snapshot(path)
    assert time.monotonic() - started < 5
    if mangle in ("zero_bytes",):
        # An empty file is an archive of nothing or a reason; never an exception.
        assert isinstance(got, str) or got.to_dict()["lines"] == 0
        return
    if mangle == "garbage_tail":
        # gzip members after the tar's end: the tar's zero blocks ended it.
        assert not isinstance(got, str) or "\n" not in got
        return
    assert isinstance(got, str), got
    assert got.startswith(f"cannot read {path}") and "\n" not in got


def test_ten_thousand_tiny_members(tmp_path: Path) -> None:
    members: list[tarfile.TarInfo | tuple[str, bytes]] = [
        (f"arch/execution.jsonl.{n}", _line(10_000 - n, "c")) for n in range(1, 10_001)
    ]
    members.append(("arch/execution.jsonl", _line(10_000, "c")))
    archive = _tgz(tmp_path / "a.tar.gz", members)
    started = time.monotonic()
    got = _snapshot(archive)
    assert time.monotonic() - started < 5
    assert got["entries"] == 10_001 and got["tokens"] == 10_001
    assert got["seq_gaps"] == 0


def test_report_survives_a_broken_archive_and_archives_written_during_it(
    log_path: Path, run_sigil: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """``sigil report``: the broken archive is one warning line, the good one is
    counted, and archives appearing (half written) while it runs break nothing."""
    day = log_path / "archive" / "2026-11-20"
    run = (
        _line(0, "orchestrator", 0, "session_start")
        + _line(1, "routing", 42)
        + _line(2, "orchestrator", 0, "session_complete")
    )
    _tgz(day / "good-1.tar.gz", [("good-1/execution.jsonl", run)])
    (day / "bad-1.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(2000))
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            part = day / f"churn-{n % 5}.tar.gz"
            with open(part, "wb") as f:
                f.write(b"\x1f\x8b\x08\x00")
                f.flush()
                f.write(os.urandom(512))
            part.unlink(missing_ok=True)

    writer = threading.Thread(target=churn, daemon=True)
    writer.start()
    try:
        result = run_sigil("report", "session", "--json", timeout=30)
    finally:
        stop.set()
        writer.join()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.stderr
    assert (
        "bad-1" in result.stderr
        and len([ln for ln in result.stderr.splitlines() if "bad-1" in ln]) == 1
    ), result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [(r["session"], r["tokens"]) for r in rows] == [("good-1", 42)], rows
