"""``sigil report``'s aggregation: SQL over the index's rows (issue 13).

Totals are ``SUM``/``COUNT`` in SQLite, grouped by period (a run belongs to the
local day, ISO week or month its first event falls in: ``TZ`` decides which),
session, component or model. Latency percentiles over many runs merge the runs'
native histograms (bucket counts summed in SQL) and read the quantile off the
merged buckets with the native rule (:func:`latency_quantile`).

Rows split by model (``model``, ``--breakdown``) read the model's exact
per-(component, model) totals of each run (the index's ``models`` table: calls,
errors, tokens and cost of the events that named each model; ``-`` for the
events that named none). Latency is kept per component, not per model: such
rows have no percentiles.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sigil.reports.live import RETRY_STORM as _RETRY_STORM

__all__ = [
    "FAILED_STATUSES",
    "GROUPS",
    "JUMP_FACTOR",
    "JUMP_HISTORY",
    "JUMP_MIN_HISTORY",
    "JUMP_MIN_TOKENS",
    "Filters",
    "Report",
    "is_jump",
    "jump_events",
    "latency_quantile",
    "parse_moment",
    "run_report",
    "token_jumps",
]

GROUPS = ("daily", "weekly", "monthly", "session", "component", "model")
#: run statuses counted as failures: a final event said so, or the writer died
#: before one (``incomplete``)
FAILED_STATUSES = ("error", "budget_exceeded", "interrupted", "incomplete")
_FAILED = "r.status IN ('error', 'budget_exceeded', 'interrupted', 'incomplete')"
#: a run the model lists (the index's row of a source's events outside its
#: runs is not one: its tokens count, it is no run)
_RUN_ID = "CASE WHEN r.counted THEN r.id END"
#: SQLite's largest integer (:data:`sigil.reports.index.INT64_MAX`), and the
#: largest integer a sum read back as a float is exact to
INT64_MAX = 2**63 - 1
_EXACT = 2**53

#: the group's key, as SQL over ``runs r`` and ``components c``
_KEY_SQL = {
    "daily": "date(r.started_ts, 'unixepoch', 'localtime')",
    # 'weekday 0' moves to the next Sunday (or stays on one): -6 days is Monday.
    "weekly": "date(r.started_ts, 'unixepoch', 'localtime', 'weekday 0', '-6 days')",
    "monthly": "strftime('%Y-%m', r.started_ts, 'unixepoch', 'localtime')",
    "session": "r.session_id",
    "component": "c.component",
    "model": "COALESCE(c.model, '-')",
}
#: the same keys over ``models m`` (a run's exact per-model totals)
_MODEL_KEY_SQL = {
    **_KEY_SQL,
    "component": "m.component",
    "model": "COALESCE(m.model, '-')",
}
#: the per-model numbers a row split by model adds
MODEL_COLUMNS = (
    "calls",
    "cost_nanousd",
    "priced_events",
    "unpriced_tokens",
    "unpriced_calls",
    "unknown_usage_calls",
    "tokens_held",
)
_KEY_NAME = {
    "daily": "period",
    "weekly": "period",
    "monthly": "period",
    "session": "session",
    "component": "component",
    "model": "model",
}
QUANTILES = (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95), ("p99_latency_ms", 0.99))


@dataclass(slots=True, frozen=True)
class Filters:
    since: float | None = None  # epoch seconds, inclusive
    until: float | None = None  # epoch seconds, exclusive
    session_prefix: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = ["r.duplicate = 0"]
        params: list[Any] = []
        if self.since is not None:
            clauses.append("r.started_ts >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("r.started_ts < ?")
            params.append(self.until)
        if self.session_prefix:
            clauses.append("substr(r.session_id, 1, ?) = ?")
            params += [len(self.session_prefix), self.session_prefix]
        return " AND ".join(clauses), params


#: retries of one component in one run from which they are a storm (the live
#: view's rule too: :data:`sigil.reports.live.RETRY_STORM`)
RETRY_STORM = _RETRY_STORM

#: Token jumps (issue 13: "a component whose tokens per operation jump far
#: above its own history"). A component's tokens per call in a run (its tokens
#: over its calls, completed plus failed steps, as the native model counted
#: them) is compared with the same component's tokens per call in its last
#: :data:`JUMP_HISTORY` runs before it (runs of the sessions the report's
#: ``--session-prefix`` selects, from any date: the range only picks the runs
#: judged). With at least :data:`JUMP_MIN_HISTORY` such runs, it is a jump when
#: it is above :data:`JUMP_FACTOR` times the history's p99 (nearest rank) and at
#: least :data:`JUMP_MIN_TOKENS` tokens per call above it, so a tiny component
#: going from 5 to 40 tokens per call does not flag.
JUMP_HISTORY = 20
JUMP_MIN_HISTORY = 5
JUMP_FACTOR = 2.0
JUMP_MIN_TOKENS = 100


@dataclass(slots=True)
class Report:
    group: str
    key: str  # the JSON name of a row's key: period, session, component or model
    breakdown: bool
    rows: list[dict[str, Any]]
    total: dict[str, Any]
    #: loops (a step started again and again with one input), retry storms,
    #: token jumps and runs out of budget of the runs reported, each with the
    #: events (seqs) that show it
    anomalies: dict[str, list[dict[str, Any]]] | None = None
    #: sessions whose logs lack events (holes in seq the model counted as
    #: ``missing_events``): their numbers are a lower bound
    incomplete: list[dict[str, Any]] = field(default_factory=list)
    #: sessions with a number past SQLite's integers, shown as ``INT64_MAX``
    overflow: list[str] = field(default_factory=list)


def parse_moment(text: str, *, end: bool = False) -> float:
    """Epoch seconds of an ISO date or date-time, read as ``sigil monitor --since``
    reads it (:func:`sigil.core.moments.parse_moment`: no offset is local time,
    the edges of datetime's range clamped). ValueError when it is no ISO date."""
    from sigil.core.moments import parse_moment as moment_of

    moment = moment_of(text, end=end)
    if moment is None:
        raise ValueError(f"not a date: {text!r}")
    return moment.timestamp()


def latency_quantile(buckets: dict[int, int], max_ms: float | None, p: float) -> float | None:
    """The ``p`` quantile of merged latency histograms (bucket index -> count),
    by the native model's own rule (``latency_quantile_ms``): the upper bound
    of the bucket holding rank ``ceil(p * n)``, never above the largest latency
    seen. None without timed steps."""
    if not buckets:
        return None
    histogram = [0] * (max(buckets) + 1)
    for index, count in buckets.items():
        histogram[index] = count
    from sigil.telemetry.log_parser import latency_quantile_ms

    return latency_quantile_ms(histogram, math.inf if max_ms is None else max_ms, p)


def run_report(
    conn: sqlite3.Connection,
    group: str,
    filters: Filters,
    bounds: Sequence[float],
    *,
    breakdown: bool = False,
) -> Report:
    """The report's rows (and its total) for ``group``, from the index."""
    by_model = group == "model" or breakdown
    table = _MODEL_KEY_SQL if by_model else _KEY_SQL
    keys = [table[group]]
    if breakdown:
        # Split each row by what the group is not already: component and model.
        if group != "component":
            keys.append(table["component"])
        if group != "model":
            keys.append(table["model"])
    by_run = group in ("daily", "weekly", "monthly", "session") and not breakdown
    if by_model:
        rows = _model_rows(conn, keys, filters)
    else:
        rows = _rows(conn, keys, filters, bounds, by_run=by_run)
    total = _rows(conn, ["'total'"], filters, bounds, by_run=True)
    names = [_KEY_NAME[group]]
    if breakdown:
        names += [n for n in ("component", "model") if n != names[0]]
    shaped = []
    for key, values in rows.items():
        row = dict(zip(names, key, strict=True))
        row.update(values)
        shaped.append(row)
    if group in ("component", "model"):
        shaped.sort(key=lambda r: (-r["tokens"], str(r[names[0]])))
    else:
        shaped.sort(key=lambda r: tuple(str(r[n]) for n in names))
    empty = _empty()
    return Report(
        group,
        names[0],
        breakdown,
        shaped,
        next(iter(total.values()), empty),
        anomalies(conn, filters),
        *_incomplete(conn, filters),
    )


def _incomplete(
    conn: sqlite3.Connection, filters: Filters
) -> tuple[list[dict[str, Any]], list[str]]:
    """The sessions reported whose logs lack events (the model's missing
    events), and those with numbers past SQLite's integers."""
    where, params = filters.where()
    rows, approximate = _fetch(
        conn,
        "SELECT r.session_id, SUM(r.missing_events) FROM runs r"
        f" WHERE {where} GROUP BY r.session_id HAVING SUM(r.missing_events) > 0"
        " ORDER BY r.session_id",
        params,
    )
    missing = [
        {"session": session, "missing_events": _whole(n, approximate)[0]} for session, n in rows
    ]
    over = [
        row[0]
        for row in conn.execute(
            f"SELECT DISTINCT r.session_id FROM runs r WHERE {where} AND r.overflow"
            " ORDER BY r.session_id",
            params,
        )
    ]
    return missing, over


def _fetch(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> tuple[list[Any], bool]:
    """The rows of ``sql``, and whether its sums were read as floats: SQLite's
    ``SUM`` raises past its 64-bit integers, so such a query is asked again
    with ``TOTAL`` (never raises; exact below 2**53), its numbers then read by
    :func:`_whole` and marked."""
    try:
        return conn.execute(sql, params).fetchall(), False
    except sqlite3.OperationalError as exc:
        if "integer overflow" not in str(exc):
            raise
    return conn.execute(sql.replace("SUM(", "TOTAL("), params).fetchall(), True


def _whole(value: Any, approximate: bool) -> tuple[Any, bool]:
    """A sum as the report shows it, and whether it is past what SQLite holds
    exactly (then at most ``INT64_MAX``, a lower bound)."""
    if not approximate or not isinstance(value, float):
        return value, False
    return min(int(value), INT64_MAX), value >= _EXACT


def anomalies(conn: sqlite3.Connection, filters: Filters) -> dict[str, list[dict[str, Any]]]:
    """The runs' loops (the native model's: a component started at least 3
    times with the same ``input_sha256``), retry storms (at least
    :data:`RETRY_STORM` retries of one component in one run), token jumps
    (:func:`token_jumps`) and the runs out of budget, each with the seqs of
    the events that show it."""
    where, params = filters.where()
    loops = [
        {
            "session": row[0],
            "run": row[1],
            "component": row[2],
            "input_sha256": row[3],
            "starts": row[4],
            "seqs": [int(x) for x in row[5].split(",") if x],
        }
        for row in conn.execute(
            "SELECT r.session_id, r.run, l.component, l.input_sha256, l.starts, l.seqs"
            f" FROM loops l JOIN runs r ON l.run_id = r.id WHERE {where}"
            " ORDER BY r.session_id, r.run, l.component",
            params,
        )
    ]
    storms = [
        {
            "session": row[0],
            "run": row[1],
            "component": row[2],
            "retries": row[3],
            "seqs": [int(x) for x in row[4].split(",") if x],
        }
        for row in conn.execute(
            "SELECT r.session_id, r.run, c.component, c.retries, c.retry_seqs FROM components c"
            f" JOIN runs r ON c.run_id = r.id WHERE {where} AND c.retries >= ?"
            " ORDER BY r.session_id, r.run, c.component",
            [*params, RETRY_STORM],
        )
    ]
    exhausted = [
        {
            "session": row[0],
            "run": row[1],
            "tokens": row[2],
            "budget": row[3],
            "seqs": [] if row[4] is None else [row[4]],
        }
        for row in conn.execute(
            "SELECT r.session_id, r.run, r.tokens, r.budget, r.last_seq FROM runs r"
            f" WHERE {where} AND r.status = 'budget_exceeded' ORDER BY r.session_id, r.run",
            params,
        )
    ]
    return {
        "loops": loops,
        "retry_storms": storms,
        "token_jumps": token_jumps(conn, filters),
        "budget_exhausted": exhausted,
    }


def is_jump(value: float, p99: float) -> bool:
    """The token jump rule: far above the history's p99 (module docstring)."""
    return value > JUMP_FACTOR * p99 and value - p99 >= JUMP_MIN_TOKENS


def jump_events(calls: int, heaviest: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """The events that show a token jump (issue 13): the component's calls in
    the run, and the heaviest of them as the native model kept them
    (``ComponentSnapshot.heaviest_calls``: ``(seq, tokens)``, most tokens first)."""
    return {
        "calls": calls,
        "seqs": [seq for seq, _ in heaviest],
        "heaviest_calls": [{"seq": seq, "tokens": tokens} for seq, tokens in heaviest],
    }


def token_jumps(conn: sqlite3.Connection, filters: Filters) -> list[dict[str, Any]]:
    """The runs in ``filters``' range whose components' tokens per call jump
    far above their own last runs' (:data:`JUMP_HISTORY`): one SQL query for
    every (component, run) with calls, in start order, and one pass over it
    keeping each component's last values."""
    from collections import deque

    history = Filters(None, filters.until, filters.session_prefix)
    where, params = history.where()
    judged = []
    if filters.since is not None:
        judged.append("r.started_ts >= ?")
        params = [filters.since, *params]
    flag = " AND ".join(judged) or "1"
    rows = conn.execute(
        f"SELECT c.component, r.session_id, r.run, {flag},"
        " CAST(c.tokens AS REAL) / (c.operations + c.errors), c.operations + c.errors,"
        " c.heaviest"
        f" FROM components c JOIN runs r ON c.run_id = r.id WHERE {where}"
        " AND c.operations + c.errors > 0"
        " ORDER BY c.component, r.started_ts, r.id",
        params,
    )
    out: list[dict[str, Any]] = []
    last: deque[float] = deque(maxlen=JUMP_HISTORY)
    current: str | None = None
    from sigil.reports.index import decode_calls

    for component, session_id, run, in_range, value, calls, heaviest in rows:
        if component != current:
            current = component
            last.clear()
        if in_range and len(last) >= JUMP_MIN_HISTORY:
            ordered = sorted(last)
            p99 = ordered[math.ceil(0.99 * len(ordered)) - 1]
            if is_jump(value, p99):
                out.append(
                    {
                        "session": session_id,
                        "run": run,
                        "component": component,
                        "tokens_per_call": value,
                        "history_p99": p99,
                        "history_runs": len(ordered),
                        **jump_events(calls, decode_calls(heaviest)),
                    }
                )
        last.append(value)
    out.sort(key=lambda j: (j["session"], j["run"], j["component"]))
    return out


#: The totals both queries select after the group's keys, in this order.
_TOTAL_COLUMNS = (
    "sessions", "runs", "failed_runs", "tokens", "input_tokens", "output_tokens",
    "operations", "errors", "retries",
)  # fmt: skip


def _empty() -> dict[str, Any]:
    values: dict[str, Any] = {"missing_events": 0, "overflow": False}
    values |= dict.fromkeys(
        (
            "sessions",
            "runs",
            "failed_runs",
            "tokens",
            "input_tokens",
            "output_tokens",
            "operations",
            "errors",
            "retries",
        ),
        0,
    )
    values.update(dict.fromkeys(name for name, _ in QUANTILES))
    return values


def _model_rows(
    conn: sqlite3.Connection, keys: list[str], filters: Filters
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Rows from the runs' exact per-(component, model) totals."""
    where, params = filters.where()
    select_keys = ", ".join(f"{k} AS k{i}" for i, k in enumerate(keys))
    group_by = ", ".join(f"k{i}" for i in range(len(keys)))
    n = len(keys)
    sql = (
        f"SELECT {select_keys}, COUNT(DISTINCT r.session_id), COUNT(DISTINCT {_RUN_ID}),"
        f" COUNT(DISTINCT CASE WHEN r.counted AND {_FAILED} THEN r.id END), SUM(m.tokens),"
        " SUM(m.input_tokens), SUM(m.output_tokens), SUM(m.calls - m.errors), SUM(m.errors),"
        " SUM(m.retries), SUM(m.calls), SUM(m.cost_nanousd), SUM(m.priced_events),"
        " SUM(m.unpriced_tokens), SUM(m.unpriced_calls), SUM(m.unknown_usage_calls),"
        " SUM(m.tokens_held), MAX(r.overflow)"
        f" FROM models m JOIN runs r ON m.run_id = r.id WHERE {where} GROUP BY {group_by}"
    )
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    rows, approximate = _fetch(conn, sql, params)
    for row in rows:
        values = out[tuple(row[:n])] = _empty()
        over = bool(row[-1])
        numbers = []
        for value in row[n:-1]:
            number, past = _whole(value, approximate)
            numbers.append(number)
            over = over or past
        values.update(zip(_TOTAL_COLUMNS, numbers[:9], strict=True))
        values.update(zip(MODEL_COLUMNS, numbers[9:], strict=True))
        values["overflow"], values["missing_events"] = over, None
    return out


def _rows(
    conn: sqlite3.Connection,
    keys: list[str],
    filters: Filters,
    bounds: Sequence[float],
    *,
    by_run: bool,
) -> dict[tuple[Any, ...], dict[str, Any]]:
    where, params = filters.where()
    select_keys = ", ".join(f"{k} AS k{i}" for i, k in enumerate(keys))
    group_by = ", ".join(f"k{i}" for i in range(len(keys)))
    n = len(keys)
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    maxima: dict[tuple[Any, ...], float | None] = {}
    if by_run:
        # Whole runs, one row each: a run's tokens are the model's total for the
        # run, its other numbers its components' rolled up at indexing.
        sql = (
            f"SELECT {select_keys}, COUNT(DISTINCT r.session_id), SUM(r.counted),"
            f" SUM(r.counted AND {_FAILED}),"
            " SUM(r.tokens), SUM(r.input_tokens), SUM(r.output_tokens), SUM(r.operations),"
            " SUM(r.errors), SUM(r.retries), MAX(r.max_latency_ms), MAX(r.overflow),"
            " SUM(r.missing_events)"
            f" FROM runs r WHERE {where} GROUP BY {group_by}"
        )
        histograms = (
            f"SELECT {select_keys}, h.bucket, SUM(h.count) FROM run_latency h"
            f" JOIN runs r ON h.run_id = r.id WHERE {where} GROUP BY {group_by}, h.bucket"
        )
    else:
        sql = (
            f"SELECT {select_keys}, COUNT(DISTINCT r.session_id), COUNT(DISTINCT {_RUN_ID}),"
            f" COUNT(DISTINCT CASE WHEN r.counted AND {_FAILED} THEN r.id END), SUM(c.tokens),"
            " SUM(c.input_tokens), SUM(c.output_tokens), SUM(c.operations), SUM(c.errors),"
            " SUM(c.retries), MAX(c.max_latency_ms), MAX(r.overflow), NULL"
            f" FROM components c JOIN runs r ON c.run_id = r.id WHERE {where}"
            f" GROUP BY {group_by}"
        )
        histograms = (
            f"SELECT {select_keys}, h.bucket, SUM(h.count) FROM latency h"
            " JOIN components c ON h.component_id = c.id JOIN runs r ON c.run_id = r.id"
            f" WHERE {where} GROUP BY {group_by}, h.bucket"
        )
    rows, approximate = _fetch(conn, sql, params)
    for row in rows:
        key = tuple(row[:n])
        values = out[key] = _empty()
        over = bool(row[n + 10])
        numbers = []
        for value in row[n : n + 9]:
            number, past = _whole(value, approximate)
            numbers.append(number)
            over = over or past
        values.update(zip(_TOTAL_COLUMNS, numbers, strict=True))
        maxima[key] = row[n + 9]
        missing = row[n + 11]
        values["overflow"] = over
        values["missing_events"] = None if missing is None else _whole(missing, approximate)[0]
    # The runs' histograms merged bucket by bucket in SQL.
    merged: dict[tuple[Any, ...], dict[int, int]] = {}
    for row in _fetch(conn, histograms, params)[0]:
        merged.setdefault(tuple(row[:n]), {})[row[n]] = row[n + 1]
    for key, buckets in merged.items():
        target = out.get(key)
        if target is None:
            continue
        for name, p in QUANTILES:
            target[name] = latency_quantile(buckets, maxima.get(key), p)
    return out
