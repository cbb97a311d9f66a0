"""A plain-Python session fold: the reference the native session model is compared with.

It follows the rules written at the top of ``rust/fold.rs``, event by event,
without any of the native fold's machinery (name tables, split folds, ring
buffers, rate buckets), and returns the same shape as
``SessionSnapshot.to_dict()``. Lines are parsed with the native parser (the
parser has its own comparison with plain JSON); everything after parsing is
computed here. Test code only (ARCHITECTURE.md contract 12).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_DOWN, Decimal, localcontext
from typing import Any

from sigil._native import parse_lines

MAX_NAMES = 256
OTHER = "(other)"
MAX_SAMPLES = 100
MAX_RUNS = 1000
MAX_TEXT = 1024
WINDOW_SECONDS = 2048
LATENCY_BOUNDS_MS = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5,
    2e5, 5e5,
]  # fmt: skip
FINAL_STATUSES = ("complete", "error", "budget_exceeded", "interrupted")
U64_MAX = (1 << 64) - 1
MAX_UNPRICED_MODELS = 8
LOOP_MIN_STARTS = 3
#: calls kept per component as the events that show its tokens (fold.rs HEAVIEST_CALLS)
HEAVIEST_CALLS = 5
#: seqs kept of a component's first failed attempts (fold.rs FIRST_SEQS)
FIRST_SEQS = 5
META_EVENTS = frozenset(
    {
        "session_start",
        "session_complete",
        "session_error",
        "step_complete",
        "step_error",
        "retry_attempt",
        "token_consumption",
        "events_dropped",
    }
)


def u64(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX:
        return value
    return None


def f64(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def nano_usd(value: object) -> int | None:
    """``metadata.cost_usd`` (parsed with Decimal: its exact text) in whole
    nano-dollars, truncated, saturating; None unless a JSON number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        return None
    cost = Decimal(value)
    if cost < 0:
        return None
    if cost >= Decimal(U64_MAX + 1) / 10**9:  # exact: 20 significant digits
        return U64_MAX
    if cost < Decimal("1e-9"):
        return 0
    # Below 2**64 nano-dollars: 29 digits at most, exact at this precision.
    with localcontext(prec=40):
        return int(cost.quantize(Decimal("1e-9"), rounding=ROUND_DOWN).scaleb(9))


def cost_of(raw: bytes) -> object:
    """The line's ``metadata.cost_usd`` as JSON says it (numbers as Decimal)."""
    meta = json.loads(raw, parse_float=Decimal).get("metadata")
    return meta.get("cost_usd") if isinstance(meta, dict) else None


def bounded(value: str) -> str:
    return value.encode()[:MAX_TEXT].decode(errors="ignore")


def micros(timestamp: str) -> int | None:
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None  # the generated sessions only use aware timestamps
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def seconds_between(a: str | None, b: str | None) -> float | None:
    if a is None or b is None:
        return None
    ma, mb = micros(a), micros(b)
    if ma is None or mb is None:
        return None
    return max(0, mb - ma) / 1e6


