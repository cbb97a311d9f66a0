"""``sigil diff A B``: two sessions (or two runs, ``A@1 B@2``) side by side."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from sigil.interfaces.cli.errors import OneLineCommand, UsageFailure


@click.command("diff", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--log-path", "-l", metavar="DIR", help="Base log directory (default: logging.path).")
def diff(a: str, b: str, as_json: bool, log_path: str | None) -> None:
    """Tokens, latency and errors per component of A and B (a session ID, or
    ID@RUN for one run), largest differences first; then the steps whose output
    changed, loops, retry storms (5+ retries of one component in a run), runs
    out of budget, and token jumps (a component whose tokens per call on one
    side are above 2x the other's and at least 100 more)."""
    from pathlib import Path

    from sigil.core.config import load_settings
    from sigil.interfaces.cli.commands.report import budget_text, calls_text
    from sigil.reports.diff import DiffError, changed_steps, compare, load_sides, token_jumps

    settings = load_settings({"logging.path": log_path})
    base = Path(settings.logging.path)
    from sigil.interfaces.cli.screen import shown

    warnings: list[str] = []
    try:
        left, right = load_sides(base, [a, b], warnings)
    except DiffError as exc:
        raise UsageFailure(shown(exc)) from None
    for warning in warnings:
        click.echo(f"sigil: warning: {shown(warning)}", err=True)
    rows = compare(left, right)
    changed = changed_steps(left, right)
    loops = {"a": left.loops, "b": right.loops}
    storms = {"a": left.retry_storms, "b": right.retry_storms}
    exhausted = {"a": left.budget_exhausted, "b": right.budget_exhausted}
    jumps = token_jumps(left, right)
    if as_json:
        import orjson

        doc = {
            "a": left.head(),
            "b": right.head(),
            "components": rows,
            "changed_steps": changed,
            "loops": loops,
            "retry_storms": storms,
            "budget_exhausted": exhausted,
            "token_jumps": jumps,
        }
        click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return
    _print(left.head(), right.head(), rows)
    for step in changed:
        click.echo(
            f"changed step #{step['ordinal'] + 1}: {shown(step['component_a'] or '-')} -> "
            f"{shown(step['component_b'] or '-')} (output {_short(step['output_sha256_a'])} -> "
            f"{_short(step['output_sha256_b'])})"
        )
    _echo_each(
        loops,
        lambda side, loop: (
            f"loop in {side} run {loop['run']}: {shown(loop['component'])} started"
            f" {loop['starts']} times with input {_short(loop['input_sha256'])}"
            f" (seq {_seqs(loop)})"
        ),
    )
    _echo_each(
        storms,
        lambda side, storm: (
            f"retry storm in {side} run {storm['run']}:"
            f" {shown(storm['component'])} retried {storm['retries']} times (seq {_seqs(storm)})"
        ),
    )
    _echo_each(
        exhausted,
        lambda side, run: f"budget exhausted in {side} run {run['run']}: {budget_text(run)}",
    )
    for side, other in (("a", "b"), ("b", "a")):
        for jump in jumps[side]:
            value, baseline = jump["tokens_per_call"], jump["history_p99"]
            times = f"{value / baseline:.1f}x" if baseline else "up from"
            click.echo(
                f"token jump in {side.upper()}: {shown(jump['component'])} {value:,.1f} tokens per"
                f" call, {times} {other.upper()}'s {baseline:,.1f}{calls_text(jump)}"
            )


def _echo_each(
    found: dict[str, list[dict[str, Any]]], line: Callable[[str, dict[str, Any]], str]
) -> None:
    """One line per finding of each side (``a`` then ``b``): ``line`` of the
    side's letter (``A``, ``B``) and the finding."""
    for side, items in found.items():
        for item in items:
            click.echo(line(side.upper(), item))


def _seqs(found: dict[str, Any]) -> str:
    return ", ".join(map(str, found["seqs"]))


def _short(digest: str | None) -> str:
    return "-" if digest is None else digest[:12]


def _print(a: dict[str, Any], b: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from rich.table import Table
    from rich.text import Text

    from sigil.interfaces.cli.commands.report import _cell, _console, _name
    from sigil.interfaces.cli.screen import shown

    title = shown(
        f"A {a['label']} ({a['status']}, {a['tokens']:,} tokens)  vs  "
        f"B {b['label']} ({b['status']}, {b['tokens']:,} tokens)"
    )
    table = Table(title=Text(title))
    table.add_column("COMPONENT")
    for header in ("TOKENS A", "TOKENS B", "DELTA", "ERR A", "ERR B", "P95 MS A", "P95 MS B"):
        table.add_column(header, justify="right")
    for row in rows:
        left, right, delta = row["a"] or {}, row["b"] or {}, row["delta"]
        table.add_row(
            _name(row["component"]),
            _cell(left.get("tokens")),
            _cell(right.get("tokens")),
            f"{delta['tokens']:+,}",
            _cell(left.get("errors")),
            _cell(right.get("errors")),
            _cell(left.get("p95_latency_ms")),
            _cell(right.get("p95_latency_ms")),
        )
    _console().print(table)
