"""Every number ``sigil monitor`` shows is the native session model's (issue 10;
ARCHITECTURE.md contract 12).

Each test writes a real session log, runs the real ``sigil monitor`` (``--once``,
in a subprocess or on a pseudo-terminal read by pyte) and checks what it shows
against the model (``fold_file_snapshot``) and the pure-Python reference fold
(``tests/session_reference.py``): rates that are not zero for a short session,
"stalled" while nothing arrives, component operations and latency under the
model's rule, and failures that say why.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import SIGIL, isolated_env
from session_reference import fold_reference
from sigil._native import fold_file_snapshot
from sigil.core.locks import SessionLock
from terminal import Terminal

T0 = datetime(2026, 1, 15, 10, 0, 0, tzinfo=UTC)


def line(
    at: datetime | float,
    kind: str,
    component: str = "orchestrator",
    tokens: int = 0,
    seq: int = 0,
    session: str = "m-1",
    message: str | None = None,
    **meta: Any,
) -> dict[str, Any]:
    moment = at if isinstance(at, datetime) else T0 + timedelta(seconds=at)
    return {
        "timestamp": moment.isoformat(timespec="microseconds"),
        "session_id": session,
        "event_type": kind,
        "component": component,
        "message": message or f"{component} {kind}",
        "tokens": tokens,
        "metadata": meta,
        "seq": seq,
    }


def write(home: Path, session: str, events: list[dict[str, Any]]) -> Path:
    directory = home / "logs" / "sessions" / session
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / "execution.jsonl"
    for seq, event in enumerate(events):
        event["seq"], event["session_id"] = seq, session
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return path


def monitor_json(home: Path, session: str) -> tuple[int, dict[str, Any]]:
    """``sigil monitor --mode json --once``: its exit code and final object."""
    proc = subprocess.run(
        [*SIGIL, "monitor", "--session", session, "--mode", "json", "--once"],
        env=isolated_env(home, TZ="UTC"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    objects = [orjson.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    assert objects and objects[-1]["type"] == "final", proc.stdout + proc.stderr
    return proc.returncode, objects[-1]


def monitor_screen(home: Path, session: str, cols: int = 80, rows: int = 80) -> tuple[int, str]:
    """``sigil monitor --once`` (dashboard) on a real terminal of ``cols`` x ``rows``."""
    env = isolated_env(home, TERM="xterm-256color", NO_COLOR="1", TZ="UTC")
    term = Terminal([*SIGIL, "monitor", "--session", session, "--once"], env, cols=cols, rows=rows)
    try:
        code = term.wait(60)
        return code, term.text()
    finally:
        term.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


# -- rates (issue 10 item 2) ------------------------------------------------------------


def _short_session() -> list[dict[str, Any]]:
    """The README demo's shape: 2,704 tokens in 0.137 s."""
    return [
        line(0.0, "session_start", budget=256_000, run=1),
        line(0.030, "step_complete", "routing", 104, latency_ms=30.0),
        line(0.080, "step_complete", "planning", 600, latency_ms=50.0),
        line(0.130, "step_complete", "reasoning", 2000, latency_ms=50.0),
        line(0.137, "session_complete", status="complete", run=1),
    ]


def test_a_finished_short_session_shows_its_rate(home: Path) -> None:
    path = write(home, "short-1", _short_session())
    model = fold_file_snapshot(path)
    code, final = monitor_json(home, "short-1")
    assert code == 0
    assert final["tokens_per_second"] == pytest.approx(model.recent_tokens_per_second(60.0), 1e-3)
    assert final["tokens_per_second"] == pytest.approx(2704 / 0.137, rel=1e-3)
    assert final["average_tokens_per_second"] == pytest.approx(2704 / 0.137, rel=1e-3)
    code, screen = monitor_screen(home, "short-1")
    assert code == 0
    # The dashboard's burn rate is per minute: the same 19,737 tok/s.
    assert f"Burn    {final['tokens_per_second'] * 60:,.0f} tok/min" in screen, screen
    assert "Rate:      19,737 tok/s" in screen  # the final summary too


def test_a_stalled_run_says_so_and_forecasts_from_the_recent_rate(home: Path) -> None:
    """100 tokens every 2 s for ~5 minutes, then nothing for 20 s (a long model
    call): the screen says "stalled", the recent rate decays and the forecast is
    the recent rate's, not the whole-run average's."""
    now = datetime.now(UTC)
    start = now - timedelta(seconds=300)
    events = [line(start, "session_start", budget=100_000, run=1)]
    events += [
        line(start + timedelta(seconds=2 * i), "step_complete", "reasoning", 100, latency_ms=5.0)
        for i in range(1, 141)
    ]
    path = write(home, "stall-1", events)
    idle = (now - (start + timedelta(seconds=280))).total_seconds()
    assert idle == pytest.approx(20.0)
    with SessionLock(path.parent).acquire():  # the writer is alive, only quiet
        code, final = monitor_json(home, "stall-1")
        _, screen = monitor_screen(home, "stall-1")
    assert code == 0 and final["status"] == "running"
    assert final["stalled_seconds"] >= 19
    model = fold_file_snapshot(path)
    recent = model.recent_tokens_per_second(60.0, final["stalled_seconds"])
    assert recent is not None and recent < 40  # 50 tok/s while it ran, decaying since
    assert final["tokens_per_second"] == pytest.approx(recent, rel=0.1)
    assert final["seconds_to_budget_end"] == pytest.approx((100_000 - 14_000) / recent, rel=0.1)
    assert "stalled 2" in screen, screen  # "stalled 20.xs"


