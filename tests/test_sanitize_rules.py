"""Every rule's own shapes, and the parts of an event the sanitizer reads.

* Each rule of the documented reference (``tests/sanitize_reference.py``) gets
  strings generated from its own regex (hypothesis ``from_regex``): the native
  rules must scrub them exactly as the plain rule table does with no gate at all,
  so that a gate (a cheap pre-test that lets a rule family run) which misses a
  family can never come back (the ``github_pat_`` rule once ran only where "gh"
  appeared elsewhere in the text: nearly every fine-grained PAT was written as is).
* An event's ``component``, ``event_type`` and metadata keys are scrubbed like its
  values, on every path that writes an event (native ``log_event``, the writer's
  ``write_event`` on encoded metadata, the Python sanitizer).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil import _native
from sigil.telemetry.sanitization import LogSanitizer

# GitHub's documented example of a fine-grained personal access token.
GITHUB_DOCS_PAT = (
    "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"
)
OPENAI_KEY = "sk-proj-AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHHIIIIJJJJ1234"
OPENAI_KEY_2 = "sk-proj-ZZZZYYYYXXXXWWWWVVVVUUUUTTTTSSSSRRRRQQQQ9876"
GITHUB_KEY = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"


def _reference() -> Any:
    import sanitize_reference

    return sanitize_reference


def _rules() -> list[tuple[str, int, str]]:
    """(family, index in the family, pattern) of every rule of the reference."""
    return [
        (family, index, pattern.pattern)
        for family, rules in _reference()._FAMILIES
        for index, (pattern, _) in enumerate(rules)
    ]


def test_every_rule_of_the_reference_is_generated_here() -> None:
    """The native set has 26 rules; a rule added to the table gets a generator
    here by construction (the parametrisation reads the table)."""
    assert len(_rules()) == 26


# -- 1. every rule, from its own regex ---------------------------------------------------


def test_github_docs_fine_grained_pat_is_redacted() -> None:
    assert _native.sanitize_string(GITHUB_DOCS_PAT) == "***GITHUB_TOKEN***"
    assert _native.sanitize_string(f"token {GITHUB_DOCS_PAT} ok") == "token ***GITHUB_TOKEN*** ok"
    assert LogSanitizer().sanitize_string(GITHUB_DOCS_PAT) == "***GITHUB_TOKEN***"
    assert _reference().LogSanitizer().sanitize_string(GITHUB_DOCS_PAT) == "***GITHUB_TOKEN***"


def test_real_shaped_fine_grained_pats_are_all_redacted() -> None:
    """The hostile review's repro: 22 + '_' + 59 characters, none holding "gh"."""
    import random
    import string

    rnd = random.Random(7)
    alphabet = string.ascii_letters + string.digits
    missed = []
    for _ in range(500):
        token = (
            "github_pat_"
            + "".join(rnd.choice(alphabet) for _ in range(22))
            + "_"
            + "".join(rnd.choice(alphabet) for _ in range(59))
        )
        if token in _native.sanitize_string(f"value {token}"):
            missed.append(token)
    assert missed == []


#: Text around a generated secret: none, blanks, separators and words the rules
#: key on (a rule's own lookarounds then decide, as the reference's do).
_CONTEXT = st.sampled_from(["", " ", "x ", "key=", "\n", "(", '"', "a", "é", "- ", "token: "])


@pytest.mark.parametrize(
    ("family", "index", "pattern"), _rules(), ids=[f"{f}{i}" for f, i, _ in _rules()]
)
def test_each_rule_scrubs_its_own_shapes_as_the_plain_rule_table_does(
    family: str, index: int, pattern: str
) -> None:
    """Strings drawn from the rule's own regex, in context: the native result
    equals the reference's rule table applied with no gate, and the reference's
    gates let through every family the plain table would change."""
    reference = _reference()
    flags = re.DOTALL if family == "pem" else 0
    secrets = st.from_regex(re.compile(pattern, flags), fullmatch=True)

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(_CONTEXT, secrets, _CONTEXT)
    def check(before: str, secret: str, after: str) -> None:
        text = before + secret + after
        plain = reference.sanitize_ungated(text)
        assert _native.sanitize_string(text) == plain, (family, index, text)
        assert reference.LogSanitizer().sanitize_string(text) == plain, (family, index, text)

    check()


