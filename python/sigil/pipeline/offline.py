"""The built-in offline pipeline: no network, no key, same task -> same output.

Six steps, each a small deterministic component behind the :class:`~sigil.pipeline.base.Step`
protocol:

* ``routing`` classifies the task's intent by keyword scores;
* ``memory`` retrieves relevant items from the local SQLite store (:mod:`.memory_store`);
* ``planning`` builds a plan from the intent's template and the memories;
* ``reasoning`` produces a structured analysis -- templated reasoning over the task,
  memories and plan, or, when a provider is configured, a model's answer;
* ``contracts`` checks the analysis against the intent's JSON contract;
* ``validation`` scores the result's quality and recommends an action.

Token counts are real: each step counts, with the ``cl100k_base`` tokenizer, the
text it actually consumes (``input_tokens``) and the text it hands on
(``output_tokens``, the compact JSON of its output). Nothing here reads a clock or
a random source, so outputs and counts are reproducible.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sigil.pipeline.base import STEP_ORDER, Step, StepContext, StepError, StepOutput
from sigil.pipeline.contracts import ACTIONS, check, contract_for
from sigil.pipeline.memory_store import MemoryStore, query_terms

__all__ = [
    "INTENTS",
    "ContractsStep",
    "MemoryStep",
    "PlanningStep",
    "ReasoningStep",
    "RoutingStep",
    "ValidationStep",
    "compact_json",
    "default_steps",
]

#: Intent -> keywords (matched as whole words, or as prefixes when 4+ letters).
#: Order breaks ties.
INTENTS: dict[str, tuple[str, ...]] = {
    "lead_analysis": (
        "lead", "prospect", "customer", "client", "account", "corp", "company", "inc",
        "deal", "sales", "crm", "qualify", "buyer",
    ),
    "research": (
        "research", "investigate", "compare", "comparison", "study", "explore", "market",
        "competitor", "trend", "landscape", "churn",
    ),
    "code_review": (
        "code", "bug", "function", "refactor", "review", "test", "python", "rust", "api",
        "error", "stack", "commit", "diff", "async",
    ),
    "summarization": (
        "summarize", "summarise", "summary", "tldr", "digest", "condense", "recap", "notes",
        "brief",
    ),
    "planning": (
        "plan", "roadmap", "schedule", "milestone", "launch", "project", "timeline",
        "strategy", "organize",
    ),
    "question_answering": (
        "what", "why", "how", "who", "when", "explain", "question", "define", "meaning",
    ),
}  # fmt: skip

_LABELS = {
    "lead_analysis": "Lead analysis",
    "research": "Research",
    "code_review": "Code review",
    "summarization": "Summary",
    "planning": "Plan",
    "question_answering": "Answer",
    "general": "Analysis",
}

_PLANS: dict[str, tuple[str, ...]] = {
    "lead_analysis": (
        "Confirm the account facts",
        "Score the lead on budget, authority, need and timeline",
        "Compare engagement with strong-lead signals",
        "Recommend the next sales action",
    ),
    "research": (
        "Define the question and its scope",
        "Collect sources for each comparison axis",
        "Compare the findings and size the opportunity",
        "Summarise conclusions with their sources",
    ),
    "code_review": (
        "Restate what the change intends",
        "Check correctness and failure handling",
        "Check tests and readability",
        "List risks and required changes",
    ),
    "summarization": (
        "Identify the main conclusion",
        "Extract supporting facts with exact names and numbers",
        "List open questions",
    ),
    "planning": (
        "State the goal",
        "Break it into milestones with owners and dates",
        "Identify risks and a mitigation for each",
        "Choose the first step that can start today",
    ),
    "question_answering": (
        "Restate the question",
        "Answer it directly",
        "Give the reason and an example where it helps",
    ),
    "general": (
        "Clarify the task",
        "Gather relevant context",
        "Work through the task",
        "Report the result",
    ),
}

_RECOMMENDATIONS = {
    "lead_analysis": "Book a follow-up with the budget owner and confirm the decision timeline.",
    "research": "Share the comparison with its sources and revisit it when new data arrives.",
    "code_review": "Address the listed risks, add the missing tests, then merge.",
    "summarization": "Circulate the summary and collect answers to the open questions.",
    "planning": "Assign owners to the milestones and start the first step today.",
    "question_answering": "Use the answer above; ask a narrower question for more detail.",
    "general": "Review the findings and decide on the next step.",
}

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def compact_json(value: Any) -> str:
    """Canonical compact JSON: what a step 'hands on', and what its output tokens count."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _first_sentence(text: str) -> str:
    return _SENTENCE.split(text.strip(), maxsplit=1)[0]


