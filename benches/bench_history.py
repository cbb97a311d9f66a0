"""Rows for the end of a run on a heavy session (issue 10, contract 12).

At the end of every run the orchestrator writes ``tokens.json`` (the ledger)
and ``metrics.json`` from the session's whole history. The fold of the log at
rest is kept from the run's start (or made beside the run's steps when the
ledger spared it) and continued with the run's own events, so the end of a run
does not fold the log again. In one group, on a 1M-event session (quick mode,
``SIGIL_BENCH_QUICK=1``: 100K events, said in the row's name):

* the continued fold plus both summary files (the row; aim: under 50 ms);
* folding the whole history again plus both files (what a run's end did
  before: ``read_session_history``);
* parsing the same log line by line with orjson in Python (what any Python
  fold costs at least: the pure-Python baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import event_line, quick, write_session
from sigil.core.config import load_settings
from sigil.interfaces.cli.orchestrator import Orchestrator, SessionHistory, read_session_history
from sigil.telemetry.log_parser import HistoryModel

pytestmark = pytest.mark.benchmark

AIM_END_S = 0.05
EVENTS = 100_000 if quick() else 1_000_000
NAME = "100k_events_quick" if quick() else "1m_events"
GROUP = f"end of a run on a heavy session: history, tokens.json, metrics.json ({NAME})"
#: The run's own events: start, a few steps, its final event.
RUN_EVENTS = 40


def _rounds() -> int:
    return 3 if quick() else 5


def _line(seq: int, event_type: str, meta: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "timestamp": "2026-01-11T11:00:00.000000+00:00",
            "session_id": "bench",
            "event_type": event_type,
            "component": "orchestrator",
            "message": event_type,
            "tokens": 0,
            "metadata": meta,
            "seq": seq,
        }
    )


class _Session:
    """A finished 1-run heavy session with its ledger, and the bytes a second
    run appends; :meth:`reset` puts the files back as they were at rest."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.dir = logs / "sessions" / "bench"
        self.log = write_session(self.dir / "execution.jsonl", EVENTS)
        with self.log.open("ab") as f:
            f.write(_line(EVENTS, "session_complete", {"status": "complete", "run": 1}) + b"\n")
        self.orch = Orchestrator("bench", log_path=logs, settings=load_settings({}))
        # The ledger of the first run, as its end wrote it.
        self.orch._write_history(read_session_history(self.dir), {})
        self.rest = self.log.read_bytes()
        self.summaries = {
            name: (self.dir / name).read_bytes() for name in ("tokens.json", "metrics.json")
        }
        first = EVENTS + 1
        run = [_line(first, "session_start", {"run": 2, "budget": 10**12, "task": "bench"})]
        run += [event_line(seq) for seq in range(first + 1, first + RUN_EVENTS - 1)]
        run += [_line(first + RUN_EVENTS - 1, "session_complete", {"status": "complete"})]
        self.run = b"".join(line + b"\n" for line in run)

    def reset(self) -> None:
        self.log.write_bytes(self.rest)
        for name, data in self.summaries.items():
            (self.dir / name).write_bytes(data)

    def append_run(self) -> None:
        with self.log.open("ab") as f:
            f.write(self.run)

    def check(self) -> None:
        history = read_session_history(self.dir)
        assert [(r.run, r.status) for r in history.runs] == [(1, "complete"), (2, "complete")]
        assert history.ledger_seq == history.last_seq == EVENTS + RUN_EVENTS


@pytest.fixture(scope="module")
def heavy(tmp_path_factory: pytest.TempPathFactory) -> _Session:
    return _Session(tmp_path_factory.mktemp("history") / "logs")


def _orjson_fold(path: Path) -> int:
    total = 0
    with path.open("rb") as f:
        for line in f:
            total += orjson.loads(line)["tokens"]
    return total


def test_run_end_orjson_baseline(benchmark: Any, heavy: _Session) -> None:
    benchmark.group = GROUP
    benchmark.extra_info.update(ops=EVENTS)
    heavy.reset()
    heavy.append_run()
    benchmark.pedantic(_orjson_fold, args=(heavy.log,), rounds=_rounds(), iterations=1)


def test_run_end_refold(benchmark: Any, heavy: _Session) -> None:
    """A run's end as it was: the whole history folded again."""
    benchmark.group = GROUP
    benchmark.extra_info.update(ops=EVENTS, baseline="test_run_end_orjson_baseline")

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        heavy.reset()
        heavy.append_run()
        return (), {}

    def end() -> None:
        heavy.orch._write_history(read_session_history(heavy.dir), {})

    benchmark.pedantic(end, setup=setup, rounds=_rounds(), iterations=1)
    heavy.check()


def test_run_end(benchmark: Any, heavy: _Session) -> None:
    """A run's end now: the fold at rest continued with the run's events."""
    benchmark.group = GROUP
    benchmark.extra_info.update(
        ops=EVENTS,
        baseline="test_run_end_orjson_baseline",
        baselines={"test_run_end_refold": None},
        aim_max_s=AIM_END_S,
    )

    def setup() -> tuple[tuple[HistoryModel], dict[str, Any]]:
        heavy.reset()
        model = HistoryModel(heavy.dir, last_n=512)
        model.read()  # the run's start: the ledger is current, no fold
        model.fold_at_rest()  # beside the run's steps
        heavy.append_run()
        return (model,), {}

    def end(model: HistoryModel) -> None:
        history = model.at_run_end()
        assert history is not None
        heavy.orch._write_history(SessionHistory.of(history), {})

    benchmark.pedantic(end, setup=setup, rounds=_rounds(), iterations=1)
    heavy.check()
