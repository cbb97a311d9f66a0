"""Token budgets and their accounting (spec section 6).

The interface is the spec's (6.2): :class:`BudgetWarningLevel`, :class:`ComponentBudget`,
:class:`TokenBudget` and :class:`TokenTracker`, with the default allocations of 6.3 and
the thresholds of Appendix A. Where the spec's sample code is wrong, this module
fixes it on purpose:

* **Consumption is never refused.** Tokens a model has already spent cannot be
  un-spent, so :meth:`TokenBudget.consume` always records them (the spec's version
  dropped them when the budget was short, which made the totals lie). Its return
  value says whether the budget still allows another step.
* **The global limit is hard, component limits are soft.** The session budget
  "runs out" when utilisation reaches ``exceeded_threshold`` (95 % by default): from
  then on :meth:`TokenBudget.can_continue` is False and the orchestrator starts no
  further step. The last 5 % is the reserve of spec 6.3 that lets the step in flight
  finish. A component going over its allocation only produces a warning, once.
* **Each level is announced once, when first crossed.** ``budget_warning`` for
  ``elevated`` (50 %) and ``critical`` (80 %), ``budget_exceeded`` when the budget
  runs out (``exceeded``), and one ``budget_warning`` with ``scope: "component"`` per
  component that goes over its allocation. The spec's version re-fired on every
  call (or, in the tracker, never logged at all).
* **Contract 2 (tokens are additive).** The event that carries a consumption is
  logged by :meth:`TokenTracker.track` itself, with the tokens in ``tokens``; budget
  events carry totals in ``metadata`` and ``tokens=0``. Because accounting and logging
  happen in the same call, the sum of ``tokens`` over the log always equals
  :attr:`TokenBudget.used`.
* **Thread-safe.** All state changes happen under one lock; logging happens after
  the lock is released so a slow logger never blocks another thread's accounting.

A session budget covers every pipeline run of the session (ARCHITECTURE.md contract
11): an orchestrator starting run N calls :meth:`TokenTracker.restore` with what runs
1..N-1 used, and those tokens stay used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sigil.core.config import DEFAULT_ALLOCATIONS, SPEC_BUDGET
from sigil.core.events import EventLogger

if TYPE_CHECKING:  # pragma: no cover
    from sigil.core.config import Settings

__all__ = [
    "DEFAULT_ALLOCATIONS",
    "DEFAULT_THRESHOLDS",
    "TOKEN_EVENT_TYPES",
    "BudgetNotice",
    "BudgetWarningLevel",
    "ComponentBudget",
    "EventLogger",
    "TokenBudget",
    "TokenTracker",
    "scaled_allocations",
]


def scaled_allocations(total: int) -> dict[str, int]:
    """The spec's default allocations (6.3, written for 256,000) in proportion to ``total``.

    Rounded down, so they never add up to more than the budget's share.
    """
    return {name: tokens * total // SPEC_BUDGET for name, tokens in DEFAULT_ALLOCATIONS.items()}


#: Appendix A: fractions of the session budget.
DEFAULT_THRESHOLDS: dict[str, float] = {"warning": 0.5, "critical": 0.8, "exceeded": 0.95}

#: Event types that may carry tokens (Appendix B, "varies"). Summary events never do.
TOKEN_EVENT_TYPES = frozenset(
    {
        "token_consumption",
        "step_complete",
        "memory_retrieved",
        "plan_created",
        "reasoning_step",
        "contract_validated",
    }
)


class BudgetWarningLevel(StrEnum):
    """Warning levels for budget consumption."""

    NORMAL = "normal"  # < warning_threshold (50 %)
    ELEVATED = "elevated"  # 50-80 %
    CRITICAL = "critical"  # 80-95 %
    EXCEEDED = "exceeded"  # >= 95 %: the budget has run out, no further step starts


_LEVEL_ORDER = (
    BudgetWarningLevel.NORMAL,
    BudgetWarningLevel.ELEVATED,
    BudgetWarningLevel.CRITICAL,
    BudgetWarningLevel.EXCEEDED,
)
_RANK = {level: rank for rank, level in enumerate(_LEVEL_ORDER)}


@dataclass(slots=True)
class ComponentBudget:
    """Budget allocation for a single component (a soft limit)."""

    name: str
    allocated: int
    used: int = 0
    operations: int = 0

    @property
    def remaining(self) -> int:
        """Remaining tokens in this budget (never negative)."""
        return max(0, self.allocated - self.used)

    @property
    def utilization(self) -> float:
        """Percentage of the allocation used (may pass 100: the limit is soft)."""
        if self.allocated == 0:
            return 0.0
        return (self.used / self.allocated) * 100

    @property
    def avg_per_operation(self) -> float:
        """Average tokens per operation."""
        if self.operations == 0:
            return 0.0
        return self.used / self.operations

    @property
    def over_allocation(self) -> bool:
        """True once the component has used more than it was allocated."""
        return self.allocated > 0 and self.used > self.allocated

    def consume(self, tokens: int) -> None:
        """Record ``tokens`` as one operation of this component."""
        self.used += tokens
        self.operations += 1

    def can_consume(self, tokens: int) -> bool:
        """Whether ``tokens`` more fit in the allocation."""
        return self.remaining >= tokens


@dataclass(frozen=True, slots=True)
class BudgetNotice:
    """A threshold crossing, to be logged once as a ``budget_*`` event.

    ``scope`` is ``"session"`` for the global levels and ``"component"`` when a
    component went over its (soft) allocation.
    """

    level: BudgetWarningLevel
    scope: str
    used: int
    total: int
    threshold: float
    component: str | None = None
    allocated: int | None = None
    component_used: int | None = None

    @property
    def event_type(self) -> str:
        if self.scope == "session" and self.level is BudgetWarningLevel.EXCEEDED:
            return "budget_exceeded"
        return "budget_warning"

    @property
    def message(self) -> str:
        if self.scope == "component":
            return (
                f"Component {self.component} over its allocation: "
                f"{self.component_used:,} of {self.allocated:,} tokens (soft limit)"
            )
        pct = (self.used / self.total * 100) if self.total else 0.0
        if self.level is BudgetWarningLevel.EXCEEDED:
            return (
                f"Token budget exhausted: {self.used:,} of {self.total:,} tokens used "
                f"({pct:.1f}%); no further step will start"
            )
        return (
            f"Token budget {self.level.value}: {self.used:,} of {self.total:,} tokens used "
            f"({pct:.1f}%, threshold {self.threshold:.0%})"
        )

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "scope": self.scope,
            "level": self.level.value,
            "threshold": self.threshold,
            "total_used": self.used,
            "budget": self.total,
            "budget_remaining": max(0, self.total - self.used),
            "utilization": round(self.used / self.total * 100, 4) if self.total else 0.0,
        }
        if self.scope == "component":
            meta["component"] = self.component
            meta["allocated"] = self.allocated
            meta["component_used"] = self.component_used
        return meta


@dataclass
class TokenBudget:
    """Hierarchical token budget: a hard session total, soft per-component allocations.

    Not thread-safe on its own; :class:`TokenTracker` serialises access.
    """

    total: int
    used: int = 0
    components: dict[str, ComponentBudget] = field(default_factory=dict)

    # Warning thresholds (fractions of ``total``)
    warning_threshold: float = 0.5
    critical_threshold: float = 0.8
    exceeded_threshold: float = 0.95

    #: Tokens promised to operations in flight (:meth:`reserve`), not yet consumed.
    reserved: int = 0

    # Called once per global level when it is first crossed: (level, used, total).
    on_warning: Callable[[BudgetWarningLevel, int, int], None] | None = None

    _announced: set[BudgetWarningLevel] = field(default_factory=set, repr=False)
    _over_components: set[str] = field(default_factory=set, repr=False)
    _pending: list[BudgetNotice] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.total, bool) or not isinstance(self.total, int) or self.total <= 0:
            raise ValueError(f"token budget must be a positive integer, got {self.total!r}")
        t = (self.warning_threshold, self.critical_threshold, self.exceeded_threshold)
        if not all(0 < x <= 1 for x in t) or not t[0] <= t[1] <= t[2]:
            raise ValueError(
                f"budget thresholds must satisfy 0 < warning <= critical <= exceeded <= 1, got {t}"
            )

    @property
    def remaining(self) -> int:
        """Total remaining tokens (never negative)."""
        return max(0, self.total - self.used)

    @property
    def utilization(self) -> float:
        """Total utilisation percentage (may pass 100 when the last step overran)."""
        if self.total == 0:
            return 0.0
        return (self.used / self.total) * 100

    @property
    def warning_level(self) -> BudgetWarningLevel:
        """Current warning level based on utilisation."""
        util = self.used / self.total if self.total else 0.0
        if util >= self.exceeded_threshold:
            return BudgetWarningLevel.EXCEEDED
        if util >= self.critical_threshold:
            return BudgetWarningLevel.CRITICAL
        if util >= self.warning_threshold:
            return BudgetWarningLevel.ELEVATED
        return BudgetWarningLevel.NORMAL

    @property
    def thresholds(self) -> dict[str, float]:
        return {
            "warning": self.warning_threshold,
            "critical": self.critical_threshold,
            "exceeded": self.exceeded_threshold,
        }

    def allocate_component(self, name: str, tokens: int) -> ComponentBudget:
        """Allocate a (soft) budget for a component, keeping what it already used."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"allocation for {name!r} must be an integer >= 0, got {tokens!r}")
        previous = self.components.get(name)
        budget = ComponentBudget(name=name, allocated=tokens)
        if previous is not None:
            budget.used, budget.operations = previous.used, previous.operations
        self.components[name] = budget
        return budget

    def consume(self, component: str, tokens: int) -> bool:
        """Record ``tokens`` consumed by ``component``.

        Always records (spent tokens cannot be refused). Returns False when the
        budget has run out after this consumption, i.e. no further step may start.
        Threshold crossings are queued for :meth:`drain_notices`.
        """
        if type(tokens) is not int or tokens < 0:
            _check_tokens(tokens)
        comp = self.components.get(component)
        if comp is None:
            # Unknown components are tracked (so totals stay exact) with no allocation.
            comp = self.allocate_component(component, 0)
        comp.used += tokens
        comp.operations += 1
        self.used += tokens
        if comp.over_allocation and component not in self._over_components:
            self._over_components.add(component)
            self._pending.append(
                BudgetNotice(
                    level=BudgetWarningLevel.CRITICAL,
                    scope="component",
                    used=self.used,
                    total=self.total,
                    threshold=1.0,
                    component=component,
                    allocated=comp.allocated,
                    component_used=comp.used,
                )
            )
        level = self.warning_level
        # The levels announced are always those up to one (a prefix, see
        # _check_warnings and mark_announced): nothing to queue when the level
        # reached is announced already.
        if level is not BudgetWarningLevel.NORMAL and level not in self._announced:
            self._check_warnings()
        return level is not BudgetWarningLevel.EXCEEDED

    def _check_warnings(self) -> None:
        """Queue every global level reached for the first time (in rising order)."""
        reached = _RANK[self.warning_level]
        for level in _LEVEL_ORDER[1 : reached + 1]:
            if level in self._announced:
                continue
            self._announced.add(level)
            self._pending.append(
                BudgetNotice(
                    level=level,
                    scope="session",
                    used=self.used,
                    total=self.total,
                    threshold=self._threshold_of(level),
                )
            )
            self._trigger_warning(level)

    def _threshold_of(self, level: BudgetWarningLevel) -> float:
        return {
            BudgetWarningLevel.ELEVATED: self.warning_threshold,
            BudgetWarningLevel.CRITICAL: self.critical_threshold,
            BudgetWarningLevel.EXCEEDED: self.exceeded_threshold,
        }.get(level, 0.0)

    def _trigger_warning(self, level: BudgetWarningLevel) -> None:
        if self.on_warning is not None:
            self.on_warning(level, self.used, self.total)

    def drain_notices(self) -> list[BudgetNotice]:
        """Return and forget the threshold crossings queued since the last call."""
        pending, self._pending = self._pending, []
        return pending

    def mark_announced(self) -> None:
        """Treat every level already reached as announced (used when restoring a session)."""
        reached = _RANK[self.warning_level]
        self._announced.update(_LEVEL_ORDER[1 : reached + 1])
        self._over_components.update(n for n, c in self.components.items() if c.over_allocation)
        self._pending.clear()

    def can_continue(self) -> bool:
        """Whether another step may start: False once the budget has run out."""
        # warning_level is not EXCEEDED, without its other comparisons
        return (self.used / self.total if self.total else 0.0) < self.exceeded_threshold

    def reserve(self, wanted: int) -> int:
        """Promise up to ``wanted`` tokens to an operation about to start (a model
        call capped at what it is granted); returns the grant.

        Grants never add up to more than what is left: concurrent operations
        capped at their grants cannot together spend more than the remaining
        budget. 0 when the budget has run out or everything left is promised.
        The grant is given back with :meth:`release` once its tokens are consumed.
        """
        if type(wanted) is not int or wanted < 0:
            _check_tokens(wanted)
        if not self.can_continue():
            return 0
        granted = min(wanted, max(0, max(0, self.total - self.used) - self.reserved))
        self.reserved += granted
        return granted

    def release(self, granted: int) -> None:
        """Give back a grant of :meth:`reserve` (consume what it spent first)."""
        if type(granted) is not int or granted < 0:
            _check_tokens(granted)
        self.reserved = max(0, self.reserved - granted)

    def forecast(self, operations_remaining: int) -> dict[str, Any]:
        """Forecast the session's total from the average tokens per operation so far.

        Returns ``forecast_total``, ``forecast_remaining``, ``will_exceed`` (the
        forecast passes the total) and ``avg_per_operation``.
        """
        if operations_remaining < 0:
            raise ValueError("operations_remaining must be >= 0")
        total_ops = sum(c.operations for c in self.components.values())
        avg_per_op = self.used / total_ops if total_ops else 0.0
        forecast_total = self.used + round(avg_per_op * operations_remaining)
        return {
            "forecast_total": forecast_total,
            "forecast_remaining": max(0, self.total - forecast_total),
            "will_exceed": forecast_total > self.total,
            "avg_per_operation": avg_per_op,
        }

    def to_dict(self) -> dict[str, Any]:
        """Convert to a dictionary for serialisation."""
        return {
            "total": self.total,
            "used": self.used,
            "remaining": self.remaining,
            "utilization": self.utilization,
            "warning_level": self.warning_level.value,
            "thresholds": self.thresholds,
            "components": {
                name: {
                    "allocated": c.allocated,
                    "used": c.used,
                    "remaining": c.remaining,
                    "utilization": c.utilization,
                    "operations": c.operations,
                }
                for name, c in self.components.items()
            },
        }


