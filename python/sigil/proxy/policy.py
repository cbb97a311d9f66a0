"""The proxy's decisions about one call, as pure functions of what it was sent.

Kept apart from the transport (server.py) and the budget's bookkeeping
(metering.py): each function takes the parsed request (or what the proxy knows
of the call) and returns a decision, so any transport applies them alike.

* :func:`plan_output`: how many completions a request generates (choices times
  prompts) and the output caps the client set; a request whose size cannot be
  bounded is refused (:class:`Refusal`, an OpenAI-shaped 400).
* :meth:`OutputPlan.caps_to_send`: the cap fields sent upstream once the budget
  granted the call its output: every cap field the client set is lowered to the
  grant per completion (not only the smallest), so the upstream cannot use the
  larger one.
* :func:`secrets_of` and :func:`redact`: the exact keys a call carried, and any
  text about the call with them cut out before it is logged (the pipeline's one
  rule, :func:`sigil.pipeline.calls.redact`: the keys, runs of them and their
  masked forms).
* :func:`recording_failure`: whether the session's log can still hold what the
  proxy records (a call it could not record is refused, never served unmetered).
* :func:`usage_unknown`: whether a failed call may have spent tokens nobody
  reported (its usage is then unknown, as a call answered without usage is).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sigil.pipeline.calls import MIN_SECRET, redact
from sigil.proxy.usage import COMPLETIONS, Endpoint
from sigil.telemetry.proxy_transport import KEY_HEADERS

__all__ = [
    "MAX_OUTPUTS",
    "OutputPlan",
    "Refusal",
    "plan_output",
    "recording_failure",
    "redact",
    "secrets_of",
    "usage_unknown",
]

#: The most completions one request may ask for (choices times prompts): OpenAI
#: allows n <= 128 and 2,048 prompts; beyond this the proxy refuses the request
#: rather than reserve for a size it cannot bound.
MAX_OUTPUTS = 1 << 18
#: Request fields that each multiply the completions of a request.
_CHOICE_FIELDS = ("n", "best_of")


class Refusal(ValueError):
    """A request the proxy refuses before forwarding (HTTP 400, OpenAI-shaped)."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """What a request may generate, read before it is forwarded."""

    #: the cap fields the client set, with their values (non-negative ints)
    caps: tuple[tuple[str, int], ...]
    #: the smallest cap the client set (None: it set none)
    requested: int | None
    #: completions generated: choices (n, best_of) times prompts
    outputs: int
    #: whether the endpoint produces output at all (embeddings do not)
    has_output: bool

    def wanted(self, call_cap: int) -> int | None:
        """The output to reserve: the cap for each completion, for all of them
        (None: a call without output)."""
        if not self.has_output:
            return None
        return (self.requested if self.requested is not None else call_cap) * self.outputs

    @property
    def least(self) -> int:
        """The least output a call can be admitted with: one token per completion."""
        return self.outputs if self.has_output else 0

    def per_output(self, granted: int) -> int:
        """The cap of each completion once ``granted`` output tokens are reserved."""
        return max(1, granted // self.outputs)

    def caps_to_send(self, granted: int, default_field: str) -> dict[str, int]:
        """The cap fields to set in the forwarded request: each cap the client
        set that is above the grant per completion, lowered to it; or, when it
        set none, ``default_field`` at the grant per completion."""
        if not self.has_output:
            return {}
        per = self.per_output(granted)
        if not self.caps:
            return {default_field: per}
        per = min(per, self.requested or 0)  # never above what the client asked
        caps: dict[str, int] = {}
        for name, value in self.caps:
            if value > per:
                caps[name] = per
        return caps


def plan_output(endpoint: Endpoint, body: Mapping[str, Any]) -> OutputPlan:
    """The output plan of a request; raises :class:`Refusal` for a cap, ``n`` or
    ``best_of`` that is not a valid count, or a request asking for more than
    :data:`MAX_OUTPUTS` completions."""
    caps: list[tuple[str, int]] = []
    requested: int | None = None
    for name in endpoint.cap_fields:
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
            raise Refusal(f"{name} must be a non-negative integer", name)
        if value < 0:
            raise Refusal(f"{name} must be a non-negative integer", name)
        caps.append((name, value))
        if requested is None or value < requested:
            requested = value
    has_output = bool(endpoint.cap_fields)
    choices = 1
    for name in _CHOICE_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
            raise Refusal(f"{name} must be a positive integer", name)
        if value < 1:
            raise Refusal(f"{name} must be a positive integer", name)
        if value > choices:
            choices = value
    prompts = _prompts(body.get("prompt")) if endpoint is COMPLETIONS else 1
    outputs = choices * prompts
    if has_output and outputs > MAX_OUTPUTS:
        raise Refusal(
            f"the request asks for {outputs:,} completions ({choices:,} choices x {prompts:,} "
            f"prompts); sigil proxy bounds a call's cost only up to {MAX_OUTPUTS:,}",
            "n" if choices > 1 else "prompt",
        )
    return OutputPlan(tuple(caps), requested, outputs, has_output)


def _prompts(prompt: object) -> int:
    """How many prompts a legacy completions request holds: a list of strings or
    of token lists is one prompt each; a string or one token list is one."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


