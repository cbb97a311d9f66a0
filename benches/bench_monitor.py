"""Rows for ``sigil monitor`` (spec 12.1 "Startup time (Monitor)", "Display update",
"Memory usage"; issue "sigil monitor" benchmarks).

- start-up to first frame on 10,000 and 1,000,000-entry sessions: the real command
  (a fresh process, time until its first frame is written) and, in process, the
  monitor's own part (tailer + native catch-up + state + one dashboard frame) beside
  a pure-Python catch-up (orjson per line) that renders the same frame;
- one dashboard frame, beside the spec's print-based dashboard (4.3.2);
- peak memory of the monitor process on 1,000,000 (and 10,000) entries;
- CPU while idle-waiting on a live session, beside the spec's 100 ms polling loop;
- the lag from ``log_event`` to the screen (a real pty), p99.

Sessions are generated once per test session (``write_session`` from conftest,
written as JSON lines directly).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import quick, write_session
from sigil import _native
from sigil.interfaces.cli.display import DisplayOptions, render_dashboard_text
from sigil.interfaces.cli.monitor import SessionState
from sigil.telemetry.execution_logger import ExecutionLogger
from sigil.telemetry.log_parser import SessionModel

pytestmark = pytest.mark.benchmark

SIGIL = [sys.executable, "-m", "sigil"]
SIZES = {"10k": 10_000, "1m": 1_000_000}
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The spec's monitor, reduced to its I/O loop (4.3.2 _read_new_entries): reopen the
# file every 100 ms, seek, read what is new, print each message. The baseline for
# idle CPU and for lag.
POLLING_MONITOR = r"""
import json, os, sys, time
path, pos = sys.argv[1], 0
while True:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            f.seek(pos)
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                sys.stdout.write(e["message"] + "\n")
            sys.stdout.flush()
            pos = f.tell()
    time.sleep(0.1)
"""


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def monitor_logs(bench_dir: Path) -> Path:
    """``<logs>/sessions/m10k`` and ``m1m``: generated once, as the writer lays them out."""
    logs = bench_dir / "monitor-logs"
    for name, n in SIZES.items():
        path = logs / "sessions" / f"m{name}" / "execution.jsonl"
        if not path.exists():
            write_session(path, n, f"m{name}")
    return logs


@pytest.fixture(scope="session", autouse=True)
def _bytecode() -> None:
    """sigil's modules compiled, as an installed package has them (pip writes the
    ``.pyc`` files at install): with ``PYTHONDONTWRITEBYTECODE`` set and an
    editable install, every process started here would compile them again, a
    cost no user's start-up has."""
    import compileall

    import sigil

    with contextlib.suppress(OSError):  # a read-only install has its .pyc already
        compileall.compile_dir(Path(sigil.__file__).parent, quiet=2, workers=1)


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SIGIL_HOME"] = str(home)
    env["NO_COLOR"] = "1"
    env["TERM"] = "xterm-256color"
    return env