@dataclass
class Component:
    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    operations: int = 0
    errors: int = 0
    retries: int = 0
    latencies: list[float] = field(default_factory=list)
    failed_latency_ms: float = 0.0
    model: str | None = None
    last_error: dict[str, Any] | None = None
    cost_nanousd: int = 0
    priced_events: int = 0
    unpriced_tokens: int = 0
    unpriced_models: list[str] = field(default_factory=list)
    unknown_usage_calls: int = 0
    #: the ``metadata.tokens_held`` of its calls (the budget kept for unknown usage)
    tokens_held: int = 0
    #: (tokens, seq) of every call (step_complete, step_error) with a seq
    calls: list[tuple[int, int]] = field(default_factory=list)
    #: seqs of the first failed attempts (retry_attempt counted in retries)
    retry_seqs: list[int] = field(default_factory=list)

    def observe_cost(self, nano: int | None, tokens: int, model: str | None) -> None:
        if nano is not None:
            self.cost_nanousd = min(U64_MAX, self.cost_nanousd + nano)
            self.priced_events += 1
        elif tokens > 0 and model is not None:
            self.unpriced_tokens = min(U64_MAX, self.unpriced_tokens + tokens)
            models = self.unpriced_models
            if model not in models and len(models) < MAX_UNPRICED_MODELS:
                models.append(model)

    def to_dict(self) -> dict[str, Any]:
        timed = len(self.latencies)
        total = 0.0
        for ms in self.latencies:
            total += ms
        histogram = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        for ms in self.latencies:
            index = next(
                (i for i, b in enumerate(LATENCY_BOUNDS_MS) if ms <= b), len(LATENCY_BOUNDS_MS)
            )
            histogram[index] += 1
        top = max(self.latencies) if self.latencies else None

        def quantile(p: float) -> float | None:
            if not timed or top is None:
                return None
            rank = min(max(math.ceil(p * timed), 1), timed)
            seen = 0
            for i, n in enumerate(histogram):
                seen += n
                if seen >= rank:
                    bound = LATENCY_BOUNDS_MS[i] if i < len(LATENCY_BOUNDS_MS) else math.inf
                    return min(bound, max(top, 0.0))
            return top

        return {
            "tokens": self.tokens,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "operations": self.operations,
            "errors": self.errors,
            "retries": self.retries,
            "timed_operations": timed,
            "latency_ms": total,
            "average_latency_ms": total / timed if timed else None,
            "p50_latency_ms": quantile(0.50),
            "p95_latency_ms": quantile(0.95),
            "p99_latency_ms": quantile(0.99),
            "max_latency_ms": max(top, 0.0) if top is not None else None,
            "failed_latency_ms": self.failed_latency_ms,
            "latency_histogram": histogram,
            "model": self.model,
            "last_error": self.last_error,
            "cost_nanousd": self.cost_nanousd,
            "priced_events": self.priced_events,
            "unpriced_tokens": self.unpriced_tokens,
            "unpriced_models": list(self.unpriced_models),
            "unknown_usage_calls": self.unknown_usage_calls,
            "tokens_held": self.tokens_held,
            # The heaviest calls (issue 13): most tokens first, then lower seq.
            "heaviest_calls": [
                (seq, tokens)
                for tokens, seq in sorted(self.calls, key=lambda c: (-c[0], c[1]))[:HEAVIEST_CALLS]
            ],
            "retry_seqs": self.retry_seqs[:FIRST_SEQS],
        }


@dataclass
class Model:
    """One model's totals: the events (of the kinds whose metadata the fold
    reads) whose ``metadata.model`` is a string naming it."""

    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0
    errors: int = 0
    cost_nanousd: int = 0
    priced_events: int = 0
    unpriced_tokens: int = 0
    unpriced_calls: int = 0
    unknown_usage_calls: int = 0
    tokens_held: int = 0

    def observe(
        self,
        kind: str,
        tokens: int,
        meta: dict[str, Any],
        nano: int | None,
        unknown: bool,
        held: int = 0,
    ) -> None:
        call = kind in ("step_complete", "step_error")
        self.tokens = min(U64_MAX, self.tokens + tokens)
        self.input_tokens = min(U64_MAX, self.input_tokens + (u64(meta.get("input_tokens")) or 0))
        self.output_tokens = min(
            U64_MAX, self.output_tokens + (u64(meta.get("output_tokens")) or 0)
        )
        if nano is not None:
            self.cost_nanousd = min(U64_MAX, self.cost_nanousd + nano)
            self.priced_events += 1
        else:
            self.unpriced_tokens = min(U64_MAX, self.unpriced_tokens + tokens)
            self.unpriced_calls += call
        if call:
            self.calls += 1
            self.errors += kind == "step_error"
            self.unknown_usage_calls += unknown
            self.tokens_held = min(U64_MAX, self.tokens_held + held)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


SEP = "\x1f"


