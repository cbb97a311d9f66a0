"""An upstream that ignores the output cap cannot spend the budget without end.

The proxy lowers each call's ``max_tokens`` to what the budget grants it; an
upstream that streams past it (a server that ignores the cap, a model in a
loop) was relayed for as long as it went on: one call granted 4,096 tokens
recorded 3,143,984 against a 256,000 budget (hostile review, finding 5). The
proxy counts a stream's text as it comes and cuts it once it is past twice
the grant (the slack covers a model whose tokenizer is not ``cl100k_base``):
the call is recorded with what arrived, the client gets an error event, and
the upstream stops generating when its connection closes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import openai
import pytest

import test_proxy
from proxy_upstream import Upstream
from test_proxy import Proxy, steps

upstream = test_proxy.upstream
start_proxy = test_proxy.start_proxy

CAP = 100


def test_a_stream_past_its_grant_is_cut_and_recorded(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy("--upstream", upstream.url, "--budget", "256000", "--call-cap", str(CAP))
    client = proxy.client(max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "go on forever"}]
    pieces = 0
    with pytest.raises(openai.APIError, match="past the 100 output tokens granted"):
        for chunk in client.chat.completions.create(model="runaway", messages=msgs, stream=True):
            pieces += sum(1 for c in chunk.choices if c.delta.content)
    assert CAP < pieces <= 2 * CAP + 256 + 64
    # The upstream stopped generating once its connection closed.
    time.sleep(0.5)
    sent = upstream.runaway_pieces
    time.sleep(0.5)
    assert upstream.runaway_pieces == sent
    # The proxy goes on serving, and the call is recorded with what arrived.
    client.chat.completions.create(model="m", messages=msgs)
    code, _, err = proxy.stop()
    assert code == 0, err
    events = proxy.events()
    [error] = steps(events, "step_error")
    assert error["metadata"]["category"] == "upstream_stream"
    [spent] = steps(events, "token_consumption")
    assert spent["metadata"]["usage_estimated"] is True
    assert CAP < spent["metadata"]["output_tokens"] <= 2 * CAP + 256 + 64
    state = proxy.monitor()
    assert state["tokens_used"] < 1000, state


def test_a_stream_within_its_grant_is_never_cut(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    upstream.pieces = CAP  # the whole grant, one token a piece
    proxy = start_proxy("--upstream", upstream.url, "--call-cap", str(CAP))
    client = proxy.client(max_retries=0)
    msgs = [{"role": "user", "content": "x"}]
    stream = client.chat.completions.create(
        model="m", messages=msgs, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == CAP
    proxy.stop()
    assert steps(proxy.events(), "step_error") == []