class TokenTracker:
    """Thread-safe token tracker with logging integration.

    :meth:`track` is the one way tokens reach the log: it records the consumption
    and logs the event that carries it, then the budget events it caused. Callers
    that log a step's completion pass ``event_type="step_complete"`` so the step's
    tokens appear on that event and nowhere else (contract 2).
    """

    def __init__(
        self,
        total_budget: int = 256_000,
        logger: EventLogger | None = None,
        *,
        allocations: Mapping[str, int] | None = None,
        warning_threshold: float = DEFAULT_THRESHOLDS["warning"],
        critical_threshold: float = DEFAULT_THRESHOLDS["critical"],
        exceeded_threshold: float = DEFAULT_THRESHOLDS["exceeded"],
        budget_component: str = "orchestrator",
    ) -> None:
        self.budget = TokenBudget(
            total=total_budget,
            warning_threshold=warning_threshold,
            critical_threshold=critical_threshold,
            exceeded_threshold=exceeded_threshold,
        )
        self.logger = logger
        self.budget_component = budget_component
        self._lock = threading.Lock()
        self._setup_allocations(
            scaled_allocations(total_budget) if allocations is None else allocations
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        total_budget: int | None = None,
        logger: EventLogger | None = None,
    ) -> TokenTracker:
        """A tracker with the allocations and thresholds of ``settings.token_budget``.

        Allocations from the config are absolute and kept as given; the defaults
        are scaled to the budget (``--budget 5000`` gets 5000/256000 of each).
        """
        tb = settings.token_budget
        total = tb.default_total if total_budget is None else total_budget
        configured = settings.source("token_budget.allocations") != "default"
        return cls(
            total_budget=total,
            logger=logger,
            allocations=dict(tb.allocations) if configured else None,
            warning_threshold=tb.warning_threshold,
            critical_threshold=tb.critical_threshold,
            exceeded_threshold=tb.exceeded_threshold,
        )

    def _setup_allocations(self, allocations: Mapping[str, int]) -> None:
        for name, tokens in allocations.items():
            self.budget.allocate_component(name, tokens)

    # -- state -----------------------------------------------------------------

    @property
    def total(self) -> int:
        return self.budget.total

    @property
    def used(self) -> int:
        with self._lock:
            return self.budget.used

    @property
    def remaining(self) -> int:
        with self._lock:
            return self.budget.remaining

    def component_used(self, component: str) -> int:
        """Tokens ``component`` has used so far (the session's, restored ones
        included): a step's own tokens are the change of this across the step."""
        with self._lock:
            comp = self.budget.components.get(component)
            return comp.used if comp is not None else 0

    @property
    def allocations(self) -> dict[str, int]:
        with self._lock:
            return {n: c.allocated for n, c in self.budget.components.items() if c.allocated}

    @property
    def thresholds(self) -> dict[str, float]:
        return self.budget.thresholds

    def can_continue(self) -> bool:
        """Whether another step may start (False once the budget has run out)."""
        with self._lock:
            return self.budget.can_continue()

    def standing(self) -> tuple[int, int, bool]:
        """``(used, reserved, can_continue())`` read together: what an admission
        decides on, in one step."""
        with self._lock:
            budget = self.budget
            return budget.used, budget.reserved, budget.can_continue()

    def forecast(self, operations_remaining: int) -> dict[str, Any]:
        with self._lock:
            return self.budget.forecast(operations_remaining)

    def reserve(self, wanted: int) -> int:
        """See :meth:`TokenBudget.reserve`: the grant of an operation about to start."""
        with self._lock:
            return self.budget.reserve(wanted)

    def release(self, granted: int) -> None:
        """See :meth:`TokenBudget.release`; call it after tracking what the grant spent."""
        with self._lock:
            self.budget.release(granted)

    def restore(
        self,
        used: int,
        components: Mapping[str, int] | None = None,
        operations: Mapping[str, int] | None = None,
    ) -> None:
        """Seed the tracker with what earlier runs of the session consumed.

        ``used`` is the session total so far (the sum of ``tokens`` over its log);
        ``components`` splits it by component. Levels already reached count as
        announced, so a new run does not repeat warnings the log already holds.
        """
        _check_tokens(used)
        with self._lock:
            self.budget.used = used
            for name, tokens in (components or {}).items():
                _check_tokens(tokens)
                comp = self.budget.components.get(name) or self.budget.allocate_component(name, 0)
                comp.used = tokens
                comp.operations = int((operations or {}).get(name, 1 if tokens else 0))
            self.budget.mark_announced()

    # -- consumption -------------------------------------------------------------

    def _consume(self, component: str, tokens: int) -> tuple[bool, list[BudgetNotice], dict]:
        with self._lock:
            budget = self.budget
            ok = budget.consume(component, tokens)
            notices = budget.drain_notices() if budget._pending else []
            used = budget.used
            totals = {
                "total_used": used,
                "total_remaining": max(0, budget.total - used),
                "component_used": budget.components[component].used,
            }
        return ok, notices, totals

    def _event_args(
        self,
        component: str,
        tokens: int,
        operation: str | None,
        event_type: str,
        message: str | None,
        metadata: Mapping[str, Any] | None,
        totals: Mapping[str, Any],
    ) -> tuple[str, str, str, int, dict[str, Any]]:
        meta = dict(metadata) if metadata else {}
        if operation is not None:
            meta.setdefault("operation", operation)
        meta.update(totals)
        text = message or operation or f"Consumed {tokens} tokens"
        return event_type, component, text, tokens, meta

    async def track(
        self,
        component: str,
        tokens: int,
        operation: str | None = None,
        *,
        event_type: str = "token_consumption",
        message: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record ``tokens`` for ``component`` and log the event that carries them.

        Returns whether the budget still allows another step. Budget events caused
        by this consumption are logged right after it.
        """
        _check_event_type(event_type)
        ok, notices, totals = self._consume(component, tokens)
        if self.logger is not None:
            await self.logger.log_event(
                *self._event_args(
                    component, tokens, operation, event_type, message, metadata, totals
                )
            )
            for notice in notices:
                await self.logger.log_event(
                    notice.event_type, self.budget_component, notice.message, 0, notice.metadata()
                )
        return ok

    def track_sync(
        self,
        component: str,
        tokens: int,
        operation: str | None = None,
        *,
        event_type: str = "token_consumption",
        message: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Synchronous twin of :meth:`track` (uses the logger's ``log_event_sync``)."""
        if event_type not in TOKEN_EVENT_TYPES:
            _check_event_type(event_type)
        ok, notices, totals = self._consume(component, tokens)
        logger = self.logger
        if logger is not None:
            logger.log_event_sync(
                *self._event_args(
                    component, tokens, operation, event_type, message, metadata, totals
                )
            )
            for notice in notices:
                logger.log_event_sync(
                    notice.event_type, self.budget_component, notice.message, 0, notice.metadata()
                )
        return ok

    def exhausted_notice(self) -> BudgetNotice:
        """A ``budget_exceeded`` notice for the current state (a run that cannot start)."""
        with self._lock:
            return BudgetNotice(
                level=BudgetWarningLevel.EXCEEDED,
                scope="session",
                used=self.budget.used,
                total=self.budget.total,
                threshold=self.budget.exceeded_threshold,
            )

    # -- reports ---------------------------------------------------------------------

    def get_status(self) -> dict[str, Any]:
        """Current budget status (a snapshot)."""
        with self._lock:
            return self.budget.to_dict()

    def get_component_status(self, component: str) -> dict[str, Any] | None:
        """Status for one component, or None when it is unknown."""
        with self._lock:
            c = self.budget.components.get(component)
            if c is None:
                return None
            return {
                "name": c.name,
                "allocated": c.allocated,
                "used": c.used,
                "remaining": c.remaining,
                "utilization": c.utilization,
                "operations": c.operations,
                "avg_per_operation": c.avg_per_operation,
            }


def _check_tokens(tokens: object) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be an integer >= 0, got {tokens!r}")


def _check_event_type(event_type: str) -> None:
    if event_type not in TOKEN_EVENT_TYPES:
        raise ValueError(
            f"event type {event_type!r} cannot carry tokens; use one of "
            f"{sorted(TOKEN_EVENT_TYPES)} (contract 2)"
        )
