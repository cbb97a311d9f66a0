"""``sigil report`` (and its neighbours) on what a hostile review threw at them
(issue 13 surfaces): dates at the edge of datetime's range, a damaged or
unwritable index, damaged archives, and names from the logs holding terminal
control sequences. Real ``sigil`` subprocesses on real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
from test_report import Run, day, reference, steps_for, write_runs


@pytest.fixture
def two_runs(log_path: Path) -> list[Run]:
    runs = [
        Run("edge-a", 1, day("2026-11-01T09:00:00+00:00"), steps_for(1)),
        Run("edge-b", 1, day("2026-11-02T09:00:00+00:00"), steps_for(2)),
    ]
    write_runs(log_path, runs)
    return runs


# -- 4. dates at the edge of datetime's range -------------------------------------


@pytest.mark.parametrize(
    ("args", "tz"),
    [
        (["--until", "9999-12-31"], "UTC"),
        (["--until", "9999-12-31T23:00"], "Etc/GMT+12"),
        (["--until", "9999-12-31T23:00"], "<-12>12"),  # the same zone, POSIX form
        (["--since", "0001-01-01"], "UTC"),
        (["--since", "0001-01-01"], "JST-9"),  # local midnight of year 1 is before year 1 UTC
        (["--since", "0001-01-01", "--until", "9999-12-31"], "UTC"),
    ],
)
def test_dates_at_the_edge_of_the_range_cover_everything(
    sigil_home: Path, two_runs: list[Run], args: list[str], tz: str
) -> None:
    proc = run_cli(sigil_home, "report", "daily", "--json", *args, TZ=tz)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["total"] == reference(two_runs)


def test_report_and_monitor_read_a_date_the_same_way() -> None:
    """One function: monitor's --since and report's --since agree on every form."""
    from sigil.core.moments import parse_moment
    from sigil.interfaces.cli.event_selection import parse_since
    from sigil.reports.query import parse_moment as report_moment

    for text in ("2026-11-02", "2026-11-02T03:04", "2026-11-02T03:04:05z", "0001-01-01"):
        since = parse_since(text)
        assert since is not None and since == parse_moment(text)
        assert report_moment(text) == since.timestamp()
    assert parse_since("yesterday") is None
    with pytest.raises(ValueError):
        report_moment("yesterday")


def test_a_date_that_is_no_date_is_still_one_line_exit_2(
    sigil_home: Path, two_runs: list[Run]
) -> None:
    proc = run_cli(sigil_home, "report", "--until", "99999-01-01")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "is not a date" in proc.stderr


# -- 2. a damaged, unwritable or misplaced index -----------------------------------

INDEX = "report_index.sqlite3"


def _damage(index: Path, page: int = 3) -> None:
    """``dd if=/dev/urandom of=index bs=4096 seek=3 count=1 conv=notrunc``."""
    import random

    noise = random.Random(page).randbytes(4096)
    with index.open("r+b") as f:
        f.seek(page * 4096)
        f.write(noise)


def _big_history(log_path: Path) -> list[Run]:
    """Enough runs for an index of more than four pages."""
    runs = [
        Run(f"many-{i:02d}", 1, day(f"2026-11-{1 + i % 28:02d}T09:00:00+00:00"), steps_for(i))
        for i in range(40)
    ]
    write_runs(log_path, runs)
    return runs


def _clean(proc: object) -> None:
    stderr = getattr(proc, "stderr", "")
    assert "Traceback" not in stderr and "sqlite3." not in stderr, stderr


def test_an_index_with_a_damaged_page_is_rebuilt_by_report(
    sigil_home: Path, log_path: Path
) -> None:
    import sqlite3

    runs = _big_history(log_path)
    proc = run_cli(sigil_home, "report", "session", "--json", TZ="UTC")
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout)
    index = log_path / INDEX
    assert index.stat().st_size > 4 * 4096
    _damage(index)
    for _ in range(2):
        proc = run_cli(sigil_home, "report", "session", "--json", TZ="UTC")
        _clean(proc)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == first
    assert json.loads(proc.stdout)["total"] == reference(runs)
    # The file itself was made again: whole, and of every run.
    conn = sqlite3.connect(index)
    assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == len(runs)


def test_logs_maintain_repairs_a_damaged_index(sigil_home: Path, log_path: Path) -> None:
    import sqlite3

    runs = _big_history(log_path)
    assert run_cli(sigil_home, "report", "--json", TZ="UTC").returncode == 0
    index = log_path / INDEX
    _damage(index)
    proc = run_cli(sigil_home, "logs", "maintain")
    _clean(proc)
    assert proc.returncode == 0, proc.stderr
    assert "(rebuilt)" in proc.stdout, proc.stdout
    conn = sqlite3.connect(index)
    assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == len(runs)


def test_a_directory_at_the_index_path_is_one_warning_and_an_index_in_memory(
    sigil_home: Path, log_path: Path, two_runs: list[Run]
) -> None:
    (log_path / INDEX).mkdir()
    (log_path / INDEX / "keep").write_text("mine")
    proc = run_cli(sigil_home, "report", "--json", TZ="UTC")
    _clean(proc)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total"] == reference(two_runs)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "is a directory" in lines[0] and "in memory" in lines[0]
    assert (log_path / INDEX / "keep").read_text() == "mine"  # left alone
    proc = run_cli(sigil_home, "report", TZ="UTC")  # the table too
    assert proc.returncode == 0 and "TOTAL" in proc.stdout, proc.stderr


def test_a_read_only_index_is_one_warning_and_an_index_in_memory(
    sigil_home: Path, log_path: Path, two_runs: list[Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root a 0400 file is still writable; SQLite's ``query_only`` makes
    every write fail as a read-only file's do (SQLITE_READONLY)."""
    import sqlite3

    from sigil.reports import index as index_module
    from sigil.reports.query import Filters, run_report
    from sigil.telemetry.log_parser import empty_snapshot

    assert run_cli(sigil_home, "report", "--json", TZ="UTC").returncode == 0
    extra = Run("edge-c", 1, day("2026-11-03T09:00:00+00:00"), steps_for(3))
    write_runs(log_path, [extra])  # a stale index: the refresh must write
    real_connect = sqlite3.connect

    def read_only(*args: object, **kw: object) -> sqlite3.Connection:
        conn = real_connect(*args, **kw)  # type: ignore[arg-type]
        if args and str(args[0]).endswith(INDEX):
            conn.execute("PRAGMA query_only = ON")
        return conn

    monkeypatch.setattr(index_module.sqlite3, "connect", read_only)
    got, state = index_module.read_index(
        log_path,
        lambda conn: run_report(conn, "daily", Filters(), empty_snapshot().latency_bounds_ms),
    )
    assert got.total == reference([*two_runs, extra])
    assert state.warning is not None and "in memory" in state.warning
    assert (log_path / INDEX).is_file()  # not removed: it is not damaged


