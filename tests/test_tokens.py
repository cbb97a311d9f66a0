"""TokenBudget / TokenTracker: the spec's interface (6.2) with its defects fixed."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from sigil.telemetry.tokens import (
    DEFAULT_ALLOCATIONS,
    BudgetWarningLevel,
    ComponentBudget,
    TokenBudget,
    TokenTracker,
)


class ListLogger:
    """Collects events in memory, with both the async and the sync interface."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def log_event_sync(
        self,
        event_type: str,
        component: str,
        message: str,
        tokens: int = 0,
        metadata: dict[str, Any] | None = None,
    ) -> int:
        with self._lock:
            self.events.append(
                {
                    "event_type": event_type,
                    "component": component,
                    "message": message,
                    "tokens": tokens,
                    "metadata": dict(metadata or {}),
                }
            )
            return len(self.events) - 1

    async def log_event(self, *args: Any, **kwargs: Any) -> int:
        return self.log_event_sync(*args, **kwargs)

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event_type"] == event_type]

    @property
    def token_sum(self) -> int:
        return sum(e["tokens"] for e in self.events)


def test_defaults_match_spec_6_3() -> None:
    tracker = TokenTracker()
    assert tracker.total == 256_000
    assert tracker.allocations == DEFAULT_ALLOCATIONS
    assert sum(DEFAULT_ALLOCATIONS.values()) == 230_000  # the other 26,000 is reserve
    assert tracker.thresholds == {"warning": 0.5, "critical": 0.8, "exceeded": 0.95}


def test_component_budget_properties() -> None:
    c = ComponentBudget("routing", allocated=100)
    c.consume(30)
    c.consume(20)
    assert (c.used, c.operations, c.remaining) == (50, 2, 50)
    assert c.utilization == 50.0
    assert c.avg_per_operation == 25.0
    assert c.can_consume(50) and not c.can_consume(51)
    c.consume(60)
    assert c.remaining == 0 and c.over_allocation


def test_levels_and_can_continue() -> None:
    b = TokenBudget(total=1000)
    assert b.warning_level is BudgetWarningLevel.NORMAL
    b.consume("routing", 499)
    assert b.warning_level is BudgetWarningLevel.NORMAL
    b.consume("routing", 1)
    assert b.warning_level is BudgetWarningLevel.ELEVATED
    b.consume("routing", 300)
    assert b.warning_level is BudgetWarningLevel.CRITICAL and b.can_continue()
    assert b.consume("routing", 150) is False  # 95 %: the budget has run out
    assert b.warning_level is BudgetWarningLevel.EXCEEDED and not b.can_continue()


def test_consumption_is_never_refused() -> None:
    # The spec's consume() dropped tokens when short; spent tokens must be counted.
    b = TokenBudget(total=100)
    assert b.consume("reasoning", 250) is False
    assert b.used == 250 and b.remaining == 0 and b.utilization == 250.0


def test_each_level_is_announced_once_in_order() -> None:
    b = TokenBudget(total=1000)
    seen: list[BudgetWarningLevel] = []
    b.on_warning = lambda level, used, total: seen.append(level)
    for _ in range(20):
        b.consume("planning", 10)  # 200: normal
    assert b.drain_notices() == [] and seen == []
    b.consume("planning", 400)  # 600: elevated
    b.consume("planning", 1)
    b.consume("planning", 300)  # 901: critical
    b.consume("planning", 100)  # 1001: exceeded
    b.consume("planning", 100)
    notices = b.drain_notices()
    assert [(n.level, n.event_type) for n in notices if n.scope == "session"] == [
        (BudgetWarningLevel.ELEVATED, "budget_warning"),
        (BudgetWarningLevel.CRITICAL, "budget_warning"),
        (BudgetWarningLevel.EXCEEDED, "budget_exceeded"),
    ]
    assert seen == [
        BudgetWarningLevel.ELEVATED,
        BudgetWarningLevel.CRITICAL,
        BudgetWarningLevel.EXCEEDED,
    ]


