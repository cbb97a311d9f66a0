"""The proxy's HTTP side: an OpenAI-compatible server that forwards to an upstream.

Routes (below ``/v1``): ``POST chat/completions``, ``completions``, ``responses``
and ``embeddings`` are metered (:class:`~sigil.proxy.metering.Meter`);
``GET models`` is forwarded as it is (it costs no tokens). aiohttp serves and
forwards: its server and its streaming client share one event loop, and an
upstream connection pool serves every call.

What the client sees is what the upstream sent, byte for byte, except:

* the output cap (``max_tokens``, ``max_completion_tokens``,
  ``max_output_tokens``) is lowered to what the budget grants, and set when the
  client set none;
* a streamed chat call asks for usage in the stream
  (``stream_options.include_usage``); the usage-only event is dropped again for
  a client that did not ask for it;
* the proxy's own failures are OpenAI-shaped errors: 413 for a body over the
  limit, 502 for an upstream that is down or sends a body that is not JSON,
  504 for one that is too slow, and, once the budget is spent, 429
  ``insufficient_quota`` with ``x-should-retry: false``, which the official SDKs
  raise at once instead of retrying (they retry 408, 409, 429 and 5xx unless
  that header says otherwise);
* a stream that breaks mid-way ends with an SSE ``error`` event, which the
  official SDK raises as an ``APIError``.

Keys: ``Authorization`` goes to the upstream and nowhere else; no header is
ever logged. Bound to a non-loopback address the proxy requires a token
(``X-Sigil-Token: T``, or ``Authorization: Bearer T``, which is then replaced
by the proxy's own upstream key).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import socket
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from sigil.proxy.metering import BudgetExhausted, Call, Meter, RecordingFailed
from sigil.proxy.policy import Refusal, plan_output, secrets_of
from sigil.proxy.usage import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    Endpoint,
    StreamFollower,
    Usage,
    prompt_estimate_text,
    prompt_overhead,
    prompt_text,
    usage_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from sigil.pipeline.tokenizer import BPETokenizer

__all__ = ["ProxyConfig", "ProxyServer", "UpstreamLoop"]

#: Request headers never forwarded upstream: hop-by-hop, recomputed, or the proxy's own.
_DROP_REQUEST = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
        "accept-encoding", "x-sigil-component", "x-sigil-token",
    }
)  # fmt: skip
#: Response headers never passed back: hop-by-hop, or describing the encoding we undid.
_DROP_RESPONSE = frozenset(
    {
        "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
        "upgrade", "trailer", "server", "date",
    }
)  # fmt: skip
_MAX_ERROR_BODY = 64 * 1024
#: One SSE event larger than this is not a model's output: the stream is cut.
_MAX_EVENT_BYTES = 16 << 20
#: A prompt longer than this (characters) is counted on a worker thread.
_COUNT_INLINE_CHARS = 64 << 10
_COMPONENT = re.compile(r"^[\w.:/@+-]{1,128}$")
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class UpstreamLoop(ValueError):
    """The upstream is the proxy itself."""


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """How the proxy listens and forwards."""

    #: the upstream's API root, e.g. ``http://127.0.0.1:8000/v1``
    upstream: str
    host: str = "127.0.0.1"
    port: int = 0
    #: required from clients when set (always set for a non-loopback host)
    token: str | None = None
    #: sent upstream as ``Bearer`` when the client sends no key of its own
    api_key: str | None = None
    #: seconds: connecting, a non-streamed call whole, a stream between events
    timeout: float = 60.0
    max_body_bytes: int = 32 << 20
    max_response_bytes: int = 256 << 20
    #: the output cap of a call whose client set none
    call_cap: int = 4096
    #: the chat field set when the client set none: max_tokens (what every
    #: OpenAI-compatible server knows) or max_completion_tokens (what OpenAI's
    #: reasoning models require); None picks by the upstream's host
    cap_field: str | None = None

    def chat_cap_field(self) -> str:
        if self.cap_field is not None:
            return self.cap_field
        host = urllib.parse.urlsplit(self.upstream).hostname or ""
        official = host.endswith(("openai.com", "openai.azure.com"))
        return "max_completion_tokens" if official else "max_tokens"


def openai_error(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    *,
    retry: bool | None = None,
) -> web.Response:
    """An error shaped like OpenAI's, which every OpenAI client can read."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = {}
    if retry is not None:
        headers["x-should-retry"] = "true" if retry else "false"
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _sse_error(message: str, kind: str) -> bytes:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


