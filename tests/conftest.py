"""Shared fixtures: a private SIGIL_HOME per test and a runner for the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SIGIL = [sys.executable, "-m", "sigil"]


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
