"""``sigil report`` (and its neighbours) on what a hostile review threw at them
(issue 13 surfaces): dates at the edge of datetime's range, a damaged or
unwritable index, damaged archives, and names from the logs holding terminal
control sequences. Real ``sigil`` subprocesses on real files."""

from __future__ import annotations

import json
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

