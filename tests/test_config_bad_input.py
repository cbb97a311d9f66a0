"""Bad input is one line and exit 2, never a traceback (hostile review, finding 3).

An endpoint ``urllib`` cannot split (``http://[::1``, ``http://[zz]:80``) given to
``sigil export -e``, through ``OTEL_EXPORTER_OTLP_ENDPOINT`` or in config.yaml,
and a config.yaml nested 1,000 levels deep, gave a traceback and exit 1. Now:
``Error: <where>: <what>`` on one line, exit 2, nothing written. Real processes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sigil.telemetry.otlp.transport import traces_endpoint

BAD_URLS = ["http://[::1", "http://[zz]:80", "http://[::1]:99999", "https://[fe80::1%zz"]


def one_error_line(proc: Any) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.mark.parametrize("url", BAD_URLS)
def test_export_with_an_endpoint_urllib_cannot_split(
    run_sigil: Callable[..., Any], sigil_home: Path, url: str
) -> None:
    assert run_sigil("orchestrate", "--task", "x", "--session", "T1").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in files_under(sigil_home)}
    proc = run_sigil("export", "-s", "T1", "-e", url)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert "otlp_endpoint" in line and url in line, line
    assert proc.stdout == ""
    assert {p: p.stat().st_mtime_ns for p in files_under(sigil_home)} == before


@pytest.mark.parametrize("url", BAD_URLS)
def test_orchestrate_with_such_an_endpoint_in_the_environment(
    run_sigil: Callable[..., Any], sigil_home: Path, url: str
) -> None:
    proc = run_sigil(
        "orchestrate", "--task", "x", "--session", "T2", "--export-otlp",
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": url},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in line, line
    assert files_under(sigil_home) == []  # nothing written


def test_such_an_endpoint_in_config_yaml_names_its_line(
    run_sigil: Callable[..., Any], sigil_home: Path
) -> None:
    sigil_home.mkdir(parents=True)
    (sigil_home / "config.yaml").write_text("export:\n  otlp_endpoint: 'http://[::1'\n")
    proc = run_sigil("config", "show")
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert "config.yaml:2: export.otlp_endpoint" in line, line


@pytest.mark.parametrize("url", BAD_URLS)
def test_traces_endpoint_says_which_endpoint(url: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid OTLP endpoint ") as info:
        traces_endpoint(url)
    assert "\n" not in str(info.value)


DEEP_CONFIGS = {
    "flow lists": "a: " + "[" * 1000 + "]" * 1000 + "\n",
    "flow mappings": "export: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n",
    "block mappings": "".join(" " * i + f"k{i}:\n" for i in range(1000)) + " " * 1000 + "x: 1\n",
}


@pytest.mark.parametrize("shape", list(DEEP_CONFIGS))
@pytest.mark.parametrize(
    "command",
    [["config", "show"], ["orchestrate", "--task", "x"], ["sessions"], ["monitor", "--once"]],
    ids=["config show", "orchestrate", "sessions", "monitor"],
)
def test_a_config_nested_too_deep_is_one_line(
    run_sigil: Callable[..., Any], sigil_home: Path, shape: str, command: list[str]
) -> None:
    sigil_home.mkdir(parents=True)
    config = sigil_home / "config.yaml"
    config.write_text(DEEP_CONFIGS[shape])
    proc = run_sigil(*command)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc)
    assert str(config) in line and "nested" in line, line
    assert files_under(sigil_home) == [config]  # nothing written