#: secrets_of's answers for the headers and extras it was given last (a client
#: sends the same key on every call): bounded, cleared when full.
_SECRETS_SEEN: dict[tuple[Any, ...], tuple[str, ...]] = {}
_SECRETS_SEEN_MAX = 256


def secrets_of(
    headers: Mapping[str, str] | Iterable[tuple[str, str]], *extra: str | None
) -> tuple[str, ...]:
    """The exact key values a call carries: its key headers' values (a
    ``Bearer``'s token and the header whole; ``headers``: a mapping or its
    ``(name, value)`` pairs, a header sent twice given twice), and ``extra`` (the
    proxy's own upstream key and token). Longest first, so that a key
    containing another is cut whole."""
    if type(headers) is list or type(headers) is tuple:
        # The transport's (name, value) pairs: the same on every call of a client.
        try:
            seen = (*headers, None, *extra)
            found_before = _SECRETS_SEEN.get(seen)
        except TypeError:  # a pair that cannot be hashed: not the transport's
            return _secrets_of(headers, extra)
        if found_before is None:
            found_before = _secrets_of(headers, extra)
            if len(_SECRETS_SEEN) >= _SECRETS_SEEN_MAX:
                _SECRETS_SEEN.clear()
            _SECRETS_SEEN[seen] = found_before
        return found_before
    return _secrets_of(headers, extra)


def _secrets_of(
    headers: Mapping[str, str] | Iterable[tuple[str, str]], extra: tuple[str | None, ...]
) -> tuple[str, ...]:
    found: set[str] = set()
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in pairs:
        if name.lower() not in KEY_HEADERS or not value:
            continue
        found.add(value.strip())
        scheme, _, rest = value.strip().partition(" ")
        if rest and scheme.lower() in ("bearer", "basic", "token"):
            found.add(rest.strip())
    found.update(v for v in extra if v)
    return tuple(sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True))


def recording_failure(dropped: OSError | None, stats: Mapping[str, Any]) -> OSError | None:
    """Why the session's log cannot hold the events of a call now (None: it can).

    ``dropped`` is the logger's report of dropped events, ``stats`` its writer's
    counters. The log has failed once events were dropped (for good: the log
    lacks them), and while the writer's last write failed with events still
    waiting to be written (a full disk: they are dropped once the buffer is)."""
    if dropped is not None:
        return dropped
    failed = stats.get("dropped_events") or stats.get("dropped_lines")
    waiting = stats.get("last_error") is not None and stats.get("buffered_bytes")
    if not (failed or waiting):
        return None
    number = stats.get("last_errno") or errno.EIO
    return OSError(number, str(stats.get("last_error") or os.strerror(number)))


#: Failures where the request never reached a model: nothing was generated.
_NEVER_REACHED = frozenset({"upstream_unavailable", "budget", "recording"})


def usage_unknown(category: str, status: int | None, counted: bool) -> bool:
    """Whether a failed call's usage is unknown: it reached the upstream, may have
    spent tokens, and nothing says how many (``counted``: the upstream's usage or
    an estimate of what arrived was recorded).

    Known to have spent nothing: a call that never reached the upstream (down,
    refused by the proxy) and one the upstream refused with a 4xx answer (bad
    request, bad key, rate limit: refused before generating) or redirected
    (3xx, which the transport relays and does not follow). Unknown: a 5xx
    answer, a timeout, a body that is not JSON, a call cut by the proxy's stop
    or an error of its own, once forwarded."""
    if counted or category in _NEVER_REACHED:
        return False
    return not (status is not None and 300 <= status < 500)