# -- 2. component, event_type and metadata keys -----------------------------------------


def test_sanitize_dict_scrubs_keys_at_every_level() -> None:
    data = {OPENAI_KEY: 1, "nested": {GITHUB_KEY: "x"}, "list": [{f"k {OPENAI_KEY}": 2}]}
    cleaned = LogSanitizer().sanitize_dict(data)
    assert cleaned == {
        "***API_KEY***": 1,
        "nested": {"***GITHUB_TOKEN***": "x"},
        "list": [{"k ***API_KEY***": 2}],
    }
    assert OPENAI_KEY in data  # the input is not mutated


def test_keys_that_redact_to_the_same_text_keep_every_value() -> None:
    """Two keys that scrub to the same text: none of the values is dropped. Keys
    that needed no scrubbing keep their names; a scrubbed key that would clash
    with one of them or with an earlier scrubbed key gets the first free
    ``#2``, ``#3``, ... suffix."""
    sanitizer = LogSanitizer()
    assert sanitizer.sanitize_dict({OPENAI_KEY: 1, OPENAI_KEY_2: 2}) == {
        "***API_KEY***": 1,
        "***API_KEY***#2": 2,
    }
    got = sanitizer.sanitize_dict({OPENAI_KEY: 1, "***API_KEY***": 2, "***API_KEY***#2": 3})
    assert got == {"***API_KEY***#3": 1, "***API_KEY***": 2, "***API_KEY***#2": 3}
    assert list(got) == ["***API_KEY***#3", "***API_KEY***", "***API_KEY***#2"]


def test_a_credential_named_key_is_judged_by_its_own_name() -> None:
    """A key's value is redacted by the key's name as written (before scrubbing)."""
    key = f"{OPENAI_KEY}_password"  # credential-named; the key rule takes "_password" too
    cleaned = LogSanitizer().sanitize_dict({key: "plain", "model": "x"})
    assert cleaned == {"***API_KEY***": "***REDACTED***", "model": "x"}


def test_sanitize_entry_scrubs_component_and_event_type() -> None:
    from sigil.telemetry.execution_logger import LogEntry

    entry = LogEntry(
        timestamp="2026-11-29T00:00:00+00:00",
        session_id="s",
        event_type="custom." + OPENAI_KEY,
        component="comp." + OPENAI_KEY,
        message="m",
        tokens=1,
        metadata={OPENAI_KEY: 1},
    )
    cleaned = LogSanitizer().sanitize_entry(entry)
    assert cleaned.event_type == "custom.***API_KEY***"
    assert cleaned.component == "comp.***API_KEY***"
    assert cleaned.metadata == {"***API_KEY***": 1}


def _secret_metadata() -> dict[str, Any]:
    return {
        OPENAI_KEY: 1,
        OPENAI_KEY_2: "two",
        "***API_KEY***": "literal",
        "nested": {GITHUB_KEY: "x", f"{OPENAI_KEY}_password": "plain"},
        "list": [{GITHUB_DOCS_PAT: [1, 2]}],
        "a": "fine",
    }


def _expected_metadata() -> dict[str, Any]:
    return {
        "***API_KEY***#2": 1,
        "***API_KEY***#3": "two",
        "***API_KEY***": "literal",
        "nested": {"***GITHUB_TOKEN***": "x", "***API_KEY***": "***REDACTED***"},
        "list": [{"***GITHUB_TOKEN***": [1, 2]}],
        "a": "fine",
    }


