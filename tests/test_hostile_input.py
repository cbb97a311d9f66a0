"""Hostile and odd input (issue 11, items 10, 15, 16, 17): bad usage is one line,
exit 2 and nothing written; files sigil creates never follow a planted symlink.

Every test runs the real ``sigil`` command in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SIGIL, isolated_env, run_cli

pytestmark = pytest.mark.slow


def _written(home: Path) -> list[str]:
    """Everything under the sigil home except the config file the test wrote."""
    if not home.exists():
        return []
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.name != "config.yaml")


def _one_line_usage(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _config(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.yaml"
    path.write_text(text)
    return path


# -- item 15: the config file is read only when it is a regular file of sane size


@pytest.mark.parametrize("command", [["config", "show"], ["orchestrate", "--task", "t"]])
def test_config_that_is_a_fifo_is_refused_not_waited_on(
    sigil_home: Path, command: list[str]
) -> None:
    sigil_home.mkdir(parents=True)
    fifo = sigil_home / "config.yaml"
    os.mkfifo(fifo)
    started = time.monotonic()
    proc = run_cli(sigil_home, *command, timeout=20)
    assert time.monotonic() - started < 15
    _one_line_usage(proc, str(fifo), "not a regular file")
    assert _written(sigil_home) == []


def test_config_symlink_to_dev_zero_is_refused(sigil_home: Path) -> None:
    sigil_home.mkdir(parents=True)
    (sigil_home / "config.yaml").symlink_to("/dev/zero")
    proc = run_cli(sigil_home, "orchestrate", "--task", "t", timeout=20)
    _one_line_usage(proc, "config.yaml", "not a regular file")
    assert _written(sigil_home) == []


def test_config_larger_than_the_limit_is_refused(sigil_home: Path) -> None:
    path = _config(sigil_home, "# padding\n" * 200_000)  # 2 MB of comments
    proc = run_cli(sigil_home, "config", "show", timeout=20)
    _one_line_usage(proc, str(path), "too large")


def test_config_symlink_to_a_regular_file_is_still_read(sigil_home: Path, tmp_path: Path) -> None:
    real = tmp_path / "dotfiles.yaml"
    real.write_text("token_budget:\n  default_total: 4321\n")
    sigil_home.mkdir(parents=True)
    (sigil_home / "config.yaml").symlink_to(real)
    proc = run_cli(sigil_home, "config", "show", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "4321" in proc.stdout


# -- item 16: every setting is validated fully before anything is written


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("logging.flush_interval_seconds", "4000"),
        ("logging.flush_interval_seconds", ".inf"),
        ("logging.flush_interval_seconds", ".nan"),
        ("provider.timeout_seconds", ".inf"),
        ("logging.max_file_size_mb", ".inf"),
        ("monitoring.refresh_rate_hz", ".inf"),
        ("errors.backoff_max", ".inf"),
    ],
)
def test_out_of_range_number_is_bad_usage_naming_key_and_file(
    sigil_home: Path, key: str, value: str
) -> None:
    section, name = key.split(".")
    path = _config(sigil_home, f"{section}:\n  {name}: {value}\n")
    proc = run_cli(sigil_home, "orchestrate", "--task", "t", "--session", "s1")
    _one_line_usage(proc, str(path), key)
    assert _written(sigil_home) == []


def test_step_path_to_a_plain_function_is_refused_without_calling_it(
    sigil_home: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "called"
    # A function that would leave a mark if sigil called it to get a step.
    (tmp_path / "hostile_steps.py").write_text(
        "import pathlib\n"
        f"def make(command):\n    pathlib.Path({str(marker)!r}).write_text(command)\n"
        f"def no_args():\n    pathlib.Path({str(marker)!r}).write_text('x')\n    return 42\n"
    )
    env = isolated_env(sigil_home)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SIGIL, "orchestrate", "--task", "t", "--session", "s1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    for target in ("os:system", "hostile_steps:make"):
        path = _config(sigil_home, f"pipeline:\n  steps:\n    reasoning: '{target}'\n")
        proc = run()
        _one_line_usage(proc, str(path), "pipeline.steps.reasoning")
        assert _written(sigil_home) == []
        assert not marker.exists()
    # A zero-argument factory is called, and what it returns must be a step.
    path = _config(sigil_home, "pipeline:\n  steps:\n    reasoning: 'hostile_steps:no_args'\n")
    proc = run()
    _one_line_usage(proc, str(path), "pipeline.steps.reasoning", "not a step")
    assert _written(sigil_home) == []


def test_step_path_that_cannot_be_imported_names_key_and_file(sigil_home: Path) -> None:
    path = _config(sigil_home, "pipeline:\n  steps:\n    memory: 'no_such_module_xyz:Step'\n")
    proc = run_cli(sigil_home, "orchestrate", "--task", "t", "--session", "s1")
    _one_line_usage(proc, str(path), "pipeline.steps.memory")
    assert _written(sigil_home) == []


# -- item 17: bad text and non-ASCII digits are bad usage, with nothing written


def test_non_utf8_task_is_bad_usage_with_nothing_written(sigil_home: Path) -> None:
    args = [os.fsencode(a) for a in SIGIL] + [b"orchestrate", b"--task", b"Analyze \xff\xfe"]
    proc = subprocess.run(
        args,
        env=isolated_env(sigil_home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _one_line_usage(proc, "--task", "UTF-8")
    assert _written(sigil_home) == []


@pytest.mark.parametrize("budget", ["\u0661\u0662\u0663", "\uff11\uff12\uff13", "12\u0663"])
def test_budget_accepts_ascii_digits_only(sigil_home: Path, budget: str) -> None:
    proc = run_cli(sigil_home, "orchestrate", "--task", "t", "--budget", budget)
    _one_line_usage(proc, "--budget")
    assert _written(sigil_home) == []


def test_budget_from_the_environment_accepts_ascii_digits_only(sigil_home: Path) -> None:
    proc = run_cli(sigil_home, "orchestrate", "--task", "t", SIGIL_BUDGET="\u0661\u0662\u0663")
    _one_line_usage(proc, "SIGIL_BUDGET")
    assert _written(sigil_home) == []


# -- item 10: files sigil creates or replaces never follow a planted symlink


def test_planted_monitor_pid_symlink_is_not_followed(sigil_home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    logs = sigil_home / "logs"
    logs.mkdir(parents=True, mode=0o700)
    (logs / "monitor.pid").symlink_to(outside)
    run = run_cli(sigil_home, "orchestrate", "--task", "t", "--session", "s1")
    assert run.returncode == 0, run.stderr
    proc = subprocess.Popen(
        [*SIGIL, "monitor", "--session", "s1", "--mode", "stream", "--follow"],
        env=isolated_env(sigil_home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        pid_file = logs / "monitor.pid"
        while time.monotonic() < deadline:
            if not pid_file.is_symlink() and pid_file.exists():
                break
            time.sleep(0.02)
        assert not pid_file.is_symlink(), "the planted symlink was kept"
        assert pid_file.read_text().strip() == str(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert outside.read_text() == "keep me\n"


def test_planted_symlinks_at_summary_temp_names_are_not_followed(
    sigil_home: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    first = run_cli(sigil_home, "orchestrate", "--task", "t", "--session", "s1")
    assert first.returncode == 0, first.stderr
    session = sigil_home / "logs" / "sessions" / "s1"
    # The next run's process id is unknown: plant the temp name for a range of pids.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    planted = []
    base = os.getpid()
    for pid in range(base, min(base + 3000, pid_max)):
        for name in ("tokens.json", "metrics.json", "errors.jsonl"):
            link = session / f".{name}.{pid}.tmp"
            link.symlink_to(outside)
            planted.append(link)
    second = run_cli(sigil_home, "orchestrate", "--task", "t2", "--session", "s1")
    assert second.returncode == 0, second.stderr
    assert outside.read_text() == "keep me\n"
    assert not (session / "tokens.json").is_symlink()


def test_planted_memory_database_symlink_is_refused(sigil_home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "other.db"
    outside.write_bytes(b"")
    sigil_home.mkdir(parents=True, mode=0o700)
    (sigil_home / "memory.db").symlink_to(outside)
    task = "Analyze Acme Corp's latest quarterly report"
    proc = run_cli(sigil_home, "orchestrate", "--task", task, "--session", "s1")
    assert outside.read_bytes() == b""
    assert "Traceback" not in proc.stderr
    # The memory step fails (it is optional) and says why; the rest of the run goes on.
    log = (sigil_home / "logs" / "sessions" / "s1" / "execution.jsonl").read_text()
    assert "memory.db is a symbolic link" in log
    assert proc.returncode == 0, proc.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
