"""``sigil collect`` and gzip bodies of several members (RFC 1952 2.2: a gzip
file is a series of members; ``gzip.decompress`` and ``zcat`` read them all).

Every member is inflated, in order, and the size cap applies to their total.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import httpx
import pytest

from sigil.collect.decode import MalformedPayload, PayloadTooLarge, gunzip
from test_collect import TRACE, Collector, _json_request, _json_span, wait_tokens

pytestmark = [pytest.mark.timeout(60)]


def test_gunzip_inflates_every_member_within_one_cap() -> None:
    body = gzip.compress(b"first ") + gzip.compress(b"") + gzip.compress(b"second")
    assert gunzip(body, 100) == b"first second" == gzip.decompress(body)
    # The cap is on the total: 60 + 60 bytes inflated is over a cap of 100.
    two = gzip.compress(b"a" * 60) + gzip.compress(b"b" * 60)
    with pytest.raises(PayloadTooLarge):
        gunzip(two, 100)
    assert gunzip(two, 120) == b"a" * 60 + b"b" * 60
    # Many empty members cannot get around the cap or hang.
    with pytest.raises(PayloadTooLarge):
        gunzip(gzip.compress(b"") * 1000 + gzip.compress(b"x" * 200), 100)
    # 4 MiB of empty members: linear, not a copy of the rest of the body per
    # member (was quadratic: hours); zero padding at the end is ignored.
    many = gzip.compress(b"") * 200_000 + gzip.compress(b"end") + b"\0" * 1000
    started = time.monotonic()
    assert gunzip(many, 100) == b"end"
    assert time.monotonic() - started < 10
    # A second member that is not gzip, or is cut short, is a corrupt body.
    with pytest.raises(MalformedPayload):
        gunzip(gzip.compress(b"ok") + b"garbage here", 100)
    with pytest.raises(MalformedPayload):
        gunzip(gzip.compress(b"ok") + gzip.compress(b"more")[:-5], 100)


def test_collect_accepts_a_body_of_two_gzip_members(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    body = _json_request(
        _json_span(TRACE, "eee19b7ec3c1b181", tokens=(40, 2), sid="multi"),
        _json_span(TRACE, "eee19b7ec3c1b182", tokens=(10, 1), sid="multi"),
    )
    half = len(body) // 2
    two = gzip.compress(body[:half]) + gzip.compress(body[half:])
    collector = Collector(home, tmp_path / "collected", "--idle", "600")
    try:
        r = httpx.post(
            collector.url,
            content=two,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        assert r.status_code == 200, r.text
        wait_tokens(collector.session_dir("multi"), 53)
        collector.stop()
    finally:
        if collector.proc.poll() is None:
            collector.proc.kill()
            collector.proc.wait()