def _read_events(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_the_native_writer_scrubs_names_and_keys_on_both_entry_points(tmp_path: Path) -> None:
    """``log_event`` (metadata encoded natively from the dict) and ``write_event``
    (metadata already encoded) write the same scrubbed event, equal to the
    reference's and the Python sanitizer's dict walk."""
    path = tmp_path / "log.jsonl"
    writer = _native.AppendWriter(path, session_id="s", sanitize=True)
    metadata = _secret_metadata()
    seq = writer.log_event("custom." + OPENAI_KEY, "comp." + GITHUB_KEY, "m", 1, metadata)
    assert seq == 0
    writer.write_event(
        "s", "custom." + OPENAI_KEY, "comp." + GITHUB_KEY, "m", 1, orjson.dumps(metadata)
    )
    writer.close()
    events = _read_events(path)
    assert len(events) == 2
    for event in events:
        assert event["event_type"] == "custom.***API_KEY***"
        assert event["component"] == "comp.***GITHUB_TOKEN***"
        assert event["metadata"] == _expected_metadata()
        assert list(event["metadata"]) == list(_expected_metadata())
    assert events[0]["metadata"] == _reference().LogSanitizer().sanitize_dict(metadata)
    assert events[0]["metadata"] == LogSanitizer().sanitize_dict(metadata)
    text = path.read_text()
    for secret in (OPENAI_KEY, OPENAI_KEY_2, GITHUB_KEY, GITHUB_DOCS_PAT):
        assert secret not in text


def test_a_writer_without_sanitize_keeps_names_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    writer = _native.AppendWriter(path, session_id="s", sanitize=False)
    writer.log_event("custom." + OPENAI_KEY, "c", "m", 1, {OPENAI_KEY: 1})
    writer.close()
    (event,) = _read_events(path)
    assert event["event_type"] == "custom." + OPENAI_KEY
    assert event["metadata"] == {OPENAI_KEY: 1}


_LOGGER_CASES: list[tuple[str, Callable[[], Any]]] = [
    ("native", lambda: True),
    ("python", lambda: LogSanitizer(additional_patterns=[("zz-never-zz", "x")])),
]


@pytest.mark.parametrize("make", [m for _, m in _LOGGER_CASES], ids=[n for n, _ in _LOGGER_CASES])
def test_no_secret_in_names_or_keys_reaches_the_log(
    tmp_path: Path, make: Callable[[], Any]
) -> None:
    """The hostile review's repro (san1/san4), through ExecutionLogger with the
    built-in sanitizer (native path) and with a Python one (extra patterns)."""
    import pathlib

    from sigil.telemetry.execution_logger import ExecutionLogger

    with ExecutionLogger("S1", log_path=tmp_path, sanitizer=make()) as logger:
        logger.log_event_sync("step_complete", "comp." + OPENAI_KEY, "msg", 1, {})
        logger.log_event_sync("custom." + OPENAI_KEY, "c", "msg", 1, {})
        logger.log_event_sync("step_complete", "c", "m", 1, {OPENAI_KEY: 1, "n": {GITHUB_KEY: 2}})
        # Metadata the native encoder declines (a set, a path): the slow path.
        logger.log_event_sync(
            "step_complete", "c", "m", 1, {OPENAI_KEY: {1}, "p": pathlib.Path("/x")}
        )
        # Names long enough to be cut to size: scrubbed before the cut.
        logger.log_event_sync("e" * 250 + OPENAI_KEY, "c" * 250 + GITHUB_KEY, "m", 1, {})
        logger.log_event_sync(
            "step_complete",
            "git",
            f"cloned with token {GITHUB_DOCS_PAT}",
            1,
            {"env": {"GH_TOKEN_VALUE": GITHUB_DOCS_PAT}, "cmd": f"https://x:{GITHUB_DOCS_PAT}@gh"},
        )
        logger.log_event_sync("step_complete", "c", "m", 1, {OPENAI_KEY: 1, OPENAI_KEY_2: 2})
    text = (tmp_path / "sessions" / "S1" / "execution.jsonl").read_text()
    for secret in (OPENAI_KEY, OPENAI_KEY_2, GITHUB_KEY, GITHUB_DOCS_PAT):
        for part in (secret, secret[8:40]):
            assert part not in text, (secret, text)
    events = [orjson.loads(line) for line in text.splitlines()]
    assert events[0]["component"] == "comp.***API_KEY***"
    assert events[1]["event_type"] == "custom.***API_KEY***"
    assert events[2]["metadata"] == {"***API_KEY***": 1, "n": {"***GITHUB_TOKEN***": 2}}
    assert events[-1]["metadata"] == {"***API_KEY***": 1, "***API_KEY***#2": 2}


@pytest.mark.parametrize("make", [lambda: None, lambda: LogSanitizer([("zzz", "y")])],
                         ids=["native", "python"])  # fmt: skip
def test_secrets_inside_values_json_cannot_hold_are_scrubbed(
    tmp_path: Path, make: Callable[[], Any]
) -> None:
    """A set, bytes, an exception or a path is written as its text: with a
    Python sanitizer (extra patterns) that text was made after the scrub, and
    the secret inside it reached the log."""
    from sigil.telemetry.execution_logger import ExecutionLogger

    metadata = {
        "set": {1, OPENAI_KEY},
        "bytes": b"key=" + OPENAI_KEY.encode(),
        "error": ValueError(f"refused {OPENAI_KEY}"),
        "path": Path(f"/x/{OPENAI_KEY}"),
        "nested": {"more": [frozenset({GITHUB_KEY})]},
    }
    kwargs = {} if make() is None else {"sanitizer": make()}
    with ExecutionLogger("S1", log_path=tmp_path, **kwargs) as logger:
        logger.log_event_sync("step_complete", "c", "m", 1, metadata)
    text = (tmp_path / "sessions" / "S1" / "execution.jsonl").read_text()
    for secret in (OPENAI_KEY, GITHUB_KEY):
        assert secret[8:40] not in text, text
    [event] = [orjson.loads(line) for line in text.splitlines()]
    assert sorted(event["metadata"]) == ["bytes", "error", "nested", "path", "set"]


def test_a_token_glued_to_a_snake_case_name_is_redacted(tmp_path: Path) -> None:
    """The hostile review's names: "comp_" + key, "custom_" + key (no ``\\b``
    between "_" and the key, so the rules once let them through)."""
    from sigil.telemetry.execution_logger import ExecutionLogger

    assert _native.sanitize_string("comp_" + OPENAI_KEY) == "comp_***API_KEY***"
    assert _native.sanitize_string("x_" + GITHUB_DOCS_PAT) == "x_***GITHUB_TOKEN***"
    assert _native.sanitize_string("comp" + OPENAI_KEY) == "comp" + OPENAI_KEY
    with ExecutionLogger("S1", log_path=tmp_path) as logger:
        logger.log_event_sync("step_complete", "comp_" + OPENAI_KEY, "msg", 1, {})
        logger.log_event_sync("custom_" + OPENAI_KEY, "c", "msg", 1, {"n_" + GITHUB_KEY: 1})
    text = (tmp_path / "sessions" / "S1" / "execution.jsonl").read_text()
    assert OPENAI_KEY[8:] not in text and GITHUB_KEY[4:] not in text
    events = [orjson.loads(line) for line in text.splitlines()]
    assert events[0]["component"] == "comp_***API_KEY***"
    assert events[1]["event_type"] == "custom_***API_KEY***"
    assert events[1]["metadata"] == {"n_***GITHUB_TOKEN***": 1}


_PIECES = [OPENAI_KEY, OPENAI_KEY_2, GITHUB_KEY, GITHUB_DOCS_PAT, "***API_KEY***", "#2", "x", " "]
_KEYS = st.one_of(
    st.lists(st.sampled_from(_PIECES), min_size=1, max_size=3).map("".join),
    st.sampled_from(["password", "api_key", "model", "***GITHUB_TOKEN***", "***API_KEY***#2"]),
    st.text(max_size=6),
)
_VALUES = st.recursive(
    st.one_of(st.sampled_from(_PIECES), st.integers(-5, 5), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_every_path_scrubs_keys_alike(metadata: dict[str, Any]) -> None:
    """Keys drawn from secrets, marks and suffixes (so that scrubbed keys clash):
    native ``log_event``, native ``write_event``, the Python sanitizer and the
    reference all give the same metadata, keys in the same order, and no
    scrubbed dict has fewer keys than its input."""
    import tempfile

    expected = _reference().LogSanitizer().sanitize_dict(metadata)
    assert LogSanitizer().sanitize_dict(metadata) == expected

    def count(v: Any) -> int:
        if isinstance(v, dict):
            return len(v) + sum(count(x) for x in v.values())
        if isinstance(v, list):
            return sum(count(x) for x in v)
        return 0

    assert count(expected) == count(metadata)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.jsonl"
        writer = _native.AppendWriter(path, session_id="s", sanitize=True)
        assert writer.log_event("e", "c", "m", 0, metadata) == 0
        writer.write_event("s", "e", "c", "m", 0, orjson.dumps(metadata))
        writer.close()
        lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    for line in lines:
        got = orjson.loads(line)["metadata"]
        assert orjson.dumps(got) == orjson.dumps(expected)