def test_now_running_shows_a_step_started_before_a_burst_of_events(home: Path) -> None:
    """Issue 12 ("Now running"): a step started 500 events before the end (token
    counts of another component) is still the step in flight, with its attempt."""
    now = datetime.now(UTC)
    start = now - timedelta(seconds=30)
    events = [
        line(start, "session_start", budget=1_000_000, run=1),
        line(start + timedelta(seconds=1), "step_start", "reasoning", attempt=2),
    ]
    events += [
        line(start + timedelta(seconds=2), "token_consumption", "memory", 10) for _ in range(500)
    ]
    path = write(home, "burst-1", events)
    step = fold_file_snapshot(path).in_flight
    assert step is not None and (step.component, step.attempt) == ("reasoning", 2)
    with SessionLock(path.parent).acquire():  # the writer is alive
        code, screen = monitor_screen(home, "burst-1", cols=100)
    assert code == 0
    assert "Now     reasoning  attempt 2" in screen, screen


# -- components (item 4) ----------------------------------------------------------------


def _failed_reasoning() -> list[dict[str, Any]]:
    return [
        line(0.0, "session_start", budget=10_000, run=1),
        line(0.9, "step_complete", "routing", 50, latency_ms=900.0),
        line(2.5, "step_complete", "planning", 300, latency_ms=1600.0),
        line(3.0, "step_complete", "planning", 200, latency_ms=400.0),
        line(
            16.0,
            "step_error",
            "reasoning",
            0,
            latency_ms=13004.9,
            attempt=3,
            category="timeout",
            error="model call timed out after 13 s",
        ),
        line(
            16.1,
            "session_error",
            status="error",
            run=1,
            reason="reasoning failed after 3 attempts: model call timed out after 13 s",
        ),
    ]


def test_component_operations_and_latency_are_the_models(home: Path) -> None:
    path = write(home, "comp-1", _failed_reasoning())
    model = fold_file_snapshot(path)
    code, final = monitor_json(home, "comp-1")
    assert code == 1
    reasoning = final["components"]["reasoning"]
    assert (reasoning["operations"], reasoning["errors"]) == (0, 1)
    assert reasoning["avg_latency_ms"] is None and reasoning["p95_latency_ms"] is None
    for name, comp in model.components.items():
        shown = final["components"][name]
        assert shown["operations"] == comp.operations
        assert shown["errors"] == comp.errors
        assert shown["avg_latency_ms"] == (
            None if comp.average_latency_ms is None else round(comp.average_latency_ms, 3)
        )
        assert shown["p95_latency_ms"] == (
            None if comp.p95_latency_ms is None else round(comp.p95_latency_ms, 3)
        )


def test_the_narrow_dashboard_names_the_slowest_component(home: Path) -> None:
    """The failed reasoning call's 13 s are not a successful step's latency:
    planning (2,000 ms over its steps) is the slowest."""
    write(home, "comp-2", _failed_reasoning())
    _, screen = monitor_screen(home, "comp-2", cols=50)
    assert "Slowest planning 1,000ms/op" in screen, screen
    assert "Slowest reasoning" not in screen


# -- failures say why (item 9) ----------------------------------------------------------


def test_a_failed_run_says_why(home: Path) -> None:
    write(home, "fail-1", _failed_reasoning())
    code, screen = monitor_screen(home, "fail-1", cols=120)
    assert code == 1
    flat = " ".join(screen.split())
    assert "EXECUTION FAILED" in screen
    assert "Reason: reasoning failed after 3 attempts: model call timed out after 13 s" in flat, (
        screen
    )
    # The errors panel: which component, what went wrong, at which attempt, when.
    assert "! reasoning error  timeout · attempt 3 · 10:00:16" in screen, screen
    assert "    model call timed out after 13 s" in screen.splitlines(), screen
    assert "step errors" not in screen
    code, final = monitor_json(home, "fail-1")
    assert final["reason"] == "reasoning failed after 3 attempts: model call timed out after 13 s"
    assert final["components"]["reasoning"]["last_error"]["message"] == (
        "model call timed out after 13 s"
    )


# -- every view agrees with the model (item 4, "Tests") ---------------------------------


def _interrupted() -> list[dict[str, Any]]:
    return [
        line(0.0, "session_start", budget=10_000, run=1),
        line(1.0, "step_complete", "routing", 40, latency_ms=1000.0),
        line(2.0, "token_consumption", "memory", 70),
        line(2.5, "session_error", status="interrupted", run=1, reason="SIGINT"),
    ]


