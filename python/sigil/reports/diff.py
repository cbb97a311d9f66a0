"""``sigil diff``: two sessions, or two runs (``ID@N``), component by component.

Each side is the native session model of the session's whole history (live:
its log joined with its ledger; archived: read from the tar.gz in memory), or
one run of it. Rows are the components of either side, largest token
difference first, then largest p95 latency difference, then errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigil.reports.live import budget_exhausted, retry_storms
from sigil.reports.sources import (
    Folded,
    Source,
    archive_read,
    find_session,
    fold_live,
    whole_history,
)
from sigil.telemetry.log_parser import (
    ComponentSnapshot,
    HistorySnapshot,
    SessionSnapshot,
    run_status,
)

__all__ = ["DiffError", "Side", "compare", "load_sides", "token_jumps"]

_SPEC_RE = re.compile(r"^(?P<sid>[A-Za-z0-9_-]{1,64})(?:@(?P<run>\d{1,9}))?$")
_FIELDS = (
    "tokens",
    "input_tokens",
    "output_tokens",
    "operations",
    "errors",
    "retries",
    "p50_latency_ms",
    "p95_latency_ms",
    "p99_latency_ms",
)


class DiffError(ValueError):
    """A side that cannot be read: one sentence for the user."""


@dataclass(slots=True)
class Side:
    label: str
    session_id: str
    run: int | None
    archived: bool
    status: str
    runs: int
    tokens: int
    components: dict[str, ComponentSnapshot]
    #: (ordinal, component, output_sha256) of the run's steps (a session: its last run's)
    outputs: list[tuple[int, str, str]] = field(default_factory=list)
    #: steps started again and again with the same input (the native model's loops)
    loops: list[dict[str, Any]] = field(default_factory=list)
    #: components retried 5+ times in a run, with their first failed attempts' seqs
    retry_storms: list[dict[str, Any]] = field(default_factory=list)
    #: runs that ended out of budget, with the seq of the event that said so
    budget_exhausted: list[dict[str, Any]] = field(default_factory=list)

    def head(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "session": self.session_id,
            "run": self.run,
            "archived": self.archived,
            "status": self.status,
            "runs": self.runs,
            "tokens": self.tokens,
        }


def load_sides(log_path: Path, specs: list[str], warnings: list[str] | None = None) -> list[Side]:
    """Each of ``specs``: ``ID`` (the whole session) or ``ID@N`` (its run N).
    The live sessions among them are folded by one native call, side by side.
    A session whose log is partly unreadable (a rotated segment cut short, an
    archive cut short) is compared by its readable part, as ``sigil report``
    and the monitor count it, with a line in ``warnings`` saying so; one of
    which nothing can be read is a :class:`DiffError`."""
    wanted = [_resolve(log_path, spec) for spec in specs]
    live = sorted({source.key for _, _, _, source in wanted if not source.archived})
    folded = dict(zip(live, fold_live(live), strict=True))
    histories: dict[str, HistorySnapshot | SessionSnapshot] = {}
    sides = []
    for spec, session_id, number, source in wanted:
        history = histories.get(source.key)
        if history is None:
            history = histories[source.key] = _history(source, folded.get(source.key), warnings)
        sides.append(_side(spec, session_id, number, source, history))
    return sides


def _resolve(log_path: Path, spec: str) -> tuple[str, str, int | None, Source]:
    match = _SPEC_RE.fullmatch(spec)
    if match is None:
        raise DiffError(f"{spec!r} is not a session: use ID or ID@RUN")
    session_id = match["sid"]
    source = find_session(log_path, session_id)
    if source is None:
        raise DiffError(f"unknown session {session_id!r} in {str(log_path)!r}")
    number = int(match["run"]) if match["run"] is not None else None
    return spec, session_id, number, source


def _history(
    source: Source, folded: Folded | str | None, warnings: list[str] | None = None
) -> HistorySnapshot | SessionSnapshot:
    if source.archived:
        snapshot, problem = archive_read(Path(source.key))
        if snapshot is None:
            raise DiffError(problem or f"cannot read {source.key}")
        if problem is not None:
            if warnings is None:
                raise DiffError(problem)
            warnings.append(
                f"session {source.session_id} is unreadable in part: {problem}"
                " (its readable part is compared)"
            )
        return snapshot
    if isinstance(folded, str) and warnings is not None:
        try:
            partial = whole_history(Path(source.key))
        except Exception:  # the reason below already says what is wrong
            partial = None
        if partial is not None and partial.runs:
            warnings.append(
                f"session {source.session_id} is unreadable in part: {folded}"
                " (its readable part is compared)"
            )
            return partial
    if folded is None or isinstance(folded, str):
        raise DiffError(f"cannot read session {source.session_id!r}: {folded}")
    if folded.ledger_only_runs:
        # The ledger knows runs the log lost: the whole history joins them.
        return whole_history(Path(source.key))
    return folded.snapshot


def _side(
    spec: str,
    session_id: str,
    number: int | None,
    source: Source,
    history: HistorySnapshot | SessionSnapshot,
) -> Side:
    runs = history.runs
    last = len(runs) - 1
    # A run without a final event is incomplete once its writer is gone (contract 7).
    writer_there = source.locked and not source.archived

    def status(i: int) -> str:
        return run_status(runs[i], writer_gone=not writer_there or i < last)

    if number is None:
        return Side(
            spec,
            session_id,
            None,
            source.archived,
            status(last) if runs else _status_without_runs(history, writer_there),
            history.run_count,
            history.tokens,
            dict(history.components),
            list(runs[-1].step_outputs) if runs else [],
            [loop.to_dict() for r in runs for loop in r.loops],
            retry_storms(session_id, runs, label=False),
            budget_exhausted(session_id, runs, label=False),
        )
    for i, run in enumerate(runs):
        if run.number == number:
            return Side(
                spec,
                session_id,
                number,
                source.archived,
                status(i),
                1,
                run.tokens,
                dict(run.components),
                list(run.step_outputs),
                [loop.to_dict() for loop in run.loops],
                retry_storms(session_id, [run], label=False),
                budget_exhausted(session_id, [run], label=False),
            )
    numbers = ", ".join(str(r.number) for r in runs) or "none"
    raise DiffError(f"session {session_id!r} has no run {number} (its runs: {numbers})")


def _status_without_runs(history: HistorySnapshot | SessionSnapshot, writer_there: bool) -> str:
    """The status of a session whose log holds no started run, as the model
    gives it (the monitor's and ``sigil sessions``' rule): its events outside
    any run (a run whose ``session_start`` was rotated away) are the fold's
    current run; ``waiting`` when there are none."""
    snap = history if isinstance(history, SessionSnapshot) else history.snapshot
    if snap is None or not snap.entries:
        return "waiting"
    return run_status(snap.run, writer_gone=not writer_there)


def _numbers(c: ComponentSnapshot | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {name: getattr(c, name) for name in _FIELDS}


def _delta(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return None
    return b - a


def compare(a: Side, b: Side) -> list[dict[str, Any]]:
    """One row per component of either side: both sides' numbers and B - A,
    largest differences first."""
    rows = []
    for name in sorted(set(a.components) | set(b.components)):
        left, right = _numbers(a.components.get(name)), _numbers(b.components.get(name))
        zero = dict.fromkeys(_FIELDS, 0)
        delta = {
            f: _delta((left or zero)[f], (right or zero)[f])
            if f.endswith("_ms")
            else (right or zero)[f] - (left or zero)[f]
            for f in _FIELDS
        }
        if left is None or right is None:
            for f in _FIELDS:
                if f.endswith("_ms"):
                    delta[f] = None
        rows.append({"component": name, "a": left, "b": right, "delta": delta})

    def order(row: dict[str, Any]) -> tuple[float, float, float, str]:
        d = row["delta"]
        return (
            -abs(d["tokens"]),
            -abs(d["p95_latency_ms"] or 0.0),
            -abs(d["errors"]),
            row["component"],
        )

    rows.sort(key=order)
    return rows


def changed_steps(a: Side, b: Side) -> list[dict[str, Any]]:
    """The steps whose output differs between A and B: the same ordinal (the
    n-th step that logged an output hash) with another hash, or present on one
    side only. Hashes are the model's (``RunSnapshot.step_outputs``)."""
    rows = []
    for i in range(max(len(a.outputs), len(b.outputs))):
        left = a.outputs[i] if i < len(a.outputs) else None
        right = b.outputs[i] if i < len(b.outputs) else None
        if left is not None and right is not None and left[1:] == right[1:]:
            continue
        rows.append(
            {
                "ordinal": i,
                "component_a": left[1] if left else None,
                "component_b": right[1] if right else None,
                "output_sha256_a": left[2] if left else None,
                "output_sha256_b": right[2] if right else None,
            }
        )
    return rows