# -- 1. names and messages from the logs holding terminal control sequences ---------

EVIL_MODEL = "ok\u001b]0;PWNED\u0007\u001b[2J"  # what `sigil proxy` logs as the model
EVIL_AGENT = "ag\nent\x1b[31mred"  # gen_ai.agent.name, as `sigil collect` logs it
EVIL_ERROR = "upstream said \x1b[2J\x9b6n\u202egnp.exe"


def _hostile_session(log_path: Path, session: str = "hostile") -> None:
    """A finished session whose component, model, error and reason hold ESC,
    OSC, BEL, CSI (C1), a newline and a bidi override; one step looped, and
    retried in a storm."""
    import orjson

    at = day("2026-11-05T09:00:00+00:00")
    events: list[dict[str, object]] = []

    def event(kind: str, component: str, tokens: int, meta: dict[str, object], msg: str) -> None:
        from datetime import timedelta

        events.append(
            {
                "timestamp": (at + timedelta(seconds=len(events))).isoformat(),
                "session_id": session,
                "event_type": kind,
                "component": component,
                "message": msg,
                "tokens": tokens,
                "metadata": meta,
                "seq": len(events),
            }
        )

    event("session_start", "orchestrator", 0, {"run": 1, "budget": 10**6}, "start")
    for _ in range(4):
        event("step_start", EVIL_AGENT, 0, {"input_sha256": "ab" * 32}, "step")
        meta = {"run": 1, "attempt": 1, "latency_ms": 12.0, "model": EVIL_MODEL}
        meta.update(input_tokens=90, output_tokens=30)
        event("step_complete", EVIL_AGENT, 120, meta, "done")
    for attempt in range(1, 7):  # a retry storm of the same component
        event("retry_attempt", EVIL_AGENT, 0, {"attempt": attempt, "error": EVIL_ERROR}, "retry")
    event("step_error", EVIL_AGENT, 5, {"error": EVIL_ERROR}, EVIL_ERROR)
    event("session_error", "orchestrator", 0, {"status": "error", "reason": EVIL_ERROR}, "fail")
    log = log_path / "sessions" / session / "execution.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))