def _subject(task: str, limit: int = 80) -> str:
    task = " ".join(task.split())
    return task if len(task) <= limit else task[: limit - 1].rstrip() + "…"


def _overlap(a: Sequence[str], b: Sequence[str]) -> int:
    return len(set(a) & set(b))


class RoutingStep:
    """Classifies the task's intent by keyword scores (ties: the order of ``INTENTS``)."""

    name = "routing"
    required = True

    async def run(self, ctx: StepContext) -> StepOutput:
        words = _words(ctx.task)
        scores: dict[str, int] = {}
        matched: dict[str, list[str]] = {}
        for intent, keywords in INTENTS.items():
            hits = [
                w
                for w in dict.fromkeys(words)
                if any(w == k or (len(k) >= 4 and w.startswith(k)) for k in keywords)
            ]
            if hits:
                scores[intent] = len(hits)
                matched[intent] = hits
        if scores:
            intent = max(scores, key=lambda name: (scores[name], -list(INTENTS).index(name)))
            confidence = round(scores[intent] / sum(scores.values()), 3)
        else:
            intent, confidence = "general", 0.0
        output = {
            "intent": intent,
            "confidence": confidence,
            "matched": matched.get(intent, []),
            "scores": scores,
        }
        return StepOutput(
            output=output,
            input_tokens=ctx.count(ctx.task),
            output_tokens=ctx.count(compact_json(output)),
            message=f"Intent classified as: {intent}",
            metadata={"intent": intent, "confidence": confidence},
        )


class MemoryStep:
    """Retrieves the most relevant items from the local memory store."""

    name = "memory"
    required = False

    def __init__(self, store: MemoryStore | None = None, *, limit: int = 5) -> None:
        self._store = store
        self.limit = limit

    def _store_for(self, ctx: StepContext) -> MemoryStore:
        if self._store is not None:
            return self._store
        if ctx.home is None:
            from sigil.core.paths import sigil_home

            home = sigil_home()
        else:
            home = Path(ctx.home)
        return MemoryStore(home / "memory.db")

    async def run(self, ctx: StepContext) -> StepOutput:
        intent = _intent(ctx)
        store = self._store_for(ctx)
        # The query is the task plus its intent ("lead analysis"), so that a task
        # naming only a company still finds the knowledge about analysing leads.
        query = ctx.task if intent == "general" else f"{ctx.task} {intent.replace('_', ' ')}"
        # SQLite blocks on the disk: keep it off the event loop.
        items = await asyncio.to_thread(store.search, query, limit=self.limit, intent=intent)
        output = {
            "backend": store.backend,
            "query_terms": query_terms(query),
            "items": [i.to_dict() for i in items],
        }
        return StepOutput(
            output=output,
            input_tokens=ctx.count(query),
            output_tokens=ctx.count(compact_json(output["items"])),
            message=f"Retrieved {len(items)} relevant memories",
            metadata={"memories_count": len(items), "backend": store.backend},
        )