def test_a_jump_announces_every_level_crossed() -> None:
    b = TokenBudget(total=100)
    b.consume("reasoning", 99)
    levels = [n.level.value for n in b.drain_notices() if n.scope == "session"]
    assert levels == ["elevated", "critical", "exceeded"]


def test_component_limit_is_soft_and_warned_once() -> None:
    b = TokenBudget(total=10_000)
    b.allocate_component("routing", 100)
    assert b.consume("routing", 150) is True  # over its allocation, but allowed
    b.consume("routing", 10)
    component_notices = [n for n in b.drain_notices() if n.scope == "component"]
    assert len(component_notices) == 1
    n = component_notices[0]
    assert (n.component, n.allocated, n.component_used) == ("routing", 100, 150)
    assert n.event_type == "budget_warning"
    assert n.metadata()["scope"] == "component"


def test_unknown_component_is_counted() -> None:
    b = TokenBudget(total=1000)
    b.consume("custom_step", 7)
    assert b.used == 7 and b.components["custom_step"].used == 7


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, None])
def test_bad_token_counts_are_rejected(bad: object) -> None:
    b = TokenBudget(total=1000)
    with pytest.raises(ValueError):
        b.consume("routing", bad)  # type: ignore[arg-type]
    assert b.used == 0


@pytest.mark.parametrize("total", [0, -5, 1.0, True])
def test_bad_totals_are_rejected(total: object) -> None:
    with pytest.raises(ValueError):
        TokenBudget(total=total)  # type: ignore[arg-type]


def test_bad_thresholds_are_rejected() -> None:
    with pytest.raises(ValueError):
        TokenBudget(total=10, warning_threshold=0.9, critical_threshold=0.8)


def test_forecast() -> None:
    b = TokenBudget(total=1000)
    assert b.forecast(5) == {
        "forecast_total": 0,
        "forecast_remaining": 1000,
        "will_exceed": False,
        "avg_per_operation": 0.0,
    }
    b.consume("routing", 100)
    b.consume("memory", 300)
    f = b.forecast(3)  # avg 200 per operation
    assert f == {
        "forecast_total": 1000,
        "forecast_remaining": 0,
        "will_exceed": False,
        "avg_per_operation": 200.0,
    }
    assert b.forecast(4)["will_exceed"] is True
    with pytest.raises(ValueError):
        b.forecast(-1)


def test_to_dict_shape() -> None:
    b = TokenBudget(total=1000)
    b.allocate_component("routing", 100)
    b.consume("routing", 50)
    d = b.to_dict()
    assert d["used"] == 50 and d["remaining"] == 950 and d["warning_level"] == "normal"
    assert d["components"]["routing"] == {
        "allocated": 100,
        "used": 50,
        "remaining": 50,
        "utilization": 50.0,
        "operations": 1,
    }


def test_appendix_d_tracker_api() -> None:
    async def main() -> dict[str, Any]:
        tracker = TokenTracker(total_budget=256000)
        await tracker.track(component="routing", tokens=50, operation="classify_intent")
        return tracker.get_status()

    status = asyncio.run(main())
    assert status["used"] == 50
    assert status["components"]["routing"]["used"] == 50