def _safe(text: str) -> None:
    """Nothing a terminal acts on: no ESC, BEL, C1 control or bidi override,
    and the injected newline did not start a line of its own."""
    bad = [c for c in text if c in "\x1b\x07\x9b\u202e" or (0x80 <= ord(c) < 0xA0)]
    assert not bad, (bad, text)
    assert not any(line.startswith("ent") for line in text.splitlines()), text


VIEWS = [
    ["report", "model"],
    ["report", "component"],
    ["report", "session", "--breakdown"],
    ["diff", "hostile", "hostile"],
    ["monitor", "-s", "hostile", "--once"],
    ["monitor", "-s", "hostile", "--once", "--mode", "minimal"],
    ["monitor", "-s", "hostile", "--once", "--mode", "stream", "--all"],
    ["sessions"],
    ["replay", "hostile", "--speed", "max", "--mode", "minimal", "--no-keys"],
    ["replay", "hostile", "--speed", "max", "--mode", "stream", "--no-keys"],
]


@pytest.mark.parametrize("args", VIEWS, ids=lambda a: "-".join(a[:2] + a[-1:]))
def test_control_sequences_in_names_are_shown_never_sent(
    sigil_home: Path, log_path: Path, args: list[str]
) -> None:
    _hostile_session(log_path)
    proc = run_cli(sigil_home, *args, TZ="UTC")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 1), proc.stderr  # 1: the session failed
    _safe(proc.stdout)
    _safe(proc.stderr)
    assert proc.stdout.strip(), proc.stderr


@pytest.mark.parametrize(
    ("args", "visible"),
    [
        (["report", "model"], "ok\\e]0;PWNED\\a\\e[2J"),
        (["report", "component"], "ag\\nent\\e[31mred"),
        (["diff", "hostile", "hostile"], "ag\\nent\\e[31mred"),
        (["monitor", "-s", "hostile", "--once"], "upstream said \\e[2J\\x9b6n\\u202egnp.exe"),
    ],
)
def test_the_control_characters_are_written_visibly(
    sigil_home: Path, log_path: Path, args: list[str], visible: str
) -> None:
    _hostile_session(log_path)
    proc = run_cli(sigil_home, *args, TZ="UTC")
    assert visible in proc.stdout.replace("\n", " ") or visible in proc.stdout, proc.stdout


def test_json_keeps_the_names_as_they_are(sigil_home: Path, log_path: Path) -> None:
    _hostile_session(log_path)
    proc = run_cli(sigil_home, "report", "model", "--json", TZ="UTC")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout  # JSON escapes it
    assert EVIL_MODEL in {r["model"] for r in json.loads(proc.stdout)["rows"]}
    proc = run_cli(sigil_home, "diff", "hostile", "hostile", "--json", TZ="UTC")
    assert EVIL_AGENT in {r["component"] for r in json.loads(proc.stdout)["components"]}


