"""The step protocol: what the orchestrator needs from a pipeline component.

A step is any object with a ``name`` and an ``async run(ctx) -> StepOutput``. The
orchestrator owns everything around it -- events, retries, budgets, timing -- so a
step only does its work and reports the tokens it consumed (``input_tokens``) and
produced (``output_tokens``). Steps are replaced from Python
(``Orchestrator(components={"reasoning": MyStep()})``) or from config with a dotted
import path (``pipeline.steps.reasoning: "my_pkg.steps:MyStep"``), see
:func:`load_step`.

A failing step raises. If its attempt consumed tokens before failing (a model
answered, then the answer was unusable), it raises :class:`StepError` with
``usage`` so those tokens are still logged and counted -- once, on a
``token_consumption`` event. It may also set ``category`` (an
:class:`~sigil.core.error_handling.ErrorCategory` value) and ``retry_after``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from sigil.pipeline.providers import ChatProvider
    from sigil.pipeline.tokenizer import Tokenizer

__all__ = [
    "CONTEXT_KEYS",
    "OPTIONAL_STEPS",
    "STEP_ORDER",
    "Step",
    "StepBudgetError",
    "StepConfigError",
    "StepContext",
    "StepError",
    "StepOutput",
    "TokenUsage",
    "is_required",
    "load_step",
    "usage_of",
]

#: The pipeline's steps in order (spec 4.1.2, ``PipelineStep``).
STEP_ORDER: tuple[str, ...] = (
    "routing",
    "memory",
    "planning",
    "reasoning",
    "contracts",
    "validation",
)

#: Steps the pipeline can do without: when one fails for good, later steps run
#: without its output (spec 9.1, logic errors: "log and continue").
OPTIONAL_STEPS = frozenset({"memory", "contracts", "validation"})

#: Where each step's output goes in the shared context (spec 4.1.2 puts
#: ``context["memories"]`` and ``context["plan"]``).
CONTEXT_KEYS: Mapping[str, str] = {
    "routing": "intent",
    "memory": "memories",
    "planning": "plan",
    "reasoning": "analysis",
    "contracts": "contract",
    "validation": "validation",
}


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens one model call (or one step attempt) consumed."""

    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None

    def __post_init__(self) -> None:
        for value in (self.input_tokens, self.output_tokens):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"token counts must be integers >= 0, got {value!r}")

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class StepOutput:
    """What a step produced and what it cost.

    ``output`` must be JSON-serialisable (it is logged, compactly, on the
    ``step_complete`` event so that ``--resume`` can skip the step). ``message`` is
    the human-readable text of that event; ``metadata`` is merged into it.
    """

    output: Any
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None
    message: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        TokenUsage(self.input_tokens, self.output_tokens)  # validates the counts

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class StepContext:
    """Everything a step may read. Steps must not mutate ``outputs``."""

    task: str
    session_id: str
    step: str
    attempt: int
    context: dict[str, Any]
    outputs: dict[str, Any]
    tokenizer: Tokenizer
    provider: ChatProvider | None = None
    home: Path | None = None
    run: int = 1
    settings: Any = None
    #: Session budget left when this attempt started (None outside the orchestrator).
    #: The budget is enforced between steps, so a step that can bound its own cost
    #: stays within it: the reasoning step's model call gets ``max_tokens`` of what
    #: is left once its prompt is counted, or is refused (:class:`StepBudgetError`)
    #: when nothing is (:func:`sigil.pipeline.providers.output_cap`).
    tokens_remaining: int | None = None

    def count(self, text: str) -> int:
        """Tokens in ``text`` with the pipeline's tokenizer."""
        return self.tokenizer.count(text)


@runtime_checkable
class Step(Protocol):
    """A pipeline component."""

    name: str

    async def run(self, ctx: StepContext) -> StepOutput: ...


class StepError(Exception):
    """A step attempt failed; carries what it consumed and how to treat the failure."""

    def __init__(
        self,
        message: str,
        *,
        usage: TokenUsage | None = None,
        category: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.usage = usage
        if category is not None:
            self.category = category
        self.retry_after = retry_after


class StepBudgetError(StepError):
    """A step refused work that cannot fit in what is left of the budget (a model
    call whose prompt alone takes it): nothing was sent, nothing spent.

    Not retried (``logic``: the budget does not grow); ``budget_exhausted`` tells
    the orchestrator the run ran out of budget rather than failed."""

    category = "logic"
    budget_exhausted = True


class StepConfigError(ValueError):
    """A step configured by import path cannot be loaded (one-line message)."""

    category = "config"


def usage_of(error: BaseException) -> TokenUsage | None:
    """Tokens a failed attempt consumed, when the error says so."""
    usage = getattr(error, "usage", None)
    return usage if isinstance(usage, TokenUsage) and usage.total > 0 else None


def is_required(slot: str, step: object) -> bool:
    """A step's own ``required`` attribute, else its slot's default."""
    declared = getattr(step, "required", None)
    if isinstance(declared, bool):
        return declared
    return slot not in OPTIONAL_STEPS


def load_step(path: str, slot: str) -> Step:
    """Import a step from ``"package.module:attr"`` (or ``"package.module.attr"``).

    ``attr`` may be a step class (instantiated without arguments), a factory that
    takes no arguments, or a ready instance; what it gives must have an async
    ``run`` method. Nothing else is called: a path such as ``"os:system"`` names a
    function that needs arguments, and is refused without being run.
    Messages start with the setting's key (``pipeline.steps.<slot>``).
    """
    key = f"pipeline.steps.{slot}"
    if not isinstance(path, str) or not path.strip():
        raise StepConfigError(f"{key}: empty import path")
    module_name, sep, attr = path.strip().partition(":")
    if not sep:
        module_name, _, attr = module_name.rpartition(".")
    if not module_name or not attr:
        raise StepConfigError(f"{key}: {path!r} is not an import path like 'pkg.module:Step'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StepConfigError(f"{key}: cannot import {module_name!r}: {exc}") from None
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise StepConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}") from None
    if _is_step(target):
        step = target
    elif inspect.isclass(target) or _is_factory(target):
        try:
            step = target()
        except Exception as exc:
            raise StepConfigError(f"{key}: {path!r} could not build a step: {exc}") from None
    else:
        raise StepConfigError(
            f"{key}: {path!r} is not a step class, a step factory taking no arguments or a step"
        )
    if not _is_step(step):
        raise StepConfigError(f"{key}: {path!r} is not a step (needs an async run(ctx) method)")
    if not isinstance(getattr(step, "name", None), str):
        try:
            step.name = slot
        except AttributeError:
            raise StepConfigError(f"{key}: {path!r} has no name") from None
    return step


def _is_factory(obj: object) -> bool:
    """A plain function that can be called with no arguments."""
    if not (inspect.isfunction(obj) or inspect.ismethod(obj)):
        return False
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in signature.parameters.values()
    )


def _is_step(obj: object) -> bool:
    if inspect.isclass(obj):
        return False
    run = getattr(obj, "run", None)
    return run is not None and inspect.iscoroutinefunction(run)