class PlanningStep:
    """Builds the intent's plan, linking each step to the memories that bear on it."""

    name = "planning"
    required = True

    async def run(self, ctx: StepContext) -> StepOutput:
        intent = _intent(ctx)
        memories = _memories(ctx)
        brief = "\n".join(
            [f"Task: {ctx.task}", f"Intent: {intent}", "Known:"]
            + [f"- [{m['id']}] {m['title']}: {m['content']}" for m in memories]
        )
        steps = []
        for index, action in enumerate(_PLANS.get(intent, _PLANS["general"]), start=1):
            # Link the memories that share words with this plan step, best first; a step
            # no memory speaks to leans on the memory most relevant to the whole task.
            action_words = _words(action)
            ranked = sorted(
                (
                    (-_overlap(action_words, _words(f"{m['title']} {m['content']} {m['tags']}")),
                     order, m["id"])
                    for order, m in enumerate(memories)
                ),
            )  # fmt: skip
            uses = [mid for neg, _, mid in ranked if neg < 0][:3]
            if not uses and memories:
                uses = [memories[0]["id"]]
            steps.append({"id": index, "action": action, "uses": uses})
        plan = {
            "intent": intent,
            "subject": _subject(ctx.task),
            "steps": steps,
            "success_criteria": list(contract_for(intent)["required"]),
        }
        return StepOutput(
            output=plan,
            input_tokens=ctx.count(brief),
            output_tokens=ctx.count(compact_json(plan)),
            message=f"Plan created with {len(steps)} steps",
            metadata={"steps_count": len(steps)},
        )


_SYSTEM_PROMPT = (
    "You are the reasoning step of an agent pipeline. Work through the plan using the "
    "known facts, then reply with ONE JSON object and nothing else, with the keys: "
    "intent (string), summary (string), findings (list of strings, one per plan step), "
    "recommendation (string), action (one of: " + ", ".join(ACTIONS) + "), confidence "
    "(number 0..1), sources (list of the fact ids you used), steps_addressed (list of "
    "plan step ids)."
)


class ReasoningStep:
    """A structured analysis: templated reasoning offline, or a model when one is set.

    With ``ctx.provider`` set, the same prompt goes to the model and its answer
    (JSON expected) becomes the analysis; tokens come from the provider's usage.
    Within the orchestrator the call's ``max_tokens`` is what the budget has left
    once the prompt is counted (:func:`~sigil.pipeline.providers.output_cap`); a
    prompt that leaves nothing is refused (:class:`~sigil.pipeline.base.StepBudgetError`).
    """

    name = "reasoning"
    required = True

    def prompt(self, ctx: StepContext) -> list[dict[str, str]]:
        intent = _intent(ctx)
        memories = _memories(ctx)
        plan = ctx.outputs.get("planning") or {"steps": []}
        user = "\n".join(
            [f"Task: {ctx.task}", f"Intent: {intent}", "Known facts:"]
            + [f"- [{m['id']}] {m['title']}: {m['content']}" for m in memories]
            + ["Plan:"]
            + [f"{s['id']}. {s['action']}" for s in plan.get("steps", [])]
        )
        return [{"role": "system", "content": _SYSTEM_PROMPT}, {"role": "user", "content": user}]

    async def run(self, ctx: StepContext) -> StepOutput:
        messages = self.prompt(ctx)
        prompt_text = "\n".join(m["content"] for m in messages)
        if ctx.provider is not None:
            cap = None
            if ctx.tokens_remaining is not None:
                from sigil.pipeline.providers import output_cap

                # The call's answer fits what the budget has left, or it is not sent.
                cap = output_cap(messages, ctx.tokens_remaining)
            completion = await ctx.provider.complete(messages, temperature=0.0, max_tokens=cap)
            analysis = _parse_analysis(completion.content, _intent(ctx))
            return StepOutput(
                output=analysis,
                input_tokens=completion.input_tokens,
                output_tokens=completion.output_tokens,
                model=completion.model,
                message="Analysis complete",
                metadata={
                    "strategy": "model",
                    "action": analysis.get("action"),
                    "usage_estimated": completion.usage_estimated,
                    "finish_reason": completion.finish_reason,
                },
            )
        analysis = self._templated(ctx)
        return StepOutput(
            output=analysis,
            input_tokens=ctx.count(prompt_text),
            output_tokens=ctx.count(compact_json(analysis)),
            message="Analysis complete",
            metadata={"strategy": "templated_chain_of_thought", "action": analysis["action"]},
        )

    def _templated(self, ctx: StepContext) -> dict[str, Any]:
        intent = _intent(ctx)
        memories = _memories(ctx)
        by_id = {m["id"]: m for m in memories}
        plan = ctx.outputs.get("planning") or {"steps": []}
        findings: list[str] = []
        sources: list[str] = []
        for step in plan.get("steps", []):
            used = [by_id[i] for i in step.get("uses", []) if i in by_id]
            if used:
                # Prefer a memory no earlier finding cited, so findings do not repeat.
                best = next((m for m in used if m["id"] not in sources), used[0])
                findings.append(f"{step['action']}: {_first_sentence(best['content'])}")
                if best["id"] not in sources:
                    sources.append(best["id"])
            else:
                findings.append(f"{step['action']}: no stored knowledge applies yet.")
        if not findings:
            findings.append(f"No plan was available for: {_subject(ctx.task)}.")
        analysis: dict[str, Any] = {
            "intent": intent,
            "summary": (
                f'{_LABELS.get(intent, "Analysis")} of "{_subject(ctx.task)}": '
                f"{len(findings)} findings from {len(memories)} memories and a "
                f"{len(plan.get('steps', []))}-step plan."
            ),
            "findings": findings,
            "recommendation": _RECOMMENDATIONS.get(intent, _RECOMMENDATIONS["general"]),
            "action": "proceed" if sources else "gather_more_information",
            "confidence": round(min(0.9, 0.4 + 0.1 * len(sources)), 2),
            "sources": sources,
            "steps_addressed": [s["id"] for s in plan.get("steps", [])],
        }
        if intent == "lead_analysis":
            text = " ".join(m["content"] for m in memories)
            analysis["qualification"] = {
                point: _evidence(text, point)
                for point in ("budget", "authority", "need", "timeline")
            }
        if intent == "code_review":
            analysis["risks"] = [
                f for f in findings if "failure" in f.lower() or "test" in f.lower()
            ] or ["No specific risk found in stored guidance."]
        return analysis


