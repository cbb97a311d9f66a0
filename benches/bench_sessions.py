"""Rows for reading a session's history (issue 10 items 7 and 8).

* A new run on a heavy finished session: the orchestrator's work before the
  run's ``session_start`` (lock, history, budget, open the log), beside parsing
  the same log line by line with orjson in Python (what any Python fold costs
  at least) in the same group. Target: under 300 ms on a 1M-event session.
  Quick mode (``SIGIL_BENCH_QUICK=1``) uses a 100K-event session and says so in
  the row's name; the time does not grow with the log once the session's ledger
  covers it.
* ``sigil sessions`` over 1,000 finished sessions of 1,000 events each (quick
  mode: 1,000 sessions of 100 events), sessions written through the Python API
  (no summaries: each is folded natively, with no tailer and no watcher),
  beside orjson per line over the same files. Target: under 0.3 s. Two rows:
  ``list_sessions`` in this process, and the whole ``sigil sessions --json``
  process (interpreter start-up, imports, the native batch fold of every
  session across a small thread pool, the JSON out).
* The same 1,000 sessions as ``sigil orchestrate`` leaves them: each with its
  ledger (``tokens.json``) written by the orchestrator from the model of exactly
  these files, which ``sessions`` reads instead of folding the log (the issue's
  "a finished session's summary may come from its ledger"). Same target.
* The same 1,000 sessions archived (``archive/<date>/<id>.tar.gz``, the ledger
  first, as ``sigil logs maintain`` leaves them): ``sessions`` folds each
  archive natively, as report, diff and replay read it, so that an archive cut
  short shows its readable part in every view (issue 13, contract 12), across
  a small thread pool with the GIL released. Beside it, reading only the
  ledger at each archive's front (what the listing did before: cheap, but the
  ledger's whole total for an archive whose log is cut). Same target.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import quick, write_session
from sigil.core.config import load_settings
from sigil.interfaces.cli.commands.sessions import list_sessions
from sigil.interfaces.cli.orchestrator import Orchestrator

pytestmark = pytest.mark.benchmark

AIM_START_S = 0.3
AIM_SESSIONS_S = 0.3
START_EVENTS = 100_000 if quick() else 1_000_000
START_NAME = "100k_events_quick" if quick() else "1m_events"
SESSIONS, SESSION_EVENTS = (1_000, 100) if quick() else (1_000, 1_000)
SESSIONS_NAME = "1000x100_events_quick" if quick() else "1000x1000_events"


def _rounds() -> int:
    return 3 if quick() else 5


def _finish(log: Path) -> None:
    """End the log's run as sigil's orchestrator does (a final event)."""
    final = {
        "timestamp": "2026-01-11T11:00:00.000000+00:00",
        "session_id": "bench",
        "event_type": "session_complete",
        "component": "orchestrator",
        "message": "Pipeline completed successfully",
        "tokens": 0,
        "metadata": {"status": "complete"},
        "seq": sum(1 for _ in log.open("rb")),
    }
    with log.open("ab") as f:
        f.write(orjson.dumps(final) + b"\n")


def _orjson_fold(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with path.open("rb") as f:
            for line in f:
                total += orjson.loads(line)["tokens"]
    return total


@pytest.fixture(scope="module")
def heavy_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    logs = tmp_path_factory.mktemp("heavy") / "logs"
    log = write_session(logs / "sessions" / "bench" / "execution.jsonl", START_EVENTS)
    _finish(log)
    # The first run on a session without summaries folds its log and writes the
    # ledger (a session written through the Python API has none).
    _prepare_once(logs)
    return logs


def _prepare_once(logs: Path) -> Orchestrator:
    settings = load_settings({"logging.path": str(logs)})
    orch = Orchestrator("bench", log_path=logs, settings=settings)
    orch._prepare("bench task")  # the work before session_start
    orch._abandon_prepared()  # nothing was written: give it back
    return orch


def test_new_run_start_orjson_baseline(benchmark: Any, heavy_session: Path) -> None:
    benchmark.group = f"new run on a heavy session: until session_start ({START_NAME})"
    benchmark.extra_info.update(ops=START_EVENTS)
    log = heavy_session / "sessions" / "bench" / "execution.jsonl"
    benchmark.pedantic(_orjson_fold, args=([log],), rounds=_rounds(), iterations=1)


def test_new_run_start(benchmark: Any, heavy_session: Path) -> None:
    benchmark.group = f"new run on a heavy session: until session_start ({START_NAME})"
    benchmark.extra_info.update(
        ops=START_EVENTS, baseline="test_new_run_start_orjson_baseline", aim_max_s=AIM_START_S
    )
    orch = benchmark.pedantic(_prepare_once, args=(heavy_session,), rounds=_rounds(), iterations=1)
    assert orch.run_number == 2


@pytest.fixture(scope="module")
def many_sessions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    logs = tmp_path_factory.mktemp("many") / "logs"
    for i in range(SESSIONS):
        log = write_session(logs / "sessions" / f"s{i:04d}" / "execution.jsonl", SESSION_EVENTS)
        _finish(log)
    return logs


def test_sessions_list_orjson_baseline(benchmark: Any, many_sessions: Path) -> None:
    benchmark.group = f"sigil sessions: {SESSIONS_NAME}"
    benchmark.extra_info.update(ops=SESSIONS)
    paths = [Path(e.path) / "execution.jsonl" for e in os.scandir(many_sessions / "sessions")]
    benchmark.pedantic(_orjson_fold, args=(paths,), rounds=_rounds(), iterations=1)


def _sessions_command(logs: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "sigil", "sessions", "--json", "--log-path", str(logs)],
        stdout=subprocess.DEVNULL,
        check=True,
    )


@pytest.fixture(scope="module")
def finished_sessions(tmp_path_factory: pytest.TempPathFactory, many_sessions: Path) -> Path:
    """``many_sessions``' logs, hard-linked, each with the ledger that the
    orchestrator writes the first time it reads a session."""
    logs = tmp_path_factory.mktemp("finished") / "logs"
    for entry in os.scandir(many_sessions / "sessions"):
        session = logs / "sessions" / entry.name
        session.mkdir(parents=True)
        os.link(Path(entry.path) / "execution.jsonl", session / "execution.jsonl")
    settings = load_settings({"logging.path": str(logs)})
    for entry in os.scandir(logs / "sessions"):
        orch = Orchestrator(entry.name, log_path=logs, settings=settings)
        orch._prepare("bench task")
        orch._abandon_prepared()
        assert (Path(entry.path) / "tokens.json").exists()
    return logs


#: Which sessions a row lists: written through the Python API (no ledger, every
#: log folded), or as ``sigil orchestrate`` leaves them (each with its ledger).
KINDS = {"python_api": "many_sessions", "finished": "finished_sessions"}


def _row(benchmark: Any) -> None:
    benchmark.group = f"sigil sessions: {SESSIONS_NAME}"
    benchmark.extra_info.update(
        ops=SESSIONS, baseline="test_sessions_list_orjson_baseline", aim_max_s=AIM_SESSIONS_S
    )


@pytest.mark.parametrize("kind", KINDS)
def test_sessions_list(
    benchmark: Any, request: pytest.FixtureRequest, many_sessions: Path, kind: str
) -> None:
    _row(benchmark)
    logs = request.getfixturevalue(KINDS[kind])
    rows = benchmark.pedantic(list_sessions, args=(logs,), rounds=_rounds(), iterations=1)
    assert len(rows) == SESSIONS and {r.status for r in rows} == {"complete"}

    # A ledger's numbers are the fold's: the same as the logs alone give.
    def numbers(logs: Path) -> dict[str, Any]:
        return {r.session_id: (r.tokens_used, r.runs, r.status) for r in list_sessions(logs)}

    assert numbers(logs) == numbers(many_sessions)


@pytest.mark.parametrize("kind", KINDS)
def test_sessions_command(benchmark: Any, request: pytest.FixtureRequest, kind: str) -> None:
    _row(benchmark)
    logs = request.getfixturevalue(KINDS[kind])
    _sessions_command(logs)  # warm the page cache and .pyc files
    benchmark.pedantic(_sessions_command, args=(logs,), rounds=_rounds(), iterations=1)


@pytest.fixture(scope="module")
def archived_sessions(tmp_path_factory: pytest.TempPathFactory, finished_sessions: Path) -> Path:
    """``finished_sessions`` archived, one tar.gz each (the ledger first)."""
    import tarfile

    logs = tmp_path_factory.mktemp("archived") / "logs"
    day = logs / "archive" / "2026-01-11"
    day.mkdir(parents=True)
    for entry in os.scandir(finished_sessions / "sessions"):
        with tarfile.open(day / f"{entry.name}.tar.gz", "w:gz", compresslevel=6) as tar:
            for name in ("tokens.json", "execution.jsonl"):
                tar.add(Path(entry.path) / name, arcname=f"{entry.name}/{name}")
    return logs


def _ledgers_only(logs: Path) -> int:
    """Each archive's ledger read from its front: the listing's cost before
    archives were folded."""
    from sigil.telemetry.log_rotation import archived_sessions, read_archived_summaries

    total = 0
    for archives in archived_sessions(logs).values():
        for archive in archives:
            total += orjson.loads(read_archived_summaries(archive)["tokens.json"])["total_used"]
    return total


def test_sessions_list_archived_ledgers_only_baseline(
    benchmark: Any, archived_sessions: Path
) -> None:
    benchmark.group = f"sigil sessions, archived: {SESSIONS_NAME}"
    benchmark.extra_info.update(ops=SESSIONS)
    benchmark.pedantic(_ledgers_only, args=(archived_sessions,), rounds=_rounds(), iterations=1)


def test_sessions_list_archived(
    benchmark: Any, archived_sessions: Path, finished_sessions: Path
) -> None:
    benchmark.group = f"sigil sessions, archived: {SESSIONS_NAME}"
    benchmark.extra_info.update(
        ops=SESSIONS,
        baseline="test_sessions_list_archived_ledgers_only_baseline",
        aim_max_s=AIM_SESSIONS_S,
    )
    rows = benchmark.pedantic(
        list_sessions, args=(archived_sessions,), rounds=_rounds(), iterations=1
    )
    assert len(rows) == SESSIONS and all(r.archived and r.error is None for r in rows)
    live = {
        r.session_id: (r.tokens_used, r.runs, r.status) for r in list_sessions(finished_sessions)
    }
    assert {r.session_id: (r.tokens_used, r.runs, r.status) for r in rows} == live
