"""Pipeline steps whose output the log cannot take as it is, for the logger's
end-to-end tests (plugged in through ``pipeline.steps`` like a user's own step;
the tests put this directory on ``PYTHONPATH``)."""

from __future__ import annotations

import math
from typing import Any

from sigil.pipeline.base import StepContext, StepOutput
from sigil.pipeline.offline import ReasoningStep


def nested(levels: int) -> dict[str, Any]:
    """A dict ``levels`` deep: ``{"n": {"n": ... {"n": "bottom"}}}``."""
    value: Any = "bottom"
    for _ in range(levels):
        value = {"n": value}
    return value


class OddNumbersReasoning(ReasoningStep):
    """Answers with values JSON has no number for: NaN, infinities, 2**70."""

    async def run(self, ctx: StepContext) -> StepOutput:
        return StepOutput(
            output={"summary": "odd", "score": math.nan, "ceiling": math.inf,
                    "floor": -math.inf, "huge": 2**70, "ok": 7},
            input_tokens=120, output_tokens=80, model="odd-model",
        )  # fmt: skip


class DeepReasoning(ReasoningStep):
    """Answers with a value nested 126 levels deep."""

    async def run(self, ctx: StepContext) -> StepOutput:
        return StepOutput(
            output={"summary": "deep", "tree": nested(126)},
            input_tokens=30, output_tokens=20, model="deep-model",
        )  # fmt: skip
