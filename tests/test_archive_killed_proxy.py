"""An archived session of a ``sigil proxy`` killed with calls in flight says
what it said before ``sigil logs archive`` (contract 12, one session model).

``kill -9`` leaves the calls' ``step_start``s and no end: once the writer is
gone they are calls of unknown usage holding their reservations, in every
view. An archive is of a session nobody writes (the archiver takes its lock),
so the archive's model settles them too: ``sigil sessions --json``, ``sigil
report --json``, ``sigil diff`` and ``sigil replay`` of the archive show the
same calls and held tokens as before it was archived.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from proxy_upstream import Upstream
from test_proxy_views import _call, _until, events, report, sigil, start

pytestmark = [pytest.mark.timeout(180)]


def _listed(home: Path, session: str) -> dict[str, Any]:
    proc = sigil(home, "sessions", "--json")
    assert proc.returncode == 0, proc.stderr
    return next(r for r in json.loads(proc.stdout) if r["session_id"] == session)


def _replayed(home: Path, session: str) -> dict[str, Any]:
    proc = sigil(home, "replay", session, "--mode", "json", "--speed", "max")
    assert proc.returncode == 0, proc.stderr
    end = json.loads(proc.stdout.splitlines()[-1])
    assert end["type"] == "final", end
    return dict(end)


def _diffed(home: Path, a: str, b: str) -> dict[str, Any]:
    proc = sigil(home, "diff", a, b, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    for side in ("a", "b"):
        doc[side].pop("archived")
    return dict(doc)


def _views(home: Path, session: str) -> dict[str, Any]:
    row = _listed(home, session)
    end = _replayed(home, session)
    return {
        "sessions": (row["unknown_usage_calls"], row["status"], row["tokens_used"]),
        "report": report(home, session),
        "replay": (end["unknown_usage_calls"], end["tokens_held"], end["status"]),
        "diff": _diffed(home, session, session),
    }


def test_an_archived_killed_proxy_session_holds_its_calls_in_every_view(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with Upstream(delay=3.0) as up:
        proc, url = start(home, "k9a", "--upstream", up.url, "--budget", "100000")
        try:
            out: list[Any] = []
            threads = [threading.Thread(target=_call, args=(url, out)) for _ in range(2)]
            for t in threads:
                t.start()

            def started() -> bool:
                try:
                    log = events(home, "k9a")
                except FileNotFoundError:
                    return False
                return sum(e["event_type"] == "step_start" for e in log) == 2

            _until(started)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for t in threads:
            t.join(30)
    log = events(home, "k9a")
    starts = [e for e in log if e["event_type"] == "step_start"]
    assert len(starts) == 2 and len(log) == 3  # session_start and the 2 starts
    reserved = sum(
        e["metadata"].get("prompt_tokens_reserved", 0) + e["metadata"].get("max_tokens", 0)
        for e in starts
    )
    assert reserved > 0

    before = _views(home, "k9a")
    # The writer is gone: both calls hold their reservations, unknown usage.
    assert before["sessions"][0] == 2, before
    assert before["report"] == {"unknown_usage_calls": 2, "tokens_held": reserved}, before
    assert before["replay"] == (2, reserved, "incomplete"), before

    (home / "config.yaml").write_text("logging:\n  retention_days: 0\n")
    archived = sigil(home, "logs", "archive", "--json")
    assert archived.returncode == 0, archived.stderr
    assert json.loads(archived.stdout)["sessions_archived"] == 1, archived.stdout
    assert not (home / "logs" / "sessions" / "k9a").exists()
    assert _listed(home, "k9a")["archived"] is True

    after = _views(home, "k9a")
    assert after == before
