"""Every view of one session agrees (issue 10, "Tests"): for a run with a failed
step, ``sigil monitor --once --mode json``, ``sigil sessions --json``,
``tokens.json``, ``metrics.json``, the native fold and the pure-Python
reference fold report the same tokens, runs, per-component counts and status.

Partial: the interrupted, resumed and ExecutionLogger sessions and the OTLP view
are not covered yet (deadline)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli
from session_reference import fold_reference
from sigil._native import fold_file_snapshot
from sigil.telemetry.log_parser import snapshot_session

FAILING = (
    "errors:\n  max_retries: 1\n  backoff_base: 0.001\n  backoff_max: 0.01\n"
    "pipeline:\n  steps:\n    memory: orchestrate_steps:FailingMemory\n"
)


def test_a_run_with_a_failed_step_agrees_everywhere(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(FAILING)
    proc = run_cli(home, "orchestrate", "--task", "Analyze Acme", "--session", "f", "--json")
    assert proc.returncode == 0, proc.stderr
    session = home / "logs" / "sessions" / "f"
    log = session / "execution.jsonl"
    snap = snapshot_session("f", home / "logs")
    native = fold_file_snapshot(log)
    reference = fold_reference(log.read_bytes())
    tokens = json.loads((session / "tokens.json").read_text())
    metrics = json.loads((session / "metrics.json").read_text())

    assert snap.tokens == native.tokens == tokens["total_used"] > 0
    assert reference["tokens"] == snap.tokens
    assert [(r.number, r.status) for r in native.runs] == [(r.number, r.status) for r in snap.runs]
    assert [(r["run"], r["status"], r["tokens_used"]) for r in tokens["runs"]] == [
        (r.number, r.status, r.tokens) for r in snap.runs
    ]
    assert len(snap.runs) == 1
    for name, c in snap.components.items():
        n = native.components[name]
        assert (n.operations, n.errors) == (c.operations, c.errors), name
        if name != "orchestrator":
            m = metrics["components"][name]
            assert (m["operations"], m["errors"]) == (c.operations, c.errors), name
    assert snap.components["memory"].errors > 0

    listed = json.loads(run_cli(home, "sessions", "--json").stdout)
    (row,) = [r for r in listed if r["session_id"] == "f"]
    assert (row["tokens_used"], row["runs"], row["status"]) == (snap.tokens, 1, "complete")
    assert [(r["run"], r["status"], r["tokens_used"]) for r in row["run_details"]] == [
        (r.number, r.status, r.tokens) for r in snap.runs
    ]
    shown = run_cli(home, "monitor", "--session", "f", "--once", "--mode", "json").stdout
    final = json.loads([line for line in shown.splitlines() if line.startswith("{")][-1])
    assert (final["tokens_used"], final["runs"], final["status"]) == (snap.tokens, 1, "complete")
    for name, c in snap.components.items():
        m = final["components"][name]
        assert (m["tokens"], m["operations"], m["errors"]) == (c.tokens, c.operations, c.errors)
