"""``sigil collect``'s native OTLP decode (``rust/otlp.rs``) against hostile
bodies: malformed protobuf is a ``ValueError`` (HTTP 400), too many spans an
``OverflowError`` (413), never another exception, a hang or memory far beyond
the body's size. A non-loopback collector without a token is refused.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest

from sigil import _native

pytestmark = [pytest.mark.timeout(60)]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _span(name: bytes, attrs: bytes = b"") -> bytes:
    return _ld(1, b"\x01" * 16) + _ld(2, b"\x02" * 8) + _ld(5, name) + attrs


def _request(*spans: bytes) -> bytes:
    return _ld(1, _ld(2, b"".join(_ld(2, s) for s in spans)))


def _deep_value(depth: int) -> bytes:
    value = _ld(1, b"leaf")  # AnyValue.string_value
    for _ in range(depth):
        # AnyValue.kvlist_value(6) -> KeyValueList.values(1) -> KeyValue{key, value(2)}
        value = _ld(6, _ld(1, _ld(1, b"k") + _ld(2, value)))
    return value


MALFORMED = {
    "truncated varint": b"\x0a\xff\xff\xff",
    "length beyond the body": b"\x0a\x7f" + b"x" * 5,
    "length of 2**63": b"\x0a" + _varint(2**63),
    "varint of 11 bytes": b"\x08" + b"\xff" * 10 + b"\x01",
    "wrong wire type": b"\x0b\x00",
    "end group": b"\x0c",
    "wire type 6": b"\x0e",
    "field 0": b"\x02\x00",
    "nested length past its parent": _ld(1, b"\x12\x7f" + b"\x00" * 4),
    "non-UTF-8 span name": _request(_span(b"\xff\xfe name")),
    "non-UTF-8 attribute key": _request(_span(b"n", _ld(9, _ld(1, b"\xc3\x28")))),
    "nesting 3000 deep": _request(_span(b"n", _ld(9, _ld(1, b"k") + _ld(2, _deep_value(3000))))),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_body_is_a_value_error(body: bytes) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError) as caught:
        _native.otlp_decode_protobuf(body)
    assert time.monotonic() - started < 2
    assert "\n" not in str(caught.value)


def test_random_bytes_are_a_value_error_or_a_batch() -> None:
    rng = random.Random(20261129)
    valid = _request(_span(b"chat gpt-4o"), _span(b"x"))
    for i in range(20_000):
        if i % 2:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        else:
            mutated = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
            body = bytes(mutated[: rng.randrange(len(mutated) + 1)])
        with contextlib.suppress(ValueError, OverflowError):
            _native.otlp_decode_protobuf(body)


def test_oversized_attributes_decode_within_the_body_bound() -> None:
    big = b"v" * (4 << 20)
    attrs = b"".join(_ld(9, _ld(1, b"k%d" % i) + _ld(2, _ld(1, big))) for i in range(2))
    batch = _native.otlp_decode_protobuf(_request(_span(b"n", attrs)))
    assert batch.spans == 1


def test_too_many_spans_is_an_overflow_error_quickly() -> None:
    body = _ld(1, _ld(2, b"\x12\x00" * 1_000_000))  # a million empty spans, 2 MB
    started = time.monotonic()
    with pytest.raises(OverflowError):
        _native.otlp_decode_protobuf(body)
    assert time.monotonic() - started < 3


_PEAK = textwrap.dedent(
    """
    import resource, sys
    from sigil import _native
    body = sys.stdin.buffer.read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        _native.otlp_decode_protobuf(body)
        outcome = "batch"
    except OverflowError:
        outcome = "overflow"
    except ValueError:
        outcome = "malformed"
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(outcome, (after - before) * 1024)
    """
)


def _decode_peak(body: bytes) -> tuple[str, int]:
    """How a decode in a fresh interpreter ended, and how many bytes its peak
    resident size grew by while decoding (the body is read before measuring)."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK], input=body, capture_output=True, check=True, timeout=50
    )
    outcome, grew = done.stdout.split()
    return outcome.decode(), int(grew)


_CAP = 16 << 20  # the server's default body cap


def test_too_many_spans_are_refused_before_they_are_allocated() -> None:
    """A body at the cap of empty spans: refused (413) with memory a small
    multiple of the body (it was ~100 bytes per 2-byte span before)."""
    body = _ld(1, _ld(2, b"\x12\x00" * (_CAP // 2 - 8)))
    outcome, grew = _decode_peak(body)
    assert outcome == "overflow"
    assert grew < 2 * len(body), grew


def test_attributes_at_the_cap_decode_within_a_small_multiple_of_the_body() -> None:
    """Empty attributes, array values and spans under the limit: each is a few
    bytes on the wire; decoding them one at a time keeps the peak near the body."""
    empty_attrs = _request(_span(b"n", _ld(9, b"") * (_CAP // 2 - 64)))
    array = _ld(9, _ld(1, b"k") + _ld(2, _ld(5, _ld(1, b"") * (_CAP // 2 - 64))))
    big_array = _request(_span(b"n", array))
    many_spans = _request(*[_span(b"", _ld(9, b"") * 150)] * 50_000)
    for body in (empty_attrs, big_array, many_spans):
        assert len(body) <= _CAP
        outcome, grew = _decode_peak(body)
        assert outcome == "batch"
        assert grew < 4 * _CAP, (len(body), grew)


def test_a_non_loopback_host_without_a_token_is_refused(
    run_sigil: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.1", "localhost.evil.example"):
        result = run_sigil("collect", "--host", host, "--port", "0", timeout=20)
        assert result.returncode == 2, (host, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "--token" in lines[0], result.stderr
