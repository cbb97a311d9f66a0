"""The orchestrator reads a session's history from the native session model and
writes ``tokens.json``/``metrics.json`` from it (issue 10 items 4 and 7,
contract 12): the summaries agree with the model exactly, and a new run on a
heavy session does not fold the history in Python."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from conftest import run_cli
from sigil.interfaces.cli.orchestrator import read_session_history
from sigil.telemetry.log_parser import snapshot_session

FAILING = (
    "errors:\n  max_retries: 1\n  backoff_base: 0.001\n  backoff_max: 0.01\n"
    "pipeline:\n  steps:\n    memory: orchestrate_steps:FailingMemory\n"
)


def test_summaries_agree_with_the_session_model(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(FAILING)
    for _ in range(2):
        proc = run_cli(home, "orchestrate", "--task", "Analyze Acme", "--session", "m", "--json")
        assert proc.returncode == 0, proc.stderr
    session = home / "logs" / "sessions" / "m"
    snap = snapshot_session("m", home / "logs")
    tokens = json.loads((session / "tokens.json").read_text())
    metrics = json.loads((session / "metrics.json").read_text())
    assert tokens["total_used"] == snap.tokens
    assert [(r["run"], r["status"], r["tokens_used"]) for r in tokens["runs"]] == [
        (r.number, r.status, r.tokens) for r in snap.runs
    ]
    assert metrics["steps_completed"] == snap.event_counts["step_complete"]
    assert metrics["steps_failed"] == snap.event_counts["step_error"] == 2
    for name, c in snap.components.items():
        if name == "orchestrator":
            continue
        m = metrics["components"][name]
        # Operations are successful steps; a failed step's latency is not theirs.
        assert (m["operations"], m["errors"], m["retries"]) == (c.operations, c.errors, c.retries)
        assert m["latency_ms"] == round(c.latency_ms, 3), name
        for key in ("average_latency_ms", "p50_latency_ms", "p95_latency_ms"):
            model = getattr(c, key)
            assert m[key] == (None if model is None else round(model, 3)), (name, key)
    assert metrics["components"]["memory"]["operations"] == 0


def _heavy_session(log_path: Path, sid: str, events: int) -> Path:
    session = log_path / "sessions" / sid
    session.mkdir(parents=True)
    start = datetime.now(UTC) - timedelta(hours=1)
    lines = []
    for seq in range(events):
        event_type = (
            "session_start" if seq == 0
            else "session_complete" if seq == events - 1
            else "step_complete"
        )  # fmt: skip
        meta: dict[str, object] = {"latency_ms": 1.5}
        if seq == 0:
            meta = {"run": 1, "budget": 10**9, "task": "t"}
        elif seq == events - 1:
            meta = {"status": "complete"}
        lines.append(
            orjson.dumps(
                {
                    "timestamp": (start + timedelta(microseconds=seq)).isoformat(),
                    "session_id": sid,
                    "event_type": event_type,
                    "component": "reasoning" if 0 < seq < events - 1 else "orchestrator",
                    "message": "x",
                    "tokens": 3 if 0 < seq < events - 1 else 0,
                    "metadata": meta,
                    "seq": seq,
                }
            )
        )
    log = session / "execution.jsonl"
    log.write_bytes(b"\n".join(lines) + b"\n")
    return log


def test_a_heavy_sessions_history_is_read_faster_than_parsing_each_line(tmp_path: Path) -> None:
    """Reading the history of a 200K-event session costs less than merely
    parsing its lines one by one in Python (the old Python fold cost ~8x that)."""
    events = 200_000
    log = _heavy_session(tmp_path / "logs", "heavy", events)
    session = log.parent

    best_history = best_parse = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        history = read_session_history(session)
        best_history = min(best_history, time.perf_counter() - t0)
        t0 = time.perf_counter()
        with log.open("rb") as f:
            parsed = sum(orjson.loads(line)["tokens"] for line in f)
        best_parse = min(best_parse, time.perf_counter() - t0)
    assert history.tokens_used == parsed == 3 * (events - 2)
    assert [(r.run, r.status) for r in history.runs] == [(1, "complete")]
    assert best_history < best_parse, (best_history, best_parse)