class ContractsStep:
    """Checks the analysis against the intent's JSON contract."""

    name = "contracts"
    required = False

    async def run(self, ctx: StepContext) -> StepOutput:
        analysis = _analysis(ctx)
        contract = contract_for(_intent(ctx))
        violations, checks = check(analysis, contract)
        output = {
            "contract": contract["title"],
            "valid": not violations,
            "violations": violations,
            "checks": checks,
        }
        message = (
            f"Output validated against contract {contract['title']}"
            if not violations
            else f"Contract {contract['title']}: {len(violations)} violations"
        )
        return StepOutput(
            output=output,
            input_tokens=ctx.count(compact_json(contract) + "\n" + compact_json(analysis)),
            output_tokens=ctx.count(compact_json(output)),
            message=message,
            metadata={"contract": contract["title"], "violations": len(violations)},
        )


class ValidationStep:
    """Scores the analysis (0..1) and recommends an action.

    The score weighs contract conformance (0.4), grounding of findings in the
    retrieved memories (0.2), coverage of the plan (0.2) and relevance to the task
    (0.2). The result is valid when the contract holds and the score is >= 0.6.
    """

    name = "validation"
    required = False
    threshold = 0.6

    async def run(self, ctx: StepContext) -> StepOutput:
        analysis = _analysis(ctx)
        intent = _intent(ctx)
        contract_out = ctx.outputs.get("contracts")
        if not isinstance(contract_out, Mapping):
            violations, checks = check(analysis, contract_for(intent))
            contract_out = {"valid": not violations, "violations": violations, "checks": checks}
        checks_n = max(1, int(contract_out.get("checks", 1)))
        conformance = 1.0 - min(1.0, len(contract_out.get("violations", [])) / checks_n)

        findings = [f for f in analysis.get("findings", []) if isinstance(f, str)]
        memory_words = set(_words(" ".join(m["content"] for m in _memories(ctx))))
        grounded = sum(1 for f in findings if len(set(_words(f)) & memory_words) >= 3)
        grounding = grounded / len(findings) if findings else 0.0

        plan_ids = [s["id"] for s in (ctx.outputs.get("planning") or {}).get("steps", [])]
        addressed = set(analysis.get("steps_addressed") or [])
        coverage = (len(addressed & set(plan_ids)) / len(plan_ids)) if plan_ids else 1.0

        task_terms = set(query_terms(ctx.task))
        answer_words = set(_words(compact_json(analysis)))
        relevance = (len(task_terms & answer_words) / len(task_terms)) if task_terms else 1.0

        score = round(0.4 * conformance + 0.2 * grounding + 0.2 * coverage + 0.2 * relevance, 3)
        valid = bool(contract_out.get("valid")) and score >= self.threshold
        action = analysis.get("action") if valid else "revise"
        if action not in ACTIONS:
            action = "revise"
        output = {
            "valid": valid,
            "quality_score": score,
            "checks": {
                "conformance": round(conformance, 3),
                "grounding": round(grounding, 3),
                "plan_coverage": round(coverage, 3),
                "relevance": round(relevance, 3),
            },
            "recommended_action": action,
            "result": analysis,
        }
        return StepOutput(
            output=output,
            input_tokens=ctx.count(compact_json(analysis) + "\n" + compact_json(contract_out)),
            output_tokens=ctx.count(
                compact_json({k: v for k, v in output.items() if k != "result"})
            ),
            message=f"Quality score {score:.2f} ({'valid' if valid else 'needs revision'})",
            metadata={"quality_score": score, "valid": valid, "action": action},
        )


