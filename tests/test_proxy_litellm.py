"""``sigil proxy`` in front of LiteLLM's proxy (issue 14): the official ``openai``
SDK calls ``sigil proxy``, which forwards to a real ``litellm`` server on
127.0.0.1 serving a mock model (``litellm_params.mock_response``: no provider is
called). The tokens in sigil's log are exactly the ``usage`` LiteLLM reported,
non-streamed and streamed.

LiteLLM comes with the test extra (``litellm[proxy]``); it reads its bundled
model cost map (``LITELLM_LOCAL_MODEL_COST_MAP``) so the test makes no network call.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

# litellm[proxy] is in the test extra: a missing install fails here (never a skip).
if importlib.util.find_spec("litellm") is None:
    raise ImportError("litellm[proxy] is not installed: pip install -e '.[test]'")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SIGIL = [sys.executable, "-m", "sigil"]
MASTER_KEY = "sk-sigil-test-0123456789abcdef0123456789abcdef"
CONFIG = f"""\
model_list:
  - model_name: mock-gpt
    litellm_params:
      model: openai/gpt-4o
      api_key: sk-not-used
      mock_response: "A mock answer, long enough to be a few tokens of output."
litellm_settings:
  telemetry: false
general_settings:
  master_key: {MASTER_KEY}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIGIL_"))}
    env.update(SIGIL_HOME=str(home), NO_COLOR="1", LITELLM_LOCAL_MODEL_COST_MAP="True")
    return env


@pytest.fixture
def litellm_url(tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "litellm.yaml"
    config.write_text(CONFIG)
    port = _free_port()
    exe = Path(sys.executable).with_name("litellm")
    proc = subprocess.Popen(
        [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        env=_env(tmp_path / "home"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"litellm did not start: {proc.communicate()[1][-3000:]}")
            try:
                if httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("litellm did not answer within 150 s")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_tokens_in_the_log_are_litellms_usage_exactly(litellm_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = subprocess.Popen(
        [*SIGIL, "proxy", "--session", "ll", "--port", "0", "--budget", "100000",
         "--upstream", litellm_url],
        env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = next((ln.split()[1] for ln in proc.stdout if ln.startswith("Proxy: ")), None)
        assert url is not None, proc.stderr.read() if proc.stderr else ""
        client = openai.OpenAI(api_key=MASTER_KEY, base_url=url, max_retries=0)
        msgs: Any = [{"role": "user", "content": "Say something, mock model."}]
        reported: list[tuple[int, int]] = []

        chat = client.chat.completions.create(model="mock-gpt", messages=msgs)
        assert chat.choices[0].message.content and chat.usage is not None
        reported.append((chat.usage.prompt_tokens, chat.usage.completion_tokens))

        usage = None
        text = ""
        for chunk in client.chat.completions.create(
            model="mock-gpt", messages=msgs, stream=True, stream_options={"include_usage": True}
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        assert text and usage is not None
        reported.append((usage.prompt_tokens, usage.completion_tokens))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    log = home / "logs" / "sessions" / "ll" / "execution.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    done = [e for e in events if e["event_type"] == "step_complete"]
    assert [e["metadata"]["stream"] for e in done] == [False, True]
    logged = [(e["metadata"]["input_tokens"], e["metadata"]["output_tokens"]) for e in done]
    assert logged == reported
    assert all(e["tokens"] == i + o for e, (i, o) in zip(done, reported, strict=True))
    assert not any("usage_estimated" in e["metadata"] for e in done)
    assert events[-1]["metadata"]["total_tokens"] == sum(i + o for i, o in reported)