def test_top_and_orchestrate_show_names_the_same_way(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sigil.interfaces.cli.commands import orchestrate
    from sigil.interfaces.cli.commands.top import TopRow, table_lines
    from sigil.interfaces.cli.screen import shown

    row = TopRow("hostile", "running", True, 1, 10, 100, None, 0, EVIL_AGENT, None)
    text = "\n".join(table_lines([row]))
    _safe(text)
    assert shown(EVIL_AGENT) in text
    orchestrate._echo(f"Status: error — {EVIL_ERROR}\nLog: x")
    orchestrate._echo('{"e": "\\u001b"}', data=True)
    out = capsys.readouterr().out
    _safe(out)
    assert out.splitlines()[:2] == [f"Status: error — {shown(EVIL_ERROR)}", "Log: x"]


# -- 3. damaged sources are named in the report ---------------------------------------


def _archived(log_path: Path, runs: list[Run], session: str, day_dir: str) -> Path:
    import shutil
    import tarfile

    write_runs(log_path / "staging", runs)
    where = log_path / "archive" / day_dir
    where.mkdir(parents=True, exist_ok=True)
    archive = where / f"{session}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(log_path / "staging" / "sessions" / session, arcname=session)
    shutil.rmtree(log_path / "staging")
    return archive


def test_a_truncated_archive_or_segment_is_named_in_the_json_and_the_table(
    sigil_home: Path, log_path: Path
) -> None:
    import gzip

    good = [Run("fine", 1, day("2026-11-12T09:00:00+00:00"), steps_for(3))]
    write_runs(log_path, good)
    archive = _archived(
        log_path, [Run("demo", 1, day("2026-11-10T09:00:00+00:00"), steps_for(16))], "demo",
        "2026-11-20",
    )  # fmt: skip
    os.truncate(archive, archive.stat().st_size - 300)
    # A live session whose rotated segment was cut short.
    write_runs(log_path, [Run("rotd", 1, day("2026-11-11T09:00:00+00:00"), steps_for(4))])
    live = log_path / "sessions" / "rotd"
    segment = gzip.compress((live / "execution.jsonl").read_bytes())
    (live / "execution.jsonl.1.gz").write_bytes(segment[: len(segment) // 2])
    (live / "execution.jsonl").write_bytes(b"")

    proc = run_cli(sigil_home, "report", "session", "--json", TZ="UTC")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    rows = {r["session"]: r for r in doc["rows"]}
    assert set(rows) == {"fine", "rotd"}  # the archive cannot be read at all
    assert {k: v for k, v in rows["fine"].items() if k != "session"} == reference(good)
    # The damaged live session counts what can be read: what the monitor shows.
    monitor = run_cli(sigil_home, "monitor", "-s", "rotd", "--once", "--mode", "json")
    readable = json.loads(monitor.stdout.splitlines()[-1])["tokens_used"]
    assert (
        0
        < rows["rotd"]["tokens"]
        == readable
        < reference([Run("rotd", 1, day("2026-11-11T09:00:00+00:00"), steps_for(4))])["tokens"]
    )
    assert doc["total"]["tokens"] == reference(good)["tokens"] + readable
    damaged = {u["session"]: u for u in doc["unreadable"]}
    assert set(damaged) == {"demo", "rotd"}, doc["unreadable"]
    assert damaged["demo"]["path"] == str(archive)
    assert damaged["rotd"]["path"] == str(live)
    assert (damaged["demo"]["runs_counted"], damaged["rotd"]["runs_counted"]) == (0, 1)
    assert all(u["error"] for u in damaged.values())
    assert str(archive) in damaged["demo"]["error"]
    assert "execution.jsonl.1.gz" in damaged["rotd"]["error"]
    # The table says so too, below the totals.
    table = run_cli(sigil_home, "report", TZ="UTC")
    assert table.returncode == 0, table.stderr
    footer = [line for line in table.stdout.splitlines() if line.startswith("unreadable")]
    assert len(footer) == 2 and "demo" in footer[0] and "rotd" in footer[1], table.stdout
    assert "not counted" in footer[0] and "1 run of its readable part counted" in footer[1]
    # diff keeps its one-line exit 2, with the report's own words for the archive.
    diff = run_cli(sigil_home, "diff", "demo", "fine")
    assert diff.returncode == 2 and diff.stderr.count("\n") == 1
    assert damaged["demo"]["error"] in diff.stderr, (diff.stderr, damaged["demo"])
    # Nothing damaged: an empty list, not a missing field.
    assert (
        json.loads(run_cli(sigil_home, "report", "--json", "-l", str(log_path / "none")).stdout)[
            "unreadable"
        ]
        == []
    )


def test_diff_compares_the_readable_part_of_a_damaged_live_session(
    sigil_home: Path, log_path: Path
) -> None:
    """As report and monitor count it: the readable part, and one warning line."""
    import gzip

    write_runs(log_path, [Run("fine", 1, day("2026-11-12T09:00:00+00:00"), steps_for(3))])
    write_runs(log_path, [Run("rotd", 1, day("2026-11-11T09:00:00+00:00"), steps_for(4))])
    live = log_path / "sessions" / "rotd"
    segment = gzip.compress((live / "execution.jsonl").read_bytes())
    (live / "execution.jsonl.1.gz").write_bytes(segment[: len(segment) // 2])
    (live / "execution.jsonl").write_bytes(b"")
    report_doc = json.loads(run_cli(sigil_home, "report", "session", "--json").stdout)
    readable = next(r for r in report_doc["rows"] if r["session"] == "rotd")["tokens"]
    proc = run_cli(sigil_home, "diff", "rotd", "fine", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["a"]["tokens"] == readable > 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "rotd is unreadable in part" in lines[0], proc.stderr
    assert "execution.jsonl.1.gz" in lines[0]


@pytest.mark.slow
def test_an_agent_name_from_sigil_collect_is_shown_never_sent(tmp_path: Path) -> None:
    """The review's path: an OTLP span whose ``gen_ai.agent.name`` and model
    hold a newline, SGR and OSC, through a real ``sigil collect``, then every
    text view of that session."""
    import httpx

    from test_collect import TRACE, Collector, _json_request, _json_span

    home = tmp_path / "home"
    home.mkdir()
    log_path = tmp_path / "collected"
    span = _json_span(TRACE, "eee19b7ec3c1b174", tokens=(40, 2), sid="otlp-evil")
    span["attributes"] += [
        {"key": "gen_ai.agent.name", "value": {"stringValue": EVIL_AGENT}},
        {"key": "gen_ai.response.model", "value": {"stringValue": EVIL_MODEL}},
    ]
    collector = Collector(home, log_path, "--idle", "600")
    try:
        r = httpx.post(
            collector.url, content=_json_request(span), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 200, r.text
        collector.stop()
    finally:
        if collector.proc.poll() is None:
            collector.proc.kill()
    logged = (log_path / "sessions" / "otlp-evil" / "execution.jsonl").read_text()
    assert "\\u001b[31m" in logged  # the log keeps the name as sent (JSON-escaped)
    for args in (
        ["report", "component"],
        ["report", "model"],
        ["diff", "otlp-evil", "otlp-evil"],
        ["monitor", "-s", "otlp-evil", "--once"],
        ["monitor", "-s", "otlp-evil", "--once", "--mode", "minimal"],
    ):
        proc = run_cli(home, *args, "-l", str(log_path), TZ="UTC")
        assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
        _safe(proc.stdout)
        _safe(proc.stderr)
    table = run_cli(home, "report", "component", "-l", str(log_path)).stdout
    assert "ag\\nent\\e[31mred" in table, table