def default_steps() -> dict[str, Step]:
    """A fresh set of the built-in steps, in pipeline order."""
    steps: dict[str, Step] = {
        "routing": RoutingStep(),
        "memory": MemoryStep(),
        "planning": PlanningStep(),
        "reasoning": ReasoningStep(),
        "contracts": ContractsStep(),
        "validation": ValidationStep(),
    }
    assert tuple(steps) == STEP_ORDER
    return steps


# -- helpers reading earlier steps' outputs ---------------------------------------


def _intent(ctx: StepContext) -> str:
    routed = ctx.outputs.get("routing")
    if isinstance(routed, Mapping) and isinstance(routed.get("intent"), str):
        return str(routed["intent"])
    hinted = ctx.context.get("intent")
    return hinted if isinstance(hinted, str) else "general"


def _memories(ctx: StepContext) -> list[dict[str, Any]]:
    out = ctx.outputs.get("memory")
    items = out.get("items") if isinstance(out, Mapping) else None
    if not isinstance(items, list):
        return []
    return [
        dict(m) for m in items
        if isinstance(m, Mapping) and all(k in m for k in ("id", "title", "content", "tags"))
    ]  # fmt: skip


def _analysis(ctx: StepContext) -> dict[str, Any]:
    analysis = ctx.outputs.get("reasoning")
    if not isinstance(analysis, dict):
        raise StepError("no analysis to check: the reasoning step produced none", category="logic")
    return analysis


def _evidence(text: str, point: str) -> str:
    for sentence in _SENTENCE.split(text):
        if point in sentence.lower():
            return sentence.strip()
    return "unknown"


def _parse_analysis(content: str, intent: str) -> dict[str, Any]:
    """A model's answer as an analysis: its JSON object, or its text as the summary.

    Lenient on purpose: the contracts step reports what is missing, so a model that
    answers in prose yields a low quality score rather than a failed step.
    """
    text = content.strip()
    if text.startswith("```"):
        text = text.strip("`")
        text = text.split("\n", 1)[1] if "\n" in text else text
    start, end = text.find("{"), text.rfind("}")
    data: Any = None
    if start != -1 and end > start:
        try:
            data = json.loads(text[start : end + 1])
        except ValueError:
            data = None
    if not isinstance(data, dict):
        data = {"summary": content.strip(), "findings": [], "format": "text"}
    data.setdefault("intent", intent)
    return data
