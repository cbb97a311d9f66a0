"""A session ID names one history, also after ``sigil logs maintain`` archived it.

Reusing an archived ID used to start a second history under the same name:
run numbers back at 1, the budget fresh, ``sigil sessions`` listing the ID
twice, ``sigil diff`` and ``sigil report`` mixing the two. Every writer
(``sigil orchestrate``, ``sigil run``/``sigil proxy``, any ExecutionLogger)
now refuses an archived ID with one line naming the archive, and writes
nothing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import SIGIL, isolated_env, run_cli

pytestmark = [pytest.mark.timeout(120)]


def _archived(home: Path) -> Path:
    """Session ``demo`` with two runs, archived by ``sigil logs maintain``."""
    for _ in range(2):
        done = run_cli(home, "orchestrate", "-t", "Analyze Acme", "-s", "demo", "-b", "300000")
        assert done.returncode == 0, done.stderr
    (home / "config.yaml").write_text("logging:\n  retention_days: 0\n")
    kept = run_cli(home, "logs", "maintain")
    assert kept.returncode == 0, kept.stderr
    (archive,) = (home / "logs" / "archive").glob("*/demo.tar.gz")
    assert not (home / "logs" / "sessions" / "demo").exists()
    return archive


def _listed(home: Path) -> list[dict[str, object]]:
    proc = run_cli(home, "sessions", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    rows = data["sessions"] if isinstance(data, dict) else data
    return [row for row in rows if row.get("session_id", row.get("id")) == "demo"]


def _one_line_refusal(proc: subprocess.CompletedProcess[str], archive: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "archived" in lines[0] and archive.name in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_orchestrate_refuses_an_archived_session_id(sigil_home: Path) -> None:
    archive = _archived(sigil_home)
    before = archive.read_bytes()
    assert len(_listed(sigil_home)) == 1
    proc = run_cli(sigil_home, "orchestrate", "-t", "Analyze Acme", "-s", "demo")
    _one_line_refusal(proc, archive)
    # Nothing written: no second history beside the archive, the archive untouched.
    assert not (sigil_home / "logs" / "sessions" / "demo").exists()
    assert archive.read_bytes() == before
    assert len(_listed(sigil_home)) == 1
    resumed = run_cli(sigil_home, "orchestrate", "-s", "demo", "--resume")
    _one_line_refusal(resumed, archive)
    # Another ID is fine.
    other = run_cli(sigil_home, "orchestrate", "-t", "Analyze Acme", "-s", "demo2")
    assert other.returncode == 0, other.stderr


def test_run_and_proxy_refuse_an_archived_session_id(sigil_home: Path) -> None:
    archive = _archived(sigil_home)
    proc = run_cli(
        sigil_home, "run", "-s", "demo", "--upstream", "http://127.0.0.1:9/v1", "--", "true"
    )
    _one_line_refusal(proc, archive)
    proxy = subprocess.run(
        [*SIGIL, "proxy", "-s", "demo", "--upstream", "http://127.0.0.1:9/v1", "--port", "0"],
        env=isolated_env(sigil_home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _one_line_refusal(proxy, archive)
    assert not (sigil_home / "logs" / "sessions" / "demo").exists()


def test_an_execution_logger_refuses_an_archived_session_id(sigil_home: Path) -> None:
    from sigil.core.locks import SessionBusy
    from sigil.telemetry.execution_logger import ExecutionLogger

    archive = _archived(sigil_home)
    logger = ExecutionLogger("demo", log_path=sigil_home / "logs")
    with pytest.raises(SessionBusy, match="archived") as caught:
        logger.log_event_sync("step_complete", "routing", "late", tokens=5)
    assert str(archive) in str(caught.value)
    assert not (sigil_home / "logs" / "sessions" / "demo").exists()


def test_every_view_shows_the_archived_session_once(sigil_home: Path) -> None:
    """After a refused reuse: sessions, report, diff and the monitor all show
    the one archived history (two runs), never a second one."""
    archive = _archived(sigil_home)
    refused = run_cli(sigil_home, "orchestrate", "-t", "Analyze Acme", "-s", "demo")
    assert refused.returncode == 2
    assert len(_listed(sigil_home)) == 1
    report = run_cli(sigil_home, "report", "session", "--json")
    assert report.returncode == 0, report.stderr
    (row,) = [r for r in json.loads(report.stdout)["rows"] if r["session"] == "demo"]
    assert row["runs"] == 2 and row["sessions"] == 1
    diff = run_cli(sigil_home, "diff", "demo@1", "demo@2")
    assert diff.returncode == 0, diff.stderr
    for args in (["--mode", "json", "--once"], ["--mode", "minimal"]):
        monitor = run_cli(sigil_home, "monitor", "-s", "demo", *args, timeout=30)
        assert monitor.returncode == 2, (args, monitor.stderr)
        (line,) = monitor.stderr.strip().splitlines()
        assert "archived" in line and archive.name in line, line
    assert not (sigil_home / "logs" / "sessions" / "demo").exists()


def test_collect_rejects_spans_of_an_archived_session_for_good(sigil_home: Path) -> None:
    """Spans for an archived session are rejected as an OTLP partial success
    (a 200 the exporter does not retry, not a 503 "busy"); the other spans
    of the request are written and nothing is created for the archived ID."""
    import httpx

    from test_collect import TRACE, Collector, _json_request, _json_span, wait_tokens

    archive = _archived(sigil_home)
    logs = sigil_home / "logs"
    collector = Collector(sigil_home, logs, "--idle", "600")
    try:
        body = _json_request(
            _json_span(TRACE, "eee19b7ec3c1b191", tokens=(40, 2), sid="demo"),
            _json_span(TRACE, "eee19b7ec3c1b192", tokens=(10, 1), sid="fresh"),
        )
        r = httpx.post(collector.url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        partial = r.json()["partialSuccess"]
        assert int(partial["rejectedSpans"]) == 1
        assert "demo" in partial["errorMessage"] and "archived" in partial["errorMessage"]
        wait_tokens(collector.session_dir("fresh"), 11)
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        from test_collect import _pb_request

        pb = _pb_request(
            [{"span": "00000000000000e1", "attrs": {"gen_ai.conversation.id": "demo",
                                                    "gen_ai.operation.name": "chat"}}]
        )  # fmt: skip
        r = httpx.post(
            collector.url, content=pb, headers={"Content-Type": "application/x-protobuf"}
        )
        assert r.status_code == 200, r.text
        response = ExportTraceServiceResponse.FromString(r.content)
        assert response.partial_success.rejected_spans == 1
        assert "archived" in response.partial_success.error_message
        out = collector.stop()
        assert "2 rejected (archived sessions)" in out, out
    finally:
        if collector.proc.poll() is None:
            collector.proc.kill()
            collector.proc.wait()
    assert not (logs / "sessions" / "demo").exists()
    assert archive.exists()
