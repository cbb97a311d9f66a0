"""JSON contracts for the reasoning step's output, and a checker for them.

A contract is a JSON Schema (the draft-07 subset below) that the analysis must
satisfy. The checker is small on purpose: ``type``, ``required``, ``properties``,
``enum``, ``minItems``, ``minLength``, ``minimum``, ``maximum`` and ``items`` are all
the contracts use, and a dependency-free checker keeps the offline pipeline's
results identical on every machine. Violations come back as JSON-pointer-ish
paths with a reason, never as an exception, so the contracts step can report them.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["ACTIONS", "BASE_CONTRACT", "check", "contract_for"]

#: What the pipeline may recommend (``PipelineResult.recommended_action``).
ACTIONS = ("proceed", "revise", "escalate", "gather_more_information")

BASE_CONTRACT: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "analysis",
    "type": "object",
    "required": ["intent", "summary", "findings", "recommendation", "action", "confidence"],
    "properties": {
        "intent": {"type": "string", "minLength": 1},
        "summary": {"type": "string", "minLength": 10},
        "findings": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "string", "minLength": 5},
        },
        "recommendation": {"type": "string", "minLength": 5},
        "action": {"type": "string", "enum": list(ACTIONS)},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "sources": {"type": "array", "items": {"type": "string"}},
        "steps_addressed": {"type": "array", "items": {"type": "integer"}},
    },
}

# Per-intent additions: what a useful answer of that kind must contain.
_EXTRA: dict[str, dict[str, Any]] = {
    "lead_analysis": {
        "required": ["qualification"],
        "properties": {
            "qualification": {
                "type": "object",
                "required": ["budget", "authority", "need", "timeline"],
            }
        },
    },
    "research": {"required": ["sources"], "properties": {"sources": {"minItems": 1}}},
    "code_review": {"required": ["risks"], "properties": {"risks": {"type": "array"}}},
    "planning": {
        "required": ["steps_addressed"],
        "properties": {"steps_addressed": {"minItems": 1}},
    },
}


def contract_for(intent: str) -> dict[str, Any]:
    """The contract for an intent: the base contract plus the intent's additions."""
    contract = copy.deepcopy(BASE_CONTRACT)
    contract["title"] = f"{intent}_analysis"
    extra = _EXTRA.get(intent)
    if extra:
        contract["required"] = contract["required"] + extra.get("required", [])
        for name, schema in extra.get("properties", {}).items():
            contract["properties"].setdefault(name, {}).update(schema)
    return contract


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "null": (type(None),),
}


def check(value: Any, schema: dict[str, Any], path: str = "") -> tuple[list[str], int]:
    """Check ``value`` against ``schema``.

    Returns ``(violations, checks)``: the violations as ``"<path>: <reason>"`` and
    how many constraints were evaluated (the quality score uses the ratio).
    """
    violations: list[str] = []
    checks = 0
    where = path or "/"

    expected = schema.get("type")
    if expected is not None:
        checks += 1
        allowed = _TYPES[expected]
        ok = isinstance(value, allowed) and not (
            isinstance(value, bool) and expected in ("number", "integer")
        )
        if not ok:
            violations.append(f"{where}: expected {expected}, got {type(value).__name__}")
            return violations, checks

    if "enum" in schema:
        checks += 1
        if value not in schema["enum"]:
            violations.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str) and "minLength" in schema:
        checks += 1
        if len(value.strip()) < schema["minLength"]:
            violations.append(f"{where}: shorter than {schema['minLength']} characters")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema:
            checks += 1
            if value < schema["minimum"]:
                violations.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema:
            checks += 1
            if value > schema["maximum"]:
                violations.append(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, list):
        if "minItems" in schema:
            checks += 1
            if len(value) < schema["minItems"]:
                violations.append(f"{where}: fewer than {schema['minItems']} items")
        item_schema = schema.get("items")
        if item_schema:
            for index, item in enumerate(value):
                v, c = check(item, item_schema, f"{path}/{index}")
                violations += v
                checks += c
    if isinstance(value, dict):
        for name in schema.get("required", []):
            checks += 1
            if name not in value:
                violations.append(f"{path}/{name}: required field missing")
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                v, c = check(value[name], sub, f"{path}/{name}")
                violations += v
                checks += c
    return violations, checks