class ProxyServer:
    """Serves the OpenAI API on ``config.host:config.port`` and meters every call."""

    def __init__(self, meter: Meter | None, config: ProxyConfig) -> None:
        #: None until :meth:`attach`: the port can be bound before the session is
        #: locked, so a taken port refuses the run before anything is written.
        self._meter = meter
        self._attached = asyncio.Event()
        if meter is not None:
            self._attached.set()
        self.config = config
        self._upstream = config.upstream.rstrip("/")
        self._chat_cap_field = config.chat_cap_field()
        # (built once: a ClientTimeout per call is measurable at thousands a second)
        self._call_timeout = aiohttp.ClientTimeout(
            total=config.timeout, sock_connect=config.timeout, sock_read=config.timeout
        )
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeout, sock_read=config.timeout
        )
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        #: set once stop() begins: a call cut then was cut by the stop, not its client
        self._stopping = False
        #: counts each prompt before it is forwarded (its tokens are reserved)
        self._tokenizer: BPETokenizer | None = None
        self._tokenizer_loading: asyncio.Future[Any] | None = None
        self.url: str | None = None

    # -- life ----------------------------------------------------------------------

    def attach(self, meter: Meter) -> None:
        """Start metering (calls that arrived before wait for this)."""
        self._meter = meter
        self._attached.set()

    @property
    def meter(self) -> Meter:
        assert self._meter is not None
        return self._meter

    async def start(self) -> str:
        """Bind and serve; returns the base URL clients use (``http://host:port/v1``)."""
        from sigil.pipeline.tokenizer import load_tokenizer

        # Built off the event loop while the session is prepared (~150 ms).
        self._tokenizer_loading = asyncio.ensure_future(load_tokenizer())
        app = web.Application(client_max_size=self.config.max_body_bytes)
        for path, endpoint in (
            ("/v1/chat/completions", CHAT),
            ("/v1/completions", COMPLETIONS),
            ("/v1/responses", RESPONSES),
            ("/v1/embeddings", EMBEDDINGS),
        ):
            app.router.add_post(path, self._handler(endpoint))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._models)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        # On stop, calls in flight get a few seconds to end (and be recorded);
        # then they are cancelled, and recorded as failed.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        self._runner = runner
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port, backlog=1024)
            await site.start()
            host, port = runner.addresses[0][:2]
            self._check_not_self(port)
        except BaseException:
            await self.stop()
            raise
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/v1"
        return self.url

    def _check_not_self(self, port: int) -> None:
        parts = urllib.parse.urlsplit(self._upstream)
        up_port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or ""
        mine = {self.config.host, *(_LOOPBACK if self.config.host in _LOOPBACK else ())}
        if self.config.host in ("0.0.0.0", "::"):
            mine |= _LOOPBACK | {socket.gethostname()}
        if up_port == port and host in mine:
            raise UpstreamLoop(
                f"the upstream {self._upstream} is this proxy itself; point --upstream at the "
                "model server"
            )

    async def stop(self) -> None:
        """Stop accepting, let calls in flight end (they are recorded), close."""
        self._stopping = True
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- routes --------------------------------------------------------------------

    def _handler(self, endpoint: Endpoint) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._metered(request, endpoint)

        return handle

    def _authorize(self, request: web.Request) -> tuple[web.Response | None, dict[str, str]]:
        """Check the proxy token; the upstream request headers."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        token = self.config.token
        auth = request.headers.get("Authorization")
        if token is not None:
            given = request.headers.get("X-Sigil-Token")
            if given is not None and hmac.compare_digest(given.encode(), token.encode()):
                pass
            elif auth is not None and hmac.compare_digest(
                auth.encode(), f"Bearer {token}".encode()
            ):
                # The token stood in for a key: the upstream gets the proxy's own.
                headers.pop("Authorization", None)
                auth = None
            else:
                return openai_error(
                    401,
                    "sigil proxy: missing or wrong proxy token (send it as X-Sigil-Token or "
                    "as the API key)",
                    "invalid_request_error",
                    "invalid_api_key",
                ), headers
        if auth is None and self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return None, headers

    async def _not_found(self, request: web.Request) -> web.Response:
        return openai_error(
            404,
            f"sigil proxy does not forward {request.method} {request.path}; it serves "
            "POST /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings "
            "and GET /v1/models",
            "invalid_request_error",
            "unknown_url",
        )

    async def _models(self, request: web.Request) -> web.Response:
        denied, headers = self._authorize(request)
        if denied is not None:
            return denied
        assert self._session is not None
        url = self._upstream + request.path[len("/v1") :]
        try:
            async with self._session.get(
                url,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                allow_redirects=False,
            ) as resp:
                raw = await _read_bounded(resp, self.config.max_response_bytes)
                return web.Response(status=resp.status, body=raw, headers=_back(resp))
        except TimeoutError:
            return self._timeout_error()
        except (aiohttp.ClientError, _TooLarge) as exc:
            return self._unreachable(exc)

    # -- metered calls ---------------------------------------------------------------

    async def _metered(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        denied, headers = self._authorize(request)
        if denied is not None:
            return denied
        if self._meter is None:
            await self._attached.wait()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return openai_error(
                413,
                f"sigil proxy: request body over {self.config.max_body_bytes:,} bytes",
                "invalid_request_error",
                "request_too_large",
            )
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return openai_error(
                400, "sigil proxy: the request body is not a JSON object",
                "invalid_request_error", "invalid_json",
            )  # fmt: skip
        model = body["model"] if isinstance(body.get("model"), str) else "unknown"
        component = _component(request.headers.get("X-Sigil-Component"), model)
        stream = body.get("stream") is True
        # Each completion (n choices, best_of, each prompt of a list) may produce up to the cap.
        try:
            plan = plan_output(endpoint, body)
        except Refusal as exc:
            return openai_error(400, f"sigil proxy: {exc}", "invalid_request_error", exc.code)
        requested = plan.requested
        wanted = plan.wanted(self.config.call_cap)
        endpoint_name = "/v1" + endpoint.path
        prompt = await self._prompt_tokens(body)
        try:
            granted = await self.meter.admit(wanted, prompt, plan.least)
        except BudgetExhausted as exc:
            await self.meter.refuse(
                component=component, endpoint=endpoint_name, model=model, stream=stream,
                error=str(exc),
            )  # fmt: skip
            return openai_error(
                429, f"sigil: {exc}", "insufficient_quota", "insufficient_quota", retry=False
            )
        except RecordingFailed as exc:
            return openai_error(
                503, f"sigil: {exc}", "server_error", "recording_failed", retry=False
            )
        if endpoint.cap_fields:
            default = self._chat_cap_field if endpoint is CHAT else endpoint.cap_fields[0]
            body.update(plan.caps_to_send(granted, default))
        asked_usage = True
        if stream and endpoint.stream_options:
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            asked_usage = options.get("include_usage") is True
            options["include_usage"] = True
            body["stream_options"] = options
        secrets = secrets_of(request.headers, self.config.api_key, self.config.token)
        call = await self.meter.start(
            component=component, endpoint=endpoint_name, model=model, stream=stream,
            granted=granted, requested=requested, prompt=prompt, secrets=secrets,
        )  # fmt: skip
        try:
            return await self._forward(request, call, endpoint, body, headers, stream, asked_usage)
        except BaseException as exc:
            if not call.settled:
                # Cancelled (the proxy is stopping) or a bug: the call is still recorded.
                if self._stopping:
                    text, category = "the proxy stopped before the call ended", "proxy_stopped"
                else:
                    text, category = f"proxy error: {type(exc).__name__}: {exc}", "proxy"
                await asyncio.shield(self.meter.fail(call, text, category=category))
            raise

    async def _prompt_tokens(self, body: dict[str, Any]) -> int:
        """The prompt's tokens to reserve: its UTF-8 length while that is small
        beside what is free of the budget, else its cl100k_base count; with the
        chat format's own tokens either way.

        The length is an upper bound (a byte-level BPE token is at least one
        byte) that costs nothing, where counting costs ~0.25 us a character:
        milliseconds per call for an agent's long conversation. Its excess is
        given back when the call settles; near the end of the budget, where
        the reservation decides what is admitted, the count is exact."""
        text = prompt_estimate_text(body)
        overhead = prompt_overhead(body)
        bound = len(text.encode("utf-8", "surrogatepass")) + overhead
        if bound * 4 <= self.meter.free:
            return bound
        tokenizer = self._tokenizer
        if tokenizer is None:
            from sigil.pipeline.tokenizer import load_tokenizer

            tokenizer = self._tokenizer = await load_tokenizer()
        if len(text) > _COUNT_INLINE_CHARS:
            count = await asyncio.to_thread(tokenizer.count, text)
        else:
            count = tokenizer.count(text)
        return count + overhead

    async def _forward(
        self,
        request: web.Request,
        call: Call,
        endpoint: Endpoint,
        body: dict[str, Any],
        headers: dict[str, str],
        stream: bool,
        asked_usage: bool,
    ) -> web.StreamResponse:
        assert self._session is not None
        cfg = self.config
        headers["Content-Type"] = "application/json"
        timeout = self._stream_timeout if stream else self._call_timeout
        try:
            resp = await self._session.post(
                self._upstream + endpoint.path,
                data=orjson.dumps(body),
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )
        except TimeoutError:
            await self.meter.fail(call, self._timeout_text(), category="timeout", status=504)
            return self._timeout_error()
        except aiohttp.ClientError as exc:
            await self.meter.fail(
                call, self._unreachable_text(exc), category="upstream_unavailable", status=502
            )
            return self._unreachable(exc)
        async with resp:
            if resp.status >= 300:
                return await self._upstream_error(call, resp)
            is_sse = resp.content_type == "text/event-stream"
            if stream and is_sse:
                return await self._relay_stream(request, call, endpoint, body, resp, asked_usage)
            try:
                raw = await _read_bounded(resp, cfg.max_response_bytes)
            except TimeoutError:
                await self.meter.fail(call, self._timeout_text(), category="timeout", status=504)
                return self._timeout_error()
            except (aiohttp.ClientError, _TooLarge) as exc:
                text = f"upstream response failed: {exc}"
                await self.meter.fail(call, text, category="upstream_error", status=502)
                return openai_error(502, f"sigil proxy: {text}", "upstream_error", "bad_gateway")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            snippet = raw[:120].decode("utf-8", "replace")
            text = f"upstream returned a body that is not a JSON object: {snippet!r}"
            await self.meter.fail(call, text, category="upstream_invalid", status=502)
            return openai_error(502, f"sigil proxy: {text}", "upstream_error", "bad_gateway")
        usage = usage_of(endpoint, data.get("usage"))
        model = data.get("model") if isinstance(data.get("model"), str) else None
        await self.meter.complete(call, usage, model=model, status=resp.status)
        return web.Response(status=resp.status, body=raw, headers=_back(resp))

    async def _upstream_error(self, call: Call, resp: aiohttp.ClientResponse) -> web.Response:
        try:
            raw = await _read_bounded(resp, _MAX_ERROR_BODY, truncate=True)
        except (TimeoutError, aiohttp.ClientError):
            raw = b""
        detail = _error_detail(raw)
        text = f"upstream answered HTTP {resp.status}" + (f": {detail}" if detail else "")
        await self.meter.fail(call, text, category="upstream_error", status=resp.status)
        # The client sees the upstream's own answer, so its SDK retries what it would retry.
        return web.Response(status=resp.status, body=raw, headers=_back(resp))

    async def _relay_stream(
        self,
        request: web.Request,
        call: Call,
        endpoint: Endpoint,
        body: dict[str, Any],
        resp: aiohttp.ClientResponse,
        asked_usage: bool,
    ) -> web.StreamResponse:
        follower = StreamFollower(endpoint, drop_usage_only=not asked_usage)
        out = web.StreamResponse(status=resp.status, headers=_back(resp))
        await out.prepare(request)
        first_ms: float | None = None
        broke: str | None = None
        client_gone = False
        try:
            async for chunk in resp.content.iter_any():
                data = follower.feed(chunk)
                if follower.pending > _MAX_EVENT_BYTES:
                    broke = f"upstream sent an event over {_MAX_EVENT_BYTES:,} bytes"
                    break
                if data:
                    if first_ms is None:
                        first_ms = call.elapsed_ms()
                    try:
                        await out.write(data)
                    except ConnectionError:
                        client_gone = True
                        break
            else:
                tail = follower.flush()
                if tail:
                    try:
                        await out.write(tail)
                    except ConnectionError:
                        client_gone = True
        except TimeoutError:
            broke = f"upstream stream stalled: no data for {self.config.timeout:g}s"
        except aiohttp.ClientError as exc:
            broke = f"upstream stream broke: {exc or type(exc).__name__}"
        if not (broke or client_gone) and not follower.done and follower.usage is None:
            broke = "upstream stream ended before its last event"
        extra: dict[str, Any] = {"events": follower.events}
        if first_ms is not None:
            extra["ttft_ms"] = first_ms
        if follower.finish_reason is not None:
            extra["finish_reason"] = follower.finish_reason
        if client_gone or broke:
            resp.close()  # stop the upstream generating what nobody reads
            usage = follower.usage or await _estimate(body, follower)
            if client_gone and self._stopping:
                what, category = "the proxy stopped mid-stream", "proxy_stopped"
            elif client_gone:
                what, category = "client disconnected mid-stream", "client_disconnected"
            else:
                assert broke is not None
                what, category = broke, "upstream_stream"
            await self.meter.fail(
                call,
                what,
                category=category,
                status=resp.status,
                usage=usage,
                model=follower.model,
            )
            if not client_gone:
                with contextlib.suppress(ConnectionError):
                    await out.write(_sse_error(f"sigil proxy: {what}", "upstream_error"))
        elif follower.error is not None:
            # What arrived before the error was generated: counted as a broken stream is.
            usage = follower.usage or await _estimate(body, follower)
            await self.meter.fail(
                call, f"upstream error in stream: {follower.error}", category="upstream_error",
                status=resp.status, usage=usage, model=follower.model,
            )  # fmt: skip
        else:
            await self.meter.complete(
                call, follower.usage, model=follower.model, status=resp.status, extra=extra
            )
        if not client_gone:
            with contextlib.suppress(ConnectionError):
                await out.write_eof()
        return out

    # -- errors ----------------------------------------------------------------------

    def _timeout_text(self) -> str:
        return f"upstream {self._upstream} did not answer within {self.config.timeout:g}s"

    def _timeout_error(self) -> web.Response:
        return openai_error(
            504, f"sigil proxy: {self._timeout_text()}", "upstream_error", "timeout"
        )

    def _unreachable_text(self, exc: BaseException) -> str:
        return f"upstream {self._upstream} unreachable: {exc or type(exc).__name__}"

    def _unreachable(self, exc: BaseException) -> web.Response:
        return openai_error(
            502, f"sigil proxy: {self._unreachable_text(exc)}", "upstream_error", "bad_gateway"
        )


class _TooLarge(Exception):
    pass


async def _read_bounded(
    resp: aiohttp.ClientResponse, limit: int, *, truncate: bool = False
) -> bytes:
    """The body, at most ``limit`` bytes (past it: cut, or :class:`_TooLarge`)."""
    if resp.content_length is not None and resp.content_length <= limit:
        return await resp.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if truncate:
                break
            raise _TooLarge(f"response body over {limit:,} bytes")
    return b"".join(chunks)[:limit]


def _back(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The upstream's response headers a client may see."""
    return {k: v for k, v in resp.headers.items() if k.lower() not in _DROP_RESPONSE}


def _component(header: str | None, model: str) -> str:
    """The component a call is logged under: the header's name, else the model."""
    if header is not None and _COMPONENT.match(header):
        return header
    return model[:128] if model else "unknown"


def _error_detail(raw: bytes) -> str:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode("utf-8", "replace").strip()
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"][:200]
    if isinstance(err, str):
        return err[:200]
    return raw[:200].decode("utf-8", "replace").strip()


async def _estimate(body: dict[str, Any], follower: StreamFollower) -> Usage:
    """The tokens of a stream that broke before its usage: the prompt and the text
    that arrived, counted with the offline tokenizer (flagged as estimated)."""
    from sigil.pipeline.tokenizer import load_tokenizer

    tokenizer = await load_tokenizer()
    return Usage(tokenizer.count(prompt_text(body)), tokenizer.count(follower.text), estimated=True)
