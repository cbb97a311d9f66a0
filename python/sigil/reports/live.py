"""Token jumps in the live view (issue 13: anomalies "in report, diff and the
live view ... each with the events that show it").

While a session runs, a component of its current run whose tokens per call so
far jump far above its own history is flagged by the rule of ``sigil report``
(:func:`sigil.reports.query.is_jump`): the history is the component's tokens per
call in its last :data:`~sigil.reports.query.JUMP_HISTORY` finished runs (of
any session, the watched run left out) as the report index holds them.

The index is read once (:func:`load_jump_history`), after the monitor's first
frame, and only when it exists: the monitor never builds or refreshes it (that
refolds logs), so a log path where no ``sigil report`` ran shows no live jumps.
Each snapshot is then judged in memory (:meth:`JumpHistory.judge`): a dict
lookup per component of the current run. The events that show a jump are the
native model's heaviest calls of that component in the run
(``ComponentSnapshot.heaviest_calls``).

This module imports nothing heavy at load: the monitor imports it on its way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sigil.telemetry.log_parser import RunSnapshot

__all__ = [
    "INDEX_FILE_NAME",
    "RETRY_STORM",
    "JumpHistory",
    "budget_exhausted",
    "load_jump_history",
    "retry_storms",
]

#: Retries of one component in one run from which they are a storm (the rule
#: of ``sigil report``, ``sigil diff`` and the live view).
RETRY_STORM = 5

#: :data:`sigil.reports.index.INDEX_FILE_NAME` (that module is not imported
#: unless the file is there)
INDEX_FILE_NAME = "report_index.sqlite3"


@dataclass(slots=True)
class JumpHistory:
    """Each component's tokens per call in its latest finished runs (newest
    last, with their session and run), from the report index."""

    runs: Mapping[str, list[tuple[str, int, float]]] = field(default_factory=dict)
    #: (session, run) judged -> component -> (p99, runs): worked out once per run
    _thresholds: dict[tuple[str, int], dict[str, tuple[float, int]]] = field(default_factory=dict)

    def thresholds(self, session_id: str, run: int) -> dict[str, tuple[float, int]]:
        """Each component's history p99 and its number of runs, for judging
        ``session_id``'s run ``run`` (left out of its own history); only the
        components with enough history."""
        from sigil.reports.query import JUMP_HISTORY, JUMP_MIN_HISTORY

        key = (session_id, run)
        found = self._thresholds.get(key)
        if found is None:
            found = {}
            for component, past in self.runs.items():
                values = [v for s, r, v in past if (s, r) != key][-JUMP_HISTORY:]
                if len(values) < JUMP_MIN_HISTORY:
                    continue
                ordered = sorted(values)
                found[component] = (ordered[math.ceil(0.99 * len(ordered)) - 1], len(ordered))
            self._thresholds = {key: found}  # one run watched at a time
        return found

    def judge(self, session_id: str, run: RunSnapshot) -> list[dict[str, Any]]:
        """The token jumps of ``run`` so far, in component order, each with the
        events that show it (the shape of ``sigil report``'s ``token_jumps``)."""
        if not self.runs:
            return []
        from sigil.reports.query import is_jump, jump_events

        limits = self.thresholds(session_id, run.number)
        if not limits:
            return []
        out = []
        for name, c in sorted(run.components.items()):
            limit = limits.get(name)
            calls = c.operations + c.errors
            if limit is None or calls <= 0:
                continue
            value = c.tokens / calls
            p99, runs = limit
            if is_jump(value, p99):
                out.append(
                    {
                        "session": session_id,
                        "run": run.number,
                        "component": name,
                        "tokens_per_call": value,
                        "history_p99": p99,
                        "history_runs": runs,
                        **jump_events(calls, c.heaviest_calls),
                    }
                )
        return out


def load_jump_history(log_path: Path) -> JumpHistory:
    """The components' latest finished runs from ``log_path``'s report index as
    it is (read only, never built or refreshed); empty without an index, or
    with one of another schema or that cannot be read."""
    path = log_path / INDEX_FILE_NAME
    if not path.is_file():
        return JumpHistory()  # nothing imported: a stat is all it costs
    import sqlite3
    from urllib.parse import quote

    from sigil.reports.index import SCHEMA_VERSION
    from sigil.reports.query import JUMP_HISTORY

    try:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=0.5)
    except sqlite3.Error:
        return JumpHistory()
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            return JumpHistory()
        # The latest JUMP_HISTORY + 1 runs of each component: one more than the
        # history, as the watched run may be among them (a finished session).
        rows = conn.execute(
            "SELECT component, session_id, run, value FROM (SELECT c.component AS component,"
            " r.session_id AS session_id, r.run AS run,"
            " CAST(c.tokens AS REAL) / (c.operations + c.errors) AS value,"
            " ROW_NUMBER() OVER (PARTITION BY c.component"
            " ORDER BY r.started_ts DESC, r.id DESC) AS k"
            " FROM components c JOIN runs r ON c.run_id = r.id"
            " WHERE r.duplicate = 0 AND r.finished = 1 AND c.operations + c.errors > 0)"
            " WHERE k <= ? ORDER BY component, k DESC",
            (JUMP_HISTORY + 1,),
        ).fetchall()
    except sqlite3.Error:
        return JumpHistory()
    finally:
        conn.close()
    runs: dict[str, list[tuple[str, int, float]]] = {}
    for component, session_id, run, value in rows:
        runs.setdefault(component, []).append((session_id, run, value))
    return JumpHistory(runs)


def retry_storms(
    session_id: str, runs: Iterable[RunSnapshot], *, label: bool = True
) -> list[dict[str, Any]]:
    """The retry storms of ``runs`` (at least :data:`RETRY_STORM` failed
    attempts of one component in one run), each with the seqs of its first
    failed attempts (``ComponentSnapshot.retry_seqs``), in run then component
    order; ``label`` names the session in each."""
    out = []
    for run in runs:
        for name, c in sorted(run.components.items()):
            if c.retries >= RETRY_STORM:
                storm: dict[str, Any] = {"session": session_id} if label else {}
                storm.update(
                    run=run.number, component=name, retries=c.retries, seqs=list(c.retry_seqs)
                )
                out.append(storm)
    return out


def budget_exhausted(
    session_id: str, runs: Iterable[RunSnapshot], *, label: bool = True
) -> list[dict[str, Any]]:
    """The runs that ended out of budget (status ``budget_exceeded``), each
    with its tokens, its budget and the seq of the final event that said so
    (the run's last event); ``label`` names the session in each."""
    out = []
    for run in runs:
        if run.status == "budget_exceeded":
            found: dict[str, Any] = {"session": session_id} if label else {}
            found.update(
                run=run.number,
                tokens=run.tokens,
                budget=run.budget,
                seqs=[] if run.last_seq is None else [run.last_seq],
            )
            out.append(found)
    return out
