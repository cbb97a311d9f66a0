"""Cost per event (issue 12, Cost): genai-prices' table, read offline, and the
user's overrides in ``config.yaml``; an unpriced model gets no ``cost_usd``.

The orchestrator's model steps and ``sigil proxy``'s metering price each event
as they write it; these tests read the events those writers put in the log.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from sigil.core.config import ConfigError, load_settings
from sigil.telemetry.pricing import ModelPrice, Pricer, cost_number


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text(text, encoding="utf-8")


def events_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the price of one call --------------------------------------------------------------------


def test_a_priced_model_costs_exactly_what_genai_prices_says() -> None:
    from genai_prices import Usage, calc_price

    expected = calc_price(Usage(input_tokens=1234, output_tokens=567), model_ref="gpt-4o-mini")
    cost = Pricer().price("gpt-4o-mini", 1234, 567)
    assert cost == expected.total_price == Decimal("0.0005253")
    # The event carries it as a JSON number whose text is that decimal.
    meta = Pricer().cost_meta(cost)
    assert orjson.dumps(meta) == b'{"cost_usd":0.0005253}'


def test_remembered_rates_price_every_plain_model_exactly_as_genai_prices() -> None:
    """A model priced linearly is priced from its two rates after its first call:
    for every such model of the table, on random usages, the same Decimal."""
    import random

    from genai_prices import Usage, calc_price
    from genai_prices.data_snapshot import get_snapshot

    rng = random.Random(12)
    pricer = Pricer()
    refs = sorted({m.id for p in get_snapshot().providers for m in p.models})
    remembered = 0
    for ref in refs:
        if pricer.price(ref, 10, 10) is None or ref not in pricer._rates:
            continue
        remembered += 1
        for _ in range(3):
            inp, out = rng.randrange(3_000_000), rng.randrange(300_000)
            want = calc_price(Usage(input_tokens=inp, output_tokens=out), model_ref=ref)
            assert pricer.price(ref, inp, out) == want.total_price, ref
            # with part of the input read from the prompt cache
            cached = rng.randrange(inp + 1)
            usage = Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cached)
            want = calc_price(usage, model_ref=ref)
            assert pricer.price(ref, inp, out, cached) == want.total_price, ref
    assert remembered > 300 and "gpt-4o-mini" in pricer._rates
    # Tiered prices (gemini-2.5-pro above 200K input tokens) are never remembered:
    # they go through calc_price each time.
    assert pricer.price("gemini-2.5-pro", 300_000, 10) is not None
    assert "gemini-2.5-pro" not in pricer._rates


def test_cached_input_tokens_are_priced_at_the_cache_rate() -> None:
    from genai_prices import Usage, calc_price

    usage = Usage(input_tokens=1000, output_tokens=100, cache_read_tokens=800)
    want = calc_price(usage, model_ref="gpt-4o").total_price
    assert want == Decimal("0.0025")  # $2.5/MTok input, $1.25 cache read, $10 output
    for pricer in (Pricer(), Pricer()):  # through calc_price, then the remembered rates
        assert pricer.price("gpt-4o", 1000, 100, 800) == want
        assert pricer.price("gpt-4o", 1000, 100, 800) == want
        assert pricer.price("gpt-4o", 1000, 100) == Decimal("0.0035")
    # An override names no cache rate: cache reads cost the input rate.
    override = Pricer({"m": ModelPrice(Decimal("1"), Decimal("2"))})
    assert override.price("m", 1000, 100, 800) == override.price("m", 1000, 100)
    priced = Pricer({"m": ModelPrice(Decimal("1"), Decimal("2"), Decimal("0.1"))})
    assert priced.price("m", 1000, 100, 800) == Decimal("0.00048")
    assert asyncio.run(priced.ameta("m", 1000, 100, 800)) == ({"cost_usd": 0.00048}, False)


def test_an_unknown_model_or_no_model_is_unpriced() -> None:
    pricer = Pricer()
    assert pricer.price("house-model-7", 100, 10) is None
    assert pricer.price(None, 100, 10) is None
    assert pricer.price("", 100, 10) is None
    assert pricer.cost_meta(None) == {}
    assert asyncio.run(pricer.ameta("house-model-7", 100, 10)) == ({}, False)


def test_an_override_wins_over_the_table_with_decimal_arithmetic() -> None:
    pricer = Pricer({"gpt-4o-mini": ModelPrice(Decimal("0.1"), Decimal("0.3"))})
    cost = pricer.price("gpt-4o-mini", 3, 7)
    # 3 * 0.1 + 7 * 0.3 = 2.4 dollars per million: binary floats would give 2.4000000000000004.
    assert cost == Decimal("0.0000024")
    assert asyncio.run(pricer.ameta("gpt-4o-mini", 3, 7)) == ({"cost_usd": 2.4e-06}, False)


def test_costs_are_stored_to_the_nano_dollar() -> None:
    assert cost_number(Decimal("0.0000000004")) == 0.0
    assert cost_number(Decimal("0.0000000015")) == 2e-09  # half to even
    assert cost_number(Decimal("123.4567891234")) == 123.456789123
    assert repr(cost_number(Decimal("987654.123456789"))) == "987654.123456789"


def test_aprice_does_not_block_the_event_loop_on_the_import() -> None:
    """Before the table is loaded, pricing runs on a worker thread: the loop
    keeps ticking while genai-prices imports."""
    probe = (
        "import asyncio, time\n"
        "from sigil.telemetry.pricing import Pricer\n"
        "async def main():\n"
        "    ticks = 0\n"
        "    async def tick():\n"
        "        nonlocal ticks\n"
        "        while True:\n"
        "            await asyncio.sleep(0.005); ticks += 1\n"
        "    t = asyncio.ensure_future(tick())\n"
        "    await asyncio.sleep(0.02)\n"
        "    before = ticks\n"
        "    cost = await Pricer().aprice('gpt-4o-mini', 1000, 100)\n"
        "    t.cancel()\n"
        "    print(cost, ticks - before)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    cost, ticks = proc.stdout.split()
    assert Decimal(cost) == Decimal("0.00021")
    assert int(ticks) >= 5, proc.stdout  # the import took > 25 ms and the loop ran meanwhile


def test_a_cancellation_while_the_table_loads_leaves_the_call_unpriced_not_lost() -> None:
    """Cancelled while pricing waits for the table's import: the cost is left out
    and the caller is told, so it records the call's tokens before it stops."""
    probe = (
        "import asyncio\n"
        "from sigil.telemetry.pricing import Pricer\n"
        "async def main():\n"
        "    task = asyncio.ensure_future(Pricer().ameta('gpt-4o-mini', 1000, 100))\n"
        "    await asyncio.sleep(0.01)\n"
        "    task.cancel()\n"
        "    print(await task)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "({}, True)"


def test_pricing_makes_no_network_call_and_never_auto_updates() -> None:
    """genai-prices reads its bundled snapshot: no socket is opened (seen by an
    audit hook, not a mock) and no updater is running."""
    probe = (
        "import sys\n"
        "opened = []\n"
        "sys.addaudithook(lambda e, a: opened.append(e) if e.startswith('socket.') else None)\n"
        "from sigil.telemetry.pricing import Pricer\n"
        "p = Pricer()\n"
        "p.warm()\n"
        "costs = [p.price(m, 1000, 100) for m in ('gpt-4o-mini', 'claude-3-5-sonnet', 'nope-1')]\n"
        "from genai_prices import data_snapshot\n"
        "print(costs[0] is not None, costs[2] is None, opened,\n"
        "      data_snapshot.get_snapshot().from_auto_update)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip().split(maxsplit=2) == ["True", "True", "[] False"]


def test_help_and_the_orchestrator_module_do_not_import_the_price_table() -> None:
    probe = (
        "import sys\n"
        "import sigil.interfaces.cli.orchestrator, sigil.proxy.metering\n"
        "from sigil.interfaces.cli.main import main\n"
        "sys.argv = ['sigil', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('genai_prices' in sys.modules, 'pydantic' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.stderr.strip().splitlines()[-1] == "False False", proc.stderr


# -- overrides in config.yaml ------------------------------------------------------------------


def test_overrides_are_read_from_config(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        "pricing:\n  models:\n    house-model:\n      input_per_mtok: 0.15\n"
        "      output_per_mtok: 2\n",
    )
    settings = load_settings(env={"SIGIL_HOME": str(tmp_path)})
    assert settings.pricing.models == {
        "house-model": {"input_per_mtok": 0.15, "output_per_mtok": 2}
    }
    assert settings.source("pricing.models") == "config"
    pricer = Pricer.from_settings(settings)
    assert pricer.price("house-model", 1_000_000, 500_000) == Decimal("1.15")
    assert pricer.price("house-model-2", 1, 1) is None  # exact names only


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("pricing:\n  models: [a]\n", "expected a mapping of model name"),
        ("pricing:\n  models:\n    m: 3\n", "m: expected {input_per_mtok"),
        ("pricing:\n  models:\n    m: {input_per_mtok: 1}\n", "m: output_per_mtok is missing"),
        (
            "pricing:\n  models:\n    m: {input_per_mtok: -1, output_per_mtok: 1}\n",
            "m: input_per_mtok: expected US dollars per million tokens",
        ),
        (
            "pricing:\n  models:\n    m: {input_per_mtok: '1', output_per_mtok: 1}\n",
            "got '1'",
        ),
        (
            "pricing:\n  models:\n    m: {input_per_mtok: .nan, output_per_mtok: 1}\n",
            "input_per_mtok",
        ),
        (
            "pricing:\n  models:\n    m: {input_per_mtok: 1, output_per_mtok: 1, cache: 2}\n",
            "unknown key 'cache'",
        ),
    ],
)
def test_a_bad_override_is_a_config_error_naming_the_key(
    tmp_path: Path, body: str, needle: str
) -> None:
    write_config(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"SIGIL_HOME": str(tmp_path)})
    message = str(caught.value)
    assert "pricing.models" in message and needle in message
    assert "\n" not in message


