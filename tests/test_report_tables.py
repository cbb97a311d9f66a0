# ruff: noqa: E501 -- the tables are compared whole, as wide as they are
"""The rendered tables of ``sigil report`` and ``sigil diff``, compared whole
(rich's tests/test_panel.py is the model), on a pipe (the table whole, never
cut to 80 columns). Trailing blanks are stripped from each line.
"""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli
from test_report import Run, Step, day, write_runs

DAILY = """\
                                         sigil report: daily
┏━━━━━━━━━━━━┳━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━━━┓
┃ PERIOD     ┃ RUNS ┃ FAILED ┃ TOKENS ┃ INPUT ┃ OUTPUT ┃ ERRORS ┃ RETRIES ┃ P50 MS ┃ P95 MS ┃ P99 MS ┃
┡━━━━━━━━━━━━╇━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━━━┩
│ 2026-11-01 │    1 │      0 │    420 │   260 │    140 │      0 │       1 │   20.0 │  150.0 │  150.0 │
│ 2026-11-02 │    1 │      1 │     57 │     0 │      0 │      1 │       0 │   3.00 │   3.00 │   3.00 │
├────────────┼──────┼────────┼────────┼───────┼────────┼────────┼─────────┼────────┼────────┼────────┤
│ TOTAL      │    2 │      1 │    477 │   260 │    140 │      1 │       1 │   20.0 │  150.0 │  150.0 │
└────────────┴──────┴────────┴────────┴───────┴────────┴────────┴─────────┴────────┴────────┴────────┘
"""

SESSION_BREAKDOWN = """\
                                                  sigil report: session
┏━━━━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━┳━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━━━┓
┃ SESSION ┃ COMPONENT    ┃ MODEL ┃ RUNS ┃ FAILED ┃ TOKENS ┃ INPUT ┃ OUTPUT ┃ ERRORS ┃ RETRIES ┃ P50 MS ┃ P95 MS ┃ P99 MS ┃
┡━━━━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━╇━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━━━┩
│ g1      │ orchestrator │ -     │    1 │      0 │      0 │     0 │      0 │      0 │       0 │      - │      - │      - │
│ g1      │ planning     │ m-a   │    1 │      0 │    100 │    60 │     40 │      0 │       0 │      - │      - │      - │
│ g1      │ reasoning    │ -     │    1 │      0 │     20 │     0 │      0 │      0 │       1 │      - │      - │      - │
│ g1      │ reasoning    │ m-b   │    1 │      0 │    300 │   200 │    100 │      0 │       0 │      - │      - │      - │
│ g2      │ orchestrator │ -     │    1 │      1 │      0 │     0 │      0 │      0 │       0 │      - │      - │      - │
│ g2      │ planning     │ -     │    1 │      1 │     50 │     0 │      0 │      0 │       0 │      - │      - │      - │
│ g2      │ reasoning    │ -     │    1 │      1 │      7 │     0 │      0 │      1 │       0 │      - │      - │      - │
├─────────┼──────────────┼───────┼──────┼────────┼────────┼───────┼────────┼────────┼─────────┼────────┼────────┼────────┤
│ TOTAL   │              │       │    2 │      1 │    477 │   260 │    140 │      1 │       1 │   20.0 │  150.0 │  150.0 │
└─────────┴──────────────┴───────┴──────┴────────┴────────┴───────┴────────┴────────┴─────────┴────────┴────────┴────────┘
"""

DIFF = """\
              A g1 (complete, 420 tokens)  vs  B g2 (error, 57 tokens)
┏━━━━━━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━┳━━━━━━━┳━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━┓
┃ COMPONENT    ┃ TOKENS A ┃ TOKENS B ┃ DELTA ┃ ERR A ┃ ERR B ┃ P95 MS A ┃ P95 MS B ┃
┡━━━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━╇━━━━━━━╇━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━┩
│ reasoning    │      320 │        7 │  -313 │     0 │     1 │    150.0 │        - │
│ planning     │      100 │       50 │   -50 │     0 │     0 │     12.0 │     3.00 │
│ orchestrator │        0 │        0 │    +0 │     0 │     0 │        - │        - │
└──────────────┴──────────┴──────────┴───────┴───────┴───────┴──────────┴──────────┘
token jump in A: reasoning 320.0 tokens per call, 45.7x B's 7.0; its heaviest calls: seq 2 (300 tokens)
"""


def _history(log_path: Path) -> None:
    planning = Step("planning", 100, "ok", 12.0, "m-a", 60, 40)
    reasoning = Step("reasoning", 300, "ok", 150.0, "m-b", 200, 100)
    first = [planning, reasoning, Step("reasoning", 20, "retry")]
    second = [Step("planning", 50, "ok", 3.0), Step("reasoning", 7, "error")]
    write_runs(
        log_path,
        [
            Run("g1", 1, day("2026-11-01T09:00:00+00:00"), first),
            Run("g2", 1, day("2026-11-02T09:00:00+00:00"), second, status="error"),
        ],
    )


def _shown(sigil_home: Path, *args: str) -> str:
    proc = run_cli(sigil_home, *args, TZ="UTC", NO_COLOR="1")
    assert proc.returncode == 0, proc.stderr
    return "\n".join(line.rstrip() for line in proc.stdout.splitlines()) + "\n"


def test_daily_table(sigil_home: Path, log_path: Path) -> None:
    _history(log_path)
    assert _shown(sigil_home, "report", "daily") == DAILY


def test_session_breakdown_table(sigil_home: Path, log_path: Path) -> None:
    _history(log_path)
    assert _shown(sigil_home, "report", "session", "--breakdown") == SESSION_BREAKDOWN


def test_diff_table(sigil_home: Path, log_path: Path) -> None:
    _history(log_path)
    assert _shown(sigil_home, "diff", "g1", "g2") == DIFF
