"""No second truth about tokens (issue 10: "no totals arithmetic remains outside
the native fold except the test reference"; contract 12).

The OTLP spans' run and session totals are the native model's of the same
events, and the orchestrator and the OTLP package add no tokens up themselves:
a source check fails on any token arithmetic there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sigil.telemetry.log_parser import parse_bytes, snapshot_files
from sigil.telemetry.otlp.spans import SpanBuilder
from test_history_join import _session, _write, run

ROOT = Path(__file__).resolve().parent.parent
CHECKED = [
    ROOT / "python/sigil/interfaces/cli/orchestrator.py",
    *sorted((ROOT / "python/sigil/telemetry/otlp").glob("*.py")),
]


WORDS = ("token", "spent")


def _mentions_tokens(node: ast.AST) -> bool:
    def named(text: str) -> bool:
        return any(word in text.lower() for word in WORDS)

    return any(
        (isinstance(n, ast.Name) and named(n.id))
        or (isinstance(n, ast.Attribute) and named(n.attr))
        or (isinstance(n, ast.Constant) and isinstance(n.value, str) and named(n.value))
        for n in ast.walk(node)
    )


def token_arithmetic(source: str) -> list[str]:
    """Lines that add tokens up: ``x += <tokens>`` (or ``<tokens> += x``),
    ``<tokens>[k] = ... + ...``, and ``sum(...)`` over tokens."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add | ast.Sub):
            if _mentions_tokens(node.target) or _mentions_tokens(node.value):
                found.append(ast.unparse(node))
        elif (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.BinOp)
            and isinstance(node.value.op, ast.Add)
            and any(_mentions_tokens(t) for t in [*node.targets, node.value])
        ) or (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("sum", "fsum")
            and any(_mentions_tokens(a) for a in node.args)
        ):
            found.append(ast.unparse(node))
    return found


def test_the_checker_finds_token_arithmetic() -> None:
    assert token_arithmetic("run.total_tokens += ev.tokens") == ["run.total_tokens += ev.tokens"]
    assert token_arithmetic("spent += out.tokens")
    assert token_arithmetic("spent += usage.total")
    assert token_arithmetic('tokens[name] = tokens.get(name, 0) + int(c["tokens"])')
    assert token_arithmetic("result.tokens += record.tokens")
    assert token_arithmetic("t[n] = t.get(n, 0) + 1\nx = sum(r.tokens_used for r in runs)")
    assert token_arithmetic("self.events += 1\nattempt += 1") == []


def test_no_token_arithmetic_outside_the_native_fold() -> None:
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in CHECKED
        if (found := token_arithmetic(path.read_text()))
    }
    assert offenders == {}


def test_no_python_fold_of_a_ledger_remains() -> None:
    text = (ROOT / "python/sigil/interfaces/cli/orchestrator.py").read_text()
    assert not re.search(r"json\.loads?\(.*tokens\.json|from_ledger|def read_ledger", text)


@settings(max_examples=40, deadline=None)
@given(runs=st.lists(run, min_size=1, max_size=4), cut=st.integers(0, 6))
def test_span_totals_are_the_models(tmp_path_factory, runs, cut) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("otlp") / "execution.jsonl"
    # A log may begin mid-run (its head rotated away): a trace without a start.
    _write(path, _session(runs)[cut:])
    snap = snapshot_files([path])
    builder = SpanBuilder("h")
    spans = []
    for entry in parse_bytes(path.read_bytes()).entries:
        spans += builder.feed(entry)
    spans += builder.finish("incomplete")
    assert builder.tokens == snap.tokens
    assert sum(s.tokens for s in spans) == snap.tokens
    # Each trace's total is the model's of its events. In these logs every
    # run begins with its session_start, so a trace is a run of the model, or
    # the part of a run whose start was cut away (the model's headless part).
    roots = [s for s in spans if s.parent_span_id is None]
    traced = [r.attributes["sigil.run.tokens"] for r in roots]
    expected = [r.tokens for r in snap.runs]
    if snap.entries and (not snap.runs or snap.runs[0].first_seq != snap.first_seq):
        expected.insert(0, snap.tokens - sum(r.tokens for r in snap.runs))
    assert traced == expected
