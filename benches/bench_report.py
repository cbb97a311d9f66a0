"""Rows for looking back over many sessions (issue 13, "Numbers").

* ``sigil report daily --json`` over 1,000 finished sessions of 1,000 events
  each (1M events; quick mode, ``SIGIL_BENCH_QUICK=1``: 1,000 x 100, said in
  the row's name), the whole process: with a warm index (every session's files
  checked against it, nothing refolded; aim < 300 ms) and cold (the index
  deleted before each round: every log folded natively and its runs indexed;
  aim < 3 s), beside a pure-Python fold of the same files (orjson per line,
  tokens summed per day) in the same group.
* ``sigil diff A B --json`` of two 100K-event sessions (aim < 200 ms), beside
  orjson per line over both files.
* ``sigil report daily --json`` over the same sessions archived
  (``archive/<date>/<id>.tar.gz``, read in memory), cold (every archive folded
  natively from its gzip stream, ``rust/archive.rs``), beside a pure-Python
  read of the same archives (``tarfile`` stream, orjson per line).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import quick, write_session

pytestmark = pytest.mark.benchmark

SESSIONS, SESSION_EVENTS = (1_000, 100) if quick() else (1_000, 1_000)
REPORT_NAME = "1000x100_events_quick" if quick() else "1000x1000_events"
DIFF_EVENTS = 100_000
AIM_WARM_S, AIM_COLD_S, AIM_DIFF_S = 0.3, 3.0, 0.2
INDEX = "report_index.sqlite3"


def _rounds() -> int:
    return 3 if quick() else 5


def _finish(log: Path, seq: int) -> None:
    final = {
        "timestamp": "2026-01-11T11:00:00.000000+00:00",
        "session_id": "bench",
        "event_type": "session_complete",
        "component": "orchestrator",
        "message": "Pipeline completed successfully",
        "tokens": 0,
        "metadata": {"status": "complete"},
        "seq": seq,
    }
    with log.open("ab") as f:
        f.write(orjson.dumps(final) + b"\n")


@pytest.fixture(scope="module")
def many_sessions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    logs = tmp_path_factory.mktemp("report") / "logs"
    for i in range(SESSIONS):
        log = write_session(logs / "sessions" / f"s{i:04d}" / "execution.jsonl", SESSION_EVENTS)
        _finish(log, SESSION_EVENTS)
    return logs


def _orjson_daily(paths: list[Path]) -> dict[str, int]:
    """The pure-Python baseline: every line parsed, tokens summed per day."""
    days: dict[str, int] = {}
    for path in paths:
        with path.open("rb") as f:
            for line in f:
                event = orjson.loads(line)
                day = event["timestamp"][:10]
                days[day] = days.get(day, 0) + event["tokens"]
    return days


def _sigil(*args: str) -> bytes:
    return subprocess.run(
        [sys.executable, "-m", "sigil", *args], stdout=subprocess.PIPE, check=True
    ).stdout


def _report(logs: Path) -> bytes:
    return _sigil("report", "daily", "--json", "--log-path", str(logs))


def _group(benchmark: Any) -> None:
    benchmark.group = f"sigil report daily --json: {REPORT_NAME}"


def test_report_orjson_baseline(benchmark: Any, many_sessions: Path) -> None:
    _group(benchmark)
    benchmark.extra_info.update(ops=SESSIONS * SESSION_EVENTS)
    paths = sorted((many_sessions / "sessions").glob("*/execution.jsonl"))
    days = benchmark.pedantic(_orjson_daily, args=(paths,), rounds=_rounds(), iterations=1)
    doc = orjson.loads(_report(many_sessions))
    assert {r["period"]: r["tokens"] for r in doc["rows"]} == days


def test_report_warm_index(benchmark: Any, many_sessions: Path) -> None:
    _group(benchmark)
    benchmark.extra_info.update(
        ops=SESSIONS * SESSION_EVENTS,
        baseline="test_report_orjson_baseline",
        aim_max_s=AIM_WARM_S,
    )
    _report(many_sessions)  # builds the index, warms the page cache and .pyc files
    out = benchmark.pedantic(_report, args=(many_sessions,), rounds=_rounds(), iterations=1)
    assert orjson.loads(out)["total"]["runs"] == SESSIONS


def test_report_cold_index(benchmark: Any, many_sessions: Path) -> None:
    _group(benchmark)
    benchmark.extra_info.update(
        ops=SESSIONS * SESSION_EVENTS,
        baseline="test_report_orjson_baseline",
        aim_max_s=AIM_COLD_S,
    )
    index = many_sessions / INDEX

    def forget() -> None:
        index.unlink(missing_ok=True)

    out = benchmark.pedantic(
        _report, args=(many_sessions,), setup=forget, rounds=_rounds(), iterations=1
    )
    assert orjson.loads(out)["total"]["runs"] == SESSIONS


@pytest.fixture(scope="module")
def two_sessions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    logs = tmp_path_factory.mktemp("diff") / "logs"
    for name in ("a", "b"):
        log = write_session(logs / "sessions" / name / "execution.jsonl", DIFF_EVENTS, name)
        _finish(log, DIFF_EVENTS)
    return logs


def _orjson_components(paths: list[Path]) -> list[dict[str, int]]:
    out = []
    for path in paths:
        tokens: dict[str, int] = {}
        with path.open("rb") as f:
            for line in f:
                event = orjson.loads(line)
                tokens[event["component"]] = tokens.get(event["component"], 0) + event["tokens"]
        out.append(tokens)
    return out


def _diff(logs: Path) -> bytes:
    return _sigil("diff", "a", "b", "--json", "--log-path", str(logs))


def test_diff_orjson_baseline(benchmark: Any, two_sessions: Path) -> None:
    benchmark.group = "sigil diff --json: two 100k-event sessions"
    benchmark.extra_info.update(ops=2 * DIFF_EVENTS)
    paths = [two_sessions / "sessions" / n / "execution.jsonl" for n in ("a", "b")]
    left, _ = benchmark.pedantic(_orjson_components, args=(paths,), rounds=_rounds(), iterations=1)
    doc = orjson.loads(_diff(two_sessions))
    assert {r["component"]: r["a"]["tokens"] for r in doc["components"]} == left


def test_diff(benchmark: Any, two_sessions: Path) -> None:
    benchmark.group = "sigil diff --json: two 100k-event sessions"
    benchmark.extra_info.update(
        ops=2 * DIFF_EVENTS, baseline="test_diff_orjson_baseline", aim_max_s=AIM_DIFF_S
    )
    _diff(two_sessions)
    out = benchmark.pedantic(_diff, args=(two_sessions,), rounds=_rounds(), iterations=1)
    assert orjson.loads(out)["a"]["tokens"] == orjson.loads(out)["b"]["tokens"]


# -- archived sessions ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def archived_sessions(many_sessions: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report's sessions, each archived as the rotator lays it out (the
    session's directory and its log in ``archive/<date>/<id>.tar.gz``)."""
    logs = tmp_path_factory.mktemp("report-archived") / "logs"
    day = logs / "archive" / "2026-01-12"
    day.mkdir(parents=True)
    for directory in sorted((many_sessions / "sessions").iterdir()):
        with tarfile.open(day / f"{directory.name}.tar.gz", "w:gz", compresslevel=6) as tar:
            tar.add(directory, arcname=directory.name, recursive=False)
            tar.add(directory / "execution.jsonl", arcname=f"{directory.name}/execution.jsonl")
    return logs