def test_a_bad_override_stops_orchestrate_with_one_line_and_exit_2(
    sigil_home: Path, run_sigil: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    write_config(sigil_home, "pricing:\n  models:\n    m: {input_per_mtok: true}\n")
    result = run_sigil("orchestrate", "--task", "t", "--session", "badprice", "--json")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "config.yaml" in lines[0] and "pricing.models" in lines[0]


# -- the writers: orchestrator steps ------------------------------------------------------------


def test_orchestrator_events_carry_the_cost_of_priced_models_only(sigil_home: Path) -> None:
    from sigil.interfaces.cli.orchestrator import Orchestrator
    from sigil.pipeline.base import StepContext, StepError, StepOutput, TokenUsage

    write_config(
        sigil_home,
        "pricing:\n  models:\n    house-model: {input_per_mtok: 2, output_per_mtok: 8}\n",
    )

    class Priced:
        name = "reasoning"

        async def run(self, ctx: StepContext) -> StepOutput:
            return StepOutput(
                output={"summary": "s"}, input_tokens=1234, output_tokens=567, model="gpt-4o-mini"
            )

    class Unpriced:
        name = "planning"

        async def run(self, ctx: StepContext) -> StepOutput:
            # A step's own cost_usd is not taken: cost comes from the price table.
            return StepOutput(
                output={"plan": []}, input_tokens=50, output_tokens=5, model="echo-1",
                metadata={"cost_usd": 9.99},
            )  # fmt: skip

    class FailsOnceOnAnOverriddenModel:
        name = "memory"

        async def run(self, ctx: StepContext) -> StepOutput:
            if ctx.attempt == 1:
                raise StepError(
                    "timed out", usage=TokenUsage(40, 10, "house-model"), category="transient"
                )
            return StepOutput(output={}, input_tokens=3, output_tokens=1, model="house-model")

    from sigil.core.config import load_settings

    settings = load_settings({"errors.backoff_base": 0.0, "errors.backoff_max": 0.0})
    orch = Orchestrator(
        "priced",
        settings=settings,
        components={
            "reasoning": Priced(),
            "planning": Unpriced(),
            "memory": FailsOnceOnAnOverriddenModel(),
        },
    )
    result = asyncio.run(orch.execute("Analyze Acme Corp"))
    assert result.status == "complete", result.error
    events = events_of(orch.log_file)
    by = {
        (e["component"], e["event_type"]): e["metadata"]
        for e in events
        if e["event_type"] in ("step_complete", "token_consumption")
    }
    assert by["reasoning", "step_complete"]["cost_usd"] == 0.0005253
    assert "cost_usd" not in by["planning", "step_complete"]
    assert by["planning", "step_complete"]["model"] == "echo-1"
    # The failed attempt's tokens are priced too, by the user's override.
    assert by["memory", "token_consumption"]["cost_usd"] == (40 * 2 + 10 * 8) / 1e6
    assert by["memory", "step_complete"]["cost_usd"] == (3 * 2 + 1 * 8) / 1e6
    # Offline steps (no model) are neither priced nor unpriced.
    assert all(
        "cost_usd" not in meta and "model" not in meta
        for (component, _), meta in by.items()
        if component in ("routing", "contracts", "validation")
    )
    steps = {str(s.step): s for s in result.steps}
    assert steps["reasoning"].metadata["cost_usd"] == 0.0005253
    assert "cost_usd" not in steps["planning"].metadata


# -- the writers: sigil collect -----------------------------------------------------------------


def test_collected_spans_are_priced_by_their_model_and_aggregates_are_not(tmp_path: Path) -> None:
    from sigil.collect import SessionSink, SpanData

    trace = "0123456789abcdef0123456789abcdef"

    def span(span_id: str, parent: str = "", **attrs: Any) -> SpanData:
        attrs = {"gen_ai.conversation.id": "spent", "gen_ai.operation.name": "chat", **attrs}
        return SpanData(trace, span_id, parent, "s", 1_000_000, 3_000_000, False, "", attrs)

    usage = {"gen_ai.usage.input_tokens": 1234, "gen_ai.usage.output_tokens": 567}
    sink = SessionSink(
        tmp_path, pricer=Pricer({"house-model": ModelPrice(Decimal("2"), Decimal("8"))})
    )
    sink.ingest(
        [
            span("00000000000000c1", "00000000000000aa", **usage, **{
                "gen_ai.response.model": "gpt-4o-mini"}),
            span("00000000000000c2", "00000000000000aa", **usage, **{
                "gen_ai.request.model": "house-model"}),
            span("00000000000000c3", "00000000000000aa", **usage, **{
                "gen_ai.request.model": "echo-1"}),
            span("00000000000000aa", **{"gen_ai.operation.name": "invoke_agent",
                 "gen_ai.request.model": "gpt-4o-mini", **usage}),
        ]
    )  # fmt: skip
    sink.close()
    done = [
        e["metadata"]
        for e in events_of(tmp_path / "sessions" / "spent" / "execution.jsonl")
        if e["event_type"] == "step_complete"
    ]
    costs = {m["span_id"]: m.get("cost_usd") for m in done}
    assert costs == {
        "00000000000000c1": 0.0005253,
        "00000000000000c2": (1234 * 2 + 567 * 8) / 1e6,
        "00000000000000c3": None,  # unpriced
        "00000000000000aa": None,  # an aggregate: its children carry the cost
    }


# -- the views: the session model's cost, per component, run and session ------------------------


def _priced_state() -> Any:
    from datetime import UTC, datetime, timedelta

    from model_state import state_of
    from sigil.telemetry.execution_logger import LogEntry

    t0 = datetime(2026, 1, 11, 10, 0, tzinfo=UTC)

    def ev(kind: str, component: str, tokens: int, at: float, **meta: Any) -> LogEntry:
        return LogEntry(
            timestamp=(t0 + timedelta(seconds=at)).isoformat(),
            session_id="cost-1",
            event_type=kind,
            component=component,
            message=kind,
            tokens=tokens,
            metadata=meta,
        )

    return state_of(
        ev("session_start", "orchestrator", 0, 0, budget=100_000, run=1),
        ev("step_complete", "reasoning", 1801, 1, model="gpt-4o-mini", cost_usd=0.0005253),
        ev("token_consumption", "reasoning", 50, 2, model="gpt-4o-mini", cost_usd=0.00001),
        ev("step_complete", "planning", 55, 3, model="echo-1"),
        ev("step_complete", "routing", 10, 4),  # no model: neither priced nor unpriced
        session_id="cost-1",
    )


def test_json_mode_carries_cost_per_component_run_and_session() -> None:
    from sigil.interfaces.cli.display import state_to_dict

    obj = orjson.loads(orjson.dumps(state_to_dict(_priced_state())))
    components = obj["components"]
    assert components["reasoning"]["cost_usd"] == 0.0005353  # the model's exact sum
    assert components["reasoning"]["unpriced_tokens"] == 0
    assert components["planning"]["cost_usd"] is None  # unpriced: never 0
    assert components["planning"]["unpriced_tokens"] == 55
    assert components["planning"]["unpriced_models"] == ["echo-1"]
    assert components["routing"]["cost_usd"] is None
    assert components["routing"]["unpriced_tokens"] == 0
    assert (obj["cost_usd"], obj["unpriced_tokens"], obj["unpriced_models"]) == (
        0.0005353,
        55,
        ["echo-1"],
    )
    assert obj["run"]["cost_usd"] == 0.0005353


def test_dashboard_and_summary_show_dollars_and_unpriced_never_zero() -> None:
    from sigil.interfaces.cli.display import DisplayOptions, dashboard_lines, summary_lines

    state = _priced_state()
    text = "\n".join(line.render(140, False) for line in dashboard_lines(state, DisplayOptions(),
                                                                        width=140))  # fmt: skip
    assert "cost $0.000535+" in text  # some tokens are of a model without a price
    rows = {line.split()[0]: line for line in text.splitlines() if line[:1].isalpha()}
    assert "$0.000535" in rows["reasoning"]
    assert "unpriced" in rows["planning"]
    assert "$0.00 " not in text and "$0 " not in text
    summary = "\n".join(summary_lines(state, "complete"))
    assert "Cost:      $0.000535+" in summary


@pytest.mark.parametrize(
    ("nano", "priced", "unpriced", "shown"),
    [
        (0, 0, 0, "-"),
        (0, 0, 120, "unpriced"),
        (0, 1, 0, "$0"),
        (2_400, 1, 0, "$0.0000024"),
        (525_300, 2, 0, "$0.000525"),
        (12_300_000, 1, 5, "$0.0123+"),
        (1_234_567_891_234, 9, 0, "$1,234.57"),
    ],
)
def test_format_cost(nano: int, priced: int, unpriced: int, shown: str) -> None:
    from types import SimpleNamespace

    from sigil.interfaces.cli.display import format_cost

    cost = SimpleNamespace(cost_nanousd=nano, priced_events=priced, unpriced_tokens=unpriced)
    assert format_cost(cost) == shown


# -- tokens.json (the ledger) and its join, sessions --------------------------------------------


def _cost_line(seq: int, event_type: str, component: str, tokens: int, **meta: Any) -> bytes:
    from datetime import UTC, datetime, timedelta

    start = datetime(2026, 3, 1, tzinfo=UTC)
    return orjson.dumps(
        {
            "timestamp": (start + timedelta(milliseconds=250 * seq)).isoformat(),
            "session_id": "c",
            "event_type": event_type,
            "component": component,
            "message": event_type,
            "tokens": tokens,
            "metadata": meta,
            "seq": seq,
        }
    )


def _priced_runs(count: int, first_seq: int = 0, first_run: int = 1) -> list[bytes]:
    lines: list[bytes] = []
    for number in range(first_run, first_run + count):

        def add(kind: str, component: str, tokens: int = 0, **meta: Any) -> None:
            lines.append(_cost_line(first_seq + len(lines), kind, component, tokens, **meta))

        add("session_start", "orchestrator", run=number, budget=100_000)
        add("step_complete", "reasoning", 1000, model="gpt-4o-mini", cost_usd=0.000123456)
        add("step_complete", "planning", 40, model="echo-1")
        add("session_complete", "orchestrator", status="complete", run=number)
    return lines


def _write_ledger(session: Path) -> None:
    from sigil.interfaces.cli.orchestrator import read_session_history, write_summaries
    from sigil.telemetry.tokens import TokenTracker

    history = read_session_history(session)
    tracker = TokenTracker(total_budget=100_000)
    comp_tokens, comp_ops = history.component_totals()
    tracker.restore(history.tokens_used, comp_tokens, comp_ops)
    write_summaries(session, session.name, history, tracker, writer_stats={})


def test_tokens_json_carries_each_runs_cost_and_the_join_adds_ledger_only_runs(
    tmp_path: Path, run_sigil: Callable[..., subprocess.CompletedProcess[str]], sigil_home: Path
) -> None:
    import os

    from sigil.telemetry.log_parser import session_history

    session = sigil_home / "logs" / "sessions" / "c"
    session.mkdir(parents=True)
    first = _priced_runs(2)
    (session / "execution.jsonl").write_bytes(b"".join(line + b"\n" for line in first))
    _write_ledger(session)
    ledger = json.loads((session / "tokens.json").read_text())
    assert [r["cost_nanousd"] for r in ledger["runs"]] == [123_456, 123_456]
    assert [r["cost_usd"] for r in ledger["runs"]] == [0.000123456, 0.000123456]
    assert [r["unpriced_tokens"] for r in ledger["runs"]] == [40, 40]
    assert ledger["cost_nanousd"] == 246_912 and ledger["cost_usd"] == 0.000246912
    assert ledger["unpriced_models"] == ["echo-1"]
    assert ledger["component_totals"]["reasoning"]["cost_nanousd"] == 246_912
    # The ledger alone (the log unchanged since) is the history: its cost too.
    alone = session_history(session)
    assert alone.snapshot is None and alone.cost_nanousd == 246_912
    # Runs 1-2 leave the log (a rotator renamed then deleted it); run 3 is logged.
    os.rename(session / "execution.jsonl", session / "execution.jsonl.1")
    (session / "execution.jsonl.1").unlink()
    third = _priced_runs(1, first_seq=len(first), first_run=3)
    (session / "execution.jsonl").write_bytes(b"".join(line + b"\n" for line in third))
    history = session_history(session)
    assert [(r.number, r.source, r.cost_nanousd) for r in history.runs] == [
        (1, "ledger", 123_456),
        (2, "ledger", 123_456),
        (3, "log", 123_456),
    ]
    assert history.cost_nanousd == 3 * 123_456
    assert (history.priced_events, history.unpriced_tokens) == (3, 120)
    assert history.components["reasoning"].cost_nanousd == 3 * 123_456
    # sigil sessions: a COST column and cost_usd in its JSON.
    listed = run_sigil("sessions", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["cost_usd"] == 0.000370368 and row["unpriced_tokens"] == 120
    assert [r["cost_usd"] for r in row["run_details"]] == [0.000123456] * 3
    table = run_sigil("sessions")
    header, line = table.stdout.splitlines()[:2]
    assert "COST" in header.split() and "$0.00037+" in line.split()


def test_sessions_shows_unpriced_never_a_zero_cost(
    run_sigil: Callable[..., subprocess.CompletedProcess[str]], sigil_home: Path
) -> None:
    session = sigil_home / "logs" / "sessions" / "u"
    session.mkdir(parents=True)
    lines = [
        _cost_line(0, "session_start", "orchestrator", 0, run=1),
        _cost_line(1, "step_complete", "reasoning", 70, model="house-model"),
        _cost_line(2, "session_complete", "orchestrator", 0, status="complete", run=1),
    ]
    (session / "execution.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    listed = run_sigil("sessions", "--json")
    (row,) = json.loads(listed.stdout)
    assert row["cost_usd"] is None and row["unpriced_tokens"] == 70
    table = run_sigil("sessions").stdout.splitlines()
    assert "unpriced" in table[1].split() and "$0" not in table[1]


# -- OTLP spans -------------------------------------------------------------------------------


def test_spans_carry_each_attempts_cost_and_the_runs_from_the_model() -> None:
    from sigil.telemetry.otlp.spans import session_spans

    def event(seq: int, kind: str, component: str, tokens: int = 0, **meta: Any) -> dict:
        return {
            "timestamp": f"2026-01-11T10:00:{seq:02d}.000000+00:00",
            "session_id": "s",
            "event_type": kind,
            "component": component,
            "message": kind,
            "tokens": tokens,
            "metadata": meta,
            "seq": seq,
        }

    priced = {"model": "gpt-4o-mini"}
    events = [
        event(0, "session_start", "orchestrator", run=1, budget=10_000),
        event(1, "step_start", "reasoning", run=1),
        # A failed attempt's tokens, then its retry: two attempt spans.
        event(2, "token_consumption", "reasoning", 60, attempt=1, cost_usd=0.1, **priced),
        event(3, "retry_attempt", "reasoning", attempt=1, retry_delay_s=0),
        event(4, "token_consumption", "reasoning", 20, attempt=2, cost_usd=0.2, **priced),
        event(5, "step_complete", "reasoning", 30, attempt=2, cost_usd=0.000000007, **priced),
        event(6, "step_start", "planning", run=1),
        event(7, "step_complete", "planning", 15, attempt=1, model="echo-1"),
        event(8, "session_complete", "orchestrator", status="complete", run=1),
    ]
    spans = session_spans("s", events)
    by_name = [(s.name, s.attributes) for s in spans]
    first, second = (a for n, a in by_name if n == "invoke_agent reasoning")
    assert first["sigil.cost_usd"] == 0.1
    # Two events on one span: the native model's exact sum (0.1 + 0.2 floats would not be).
    assert second["sigil.cost_usd"] == 0.200000007
    (planning,) = (a for n, a in by_name if n == "invoke_agent planning")
    assert "sigil.cost_usd" not in planning and planning["sigil.unpriced_tokens"] == 15
    (root,) = (a for n, a in by_name if n == "invoke_workflow sigil")
    assert root["sigil.run.cost_usd"] == 0.300000007
    assert root["sigil.run.unpriced_tokens"] == 15
    assert root["sigil.session.cost_usd"] == 0.300000007


def test_top_shows_each_sessions_cost() -> None:
    from sigil.interfaces.cli.commands.top import TopRow, table_lines

    def row(name: str, nano: int, priced: int, unpriced: int) -> TopRow:
        return TopRow(
            name, "running", True, 1, 900, 10_000, 60.0, 0, None, None,
            cost_nanousd=nano, priced_events=priced, unpriced_tokens=unpriced,
        )  # fmt: skip

    rows = [row("a", 12_300_000, 2, 0), row("b", 0, 0, 900), row("c", 0, 0, 0)]
    header, *lines = table_lines(rows)
    column = header.split().index("COST")
    assert [line.split()[column] for line in lines] == ["$0.0123", "unpriced", "-"]
    assert rows[0].to_dict()["cost_usd"] == 0.0123 and rows[1].to_dict()["cost_usd"] is None
