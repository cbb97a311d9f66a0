"""A web page cannot spend the user's key through the loopback proxy.

A browser lets any page send a "simple" cross-origin POST (``text/plain`` body,
no preflight) to 127.0.0.1, and a page that rebinds its own DNS name to
127.0.0.1 can even read the answers. Without a token the proxy forwards what
reaches it with the proxy's own key, so it refuses what only a browser sends:
an ``Origin`` that is not a loopback origin, a ``Sec-Fetch-Site`` of another
site, or (for DNS rebinding) a ``Host`` that is not a loopback name. Clients
that are programs (the SDKs, curl) send none of these and pass as before.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Callable

import pytest

import test_proxy
from proxy_upstream import Upstream
from test_proxy import Proxy, steps

upstream = test_proxy.upstream
start_proxy = test_proxy.start_proxy

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "spend my money"}]})
KEY = "sk-victim-key-0123456789abcdef"


def _post(proxy: Proxy, headers: dict[str, str], path: str = "/v1/chat/completions") -> int:
    u = urllib.parse.urlsplit(proxy.url)
    assert u.hostname and u.port
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        method = "GET" if path.endswith("/models") else "POST"
        conn.request(method, path, body=None if method == "GET" else BODY, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status == 403:
            assert json.loads(body)["error"]["code"] == "forbidden_origin", body
        return resp.status
    finally:
        conn.close()


def _port(proxy: Proxy) -> int:
    port = urllib.parse.urlsplit(proxy.url).port
    assert port
    return port


@pytest.mark.parametrize(
    "browser",
    [
        # fetch(url, {method: "POST", mode: "no-cors", body}) from https://evil.example
        {"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://evil.example",
         "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
        # An Origin alone (older browsers send no Sec-Fetch-*)
        {"Content-Type": "text/plain", "Origin": "http://evil.example"},
        # A sandboxed page's opaque origin
        {"Content-Type": "text/plain", "Origin": "null"},
        # Sec-Fetch-Site alone
        {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
        # DNS rebinding: the page's own name, now resolving to 127.0.0.1
        {"Content-Type": "application/json", "Host": "evil.example:{port}"},
    ],
)  # fmt: skip
def test_a_web_page_is_refused_and_nothing_reaches_the_upstream(
    upstream: Upstream, start_proxy: Callable[..., Proxy], browser: dict[str, str]
) -> None:
    proxy = start_proxy("--upstream", upstream.url, env={"OPENAI_API_KEY": KEY})
    headers = {k: v.format(port=_port(proxy)) for k, v in browser.items()}
    assert _post(proxy, headers) == 403
    assert _post(proxy, headers, "/v1/models") == 403
    assert upstream.headers == []
    code, _, err = proxy.stop()
    assert code == 0, err
    assert steps(proxy.events(), "step_start") == []


@pytest.mark.parametrize(
    "program",
    [
        {"Content-Type": "application/json"},
        {"Content-Type": "application/json", "Host": "localhost:{port}"},
        {"Content-Type": "application/json", "Host": "127.0.0.1"},
        # A page served from the machine itself (a local tool's UI)
        {"Content-Type": "application/json", "Origin": "http://localhost:3000",
         "Sec-Fetch-Site": "same-site"},
        {"Content-Type": "application/json", "Origin": "http://127.0.0.1:{port}",
         "Sec-Fetch-Site": "same-origin"},
        {"Content-Type": "application/json", "Sec-Fetch-Site": "none"},
    ],
)  # fmt: skip
def test_programs_and_pages_of_this_machine_pass(
    upstream: Upstream, start_proxy: Callable[..., Proxy], program: dict[str, str]
) -> None:
    proxy = start_proxy("--upstream", upstream.url, env={"OPENAI_API_KEY": KEY})
    headers = {k: v.format(port=_port(proxy)) for k, v in program.items()}
    assert _post(proxy, headers) == 200
    assert upstream.headers[-1]["Authorization"] == f"Bearer {KEY}"
    code, _, err = proxy.stop()
    assert code == 0, err


def test_with_a_token_a_page_may_call_the_proxy(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    """Beyond loopback the token is what admits a call: a page that has it was
    given it, and the Host is whatever name the machine is reached by."""
    proxy = start_proxy(
        "--upstream", upstream.url, "--host", "127.0.0.1", "--token", "tok-123",
        env={"OPENAI_API_KEY": KEY},
    )  # fmt: skip
    page = {"Content-Type": "application/json", "Origin": "https://app.example",
            "Host": "gpu-box.lan:{port}", "Sec-Fetch-Site": "cross-site"}  # fmt: skip
    headers = {k: v.format(port=_port(proxy)) for k, v in page.items()}
    assert _post(proxy, headers) == 401
    assert _post(proxy, {**headers, "X-Sigil-Token": "tok-123"}) == 200
    proxy.stop()
