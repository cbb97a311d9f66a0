"""Pipeline steps that misbehave on purpose, for the end-to-end tests of ``sigil orchestrate``.

They are plugged in the way a user would plug in their own steps: by dotted import
path under ``pipeline.steps`` in ``config.yaml`` (the tests put this directory on
``PYTHONPATH``). Nothing in sigil is monkeypatched. Behaviour that must differ
between two processes of one test (slow before a kill, fast on resume) is chosen
by environment variables.
"""

from __future__ import annotations

import asyncio
import os

from sigil.pipeline.base import StepContext, StepError, StepOutput, TokenUsage
from sigil.pipeline.offline import (
    ContractsStep,
    MemoryStep,
    PlanningStep,
    ReasoningStep,
    RoutingStep,
    ValidationStep,
)

#: What each failed attempt of FlakyReasoning "consumed" before failing.
FAILED_ATTEMPT_USAGE = TokenUsage(input_tokens=40, output_tokens=10, model="flaky-model")


class FlakyReasoning(ReasoningStep):
    """Fails ``SIGIL_TEST_FAILURES`` (default 2) times with a transient error, then works.

    Each failed attempt reports the tokens it used, as a model call that timed
    out mid-answer would: they must be logged once, on a token_consumption event.
    """

    async def run(self, ctx: StepContext) -> StepOutput:
        failures = int(os.environ.get("SIGIL_TEST_FAILURES", "2"))
        if ctx.attempt <= failures:
            raise StepError(
                f"model server timed out (attempt {ctx.attempt})",
                usage=FAILED_ATTEMPT_USAGE,
                category="transient",
                retry_after=0.001,
            )
        return await super().run(ctx)


class FailingReasoning(ReasoningStep):
    """Always fails with a logic error (reasoning is required: the run fails)."""

    async def run(self, ctx: StepContext) -> StepOutput:
        raise ValueError("reasoning exploded on purpose")


class FailingMemory(MemoryStep):
    """Always fails with a logic error (memory is optional: the run continues)."""

    async def run(self, ctx: StepContext) -> StepOutput:
        raise ValueError("memory store corrupted on purpose")


class MisconfiguredReasoning(ReasoningStep):
    """Fails as a missing API key would: a config error stops the run at once."""

    async def run(self, ctx: StepContext) -> StepOutput:
        raise PermissionError("invalid api key for the model server")


class SlowPlanning(PlanningStep):
    """Sleeps ``SIGIL_TEST_SLOW_SECONDS`` (default 0) before planning: a window for kill -9.

    With ``SIGIL_TEST_GATE`` set, it then waits until that file exists (at most
    60 s): a pause point a test opens when it has done what it does mid-run,
    however slowly a loaded machine got there.
    """

    async def run(self, ctx: StepContext) -> StepOutput:
        await asyncio.sleep(float(os.environ.get("SIGIL_TEST_SLOW_SECONDS", "0")))
        gate = os.environ.get("SIGIL_TEST_GATE")
        if gate:
            for _ in range(3000):
                if os.path.exists(gate):
                    break
                await asyncio.sleep(0.02)
        return await super().run(ctx)


class NotAStep:
    """Has no async run(): configuring it must be refused as bad usage."""

    name = "reasoning"


def _traced(base: type) -> type:
    """``base`` that appends its slot to the file ``SIGIL_TEST_TRACE`` each time it runs:
    which steps really ran, whatever the log could record (the disk-full tests)."""

    class Traced(base):  # type: ignore[valid-type,misc]
        async def run(self, ctx: StepContext) -> StepOutput:
            trace = os.environ.get("SIGIL_TEST_TRACE")
            if trace:
                with open(trace, "a") as f:
                    f.write(f"{ctx.step}\n")
            return await super().run(ctx)

    Traced.__name__ = f"Traced{base.__name__}"
    return Traced


TracedRouting = _traced(RoutingStep)
TracedMemory = _traced(MemoryStep)
TracedPlanning = _traced(PlanningStep)
TracedReasoning = _traced(ReasoningStep)
TracedContracts = _traced(ContractsStep)
TracedValidation = _traced(ValidationStep)


#: Secrets LeakyReasoning puts in its error text (shapes of real credentials, none live).
LEAKED_SECRETS = (
    "sk-proj-Ab3dEfGhIjKlMnOpQrStUvWxYz0123456789",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGH",
    "ghs_16C7e42F292c6912E7710c838347Ae178B4a",
    "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI",
    "s3cr3t-P4ssw0rd",
    "deadbeefcafe0123456789abcdef0123",
)


class LeakyReasoning(ReasoningStep):
    """Fails with credentials in its error text, as an HTTP client's error often does."""

    async def run(self, ctx: StepContext) -> StepOutput:
        key, aws, ghp, pat, ghs, slack, stripe, google, password, bearer = LEAKED_SECRETS
        raise ValueError(
            f"401 from https://admin:{password}@api.example.com with key {key}, "
            f"aws {aws}, github {ghp} {pat} {ghs}, slack {slack}, stripe {stripe}, "
            f"google {google}, Authorization: Bearer {bearer}"
        )


def _with_model(base: type, model: str) -> type:
    """``base`` whose output says ``model`` answered it (the orchestrator prices it)."""

    class WithModel(base):  # type: ignore[valid-type,misc]
        async def run(self, ctx: StepContext) -> StepOutput:
            out = await super().run(ctx)
            out.model = model
            return out

    WithModel.__name__ = f"{base.__name__}With{model.title().replace('-', '')}"
    return WithModel


#: Reasoning answered by ``sigil-test-priced`` (priced by the test's config.yaml).
PricedReasoning = _with_model(ReasoningStep, "sigil-test-priced")
#: Routing answered by a model no price table knows.
UnpricedRouting = _with_model(RoutingStep, "sigil-test-unpriced")


class GatedValidation(ValidationStep):
    """Waits, as :class:`SlowPlanning` does, until ``SIGIL_TEST_GATE`` exists."""

    async def run(self, ctx: StepContext) -> StepOutput:
        gate = os.environ.get("SIGIL_TEST_GATE")
        if gate:
            for _ in range(3000):
                if os.path.exists(gate):
                    break
                await asyncio.sleep(0.02)
        return await super().run(ctx)


class OtherValidation(ValidationStep):
    """A replaced step: the offline validation with another output (the diff of
    two runs then lists exactly this step as changed)."""

    async def run(self, ctx: StepContext) -> StepOutput:
        out = await super().run(ctx)
        out.output = {"replaced": True, "was": out.output}
        return out