class _Pty:
    """A process on a pseudo-terminal, its output drained (and searched) by a thread."""

    def __init__(
        self, argv: list[str], env: dict[str, str], cols: int = 120, rows: int = 40
    ) -> None:
        import fcntl
        import struct
        import termios

        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        os.close(slave)
        self.seen: dict[str, float] = {}
        self.first_output: float | None = None
        self._tail = b""
        self._pattern = re.compile(rb"lag-\d{5}")
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:
                return
            if not data:
                return
            now = time.perf_counter()
            if self.first_output is None:
                self.first_output = now
            chunk = self._tail + data
            for match in self._pattern.finditer(chunk):
                self.seen.setdefault(match.group().decode(), now)
            self._tail = chunk[-16:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.thread.join(2)
        with contextlib.suppress(OSError):
            os.close(self.master)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _cpu_percent(pid: int, seconds: float) -> float:
    before, started = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (_cpu_seconds(pid) - before) / (time.monotonic() - started)


# -- start-up to first frame ------------------------------------------------------------


def _first_frame(args: list[str], env: dict[str, str], reap: list[subprocess.Popen[bytes]]) -> None:
    """Start the real command; return when its first frame (a stdout line) arrives."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline()
    reap.append(proc)


def _reap(reap: list[subprocess.Popen[bytes]]) -> None:
    """Untimed, before each round: let the previous process finish (its summary and
    exit), so that it does not share the CPU with the next one's start-up."""
    while reap:
        proc = reap.pop()
        assert proc.stdout is not None
        proc.stdout.read()
        proc.wait(30)


@pytest.mark.parametrize("size", list(SIZES))
def test_startup_process_first_frame(
    benchmark: Any, monitor_logs: Path, tmp_path: Path, size: str
) -> None:
    """The real ``sigil monitor`` from exec to its first frame (json mode: one line)."""
    n = SIZES[size]
    benchmark.group = f"monitor start-up to first frame, {n:,} entries"
    benchmark.extra_info.update(ops=1, baseline=f"test_startup_python_interpreter[{size}]")
    if n == 10_000:
        benchmark.extra_info.update(spec_max_s=0.200, aim_max_s=0.100)  # spec 12.1
    else:
        # The issue: a 1,000,000-entry catch-up is one native fold, "well under a second".
        benchmark.extra_info.update(spec_max_s=1.0, aim_max_s=0.200)
    args = [
        *SIGIL,
        "monitor",
        "--session",
        f"m{size}",
        "--log-path",
        str(monitor_logs),
        "--mode",
        "json",
        "--once",
    ]
    reap: list[subprocess.Popen[bytes]] = []
    benchmark.pedantic(
        _first_frame,
        args=(args, _env(tmp_path), reap),
        setup=lambda: _reap(reap),
        rounds=2 if quick() else 7,
        warmup_rounds=1,
    )
    _reap(reap)


@pytest.mark.parametrize("size", list(SIZES))
def test_startup_python_interpreter(benchmark: Any, tmp_path: Path, size: str) -> None:
    """The floor: a Python interpreter that prints one line."""
    benchmark.group = f"monitor start-up to first frame, {SIZES[size]:,} entries"
    benchmark.extra_info.update(ops=1)
    reap: list[subprocess.Popen[bytes]] = []
    benchmark.pedantic(
        _first_frame,
        args=([sys.executable, "-c", "print(1)"], _env(tmp_path), reap),
        setup=lambda: _reap(reap),
        rounds=2 if quick() else 7,
        warmup_rounds=1,
    )
    _reap(reap)


def _catch_up_and_draw(logs: Path, session: str) -> str:
    """The monitor's path: one native fold of the session (SessionModel), a snapshot."""
    model = SessionModel(session, logs, last_n=100)
    state = SessionState(session, snapshot=model.update())
    return render_dashboard_text(state, DisplayOptions(), width=120, height=40)


def _python_catch_up_and_draw(logs: Path, session: str) -> str:
    """The pure-Python way: orjson per line, a fold in dicts, then a frame (drawn
    from an empty state: the monitor itself never folds in Python)."""
    path = logs / "sessions" / session / "execution.jsonl"
    tokens_used = entries = 0
    components: dict[str, list[float]] = {}
    with open(path, "rb") as f:
        for line in f:
            e = orjson.loads(line)
            tokens = e["tokens"]
            tokens_used += tokens
            entries += 1
            comp = components.setdefault(e["component"], [0, 0, 0.0])
            comp[0] += tokens
            if e["event_type"] == "step_complete":
                comp[1] += 1
                comp[2] += e["metadata"].get("latency_ms", 0)
    assert entries and tokens_used >= 0
    return render_dashboard_text(SessionState(session), DisplayOptions(), width=120, height=40)


@pytest.mark.parametrize("size", list(SIZES))
def test_startup_in_process_sigil(benchmark: Any, monitor_logs: Path, size: str) -> None:
    """The monitor's own start-up: tailer, native catch-up, state, first dashboard frame."""
    n = SIZES[size]
    benchmark.group = f"monitor catch-up + first frame (in process), {n:,} entries"
    benchmark.extra_info.update(ops=n, baseline=f"test_startup_in_process_python[{size}]")
    if n == 10_000:
        benchmark.extra_info.update(spec_max_s=0.200, aim_max_s=0.020)
    _catch_up_and_draw(monitor_logs, f"m{size}")  # imports rich once
    frame = benchmark.pedantic(
        _catch_up_and_draw,
        args=(monitor_logs, f"m{size}"),
        rounds=(2 if quick() else 10) if n == 10_000 else 3,
    )
    assert f"{n:,} events" in frame


@pytest.mark.parametrize("size", list(SIZES))
def test_startup_in_process_python(benchmark: Any, monitor_logs: Path, size: str) -> None:
    n = SIZES[size]
    benchmark.group = f"monitor catch-up + first frame (in process), {n:,} entries"
    benchmark.extra_info.update(ops=n)
    rounds = (2 if quick() else 10) if n == 10_000 else 1
    benchmark.pedantic(_python_catch_up_and_draw, args=(monitor_logs, f"m{size}"), rounds=rounds)


# -- one dashboard frame ----------------------------------------------------------------


def _busy_state() -> SessionState:
    """A mid-run state: six components, warnings, a full list of recent events."""
    from sigil.telemetry.execution_logger import LogEntry

    t0 = datetime(2026, 1, 11, 10, 15, 32, tzinfo=UTC)
    rng = random.Random(7)
    entries = [
        LogEntry(
            t0.isoformat(),
            "b",
            "session_start",
            "orchestrator",
            "Starting",
            0,
            {
                "budget": 256_000,
                "allocations": {
                    "routing": 10_000,
                    "memory": 30_000,
                    "planning": 20_000,
                    "reasoning": 150_000,
                    "contracts": 10_000,
                    "validation": 10_000,
                },
            },
        )
    ]
    names = ["routing", "memory", "planning", "reasoning", "contracts", "validation"]
    for i in range(200):
        comp = names[i % 6]
        entries.append(
            LogEntry(
                (t0 + timedelta(seconds=i)).isoformat(),
                "b",
                "step_complete",
                comp,
                f"{comp} finished step {i}",
                rng.randrange(10, 900),
                {"latency_ms": rng.uniform(5, 7000)},
            )
        )
    entries.append(
        LogEntry(
            (t0 + timedelta(seconds=201)).isoformat(),
            "b",
            "budget_warning",
            "orchestrator",
            "50% of the budget used",
            0,
            {},
        )
    )
    fold = _native.Fold(100)
    fold.feed_bytes(b"".join(e.to_bytes() + b"\n" for e in entries) + b"{bad\n" * 3)
    state = SessionState("bench-frame", snapshot=fold.snapshot())
    state.rotations = 2
    return state


def _spec_dashboard(state: SessionState) -> str:
    """The spec's ``_display_dashboard`` (4.3.2): print() into a buffer."""
    out = io.StringIO()

    def p(*a: Any, **k: Any) -> None:
        print(*a, file=out, **k)

    p("\033[2J\033[H", end="")
    p("=" * 60)
    p("           SIGIL v2 EXECUTION MONITOR")
    p("=" * 60)
    p(f"Session: {state.session_id}")
    p(f"Status:  {state.status.upper()}")
    p(f"Elapsed: {state.elapsed_seconds:.1f}s")
    p("-" * 60)
    p("\nComponent Token Usage:")
    for name in ["routing", "memory", "planning", "reasoning", "contracts", "validation"]:
        comp = state.components.get(name)
        used = comp.tokens if comp else 0
        p(f"  [{name:12}] {used:6,} tokens  {'=' * min(20, int(used / 5000 * 20))}")
    pct = state.budget_percentage
    filled = min(30, int(pct / 100 * 30))
    p(f"  Used:      {state.tokens_used:,} / {state.total_budget:,} ({pct:.2f}%)")
    p(f"  Progress:  \033[32m{'#' * filled}\033[0m{'.' * (30 - filled)}")
    p(f"  Remaining: {state.tokens_remaining:,} tokens")
    slowest = state.slowest_component
    if slowest:
        p(f"  Slowest:   {slowest} ({state.components[slowest].latency_ms:.0f}ms)")
    for entry in list(state.events)[-5:]:
        p(f"  [{entry.timestamp.split('T')[1].split('.')[0]}] {entry.component}: {entry.message}")
    return out.getvalue()


def test_render_dashboard_frame_sigil(benchmark: Any) -> None:
    benchmark.group = "render one dashboard frame (120x40)"
    benchmark.extra_info.update(
        ops=1, baseline="test_render_dashboard_frame_spec_print", spec_max_s=0.100, aim_max_s=0.005
    )
    state = _busy_state()
    render_dashboard_text(state, DisplayOptions(), width=120, height=40)
    frame = benchmark(
        render_dashboard_text, state, DisplayOptions(), width=120, height=40, color=True
    )
    assert "SIGIL MONITOR" in frame


def test_render_dashboard_terminal_frame_sigil(
    benchmark: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the live dashboard writes per frame at 120x40: the frame with its
    synchronized-output, cursor and erase sequences, in colour (issue 12: < 5 ms)."""
    from sigil.interfaces.cli.display import DashboardRenderer
    from sigil.interfaces.cli.monitor import MonitorPhase

    benchmark.group = "render one dashboard frame (120x40)"
    benchmark.extra_info.update(
        ops=1,
        baseline="test_render_dashboard_frame_spec_print",
        spec_max_s=0.005,  # issue 12
    )
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("LINES", "40")
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = io.StringIO()
    renderer = DashboardRenderer(out, io.StringIO(), DisplayOptions())
    renderer.color = True
    renderer.view.keys = True
    state = _busy_state()
    frame = benchmark(renderer.frame_text, state, MonitorPhase.TRACKING)
    assert frame.startswith("\x1b[?2026h") and frame.endswith("\x1b[?2026l")
    assert frame.count("\r\n") == 39  # the whole height


def test_render_dashboard_frame_with_token_jumps_sigil(benchmark: Any) -> None:
    """A frame of a new snapshot judged against a history of 20 runs per
    component (issue 13's live token jumps): the judging is in each round."""
    from sigil.reports.live import JumpHistory

    benchmark.group = "render one dashboard frame (120x40)"
    benchmark.extra_info.update(
        ops=1, baseline="test_render_dashboard_frame_sigil", spec_max_s=0.005
    )
    state = _busy_state()
    names = ["routing", "memory", "planning", "reasoning", "contracts", "validation"]
    # Every component's history far below its ~450 tokens per call: six jumps.
    state.set_jump_history(JumpHistory({n: [(f"s{i}", 1, 50.0) for i in range(20)] for n in names}))
    snapshot = state.snap

    def frame() -> str:
        state.update(snapshot)  # a new snapshot: judged again
        return render_dashboard_text(state, DisplayOptions(), width=120, height=40, color=True)

    text = benchmark(frame)
    assert text.count("token jump:") == 6


def test_render_dashboard_frame_spec_print(benchmark: Any) -> None:
    benchmark.group = "render one dashboard frame (120x40)"
    benchmark.extra_info.update(ops=1)
    state = _busy_state()
    assert "EXECUTION MONITOR" in benchmark(_spec_dashboard, state)


# -- peak memory ------------------------------------------------------------------------

_MAXRSS = (
    "import resource, subprocess, sys\n"
    "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)

_PY_FOLD = (
    "import orjson, sys\n"
    "tokens = 0; per = {}\n"
    "with open(sys.argv[1], 'rb') as f:\n"
    "    for line in f:\n"
    "        e = orjson.loads(line); tokens += e['tokens']\n"
    "        per[e['component']] = per.get(e['component'], 0) + e['tokens']\n"
    "print(tokens)\n"
)


def _peak_rss_mb(argv: list[str], env: dict[str, str]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _MAXRSS, *argv],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return int(out.strip()) / 1024  # ru_maxrss is in KiB on Linux (bytes on macOS)


@pytest.mark.parametrize("size", list(SIZES))
def test_memory_monitor_peak(benchmark: Any, monitor_logs: Path, tmp_path: Path, size: str) -> None:
    """Peak RSS of ``sigil monitor --once`` catching up on the whole session."""
    n = SIZES[size]
    benchmark.group = f"monitor peak memory, {n:,} entries"
    args = [
        *SIGIL,
        "monitor",
        "--session",
        f"m{size}",
        "--log-path",
        str(monitor_logs),
        "--mode",
        "json",
        "--once",
    ]
    values: list[float] = []
    benchmark.pedantic(lambda: values.append(_peak_rss_mb(args, _env(tmp_path))), rounds=1)
    info: dict[str, Any] = {
        "metric": "peak RSS (MB)",
        "value": values[0],
        "aim_max": 50,
        "baseline": f"test_memory_python_fold_peak[{size}]",
    }
    if n == 10_000:
        info["spec_max"] = 50  # spec 12.1: memory usage (10K entries) < 50 MB
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("size", list(SIZES))
def test_memory_python_fold_peak(
    benchmark: Any, monitor_logs: Path, tmp_path: Path, size: str
) -> None:
    """Baseline: a streaming pure-Python fold (orjson per line) in its own process."""
    n = SIZES[size]
    benchmark.group = f"monitor peak memory, {n:,} entries"
    path = monitor_logs / "sessions" / f"m{size}" / "execution.jsonl"
    values: list[float] = []
    benchmark.pedantic(
        lambda: values.append(
            _peak_rss_mb([sys.executable, "-c", _PY_FOLD, str(path)], _env(tmp_path))
        ),
        rounds=1,
    )
    benchmark.extra_info.update(metric="peak RSS (MB)", value=values[0])


# -- idle CPU and lag (live sessions) ---------------------------------------------------


@pytest.fixture
def live_session(tmp_path: Path) -> Iterator[tuple[Path, ExecutionLogger]]:
    """A running session: a logger open on it (the logger holds the session lock).

    Each event is flushed explicitly, so the lag measured is the monitor's own
    (the writer's flush interval is a separate row). The background flush is kept
    asleep (large buffer and interval) so that it never runs beside an explicit
    flush: the writer had a lock-order race between the two when this was written.
    """
    logs = tmp_path / "home" / "logs"
    logger = ExecutionLogger(
        "live", logs, buffer_size=4 << 20, flush_interval=3600.0, fsync="never", sanitizer=False
    )
    logger.initialize_sync()
    logger.log_event_sync(
        "session_start", "orchestrator", "Starting", 0, {"budget": 256_000, "run": 1}
    )
    logger.flush_sync()
    yield logs, logger
    logger.close_sync()


def test_idle_cpu_sigil(
    benchmark: Any, live_session: tuple[Path, ExecutionLogger], tmp_path: Path
) -> None:
    """CPU of the dashboard on a live session with nothing happening (inotify wait)."""
    logs, _ = live_session
    benchmark.group = "monitor CPU while idle-waiting"
    term = _Pty([*SIGIL, "monitor", "--session", "live", "--log-path", str(logs)], _env(tmp_path))
    values: list[float] = []
    try:
        time.sleep(1.0)  # start-up and catch-up done
        seconds = 2.0 if quick() else 5.0
        benchmark.pedantic(lambda: values.append(_cpu_percent(term.proc.pid, seconds)), rounds=1)
        assert term.proc.poll() is None
    finally:
        term.close()
    benchmark.extra_info.update(
        metric="CPU (%)",
        value=values[0],
        spec_max=1.0,  # issue 12: following an idle session, under 1 %
        baseline="test_idle_cpu_spec_polling",
    )


def test_idle_cpu_spec_polling(
    benchmark: Any, live_session: tuple[Path, ExecutionLogger], tmp_path: Path
) -> None:
    logs, _ = live_session
    benchmark.group = "monitor CPU while idle-waiting"
    path = logs / "sessions" / "live" / "execution.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", POLLING_MONITOR, str(path)],
        stdout=subprocess.DEVNULL,
        env=_env(tmp_path),
    )
    values: list[float] = []
    try:
        time.sleep(0.5)
        seconds = 2.0 if quick() else 5.0
        benchmark.pedantic(lambda: values.append(_cpu_percent(proc.pid, seconds)), rounds=1)
    finally:
        proc.kill()
        proc.wait(5)
    benchmark.extra_info.update(metric="CPU (%)", value=values[0])


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def _measure_lag(
    logger: ExecutionLogger, seen: dict[str, float], count: int, flush: bool = True
) -> list[float]:
    """Log ``count`` events ~150 ms apart (slower than the 10 Hz refresh, as pipeline
    steps are) and return, in ms, how long each took to show up."""
    rng = random.Random(11)
    sent: dict[str, float] = {}
    for i in range(count):
        marker = f"lag-{i:05d}"
        sent[marker] = time.perf_counter()
        logger.log_event_sync("step_complete", "reasoning", marker, 1, {"latency_ms": 1})
        if flush:
            logger.flush_sync()
        time.sleep(0.12 + rng.random() * 0.06)
    deadline = time.monotonic() + 5
    while len(seen) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(seen) == count, f"only {len(seen)} of {count} events reached the screen"
    return [1000 * (seen[m] - t) for m, t in sent.items()]


def test_lag_log_event_to_screen_sigil(
    benchmark: Any, live_session: tuple[Path, ExecutionLogger], tmp_path: Path
) -> None:
    """From log_event (flushed) to the event on the dashboard, read from a real pty."""
    logs, logger = live_session
    benchmark.group = "lag from log_event to screen"
    term = _Pty(
        [*SIGIL, "monitor", "--session", "live", "--log-path", str(logs)],
        _env(tmp_path),
        cols=120,
        rows=40,
    )
    lags: list[float] = []
    try:
        deadline = time.monotonic() + 10
        while term.first_output is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        count = 20 if quick() else 60
        benchmark.pedantic(lambda: lags.extend(_measure_lag(logger, term.seen, count)), rounds=1)
    finally:
        term.close()
    benchmark.extra_info.update(
        metric="p99 lag (ms)",
        value=_p99(lags),
        spec_max=100,
        aim_max=20,
        median_ms=statistics.median(lags),
        max_ms=max(lags),
        baseline="test_lag_log_event_to_screen_spec_polling",
    )


def test_lag_log_event_to_screen_spec_polling(
    benchmark: Any, live_session: tuple[Path, ExecutionLogger], tmp_path: Path
) -> None:
    logs, logger = live_session
    benchmark.group = "lag from log_event to screen"
    path = logs / "sessions" / "live" / "execution.jsonl"
    term = _Pty([sys.executable, "-c", POLLING_MONITOR, str(path)], _env(tmp_path))
    lags: list[float] = []
    try:
        time.sleep(0.5)
        count = 20 if quick() else 60
        benchmark.pedantic(lambda: lags.extend(_measure_lag(logger, term.seen, count)), rounds=1)
    finally:
        term.close()
    benchmark.extra_info.update(
        metric="p99 lag (ms)", value=_p99(lags), median_ms=statistics.median(lags), max_ms=max(lags)
    )


def test_lag_log_event_to_screen_default_writer(benchmark: Any, tmp_path: Path) -> None:
    """The same, end to end with the writer's default policy (background flush every
    100 ms, no explicit flush): here the writer's flush interval, not the monitor,
    sets the lag. Reported, not enforced."""
    logs = tmp_path / "home" / "logs"
    logger = ExecutionLogger("live", logs, fsync="never", sanitizer=False)
    logger.initialize_sync()
    logger.log_event_sync("session_start", "orchestrator", "Starting", 0, {"budget": 10**6})
    benchmark.group = "lag from log_event to screen, writer's default 100 ms flush"
    term = _Pty(
        [*SIGIL, "monitor", "--session", "live", "--log-path", str(logs)],
        _env(tmp_path),
        cols=120,
        rows=40,
    )
    lags: list[float] = []
    try:
        time.sleep(1.0)
        count = 20 if quick() else 60
        benchmark.pedantic(
            lambda: lags.extend(_measure_lag(logger, term.seen, count, flush=False)), rounds=1
        )
    finally:
        term.close()
        logger.close_sync()
    benchmark.extra_info.update(
        metric="p99 lag (ms)", value=_p99(lags), median_ms=statistics.median(lags), max_ms=max(lags)
    )


# -- key to screen ----------------------------------------------------------------------


class _Screen:
    """A process on a pty whose output is kept with the time each chunk arrived."""

    def __init__(self, argv: list[str], env: dict[str, str], cols: int, rows: int) -> None:
        import fcntl
        import struct
        import termios

        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
            close_fds=True,
        )  # fmt: skip
        os.close(slave)
        self.data = bytearray()
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            with self.arrived:
                self.data.extend(chunk)
                self.arrived.notify_all()

    def press_and_wait(self, key: bytes, marker: bytes, timeout: float = 5.0) -> float:
        """Seconds from typing ``key`` until ``marker`` reaches the terminal."""
        with self.lock:
            start = len(self.data)
        began = time.perf_counter()
        os.write(self.master, key)
        deadline = began + timeout
        with self.arrived:
            while self.data.find(marker, start) < 0:
                left = deadline - time.perf_counter()
                assert left > 0, f"{marker!r} never reached the screen"
                self.arrived.wait(left)
            return time.perf_counter() - began

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.thread.join(2)
        with contextlib.suppress(OSError):
            os.close(self.master)


def test_key_to_screen_sigil(
    benchmark: Any, live_session: tuple[Path, ExecutionLogger], tmp_path: Path
) -> None:
    """From a key typed on a real pty to the redrawn frame that shows its effect
    (``?`` opens the help, any key closes it), at 120x40 (issue 12: < 50 ms)."""
    logs, _ = live_session
    benchmark.group = "dashboard key to screen"
    screen = _Screen(
        [*SIGIL, "monitor", "--session", "live", "--log-path", str(logs)],
        _env(tmp_path),
        cols=120,
        rows=40,
    )
    samples: list[float] = []
    try:
        deadline = time.monotonic() + 15
        while b"q quit" not in screen.data and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b"q quit" in screen.data, "the dashboard never drew its key line"
        time.sleep(0.3)

        def round_trip() -> None:
            for _ in range(10 if quick() else 30):
                samples.append(screen.press_and_wait(b"?", b"pause / resume"))
                samples.append(screen.press_and_wait(b"x", b"Components"))
                time.sleep(0.02)

        benchmark.pedantic(round_trip, rounds=1)
    finally:
        screen.close()
    ms = [1000 * s for s in samples]
    benchmark.extra_info.update(
        metric="p99 key to screen (ms)",
        value=_p99(ms),
        spec_max=50,  # issue 12: key to screen under 50 ms
        baseline="test_key_to_screen_floor",
        median_ms=statistics.median(ms),
        max_ms=max(ms),
    )


# -- --tail N / --since TIME in stream mode ---------------------------------------------

#: A 1,000,000-event session whose events are 10 ms apart (the other sessions'
#: share one timestamp, which --since cannot tell apart).
TIMED_N = 1_000_000
TIMED_T0 = datetime(2026, 1, 11, 10, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def timed_logs(bench_dir: Path) -> Path:
    logs = bench_dir / "timed-logs"
    path = logs / "sessions" / "t1m" / "execution.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True)
        with path.open("wb") as f:
            chunk: list[bytes] = []
            for seq in range(TIMED_N):
                chunk.append(_timed_line(seq, TIMED_T0 + timedelta(milliseconds=10 * seq)))
                if len(chunk) == 10_000:
                    f.write(b"\n".join(chunk) + b"\n")
                    chunk.clear()
            if chunk:
                f.write(b"\n".join(chunk) + b"\n")
    return logs


def _timed_line(seq: int, moment: datetime) -> bytes:
    from conftest import event_line

    return event_line(seq, "t1m").replace(
        b"2026-01-11T10:15:33.234567+00:00", moment.isoformat(timespec="microseconds").encode()
    )


#: --since: the last 1,000 events (10 s before the session's last event).
SINCE = TIMED_T0 + timedelta(milliseconds=10 * (TIMED_N - 1000))
SELECTIONS = {"tail": ["--tail", "100"], "since": ["--since", SINCE.isoformat()]}


def _selection(kind: str) -> Any:
    from sigil.interfaces.cli.event_selection import EventSelection

    return EventSelection(tail=100) if kind == "tail" else EventSelection(since=SINCE)


def _select_only(logs: Path, kind: str, end: Any, native: bool) -> int:
    from sigil.interfaces.cli.event_selection import history

    batches = history("t1m", logs, TIMED_N, _selection(kind), end=end if native else None)
    return sum(len(b) for b in batches)


@pytest.mark.parametrize("kind", list(SELECTIONS))
def test_stream_select_native(benchmark: Any, timed_logs: Path, kind: str) -> None:
    """The events of ``--tail 100`` / ``--since`` (the last 1,000) among 1,000,000:
    where to start found natively from the end, then only that read."""
    from sigil.telemetry.log_parser import SessionTailer

    benchmark.group = f"monitor --mode stream {' '.join(SELECTIONS[kind][:1])}, 1,000,000 entries"
    benchmark.extra_info.update(ops=1, baseline=f"test_stream_select_python_old[{kind}]")
    tailer = SessionTailer("t1m", timed_logs)
    tailer.catch_up()
    end = tailer.checkpoint()
    got = benchmark(_select_only, timed_logs, kind, end, True)
    assert got == (100 if kind == "tail" else 1000)


@pytest.mark.parametrize("kind", list(SELECTIONS))
def test_stream_select_python_old(benchmark: Any, timed_logs: Path, kind: str) -> None:
    """The old path: every event read from the start, the selection kept in Python."""
    benchmark.group = f"monitor --mode stream {' '.join(SELECTIONS[kind][:1])}, 1,000,000 entries"
    benchmark.extra_info.update(ops=1)
    got = benchmark.pedantic(
        _select_only, args=(timed_logs, kind, None, False), rounds=1 if quick() else 3
    )
    assert got == (100 if kind == "tail" else 1000)


def _stream_once(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(args, env=env, capture_output=True, timeout=120, check=False)
    assert proc.returncode in (0, 3), proc.stderr


@pytest.mark.parametrize("kind", list(SELECTIONS))
def test_stream_select_process_sigil(
    benchmark: Any, timed_logs: Path, tmp_path: Path, kind: str
) -> None:
    """The real ``sigil monitor --mode stream --tail 100 --once`` (or ``--since``) on
    1,000,000 entries: start-up, the native catch-up, the selection, the listing."""
    benchmark.group = f"monitor --mode stream {' '.join(SELECTIONS[kind][:1])}, 1,000,000 entries"
    benchmark.extra_info.update(ops=1, baseline=f"test_stream_select_python_old[{kind}]")
    args = [*SIGIL, "monitor", "--session", "t1m", "--log-path", str(timed_logs),
            "--mode", "stream", *SELECTIONS[kind], "--once"]  # fmt: skip
    benchmark.pedantic(
        _stream_once, args=(args, _env(tmp_path)), rounds=2 if quick() else 5, warmup_rounds=1
    )


# -- issue 12's numbers: the dashboard with keys on a real terminal ---------------------

#: The end of a frame: synchronized output closed (the whole frame is written).
_FRAME_END = b"\x1b[?2026l"

# The floor for the pty rows: a Python interpreter that takes the terminal in
# cbreak mode, draws one line, and redraws when a key arrives.
PTY_FLOOR = r"""
import os, sys, termios, tty
fd = sys.stdin.fileno()
saved = termios.tcgetattr(fd)
tty.setcbreak(fd)
try:
    os.write(1, b"\x1b[?2026h\x1b[Hready q quit\x1b[?2026l")
    while True:
        key = os.read(fd, 1)
        if not key or key == b"q":
            break
        os.write(1, b"\x1b[?2026h\x1b[Hkey " + key + b" pause / resume Components\x1b[?2026l")
finally:
    termios.tcsetattr(fd, termios.TCSADRAIN, saved)
"""


def _pty_first_frame(
    argv: list[str], env: dict[str, str], marker: bytes, cpu: list[float] | None = None
) -> float:
    """Seconds from starting ``argv`` on a 120x40 pty until a whole frame holding
    ``marker`` (and the key line) has been written; the process is then killed
    (its CPU seconds, all threads, until then appended to ``cpu``)."""
    began = time.perf_counter()
    screen = _Screen(argv, env, cols=120, rows=40)
    try:
        deadline = began + 30
        with screen.arrived:
            while True:
                data = screen.data
                at = data.find(marker)
                if at >= 0 and data.find(b"q quit", at) >= 0 and data.find(_FRAME_END, at) >= 0:
                    break
                left = deadline - time.perf_counter()
                assert left > 0, f"no whole frame with {marker!r}: {bytes(data[-400:])!r}"
                screen.arrived.wait(left)
        took = time.perf_counter() - began
        if cpu is not None:
            screen.proc.kill()
            _, status, usage = os.wait4(screen.proc.pid, 0)
            screen.proc.returncode = status
            cpu.append(usage.ru_utime + usage.ru_stime)
        return took
    finally:
        screen.close()


@pytest.mark.parametrize("size", list(SIZES))
def test_first_frame_dashboard_keys_sigil(
    benchmark: Any, monitor_logs: Path, tmp_path: Path, size: str
) -> None:
    """``sigil monitor`` (dashboard, keys on) on a real pty: from process start to the
    first whole frame of the session's state (issue 12: 10K < 100 ms, 1M < 300 ms)."""
    n = SIZES[size]
    benchmark.group = f"dashboard with keys, process start to first frame on a pty, {n:,} entries"
    benchmark.extra_info.update(
        ops=1,
        baseline=f"test_first_frame_dashboard_keys_floor[{size}]",
        spec_max_s=0.100 if n == 10_000 else 0.300,
    )
    argv = [*SIGIL, "monitor", "--session", f"m{size}", "--log-path", str(monitor_logs)]
    marker = f"{n:,} events".encode()
    env = _env(tmp_path)
    _pty_first_frame(argv, env, marker)  # the page cache warm, as for a user's second look
    cpu: list[float] = []
    benchmark.pedantic(_pty_first_frame, args=(argv, env, marker, cpu), rounds=3 if quick() else 7)
    # The process's own CPU time to its first frame: what the machine's load does
    # not inflate as much as the wall time.
    benchmark.extra_info.update(cpu_ms_median=round(1000 * statistics.median(cpu), 1))


@pytest.mark.parametrize("size", list(SIZES))
def test_first_frame_dashboard_keys_floor(benchmark: Any, tmp_path: Path, size: str) -> None:
    """The floor: a Python interpreter that takes the pty in cbreak mode and draws a line."""
    benchmark.group = (
        f"dashboard with keys, process start to first frame on a pty, {SIZES[size]:,} entries"
    )
    benchmark.extra_info.update(ops=1)
    argv = [sys.executable, "-c", PTY_FLOOR]
    cpu: list[float] = []
    benchmark.pedantic(
        _pty_first_frame,
        args=(argv, _env(tmp_path), b"ready", cpu),
        rounds=3 if quick() else 7,
        warmup_rounds=1,
    )
    benchmark.extra_info.update(cpu_ms_median=round(1000 * statistics.median(cpu), 1))


def test_key_to_screen_floor(benchmark: Any, tmp_path: Path) -> None:
    """The floor for key to screen: a program that redraws as soon as it reads a key."""
    benchmark.group = "dashboard key to screen"
    screen = _Screen([sys.executable, "-c", PTY_FLOOR], _env(tmp_path), cols=120, rows=40)
    samples: list[float] = []
    try:
        deadline = time.monotonic() + 15
        while b"q quit" not in screen.data and time.monotonic() < deadline:
            time.sleep(0.02)

        def round_trip() -> None:
            for _ in range(10 if quick() else 30):
                samples.append(screen.press_and_wait(b"?", b"pause / resume"))
                samples.append(screen.press_and_wait(b"x", b"Components"))
                time.sleep(0.02)

        benchmark.pedantic(round_trip, rounds=1)
    finally:
        screen.close()
    ms = [1000 * s for s in samples]
    benchmark.extra_info.update(
        metric="p99 key to screen (ms)",
        value=_p99(ms),
        median_ms=statistics.median(ms),
        max_ms=max(ms),
    )
