"""The built-in offline pipeline: real tokens, deterministic output, pluggable steps."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from sigil.pipeline.base import (
    STEP_ORDER,
    Step,
    StepConfigError,
    StepContext,
    StepOutput,
    is_required,
    load_step,
)
from sigil.pipeline.contracts import check, contract_for
from sigil.pipeline.memory_store import SEED_MEMORIES, MemoryStore, fts5_available
from sigil.pipeline.offline import (
    ReasoningStep,
    RoutingStep,
    ValidationStep,
    compact_json,
    default_steps,
)
from sigil.pipeline.tokenizer import TOKENIZER_NAME, get_tokenizer


def run_pipeline(task: str, home: Path, steps: dict[str, Step] | None = None) -> dict[str, Any]:
    """Run the steps in order like the orchestrator does, without logging."""
    tokenizer = get_tokenizer()

    async def main() -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        results: dict[str, StepOutput] = {}
        for name, step in (steps or default_steps()).items():
            ctx = StepContext(
                task=task,
                session_id="t",
                step=name,
                attempt=1,
                context={},
                outputs=dict(outputs),
                tokenizer=tokenizer,
                home=home,
            )
            out = await step.run(ctx)
            outputs[name] = out.output
            results[name] = out
        return results

    return asyncio.run(main())


# -- tokenizer -------------------------------------------------------------------------


def test_tokenizer_is_real_cl100k() -> None:
    tok = get_tokenizer()
    assert tok.name == TOKENIZER_NAME == "cl100k_base"
    # Well-known cl100k_base ids (tiktoken: enc.encode("hello world") == [15339, 1917]).
    assert tok.encode("hello world") == [15339, 1917]
    text = "Analyze Acme Corp — 1,200 employees; naïve café ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.count("") == 0
    # Special-token text is ordinary text here, never an error.
    assert tok.count("<|endoftext|>") > 1


def test_tokenizer_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    from sigil.pipeline import tokenizer as module

    assert module._build_cl100k().count("offline only") == 2


# -- routing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "intent"),
    [
        ("Analyze Acme Corp", "lead_analysis"),
        ("Qualify this prospect for the sales team", "lead_analysis"),
        ("Research the churn trends in our market", "research"),
        ("Review this Python function for bugs", "code_review"),
        ("Summarize the meeting notes", "summarization"),
        ("Plan the launch roadmap with milestones", "planning"),
        ("Why is the sky blue?", "question_answering"),
        ("xyzzy", "general"),
    ],
)
def test_routing_intents(task: str, intent: str, tmp_path: Path) -> None:
    out = run_pipeline(task, tmp_path, {"routing": RoutingStep()})["routing"]
    assert out.output["intent"] == intent
    assert out.message == f"Intent classified as: {intent}"


# -- the whole pipeline -----------------------------------------------------------------


def test_same_task_same_output_and_tokens(tmp_path: Path) -> None:
    a = run_pipeline("Analyze Acme Corp", tmp_path / "a")
    b = run_pipeline("Analyze Acme Corp", tmp_path / "b")
    assert list(a) == list(STEP_ORDER)
    for name in STEP_ORDER:
        assert a[name].output == b[name].output
        assert (a[name].input_tokens, a[name].output_tokens) == (
            b[name].input_tokens,
            b[name].output_tokens,
        )
        assert a[name].tokens > 0


def test_tokens_are_counted_from_the_text_consumed_and_produced(tmp_path: Path) -> None:
    tok = get_tokenizer()
    task = "Analyze Acme Corp"
    res = run_pipeline(task, tmp_path)
    assert res["routing"].input_tokens == tok.count(task)
    assert res["routing"].output_tokens == tok.count(compact_json(res["routing"].output))
    memory_items = res["memory"].output["items"]
    assert res["memory"].output_tokens == tok.count(compact_json(memory_items))
    assert res["reasoning"].output_tokens == tok.count(compact_json(res["reasoning"].output))
    # Reasoning reads the task, the memories and the plan: more than the task alone.
    assert res["reasoning"].input_tokens > tok.count(task) + 100


def test_pipeline_output_is_useful_and_valid(tmp_path: Path) -> None:
    res = run_pipeline("Analyze Acme Corp", tmp_path)
    memories = res["memory"].output["items"]
    assert res["memory"].output["backend"] in ("fts5", "scan")
    assert any("Acme" in m["title"] for m in memories)
    plan = res["planning"].output
    assert len(plan["steps"]) == 4 and all(s["uses"] for s in plan["steps"])
    analysis = res["reasoning"].output
    assert analysis["intent"] == "lead_analysis"
    assert set(analysis["qualification"]) == {"budget", "authority", "need", "timeline"}
    assert res["contracts"].output == {
        "contract": "lead_analysis_analysis",
        "valid": True,
        "violations": [],
        "checks": res["contracts"].output["checks"],
    }
    validation = res["validation"].output
    assert validation["valid"] is True and 0.6 <= validation["quality_score"] <= 1.0
    assert res["validation"].metadata["quality_score"] == validation["quality_score"]
    assert res["reasoning"].metadata["action"] == "proceed"


def test_prose_from_a_model_scores_lower(tmp_path: Path) -> None:
    class ProseReasoning(ReasoningStep):
        async def run(self, ctx: StepContext) -> StepOutput:
            return StepOutput(output={"summary": "It is probably fine, I think."})

    steps = default_steps()
    steps["reasoning"] = ProseReasoning()
    res = run_pipeline("Analyze Acme Corp", tmp_path, steps)
    assert res["contracts"].output["valid"] is False
    assert res["contracts"].output["violations"]
    assert res["validation"].output["valid"] is False
    assert res["validation"].output["recommended_action"] == "revise"


# -- memory store --------------------------------------------------------------------


def test_memory_store_created_private_and_seeded_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = MemoryStore(home / "memory.db")

    def first_use() -> None:
        store.search("acme lead")

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home / "memory.db").st_mode) == 0o600
    import sqlite3

    con = sqlite3.connect(home / "memory.db")
    table = "memories_fts" if store.backend == "fts5" else "memories_scan"
    assert con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == len(SEED_MEMORIES)


def test_fts5_is_available_in_this_python() -> None:
    # CPython's own builds ship SQLite with FTS5; the fallback exists for the others.
    assert fts5_available()


@pytest.mark.parametrize("backend", ["fts5", "scan"])
def test_memory_search_ranks_relevant_items_first(tmp_path: Path, backend: str) -> None:
    store = MemoryStore(tmp_path / "memory.db", backend=backend)
    items = store.search("Acme Corp account", limit=3)
    assert items and items[0].id == "mem-002"
    assert store.search("the and of") == []  # only stopwords: no query
    assert store.search("Acme Corp account", limit=3) == items  # deterministic


# -- contracts ---------------------------------------------------------------------------


def test_contract_checker() -> None:
    contract = contract_for("lead_analysis")
    good = {
        "intent": "lead_analysis",
        "summary": "A summary long enough.",
        "findings": ["finding one"],
        "recommendation": "Call them.",
        "action": "proceed",
        "confidence": 0.7,
        "qualification": {"budget": "x", "authority": "y", "need": "z", "timeline": "w"},
    }
    violations, checks = check(good, contract)
    assert violations == [] and checks > 10
    bad = dict(good, action="dance", confidence=1.5, findings=[])
    del bad["qualification"]
    violations, _ = check(bad, contract)
    assert sorted(v.split(":")[0] for v in violations) == [
        "/action",
        "/confidence",
        "/findings",
        "/qualification",
    ]
    violations, _ = check("not an object", contract)
    assert violations == ["/: expected object, got str"]


# -- pluggable steps ---------------------------------------------------------------------


def test_load_step_by_import_path() -> None:
    step = load_step("orchestrate_steps:FlakyReasoning", "reasoning")
    assert isinstance(step, Step) and step.name == "reasoning"
    step = load_step("sigil.pipeline.offline.ValidationStep", "validation")
    assert isinstance(step, ValidationStep)
    assert is_required("reasoning", step) is False  # the step's own flag wins
    assert is_required("planning", object()) is True
    assert is_required("memory", object()) is False


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("", "empty import path"),
        ("nodots", "not an import path"),
        ("no_such_module_xyz:Step", "cannot import"),
        ("orchestrate_steps:Missing", "has no attribute"),
        ("orchestrate_steps:NotAStep", "is not a step"),
    ],
)
def test_load_step_errors_are_one_line(path: str, match: str) -> None:
    with pytest.raises(StepConfigError, match=match) as info:
        load_step(path, "reasoning")
    assert "\n" not in str(info.value)
