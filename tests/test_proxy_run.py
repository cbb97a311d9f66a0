"""``sigil run -- python script.py``: an unmodified openai-SDK script, metered.

The script never names the proxy: ``sigil run`` points ``OPENAI_BASE_URL`` at
it. The session then reads like any other in ``sigil monitor``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import test_logrotate_e2e
from proxy_upstream import Upstream

SIGIL = [sys.executable, "-m", "sigil"]

AGENT = textwrap.dedent(
    """
    import os, sys
    import openai

    client = openai.OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment
    assert os.environ["OPENAI_API_BASE"] == os.environ["OPENAI_BASE_URL"]
    calls = int(sys.argv[1])
    try:
        for i in range(calls):
            r = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "step %d" % i}]
            )
            print("answer", r.choices[0].message.content.strip()[:10], flush=True)
        for chunk in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "stream"}], stream=True
        ):
            pass
    except openai.RateLimitError as exc:
        print("refused:", exc.code, flush=True)
        sys.exit(0)
    sys.exit(int(sys.argv[2]))
    """
)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIGIL_"))}
    env.update(SIGIL_HOME=str(home), NO_COLOR="1", OPENAI_API_KEY="sk-test-key-000000000000000000")
    return subprocess.run(
        [*SIGIL, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def monitor(home: Path, session: str) -> dict[str, Any]:
    proc = run(home, "monitor", "--session", session, "--mode", "json", "--once")
    return json.loads(proc.stdout.splitlines()[0])


def events(home: Path, session: str) -> list[dict[str, Any]]:
    log = home / "logs" / "sessions" / session / "execution.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_run_meters_an_unmodified_script_and_keeps_its_exit_status(
    upstream: Upstream, tmp_path: Path
) -> None:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    home = tmp_path / "home"
    proc = run(
        home, "run", "--session", "agent-1", "--budget", "50000", "--upstream", upstream.url,
        "--", sys.executable, str(script), "3", "5",
    )  # fmt: skip
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout.count("answer") == 3  # the command's output is its own
    assert "session agent-1" in proc.stderr
    state = monitor(home, "agent-1")
    assert state["tokens_used"] == upstream.totals() > 0
    assert state["components"]["m"]["operations"] == 4
    log = events(home, "agent-1")
    assert log[0]["metadata"]["command"][-2:] == ["3", "5"]
    assert log[-1]["event_type"] == "session_error"
    assert log[-1]["metadata"]["status"] == "error"
    assert "status 5" in log[-1]["metadata"]["error"]

    # Exit 0: the run completes; a second run continues the session.
    proc = run(
        home, "run", "--session", "agent-1", "--upstream", upstream.url,
        "--", sys.executable, str(script), "1", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    state = monitor(home, "agent-1")
    assert state["status"] == "complete"
    assert state["tokens_used"] == upstream.totals()
    assert state["run"]["number"] == 2


def test_run_exits_3_when_the_budget_runs_out(upstream: Upstream, tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    home = tmp_path / "home"
    proc = run(
        home, "run", "--session", "tight", "--budget", "200", "--upstream", upstream.url,
        "--", sys.executable, str(script), "100", "0",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "refused: insufficient_quota" in proc.stdout
    state = monitor(home, "tight")
    assert state["status"] == "budget_exceeded"
    assert state["tokens_used"] == upstream.totals()


def test_run_usage_errors(tmp_path: Path) -> None:
    for args, needle in (
        (["run"], "command to run"),
        (["run", "--", "no-such-command-xyz"], "not found"),
        (["run", "--budget", "0", "--", "true"], "--budget"),
        (["run", "--upstream", "http://127.0.0.1:1/v1?x=1", "--", "true"], "query"),
    ):
        proc = run(tmp_path / "home", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)
        assert not (tmp_path / "home" / "logs" / "sessions").exists(), args


def test_sigterm_is_passed_to_the_command_and_the_run_recorded_as_interrupted(
    upstream: Upstream, tmp_path: Path
) -> None:
    import signal
    import time

    script = tmp_path / "sleepy.py"
    script.write_text("import time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIGIL_"))}
    env.update(SIGIL_HOME=str(home), NO_COLOR="1")
    proc = subprocess.Popen(
        [*SIGIL, "run", "--session", "sleepy", "--upstream", upstream.url,
         "--", sys.executable, str(script)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    final = events(home, "sleepy")[-1]
    assert final["event_type"] == "session_error"
    assert final["metadata"]["status"] == "interrupted"


# -- issue 14: tokens held for calls of unknown usage -------------------------------

HELD_AGENT = textwrap.dedent(
    """
    import sys
    import openai

    client = openai.OpenAI(max_retries=0)
    try:
        for model, cap in zip(sys.argv[1::2], sys.argv[2::2]):
            client.chat.completions.create(
                model=model, max_tokens=int(cap), messages=[{"role": "user", "content": "hi"}]
            )
            print("answered", model, flush=True)
    except openai.RateLimitError as exc:
        print("refused:", exc.code, flush=True)
    """
)


def _held_run(
    home: Path, script: Path, upstream: Upstream, session: str, budget: int, *calls: str
) -> subprocess.CompletedProcess[str]:
    return run(
        home, "run", "--session", session, "--budget", str(budget), "--upstream", upstream.url,
        "--", sys.executable, str(script), *calls,
    )  # fmt: skip


def _of_run(log: list[dict[str, Any]], number: int, kind: str) -> list[dict[str, Any]]:
    return [
        e for e in log if e["event_type"] == kind and e["metadata"].get("run", number) == number
    ]


def test_tokens_held_by_an_earlier_run_stay_held_in_the_next(
    upstream: Upstream, tmp_path: Path
) -> None:
    script = tmp_path / "agent.py"
    script.write_text(HELD_AGENT)
    home = tmp_path / "home"
    proc = _held_run(home, script, upstream, "held-1", 1000, "nousage", "600")
    assert proc.returncode == 0, proc.stderr
    (done,) = [e for e in events(home, "held-1") if e["event_type"] == "step_complete"]
    held = done["metadata"]["tokens_held"]
    assert done["metadata"]["usage"] == "unknown" and 600 < held < 1000

    # The next run resumes with the held tokens still held: its call is capped
    # at what neither run 1 used nor held.
    proc = _held_run(home, script, upstream, "held-1", 1000, "m", "900")
    assert proc.returncode == 0, proc.stderr
    log = events(home, "held-1")
    (step,) = [e for e in log if e["event_type"] == "step_start" and e["metadata"]["run"] == 2]
    reserved = step["metadata"]["max_tokens"] + step["metadata"].get("prompt_tokens_reserved", 0)
    assert reserved <= 1000 - held
    assert upstream.requests[-1]["max_tokens"] == step["metadata"]["max_tokens"]
    (start,) = [e for e in _of_run(log, 2, "session_start")]
    assert start["metadata"]["tokens_held_before_run"] == held
    # The session model carries them: shown beside the calls of unknown usage.
    state = monitor(home, "held-1")
    assert (state["unknown_usage_calls"], state["tokens_held"]) == (1, held)
    assert state["components"]["nousage"]["tokens_held"] == held


def test_held_tokens_that_end_the_budget_end_the_session_as_budget_exceeded(
    upstream: Upstream, tmp_path: Path
) -> None:
    script = tmp_path / "agent.py"
    script.write_text(HELD_AGENT)
    home = tmp_path / "home"
    # The call of unknown usage holds the whole budget: the next is refused.
    proc = _held_run(home, script, upstream, "held-2", 300, "nousage", "1000", "m", "10")
    assert proc.returncode == 3, proc.stderr
    assert "refused: insufficient_quota" in proc.stdout
    log = events(home, "held-2")
    (done,) = [e for e in log if e["event_type"] == "step_complete"]
    assert done["metadata"]["tokens_held"] == 300
    (exceeded,) = [e for e in log if e["event_type"] == "budget_exceeded"]
    assert exceeded["metadata"]["tokens_held"] == 300
    assert log.index(exceeded) < len(log) - 1
    assert log[-1]["metadata"]["status"] == "budget_exceeded"
    assert monitor(home, "held-2")["status"] == "budget_exceeded"

    # A later run starts with the budget still held: refused at once, exit 3.
    proc = _held_run(home, script, upstream, "held-2", 300, "m", "10")
    assert proc.returncode == 3, proc.stderr
    assert "refused: insufficient_quota" in proc.stdout
    log = events(home, "held-2")
    assert [e["metadata"]["run"] for e in log if e["event_type"] == "step_complete"] == [1]
    assert len([e for e in log if e["event_type"] == "budget_exceeded"]) == 2
    assert log[-1]["metadata"]["status"] == "budget_exceeded"
    assert upstream.requests[-1]["model"] == "nousage"  # nothing forwarded since


ROTATING_AGENT = textwrap.dedent(
    """
    import subprocess, sys, openai
    client = openai.OpenAI()
    def call(text):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}])
    for i in range(3):
        call(f"step {i}")
    subprocess.run([sys.argv[1], "-f", "-s", sys.argv[3], sys.argv[2]], check=True)
    for i in range(2):
        call(f"after {i}")
    """
)


# Debian's logrotate (installed if missing), the fixture of the rotation tests.
logrotate = test_logrotate_e2e.logrotate


def test_logrotate_during_a_proxied_run_loses_nothing(
    upstream: Upstream, tmp_path: Path, logrotate: str
) -> None:
    """Debian's logrotate (``rotate 0``: the old lines deleted) between a
    ``sigil run``'s calls: the run's end continues the model with the events
    it kept, as orchestrate's does. Before, the proxy kept none: the end read
    what was left of the log, and tokens.json was not written (the run's
    session_start was gone) while every view lost the first calls' tokens."""
    home = tmp_path / "home"
    log = home / "logs" / "sessions" / "rot" / "execution.jsonl"
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n    missingok\n    rotate 0\n    create 0600\n}}\n")
    conf.chmod(0o644)
    script = tmp_path / "agent.py"
    script.write_text(ROTATING_AGENT)
    proc = run(
        home, "run", "--session", "rot", "--budget", "50000", "--upstream", upstream.url,
        "--", sys.executable, str(script), logrotate, str(conf), str(tmp_path / "state"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    spent = upstream.totals()
    assert spent > 0 and len(upstream.requests) == 5
    tokens = json.loads((log.parent / "tokens.json").read_text())
    final = events(home, "rot")[-1]
    assert final["event_type"] == "session_complete"
    assert tokens["total_used"] == final["metadata"]["total_tokens"] == spent
    assert monitor(home, "rot")["tokens_used"] == spent
