"""Shared fixtures: a private SIGIL_HOME per test and a runner for the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

SIGIL = [sys.executable, "-m", "sigil"]

# Property tests check what is generated, never how fast: on a loaded machine
# (CI's two cores) generation and examples are slow, and a deadline or the
# too-slow health check would fail a correct test. Each test's own settings
# (max_examples, ...) build on this profile.
settings.register_profile("sigil", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sigil")


@pytest.fixture
def sigil_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh sigil home (``$SIGIL_HOME``) for this test; logs go to ``<home>/logs``."""
    home = tmp_path / "sigil-home"
    monkeypatch.setenv("SIGIL_HOME", str(home))
    for var in ("SIGIL_LOG_PATH", "SIGIL_BUDGET", "SIGIL_PROVIDER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    yield home


@pytest.fixture
def log_path(sigil_home: Path) -> Path:
    return sigil_home / "logs"


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["SIGIL_HOME"] = str(home)
    env.setdefault("NO_COLOR", "1")
    env.update(extra)
    return env


@pytest.fixture
def run_sigil(sigil_home: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``sigil <args>`` as a real subprocess with this test's SIGIL_HOME."""

    def run(
        *args: str, timeout: float = 120, env: dict[str, str] | None = None, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SIGIL, *args],
            env=cli_env(sigil_home, **(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,  # type: ignore[arg-type]
        )

    return run


def run_py(script: str, *args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a Python script in a fresh interpreter; fail the test with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"subprocess exited {proc.returncode}\n--stdout--\n{proc.stdout}\n--stderr--\n{proc.stderr}"
    )
    return proc


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``predicate`` until it is truthy; fail after a generous deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


TESTS_DIR = Path(__file__).resolve().parent


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this test's home, the test step
    modules importable (``pipeline.steps`` in config), and none of the user's
    SIGIL_*, OPENAI_* or OTEL_* settings unless passed in ``extra``."""
    path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    env = cli_env(home, PYTHONPATH=path, **extra)
    for var in list(env):
        if var.startswith("OTEL_") and var not in extra:
            del env[var]
    for var in (
        "SIGIL_LOG_PATH",
        "SIGIL_BUDGET",
        "SIGIL_PROVIDER",
        "SIGIL_BASE_URL",
        "OPENAI_API_KEY",
    ):
        if var not in extra:
            env.pop(var, None)
    return env


def run_cli(
    home: Path, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``sigil <args>`` with :func:`isolated_env`."""
    return subprocess.run(
        [*SIGIL, *args],
        env=isolated_env(home, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