def _orjson_archived_daily(archives: list[Path]) -> dict[str, int]:
    """The pure-Python baseline: each archive streamed by tarfile, every line parsed."""
    days: dict[str, int] = {}
    for archive in archives:
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                extracted = tar.extractfile(member) if member.isfile() else None
                if extracted is None:
                    continue
                for line in extracted:
                    event = orjson.loads(line)
                    day = event["timestamp"][:10]
                    days[day] = days.get(day, 0) + event["tokens"]
    return days


def _archived_group(benchmark: Any) -> None:
    benchmark.group = f"sigil report daily --json: {REPORT_NAME} archived"


def test_report_archived_orjson_baseline(benchmark: Any, archived_sessions: Path) -> None:
    _archived_group(benchmark)
    benchmark.extra_info.update(ops=SESSIONS * SESSION_EVENTS)
    archives = sorted((archived_sessions / "archive").glob("*/*.tar.gz"))
    days = benchmark.pedantic(
        _orjson_archived_daily, args=(archives,), rounds=_rounds(), iterations=1
    )
    doc = orjson.loads(_report(archived_sessions))
    assert {r["period"]: r["tokens"] for r in doc["rows"]} == days


def test_report_archived_cold_index(benchmark: Any, archived_sessions: Path) -> None:
    _archived_group(benchmark)
    benchmark.extra_info.update(
        ops=SESSIONS * SESSION_EVENTS, baseline="test_report_archived_orjson_baseline"
    )
    index = archived_sessions / INDEX

    def forget() -> None:
        index.unlink(missing_ok=True)

    out = benchmark.pedantic(
        _report, args=(archived_sessions,), setup=forget, rounds=_rounds(), iterations=1
    )
    assert orjson.loads(out)["total"]["runs"] == SESSIONS