def _resumed() -> list[dict[str, Any]]:
    """Run 1 interrupted, run 2 (``--resume``) completes it."""
    return [
        *_interrupted(),
        line(10.0, "session_start", budget=10_000, run=2),
        line(10.1, "retry_attempt", message="Resuming run 1", resume=True, run=2),
        line(11.0, "step_complete", "memory", 90, latency_ms=900.0),
        line(12.0, "step_error", "planning", 0, latency_ms=50.0, error="bad plan", attempt=1),
        line(13.0, "step_complete", "planning", 25, latency_ms=1000.0, attempt=2),
        line(14.0, "session_complete", status="complete", run=2),
    ]


def _python_api_session(home: Path, session: str) -> Path:
    """A session written with the README's Python API (``ExecutionLogger``)."""
    from sigil.telemetry.execution_logger import ExecutionLogger

    logger = ExecutionLogger(session, home / "logs", fsync="never")
    logger.initialize_sync()
    logger.log_event_sync("session_start", "orchestrator", "start", metadata={"budget": 5000})
    logger.log_event_sync(
        "step_complete", "routing", "routed", tokens=12, metadata={"latency_ms": 3.5}
    )
    logger.log_event_sync(
        "step_error",
        "reasoning",
        "failed",
        tokens=7,
        metadata={"latency_ms": 40.0, "error": "boom"},
    )
    logger.log_event_sync("token_consumption", "reasoning", "used", tokens=30)
    logger.log_event_sync(
        "session_complete", "orchestrator", "done", metadata={"status": "complete"}
    )
    logger.close_sync()
    return home / "logs" / "sessions" / session / "execution.jsonl"


@pytest.mark.parametrize("case", ["failed_step", "interrupted", "resumed", "python_api"])
def test_monitor_json_agrees_with_the_model_and_the_reference(home: Path, case: str) -> None:
    session = f"agree-{case.replace('_', '-')}"
    if case == "python_api":
        path = _python_api_session(home, session)
    else:
        events = {
            "failed_step": _failed_reasoning,
            "interrupted": _interrupted,
            "resumed": _resumed,
        }[case]()
        path = write(home, session, events)
    model = fold_file_snapshot(path)
    reference = fold_reference(path.read_bytes())
    code, final = monitor_json(home, session)
    expected_code = {"complete": 0, "interrupted": 130}.get(model.status, 1)
    assert code == expected_code == final["exit_code"]
    for truth in (model.to_dict(), reference):
        assert final["status"] == truth["status"]
        assert final["reason"] == truth["reason"]
        assert final["tokens_used"] == truth["tokens"]
        assert final["runs"] == truth["run_count"]
        assert final["events"] == truth["entries"]
        assert final["run"]["number"] == truth["run"]["number"]
        assert final["run"]["status"] == truth["run"]["status"]
        assert final["run"]["tokens_used"] == truth["run"]["tokens"]
        assert final["run"]["components"] == {
            k: c["tokens"] for k, c in truth["run"]["components"].items()
        }
        assert set(final["components"]) == set(truth["components"])
        for name, comp in truth["components"].items():
            shown = final["components"][name]
            got = (shown["tokens"], shown["operations"], shown["errors"], shown["retries"])
            assert got == (comp["tokens"], comp["operations"], comp["errors"], comp["retries"])
            assert shown["latency_ms"] == pytest.approx(comp["latency_ms"])
    # The human views show the same numbers.
    _, screen = monitor_screen(home, session, cols=100)
    assert f"Tokens:    {model.tokens:,} / " in screen
    if model.run_count > 1:
        assert f"(run {model.run.number} of {model.run_count})" in screen


def test_a_real_failed_run_shows_what_metrics_json_says(home: Path) -> None:
    """``sigil orchestrate`` with a reasoning step that fails: the monitor's
    component numbers, slowest component and failure reason are ``metrics.json``'s."""
    home.mkdir(parents=True)
    (home / "config.yaml").write_text(
        "errors:\n  max_retries: 3\n  backoff_base: 0.001\n  backoff_max: 0.01\n"
        "pipeline:\n  steps:\n    reasoning: orchestrate_steps:FailingReasoning\n"
    )
    run = subprocess.run(
        [*SIGIL, "orchestrate", "--task", "Analyze", "--session", "real-1", "--json"],
        env=isolated_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    session = home / "logs" / "sessions" / "real-1"
    metrics = orjson.loads((session / "metrics.json").read_bytes())
    code, final = monitor_json(home, "real-1")
    assert code == 1 and final["status"] == "error" == metrics["status"]
    for name, comp in metrics["components"].items():
        shown = final["components"][name]
        assert (shown["operations"], shown["errors"], shown["retries"]) == (
            comp["operations"],
            comp["errors"],
            comp["retries"],
        )
        assert shown["avg_latency_ms"] == comp["average_latency_ms"]
    assert final["components"]["reasoning"]["last_error"]["message"] == (
        "reasoning exploded on purpose"
    )
    assert "reasoning exploded on purpose" in final["reason"]
    _, screen = monitor_screen(home, "real-1", cols=50)
    assert f"Slowest {metrics['slowest_component']} " in screen, screen
