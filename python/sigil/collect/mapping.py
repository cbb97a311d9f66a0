"""GenAI spans as sigil events: the inverse of ``sigil export`` (sigil.telemetry.otlp).

The receiver runs these rules natively (``rust/otlp.rs``, rule for rule);
:func:`map_span` is their reference, which tests/test_collect.py holds the
native mapping to, span for span. The native mapping also cuts every text it
keeps to 4 KiB and reads counts given as text only in ASCII digits.

Which session, which component, how many tokens:

* **Session**: ``gen_ai.conversation.id``, else OpenInference's ``session.id``,
  else the trace ID (32 hex digits, already a valid session ID). An ID that is
  not a valid session ID (contract 8) is made one: its invalid characters
  become ``_`` and a digest of the original keeps two IDs apart.
* **Component**: the agent (``gen_ai.agent.name``, OpenInference's
  ``agent.name``), else the operation (``gen_ai.operation.name``), else the
  span's name.
* **Tokens**: ``sigil.tokens`` when the span came from ``sigil export`` (its
  per-span share, whose sum over a session is the session's total: contract
  2), else input + output (``gen_ai.usage.*``; OpenInference's
  ``llm.token_count.prompt``/``completion``, or ``total`` alone).

A span is an LLM step when it reports usage or names a GenAI operation (other
than a workflow, which only groups steps) or is an OpenInference ``LLM`` span;
it becomes ``step_start`` + ``step_complete`` (``step_error`` when its status
is an error). A workflow root from ``sigil export`` that carries tokens of its
own (budget or final events) becomes one ``token_consumption`` event, so the
totals survive the round trip. Other spans (HTTP, database...) are ignored.

A span *groups* model calls (``SpanEvent.groups``) when its operation is
``invoke_agent``, ``create_agent`` or ``execute_tool``, or, with no operation,
when it has an OpenInference kind other than ``LLM``/``EMBEDDING``: such a span
may report its calls' usage again, so the sink holds its tokens back when it
arrives before its children (sigil.collect.sink, "Aggregates").
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from sigil.collect.decode import SpanData
from sigil.core.limits import MAX_TOKENS

__all__ = ["SpanEvent", "map_span", "session_id_for"]

_VALID_SESSION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_INVALID_CHARS = re.compile(r"[^A-Za-z0-9_-]")

#: Operations that group other spans rather than call a model (GenAI semconv).
_GROUPING_OPERATIONS = frozenset({"invoke_workflow"})
#: Operations whose span can group model calls and report their usage again.
_GROUPING_CALLS = frozenset({"invoke_agent", "create_agent", "execute_tool"})
_LLM_KINDS = frozenset({"LLM", "EMBEDDING"})
_MAX_COUNT = MAX_TOKENS // 2


def session_id_for(raw: str) -> str:
    """A valid session ID for a conversation/session/trace ID, the same each time."""
    if _VALID_SESSION.match(raw):
        return raw
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    cleaned = _INVALID_CHARS.sub("_", raw)[:48].strip("_") or "otlp"
    return f"{cleaned}-{digest}"


@dataclass(slots=True)
class SpanEvent:
    """What one span becomes in the log.

    ``kind`` is ``step`` (step_start + step_complete/step_error) or ``tokens``
    (one token_consumption). ``usage`` is the input + output the span reported,
    None when it reported none (shown as unknown, never as 0).
    """

    session_id: str
    component: str
    kind: str
    tokens: int
    usage: int | None
    error: bool
    message: str
    metadata: dict[str, Any]
    #: the tokens are ``sigil.tokens`` (a span from ``sigil export``)
    exported: bool
    #: the dedupe key: trace ID and span ID
    key: str
    parent_key: str
    #: the span can group model calls and report their usage again (GenAI
    #: ``invoke_agent``/``create_agent``/``execute_tool``, an OpenInference
    #: kind other than ``LLM``/``EMBEDDING``): the sink holds it back when it
    #: reports usage before any of its children
    groups: bool = False


def _count(value: object) -> int | None:
    """A token count from an attribute: an integer in 0..=MAX_TOKENS/2 (so that
    input + output is one the log takes, contract 2), else None (unknown)."""
    if type(value) is int:  # the common case first (and never a bool)
        return value if 0 <= value <= _MAX_COUNT else None
    if value is None or isinstance(value, bool):
        return None
    exact = (
        isinstance(value, int)
        or (isinstance(value, float) and value.is_integer())
        or (isinstance(value, str) and value.isascii() and value.isdigit())
    )
    if not exact:
        return None
    count = int(value)  # type: ignore[call-overload]
    return count if 0 <= count <= _MAX_COUNT else None


def _reported(get: Any, *names: str) -> tuple[int | None, bool]:
    """The count under the first of ``names`` the span has (a scalar: the
    decoders give nothing else for a missing or non-scalar value), and whether
    that value was one that is no count (negative, fractional, too large, text
    or a bool). An invalid value is not skipped for the next name."""
    for name in names:
        value = get(name)
        if isinstance(value, str | int | float):
            count = _count(value)
            return count, count is None
    return None, False


def _text(value: object) -> str | None:
    if type(value) is str and value:
        return value
    return value if isinstance(value, str) and value else None


def map_span(span: SpanData) -> SpanEvent | None:
    """The event(s) ``span`` becomes, or None when it is not a GenAI span."""
    attrs = span.attributes
    get = attrs.get
    operation = _text(get("gen_ai.operation.name"))
    sigil_tokens = _count(get("sigil.tokens"))
    input_tokens, bad_input = _reported(
        get, "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt"
    )
    output_tokens, bad_output = _reported(
        get,
        "gen_ai.usage.output_tokens",
        "gen_ai.usage.completion_tokens",
        "llm.token_count.completion",
    )
    invalid = bad_input or bad_output
    usage: int | None
    if invalid:
        # A count that is no count makes the call's usage unknown, not the
        # valid half alone (as sigil proxy treats ``prompt_tokens: -5``).
        input_tokens = output_tokens = usage = None
    elif input_tokens is not None or output_tokens is not None:
        usage = (input_tokens or 0) + (output_tokens or 0)
    else:
        usage, invalid = _reported(get, "llm.token_count.total")

    llm_kind = get("openinference.span.kind") in _LLM_KINDS
    if operation is not None:
        groups = operation in _GROUPING_CALLS
    else:
        oi_kind = _text(get("openinference.span.kind"))
        groups = oi_kind is not None and oi_kind not in _LLM_KINDS
    if operation in _GROUPING_OPERATIONS:
        if not sigil_tokens:
            return None
        kind = "tokens"
    elif operation is not None or usage is not None or llm_kind or sigil_tokens is not None:
        kind = "step"
    else:
        return None

    raw_session = _text(get("gen_ai.conversation.id")) or _text(get("session.id")) or span.trace_id
    component = (
        _text(get("gen_ai.agent.name"))
        or _text(get("agent.name"))
        or operation
        or span.name
        or "llm"
    )
    tokens = sigil_tokens if sigil_tokens is not None else (usage or 0)

    metadata: dict[str, Any] = {
        "source": "otlp",
        "trace_id": span.trace_id,
        "span_id": span.span_id,
    }
    if input_tokens is not None:
        metadata["input_tokens"] = input_tokens
    if output_tokens is not None:
        metadata["output_tokens"] = output_tokens
    if usage is None and sigil_tokens is None:
        # as sigil proxy marks it (sigil.proxy.metering): unknown, never 0
        metadata["usage"] = "unknown"
    model = _text(get("gen_ai.response.model")) or _text(get("gen_ai.request.model"))
    model = model or _text(get("llm.model_name"))
    if model is not None:
        metadata["model"] = model
    provider = _text(get("gen_ai.provider.name")) or _text(get("gen_ai.system"))
    provider = provider or _text(get("llm.provider"))
    if provider is not None:
        metadata["provider"] = provider
    if operation is not None:
        metadata["operation"] = operation
    if span.end_ns >= span.start_ns > 0:
        metadata["latency_ms"] = (span.end_ns - span.start_ns) / 1e6
    elif (latency := get("sigil.latency_ms")) is not None and isinstance(latency, int | float):
        metadata["latency_ms"] = float(latency)
    if span.error:
        error_type = _text(get("error.type")) or "_OTHER"
        metadata["error_type"] = error_type
        message = span.status_message or f"{span.name or component} failed ({error_type})"
    elif usage is None and sigil_tokens is None:
        why = "its token counts are not counts" if invalid else "the span reported none"
        message = f"{span.name or component}: usage unknown ({why})"
    else:
        message = span.name or component
    return SpanEvent(
        session_id=session_id_for(raw_session),
        component=component,
        kind=kind,
        tokens=tokens,
        usage=usage,
        error=span.error,
        message=message,
        metadata=metadata,
        exported=sigil_tokens is not None,
        key=span.trace_id + span.span_id,
        parent_key=span.trace_id + span.parent_span_id if span.parent_span_id else "",
        groups=groups,
    )
