"""``sigil diff``: two sessions, or two runs (``ID@N``), component by component.

Each side is the native session model of the session's whole history (live:
its log joined with its ledger; archived: read from the tar.gz in memory), or
one run of it. Rows are the components of either side, largest token
difference first, then largest p95 latency difference, then errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sigil.reports.sources import archive_snapshot, find_session, fold_live, whole_history
from sigil.telemetry.log_parser import ComponentSnapshot, HistorySnapshot, SessionSnapshot

__all__ = ["DiffError", "Side", "compare", "load_side"]

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


def load_side(log_path: Path, spec: str) -> Side:
    """``ID`` (the whole session) or ``ID@N`` (its run N)."""
    match = _SPEC_RE.fullmatch(spec)
    if match is None:
        raise DiffError(f"{spec!r} is not a session: use ID or ID@RUN")
    session_id, run_text = match["sid"], match["run"]
    source = find_session(log_path, session_id)
    if source is None:
        raise DiffError(f"unknown session {session_id!r} in {str(log_path)!r}")
    history: HistorySnapshot | SessionSnapshot
    if source.archived:
        snapshot = archive_snapshot(Path(source.key))
        if isinstance(snapshot, str):
            raise DiffError(snapshot)
        history = snapshot
    else:
        folded = fold_live([source.key])[0]
        if isinstance(folded, str):
            raise DiffError(f"cannot read session {session_id!r}: {folded}")
        history = folded.snapshot
        if folded.ledger_only_runs:
            # The ledger knows runs the log lost: the whole history joins them.
            history = whole_history(Path(source.key))
    runs = history.runs
    if run_text is None:
        status = runs[-1].status if runs else "waiting"
        return Side(
            spec,
            session_id,
            None,
            source.archived,
            status,
            len(runs),
            history.tokens,
            dict(history.components),
        )
    number = int(run_text)
    for run in runs:
        if run.number == number:
            return Side(
                spec,
                session_id,
                number,
                source.archived,
                run.status,
                1,
                run.tokens,
                dict(run.components),
            )
    numbers = ", ".join(str(r.number) for r in runs) or "none"
    raise DiffError(f"session {session_id!r} has no run {number} (its runs: {numbers})")


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