def test_track_logs_tokens_once_then_budget_events() -> None:
    log = ListLogger()
    # Absolute 256K allocations: only session levels fire (defaults scale to the budget).
    tracker = TokenTracker(total_budget=1000, logger=log, allocations=DEFAULT_ALLOCATIONS)

    async def main() -> None:
        await tracker.track("routing", 600, operation="classify_intent")
        await tracker.track(
            "reasoning",
            350,
            event_type="step_complete",
            message="Analysis complete",
            metadata={"latency_ms": 3.0},
        )
        await tracker.track("reasoning", 10)

    asyncio.run(main())
    kinds = [(e["event_type"], e["tokens"]) for e in log.events]
    assert kinds == [
        ("token_consumption", 600),
        ("budget_warning", 0),  # elevated
        ("step_complete", 350),
        ("budget_warning", 0),  # critical
        ("budget_exceeded", 0),
        ("token_consumption", 10),
    ]
    # Contract 2: the log's token sum is the tracker's total, summary events carry 0.
    assert log.token_sum == tracker.used == 960
    complete = log.of_type("step_complete")[0]
    assert complete["metadata"]["latency_ms"] == 3.0
    assert complete["metadata"]["total_used"] == 950
    assert complete["metadata"]["component_used"] == 350
    exceeded = log.of_type("budget_exceeded")[0]
    assert exceeded["component"] == "orchestrator"
    assert exceeded["metadata"]["level"] == "exceeded"
    assert exceeded["metadata"]["total_used"] == 950
    assert exceeded["metadata"]["budget"] == 1000


def test_summary_event_types_cannot_carry_tokens() -> None:
    tracker = TokenTracker(total_budget=1000)
    with pytest.raises(ValueError, match="contract 2"):
        tracker.track_sync("routing", 5, event_type="session_complete")
    assert tracker.used == 0


def test_track_sync() -> None:
    log = ListLogger()
    tracker = TokenTracker(total_budget=100, logger=log, allocations=DEFAULT_ALLOCATIONS)
    assert tracker.track_sync("routing", 40) is True
    assert tracker.track_sync("routing", 60) is False
    assert [e["event_type"] for e in log.events] == [
        "token_consumption",
        "token_consumption",
        "budget_warning",
        "budget_warning",
        "budget_exceeded",
    ]
    assert log.token_sum == 100


def test_restore_counts_earlier_runs_and_does_not_repeat_warnings() -> None:
    log = ListLogger()
    tracker = TokenTracker(total_budget=1000, logger=log, allocations=DEFAULT_ALLOCATIONS)
    tracker.restore(600, {"routing": 100, "reasoning": 500}, {"routing": 1, "reasoning": 1})
    assert tracker.used == 600 and tracker.remaining == 400
    assert tracker.get_component_status("reasoning")["used"] == 500  # type: ignore[index]
    tracker.track_sync("planning", 100)  # 700: still only "elevated", already announced
    assert log.of_type("budget_warning") == []
    tracker.track_sync("planning", 100)  # 800: critical, new
    assert [e["metadata"]["level"] for e in log.of_type("budget_warning")] == ["critical"]
    assert tracker.forecast(1)["avg_per_operation"] == 800 / 4


def test_from_settings_uses_configured_thresholds_and_allocations() -> None:
    from sigil.core.config import load_settings

    settings = load_settings(
        {
            "token_budget.warning_threshold": 0.25,
            "token_budget.allocations": {"routing": 5, "reasoning": 50},
        },
        env={},
        path="/nonexistent/config.yaml",
    )
    tracker = TokenTracker.from_settings(settings, total_budget=100)
    assert tracker.thresholds["warning"] == 0.25
    assert tracker.allocations == {"routing": 5, "reasoning": 50}
    log = ListLogger()
    tracker.logger = log
    tracker.track_sync("routing", 30)
    warnings = [(e["metadata"]["scope"], e["metadata"]["level"]) for e in log.events[1:]]
    assert warnings == [("component", "critical"), ("session", "elevated")]


def test_thread_safety_exact_totals_and_single_announcements() -> None:
    log = ListLogger()
    tracker = TokenTracker(total_budget=100_000, logger=log)

    def worker() -> None:
        for _ in range(1000):
            tracker.track_sync("reasoning", 10)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tracker.used == 80_000
    assert log.token_sum == 80_000
    assert tracker.get_component_status("reasoning")["operations"] == 8000  # type: ignore[index]
    session_levels = [
        e["metadata"]["level"]
        for e in log.events
        if e["event_type"].startswith("budget") and e["metadata"]["scope"] == "session"
    ]
    assert session_levels == ["elevated", "critical"]