def calls(c: ComponentSnapshot) -> int:
    """Calls: completed plus failed steps."""
    return c.operations + c.errors


def _per_call(c: ComponentSnapshot | None) -> float | None:
    """Tokens per call (completed plus failed steps) of the model's totals."""
    if c is None or c.operations + c.errors <= 0:
        return None
    return c.tokens / (c.operations + c.errors)


def token_jumps(a: Side, b: Side) -> dict[str, list[dict[str, Any]]]:
    """The components whose tokens per call on one side jump far above the
    other side's, by the rule of ``sigil report`` (:func:`sigil.reports.query.is_jump`)
    with the other side as the whole history: above 2x its tokens per call and
    at least 100 more. ``"b"`` lists B's jumps over A, ``"a"`` A's over B."""
    from sigil.reports.query import is_jump, jump_events

    out: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    for name in sorted(set(a.components) & set(b.components)):
        values = {
            "a": _per_call(a.components[name]),
            "b": _per_call(b.components[name]),
        }
        for side, other, this in (("a", "b", a), ("b", "a", b)):
            value, baseline = values[side], values[other]
            if value is None or baseline is None or not is_jump(value, baseline):
                continue
            out[side].append(
                {
                    "session": this.session_id,
                    "run": this.run,
                    "component": name,
                    "tokens_per_call": value,
                    "history_p99": baseline,
                    "history_runs": 1,
                    **jump_events(
                        calls(this.components[name]), this.components[name].heaviest_calls
                    ),
                }
            )
    return out
