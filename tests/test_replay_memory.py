"""``sigil replay`` streams a session: its memory does not grow with the log.

The session's rotated segments (one of them gzip), its live file, or its
archive are read in bounded chunks, line by line in segment order. Checked by
the peak RSS of a real ``sigil replay --speed max --mode json > /dev/null``
(``getrusage`` of the child, not a timing): a session four times longer must
not need more than a few MiB more. The answers are checked too: the replay of
the segments ends on the monitor's ``--once`` snapshot, the archive's on the
same one.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import SIGIL, cli_env
from replay_sessions import replay_lines as _lines

pytestmark = [pytest.mark.timeout(300)]

#: The longest a replay of 4x the events may grow past the 1x one's peak.
_SLACK_KIB = 16 << 10


def _session(log_path: Path, session: str, events: int) -> Path:
    """Two rotated segments (the newer gzip-compressed) and the live file."""
    directory = log_path / "sessions" / session
    directory.mkdir(parents=True, mode=0o700)
    third = events // 3
    (directory / "execution_20260111_100000.jsonl").write_bytes(_lines(session, 0, third))
    (directory / "execution_20260111_110000.jsonl.gz").write_bytes(
        gzip.compress(_lines(session, third, third), compresslevel=1)
    )
    (directory / "execution.jsonl").write_bytes(_lines(session, 2 * third, events - 2 * third))
    return directory


def _archive(log_path: Path, directory: Path) -> None:
    day = log_path / "archive" / "2026-01-11"
    day.mkdir(parents=True, exist_ok=True)
    with tarfile.open(day / f"{directory.name}.tar.gz", "w:gz", compresslevel=1) as tar:
        tar.add(directory, arcname=directory.name)


_PEAK = (
    "import resource, subprocess, sys; "
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _peak_kib(home: Path, session: str) -> int:
    """The peak RSS (KiB) of ``sigil replay SESSION --speed max --mode json > /dev/null``."""
    result = subprocess.run(
        [sys.executable, "-c", _PEAK, *SIGIL, "replay", session, "--speed", "max", "-m", "json"],
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    code, peak = result.stdout.split()
    assert code == "0", result.stderr
    return int(peak)


def _final(home: Path, *args: str) -> dict[str, object]:
    result = subprocess.run(
        [*SIGIL, *args],
        env=cli_env(home),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout.splitlines()[-1])
    assert final["type"] == "final"
    return final


@pytest.mark.slow
@pytest.mark.parametrize("where", ["directory", "archive"])
def test_replay_memory_does_not_grow_with_the_log(
    sigil_home: Path, log_path: Path, tmp_path: Path, where: str
) -> None:
    small = _session(log_path, "mem-small", 30_000)
    large = _session(log_path, "mem-large", 120_000)
    expected = _final(sigil_home, "monitor", "-s", "mem-large", "--mode", "json", "--once")
    assert expected["events"] == 120_000 and expected["runs"] == 120
    if where == "archive":
        for directory in (small, large):
            _archive(log_path, directory)
            directory.rename(tmp_path / directory.name)
    replayed = _final(sigil_home, "replay", "mem-large", "--speed", "max", "--mode", "json")
    assert replayed == expected
    peaks = {name: _peak_kib(sigil_home, name) for name in ("mem-small", "mem-large")}
    # 90,000 more events (about 22 MiB of log): held whole they would show.
    assert peaks["mem-large"] - peaks["mem-small"] < _SLACK_KIB, peaks


@pytest.mark.slow
def test_lines_across_chunks_and_an_oversize_line_fold_as_the_monitor_folds(
    sigil_home: Path, log_path: Path
) -> None:
    """Lines cut by the 1 MiB reads, a 3 MiB line (oversize: counted, not
    held), a line with no newline at the end: the replay's last snapshot is
    the monitor's, in json and minimal."""
    directory = log_path / "sessions" / "os-1"
    directory.mkdir(parents=True, mode=0o700)
    head = _lines("os-1", 0, 6000)
    huge = b'{"timestamp": "2026-01-11T11:00:00+00:00", "message": "' + b"x" * (3 << 20) + b'"}\n'
    tail = _lines("os-1", 6000, 3000)
    (directory / "execution.jsonl").write_bytes(head + huge + tail + b'{"timestamp": "2026-01-1')
    for mode in ("json", "minimal"):
        ours = subprocess.run(
            [*SIGIL, "replay", "os-1", "--speed", "max", "--mode", mode],
            env=cli_env(sigil_home),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        theirs = subprocess.run(
            [*SIGIL, "monitor", "-s", "os-1", "--mode", mode, "--once"],
            env=cli_env(sigil_home),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert ours.returncode == 0, ours.stderr
        last, expected = ours.stdout.splitlines()[-1], theirs.stdout.splitlines()[-1]
        if mode == "json":
            got, want = json.loads(last), json.loads(expected)
            assert want["oversize_lines"] == 1 and want["events"] == 9000, want
            assert got == want
        else:
            assert ours.stdout.splitlines()[-len(theirs.stdout.splitlines()) :] == (
                theirs.stdout.splitlines()
            )


_LOWERED = (
    "import runpy, sys; import sigil.interfaces.cli.replay as r; "
    "r._MAX_MEMBER_BYTES = 1 << 20; sys.argv = ['sigil', *sys.argv[1:]]; "
    "runpy.run_module('sigil', run_name='__main__')"
)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["corrupt", "bomb"])
def test_a_bad_gzip_segment_is_one_line_exit_1_nothing_played(
    sigil_home: Path, log_path: Path, case: str
) -> None:
    """Read while the lines are counted, before anything is shown: a torn gzip
    segment, or one that inflates past the bound (lowered here to 1 MiB)."""
    directory = _session(log_path, "gz-1", 3000)
    segment = directory / "execution_20260111_110000.jsonl.gz"
    if case == "corrupt":
        data = segment.read_bytes()
        segment.write_bytes(data[: len(data) // 2])
    else:
        segment.write_bytes(gzip.compress(bytes(4 << 20), compresslevel=1))
    for mode in ("json", "stream", "minimal"):
        result = subprocess.run(
            [sys.executable, "-c", _LOWERED, "replay", "gz-1", "--speed", "max", "-m", mode],
            env=cli_env(sigil_home),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 1, (mode, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: cannot read "), result.stderr
        assert segment.name in lines[0]
        if case == "bomb":
            assert "larger than 1048576 bytes" in lines[0]
        assert result.stdout == ""


def test_a_log_found_shorter_than_counted_ends_the_replay_there() -> None:
    """The lines are counted in a first read; a file cut before the replay
    reaches it (an external tool) ends the replay at its last line, paced or
    at --speed max, with no error."""
    import io

    from sigil.interfaces.cli.display import DisplayOptions, StreamRenderer
    from sigil.interfaces.cli.replay import Player, Timeline, _Files

    whole = _lines("sh-1", 0, 10)

    class Shrinking(_Files):
        def __init__(self) -> None:
            self.names = ["execution.jsonl"]
            self.reads = 0

        def open_all(self):  # type: ignore[no-untyped-def]
            self.reads += 1
            data = whole if self.reads == 1 else b"".join(whole.splitlines(keepends=True)[:5])
            yield "execution.jsonl", "memory", io.BytesIO(data)

    for speed in (None, 1e9):
        timeline = Timeline("sh-1", Shrinking())
        assert timeline.count == 10
        out = io.StringIO()
        renderer = StreamRenderer(out, io.StringIO(), DisplayOptions())
        player = Player(timeline, renderer, speed=speed, max_gap=0.0)
        assert player.run() == 0
        assert player.finished and player.cursor == player.stop
        listed = [ln for ln in out.getvalue().splitlines() if ln.startswith("[")]
        assert len(listed) == 5, out.getvalue()


def test_an_archive_cut_anywhere_is_said_not_a_quietly_shorter_session(tmp_path: Path) -> None:
    """A tar.gz cut within a member's header used to end quietly (tarfile
    takes it for the end of the archive): the gzip stream is read to its end,
    and a cut is an error, or (issue 13 review) the readable part with the
    reason (``problem``), which the command says."""
    from sigil.interfaces.cli.replay import ReplayError, Timeline, _ArchiveFiles

    directory = _session(tmp_path / "logs", "cut-1", 3000)
    (directory / "tokens.json").write_text('{"total_used": 0}')
    whole = tmp_path / "cut-1.tar.gz"
    with tarfile.open(whole, "w:gz", compresslevel=1) as tar:
        tar.add(directory, arcname="cut-1")
    data = whole.read_bytes()
    assert Timeline("cut-1", _ArchiveFiles(whole)).count == 3000
    cut = tmp_path / "cut.tar.gz"
    # Every 29 bytes: a header (or the gzip trailer) spans more than that.
    for end in range(len(data) // 10, len(data), 29):
        cut.write_bytes(data[:end])
        try:
            files = _ArchiveFiles(cut)
        except ReplayError as exc:
            assert "cannot read" in str(exc)
            continue
        timeline = Timeline("cut-1", files)
        assert timeline.problem is not None and timeline.problem.startswith(f"cannot read {cut}")
        assert timeline.count <= 3000  # the break may be past the last line


@pytest.mark.slow
@pytest.mark.parametrize("where", ["directory", "archive"])
def test_run_n_across_files_and_reads(
    sigil_home: Path, log_path: Path, tmp_path: Path, where: str
) -> None:
    """--run 11 of 31 runs of 1,000 events: run 11 starts in the first rotated
    segment and ends in the gzip one (lines 10,000-10,999, the files cut at
    10,333); runs found a block at a time, the runs before folded at once."""
    directory = _session(log_path, "rn-1", 31_000)
    if where == "archive":
        _archive(log_path, directory)
        directory.rename(tmp_path / directory.name)
    result = subprocess.run(
        [*SIGIL, "replay", "rn-1", "--speed", "max", "-m", "json", "--json-events", "--run", "11"],
        env=cli_env(sigil_home),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    events = [o for o in objects if o["type"] == "event"]
    assert [e["seq"] for e in events] == list(range(10_000, 11_000))
    final = objects[-1]
    assert final["type"] == "final" and final["events"] == 11_000
    assert final["run"]["number"] == 11
    assert final["run"]["tokens_used"] == sum(100 + i % 7 for i in range(1, 999))
    assert final["rotations"] == 1  # the replay is in the second file when run 11 ends
    missing = subprocess.run(
        [*SIGIL, "replay", "rn-1", "--speed", "max", "-m", "json", "--run", "32"],
        env=cli_env(sigil_home),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert missing.returncode == 2 and missing.stdout == ""
    assert "has no run 32 (its runs: 1, 2, 3" in missing.stderr and "31)" in missing.stderr