def models_items(models: dict[str, Model]) -> dict[str, Any]:
    """``models`` (per model over every component) and ``component_models``
    (per component, per model) of a table keyed ``component SEP model``."""
    per_model: dict[str, dict[str, int]] = {}
    nested: dict[str, dict[str, dict[str, int]]] = {}
    for key in sorted(models, key=lambda k: tuple(k.split(SEP, 1)) if SEP in k else (k, k)):
        component, model = key.split(SEP, 1) if SEP in key else (key, key)
        d = models[key].to_dict()
        nested.setdefault(component, {})[model] = d
        into = per_model.setdefault(model, dict.fromkeys(d, 0))
        for k, v in d.items():
            into[k] = min(U64_MAX, into[k] + v)
    return {"models": dict(sorted(per_model.items())), "component_models": nested}


def cost_totals(components: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A run's or the session's cost: its components' (by name), summed exactly."""
    models: list[str] = []
    for c in components.values():
        for m in c["unpriced_models"]:
            if m not in models and len(models) < MAX_UNPRICED_MODELS:
                models.append(m)
    return {
        "cost_nanousd": min(U64_MAX, sum(c["cost_nanousd"] for c in components.values())),
        "priced_events": min(U64_MAX, sum(c["priced_events"] for c in components.values())),
        "unpriced_tokens": min(U64_MAX, sum(c["unpriced_tokens"] for c in components.values())),
        "unpriced_models": models,
    }


def slot(table: dict[str, Any], name: str, make: Any) -> Any:
    """The capped name table: the first MAX_NAMES names of the file, the rest in OTHER."""
    if name not in table:
        if len(table) >= MAX_NAMES:
            name = OTHER
        if name not in table:
            table[name] = make()
    return table[name]


@dataclass
class Run:
    number: int = 0
    status: str = "waiting"
    reason: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    last_at: str | None = None
    tokens: int = 0
    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    budget: int | None = None
    components: dict[str, Component] = field(default_factory=dict)
    models: dict[str, Model] = field(default_factory=dict)
    #: (component, input hash) -> [starts, first seqs]; outputs in order
    inputs: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    #: the proxy's calls started and not ended: (call, component, model, reserved)
    open_calls: list[tuple[int, str, str | None, int]] = field(default_factory=list)

    def loops(self) -> list[dict[str, Any]]:
        return [
            {"run": self.number, "component": c, "input_sha256": h, "starts": n, "seqs": seqs}
            for (c, h), (n, seqs) in self.inputs.items()
            if n >= LOOP_MIN_STARTS
        ]

    def to_dict(self) -> dict[str, Any]:
        comps = {k: self.components[k].to_dict() for k in sorted(self.components)}
        return {
            "number": self.number,
            "status": self.status,
            "reason": self.reason,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "last_at": self.last_at,
            "duration_seconds": seconds_between(self.started_at, self.ended_at or self.last_at),
            "tokens": self.tokens,
            "events": self.events,
            "budget": self.budget,
            "steps_completed": sum(c["operations"] for c in comps.values()),
            "steps_failed": sum(c["errors"] for c in comps.values()),
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "source": "log",
            "components": comps,
            **cost_totals(comps),
            **models_items(self.models),
            "unknown_usage_calls": sum(c["unknown_usage_calls"] for c in comps.values()),
            "tokens_held": min(U64_MAX, sum(c["tokens_held"] for c in comps.values())),
            "loops": self.loops(),
            "step_outputs": [(i, c, h) for i, (c, h) in enumerate(self.outputs)],
        }


def settle_calls(run: Run, components: dict[str, Component], models: dict[str, Model]) -> None:
    """Review 14, finding 2: a dead run's calls started with a reservation and
    never ended are calls of unknown usage holding it (in the run's components
    and models, and the session's components)."""
    for _call, component, model, reserved in run.open_calls:
        if not reserved:
            continue
        for table in (run.components, components):
            c: Component = slot(table, component, Component)
            c.unknown_usage_calls += 1
            c.tokens_held = min(U64_MAX, c.tokens_held + reserved)
        if model is not None:
            for table, mtable in ((components, models), (run.components, run.models)):
                name = component if component in table else OTHER
                m: Model = slot(mtable, name + SEP + model, Model)
                m.unknown_usage_calls += 1
                m.tokens_held = min(U64_MAX, m.tokens_held + reserved)
    run.open_calls = []


CALL_KINDS = ("step_complete", "step_error")


def remaining(budget: int | None, tokens: int, held: int) -> int | None:
    """What is left of the budget: budget - used - held, never below 0."""
    return None if budget is None else max(0, budget - tokens - held)


def fold_reference(data: bytes, writer_gone: bool = False) -> dict[str, Any]:
    """Fold ``data`` (newline-separated lines; an unterminated last line is torn).

    ``writer_gone``: nobody holds the session's lock, so the last run is dead
    too (a run that ended, or that a later run followed, is dead anyway)."""
    chunks = data.split(b"\n")
    torn = chunks[-1] != b""
    complete = chunks[:-1]
    state: dict[str, Any] = {
        "lines": len(complete),
        "entries": 0,
        "tokens": 0,
        "status": "waiting",
        "budget": None,
        "allocations": {},
        "run_count": 0,
        "first_timestamp": None,
        "last_timestamp": None,
        "first_seq": None,
        "last_seq": None,
        "max_seq": None,
        "seq_gaps": 0,
        "seq_missing": 0,
        "seq_regressions": 0,
        "gap_samples": [],
        "dropped_events": 0,
        "malformed": 0,
        "malformed_lines": [],
    }
    components: dict[str, Component] = {}
    models: dict[str, Model] = {}
    counts: dict[str, int] = {}
    head = Run()
    runs: list[Run] = []
    seconds: list[tuple[int, int]] = []
    offset = 0
    for raw in complete:
        entries, bad = parse_lines([raw], offset)
        line_offset = offset
        offset += len(raw) + 1
        if bad:
            state["malformed"] += 1
            if len(state["malformed_lines"]) < MAX_SAMPLES:
                state["malformed_lines"].append((line_offset, "malformed"))
            continue
        (e,) = entries
        kind = e.event_type
        meta: dict[str, Any] = e.metadata if kind in META_EVENTS else {}
        nano = nano_usd(cost_of(raw)) if kind in META_EVENTS else None
        state["entries"] += 1
        state["tokens"] = min(U64_MAX, state["tokens"] + e.tokens)
        if state["first_timestamp"] is None:
            state["first_timestamp"] = e.timestamp
        state["last_timestamp"] = e.timestamp
        key = e.event_type if e.event_type in counts or len(counts) < MAX_NAMES else OTHER
        counts[key] = counts.get(key, 0) + 1
        if e.seq is not None:
            seq = e.seq
            if state["first_seq"] is None:
                state["first_seq"] = seq
            last = state["last_seq"]
            if last is not None:
                if seq > last + 1:
                    state["seq_gaps"] += 1
                    state["seq_missing"] = min(U64_MAX, state["seq_missing"] + seq - last - 1)
                    if len(state["gap_samples"]) < MAX_SAMPLES:
                        state["gap_samples"].append((last, seq))
                elif seq <= last:
                    state["seq_regressions"] += 1
            state["last_seq"] = seq
            state["max_seq"] = seq if state["max_seq"] is None else max(state["max_seq"], seq)
        at = micros(e.timestamp)
        if at is not None:
            seconds.append((at // 1_000_000, e.tokens))

        if kind == "session_start":
            state["run_count"] += 1
            previous = runs[-1] if runs else head
            declared = u64(meta.get("run"))
            number = declared if declared is not None else min(U64_MAX, previous.number + 1)
            budget = u64(meta.get("budget"))
            if budget is not None:
                state["budget"] = budget
            allocations = meta.get("allocations")
            if isinstance(allocations, dict) and all(
                u64(v) is not None for v in allocations.values()
            ):
                state["allocations"] = dict(sorted(allocations.items())[:MAX_NAMES])
            state["status"] = "running"
            runs.append(
                Run(
                    number=number,
                    status="running",
                    started_at=e.timestamp,
                    budget=state["budget"],
                )
            )
            if len(runs) > MAX_RUNS:
                settle_calls(runs.pop(0), components, models)
        run = runs[-1] if runs else head
        if kind in ("session_complete", "session_error"):
            declared_status = meta.get("status")
            if declared_status in FINAL_STATUSES:
                status = str(declared_status)
            else:
                status = "complete" if kind == "session_complete" else "error"
            reason = text(meta.get("reason"))
            if reason is None:
                reason = text(meta.get("error"))
            state["status"] = status
            run.status = status
            run.reason = bounded(reason) if reason is not None else None
            run.ended_at = e.timestamp
        elif kind == "events_dropped":
            dropped = u64(meta.get("dropped")) or 0
            state["dropped_events"] = min(U64_MAX, state["dropped_events"] + dropped)

        latency = f64(meta.get("latency_ms"))
        if latency is not None and not math.isfinite(latency):
            latency = None
        is_error = kind == "step_error" or (
            kind == "retry_attempt" and meta.get("resume") is not True
        )
        last_error = None
        if is_error:
            message = text(meta.get("error"))
            category = text(meta.get("category"))
            last_error = {
                "event_type": kind,
                "category": bounded(category) if category is not None else None,
                "message": bounded(message if message is not None else e.message),
                "attempt": u64(meta.get("attempt")),
                "timestamp": e.timestamp,
            }
        unknown = meta.get("usage") == "unknown"
        call = kind in ("step_complete", "step_error")
        held = (u64(meta.get("tokens_held")) or 0) if call else 0
        call_id = u64(e.metadata.get("call")) if kind in ("step_start", *CALL_KINDS) else None
        if call_id is not None and kind == "step_start":
            model_named = text(e.metadata.get("model"))
            reserved = (u64(e.metadata.get("prompt_tokens_reserved")) or 0) + (
                u64(e.metadata.get("max_tokens")) or 0
            )
            run.open_calls.append(
                (
                    call_id,
                    e.component,
                    bounded(model_named) if model_named is not None else None,
                    min(U64_MAX, reserved),
                )
            )
        elif call_id is not None:
            for i in range(len(run.open_calls) - 1, -1, -1):
                if run.open_calls[i][0] == call_id:
                    del run.open_calls[i]
                    break
        if kind == "step_start":
            # Only its input hash counts (no other key of its metadata).
            digest = text(e.metadata.get("input_sha256"))
            if digest is not None:
                entry = run.inputs.setdefault((bounded(e.component), digest[:128]), [0, []])
                entry[0] += 1
                if e.seq is not None and len(entry[1]) < 5:
                    entry[1].append(e.seq)
        elif kind == "step_complete":
            digest = text(meta.get("output_sha256"))
            if digest is not None:
                run.outputs.append((bounded(e.component), digest[:128]))
        named = text(meta.get("model"))
        for table, mtable in ((components, models), (run.components, run.models)):
            c: Component = slot(table, e.component, Component)
            c.unknown_usage_calls += call and unknown
            c.tokens_held = min(U64_MAX, c.tokens_held + held)
            if named is not None:
                name = e.component if e.component in table else OTHER
                m: Model = slot(mtable, name + SEP + bounded(named), Model)
                m.observe(kind, e.tokens, meta, nano, unknown, held)
            c.tokens = min(U64_MAX, c.tokens + e.tokens)
            c.input_tokens = min(U64_MAX, c.input_tokens + (u64(meta.get("input_tokens")) or 0))
            c.output_tokens = min(U64_MAX, c.output_tokens + (u64(meta.get("output_tokens")) or 0))
            model = text(meta.get("model"))
            if model is not None:
                c.model = bounded(model)
            c.observe_cost(nano, e.tokens, bounded(model) if model is not None else None)
            if call and e.seq is not None:
                c.calls.append((e.tokens, e.seq))
            if kind == "step_complete":
                c.operations += 1
                if latency is not None:
                    c.latencies.append(latency)
            elif kind == "step_error":
                c.errors += 1
                if latency is not None:
                    c.failed_latency_ms += latency
            elif kind == "retry_attempt" and is_error:
                c.retries += 1
                if e.seq is not None:
                    c.retry_seqs.append(e.seq)
            if last_error is not None:
                c.last_error = dict(last_error)
        run.tokens = min(U64_MAX, run.tokens + e.tokens)
        run.events += 1
        run.last_at = e.timestamp
        if e.seq is not None:
            if run.first_seq is None:
                run.first_seq = e.seq
            run.last_seq = e.seq

    for i, r in enumerate([head, *runs]):
        if i < len(runs) or r.ended_at is not None or writer_gone:
            settle_calls(r, components, models)
    current = runs[-1] if runs else head
    duration = seconds_between(state["first_timestamp"], state["last_timestamp"])
    buckets: dict[int, int] = {}
    if seconds:
        end = max(s for s, _ in seconds)
        for s, n in seconds:
            if s > end - WINDOW_SECONDS:
                buckets[s] = buckets.get(s, 0) + n
    session_components = {k: components[k].to_dict() for k in sorted(components)}
    return {
        **{k: v for k, v in state.items() if k != "malformed_lines"},
        "reason": current.reason,
        "runs_dropped": 0,
        "run": current.to_dict(),
        "runs": [r.to_dict() for r in runs],
        "components": session_components,
        **cost_totals(session_components),
        **models_items(models),
        "unknown_usage_calls": sum(c["unknown_usage_calls"] for c in session_components.values()),
        "tokens_held": min(U64_MAX, sum(c["tokens_held"] for c in session_components.values())),
        "tokens_remaining": remaining(
            state["budget"],
            state["tokens"],
            min(U64_MAX, sum(c["tokens_held"] for c in session_components.values())),
        ),
        "loops": [loop for r in [head, *runs] for loop in r.loops()],
        "event_counts": dict(sorted(counts.items())),
        "duration_seconds": duration,
        "average_tokens_per_second": state["tokens"] / duration if duration else None,
        "oversize_lines": 0,
        "torn_tail": torn,
        "malformed_lines": state["malformed_lines"],
        "rate_buckets": sorted((s, n) for s, n in buckets.items() if n > 0),
    }


def join_reference(data: bytes, ledger: dict[str, Any] | None) -> dict[str, Any]:
    """The whole history of a session whose log now holds ``data``, joined with
    its ledger (``tokens.json`` as a dict, or None), by the rules written at the
    top of ``rust/ledger.rs``. Returns what ``HistorySnapshot`` reports, in the
    shape of :func:`history_view`."""
    fold = fold_reference(data)
    log_runs = fold["runs"]
    covered = ledger["last_seq"] if ledger is not None else None
    in_log = {r["number"] for r in log_runs}
    ledger_only = [r for r in (ledger or {}).get("runs", []) if r["run"] not in in_log]
    keys = ("run", "status", "tokens_used", "events", "first_seq", "last_seq")
    runs = [["ledger", *(r[k] for k in keys)] for r in ledger_only] + [
        ["log", r["number"], r["status"], r["tokens"], r["events"], r["first_seq"], r["last_seq"]]
        for r in log_runs
    ]
    runs.sort(key=lambda r: r[1])
    for r in runs[:-1]:
        if r[2] == "running":
            r[2] = "incomplete"
    orphan = fold["tokens"] - sum(r["tokens"] for r in log_runs)
    if covered is not None and fold["first_seq"] is not None and covered >= fold["first_seq"]:
        orphan = 0
    if ledger_only:
        tokens = orphan + sum(r[3] for r in runs)
        events = fold["entries"] + sum(r["events"] for r in ledger_only)
    else:
        tokens, events = fold["tokens"], fold["entries"]
    seqs = [s for s in (fold["max_seq"], covered) if s is not None]
    first = fold["first_seq"]
    lead_gap = (
        0 if first is None else max(0, first - ((covered if covered is not None else -1) + 1))
    )
    missing = max((ledger or {}).get("missing_events", 0), lead_gap + fold["seq_missing"])
    cost_keys = ("cost_nanousd", "priced_events", "unpriced_tokens", "tokens_held")
    components = {
        n: [c["tokens"], c["operations"], *(c[k] for k in cost_keys)]
        for n, c in fold["components"].items()
    }
    for r in ledger_only:
        for name, c in r["component_stats"].items():
            into = components.setdefault(name, [0] * 6)
            for i, key in enumerate(("tokens", "operations", *cost_keys)):
                into[i] += c.get(key, 0)
    model_keys = (
        "tokens",
        "calls",
        "errors",
        "cost_nanousd",
        "unknown_usage_calls",
        "tokens_held",
    )
    models = {
        (c, n): [m[k] for k in model_keys]
        for c, ms in fold["component_models"].items()
        for n, m in ms.items()
    }
    for r in ledger_only:
        for component, ms in r.get("model_stats", {}).items():
            for name, m in ms.items():
                into = models.setdefault((component, name), [0] * len(model_keys))
                for i, key in enumerate(model_keys):
                    into[i] += m.get(key, 0)
    return {
        "models": {n: tuple(v) for n, v in sorted(models.items())},
        "runs": [tuple(r) for r in runs],
        "tokens": tokens,
        "events": events,
        "last_seq": max(seqs) if seqs else None,
        "ledger_seq": covered,
        "missing_events": missing,
        "orphan_tokens": orphan,
        "components": {n: tuple(v) for n, v in components.items()},
        "cost": tuple(sum(v[i] for v in components.values()) for i in (2, 3, 4)),
        "tokens_held": sum(v[5] for v in components.values()),
    }


def history_view(history: Any) -> dict[str, Any]:
    """A ``HistorySnapshot``'s numbers as plain data (to compare with the reference)."""
    return {
        "models": {
            (c, n): (
                m.tokens,
                m.calls,
                m.errors,
                m.cost_nanousd,
                m.unknown_usage_calls,
                m.tokens_held,
            )
            for c, ms in sorted(history.component_models.items())
            for n, m in sorted(ms.items())
        },
        "runs": [
            (r.source, r.number, r.status, r.tokens, r.events, r.first_seq, r.last_seq)
            for r in history.runs
        ],
        "tokens": history.tokens,
        "events": history.events,
        "last_seq": history.last_seq,
        "ledger_seq": history.ledger_seq,
        "missing_events": history.missing_events,
        "orphan_tokens": history.orphan_tokens,
        "components": {
            n: (
                c.tokens,
                c.operations,
                c.cost_nanousd,
                c.priced_events,
                c.unpriced_tokens,
                c.tokens_held,
            )
            for n, c in history.components.items()
        },
        "cost": (history.cost_nanousd, history.priced_events, history.unpriced_tokens),
        "tokens_held": history.tokens_held,
    }


def in_flight_reference(data: bytes) -> dict[str, Any] | None:
    """The step in flight (``SessionSnapshot.in_flight``) over every valid event:
    a ``step_start`` opens its component's step, or moves it last when open (same
    start, attempt raised to ``metadata.attempt``, its message); ``retry_attempt``
    adds one to the open step's attempt; ``step_complete``/``step_error`` close
    the component's step; a run's start or end closes every step. Only the names
    the capped component table keeps (``slot``) are tracked."""
    names: dict[str, None] = {}
    open_steps: list[dict[str, Any]] = []
    offset = 0
    for raw in data.split(b"\n")[:-1]:
        entries, bad = parse_lines([raw], offset)
        offset += len(raw) + 1
        if bad:
            continue
        (e,) = entries
        kind, name = e.event_type, e.component
        if name not in names and len(names) < MAX_NAMES:
            names[name] = None
        tracked = name in names or name == OTHER
        at = next((i for i, s in enumerate(open_steps) if s["component"] == name), None)
        if kind in ("session_start", "session_complete", "session_error"):
            open_steps.clear()
        elif not tracked:
            continue
        elif kind == "step_start":
            explicit = u64(e.metadata.get("attempt"))
            if at is not None:
                step = open_steps.pop(at)
                step["attempt"] = max(step["attempt"], explicit or 0)
                step["message"] = bounded(e.message)
            else:
                step = {
                    "component": name,
                    "started_at": bounded(e.timestamp),
                    "attempt": max(explicit or 1, 1),
                    "message": bounded(e.message),
                }
            open_steps.append(step)
        elif kind == "retry_attempt" and at is not None:
            open_steps[at]["attempt"] = min(U64_MAX, open_steps[at]["attempt"] + 1)
        elif kind in ("step_complete", "step_error") and at is not None:
            del open_steps[at]
    return open_steps[-1] if open_steps else None
