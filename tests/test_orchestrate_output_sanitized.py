"""Everything ``sigil orchestrate`` prints goes through the sanitizer (issue 11
item 9): a step's error text holding credentials reaches neither stdout nor
stderr, in the table, in ``--json``, nor in the error lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from orchestrate_steps import LEAKED_SECRETS

CONFIG = (
    "errors:\n  max_retries: 1\n  backoff_base: 0.001\n  backoff_max: 0.01\n"
    "pipeline:\n  steps:\n    reasoning: orchestrate_steps:LeakyReasoning\n"
)


@pytest.mark.parametrize("mode", [[], ["--json"]])
def test_a_steps_secret_error_text_is_not_printed(tmp_path: Path, mode: list[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(CONFIG)
    proc = run_cli(home, "orchestrate", "--task", "Analyze Acme", "--session", "leak", *mode)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    printed = proc.stdout + proc.stderr
    assert "reasoning" in printed  # the failure is reported...
    leaked = [s for s in LEAKED_SECRETS if s in printed]
    assert leaked == [], printed  # ...without the credentials in it
    assert "sk-proj-" not in printed and "github_pat_" not in printed
